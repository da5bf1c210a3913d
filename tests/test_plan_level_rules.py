"""A plan that passes the offline checks draws no plan-level 4xx from the platform."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.engine import RunOptions, execute
from orchestrator.errors import RunAborted
from orchestrator.loaded_plan import load_plan
from orchestrator.simulator import SimulatorConfig, SimulatorServer

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, write_plan
from .simhelpers import devices_of, newest_package


def _local(delta: timedelta, zone_offset_hours: int = 1) -> str:
    moment = datetime.now(UTC) + delta + timedelta(hours=zone_offset_hours)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _custom(lead_seconds: int, length_seconds: int) -> str:
    """A custom window starting `lead_seconds` from now, in local time one hour east."""
    start = timedelta(seconds=lead_seconds)
    end = start + timedelta(seconds=length_seconds)
    return (
        f'execute_type = "custom"\ntimezone = "Etc/GMT-1"\n'
        f"start = {_local(start)}\nend = {_local(end)}"
    )


POLICIES: dict[str, Callable[[], str]] = {
    "now": lambda: 'execute_type = "now"',
    "device-online-retry-5": lambda: 'execute_type = "device_online"\nretry = 5',
    "custom-exactly-5-min": lambda: _custom(30, 300),
    # starts 3 s after the plan is checked; later chunks leave after that moment
    "custom-starting-during-the-run": lambda: _custom(3, 900),
}


@pytest.mark.parametrize("policy", sorted(POLICIES), ids=sorted(POLICIES))
async def test_valid_policies_draw_no_4xx(tmp_path: Path, policy: str) -> None:
    """Every create of a checked plan is accepted: no 4xx reply at the simulator."""
    text = POLICIES[policy]()
    config = SimulatorConfig(tls=False, devices=8000, seed=8, rate_limit=(3, 1.0))
    async with SimulatorServer(config) as sim:
        plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 1800), policy=text)
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        replies = dict(sim.platform.stats.replies)
    assert set(replies) == {"200"}, replies
    assert sim.platform.stats.tasks_created == 8


async def test_window_that_closes_during_the_run_stops_it_cleanly(tmp_path: Path) -> None:
    """A 5-minute window whose start passes mid-run stops the run instead of drawing 123033."""
    text = _custom(3, 300)
    config = SimulatorConfig(tls=False, devices=8000, seed=8, rate_limit=(3, 1.0))
    async with SimulatorServer(config) as sim:
        plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 1800), policy=text)
        with pytest.raises(RunAborted, match="less than 5 minutes left"):
            await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        replies = dict(sim.platform.stats.replies)
    assert set(replies) == {"200"}, replies
    assert sim.platform.stats.tasks_created < 8


async def test_group_plan_draws_no_4xx(tmp_path: Path) -> None:
    """A group-targeted plan (names plus type/model/manufacturer) is accepted as a whole."""
    config = SimulatorConfig(tls=False, devices=2000, seed=8, rate_limit=(1000, 1.0))
    async with SimulatorServer(config) as sim:
        package = newest_package(sim, "GM-10")
        plan = tmp_path / "plan.toml"
        plan.write_text(f"""
name = "groups"
[platform]
url = "{sim.url}"
secret_env = "{SECRET_ENV}"
[firmware]
file_id = "{package.file_id}"
[fleet]
groups = ["north", "south", "east"]
device_type = "{package.device_type}"
model = "{package.model}"
manufacturer = "{package.manufacturer}"
[monitor]
follow = false
""")
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        replies = dict(sim.platform.stats.replies)
        truth = sim.platform.truth()
    assert set(replies) == {"200"}, replies
    assert [t["deviceGroups"] for t in truth] == [["north", "south", "east"]]
    assert truth[0]["devices"]
