"""The HTML report in headless Chromium (Debian's `chromium`): it renders, with its charts."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.engine import RunOptions, execute
from orchestrator.loaded_plan import load_plan
from orchestrator.report import ReportData, collect, render_to_string, write_html
from orchestrator.simulator import SimulatorConfig, SimulatorServer

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, write_plan
from .simhelpers import devices_of

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


@pytest.fixture
async def report_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = SimulatorConfig(
        tls=False, devices=3000, seed=4, rate_limit=(2000, 1.0), speed=36000, failure_rate=0.1
    )
    async with SimulatorServer(config) as sim:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", 600),
            monitor="follow = true\npoll_interval = 0.1\nmax_poll_interval = 0.2",
            waves='[[waves]]\nname = "canary"\ncount = 256\n[[waves]]\nname = "rest"\n',
        )
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    path = tmp_path / "report.html"
    path.write_text(render_to_string(collect(tmp_path / "j.sqlite", "test-plan"), "html"))
    return path


@pytest.fixture
async def big_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, ReportData]:
    """A finished run of 100 000 devices (2 % fail) on the simulator, and its HTML page."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = SimulatorConfig(
        tls=False,
        devices=420_000,  # ≥ 100 000 of them WM-200
        seed=4,
        rate_limit=(100_000, 1.0),
        speed=360_000,
        failure_rate=0.02,
    )
    async with SimulatorServer(config) as sim:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", 100_000),
            monitor="follow = true\npoll_interval = 0.1\nmax_poll_interval = 0.2",
        )
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    data = collect(tmp_path / "j.sqlite", "test-plan")
    path = tmp_path / "big.html"
    with path.open("w", encoding="utf-8") as out:
        write_html(data, out)
    return path, data


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_report_renders_with_its_charts(report_file: Path, tmp_path: Path) -> None:
    """Chromium's rendered DOM holds the three charts with their drawn marks."""
    result = _chromium(tmp_path, "--dump-dom", report_file.as_uri())
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-1000:]
    for chart in ("chart-progress", "chart-waves", "chart-reasons"):
        assert f'id="{chart}"' in dom
    assert "<polyline" in dom and 'class="bar-upgraded"' in dom and 'class="bar-reason"' in dom
    assert "Uncaught" not in result.stderr


def test_report_is_self_contained_and_readable_on_a_phone(
    report_file: Path, tmp_path: Path
) -> None:
    """No external asset is referenced, and a phone-width screenshot renders."""
    html = report_file.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert 'name="viewport"' in html
    shot = tmp_path / "phone.png"
    result = _chromium(
        tmp_path, "--window-size=412,915", f"--screenshot={shot}", report_file.as_uri()
    )
    assert result.returncode == 0, result.stderr[-1000:]
    assert shot.stat().st_size > 10_000


def test_report_of_100_000_devices_renders_with_capped_lists(
    big_report: tuple[Path, ReportData], tmp_path: Path
) -> None:
    """A 100 000-device page renders in Chromium: the summary, the first 1 000 failed devices
    and the count of the others; no list of every device."""
    path, data = big_report
    failed = data.totals["failed"]
    assert data.totals["devices"] == 100_000 and failed > data.listed == 1_000
    result = _chromium(tmp_path, "--dump-dom", path.as_uri())
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-1000:]
    summary = re.search(r'<section class="cards" id="summary">(.*?)</section>', dom)
    assert summary is not None and "<b>100000</b><span>devices</span>" in summary.group(1)
    assert f'id="failed-more"><b>{failed - 1_000}</b> more failed devices' in dom
    failed_table = re.search(r'<table id="failed">(.*?)</table>', dom, re.S)
    assert failed_table is not None and failed_table.group(1).count("<tr>") == 1 + 1_000
    assert 'id="devices-elsewhere"' in dom and '<table id="devices">' not in dom
