"""A rollout end to end: plan → journal → platform session → waves of submission and gates
→ monitor → journal.

`execute` is what `rollout run` and `rollout resume` call, `watch` what `rollout watch`
calls; tests call them directly too.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import SecretStr

from .census import Census, PackageJudge, UnknownTasks, plan_adoption, take_census
from .errors import (
    CensusUndecided,
    DuplicatesFound,
    JournalError,
    JournalMismatch,
    PlatformCallError,
    RunAborted,
    RunHalted,
    RunWaiting,
    ServerError,
    TransportError,
)
from .gates import Verdict, evaluate
from .journal import (
    ABORTED,
    CENSUS,
    COMPLETED,
    INTENT,
    INTERRUPTED,
    PENDING,
    RUNNING,
    WAITING,
    Journal,
    RunRow,
    default_journal_path,
)
from .monitor import Monitor, Sleep
from .northbound import ClientConfig, NorthboundClient, Package, TLSConfig
from .notify import notifying, webhook_urls
from .observe import Notice, NoticeKind, Observer, run_view
from .plan import PLATFORM_TIME_FORMAT, LoadedPlan, PlatformSection, WaveSection, check_times
from .planner import plan_chunks
from .session import RunSession
from .simulator import DEFAULT_SECRET, SimulatorConfig, SimulatorServer
from .submitter import CensusView, Progress, Submitter, resolve_package

log = structlog.get_logger("orchestrator.engine")

HALTED = "halted"
SUBMITTED_ALL = "submitted"


@dataclass(frozen=True)
class RunOptions:
    journal: Path | None = None
    new_run: bool = False
    resume_only: bool = False
    follow: bool | None = None  # None: the plan's monitor.follow
    unknown_tasks: UnknownTasks = UnknownTasks.STOP  # targets in tasks of unknown package
    ignore_census: bool = False  # send targets the platform already holds (loud)
    # advance as far as possible now — census, submit what may be submitted, one monitor
    # poll, judge the gates — then raise RunWaiting instead of sleeping (schedulers)
    step: bool = False


@dataclass(frozen=True)
class RunResult:
    run_id: int
    journal: Path
    counts: dict[str, int]
    already_completed: bool = False  # the journal's run was completed: nothing was done


def journal_path(loaded: LoadedPlan, override: Path | None) -> Path:
    """The journal: `--journal`, else `<plan dir>/.rollout/<name>.journal.sqlite`."""
    if override is not None:
        return override
    return default_journal_path(loaded.plan.name, loaded.base_dir)


def _client_config(
    platform: PlatformSection, base_url: str, secret: str, tls: TLSConfig
) -> ClientConfig:
    return ClientConfig(
        base_url=base_url,
        app_id=platform.app_id,
        secret=SecretStr(secret),
        tls=tls,
        rate_limit=platform.rate,
        pacing_margin=platform.pacing_margin,
        connect_timeout=platform.connect_timeout,
        total_timeout=platform.request_timeout,
    )


@asynccontextmanager
async def platform_client(loaded: LoadedPlan) -> AsyncIterator[NorthboundClient]:
    """A client for the plan's platform; with `url = "simulator"`, an embedded one."""
    platform = loaded.plan.platform
    if platform.is_simulator:
        sim = platform.simulator
        server = SimulatorServer(
            SimulatorConfig(
                port=0,
                tls=True,
                app_id=platform.app_id,
                devices=sim.devices,
                seed=sim.seed,
                speed=sim.speed,
                rate_limit=platform.rate,
            )
        )
        async with server:
            log.info("embedded simulator started", url=server.url, devices=sim.devices)
            tls = TLSConfig(ca_file=server.cert_file)
            config = _client_config(platform, server.url, DEFAULT_SECRET, tls)
            async with NorthboundClient(config) as client:
                yield client
        return
    base = loaded.base_dir
    tls = TLSConfig(
        ca_file=base / platform.ca_file if platform.ca_file else None,
        client_cert=base / platform.client_cert if platform.client_cert else None,
        client_key=base / platform.client_key if platform.client_key else None,
        insecure=platform.insecure,
    )
    config = _client_config(platform, platform.url, loaded.secret(), tls)
    async with NorthboundClient(config) as client:
        yield client


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _check_same_inputs(loaded: LoadedPlan, run: RunRow, path: Path, journal: Journal) -> None:
    """Refuse a resume whose targets or package would differ from the run's; allow (and log)
    every other edit of the plan file."""
    if run.fingerprint is None:  # a run started by a journal of schema 1: the file's bytes
        same = run.plan_sha == loaded.plan_sha and run.fleet_sha == loaded.fleet.sha256
    else:
        same = run.fingerprint == loaded.fingerprint
    if not same:
        what = (
            f"the fleet ({loaded.fleet.source})"
            if run.fleet_sha != loaded.fleet.sha256
            else f"the targets or package of {loaded.path} (firmware, operation, fleet or waves)"
        )
        raise JournalMismatch(
            f"{path}: {what} changed since run {run.run_id} started; "
            "restore it to finish that run, or pass --new-run to start another "
            "(targets already in a task are not sent again)"
        )
    settings = loaded.settings()
    if run.settings is not None and run.settings != settings:
        before, after = _flatten(json.loads(run.settings)), _flatten(json.loads(settings))
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        log.info("plan edited since the run started", run=run.run_id, changed=changed)
        journal.event(run.run_id, "plan-edited", {"changed": changed})
    journal.set_settings(run.run_id, loaded.plan_sha, settings)


