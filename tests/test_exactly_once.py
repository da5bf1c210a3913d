"""Exactly once against the platform itself: the census, the settle rule, the platform's clock.

Each test runs the engine against the real simulator on loopback and judges by the simulator's
ground truth (`Platform.truth()`), never by the journal alone.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orchestrator.census import UnknownTasks
from orchestrator.engine import RunOptions, execute
from orchestrator.errors import (
    CensusUndecided,
    DuplicatesFound,
    InputError,
    JournalMismatch,
    RunAborted,
)
from orchestrator.journal import Journal
from orchestrator.loaded_plan import load_plan
from orchestrator.planner import Chunk
from orchestrator.report import collect, render_to_string
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.status import read_status

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, device_sets, plan_text, write_fleet, write_plan
from .simhelpers import devices_of


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture
async def sim() -> SimulatorServer:
    server = SimulatorServer(
        SimulatorConfig(tls=False, devices=5000, seed=5, rate_limit=(1000, 1.0))
    )
    await server.start()
    yield server  # type: ignore[misc]
    await server.close()


def _each_once(server: SimulatorServer, devices: list[str]) -> None:
    counts = device_sets(server.platform.truth())
    assert set(counts) == set(devices), "some devices are in no task"
    assert set(counts.values()) == {1}, "some devices are in two tasks"


def _events(journal: Path) -> dict[str, int]:
    with sqlite3.connect(journal) as db:
        return dict(db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())


def _lose(journal: Path) -> None:
    for path in journal.parent.glob(journal.name + "*"):
        path.unlink()


def _adopted_by_census(journal: Path) -> int:
    with sqlite3.connect(journal) as db:
        row = db.execute(
            "SELECT COALESCE(SUM(member_count), 0) FROM chunks WHERE state='submitted'"
            " AND adopted=2 AND run_id=(SELECT MAX(run_id) FROM runs)"
        ).fetchone()
    return int(row[0])


# ---- the census ------------------------------------------------------------------------------
async def test_lost_journal_then_run_sends_nothing_twice(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """With the journal lost mid-rollout, `run` adopts what the platform holds, sends the rest."""
    devices = devices_of(sim, "WM-200", 1000)
    journal = tmp_path / "j.sqlite"
    # the rollout got its first three chunks out before the journal was lost
    await execute(load_plan(write_plan(tmp_path, sim, devices[:768])), RunOptions(journal=journal))
    assert sim.platform.stats.tasks_created == 3
    _lose(journal)
    await execute(load_plan(write_plan(tmp_path, sim, devices)), RunOptions(journal=journal))
    _each_once(sim, devices)
    assert sim.platform.stats.tasks_created == 4
    assert _adopted_by_census(journal) == 768


async def test_same_plan_from_a_second_directory_creates_nothing(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A copy of a finished plan in another folder (its own journal) adopts every target."""
    devices = devices_of(sim, "WM-200", 600)
    first = tmp_path / "first"
    first.mkdir()
    await execute(load_plan(write_plan(first, sim, devices)), RunOptions())
    created = sim.platform.stats.tasks_created
    second = tmp_path / "second"
    shutil.copytree(first, second, ignore=shutil.ignore_patterns(".rollout"))
    result = await execute(load_plan(second / "plan.toml"), RunOptions())
    assert sim.platform.stats.tasks_created == created
    _each_once(sim, devices)
    assert result.journal == second / ".rollout" / "test-plan.journal.sqlite"
    assert _adopted_by_census(result.journal) == 600
    rows = list(collect(result.journal, "test-plan").devices())
    assert {row.in_task_by for row in rows} == {"census"} and len(rows) == 600


