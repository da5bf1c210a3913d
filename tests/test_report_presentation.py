"""The HTML report says what happened legibly: the plan's time zone, simulated time marked,
wave markers on the progress chart, failure reasons in full."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from orchestrator.engine import RunOptions, execute
from orchestrator.plan import load_plan
from orchestrator.report import collect, render_to_string

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
