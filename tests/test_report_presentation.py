"""The HTML report says what happened legibly: the plan's time zone, simulated time marked,
wave markers on the progress chart, failure reasons in full."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from orchestrator import report
from orchestrator.engine import RunOptions, execute
from orchestrator.loaded_plan import load_plan
from orchestrator.report import collect, render_to_string
from orchestrator.report_html import TEXT_CHARS
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.simulator.faults import FaultConfig
from orchestrator.status import read_status

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


async def _run(
    tmp_path: Path, count: int, failure_rate: float | None, follow: bool, detail_padding: int = 0
) -> Path:
    """A run of COUNT WM-200 meters on the simulator (failure texts DETAIL_PADDING characters
    longer, each naming its device: the simulator's fault knob); its journal."""
    config = SimulatorConfig(
        tls=False,
        devices=8000,
        seed=4,
        rate_limit=(2000, 1.0),
        speed=36000,
        failure_rate=failure_rate,
        faults=FaultConfig(detail_padding=detail_padding),
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


def _rewrite_details(journal: Path, detail: Callable[[int], str]) -> int:
    """Give each failed device's kept subtask row the detail DETAIL(n) (the n-th row): what a
    platform answering long or unique failure texts leaves in the journal. Rows rewritten."""
    db = sqlite3.connect(journal)
    with db:
        rows = db.execute(
            "SELECT rowid FROM device_results WHERE outcome IN ('failed', 'timed-out')"
        ).fetchall()
        for n, (rowid,) in enumerate(rows):
            db.execute("UPDATE device_results SET detail=? WHERE rowid=?", (detail(n), rowid))
    db.close()
    return len(rows)


async def test_failure_reasons_are_bounded_and_counted_only_when_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unique failure details: at most REASONS_KEPT reasons are counted apart, the rest as one
    "other reasons" row, every failed device counted once; CSV/JSONL collect no reasons."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    journal = await _run(tmp_path, 600, 0.2, follow=True)
    failed = _rewrite_details(journal, lambda n: f"unique failure {n}\n  (long\ttext)")
    assert failed > 5
    monkeypatch.setattr(report, "REASONS_KEPT", 3)
    data = collect(journal, "test-plan")
    assert len(data.failure_reasons) == 4 and data.failure_reasons[0][0].endswith("(long text)")
    assert data.failure_reasons[-1] == ("other reasons (past the first 3)", failed - 3)
    assert sum(n for _, n in data.failure_reasons) == data.totals["failed"] == failed
    html = render_to_string(data, "html")
    assert "other reasons (past the first 3)" in html
    assert collect(journal, "test-plan", reasons=False).failure_reasons == []


async def test_long_details_are_cut_on_the_page_and_whole_in_the_device_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 KB failure details: the page shows each reason and detail cut to TEXT_CHARS with "…"
    (so its size stays bounded); CSV, JSON and JSON Lines keep them whole."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    journal = await _run(tmp_path, 600, 0.2, follow=True, detail_padding=4000)
    data = collect(journal, "test-plan", listed=20)
    html = render_to_string(data, "html")
    assert "x" * TEXT_CHARS not in html
    cut = re.findall(r'<td class="(?:reason|wrap)">([^<]*)</td>', html)
    long = [text for text in cut if "(device " in text]
    assert long and all(len(text) == TEXT_CHARS and text.endswith("…") for text in long)
    assert len(html) < 200_000
    lines = [json.loads(line) for line in render_to_string(data, "jsonl").splitlines()]
    whole = [row for row in lines if row["detail"].endswith("x" * 4000)]
    assert len(whole) == data.totals["failed"] > 0


async def test_failures_not_read_yet_have_their_own_reasons_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finished tasks whose subtasks are not read yet: their failures are one reasons row
    ("reason not read yet") and a summary card, the count `rollout status` shows apart; the
    read reasons still add up to the failed devices."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    journal = await _run(tmp_path, 768, 0.2, follow=True)
    db = sqlite3.connect(journal)
    with db:  # the monitor listed the first task final and has not read its subtasks yet
        op, unread = db.execute(
            "SELECT operation_id, failed FROM tasks ORDER BY chunk_id LIMIT 1"
        ).fetchone()
        db.execute(
            "UPDATE tasks SET details_fetched=0, fails_seen=0, verified=0, unreported=0"
            " WHERE operation_id=?",
            (op,),
        )
        db.execute("DELETE FROM device_results WHERE operation_id=?", (op,))
    db.close()
    assert unread > 0
    data = collect(journal, "test-plan", listed=20)
    assert data.totals["failed_unread"] == unread
    assert read_status(journal, "test-plan")["devices_failed_unread"] == unread
    assert sum(n for _, n in data.failure_reasons) == data.totals["failed"]
    html = render_to_string(data, "html")
    row = '<tr class="unread"><td class="reason">reason not read yet (subtasks not read)</td>'
    assert f"{row}<td>{unread}</td>" in html and 'id="reasons-unread"' in html
    assert f"<b>{unread}</b><span>of which failed, reason not read yet</span>" in html
    assert json.loads(render_to_string(data, "json"))["summary"]["failed_unread"] == unread


async def test_the_progress_series_ends_at_the_summarys_failed_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's last sample counts failed devices as the summary does: the platform's
    fail of a meter already on the version (already current) is no failure."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    journal = await _run(tmp_path, 600, None, follow=True)  # the models' own behaviour
    data = collect(journal, "test-plan")
    assert data.totals["already_current"] > 0  # the simulator's fleet holds some
    assert data.progress[-1]["failed"] == data.totals["failed"]
