"""The HTML report says what happened legibly: the plan's time zone, simulated time marked,
wave markers on the progress chart, failure reasons in full."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from orchestrator.engine import RunOptions, execute
from orchestrator.loaded_plan import load_plan
from orchestrator.report import collect, render_to_string
from orchestrator.simulator import SimulatorConfig, SimulatorServer

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, write_plan
from .simhelpers import devices_of

PLANS = Path(__file__).resolve().parent.parent / "plans"


async def test_report_shows_zone_simulated_time_wave_markers_and_full_reasons(
    tmp_path: Path,
) -> None:
    """A run on the embedded simulator in Asia/Tokyo: platform times are shown in Tokyo time
    and marked simulated, each wave has a marker, and a long failure reason is whole."""
    fleet = (PLANS / "demo-fleet.csv").read_text().splitlines()
    (tmp_path / "fleet.csv").write_text("\n".join(fleet[:601]) + "\n")
    plan = tmp_path / "plan.toml"
    plan.write_text("""
name = "tokyo"
[platform]
url = "simulator"
rate_limit = "2000/1"
[platform.simulator]
devices = 24000
seed = 1
speed = 36000
[firmware]
version = "2.1.0"
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[fleet]
devices_file = "fleet.csv"
[policy]
timezone = "Asia/Tokyo"
[monitor]
poll_interval = 0.1
max_poll_interval = 0.2
[[waves]]
name = "canary"
count = 256
[[waves]]
name = "rest"
""")
    await execute(load_plan(plan), RunOptions())
    data = collect(tmp_path / ".rollout" / "tokyo.journal.sqlite", "tokyo")
    html = render_to_string(data, "html")
    assert "times in Asia/Tokyo" in html and 'id="simulated"' in html
    assert "×36000" in html and "created (sim.)" in html
    task = data.tasks[0]
    created = datetime.strptime(task["created"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    shown = created.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d %H:%M:%S")
    assert f"<td>{shown}</td>" in html and task["created"] not in html
    markers = re.findall(r'class="wave-marker"', html)
    assert len(markers) == 2 and ">canary</text>" in html and ">rest</text>" in html
    assert data.failure_reasons, "the simulator's meters always fail a few"
    for reason, _ in data.failure_reasons:
        assert f'<td class="reason">{reason}</td>' in html
    assert 'class="series-submitted"' in html and 'class="series-finished"' in html


async def _run(tmp_path: Path, count: int, failure_rate: float, follow: bool) -> Path:
    """A run of COUNT WM-200 meters on the simulator; its journal."""
    config = SimulatorConfig(
        tls=False,
        devices=8000,
        seed=4,
        rate_limit=(2000, 1.0),
        speed=36000,
        failure_rate=failure_rate,
    )
    monitor = "follow = true\npoll_interval = 0.1\nmax_poll_interval = 0.2"
    async with SimulatorServer(config) as sim:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", count),
            monitor=monitor if follow else "follow = false",
        )
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    return tmp_path / "j.sqlite"


async def test_lists_are_capped_with_the_count_beyond(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the limit the page lists the first LIMIT failed devices and counts the others;
    the JSON report still holds every device."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    data = collect(await _run(tmp_path, 600, 0.2, follow=True), "test-plan", listed=20)
    failed = data.totals["failed"]
    assert failed > 20
    html = render_to_string(data, "html")
    table = re.search(r'<table id="failed">(.*?)</table>', html)
    assert table is not None and table.group(1).count("<tr>") == 1 + 20
    assert f'id="failed-more"><b>{failed - 20}</b> more failed devices' in html
    assert '<table id="devices">' not in html and 'id="devices-elsewhere"' in html
    assert len(json.loads(render_to_string(data, "json"))["devices"]) == 600


async def test_mid_run_page_does_not_list_every_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks created but not observed yet: the page counts their devices and lists none."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    data = collect(await _run(tmp_path, 1500, 0.0, follow=False), "test-plan")
    assert data.totals["in_progress"] == data.totals["devices"] == 1500
    html = render_to_string(data, "html")
    assert '<table id="devices">' not in html and 'id="devices-elsewhere"' in html
    devices = {row.device_id for row in data.devices()}
    assert not [device for device in devices if device in html]