def _wave_policy(
    loaded: LoadedPlan, section: WaveSection | None, platform_now: float
) -> dict[str, Any]:
    policy = loaded.plan.policy.wire()
    if section is not None and section.window is not None:
        start, end = section.window.next_window(datetime.fromtimestamp(platform_now, UTC))
        policy.update(
            executeType="custom",
            startTime=start.strftime(PLATFORM_TIME_FORMAT),
            endTime=end.strftime(PLATFORM_TIME_FORMAT),
        )
    return policy


def start_run(journal: Journal, loaded: LoadedPlan) -> int:
    """A new run in the journal: the plan's fingerprints, its waves and every chunk."""
    return journal.create_run(
        plan_name=loaded.plan.name,
        plan_path=str(loaded.path),
        plan_sha=loaded.plan_sha,
        fleet_sha=loaded.fleet.sha256,
        fleet_kind=loaded.fleet.kind,
        target_count=len(loaded.fleet.members),
        operation=loaded.plan.operation.value,
        chunks=plan_chunks(loaded.fleet, loaded.waves),
        waves=loaded.waves,
        fingerprint=loaded.fingerprint,
        settings=loaded.settings(),
    )


async def open_census(session: RunSession, options: RunOptions) -> CensusView:
    """Before the first create of a run, and on every resume: read the platform's tasks of
    this package and journal every target already in one as adopted — whatever process,
    folder or earlier run created it. Raises CensusUndecided (nothing created) when targets
    are held by tasks whose package is unknown and the operator has not decided."""
    journal, run_id = session.journal, session.run_id
    judge = PackageJudge(
        session.client,
        session.package,
        journal.known_operations(),
        created_windows=journal.created_windows(),
    )
    if options.ignore_census:
        log.warning(
            "CENSUS IGNORED (--ignore-census): targets already in a task of this package are "
            "sent again; the closing census will report them as duplicates"
        )
        journal.event(run_id, "census-ignored", {})
        return CensusView(None, judge, options.unknown_tasks)
    targets = {member: member for member in session.loaded.fleet.members}
    census = await take_census(judge, session.operation, session.loaded.fleet.kind, targets)
    journal.record_census(run_id, "opening", census.summary())
    rows = journal.chunks(run_id, [PENDING, INTENT])
    if options.unknown_tasks is UnknownTasks.STOP:
        _refuse_undecided(census, [row.members for row in rows if row.state == PENDING])
    adopted = 0
    for row in rows:
        adoption = plan_adoption(
            row.as_chunk(), census, options.unknown_tasks, exact_only=row.state == INTENT
        )
        if adoption is None:
            continue
        if adoption.whole:
            journal.record_adopted(run_id, row.chunk_id, adoption.adopted[0][1], [], how=CENSUS)
        else:
            journal.adopt_parts(run_id, row.chunk_id, adoption.adopted, adoption.remainder)
        adopted += sum(len(part.members) for part, _ in adoption.adopted)
    if adopted:
        log.info("census: targets already in a task are not sent again", adopted=adopted)
    return CensusView(census, judge, options.unknown_tasks)


