"""A rollout end to end: plan → journal → platform session → waves of submission and gates
→ monitor → journal.

`execute` is what `rollout run` and `rollout resume` call, `watch` what `rollout watch`
calls; tests call them directly too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import SecretStr

from .census import (
    Census,
    PackageJudge,
    UnknownTasks,
    members_of,
    plan_adoption,
    take_census,
)
from .counts import WaveCounts
from .errors import (
    CensusUndecided,
    DuplicatesFound,
    InputError,
    JournalError,
    JournalMismatch,
    NotFound,
    PlatformCallError,
    RunAborted,
    RunHalted,
    RunWaiting,
)
from .gates import Verdict, evaluate
from .groups import (
    ResolvedGroup,
    device_duplicates,
    find_overlaps,
    find_resent,
    refuse_other_model,
    refuse_overlaps,
    refuse_resent,
    resolve_groups,
)
from .journal import ChunkRow, Journal, PassRow, RunRow, default_journal_path
from .journal_schema import (
    ABORTED,
    CENSUS,
    COMPLETED,
    INTENT,
    INTERRUPTED,
    PASS_UNFINISHED,
    PENDING,
    RUNNING,
    SPLIT,
    SUBMITTED,
    UNCONFIRMED,
    WAITING,
)
from .loaded_plan import LoadedPlan
from .monitor import Monitor, Sleep
from .northbound import ClientConfig, NorthboundClient, Package, Priority, TLSConfig
from .notify import notifying, webhook_urls
from .observe import Notice, NoticeKind, Observer, run_view
from .plan import PLATFORM_TIME_FORMAT, GateSection, Plan, WaveSection, check_times
from .planner import plan_chunks
from .session import RunSession
from .simulator import DEFAULT_SECRET, SimulatorConfig, SimulatorServer
from .simulator.fleet import FleetTooLarge
from .simulator.state import StateError
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
    state_dir: Path | None = None  # the host's shared state (None: $ROLLOUT_STATE_DIR or default)
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
    plan: Plan,
    base_url: str,
    secret: str,
    tls: TLSConfig,
    state_dir: Path | None,
    label: str,
) -> ClientConfig:
    platform = plan.platform
    return ClientConfig(
        base_url=base_url,
        app_id=platform.app_id,
        secret=SecretStr(secret),
        tls=tls,
        rate_limit=platform.rate,
        pacing_margin=platform.pacing_margin,
        connect_timeout=platform.connect_timeout,
        total_timeout=platform.request_timeout,
        outage_budget=plan.execution.outage_budget,
        state_dir=state_dir,
        label=label,
    )


def simulator_state_path(journal: Path, plan_name: str) -> Path:
    """Where the embedded simulator of a plan keeps its platform: beside the journal."""
    return journal.parent / f"{plan_name}.simulator-state.json"


@asynccontextmanager
async def platform_client(
    loaded: LoadedPlan,
    state_dir: Path | None = None,
    purpose: str = "run",
    journal: Path | None = None,
) -> AsyncIterator[NorthboundClient]:
    """A client for the plan's platform; with `url = "simulator"`, an embedded one.

    The client shares the app's token and call budget with the host's other processes
    through `state_dir` (None: $ROLLOUT_STATE_DIR, else the user's state directory); an
    embedded simulator is this process's alone, so the client's host state lives in a
    temporary directory. Given the run's `journal`, the embedded simulator keeps its
    platform (tasks, clock, tokens) beside it (`simulator_state_path`), so a `resume` after
    Ctrl-C or a crash meets the platform the run left; without, it starts afresh. Raises
    InputError when that saved platform is another fleet's (`[platform.simulator]` changed).
    `purpose` names what the process does in `rollout budget` ("run", "watch", …)."""
    platform = loaded.plan.platform
    label = f"{purpose} {loaded.plan.name}"
    if platform.is_simulator:
        sim = platform.simulator
        state_file = simulator_state_path(journal, loaded.plan.name) if journal else None
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            server = SimulatorServer(
                SimulatorConfig(
                    port=0,
                    tls=True,
                    app_id=platform.app_id,
                    devices=sim.devices,
                    seed=sim.seed,
                    models=sim.models,
                    speed=sim.speed,
                    rate_limit=platform.rate,
                    state_file=state_file,
                )
            )
        except StateError as exc:
            raise InputError(
                str(state_file),
                "[platform.simulator]",
                f"the embedded platform saved there does not fit the plan ({exc}); delete the "
                "file to start it afresh",
            ) from None
        except FleetTooLarge as exc:
            raise InputError(str(loaded.path), "platform.simulator.devices", str(exc)) from None
        with tempfile.TemporaryDirectory(prefix="rollout-state-") as private:
            async with server:
                log.info(
                    "embedded simulator started",
                    url=server.url,
                    devices=sim.devices,
                    **({"restored_from": str(state_file)} if server.restored else {}),
                )
                tls = TLSConfig(ca_file=server.cert_file)
                config = _client_config(
                    loaded.plan, server.url, DEFAULT_SECRET, tls, Path(private), label
                )
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
    config = _client_config(loaded.plan, platform.url, loaded.secret(), tls, state_dir, label)
    async with NorthboundClient(config) as client:
        yield client


async def check_groups(
    loaded: LoadedPlan, client: NorthboundClient, package: Package
) -> dict[str, ResolvedGroup]:
    """A group fleet's members, resolved through the member API; raises InputError (exit 2,
    nothing created) when the plan names an unknown group, targets the groups as another
    type/model/manufacturer than the package's, or puts groups that share devices in
    different tasks (`groups.py`)."""
    fleet = loaded.plan.fleet
    assert fleet.groups is not None
    source = str(loaded.path)
    groups = await resolve_groups(client, fleet.groups, source)
    refuse_other_model(
        groups, (fleet.device_type, fleet.model, fleet.manufacturer), package, source
    )
    chunks = list(plan_chunks(loaded.fleet, loaded.waves))
    other_model = {
        device for device, model in loaded.device_models.items() if model != package.model
    }
    names = {w.index: w.name for w in loaded.waves}
    refuse_overlaps(find_overlaps(chunks, groups, names, other_model), source)
    return groups


async def preview_groups(
    loaded: LoadedPlan, state_dir: Path | None = None
) -> tuple[dict[str, ResolvedGroup], dict[str, int]]:
    """`rollout plan` for a group fleet: the groups' members and the calls it took to learn
    them and check them against the package (a login, the package, a list call per group,
    the member pages)."""
    async with platform_client(loaded, state_dir, "plan") as client:
        package = await resolve_package(loaded, client)
        groups = await check_groups(loaded, client, package)
        return groups, client.take_call_counts()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def check_same_inputs(loaded: LoadedPlan, run: RunRow, path: Path, journal: Journal) -> None:
    """Refuse a resume whose targets or package would differ from the run's; allow (and log)
    every other edit of the plan file."""
    if run.fingerprint is None:  # a run started by a journal of schema 1: the file's bytes
        changed = []
        if run.plan_sha != loaded.plan_sha:
            changed.append(f"the plan file {loaded.path}")
        if run.fleet_sha != loaded.fleet.sha256:
            changed.append(f"the fleet ({loaded.fleet.source})")
    else:
        try:
            before: dict[str, Any] = json.loads(run.fingerprint)
        except ValueError:
            before = {}
        now = loaded.pinned()
        changed = sorted(
            key for key in now.keys() | before.keys() if now.get(key) != before.get(key)
        )
    if changed:
        raise JournalMismatch(
            f"{path}: {', '.join(changed)} changed since run {run.run_id} started (they define "
            "its targets and package); restore them to finish that run, or pass --new-run to "
            "start another (targets already in a task are not sent again)"
        )
    settings = loaded.settings()
    if run.settings is not None and run.settings != settings:
        before, after = _flatten(json.loads(run.settings)), _flatten(json.loads(settings))
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        log.info("plan edited since the run started", run=run.run_id, changed=changed)
        journal.event(run.run_id, "plan-edited", {"changed": changed})
    journal.set_settings(run.run_id, loaded.plan_sha, settings)


def wave_policy(
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
        already_current=loaded.already_current,
    )


FOREIGN_ROUNDS = 3  # censuses in a row that may still see another process's fresh tasks


def _latest_send(
    session: RunSession, run_id: int | None, *, unsettled_only: bool
) -> tuple[float | None, float]:
    """(the newest create's send time, now) on one clock: the platform's where this process
    has measured it, else ours (a step that has made no call yet must not compare our clock
    with a platform time an earlier process recorded)."""
    journal, clock = session.journal, session.client.clock
    if clock.measured:
        return journal.latest_send(run_id, unsettled_only=unsettled_only), clock.now()
    return journal.latest_send(run_id, unsettled_only=unsettled_only, local=True), time.time()


def _settled_at(session: RunSession, run_id: int | None, *, unsettled_only: bool) -> float | None:
    """When (epoch seconds, our clock) the platform has surely finished with the newest
    create of `run_id` (None: of any run; `unsettled_only`: of those without a clear reply)
    — `request_timeout + settle` after its send — or None when it already has."""
    sent, now = _latest_send(session, run_id, unsettled_only=unsettled_only)
    if sent is None:
        return None
    wait = sent + session.plan.platform.request_timeout + session.plan.execution.settle - now
    return time.time() + wait if wait > 0 else None


async def _until_settled(
    session: RunSession, run_id: int | None, sleep: Sleep, *, unsettled_only: bool
) -> None:
    """Wait until `_settled_at` (no wait when it has passed)."""
    settled = _settled_at(session, run_id, unsettled_only=unsettled_only)
    if settled is not None:
        wait = settled - time.time()
        log.info("waiting for creates in flight to land", seconds=round(wait, 1))
        await sleep(max(0.0, wait))


async def open_census(
    session: RunSession,
    options: RunOptions,
    sleep: Sleep = asyncio.sleep,
    notice: Callable[..., None] | None = None,
) -> CensusView:
    """Before the first create of a run, and on every resume: read the platform's tasks of
    this package and journal every target already in one as adopted — whatever process,
    folder or earlier run created it.

    First the creates this journal left in flight (an earlier run's, with `--new-run`) are
    waited out; then, when the census shows tasks holding our targets that another process
    created moments ago (a killed run's creates may still be landing), it is taken again
    `request_timeout + settle` later, up to FOREIGN_ROUNDS times. Targets in two tasks are
    recorded as duplicates. Raises CensusUndecided (nothing created) when targets are held
    by tasks whose package is unknown and the operator has not decided; JournalError when
    another process keeps creating tasks for these targets."""
    journal, run_id = session.journal, session.run_id
    await _until_settled(session, None, sleep, unsettled_only=True)
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
    targets = census_targets(journal, run_id, session.loaded)
    horizon = session.plan.platform.request_timeout + session.plan.execution.settle
    clock = session.client.clock
    # retry passes sent their devices again on purpose: no duplicates, and where one holds
    # a device it is that device's newest task (its outcome; census.Census.operation_of)
    retried = journal.retry_operations()
    census = await take_census(
        judge, session.operation, session.loaded.fleet.kind, targets, again=retried
    )
    for _ in range(FOREIGN_ROUNDS):
        taken = clock.now()
        fresh = census.newest_foreign
        if fresh is None or fresh < taken - horizon - 1:
            break
        log.warning(
            "tasks holding these targets were created moments ago by another process; "
            "waiting until its creates have surely landed, then looking again",
            seconds=round(horizon, 1),
        )
        await sleep(horizon)
        census = await take_census(
            judge, session.operation, session.loaded.fleet.kind, targets, again=retried
        )
        if census.newest_foreign == fresh:
            break
    else:
        raise JournalError(
            "another process keeps creating tasks for these targets (the newest a moment "
            "ago): stop it or let it finish, then run this plan again"
        )
    if unheld_chunks(session, census):
        # the platform shows none of their targets in a task: wait until every create of
        # this run has surely landed, look again, and send again those it truly lost
        await _until_settled(session, run_id, sleep, unsettled_only=False)
        census = await take_census(
            judge, session.operation, session.loaded.fleet.kind, targets, again=retried
        )
        await settle_lost(session, census)
    journal.record_census(run_id, "opening", census.summary())
    _record_duplicates(journal, run_id, census, options, notice)
    if census.other_package:
        log.warning(
            "targets already in tasks of another package of this model (sent anyway)",
            targets=census.other_package,
        )
    plan_waves = len(session.loaded.waves)  # a retry pass's chunks have a census of their own
    rows = [row for row in journal.chunks(run_id, [PENDING, INTENT]) if row.wave < plan_waves]
    adopt_found(journal, run_id, census, rows, options.unknown_tasks)
    return CensusView(census, judge, options.unknown_tasks)


def unheld_chunks(session: RunSession, census: Census) -> list[ChunkRow]:
    """The run's submitted chunks (its waves', not a retry pass's) none of whose targets the
    census found in any task — the journal says they are in a task, the platform does not."""
    journal, run_id = session.journal, session.run_id
    plan_waves = len(session.loaded.waves)
    return [
        row
        for row in journal.chunks(run_id, [SUBMITTED])
        if row.wave < plan_waves
        and row.operation_id is not None
        and not any(census.operation_of(m) is not None or m in census.unknown for m in row.members)
    ]


async def settle_lost(session: RunSession, census: Census) -> list[ChunkRow]:
    """Chunks the platform does not hold although the journal gave them an operationId —
    it lost the task (its query answers 123009), or that operationId's task holds another
    chunk's targets (a second claim: the platform gave one id to two creates) — go back to
    pending, to be sent again; what was read of such a task stays with the chunk it holds.
    Proof for each: the census (taken after every create has settled) holds none of its
    targets, and a query by key finds no task holding them (one call per chunk, §3.5).
    Raises RunAborted when the platform lost a chunk's task before (a chunk is sent again
    once). Returns the chunks now pending."""
    journal, run_id, client = session.journal, session.run_id, session.client
    kind = session.loaded.fleet.kind
    holders = {
        row.operation_id: row.chunk_id
        for row in journal.chunks(run_id, [SUBMITTED])
        if row.operation_id is not None
        and any(census.operation_of(m) == row.operation_id for m in row.members)
    }
    lost: list[ChunkRow] = []
    for row in unheld_chunks(session, census):
        assert row.operation_id is not None
        try:
            task = await client.get_task(row.operation_id, priority=Priority.SUBMIT)
        except NotFound:
            pass
        else:
            if set(members_of(task, kind)) & set(row.members):
                continue  # the task holds them: not lost (the list is behind)
        if journal.times_lost(run_id, row.chunk_id):
            raise RunAborted(
                f"the platform lost the task of chunk {row.chunk_id} again (operationId "
                f"{row.operation_id}): its {len(row.members)} targets are in no task; nothing "
                "more is sent for it — `rollout status` shows it"
            )
        journal.record_lost(run_id, row.chunk_id, row.operation_id, holders.get(row.operation_id))
        log.warning(
            "the platform holds no task for a chunk the journal had in one; it is sent again",
            chunk=row.chunk_id,
            operation=row.operation_id,
            targets=len(row.members),
            task_holds=holders.get(row.operation_id, "nothing"),
        )
        lost.append(row)
    return lost


def census_targets(journal: Journal, run_id: int, loaded: LoadedPlan) -> dict[str, str]:
    """The census index: the fleet's targets, each mapped to itself — for a group fleet its
    group names and their recorded members (a task naming one of those devices holds it:
    groups.py)."""
    targets = {member: member for member in loaded.fleet.members}
    if loaded.fleet.kind == "groups":
        for devices in journal.group_members(run_id).values():
            targets.update((device, device) for device in devices)
    return targets


def adopt_found(
    journal: Journal, run_id: int, census: Census, rows: list[ChunkRow], unknown: UnknownTasks
) -> None:
    """Journal as adopted every part of these chunks (pending, or in intent) that the census
    found in a task: whole chunks, or parts with the rest left to send."""
    if unknown is UnknownTasks.STOP:
        _refuse_undecided(census, [row.members for row in rows if row.state == PENDING])
    adopted = 0
    for row in rows:
        adoption = plan_adoption(row.as_chunk(), census, unknown, exact_only=row.state == INTENT)
        if adoption is None:
            continue
        if adoption.whole:
            _, operation_id, confirmed = adoption.adopted[0]
            how = CENSUS if confirmed else UNCONFIRMED
            journal.record_adopted(run_id, row.chunk_id, operation_id, [], how=how)
        else:
            journal.adopt_parts(run_id, row.chunk_id, adoption.adopted, adoption.remainder)
        adopted += adoption.targets
    if adopted:
        log.info("census: targets already in a task are not sent again", adopted=adopted)


def _record_duplicates(
    journal: Journal,
    run_id: int,
    census: Census,
    options: RunOptions,
    notice: Callable[..., None] | None = None,
    by_device: dict[str, list[str]] | None = None,
) -> None:
    """Targets in two tasks of this package, and — unless the operator chose to send them —
    in one of this package and one whose package is unknown; with `by_device` (a group
    fleet's closing census), the devices in two tasks too. `notice` (Rollout.notice) tells
    people of targets not recorded as duplicates before."""
    duplicates = census.duplicates(with_unknown=options.unknown_tasks is not UnknownTasks.SEND)
    if by_device is not None:  # counted by device: a group's name says nothing of them
        group_names = set(journal.group_members(run_id))
        duplicates = {t: ops for t, ops in duplicates.items() if t not in group_names}
        duplicates.update(by_device)
    new = set(duplicates) - set(journal.duplicates(run_id))
    journal.record_duplicates(run_id, duplicates)
    if new and notice is not None:
        notice(
            NoticeKind.DUPLICATES_FOUND,
            f"{len(duplicates)} targets are in two or more tasks of this package",
            targets=len(duplicates),
        )
    if duplicates:
        target, operations = next(iter(sorted(duplicates.items())))
        log.error(
            "targets in two tasks of this package",
            targets=len(duplicates),
            example=f"{target} in {', '.join(operations)}",
        )


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
        options: RunOptions | None = None,
    ) -> None:
        self.session = session
        self.observer = observer or Observer()
        self.progress = Progress(total_targets=len(session.loaded.fleet.members))
        self.monitor = Monitor(session, **({"sleep": sleep} if sleep is not None else {}))
        self.monitor.on_poll = lambda _: self.publish()
        self.census = census
        self.options = options or RunOptions()
        self.step = self.options.step
        # throttled replies of earlier processes of this run (journal) + this one's (client)
        self._throttled_before: dict[str, int] = (
            session.journal.recall(session.run_id, "throttled") or {}
        )
        self._polled = False  # step mode: at most one monitor poll per step
        self._fresh = False  # step mode: this step created tasks (none of them can be done)
        session.client.outage.on_begin = self._outage_began

    async def drive(self, follow: bool) -> None:
        rows = {row.wave: row for row in self.session.journal.waves(self.session.run_id)}
        last = len(self.session.loaded.waves) - 1
        for wave in self.session.loaded.waves:
            section = self.session.plan.waves[wave.index] if self.session.plan.waves else None
            if rows[wave.index].gate_state == "passed":
                # its gate passed; chunks the platform lost (settle_lost) are sent again
                await self._send_again([wave.index])
                continue
            log.info("wave", wave=wave.name, targets=len(wave.members))
            if self.session.loaded.fleet.kind == "groups":
                await self._recheck_groups(wave.index, wave.name)
            await self._submit_wave(wave.index)
            self.publish()  # the wave's targets are in tasks now, before any poll
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

    async def _submit_wave(self, wave: int) -> None:
        """Send the wave's pending chunks (and settle those in flight)."""
        section = self.session.plan.waves[wave] if self.session.plan.waves else None
        creates = self.progress.creates
        await Submitter(
            self.session,
            self.observer.progress,
            wave=wave,
            policy=wave_policy(self.session.loaded, section, self.session.client.clock.now()),
            shared_progress=self.progress,
            census=self.census,
            sleep=self.monitor.sleep,
            window=section.window if section is not None else None,
        ).run()
        self._fresh = self._fresh or self.progress.creates > creates
        self.session.journal.add_calls(self.session.run_id, self.session.client.take_call_counts())

    async def _send_again(self, waves: list[int] | None = None) -> bool:
        """Send the chunks of the run's waves (or of `waves`) that are back to pending or
        in flight — after a gate passed, such chunks are only ones the platform lost.
        Returns whether any was."""
        journal, run_id = self.session.journal, self.session.run_id
        plan_waves = len(self.session.loaded.waves)
        todo = sorted(
            {
                row.wave
                for row in journal.chunks(run_id, [PENDING, INTENT])
                if row.wave < plan_waves and (waves is None or row.wave in waves)
            }
        )
        for wave in todo:
            await self._submit_wave(wave)
        return bool(todo)

    async def tasks_lost(self, operations: list[str]) -> None:
        """The monitor's hook: the platform answers 123009 for tasks of ours. Once every
        create has settled, a census and a query by key tell (`settle_lost`): a chunk whose
        targets no task holds is sent again; one the list now shows was only late. Raises
        RunAborted when a task is neither (one line)."""
        journal, run_id = self.session.journal, self.session.run_id
        await _until_settled(self.session, run_id, self.monitor.sleep, unsettled_only=False)
        census = await self._run_census()
        lost = {row.operation_id for row in await settle_lost(self.session, census)}
        chunks = {row.operation_id: row for row in journal.chunks(run_id, [SUBMITTED])}
        for operation_id in operations:
            row = chunks.get(operation_id)
            if operation_id in lost or row is None:
                continue
            if not any(census.operation_of(m) == operation_id for m in row.members):
                raise RunAborted(
                    f"the platform answers 123009 (no such task) for task {operation_id} of "
                    f"chunk {row.chunk_id}, yet its targets are in a task: `rollout status` "
                    "shows the chunk"
                )
        if lost:
            await self._send_again()

    def _judge_for_census(self) -> PackageJudge:
        """The run's package judge (a new one after `--ignore-census`), told every task the
        journal knows and when our creates were sent (samples of the platform's clock)."""
        journal = self.session.journal
        known = journal.known_operations()
        if self.census is not None:
            judge = self.census.judge
            judge.known.update(known)
        else:
            judge = PackageJudge(self.session.client, self.session.package, known)
        judge.created_windows = journal.created_windows()
        return judge

    async def _run_census(self) -> Census:
        """A census of the run's targets now (retry passes' tasks sent theirs on purpose)."""
        journal, run_id = self.session.journal, self.session.run_id
        judge = self._judge_for_census()
        return await take_census(
            judge,
            self.session.operation,
            self.session.loaded.fleet.kind,
            census_targets(journal, run_id, self.session.loaded),
            again=journal.retry_operations(),
        )

    async def _recheck_groups(self, wave: int, name: str) -> None:
        """Before a group wave's creates: read its groups' members again and halt (RunAborted,
        nothing of the wave created) when a member is already in a task of this package —
        sent through a group of an earlier task of the run or by a task naming it
        (groups.find_resent); then record what the wave's groups hold."""
        journal, run_id = self.session.journal, self.session.run_id
        pending = [row for row in journal.chunks(run_id, [PENDING], wave)]
        if not pending:
            return
        names = [group for row in pending for group in row.members]
        resolved = await resolve_groups(self.session.client, names, str(self.session.loaded.path))
        recorded = journal.group_members(run_id)
        waves = {w.index: w.name for w in self.session.loaded.waves}
        earlier: dict[str, str] = {}
        for row in journal.chunks(run_id, [SUBMITTED, INTENT]):
            for group in row.members:
                held_by = f"group {group!r} (wave {waves.get(row.wave, row.wave)!r})"
                for device in recorded.get(group, ()):
                    earlier.setdefault(device, held_by)
        census = self.census.census if self.census is not None else None
        if census is not None:
            for target in census.holder:
                if target not in recorded and target not in earlier:
                    earlier[target] = "a task naming it"
        if earlier:
            judge = (
                self.census.judge
                if self.census is not None
                else PackageJudge(
                    self.session.client, self.session.package, journal.known_operations()
                )
            )
            found, unchecked = await find_resent(judge, self.session.operation, resolved, earlier)
            refuse_resent(name, found, unchecked)
        journal.record_group_members(run_id, {group: resolved[group].devices for group in names})

    GATE_NOTICES = {  # noqa: RUF012
        "passed": NoticeKind.GATE_PASSED,
        "failed": NoticeKind.GATE_FAILED,
        "awaiting-approval": NoticeKind.GATE_AWAITING_APPROVAL,
    }

    def _set_gate(
        self,
        wave: int,
        name: str,
        state: str,
        reason: str,
        soak_until: float | None = None,
        **numbers: int,
    ) -> None:
        """Journal a gate's state with the devices it judged (`finished`, `failed`), show it,
        and tell people when it passed, failed or awaits approval (once per change, not on
        every poll)."""
        journal, run_id = self.session.journal, self.session.run_id
        before = next((r.gate_state for r in journal.waves(run_id) if r.wave == wave), None)
        journal.set_gate(run_id, wave, state, reason, soak_until, **numbers)
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

    def notice_once(self, kind: NoticeKind, text: str, **detail: object) -> None:
        """A run-level notice sent once per state change: the journal keeps the gates' states
        (and approvals) it was last sent for, so a halt that stands — a resume or step
        that finds the same failed gate — is not told again."""
        journal, run_id = self.session.journal, self.session.run_id
        state = [[r.wave, r.gate_state, r.approved_at] for r in journal.waves(run_id)]
        key = f"notice:{kind.value}"
        if journal.recall(run_id, key) == state:
            log.info("notice already sent for this state", notice=kind.value)
            return
        journal.remember(run_id, key, state)
        self.notice(kind, text, **detail)

    def _outage_began(self, reason: str) -> None:
        """The client met the platform out of reach and pauses (execution.outage_budget)."""
        budget = self.session.plan.execution.outage_budget
        self.notice(
            NoticeKind.OUTAGE,
            f"the platform is out of reach ({reason}); the run pauses and tries again for up "
            f"to {budget:g} s, then stops with its state recorded: `rollout resume` goes on",
            reason=reason,
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
        in_tasks = done = 0
        journal, run_id = self.session.journal, self.session.run_id
        for wave in journal.waves(run_id):
            counts = journal.wave_counts(run_id, wave.wave)
            in_tasks += counts.devices if counts.devices is not None else counts.submitted
            done += counts.finished + counts.already_current
        return f"{max(0, in_tasks - done)} of {in_tasks} devices in tasks not finished"

    async def closing_census(self, retry_pass: PassRow | None = None) -> None:
        """After the run's (or a retry pass's) last create, once the platform has surely
        finished with it (`request_timeout + settle`: a lagging list shows it, a late commit
        has landed), any target in two tasks of this package is recorded — never silent.
        Tasks of retry passes sent their devices again on purpose: the run's census ignores
        them, and a pass's census looks only at its own."""
        journal, run_id = self.session.journal, self.session.run_id
        if not journal.needs_closing_census(run_id):
            return  # no create sent since the last one (a step of a pass already took it)
        if self.step:
            settled = _settled_at(self.session, run_id, unsettled_only=False)
            if settled is not None:  # a step never sleeps: the next one takes the census
                raise RunWaiting(
                    "creates in flight land by "
                    f"{datetime.fromtimestamp(settled, UTC).isoformat(timespec='seconds')}"
                    " (request_timeout + settle); the next step takes the closing census",
                    waiting_for="tasks",
                    until=settled,
                )
        await _until_settled(self.session, run_id, self.monitor.sleep, unsettled_only=False)
        judge = self._judge_for_census()
        if retry_pass is None:
            kind = self.session.loaded.fleet.kind
            targets = census_targets(journal, run_id, self.session.loaded)
            since, ignore, again = None, frozenset[str](), journal.retry_operations()
        else:
            kind, targets = "devices", pass_targets(journal, run_id, retry_pass)
            since, again = retry_pass.platform_start, frozenset()
            ignore = journal.operations_outside(run_id, retry_pass.wave)
        census = await take_census(
            judge, self.session.operation, kind, targets, since=since, ignore=ignore, again=again
        )
        summary = census.summary() | ({"pass": retry_pass.pass_no} if retry_pass else {})
        by_device: dict[str, list[str]] | None = None
        if kind == "groups":  # a group fleet's duplicates are devices, not group names
            by_device = await device_duplicates(judge, census, journal.group_members(run_id))
            summary["devices_in_two_tasks"] = len(by_device)
        journal.record_census(run_id, "closing", summary)
        _record_duplicates(journal, run_id, census, self.options, self.notice, by_device)
        if retry_pass is None and await settle_lost(self.session, census):
            # the journal had them in tasks the platform does not hold: sent again (once),
            # then this census again
            await self._send_again()
            await self.closing_census()

    async def _judge(self, wave: int, gate: GateSection) -> tuple[Verdict, str, WaveCounts]:
        """The gate's verdict on the journal's counts. Successes whose version is not checked
        yet count as not finished; when counting them as upgrades would give another verdict,
        they are read (`learn_successes`) and the gate judges again. A verdict that would
        decide while failed devices of the wave are not all known is judged again once they
        are: an already-current device is counted as failed by the platform's counters."""
        journal, run_id = self.session.journal, self.session.run_id
        counts = journal.wave_counts(run_id, wave)
        verdict, reason = evaluate(gate, counts)
        if counts.unverified:
            hoped, _ = evaluate(gate, replace(counts, unverified=0))
            if hoped is not verdict and await self.monitor.learn_successes(wave):
                counts = journal.wave_counts(run_id, wave)
                verdict, reason = evaluate(gate, counts)
        if verdict is not Verdict.WAIT and await self.monitor.learn_failures(wave):
            counts = journal.wave_counts(run_id, wave)
            verdict, reason = evaluate(gate, counts)
        return verdict, reason, counts

    async def _gate(self, wave: int, name: str, section: WaveSection) -> None:
        gate = section.gate
        interval = self.session.plan.monitor.poll_interval
        seen = self.session.journal.wave_counts(self.session.run_id, wave)
        if not self.step and (seen.tasks == 0 or seen.final_tasks < seen.tasks):
            await self.monitor.sleep(interval)  # tasks created a moment ago cannot be done
        journal, run_id = self.session.journal, self.session.run_id
        while True:
            await self._poll()
            verdict, reason, counts = await self._judge(wave, gate)
            numbers = {"finished": counts.finished, "failed": counts.real_failed}
            row = next(r for r in journal.waves(run_id) if r.wave == wave)
            approval = journal.approval(run_id, wave)
            if (
                verdict is Verdict.FAIL
                and approval is not None
                and approval.covers(False, **numbers)
            ):
                # the approval overrides the failure share it was given for, nothing else: the
                # wave still has to reach min_finished and soak (failures watched meanwhile)
                verdict, rest = evaluate(gate.model_copy(update={"max_failed": None}), counts)
                reason = (
                    f"{rest}; its failures approved by {approval.by} (at {approval.failed} "
                    f"of {approval.finished} failed)"
                )
            if verdict is Verdict.FAIL:
                self._set_gate(wave, name, "failed", reason, **numbers)
                again = (
                    f" — beyond what {approval.by} approved: {approval.rule()}"
                    if approval is not None and approval.state == "failed"
                    else ""
                )
                raise RunHalted(
                    f"wave {name!r} failed its gate: {reason}{again}. Nothing more was "
                    f"submitted. To go on anyway: rollout approve PLAN --wave {name}, then "
                    + ("the next step goes on" if self.step else "rollout resume")
                )
            if verdict is Verdict.WAIT:
                self._set_gate(wave, name, "waiting", reason, **numbers)
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
                    self._set_gate(wave, name, "soaking", reason, soak_until, **numbers)
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
            if gate.approval and approval is None:
                self._set_gate(wave, name, "awaiting-approval", reason, **numbers)
                if self.step:
                    raise RunWaiting(
                        _approval_message(name, reason, step=True), waiting_for="approval"
                    )
                raise RunHalted(_approval_message(name, reason))
            self._set_gate(wave, name, "passed", reason, **numbers)
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
            check_same_inputs(loaded, existing, path, journal)
            passes = journal.passes(existing.run_id)
            if passes and passes[-1].status in PASS_UNFINISHED:
                # its chunks have a census of their own (passes.py): `rollout resume` routes
                # to `rollout retry`, which finishes the pass
                raise RunAborted(
                    f"retry pass {passes[-1].pass_no} of run {existing.run_id} is "
                    f"{passes[-1].status}: `rollout retry PLAN` finishes it"
                )
            if existing.status == COMPLETED:
                _completed_already(journal, existing)
                return RunResult(existing.run_id, path, journal.counts(existing.run_id), True)
        stepping_on = (
            options.step and existing is not None and continuing and existing.status == WAITING
        )
        if stepping_on:
            assert existing is not None
            _approval_pending(journal, existing.run_id)
        if options.step and existing is not None and continuing and existing.status == HALTED:
            _halt_stands(journal, existing)
        async with (
            notifying(loaded, observer) as watching,
            platform_client(loaded, options.state_dir, "run", path) as client,
        ):
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
                groups = (
                    await check_groups(loaded, client, package)
                    if loaded.fleet.kind == "groups"
                    else {}
                )
                run_id = start_run(journal, loaded)
                if groups:
                    journal.record_group_members(
                        run_id, {name: group.devices for name, group in groups.items()}
                    )
                    journal.event(
                        run_id,
                        "groups-resolved",
                        {name: len(group.devices) for name, group in groups.items()},
                    )
            client.pacer.describe(f"run {loaded.plan.name} (run {run_id})")
            journal.set_package(run_id, package.file_id, package.version)
            journal.remember(run_id, "package", package.model_dump(by_alias=True))
            journal.set_status(run_id, RUNNING)
            requeued = journal.requeue_failed(run_id)
            if requeued:
                log.info("chunks refused for a plan-level reason are sent again", chunks=requeued)
            session = RunSession(loaded, journal, client, run_id, package)
            follow = loaded.plan.monitor.follow if options.follow is None else options.follow
            rollout = Rollout(session, watching, sleep, None, options)
            rollout.monitor.on_lost = rollout.tasks_lost
            rollout.publish()
            try:
                if stepping_on and not requeued:
                    # the last step ended cleanly: its census still stands, as in a run
                    judge = PackageJudge(
                        client,
                        package,
                        journal.known_operations(),
                        created_windows=journal.created_windows(),
                    )
                    rollout.census = CensusView(None, judge, options.unknown_tasks)
                else:
                    rollout.census = await open_census(
                        session, options, sleep or asyncio.sleep, rollout.notice
                    )
                await rollout.drive(follow)
            except RunWaiting as exc:
                _record_stop(journal, run_id, WAITING, str(exc))
                raise
            except (RunAborted, PlatformCallError) as exc:
                _record_stop(journal, run_id, ABORTED, str(exc))
                rollout.notice(NoticeKind.RUN_ABORTED, f"run stopped: {_one_line(exc)}")
                raise
            except RunHalted as exc:
                _record_stop(journal, run_id, HALTED, str(exc))
                rollout.notice_once(NoticeKind.RUN_HALTED, f"halted at a gate: {exc}")
                raise
            except BaseException:
                _record_stop(journal, run_id, INTERRUPTED, "interrupted; in-flight state recorded")
                raise
            finally:
                with contextlib.suppress(JournalError, sqlite3.Error):  # a full disk: the
                    journal.add_calls(run_id, client.take_call_counts())  # first error tells
                    rollout.publish()
            try:
                _finish(journal, run_id, COMPLETED if follow else SUBMITTED_ALL)
            except RunAborted as exc:
                rollout.notice(NoticeKind.RUN_ABORTED, f"run stopped: {exc}")
                raise
            except DuplicatesFound:
                raise  # told when the census found them
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


def _record_stop(journal: Journal, run_id: int, status: str, reason: str) -> None:
    """Record why the run stopped — unless the journal itself is what failed (a full disk):
    then the error that stopped the run is the one to show, and `resume` needs no status."""
    with contextlib.suppress(JournalError):
        journal.set_status(run_id, status, reason)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _completed_already(journal: Journal, run: RunRow) -> None:
    """A completed run is said so, from the journal alone; its duplicates still exit 5."""
    log.debug(  # the command says so once, in its own words (cli.py)
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


def _approval_message(name: str, reason: str, step: bool = False) -> str:
    """What a gate awaiting approval asks for; in step mode the scheduler's next step goes
    on once approved (no `resume` to type)."""
    then = "the next step goes on" if step else "then rollout resume"
    return (
        f"wave {name!r} passed its gate ({reason}) and waits for approval: "
        f"rollout approve PLAN --wave {name}; {then}"
    )


def _approval_pending(journal: Journal, run_id: int) -> None:
    """Step mode: a gate that only waits for an operator's approval needs no call."""
    for row in journal.waves(run_id):
        if row.gate_state == "passed":
            continue
        if row.gate_state == "awaiting-approval" and journal.approval(run_id, row.wave) is None:
            raise RunWaiting(
                _approval_message(row.name, row.gate_reason or "passed", step=True),
                waiting_for="approval",
            )
        return


def _halt_stands(journal: Journal, run: RunRow) -> None:
    """Step mode on a halted run: while a failed gate has no approval, or a gate awaiting
    approval still awaits it, nothing a step could do changes that — no call, no notice
    (it was sent when the run halted), the same halt (exit 4) or approval wait (75)."""
    for row in journal.waves(run.run_id):
        if row.gate_state == "passed":
            continue
        if journal.approval(run.run_id, row.wave) is not None:
            return  # approved since: the step goes on
        if row.gate_state == "failed":
            raise RunHalted(run.stop_reason or f"wave {row.name!r} failed its gate")
        if row.gate_state == "awaiting-approval":
            raise RunWaiting(
                _approval_message(row.name, row.gate_reason or "passed", step=True),
                waiting_for="approval",
            )
        return


def _finish(journal: Journal, run_id: int, status: str) -> None:
    """Exit 0 only when every target is in a task (sent or adopted) or quarantined, no chunk
    holds its task only by a second claim on another chunk's operationId, and no target is
    in two tasks of this package."""
    claims = journal.second_claims(run_id)
    if claims:
        reason = (
            f"{claims} chunks are in a task only by the operationId of another chunk's task "
            "(a second claim: the platform gave one id to two creates); `rollout resume` "
            "settles them"
        )
        journal.set_status(run_id, ABORTED, reason)
        raise RunAborted(reason)
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
    state_dir: Path | None = None,
    purpose: str = "watch",
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
        async with platform_client(loaded, state_dir, purpose, path) as client:
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


def last_gate(loaded: LoadedPlan) -> tuple[WaveSection | None, GateSection]:
    """The plan's last wave (its window applies to a retry pass) and its last gate — the gate
    of the wave before the last; a plan without waves has the gate that passes at once."""
    waves = loaded.plan.waves
    if not waves:
        return None, GateSection()
    return waves[-1], waves[-2].gate if len(waves) > 1 else GateSection()


def judge_pass(journal: Journal, run_id: int, retry_pass: PassRow, loaded: LoadedPlan) -> None:
    """A followed retry pass (its tasks final) judged by the plan's last gate: the verdict is
    journaled on the pass's wave; RunHalted (exit 4) when it fails."""
    _, gate = last_gate(loaded)
    counts = journal.wave_counts(run_id, retry_pass.wave)
    verdict, reason = evaluate(gate, counts)
    numbers = {"finished": counts.finished, "failed": counts.real_failed}
    if verdict is Verdict.FAIL:
        journal.set_gate(run_id, retry_pass.wave, "failed", reason, **numbers)
        raise RunHalted(f"retry pass {retry_pass.pass_no} failed the plan's last gate: {reason}")
    journal.set_gate(run_id, retry_pass.wave, "passed", reason, **numbers)


def _judge_submitted_pass(journal: Journal, run_id: int, loaded: LoadedPlan) -> None:
    """After `watch` followed every task: a retry pass submitted without following is judged
    now, as `retry` would have once it followed (docs/resume-and-reconciliation.md)."""
    passes = journal.passes(run_id)
    if not passes or passes[-1].status != SUBMITTED_ALL or journal.unfinished_tasks(run_id):
        return
    try:
        judge_pass(journal, run_id, passes[-1], loaded)
    except RunHalted as exc:
        journal.set_pass_status(run_id, passes[-1].pass_no, HALTED, str(exc))
        raise
    journal.set_pass_status(run_id, passes[-1].pass_no, COMPLETED)


async def watch(
    loaded: LoadedPlan,
    journal_file: Path | None,
    *,
    sleep: Sleep | None = None,
    state_dir: Path | None = None,
    observer: Observer | None = None,
) -> RunResult:
    """Follow the journal's run to the end without submitting anything."""
    async with _existing_run(loaded, journal_file, sleep, state_dir, "watch", observer) as (
        journal,
        run_id,
        rollout,
    ):
        await rollout.monitor.follow()
        _judge_submitted_pass(journal, run_id, loaded)
        return RunResult(run_id, journal.path, journal.counts(run_id))


async def refresh(
    loaded: LoadedPlan, journal_file: Path | None, state_dir: Path | None = None
) -> None:
    """One monitor poll, so a report shows the platform's latest word (costs calls)."""
    async with _existing_run(loaded, journal_file, None, state_dir, "report") as (_, _, rollout):
        await rollout.monitor.poll()


def pass_targets(journal: Journal, run_id: int, retry_pass: PassRow) -> dict[str, str]:
    """A retry pass's devices, each mapped to itself (the census index keys)."""
    return {
        device: device
        for row in journal.chunks(run_id, wave=retry_pass.wave)
        if row.state != SPLIT
        for device in row.members
    }
