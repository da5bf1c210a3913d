"""Daily maintenance windows in real time: DST nights in Europe/Berlin and America/New_York.

2026's changes: Berlin springs forward 29 March 02:00 → 03:00 and falls back 25 October
03:00 → 02:00; New York springs forward 8 March 02:00 → 03:00 and falls back 1 November
02:00 → 01:00. Each case is a window inside, across or beside the changed hour.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.engine import RunOptions, execute
from orchestrator.loaded_plan import load_plan
from orchestrator.plan import WindowSection
from orchestrator.simulator import SimulatorConfig, SimulatorServer, parse_platform_time

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, write_plan
from .simhelpers import devices_of

MIN = timedelta(minutes=5)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# zone, DST night (local date), window start, end, the real (UTC) window of that night —
# or None when DST leaves under 5 minutes of it and the night is skipped
Case = tuple[str, date, str, str, tuple[str, str] | None]
CASES: dict[str, Case] = {
    "berlin-spring-inside": ("Europe/Berlin", date(2026, 3, 29), "02:30", "03:00", None),
    "berlin-spring-across": (
        "Europe/Berlin",
        date(2026, 3, 29),
        "01:30",
        "03:30",
        ("2026-03-29T00:30", "2026-03-29T01:30"),
    ),
    "berlin-spring-start-in-gap": (
        "Europe/Berlin",
        date(2026, 3, 29),
        "02:15",
        "04:00",
        ("2026-03-29T01:00", "2026-03-29T02:00"),
    ),
    "berlin-spring-beside": (
        "Europe/Berlin",
        date(2026, 3, 29),
        "03:00",
        "04:00",
        ("2026-03-29T01:00", "2026-03-29T02:00"),
    ),
    "berlin-autumn-inside": (
        "Europe/Berlin",
        date(2026, 10, 25),
        "02:10",
        "02:40",
        ("2026-10-25T00:10", "2026-10-25T00:40"),
    ),
    "berlin-autumn-across": (
        "Europe/Berlin",
        date(2026, 10, 25),
        "01:30",
        "03:30",
        ("2026-10-24T23:30", "2026-10-25T02:30"),
    ),
    "berlin-autumn-beside": (
        "Europe/Berlin",
        date(2026, 10, 25),
        "03:00",
        "03:05",
        ("2026-10-25T02:00", "2026-10-25T02:05"),
    ),
    "new-york-spring-inside": ("America/New_York", date(2026, 3, 8), "02:00", "03:00", None),
    "new-york-spring-across": (
        "America/New_York",
        date(2026, 3, 8),
        "01:30",
        "02:30",
        ("2026-03-08T06:30", "2026-03-08T07:00"),
    ),
    "new-york-spring-beside": (
        "America/New_York",
        date(2026, 3, 8),
        "01:00",
        "02:00",
        ("2026-03-08T06:00", "2026-03-08T07:00"),
    ),
    "new-york-autumn-inside": (
        "America/New_York",
        date(2026, 11, 1),
        "01:10",
        "01:50",
        ("2026-11-01T05:10", "2026-11-01T05:50"),
    ),
    "new-york-autumn-across": (
        "America/New_York",
        date(2026, 11, 1),
        "00:30",
        "02:30",
        ("2026-11-01T04:30", "2026-11-01T07:30"),
    ),
    "new-york-autumn-beside": (
        "America/New_York",
        date(2026, 11, 1),
        "02:00",
        "02:30",
        ("2026-11-01T07:00", "2026-11-01T07:30"),
    ),
}
IDS = sorted(CASES)


def _evening_before(zone: str, night: date) -> datetime:
    """22:00 local on the evening before the DST night, as a UTC instant."""
    local = datetime.combine(night - timedelta(days=1), datetime.min.time(), ZoneInfo(zone))
    return (local + timedelta(hours=22)).astimezone(UTC)


@pytest.mark.parametrize("case", IDS)
def test_the_dst_night_is_computed_in_real_time(case: str) -> None:
    """That night's window in UTC is the expected one, or skipped when under 5 real minutes."""
    zone, night, start, end, expected = CASES[case]
    window = WindowSection(start=start, end=end, timezone=zone)
    occurrence = window.occurrence(night)
    if expected is None:
        assert not occurrence.usable and occurrence.minutes < 5
        begin, _ = window.next_window(_evening_before(zone, night))
        assert begin == window.occurrence(night + timedelta(days=1)).start  # the next night
    else:
        assert (occurrence.start, occurrence.end) == (_utc(expected[0]), _utc(expected[1]))
        assert window.next_window(_evening_before(zone, night)) == (
            occurrence.start,
            occurrence.end,
        )


