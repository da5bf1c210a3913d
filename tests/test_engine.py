"""The engine against the simulator: exactly-once, reconciliation, bisection, journal rules."""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import pytest

from orchestrator.engine import RunOptions, execute
from orchestrator.errors import JournalError, JournalMismatch, RunAborted
from orchestrator.journal import Journal
from orchestrator.loaded_plan import load_plan
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.status import read_status

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, device_sets, write_plan
from .simhelpers import devices_of


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture
async def sim() -> SimulatorServer:
    server = SimulatorServer(
        SimulatorConfig(tls=False, devices=4000, seed=5, rate_limit=(1000, 1.0))
    )
    await server.start()
    yield server  # type: ignore[misc]
    await server.close()


def _truth(server: SimulatorServer) -> list[dict[str, object]]:
    return server.platform.truth()


async def test_20000_devices_each_in_exactly_one_task(tmp_path: Path) -> None:
    """A 20 000-device plan ends with ceil(N/256) tasks and every device in exactly one."""
    config = SimulatorConfig(tls=False, devices=82000, seed=2, rate_limit=(200, 1.0))
    async with SimulatorServer(config) as server:
        devices = devices_of(server, "WM-200", 20000)
        plan = write_plan(tmp_path, server, devices)
        result = await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        truth = _truth(server)
    assert len(truth) == math.ceil(20000 / 256)
    counts = device_sets(truth)
    assert set(counts) == set(devices) and set(counts.values()) == {1}
    assert result.counts["targets_submitted"] == 20000


async def test_ambiguous_creates_are_reconciled_not_duplicated(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """With 30 % ambiguous creates of every kind, no device lands in two tasks or none."""
    sim.platform.faults.update(
        {
            "create_ambiguous_rate": 0.3,
            "ambiguous_delay_s": 3.0,
            "create_refuse_rate": 0.1,
            "seed": 4,
        }
    )
    devices = devices_of(sim, "WM-200", 900)
    plan = write_plan(tmp_path, sim, devices, execution="stop_after_identical_failures = 50")
    await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    counts = device_sets(_truth(sim))
    assert set(counts) == set(devices) and set(counts.values()) == {1}
    assert sum(sim.platform.faults.injected.values()) > 0
    status = read_status(tmp_path / "j.sqlite", "test-plan")
    assert status["status"] == "submitted" and status["targets_in_tasks"] == 900


async def test_resume_reconciles_intent_without_outcome(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A chunk whose intent was journaled and whose task exists is adopted on resume."""
    devices = devices_of(sim, "WM-200", 600)
    plan = write_plan(tmp_path, sim, devices)
    loaded = load_plan(plan)
    journal_file = tmp_path / "j.sqlite"
    await execute(loaded, RunOptions(journal=journal_file))
    # forge a crash: the last chunk is back to "intent, no outcome", its task still exists
    journal = Journal.open(journal_file)
    journal._db.execute(
        "UPDATE chunks SET state='intent', operation_id=NULL WHERE chunk_id='w00-000002'"
    )
    journal._db.execute("UPDATE attempts SET outcome=NULL WHERE chunk_id='w00-000002'")
    journal.close()
    creates_before = sim.platform.stats.calls["createTask"]
    await execute(loaded, RunOptions(journal=journal_file, resume_only=True))
    assert sim.platform.stats.calls["createTask"] == creates_before
    assert set(device_sets(_truth(sim)).values()) == {1}
    assert read_status(journal_file, "test-plan")["targets_in_tasks"] == 600


async def test_bad_devices_are_bisected_and_quarantined(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """Unknown and wrong-model devices are isolated and quarantined; the rest are submitted."""
    good = devices_of(sim, "WM-200", 500)
    wrong_model = devices_of(sim, "GM-10", 1)
    unknown = ["00000000-dead-beef-0000-000000000000"]
    fleet = good[:100] + wrong_model + good[100:300] + unknown + good[300:]
    plan = write_plan(tmp_path, sim, fleet)
    await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    counts = device_sets(_truth(sim))
    assert set(counts) == set(good) and set(counts.values()) == {1}
    status = read_status(tmp_path / "j.sqlite", "test-plan")
    quarantined = {row["target"]: row["error_code"] for row in status["quarantined"]}
    assert quarantined == {wrong_model[0]: "123016", unknown[0]: "123002"}
    assert status["status"] == "submitted"


async def test_identical_failures_stop_the_run(sim: SimulatorServer, tmp_path: Path) -> None:
    """When every create fails the same way, the run stops instead of burning the budget."""
    sim.platform.faults.update({"create_refuse_rate": 1.0})
    plan = write_plan(
        tmp_path, sim, devices_of(sim, "WM-200", 600), execution="stop_after_identical_failures = 4"
    )
    with pytest.raises(RunAborted, match="identical failures"):
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    assert sim.platform.stats.calls["createTask"] <= 4 + 4  # the limit, plus in-flight siblings
    assert read_status(tmp_path / "j.sqlite", "test-plan")["status"] == "aborted"


async def test_changed_fleet_is_refused_unless_new_run(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A fleet file changed under an existing run is refused, naming what changed."""
    devices = devices_of(sim, "WM-200", 300)
    plan = write_plan(tmp_path, sim, devices[:200])
    await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    (tmp_path / "fleet.txt").write_text("\n".join(devices[:250]) + "\n")
    with pytest.raises(JournalMismatch, match="fleet"):
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    result = await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite", new_run=True))
    assert result.run_id == 2


async def test_resume_without_a_run_is_a_journal_error(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """`resume` with no run in the journal refuses instead of starting one."""
    plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 10))
    with pytest.raises(JournalError, match="no run"):
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite", resume_only=True))
    assert sim.platform.stats.tasks_created == 0


def test_second_process_is_refused(tmp_path: Path) -> None:
    """Only one process may drive a journal at a time."""
    first = Journal.open(tmp_path / "j.sqlite")
    try:
        with pytest.raises(JournalError, match="another rollout process"):
            Journal.open(tmp_path / "j.sqlite")
    finally:
        first.close()


async def test_journal_is_private_and_holds_no_secret(sim: SimulatorServer, tmp_path: Path) -> None:
    """The journal file is mode 0600 and contains neither the secret nor a token."""
    plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 300))
    journal_file = tmp_path / "j.sqlite"
    await execute(load_plan(plan), RunOptions(journal=journal_file))
    assert stat.S_IMODE(os.stat(journal_file).st_mode) == 0o600
    token = sim.platform.tokens._current["demo-app"].access_token
    for data in _journal_bytes(tmp_path):
        assert SECRET.encode() not in data and token.encode() not in data


def _journal_bytes(directory: Path) -> list[bytes]:
    return [path.read_bytes() for path in directory.glob("j.sqlite*")]


async def test_plan_rate_limit_and_margin_reach_the_pacer(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """The plan's rate_limit and pacing_margin are what the client paces with."""
    from orchestrator.engine import platform_client

    plan = write_plan(
        tmp_path, sim, devices_of(sim, "WM-200", 10), extra_platform="pacing_margin = 0.25"
    )
    async with platform_client(load_plan(plan)) as client:
        pacer = client.pacer
    assert (pacer.calls, pacer.seconds, pacer.margin) == (1000, 1.0, 0.25)
    assert pacer.hold == pytest.approx(1.25)  # a slot stays taken this long after its reply
