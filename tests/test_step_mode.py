"""Step mode (`--step`): a rollout driven by repeated short calls, as a scheduler would."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.engine import RunOptions, execute
from orchestrator.errors import RunHalted, RunWaiting
from orchestrator.journal import approve_wave
from orchestrator.loaded_plan import load_plan
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.status import read_status

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, device_sets, write_plan
from .simhelpers import devices_of

POLL = 0.1
MONITOR = f"follow = true\npoll_interval = {POLL}\nmax_poll_interval = 0.3"
# the demo's waves: a canary of 256, a quarter, the rest
DEMO_WAVES = """
[[waves]]
name = "canary"
count = 256
[waves.gate]
min_finished = 0.9
max_failed = 0.15
min_sample = 100
{canary_extra}
[[waves]]
name = "quarter"
share = 0.25
[waves.gate]
min_finished = 0.8
max_failed = 0.15
min_sample = 200
[[waves]]
name = "rest"
"""


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _sim() -> SimulatorServer:
    """The demo's fleet (24 000 devices, ~6 100 WM-200 meters) in fast simulated time."""
    return SimulatorServer(
        SimulatorConfig(
            tls=False, devices=24000, seed=1, rate_limit=(2000, 1.0), speed=36000, failure_rate=0.03
        )
    )


async def _steps(plan: Path, journal: Path, limit: int = 40) -> list[str]:
    """Call `run --step` until it returns, sleeping the plan's poll interval between calls
    (the scheduler's period). Returns what each waiting step waited for."""
    waited: list[str] = []
    for _ in range(limit):
        try:
            await execute(load_plan(plan), RunOptions(journal=journal, step=True))
            return waited
        except RunWaiting as exc:
            waited.append(exc.waiting_for)
            await asyncio.sleep(POLL)
    raise AssertionError(f"not finished after {limit} steps: {waited}")


def _final_state(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": status["status"],
        "targets_in_tasks": status["targets_in_tasks"],
        "finished": status["devices_succeeded"] + status["devices_failed"],
        "tasks": (status["tasks_final"], status["tasks_observed"]),
        "gates": [(w["name"], w["in_tasks"], w["gate"]) for w in status["waves"]],
        "creates": status["calls"]["createTask"],
    }


async def test_steps_finish_the_demo_like_a_continuous_run(tmp_path: Path) -> None:
    """The demo plan driven by repeated steps ends as a continuous run does, within 10 % of
    its calls."""
    outcomes: dict[str, dict[str, Any]] = {}
    calls: dict[str, int] = {}
    for mode in ("continuous", "steps"):
        async with _sim() as sim:
            devices = devices_of(sim, "WM-200", 6000)
            plan = write_plan(
                tmp_path / mode,
                sim,
                devices,
                monitor=MONITOR,
                waves=DEMO_WAVES.format(canary_extra=""),
            )
            journal = tmp_path / mode / "j.sqlite"
            if mode == "continuous":
                await execute(load_plan(plan), RunOptions(journal=journal))
            else:
                waited = await _steps(plan, journal)
                assert len(waited) >= 3 and set(waited) == {"tasks"}
            counts = device_sets(sim.platform.truth())
            assert set(counts) == set(devices) and set(counts.values()) == {1}
            status = read_status(journal, "test-plan")
            outcomes[mode] = _final_state(status)
            calls[mode] = sum(status["calls"].values())
    assert outcomes["steps"] == outcomes["continuous"]
    assert outcomes["steps"]["status"] == "completed"
    assert abs(calls["steps"] - calls["continuous"]) <= 0.10 * calls["continuous"], calls