def _refuse_undecided(census: Census, pending: list[list[str]]) -> None:
    undecided = [m for members in pending for m in members if m in census.unknown]
    if not undecided:
        return
    tasks = sorted({op for m in undecided for op in census.unknown[m]})
    shown = ", ".join(tasks[:3]) + (f" and {len(tasks) - 3} more" if len(tasks) > 3 else "")
    raise CensusUndecided(
        f"{len(undecided)} targets not yet sent are already in {len(tasks)} task(s) whose "
        f"package the platform does not report ({shown}); nothing was created. Decide: "
        "--unknown-tasks skip (count them as in that task, not sent) or --unknown-tasks send "
        "(send them: a second task if that one carries this package)"
    )


class Rollout:
    """One run being driven: waves in order, each submitted, then gated."""

    def __init__(
        self,
        session: RunSession,
        observer: Observer | None,
        sleep: Sleep | None = None,
        census: CensusView | None = None,
        *,
        step: bool = False,
    ) -> None:
        self.session = session
        self.observer = observer or Observer()
        self.progress = Progress(total_targets=len(session.loaded.fleet.members))
        self.monitor = Monitor(session, **({"sleep": sleep} if sleep is not None else {}))
        self.monitor.on_poll = lambda _: self.publish()
        self.census = census
        self.step = step
        # throttled replies of earlier processes of this run (journal) + this one's (client)
        self._throttled_before: dict[str, int] = (
            session.journal.recall(session.run_id, "throttled") or {}
        )
        self._polled = False  # step mode: at most one monitor poll per step
        self._fresh = False  # step mode: this step created tasks (none of them can be done)

    async def drive(self, follow: bool) -> None:
        rows = {row.wave: row for row in self.session.journal.waves(self.session.run_id)}
        last = len(self.session.loaded.waves) - 1
        for wave in self.session.loaded.waves:
            section = self.session.plan.waves[wave.index] if self.session.plan.waves else None
            if rows[wave.index].gate_state == "passed":
                continue
            log.info("wave", wave=wave.name, targets=len(wave.members))
            creates = self.progress.creates
            await Submitter(
                self.session,
                self.observer.progress,
                wave=wave.index,
                policy=_wave_policy(self.session.loaded, section, self.session.client.clock.now()),
                shared_progress=self.progress,
                census=self.census,
                sleep=self.monitor.sleep,
            ).run()
            self._fresh = self._fresh or self.progress.creates > creates
            self.session.journal.add_calls(
                self.session.run_id, self.session.client.take_call_counts()
            )
            if section is not None and wave.index < last:
                await self._gate(wave.index, wave.name, section)
            elif wave.index == last:
                self._set_gate(wave.index, wave.name, "none", "the last wave has no gate")
        await self.closing_census()
        if follow and self.step:
            await self._poll()
            unfinished = len(self.session.journal.unfinished_tasks(self.session.run_id))
            if unfinished:
                raise RunWaiting(
                    f"{unfinished} tasks still running ({self._devices_open()}); "
                    "the next step polls again",
                    waiting_for="tasks",
                )
        elif follow:
            await self.monitor.follow(first_wait=self.session.plan.monitor.poll_interval)

    GATE_NOTICES = {  # noqa: RUF012
        "passed": NoticeKind.GATE_PASSED,
        "failed": NoticeKind.GATE_FAILED,
        "awaiting-approval": NoticeKind.GATE_AWAITING_APPROVAL,
    }

    def _set_gate(
        self, wave: int, name: str, state: str, reason: str, soak_until: float | None = None
    ) -> None:
        """Journal a gate's state, show it, and tell people when it passed, failed or
        awaits approval (once per change, not on every poll)."""
        journal, run_id = self.session.journal, self.session.run_id
        before = next((r.gate_state for r in journal.waves(run_id) if r.wave == wave), None)
        journal.set_gate(run_id, wave, state, reason, soak_until)
        self.publish()
        kind = self.GATE_NOTICES.get(state)
        if kind is not None and before != state:
            words = {"passed": "passed its gate", "failed": "FAILED its gate"}
            what = words.get(state, "passed its gate and waits for approval")
            self.notice(kind, f"wave {name!r} {what}: {reason}", wave=name, reason=reason)

    def publish(self) -> None:
        """Show where the waves stand now (from the journal); keep the throttled replies
        (for metrics)."""
        throttled = self.session.client.throttled
        if throttled:
            total = {
                k: self._throttled_before.get(k, 0) + throttled.get(k, 0)
                for k in self._throttled_before.keys() | throttled.keys()
            }
            self.session.journal.remember(self.session.run_id, "throttled", total)
        self.observer.view(
            run_view(self.session.journal, self.session.plan.name, self.session.run_id)
        )

    def notice(self, kind: NoticeKind, text: str, **detail: object) -> None:
        self.observer.notice(
            Notice(kind, self.session.plan.name, self.session.run_id, text, dict(detail))
        )

    async def _poll(self) -> None:
        """One monitor poll; in step mode at most one per step, none when this step has just
        created tasks (they cannot be done yet: the next step looks)."""
        if not self.step:
            await self.monitor.poll()
            return
        if self._fresh:
            raise RunWaiting(
                f"tasks were just created ({self._devices_open()}); the next step polls them",
                waiting_for="tasks",
            )
        if not self._polled:
            self._polled = True
            await self.monitor.poll()

    def _devices_open(self) -> str:
        in_tasks = finished = 0
        for wave in self.session.journal.waves(self.session.run_id):
            counts = self.session.journal.wave_counts(self.session.run_id, wave.wave)
            in_tasks += counts.submitted
            finished += counts.finished
        return f"{in_tasks - finished} of {in_tasks} devices in tasks not finished"

    async def closing_census(self) -> None:
        """After the run's last create (once the platform has surely finished with every
        ambiguous one): any target in two tasks of this package is recorded, never silent."""
        journal, run_id = self.session.journal, self.session.run_id
        if not journal.needs_closing_census(run_id):
            return
        latest = journal.latest_unsettled_send(run_id)
        if latest is not None:
            ready = (
                latest
                + self.session.plan.platform.request_timeout
                + self.session.plan.execution.settle
            )
            if ready > time.time():
                await self.monitor.sleep(ready - time.time())
        known = journal.known_operations()
        if self.census is not None:
            judge = self.census.judge
            judge.known.update(known)
        else:
            judge = PackageJudge(self.session.client, self.session.package, known)
        judge.created_windows = journal.created_windows()
        census = await take_census(
            judge,
            self.session.operation,
            self.session.loaded.fleet.kind,
            {member: member for member in self.session.loaded.fleet.members},
        )
        journal.record_census(run_id, "closing", census.summary())
        duplicates = census.duplicates()
        journal.record_duplicates(run_id, duplicates)
        if duplicates:
            self.notice(
                NoticeKind.DUPLICATES_FOUND,
                f"{len(duplicates)} targets are in two or more tasks of this package",
                targets=len(duplicates),
            )
            log.error(
                "targets in two tasks of this package",
                targets=len(duplicates),
                example=next(iter(sorted(duplicates.items()))),
            )

    async def _gate(self, wave: int, name: str, section: WaveSection) -> None:
        gate = section.gate
        interval = self.session.plan.monitor.poll_interval
        seen = self.session.journal.wave_counts(self.session.run_id, wave)
        if not self.step and (seen.tasks == 0 or seen.final_tasks < seen.tasks):
            await self.monitor.sleep(interval)  # tasks created a moment ago cannot be done
        while True:
            await self._poll()
            counts = self.session.journal.wave_counts(self.session.run_id, wave)
            verdict, reason = evaluate(gate, counts)
            row = next(r for r in self.session.journal.waves(self.session.run_id) if r.wave == wave)
            approved = self.session.journal.approved(self.session.run_id, wave)
            if verdict is Verdict.FAIL:
                if approved:
                    self._set_gate(
                        wave, name, "passed", f"failed gate overridden by approval: {reason}"
                    )
                    return
                self._set_gate(wave, name, "failed", reason)
                raise RunHalted(
                    f"wave {name!r} failed its gate: {reason}. Nothing more was submitted. "
                    f"To go on anyway: rollout approve PLAN --wave {name}, then rollout resume"
                )
            if verdict is Verdict.WAIT:
                self._set_gate(wave, name, "waiting", reason)
                if self.step:
                    raise RunWaiting(
                        f"wave {name!r} gate waits: {reason}; the next step polls again",
                        waiting_for="tasks",
                    )
                await self.monitor.sleep(interval)
                interval = min(self.session.plan.monitor.max_poll_interval, interval * 1.5)
                continue
            if gate.soak > 0:
                soak_until = row.soak_until or time.time() + gate.soak
                if time.time() < soak_until:
                    self._set_gate(wave, name, "soaking", reason, soak_until)
                    if self.step:
                        until = datetime.fromtimestamp(soak_until, UTC)
                        raise RunWaiting(
                            f"wave {name!r} passed its gate ({reason}) and soaks until "
                            f"{until.isoformat(timespec='seconds')}; failures are watched "
                            "on every step meanwhile",
                            waiting_for="soak",
                            until=soak_until,
                        )
                    await self.monitor.sleep(min(interval, max(0.0, soak_until - time.time())))
                    continue
            if gate.approval and not approved:
                self._set_gate(wave, name, "awaiting-approval", reason)
                if self.step:
                    raise RunWaiting(_approval_message(name, reason), waiting_for="approval")
                raise RunHalted(_approval_message(name, reason))
            self._set_gate(wave, name, "passed", reason)
            log.info("gate passed", wave=name, reason=reason)
            return


