"""A platform that loses a task it acknowledged, or gives one operationId to two creates: the
run never ends with 0 while targets are in no task, and sends each lost chunk again once.

Judged by the simulator's ground truth (`Platform.truth()`), not by the journal alone.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from orchestrator.engine import RunOptions, execute
from orchestrator.errors import RunAborted, RunWaiting
from orchestrator.loaded_plan import load_plan
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.simulator.testing import free_port

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, device_sets, write_plan
from .simhelpers import devices_of

MONITOR = "follow = true\npoll_interval = 0.1\nmax_poll_interval = 0.2"


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _config(**kwargs: object) -> SimulatorConfig:
    return SimulatorConfig(
        tls=False, devices=3000, seed=5, rate_limit=(1000, 1.0), speed=36000.0, **kwargs
    )


@pytest.fixture
async def sim() -> SimulatorServer:
    server = SimulatorServer(_config())
    await server.start()
    yield server  # type: ignore[misc]
    await server.close()


def _each_once(server: SimulatorServer, devices: list[str]) -> None:
    counts = device_sets(server.platform.truth())
    assert set(counts) == set(devices), "some devices are in no task"
    assert set(counts.values()) == {1}, "some devices are in two tasks"


def _query(journal: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(journal) as db:
        return db.execute(sql).fetchall()


async def test_a_task_the_platform_lost_is_sent_again_once(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A create answered, then lost by the platform: the closing census finds its targets in
    no task, the chunk is sent again once, every device ends in exactly one task."""
    devices = devices_of(sim, "WM-200", 600)
    journal = tmp_path / "j.sqlite"
    sim.platform.faults.update({"forget_next_tasks": 1})
    await execute(load_plan(write_plan(tmp_path, sim, devices)), RunOptions(journal=journal))
    _each_once(sim, devices)
    lost = _query(journal, "SELECT detail FROM events WHERE kind='task-lost'")
    assert [json.loads(str(row[0]))["chunk"] for row in lost] == ["w00-000000"]


async def test_an_operation_id_given_to_two_creates_is_settled_by_what_its_task_holds(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """The platform loses chunk A's task and gives its operationId to chunk B's create: A is
    sent again, B keeps the task (its results are B's alone), the run completes, no anomaly
    left open."""
    devices = devices_of(sim, "WM-200", 600)
    journal = tmp_path / "j.sqlite"
    sim.platform.faults.update({"forget_next_tasks": 1, "reuse_lost_ids": True})
    plan = write_plan(tmp_path, sim, devices, monitor=MONITOR)
    result = await execute(load_plan(plan), RunOptions(journal=journal))
    _each_once(sim, devices)
    claimed = {str(op) for (op,) in _query(journal, "SELECT operation_id FROM chunks")}
    assert len(claimed) == len(sim.platform.tasks)  # no operationId held by two chunks
    tasks = dict(_query(journal, "SELECT operation_id, chunk_id FROM tasks"))
    chunks = dict(
        _query(journal, "SELECT operation_id, chunk_id FROM chunks WHERE state='submitted'")
    )
    assert tasks == chunks
    assert _query(journal, "SELECT COUNT(*) FROM chunks WHERE adopted=3") == [(0,)]
    upgraded = _query(journal, "SELECT COALESCE(SUM(succeeded), 0) FROM tasks")[0][0]
    assert upgraded == sum(
        t["staResult"]["success"]
        for t in map(lambda task: sim.platform.query_task(task.operation_id), sim.platform.tasks)
    )
    assert result.counts.get("targets_submitted") == len(devices)


async def test_a_task_lost_between_steps_is_sent_again_not_a_404_loop(tmp_path: Path) -> None:
    """A platform restarted without a task it had answered (123009 on query): the next step
    sends that chunk again instead of failing on the 404 at every call."""
    port = free_port()
    state = tmp_path / "sim.json"
    devices: list[str] = []
    journal = tmp_path / "j.sqlite"
    async with SimulatorServer(_config(port=port, state_file=state)) as first:
        devices = devices_of(first, "WM-200", 600)
        plan = write_plan(tmp_path, first, devices, monitor=MONITOR)
        with pytest.raises(RunWaiting):
            await execute(load_plan(plan), RunOptions(journal=journal, step=True))
    saved = json.loads(state.read_text())
    lost = saved["platform"]["tasks"].pop(0)  # the platform came back without it
    state.write_text(json.dumps(saved))
    async with SimulatorServer(_config(port=port, state_file=state)) as second:
        for _ in range(20):
            try:
                await execute(load_plan(plan), RunOptions(journal=journal, step=True))
                break
            except RunWaiting as waiting:  # as a scheduler would: call again a little later
                await asyncio.sleep(min(3.0, max(0.0, (waiting.until or 0) - time.time())))
        else:
            raise AssertionError("the steps did not finish")
        _each_once(second, devices)
        assert lost["operation_id"] not in second.platform.tasks_by_id


async def test_a_chunk_lost_twice_stops_the_run_with_one_line(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A platform that loses the same chunk's task again: no third send, exit 1 naming it."""
    devices = devices_of(sim, "WM-200", 100)
    sim.platform.faults.update({"forget_next_tasks": 2})
    with pytest.raises(RunAborted, match="lost the task of chunk w00-000000 again"):
        await execute(
            load_plan(write_plan(tmp_path, sim, devices)), RunOptions(journal=tmp_path / "j")
        )
    assert sim.platform.faults.injected == {"forget": 2}


async def test_a_resume_sends_again_what_the_platform_lost_while_the_run_was_stopped(
    tmp_path: Path,
) -> None:
    """The platform comes back without a task of a stopped run: `resume`'s opening census
    and a query by key prove it absent and that chunk alone is sent again."""
    port = free_port()
    state = tmp_path / "sim.json"
    journal = tmp_path / "j.sqlite"
    async with SimulatorServer(_config(port=port, state_file=state)) as first:
        devices = devices_of(first, "WM-200", 600)
        plan = write_plan(tmp_path, first, devices, monitor="follow = false")
        await execute(load_plan(plan), RunOptions(journal=journal))
    saved = json.loads(state.read_text())
    lost = saved["platform"]["tasks"].pop(1)  # the platform came back without it
    state.write_text(json.dumps(saved))
    async with SimulatorServer(_config(port=port, state_file=state)) as second:
        await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        _each_once(second, devices)
        assert len(second.platform.tasks) == 3
        assert sorted(lost["device_ids"]) == sorted(second.platform.tasks[-1].device_ids)