async def test_each_waiting_state_has_its_reason_and_approval_costs_no_call(
    tmp_path: Path,
) -> None:
    """A step waits for tasks, then for the soak, then for approval (no call while the
    approval is missing; the line says the next step goes on once approved); after `approve`
    the steps finish the run."""
    async with _sim() as sim:
        devices = devices_of(sim, "WM-200", 1200)
        plan = write_plan(
            tmp_path,
            sim,
            devices,
            monitor=MONITOR,
            waves=DEMO_WAVES.format(canary_extra="soak = 0.6\napproval = true"),
        )
        journal = tmp_path / "j.sqlite"
        seen: list[RunWaiting] = []
        for _ in range(30):
            try:
                await execute(load_plan(plan), RunOptions(journal=journal, step=True))
            except RunWaiting as exc:
                seen.append(exc)
                if exc.waiting_for == "approval":
                    break
                await asyncio.sleep(POLL)
        kinds = [exc.waiting_for for exc in seen]
        assert kinds[0] == "tasks" and "soak" in kinds and kinds[-1] == "approval", kinds
        soak = next(exc for exc in seen if exc.waiting_for == "soak")
        assert soak.until is not None and "soaks until" in str(soak)
        assert read_status(journal, "test-plan")["status"] == "waiting"
        calls_before = sim.platform.stats.calls.copy()
        with pytest.raises(RunWaiting, match="approve PLAN --wave canary; the next step goes on"):
            await execute(load_plan(plan), RunOptions(journal=journal, step=True))
        assert sim.platform.stats.calls == calls_before  # not even a login
        approve_wave(journal, "test-plan", "canary", "tester")
        assert await _steps(plan, journal) != []
        assert read_status(journal, "test-plan")["status"] == "completed"
        counts = device_sets(sim.platform.truth())
        assert set(counts) == set(devices) and set(counts.values()) == {1}


async def test_a_failed_gate_in_step_mode_halts(tmp_path: Path) -> None:
    """A gate that fails is a halt (exit 4) in step mode too, not a wait."""
    sim = SimulatorServer(
        SimulatorConfig(
            tls=False, devices=6000, seed=9, rate_limit=(2000, 1.0), speed=36000, failure_rate=0.6
        )
    )
    async with sim:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", 800),
            monitor=MONITOR,
            waves=DEMO_WAVES.format(canary_extra=""),
        )
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted, match="canary"):
            await _steps(plan, journal)
        assert read_status(journal, "test-plan")["waves"][0]["gate"] == "failed"
        assert sim.platform.stats.tasks_created == 1


async def test_a_completed_run_is_said_so_without_any_call(tmp_path: Path) -> None:
    """`run` on a completed run makes no call at all, not even a login."""
    async with _sim() as sim:
        plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 300), monitor=MONITOR)
        journal = tmp_path / "j.sqlite"
        first = await execute(load_plan(plan), RunOptions(journal=journal))
        assert not first.already_completed
        calls_before = sim.platform.stats.calls.copy()
        again = await execute(load_plan(plan), RunOptions(journal=journal))
        resumed = await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        assert again.already_completed and resumed.already_completed
        assert sim.platform.stats.calls == calls_before


async def test_a_step_never_sleeps_for_creates_in_flight_to_land(tmp_path: Path) -> None:
    """A step whose creates have not surely landed (request_timeout + settle) exits waiting,
    with the time they will have, instead of sleeping; a later step takes the census."""
    async with SimulatorServer(
        SimulatorConfig(tls=False, devices=600, seed=7, rate_limit=(1000, 1.0))
    ) as sim:
        plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 50), monitor=MONITOR, settle=30)
        journal = tmp_path / "j.sqlite"
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)

        with pytest.raises(RunWaiting, match="creates in flight land by") as waiting:
            await execute(load_plan(plan), RunOptions(journal=journal, step=True), sleep=sleep)
        assert slept == []
        assert waiting.value.until is not None and waiting.value.until > time.time() + 20
        assert sim.platform.stats.tasks_created == 1
        with pytest.raises(RunWaiting, match="creates in flight"):
            await execute(load_plan(plan), RunOptions(journal=journal, step=True), sleep=sleep)
        assert slept == [] and sim.platform.stats.tasks_created == 1