async def test_default_journal_lives_beside_the_plan_whatever_the_cwd(
    sim: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default journal is `<plan dir>/.rollout/<name>.journal.sqlite`, not in the cwd."""
    plan = write_plan(tmp_path / "plans", sim, devices_of(sim, "WM-200", 10))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = await execute(load_plan(plan), RunOptions())
    assert result.journal == tmp_path / "plans" / ".rollout" / "test-plan.journal.sqlite"
    assert not (elsewhere / ".rollout").exists()


async def test_new_run_after_a_completed_run_adopts_every_target(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """`--new-run` after a completed run sends nothing: the platform already holds every target."""
    devices = devices_of(sim, "WM-200", 700)
    plan = write_plan(tmp_path, sim, devices)
    journal = tmp_path / "j.sqlite"
    await execute(load_plan(plan), RunOptions(journal=journal))
    created = sim.platform.stats.tasks_created
    result = await execute(load_plan(plan), RunOptions(journal=journal, new_run=True))
    assert result.run_id == 2 and sim.platform.stats.tasks_created == created
    _each_once(sim, devices)
    assert read_status(journal, "test-plan")["targets_remaining"] == 0


async def test_overlapping_plan_sends_only_the_targets_in_no_task(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A second plan whose fleet overlaps a first one sends only the devices in no task yet."""
    devices = devices_of(sim, "WM-200", 800)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    await execute(load_plan(write_plan(first, sim, devices[100:400])), RunOptions())
    await execute(load_plan(write_plan(second, sim, devices)), RunOptions())
    _each_once(sim, devices)
    with sqlite3.connect(second / ".rollout" / "test-plan.journal.sqlite") as db:
        parts = db.execute("SELECT COUNT(*) FROM chunks WHERE chunk_id LIKE '%.c%'").fetchone()
    assert parts[0] >= 2  # chunks that the first plan's tasks covered in part were split


async def test_ignore_census_sends_again_and_the_closing_census_reports_duplicates(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """`--ignore-census` sends held targets again; the closing census records them, exit 5."""
    devices = devices_of(sim, "WM-200", 300)
    plan = write_plan(tmp_path, sim, devices)
    journal = tmp_path / "j.sqlite"
    await execute(load_plan(plan), RunOptions(journal=journal))
    with pytest.raises(DuplicatesFound, match="300 targets"):
        await execute(
            load_plan(plan), RunOptions(journal=journal, new_run=True, ignore_census=True)
        )
    status = read_status(journal, "test-plan")
    assert status["duplicates"] == 300 and len(status["duplicate_examples"]) > 0
    report = json.loads(render_to_string(collect(journal, "test-plan"), "json"))
    assert len(report["duplicates"]) == 300 and report["summary"]["duplicates"] == 300


async def test_tasks_of_unknown_package_stop_the_run_before_any_create(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """Without extendPara and without a journal, held targets stop the run and name the option."""
    sim.platform.faults.update({"omit_extend_para": True})
    devices = devices_of(sim, "WM-200", 300)
    plan = write_plan(tmp_path, sim, devices)
    await execute(load_plan(plan), RunOptions(journal=tmp_path / "first.sqlite"))
    created = sim.platform.stats.tasks_created
    second = RunOptions(journal=tmp_path / "second.sqlite")
    with pytest.raises(CensusUndecided, match="--unknown-tasks skip"):
        await execute(load_plan(plan), second)
    assert sim.platform.stats.tasks_created == created
    skip = RunOptions(journal=tmp_path / "second.sqlite", unknown_tasks=UnknownTasks.SKIP)
    await execute(load_plan(plan), skip)
    assert sim.platform.stats.tasks_created == created
    _each_once(sim, devices)
    by = read_status(tmp_path / "second.sqlite", "test-plan")["targets_in_tasks_by"]
    assert by == {"census-unconfirmed": 300}  # told apart from a confirmed adoption


async def test_a_succeeded_subtask_tells_the_package_when_extend_para_is_missing(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A task without extendPara whose subtask succeeded with our version is adopted unasked."""
    sim.platform.faults.update({"omit_extend_para": True})
    devices = devices_of(sim, "WM-200", 300)
    plan = write_plan(tmp_path, sim, devices)
    await execute(load_plan(plan), RunOptions(journal=tmp_path / "first.sqlite"))
    sim.clock.advance(2 * 86400)  # type: ignore[attr-defined]  # the meters woke and upgraded
    created = sim.platform.stats.tasks_created
    await execute(load_plan(plan), RunOptions(journal=tmp_path / "second.sqlite"))
    assert sim.platform.stats.tasks_created == created
    assert sim.platform.stats.calls["subOperations"] >= 1  # the probe
    _each_once(sim, devices)


# ---- no dead chunks, honest exits, pinned inputs ---------------------------------------------
@pytest.mark.parametrize("status", [400, 413])
async def test_plan_level_refusal_then_resume_leaves_no_device_behind(
    sim: SimulatorServer, tmp_path: Path, status: int
) -> None:
    """A chunk refused once for a plan-level reason (400, gateway 413) is sent on resume."""
    sim.platform.faults.update({"reject_next_creates": 1, "reject_status": status})
    devices = devices_of(sim, "WM-200", 600)
    plan = write_plan(tmp_path, sim, devices, execution="concurrency = 1")
    journal = tmp_path / "j.sqlite"
    with pytest.raises(RunAborted, match="plan-level"):
        await execute(load_plan(plan), RunOptions(journal=journal))
    assert read_status(journal, "test-plan")["targets_remaining"] > 0
    await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
    _each_once(sim, devices)
    assert read_status(journal, "test-plan")["targets_remaining"] == 0


async def test_editing_non_pinned_fields_is_allowed_on_resume_and_logged(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """Timeouts, rate, monitor settings and a comment may change between run and resume."""
    sim.platform.faults.update({"reject_next_creates": 1})
    devices = devices_of(sim, "WM-200", 600)
    plan = write_plan(tmp_path, sim, devices, execution="concurrency = 1")
    journal = tmp_path / "j.sqlite"
    with pytest.raises(RunAborted):
        await execute(load_plan(plan), RunOptions(journal=journal))
    edited = (
        plan.read_text()
        .replace("request_timeout = 2", "request_timeout = 3\nconnect_timeout = 4")
        .replace("follow = false", "follow = false\npoll_interval = 7")
    )
    plan.write_text("# moved to the night shift\n" + edited)
    await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
    _each_once(sim, devices)
    with sqlite3.connect(journal) as db:
        detail = db.execute("SELECT detail FROM events WHERE kind='plan-edited'").fetchone()[0]
    assert "platform.request_timeout" in detail and "monitor.poll_interval" in detail


async def test_editing_the_firmware_or_the_waves_is_refused_on_resume(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """What defines targets and package is pinned: a changed wave size refuses the resume."""
    sim.platform.faults.update({"reject_next_creates": 1})
    devices = devices_of(sim, "WM-200", 600)
    waves = '[[waves]]\nname = "canary"\ncount = 100\n[[waves]]\nname = "rest"\n'
    plan = write_plan(tmp_path, sim, devices, waves=waves)
    journal = tmp_path / "j.sqlite"
    with pytest.raises(RunAborted):
        await execute(load_plan(plan), RunOptions(journal=journal))
    plan.write_text(plan.read_text().replace("count = 100", "count = 120"))
    with pytest.raises(JournalMismatch, match="waves"):
        await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))


# ---- the settle rule -------------------------------------------------------------------------
async def test_a_create_that_commits_after_the_timeout_is_adopted_not_resent(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A create committed 2 s after arrival (client gives up at 1 s, list lags 1 s) is adopted."""
    sim.platform.faults.update({"late_commit_s": 2.0, "list_lag_s": 1.0})
    devices = devices_of(sim, "WM-200", 512)
    plan = write_plan(tmp_path, sim, devices, settle=1.5, request_timeout=1)
    journal = tmp_path / "j.sqlite"
    await execute(load_plan(plan), RunOptions(journal=journal))
    _each_once(sim, devices)
    assert _events(journal).get("reconciled-adopted", 0) == 2


async def test_resume_waits_for_a_young_intent_before_looking(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A run cancelled with a create in flight: the resume settles it before deciding absent."""
    sim.platform.faults.update({"late_commit_s": 1.5, "list_lag_s": 0.5})
    devices = devices_of(sim, "WM-200", 256)
    plan = write_plan(tmp_path, sim, devices, settle=1.0)
    journal = tmp_path / "j.sqlite"
    await _stop_with_a_create_in_flight(plan, journal)
    await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
    _each_once(sim, devices)


async def _stop_with_a_create_in_flight(plan: Path, journal: Path) -> None:
    """Run the plan and cancel it as soon as its first intent is journaled."""
    run = asyncio.create_task(execute(load_plan(plan), RunOptions(journal=journal)))
    while not _intent_recorded(journal):  # noqa: ASYNC110  (another process's view: poll)
        await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run


def _intent_recorded(journal: Path) -> bool:
    if not journal.exists():
        return False
    try:
        with sqlite3.connect(journal) as db:
            return db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] > 0
    except sqlite3.OperationalError:
        return False


# ---- the platform's clock --------------------------------------------------------------------
@pytest.mark.parametrize("offset", [-600.0, 600.0])
async def test_the_client_measures_the_platforms_clock(
    sim: SimulatorServer, tmp_path: Path, offset: float
) -> None:
    """The offset measured from Date headers is the platform's, within a second and a bit."""
    from orchestrator.engine import platform_client

    sim.platform.faults.update({"clock_offset_s": offset})
    plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 10))
    async with platform_client(load_plan(plan)) as client:
        await client.login()
        await client.list_tasks()
        assert client.clock.offset == pytest.approx(offset, abs=1.5)
        assert client.clock.uncertainty <= 1.0


async def test_a_platform_running_ahead_never_turns_a_resumed_start_into_123033(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """Resumed with the platform 10 min ahead, a custom start in its past is moved, not refused."""
    sim.platform.faults.update({"reject_next_creates": 1})
    devices = devices_of(sim, "WM-200", 600)
    start = datetime.now(UTC) + timedelta(minutes=5)
    policy = (
        f'execute_type = "custom"\nstart = {start:%Y-%m-%dT%H:%M:%SZ}\n'
        f"end = {start + timedelta(hours=2):%Y-%m-%dT%H:%M:%SZ}"
    )
    plan = write_plan(tmp_path, sim, devices, policy=policy, execution="concurrency = 1")
    journal = tmp_path / "j.sqlite"
    with pytest.raises(RunAborted):
        await execute(load_plan(plan), RunOptions(journal=journal))
    sim.platform.faults.update({"clock_offset_s": 600.0})
    await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
    _each_once(sim, devices)
    assert sim.platform.stats.replies.get("123033", 0) == 0


async def test_a_first_run_refuses_a_start_in_the_platforms_past(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A new run's custom start is checked on the platform's clock: bad input, nothing created."""
    sim.platform.faults.update({"clock_offset_s": 600.0})
    start = datetime.now(UTC) + timedelta(minutes=5)
    policy = (
        f'execute_type = "custom"\nstart = {start:%Y-%m-%dT%H:%M:%SZ}\n'
        f"end = {start + timedelta(hours=2):%Y-%m-%dT%H:%M:%SZ}"
    )
    plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 10), policy=policy)
    with pytest.raises(InputError, match="past"):
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    assert sim.platform.stats.tasks_created == 0


# ---- the journal -----------------------------------------------------------------------------
def test_an_operation_id_belongs_to_one_chunk_and_a_second_claim_is_an_anomaly(
    tmp_path: Path,
) -> None:
    """Two chunks claiming one operationId: the second is kept, marked and recorded."""
    journal = Journal.open(tmp_path / "j.sqlite")
    try:
        run_id = journal.create_run(
            plan_name="p",
            plan_path="p.toml",
            plan_sha="x",
            fleet_sha="y",
            fleet_kind="devices",
            target_count=2,
            operation="firmware",
            chunks=[Chunk("w00-000000", "devices", ["a"]), Chunk("w00-000001", "devices", ["b"])],
            waves=[],
        )
        first = journal.record_intent(run_id, "w00-000000")
        journal.record_created(run_id, "w00-000000", first, "0123456789abcdef01234567")
        second = journal.record_intent(run_id, "w00-000001")
        journal.record_created(run_id, "w00-000001", second, "0123456789abcdef01234567")
        adopted = dict(
            journal._db.execute("SELECT chunk_id, adopted FROM chunks ORDER BY chunk_id")
        )
        anomalies = journal._db.execute("SELECT kind FROM anomalies").fetchall()
    finally:
        journal.close()
    assert adopted == {"w00-000000": 0, "w00-000001": 3}
    assert anomalies == [("second-claim",)]


def test_the_fingerprint_pins_targets_and_package_only(tmp_path: Path) -> None:
    """Timeouts, rate and comments leave the fingerprint; firmware and wave sizes change it."""
    server = SimulatorServer(SimulatorConfig(tls=False, devices=50, seed=5))
    write_fleet(tmp_path / "fleet.txt", devices_of(server, "WM-200", 5))
    text = plan_text(server, waves='[[waves]]\nname = "a"\ncount = 2\n[[waves]]\nname = "b"\n')
    path = tmp_path / "plan.toml"
    path.write_text(text)
    base = load_plan(path).fingerprint
    path.write_text("# a comment\n" + text.replace("request_timeout = 2", "request_timeout = 9"))
    assert load_plan(path).fingerprint == base
    path.write_text(text.replace("count = 2", "count = 3"))
    assert load_plan(path).fingerprint != base
    devices = (tmp_path / "fleet.txt").read_text().split()
    path.write_text(text)
    (tmp_path / "fleet.txt").write_text("\r\n".join(devices) + "\r\n")  # CRLF: same targets
    assert load_plan(path).fingerprint == base
    (tmp_path / "fleet.txt").write_text("\n".join(reversed(devices)) + "\n")
    assert load_plan(path).fingerprint != base  # another order: other chunks


def test_a_plan_file_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    """A plan saved by an editor with a UTF-8 byte-order mark is read like any other."""
    server = SimulatorServer(SimulatorConfig(tls=False, devices=50, seed=5))
    write_fleet(tmp_path / "fleet.txt", devices_of(server, "WM-200", 5))
    (tmp_path / "plan.toml").write_bytes(b"\xef\xbb\xbf" + plan_text(server).encode())
    assert load_plan(tmp_path / "plan.toml").plan.name == "test-plan"


async def test_duplicates_seen_by_an_opening_census_are_reported_even_with_nothing_to_send(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """A run that sends nothing still reports targets already in two tasks (exit 5)."""
    devices = devices_of(sim, "WM-200", 256)
    first, second = tmp_path / "a", tmp_path / "b"
    await execute(load_plan(write_plan(first, sim, devices)), RunOptions())
    with pytest.raises(DuplicatesFound):
        await execute(load_plan(first / "plan.toml"), RunOptions(new_run=True, ignore_census=True))
    created = sim.platform.stats.tasks_created
    with pytest.raises(DuplicatesFound, match="256 targets"):
        await execute(load_plan(write_plan(second, sim, devices)), RunOptions())
    assert sim.platform.stats.tasks_created == created


async def test_the_closing_census_waits_until_the_runs_own_tasks_are_listed(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """With a lagging task list, the closing census still sees every task the run created."""
    sim.platform.faults.update({"list_lag_s": 1.0})
    devices = devices_of(sim, "WM-200", 512)
    journal = tmp_path / "j.sqlite"
    await execute(
        load_plan(write_plan(tmp_path, sim, devices, settle=1.2)), RunOptions(journal=journal)
    )
    with sqlite3.connect(journal) as db:
        detail = db.execute("SELECT detail FROM events WHERE kind='census-closing'").fetchone()[0]
    assert json.loads(detail)["targets_in_tasks"] == 512


async def test_new_run_waits_for_the_earlier_runs_creates_in_flight(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """`--new-run` right after a run was stopped with a create in flight settles it first."""
    sim.platform.faults.update({"late_commit_s": 1.5, "list_lag_s": 0.5})
    devices = devices_of(sim, "WM-200", 256)
    plan = write_plan(tmp_path, sim, devices, settle=1.0)
    journal = tmp_path / "j.sqlite"
    await _stop_with_a_create_in_flight(plan, journal)
    await execute(load_plan(plan), RunOptions(journal=journal, new_run=True))
    _each_once(sim, devices)


async def test_a_lost_journal_right_after_a_kill_waits_for_the_killed_runs_late_creates(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """Fresh foreign tasks in the census make it look again once in-flight creates landed."""
    sim.platform.faults.update({"late_commit_s": 1.0})
    devices = devices_of(sim, "WM-200", 768)
    plan = write_plan(tmp_path, sim, devices, settle=1.0, execution="concurrency = 1")
    journal = tmp_path / "j.sqlite"
    run = asyncio.create_task(execute(load_plan(plan), RunOptions(journal=journal)))
    while sim.platform.stats.tasks_created < 1:  # noqa: ASYNC110  (the platform's view)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # the second create is on the wire, not yet committed
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    _lose(journal)
    await execute(load_plan(plan), RunOptions(journal=journal))
    _each_once(sim, devices)
