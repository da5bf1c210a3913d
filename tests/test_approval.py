"""An approval holds for the gate state it was given for: a later, worse verdict halts again."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.counts import Approval
from orchestrator.engine import RunOptions, execute
from orchestrator.errors import InputError, RunHalted
from orchestrator.journal import approve_wave
from orchestrator.journal_schema import ADDED_COLUMNS
from orchestrator.loaded_plan import load_plan
from orchestrator.report import collect
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.status import read_status

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, write_plan
from .simhelpers import devices_of

MANUAL_GATE = """
[[waves]]
name = "canary"
count = 256
[waves.gate]
min_finished = 0.2
max_failed = 0.1
min_sample = 30
approval = true
[[waves]]
name = "rest"
"""


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.mark.parametrize(
    ("approved", "passing", "finished", "failed", "covered"),
    [
        (Approval("w", "awaiting-approval", "", 100, 2, "op"), True, 200, 4, True),
        (Approval("w", "awaiting-approval", "", 100, 2, "op"), False, 200, 60, False),
        (Approval("w", "failed", "", 50, 30, "op"), False, 256, 160, True),  # 62.5 %: chance
        (Approval("w", "failed", "", 50, 30, "op"), False, 256, 200, False),  # 78 %: worse
        (Approval("w", "failed", "", 250, 150, "op"), False, 256, 175, False),  # 68 % > 66.2 %
        (Approval("w", "failed", "", 250, 150, "op"), False, 256, 140, True),  # better
    ],
)
def test_approval_covers_only_its_verdict_or_better(
    approved: Approval, passing: bool, finished: int, failed: int, covered: bool
) -> None:
    """A passed gate's approval never covers a failure; a failed gate's approval covers a
    failure share up to the approved one plus two standard errors of its sample."""
    assert approved.covers(passing, finished, failed) is covered


async def test_approved_gate_halts_again_on_a_worse_verdict(tmp_path: Path) -> None:
    """A manual gate approved while it passed halts again when, by the resume, the canary
    fails its max_failed (meters that never came online time out after the platform's 4 h);
    approving that verdict lets the run go on. `rollout approve` refuses a wave that is
    unknown or does not wait (exit 2, naming the waves) and says what it approved."""
    speed = 2000  # the canary's upgrades end within ~1.1 s, its silent meters' at ~7.2 s
    config = SimulatorConfig(tls=False, devices=24000, seed=9, speed=speed, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        meters = [
            d
            for d in sim.fleet.devices.values()
            if d.model.model == "WM-200" and d.version != "2.1.0"  # none already current
        ]
        silent = [d.device_id for d in meters if d.never_online][:36]
        online = [d.device_id for d in meters if not d.never_online][:364]
        devices = [d for pair in zip(online, silent, strict=False) for d in pair]
        devices += online[len(silent) :]  # the canary: 36 silent meters among its 256
        monitor = "follow = true\npoll_interval = 0.1\nmax_poll_interval = 0.2"
        plan = write_plan(tmp_path, sim, devices, monitor=monitor, waves=MANUAL_GATE)
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted, match="waits for approval"):
            await execute(load_plan(plan), RunOptions(journal=journal))
        assert read_status(journal, "test-plan")["waves"][0]["gate"] == "awaiting-approval"

        runner = CliRunner()
        unknown = runner.invoke(
            main, ["approve", str(plan), "--journal", str(journal), "--wave", "nope"]
        )
        assert unknown.exit_code == 2
        assert "no wave 'nope' (canary, rest)" in unknown.output
        not_waiting = runner.invoke(
            main, ["approve", str(plan), "--journal", str(journal), "--wave", "rest"]
        )
        assert not_waiting.exit_code == 2
        assert "wave 'rest' does not wait" in not_waiting.output
        assert "canary (awaiting-approval)" in not_waiting.output
        approved = runner.invoke(
            main, ["approve", str(plan), "--journal", str(journal), "--by", "alice"]
        )
        assert approved.exit_code == 0, approved.output
        assert "approved wave 'canary' by alice: its gate, passed and awaiting approval" in (
            approved.stdout
        )

        canary = sim.platform.tasks[0]  # looked at by the gate: its devices' fates are known
        # by the resume, every device of the canary finished (its silent meters timed out)
        await asyncio.sleep(max(0.0, canary.final_time - sim.platform.now()) / speed + 0.2)
        assert canary.status_at(sim.platform.now()) in ("success", "failed")
        with pytest.raises(RunHalted, match="failed its gate"):
            await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        assert sim.platform.stats.tasks_created == 1  # nothing of the next wave
        wave = read_status(journal, "test-plan")["waves"][0]
        assert wave["gate"] == "failed" and wave["failed"] > 0.1 * 256

        again = approve_wave(journal, "test-plan", "canary", "bob")
        assert (again.state, again.failed, again.finished) == ("failed", wave["failed"], 256)
        await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        assert sim.platform.stats.tasks_created == 2
    assert read_status(journal, "test-plan")["waves"][0]["gate"] == "passed"


async def test_approving_a_failed_gate_states_the_rule_it_will_apply(tmp_path: Path) -> None:
    """`rollout approve` of a failed gate says the failure share past which it halts again —
    the approved share plus two standard errors of its sample — not 'worse than N of M'."""
    config = SimulatorConfig(
        tls=False, devices=3000, seed=9, speed=36000, rate_limit=(5000, 1.0), failure_rate=0.5
    )
    gate = MANUAL_GATE.replace("approval = true\n", "")
    async with SimulatorServer(config) as sim:
        monitor = "follow = true\npoll_interval = 0.05\nmax_poll_interval = 0.1"
        devices = devices_of(sim, "WM-200", 400)
        plan = write_plan(tmp_path, sim, devices, monitor=monitor, waves=gate)
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted, match="failed its gate"):
            await execute(load_plan(plan), RunOptions(journal=journal))
    approved = CliRunner().invoke(
        main, ["approve", str(plan), "--journal", str(journal), "--by", "alice"]
    )
    assert approved.exit_code == 0, approved.output
    given = approve_wave(journal, "test-plan", "canary", "alice")  # the same verdict again
    share = given.failed / given.finished
    limit = share + 2 * (share * (1 - share) / given.finished) ** 0.5
    said = approved.stdout
    assert f"more than {limit:.1%} of the finished devices failed" in said, said
    assert f"the approved {given.failed} of {given.finished}, {share:.1%}" in said, said
    assert "two standard errors" in said and "worse than" not in said
    assert given.covers(False, 1000, int(limit * 1000) - 1)
    assert not given.covers(False, 1000, int(limit * 1000) + 1)


async def test_approve_without_a_waiting_wave_is_bad_input(tmp_path: Path) -> None:
    """Approving when no gate waits for a decision is refused with the waves' states."""
    config = SimulatorConfig(tls=False, devices=2000, seed=9, speed=36000, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 300))
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
    with pytest.raises(InputError, match=r"no wave waits for a decision .* all \(none\)"):
        approve_wave(journal, "test-plan", None, "alice")