async def execute(
    loaded: LoadedPlan,
    options: RunOptions,
    observer: Observer | None = None,
    *,
    sleep: Sleep | None = None,
) -> RunResult:
    """`rollout run` / `rollout resume`. Raises the orchestrator's errors (exit codes in
    docs/exit-codes.md); returns only when every target is in a task or quarantined.

    A run the journal shows completed is not touched: no login, no call (`--new-run` starts
    another). With `options.step`, raises RunWaiting (exit 75) when the rest needs time; a
    step that follows a clean step (run status `waiting`) goes on as a continuous run does
    after a sleep: no census and no package look-up again, and none of any call while a
    gate only waits for an operator's approval.

    `observer` watches (the live display, metrics); the plan's `[[notify]]` webhooks are
    added here and flushed, within their time limit, before this returns."""
    if not loaded.plan.platform.is_simulator:
        loaded.secret()  # an unset secret is bad input: fail before a journal or a call exists
    webhook_urls(loaded)  # so is an unset webhook URL
    path = journal_path(loaded, options.journal)
    journal = Journal.open(path)
    try:
        existing = journal.latest_run(loaded.plan.name)
        if options.resume_only and existing is None:
            raise JournalError(f"{path}: no run of plan {loaded.plan.name!r} to resume")
        continuing = existing is not None and not options.new_run
        if existing is not None and continuing:
            _check_same_inputs(loaded, existing, path, journal)
            if existing.status == COMPLETED:
                _completed_already(journal, existing)
                return RunResult(existing.run_id, path, journal.counts(existing.run_id), True)
        stepping_on = (
            options.step and existing is not None and continuing and existing.status == WAITING
        )
        if stepping_on:
            assert existing is not None
            _approval_pending(journal, existing.run_id)
        async with notifying(loaded, observer) as watching, platform_client(loaded) as client:
            remembered = (
                journal.recall(existing.run_id, "package") if existing and stepping_on else None
            )
            if remembered is not None:
                package = Package.model_validate(remembered)
            else:
                package = await resolve_package(loaded, client)
            if existing is not None and continuing:
                run_id = existing.run_id
                if existing.file_id not in (None, package.file_id):
                    raise JournalMismatch(
                        f"{path}: run {run_id} targets package "
                        f"{existing.file_id}, the plan now {package.file_id}"
                    )
            else:
                # a new run refuses a custom start in the past, on the platform's clock
                check_times(
                    loaded.plan, str(loaded.path), datetime.fromtimestamp(client.clock.now(), UTC)
                )
                run_id = start_run(journal, loaded)
            journal.set_package(run_id, package.file_id, package.version)
            journal.remember(run_id, "package", package.model_dump(by_alias=True))
            journal.set_status(run_id, RUNNING)
            requeued = journal.requeue_failed(run_id)
            if requeued:
                log.info("chunks refused for a plan-level reason are sent again", chunks=requeued)
            session = RunSession(loaded, journal, client, run_id, package)
            follow = loaded.plan.monitor.follow if options.follow is None else options.follow
            rollout = Rollout(session, watching, sleep, step=options.step)
            rollout.publish()
            try:
                if stepping_on and not requeued:
                    # the last step ended cleanly: its census still stands, as in a run
                    rollout.census = CensusView(None, PackageJudge(client, package, {}))
                else:
                    rollout.census = await open_census(session, options)
                await rollout.drive(follow)
            except RunWaiting as exc:
                journal.set_status(run_id, WAITING, str(exc))
                raise
            except RunAborted as exc:
                journal.set_status(run_id, ABORTED, str(exc))
                rollout.notice(NoticeKind.RUN_ABORTED, f"run stopped: {exc}")
                raise
            except RunHalted as exc:
                journal.set_status(run_id, HALTED, str(exc))
                rollout.notice(NoticeKind.RUN_HALTED, f"halted at a gate: {exc}")
                raise
            except BaseException as exc:
                journal.set_status(run_id, INTERRUPTED, "interrupted; in-flight state recorded")
                if isinstance(exc, TransportError | ServerError):
                    rollout.notice(
                        NoticeKind.OUTAGE,
                        f"the platform is out of reach ({exc}); the run stopped with its "
                        "state recorded, `rollout resume` goes on",
                    )
                elif isinstance(exc, PlatformCallError):
                    rollout.notice(NoticeKind.RUN_ABORTED, f"run stopped: {exc}")
                raise
            finally:
                journal.add_calls(run_id, client.take_call_counts())
                rollout.publish()
            try:
                _finish(journal, run_id, COMPLETED if follow else SUBMITTED_ALL)
            except RunAborted as exc:
                rollout.notice(NoticeKind.RUN_ABORTED, f"run stopped: {exc}")
                raise
            except DuplicatesFound:
                raise  # told by the closing census
            counts = journal.counts(run_id)
            rollout.notice(
                NoticeKind.RUN_COMPLETED,
                f"run {run_id} {'completed' if follow else 'submitted'}: "
                f"{counts.get('targets_submitted', 0)} targets in tasks, "
                f"{counts.get('targets_quarantined', 0)} quarantined",
            )
            return RunResult(run_id, path, counts)
    finally:
        journal.close()