@pytest.mark.parametrize("case", IDS)
def test_every_window_is_five_real_minutes_and_starts_after_now(case: str) -> None:
    """At any moment over the three days around the change, the window is valid."""
    zone, night, start, end, _ = CASES[case]
    window = WindowSection(start=start, end=end, timezone=zone)
    now = _evening_before(zone, night) - timedelta(days=1)
    lead = timedelta(minutes=1)
    while now < _evening_before(zone, night) + timedelta(days=2):
        begin, close = window.next_window(now, lead)
        assert begin >= now + lead and close - begin >= MIN, (now, begin, close)
        now += timedelta(minutes=7)


def test_rollout_plan_shows_the_next_windows_in_utc_with_the_skipped_night(
    tmp_path: Path,
) -> None:
    """`rollout plan --json` lists each wave window's next nights in UTC, DST skips marked."""
    (tmp_path / "fleet.txt").write_text("6f1c1a52-8f4e-4c41-9a55-3a8a8f1b2c3d\n")
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'name = "w"\n[platform]\nurl = "simulator"\n'
        '[firmware]\nfile_id = "0123456789abcdef01234567"\n'
        '[fleet]\ndevices_file = "fleet.txt"\n'
        '[[waves]]\nname = "night"\n'
        'window = { start = "02:00", end = "03:00", timezone = "America/New_York" }\n'
    )
    result = CliRunner().invoke(main, ["plan", "--json", str(plan)])
    assert result.exit_code == 0, result.stderr
    nights = json.loads(result.stdout)["windows"]["night"]
    assert sum(not n["skipped"] for n in nights) == 3
    for night in nights:
        start, end = _utc(night["start"][:-1]), _utc(night["end"][:-1])
        assert night["skipped"] == (end - start < MIN)
        assert end > datetime.now(UTC)
    table = CliRunner().invoke(main, ["plan", str(plan)])
    assert "window of night (UTC)" in table.stdout  # the preview is a result: stdout (issue 10)


# ---- sent to the platform --------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    server = SimulatorServer(SimulatorConfig(tls=False, devices=4000, seed=4, rate_limit=(50, 1)))
    await server.start()
    yield server
    await server.close()


@pytest.mark.parametrize("case", IDS)
async def test_windows_sent_on_a_dst_night_are_accepted(
    sim: SimulatorServer, tmp_path: Path, case: str
) -> None:
    """Run on the evening before the change (platform clock): each window sent is ≥ 5 real
    minutes, starts after the create, and the platform accepts every create."""
    zone, night, start, end, expected = CASES[case]
    now = _evening_before(zone, night)
    sim.platform.faults.update({"clock_offset_s": now.timestamp() - sim.clock.now()})
    devices = devices_of(sim, "WM-200", 60)
    waves = (
        f'[[waves]]\nname = "night"\n'
        f'window = {{ start = "{start}", end = "{end}", timezone = "{zone}" }}'
    )
    plan = write_plan(tmp_path, sim, devices, waves=waves, execution="concurrency = 1")
    await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    replies = dict(sim.platform.stats.replies)
    assert set(replies) == {"200"}, replies
    tasks = sim.platform.tasks
    assert len(tasks) == 1
    sent_start = parse_platform_time(tasks[0].policy["startTime"])
    sent_end = parse_platform_time(tasks[0].policy["endTime"])
    assert sent_end - sent_start >= MIN.total_seconds()
    assert sent_start > tasks[0].create_time
    if expected is not None:
        assert (sent_start, sent_end) == (
            _utc(expected[0]).timestamp(),
            _utc(expected[1]).timestamp(),
        )
    else:  # the night after
        occurrence = WindowSection(start=start, end=end, timezone=zone).occurrence(
            night + timedelta(days=1)
        )
        assert sent_start == occurrence.start.timestamp()