def _downgrade_to_schema_2(journal: Path) -> None:
    """Make a journal look as the previous rollout left it: no outcome, verification,
    approval-scope or pass columns and tables."""
    with sqlite3.connect(journal) as db:
        for table, column, _ in ADDED_COLUMNS[2:]:
            db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("DROP INDEX device_results_task")
        db.execute("DROP TABLE passes")
        db.execute("DROP TABLE already_current")
        db.execute("UPDATE meta SET value='2' WHERE key='schema'")


async def test_a_journal_of_the_previous_schema_is_read_approved_and_resumed(
    tmp_path: Path,
) -> None:
    """A journal halted at a gate by the previous rollout (schema 2): status and reports read
    it as it is, `approve` migrates it, and `resume` finishes the run."""
    config = SimulatorConfig(tls=False, devices=4000, seed=9, speed=36000, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", 400),
            monitor="follow = true\npoll_interval = 0.05\nmax_poll_interval = 0.1",
            waves=MANUAL_GATE,
        )
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted, match="waits for approval"):
            await execute(load_plan(plan), RunOptions(journal=journal))
        _downgrade_to_schema_2(journal)
        status = read_status(journal, "test-plan")
        assert status["waves"][0]["gate"] == "awaiting-approval"
        assert status["passes"] == [] and status["devices_version_verified"] == 0
        assert len(list(collect(journal, "test-plan").devices())) == 400
        assert approve_wave(journal, "test-plan", None, "alice").wave == "canary"
        await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        assert sim.platform.stats.tasks_created == 2
    with sqlite3.connect(journal) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "3"
    assert read_status(journal, "test-plan")["targets_in_tasks"] == 400


async def test_a_gate_with_no_device_to_judge_fails_instead_of_passing(tmp_path: Path) -> None:
    """A canary whose targets all end quarantined (unknown IDs) leaves its gate nothing to
    judge: it fails (exit 4, nothing of the next wave sent) instead of passing on 0 of 0."""
    config = SimulatorConfig(tls=False, devices=2000, seed=9, speed=36000, rate_limit=(5000, 1.0))
    waves = (
        '[[waves]]\nname = "canary"\ncount = 4\n[waves.gate]\nmin_finished = 0.5\n'
        '[[waves]]\nname = "rest"\n'
    )
    async with SimulatorServer(config) as sim:
        unknown = [f"00000000-0000-4000-8000-00000000000{n}" for n in range(4)]
        monitor = "follow = true\npoll_interval = 0.05\nmax_poll_interval = 0.1"
        plan = write_plan(
            tmp_path, sim, unknown + devices_of(sim, "WM-200", 50), monitor=monitor, waves=waves
        )
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted, match="nothing to judge"):
            await execute(load_plan(plan), RunOptions(journal=journal))
        assert sim.platform.stats.tasks_created == 0
    assert read_status(journal, "test-plan")["waves"][0]["gate"] == "failed"


async def test_an_approved_failure_still_waits_for_min_finished_and_soak(tmp_path: Path) -> None:
    """Approving a failed gate overrides its failure share only: the resumed wave still has
    to reach min_finished and soak before the next wave is sent."""
    config = SimulatorConfig(
        tls=False, devices=3000, seed=9, speed=36000, rate_limit=(5000, 1.0), failure_rate=0.5
    )
    gate = MANUAL_GATE.replace("approval = true\n", "soak = 1.5\n")
    async with SimulatorServer(config) as sim:
        monitor = "follow = true\npoll_interval = 0.05\nmax_poll_interval = 0.1"
        plan = write_plan(
            tmp_path, sim, devices_of(sim, "WM-200", 400), monitor=monitor, waves=gate
        )
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted, match="failed its gate"):
            await execute(load_plan(plan), RunOptions(journal=journal))
        approve_wave(journal, "test-plan", "canary", "alice")
        states: list[str] = []

        async def watch() -> None:
            while sim.platform.stats.tasks_created < 2:
                states.append(read_status(journal, "test-plan")["waves"][0]["gate"])
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        resumed = asyncio.get_running_loop().time()
        await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        await watcher
        assert asyncio.get_running_loop().time() - resumed >= 1.5  # it soaked
        assert "soaking" in states
    assert read_status(journal, "test-plan")["waves"][0]["gate"] == "passed"
