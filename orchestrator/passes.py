"""Retry passes: `rollout retry` — another task for the devices of a finished run whose latest
outcome failed, exactly once per pass.

A pass is journaled whole before its first create (`Journal.create_pass`: its wave row
`retry-<N>`, its chunks `p<NN>-…` and its pass row, in one transaction); from there it is a
wave like any other — intents, settling, bisection, monitoring. Its census ignores tasks older
than the pass (on the platform's clock) and the tasks of earlier passes, so it adopts only
tasks made for the pass itself: an interrupted pass is finished, never sent twice, and a new
pass starts only from a finished one. It is sent with the plan's last wave's window and, when
followed, judged by the plan's last gate — a pass submitted without following is judged when
it is followed later (watch, resume, a step, retry).
docs/resume-and-reconciliation.md#retry-passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from .census import PackageJudge, UnknownTasks, take_census
from .engine import (
    HALTED,
    SUBMITTED_ALL,
    Rollout,
    RunOptions,
    adopt_found,
    check_same_inputs,
    journal_path,
    judge_pass,
    last_gate,
    pass_targets,
    platform_client,
    wave_policy,
)
from .errors import (
    DuplicatesFound,
    JournalError,
    JournalMismatch,
    RunAborted,
    RunHalted,
    RunWaiting,
)
from .journal import NEVER_STARTED, Journal, PassRow, RunRow
from .journal_schema import (
    ABORTED,
    COMPLETED,
    INTENT,
    INTERRUPTED,
    PASS_UNFINISHED,
    PENDING,
    RUNNING,
)
from .loaded_plan import LoadedPlan
from .monitor import Sleep
from .observe import Observer
from .outcomes import Outcome
from .session import RunSession
from .submitter import CensusView, Progress, Submitter, resolve_package

log = structlog.get_logger("orchestrator.passes")

# what `rollout retry --states` may name: fail, timeout, stop, never-started
RETRY_CHOICES = {
    "fail": frozenset({Outcome.FAILED.value, Outcome.VERSION_MISMATCH.value}),
    "timeout": frozenset({Outcome.TIMED_OUT.value}),
    "stop": frozenset({Outcome.STOPPED.value}),
    "never-started": frozenset({NEVER_STARTED}),
}
RETRY_STATES = frozenset(value for values in RETRY_CHOICES.values() for value in values)
RUN_DONE = frozenset({COMPLETED, SUBMITTED_ALL})  # a run a pass may follow


@dataclass(frozen=True)
class RetryOptions:
    journal: Path | None = None
    states: frozenset[str] = RETRY_STATES  # outcomes to retry, plus `never-started`
    follow: bool | None = None  # None: the plan's monitor.follow
    unknown_tasks: UnknownTasks = UnknownTasks.STOP
    state_dir: Path | None = None  # the host's shared state (None: $ROLLOUT_STATE_DIR or default)
    # one monitor poll, then judge the pass when its tasks are final, else RunWaiting (75)
    step: bool = False


@dataclass(frozen=True)
class RetryResult:
    run_id: int
    journal: Path
    pass_no: int | None  # None: no device's latest outcome was one of the states
    targets: int


async def retry(
    loaded: LoadedPlan,
    options: RetryOptions,
    observer: Observer | None = None,
    *,
    sleep: Sleep | None = None,
) -> RetryResult:
    """`rollout retry`: a new pass for the devices of the finished run whose latest outcome
    is one of `options.states` — or the unfinished pass (one submitted without following
    included: it is followed and judged), finished first.

    A pass is journaled whole before its first create (its wave row, chunks and pass row in
    one transaction); its census ignores tasks older than the pass and those of earlier
    passes, so it adopts only its own (exactly once per pass, through crashes); it is sent
    with the plan's last wave's window and judged, when followed, by the plan's last gate
    (`min_finished`, `max_failed`, `min_sample`: nothing follows a pass, so soak and
    approval do not apply). Raises RunAborted when the run is not finished (halted, or
    tasks whose outcomes are not all read), RunHalted when the pass fails the gate, and the
    errors of `execute`."""
    if not loaded.plan.platform.is_simulator:
        loaded.secret()
    path = journal_path(loaded, options.journal)
    if not path.exists():
        raise JournalError(f"{path}: no journal here (has this plan been run?)")
    journal = Journal.open(path)
    try:
        run = journal.latest_run(loaded.plan.name)
        if run is None:
            raise JournalError(f"{path}: no run of plan {loaded.plan.name!r} to retry")
        run_id = run.run_id
        check_same_inputs(loaded, run, path, journal)
        passes = journal.passes(run_id)
        current = passes[-1] if passes and passes[-1].status in PASS_UNFINISHED else None
        if current is None:
            _check_retryable(journal, run)
        async with platform_client(loaded, options.state_dir, "retry", path) as client:
            package = await resolve_package(loaded, client)
            if run.file_id not in (None, package.file_id):
                raise JournalMismatch(
                    f"{path}: run {run_id} targets package {run.file_id}, the plan now "
                    f"{package.file_id}"
                )
            if current is None:
                devices = journal.latest_outcomes(run_id, set(options.states))
                if not devices:
                    log.info("nothing to retry", run=run_id, states=sorted(options.states))
                    return RetryResult(run_id, path, None, 0)
                clock = client.clock
                margin = (clock.uncertainty if clock.measured else 0.0) + (
                    loaded.plan.execution.clock_skew
                )
                current = journal.create_pass(run_id, options.states, devices, clock.now() - margin)
                log.info("retry pass", run=run_id, pass_no=current.pass_no, devices=len(devices))
            else:
                log.info("finishing retry pass", run=run_id, pass_no=current.pass_no)
                journal.set_pass_status(run_id, current.pass_no, RUNNING)
            journal.requeue_failed(run_id)
            session = RunSession(loaded, journal, client, run_id, package)
            follow = loaded.plan.monitor.follow if options.follow is None else options.follow
            try:
                await _drive_pass(session, current, options, observer, sleep, follow)
            except RunAborted as exc:
                journal.set_pass_status(run_id, current.pass_no, ABORTED, str(exc))
                raise
            except RunHalted as exc:
                journal.set_pass_status(run_id, current.pass_no, HALTED, str(exc))
                raise
            except RunWaiting as exc:  # a step: submitted, to be judged by a later step
                journal.set_pass_status(run_id, current.pass_no, SUBMITTED_ALL, str(exc))
                raise
            except BaseException:
                journal.set_pass_status(run_id, current.pass_no, INTERRUPTED, "interrupted")
                raise
            finally:
                journal.add_calls(run_id, client.take_call_counts())
            _finish_pass(journal, run_id, current, COMPLETED if follow else SUBMITTED_ALL)
            return RetryResult(run_id, path, current.pass_no, current.targets)
    finally:
        journal.close()


def _check_retryable(journal: Journal, run: RunRow) -> None:
    """A new pass needs a finished run: every wave submitted (its last gate passed) and every
    task's devices read, so each device's latest outcome is known."""
    if run.status not in RUN_DONE:
        raise RunAborted(
            f"run {run.run_id} is {run.status}: a retry pass follows a run that submitted "
            "every wave (`rollout resume` first)"
        )
    unread = journal.unread_tasks(run.run_id)
    if unread:
        raise RunAborted(
            f"{unread} tasks of run {run.run_id} have devices whose outcome is not known yet: "
            "`rollout watch PLAN` follows them to the end, then retry"
        )


async def _drive_pass(
    session: RunSession,
    current: PassRow,
    options: RetryOptions,
    observer: Observer | None,
    sleep: Sleep | None,
    follow: bool,
) -> None:
    journal, run_id = session.journal, session.run_id
    judge = PackageJudge(
        session.client,
        session.package,
        journal.known_operations(),
        created_windows=journal.created_windows(),
    )
    rows = journal.chunks(run_id, [PENDING, INTENT], current.wave)
    view = CensusView(None, judge, options.unknown_tasks)
    if rows:  # a census only for chunks still to send or settle (a later step has none)
        census = await take_census(
            judge,
            session.operation,
            "devices",
            pass_targets(journal, run_id, current),
            since=current.platform_start,
            ignore=journal.operations_outside(run_id, current.wave),
        )
        journal.record_census(run_id, "opening", census.summary() | {"pass": current.pass_no})
        adopt_found(journal, run_id, census, rows, options.unknown_tasks)
        view = CensusView(census, judge, options.unknown_tasks)
    steps = RunOptions(unknown_tasks=options.unknown_tasks, step=options.step)
    rollout = Rollout(session, observer, sleep, view, steps)
    last_wave, _ = last_gate(session.loaded)
    sent = Progress(total_targets=current.targets)
    await Submitter(
        session,
        rollout.observer.progress,
        wave=current.wave,
        policy=wave_policy(session.loaded, last_wave, session.client.clock.now()),
        shared_progress=sent,
        census=view,
        sleep=rollout.monitor.sleep,
        progress_of_wave=True,
    ).run()
    journal.add_calls(run_id, session.client.take_call_counts())
    await rollout.closing_census(current)
    if not follow:
        return
    if options.step:
        if sent.creates:  # tasks created a moment ago cannot be done: the next step looks
            raise RunWaiting(
                f"retry pass {current.pass_no}: tasks were just created; the next step polls "
                "them, then judges the pass by the plan's last gate",
                waiting_for="tasks",
            )
        await rollout.monitor.poll()
        unfinished = len(journal.unfinished_tasks(run_id))
        if unfinished:
            raise RunWaiting(
                f"retry pass {current.pass_no}: {unfinished} tasks still running; the next "
                "step polls again, then judges the pass by the plan's last gate",
                waiting_for="tasks",
            )
    else:
        await rollout.monitor.follow(first_wait=session.plan.monitor.poll_interval)
    judge_pass(journal, run_id, current, session.loaded)


def _finish_pass(journal: Journal, run_id: int, current: PassRow, status: str) -> None:
    """Exit 0 only when every device of the pass is in a task (or quarantined) and none is
    in two tasks of the pass."""
    left = journal.counts(run_id, current.wave)
    outstanding = sum(
        n
        for key, n in left.items()
        if key.startswith("targets_")
        and key.removeprefix("targets_") not in ("submitted", "split", "quarantined")
    )
    if outstanding:
        reason = (
            f"{outstanding} devices of the pass are still in no task; `rollout retry` sends them"
        )
        journal.set_pass_status(run_id, current.pass_no, ABORTED, reason)
        raise RunAborted(reason)
    duplicates = journal.duplicates(run_id)
    if duplicates:
        target, operations = next(iter(duplicates.items()))
        reason = (
            f"{len(duplicates)} targets are in two or more tasks of this package (e.g. "
            f"{target} in {', '.join(operations)}); `rollout status` lists them"
        )
        journal.set_pass_status(run_id, current.pass_no, status, reason)
        raise DuplicatesFound(reason)
    journal.set_pass_status(run_id, current.pass_no, status)