def _completed_already(journal: Journal, run: RunRow) -> None:
    """A completed run is said so, from the journal alone; its duplicates still exit 5."""
    log.info(
        "run already completed; nothing to do (--new-run starts another)",
        run=run.run_id,
        plan=run.plan_name,
    )
    duplicates = journal.duplicates(run.run_id)
    if duplicates:
        raise DuplicatesFound(
            f"run {run.run_id} completed with {len(duplicates)} targets in two or more tasks "
            "of this package; `rollout status` lists them"
        )


def _approval_message(name: str, reason: str) -> str:
    return (
        f"wave {name!r} passed its gate ({reason}) and waits for approval: "
        f"rollout approve PLAN --wave {name}, then rollout resume"
    )


def _approval_pending(journal: Journal, run_id: int) -> None:
    """Step mode: a gate that only waits for an operator's approval needs no call."""
    for row in journal.waves(run_id):
        if row.gate_state == "passed":
            continue
        if row.gate_state == "awaiting-approval" and not journal.approved(run_id, row.wave):
            raise RunWaiting(
                _approval_message(row.name, row.gate_reason or "passed"), waiting_for="approval"
            )
        return


def _finish(journal: Journal, run_id: int, status: str) -> None:
    """Exit 0 only when every target is in a task (sent or adopted) or quarantined, and no
    target is in two tasks of this package."""
    outstanding = journal.outstanding(run_id)
    if outstanding:
        reason = f"{outstanding} targets are still in no task; `rollout resume` sends them"
        journal.set_status(run_id, ABORTED, reason)
        raise RunAborted(reason)
    duplicates = journal.duplicates(run_id)
    if duplicates:
        target, operations = next(iter(duplicates.items()))
        reason = (
            f"{len(duplicates)} targets are in two or more tasks of this package "
            f"(e.g. {target} in {', '.join(operations)}); `rollout status` lists them — the "
            "platform has no stop call, both tasks run"
        )
        journal.set_status(run_id, status, reason)
        raise DuplicatesFound(reason)
    journal.set_status(run_id, status)


@asynccontextmanager
async def _existing_run(
    loaded: LoadedPlan,
    journal_file: Path | None,
    sleep: Sleep | None = None,
    observer: Observer | None = None,
) -> AsyncIterator[tuple[Journal, int, Rollout]]:
    """The journal's latest run of the plan, with a platform session, for monitoring only."""
    path = journal_path(loaded, journal_file)
    if not path.exists():
        raise JournalError(f"{path}: no journal here (has this plan been run?)")
    journal = Journal.open(path)
    try:
        existing = journal.latest_run(loaded.plan.name)
        if existing is None:
            raise JournalError(f"{path}: no run of plan {loaded.plan.name!r}")
        async with platform_client(loaded) as client:
            package = await resolve_package(loaded, client)
            rollout = Rollout(
                RunSession(loaded, journal, client, existing.run_id, package), observer, sleep
            )
            rollout.publish()
            try:
                yield journal, existing.run_id, rollout
            finally:
                journal.add_calls(existing.run_id, client.take_call_counts())
    finally:
        journal.close()


async def watch(
    loaded: LoadedPlan,
    journal_file: Path | None,
    *,
    sleep: Sleep | None = None,
    observer: Observer | None = None,
) -> RunResult:
    """Follow the journal's run to the end without submitting anything."""
    async with _existing_run(loaded, journal_file, sleep, observer) as (journal, run_id, rollout):
        await rollout.monitor.follow()
        return RunResult(run_id, journal.path, journal.counts(run_id))


async def refresh(loaded: LoadedPlan, journal_file: Path | None) -> None:
    """One monitor poll, so a report shows the platform's latest word (costs calls)."""
    async with _existing_run(loaded, journal_file) as (_, _, rollout):
        await rollout.monitor.poll()
