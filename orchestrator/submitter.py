"""The exactly-once submitter: one create per chunk, journaled, reconciled, never blindly retried.

For each chunk, in order, under the shared pacing:

1. commit the intent to the journal (durably), then send the create;
2. created → record the operationId;
3. certainly not created (4xx, connection refused) → per cause: a device-level refusal
   (123002 unknown device, 123016 model mismatch) bisects the chunk until the offending
   devices are isolated and quarantined (below); a plan-level refusal stops the run (the
   chunk is sent again when the run is resumed); a connection that never opened is sent
   again once the platform answers (an outage, ridden out up to `execution.outage_budget`);
   a connection that cannot work as configured (unknown host, untrusted certificate, TLS
   against plain HTTP) stops the run at once;
4. may have been created (timeout, reset, 5xx, or an intent found on resume) → *settle*:
   nothing is concluded until the platform has surely finished with the create — the first
   look-up happens `request_timeout + settle` after the intent's send time (the journal
   holds it, so a resumed run waits for young intents too), and "absent" needs a second
   look-up `settle` later that agrees. A look-up pages the task list filtered by operation
   type and the chunk's first deviceId, and keeps the tasks that hold exactly the chunk's
   targets and carry our package (`census.PackageJudge`); a task whose package the platform
   does not tell is taken as ours only when its createTime, on the platform's measured
   clock, is not older than our first intent. Found → adopt the newest match; absent →
   what the run's census found of the chunk is adopted, the rest is sent again.

A run of identical failures stops the run rather than burn the budget. Refusals that are not
the run's fault never count: 1010005 (another process or host replaced the app's token) and
1010009 (another client spent the app's budget), also when a login or refresh drew them —
they did not act, the chunk is simply sent again; device-level refusals, the bisection's own
work, bounded on its own; transient faults (the platform down: refused connections, gateway
502/503/504) — the worker waits until the platform answers again, and the outage's budget
decides when to stop.

**Bisection.** A chunk refused for a device-level cause is split in halves (`planner.bisect`);
the left half is sent first. Accepted → every offending target of the parent is in the right
half, which is split again *without being sent* (it would be refused); refused → the right
half is sent too, and each refused half is split in turn. A single target that is refused is
quarantined with the platform's code; a single target is always sent itself, so every
quarantine rests on the platform's own refusal of that target. The cost, beyond the chunk's
own create, is at most two creates per refused part that is split:
`planner.bisection_bound(n, b) = 2 · Σ_{l < ⌈log2 n⌉} min(b, 2^l) ≤ 2 · b · log2(256)` for b
offending targets among n — 12.5 on average and 16 at most for one bad target in 256, fewer
per target when bad targets crowd a chunk. `execution.max_bisect_share` caps the creates
spent bisecting at that multiple of the run's planned creates (one per chunk); past it the
run stops (exit 1) with the reason and the count quarantined so far.

**The package's fault, not a device's.** 123002 means "device *or package file* not found"
(platform-api.md §3.4): a package deleted during the run (§3.3) makes the platform refuse
every create with it, and bisection would quarantine good meters. So before a chunk refused
with a code in `PACKAGE_CODES` is bisected, and before a single target is quarantined for
one, the package is looked up once (`GET /category/{fileId}`, §3.2). Gone (404/123002) → the
run stops at once (exit 1) with one line naming the fix, quarantining nothing; there → the
refusal is the devices'. A look-up that found the package clears every refusal of a create
sent before it (a deleted package never comes back under its fileId), so concurrent refusals
share one call: at most one call per refused chunk and per quarantined target, beyond the
bisection's creates. (123016 names a device whose model is not the package's; a deleted
package answers 123002 first, §3.4's order, so 123016 is never the package's fault.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog

from .census import Census, Match, PackageJudge, UnknownTasks, plan_adoption
from .errors import (
    AuthFailed,
    BadRequest,
    CannotConnect,
    InputError,
    InvalidToken,
    PlatformCallError,
    PlatformError,
    PlatformUnreachable,
    RunAborted,
    Throttled,
)
from .journal_schema import FAILED, INTENT, PENDING
from .loaded_plan import LoadedPlan
from .northbound import (
    CreateTaskRequest,
    ExecuteType,
    NorthboundClient,
    Package,
    Policy,
    Priority,
    Targets,
    Task,
)
from .northbound.clock import parse_platform_time
from .plan import PLATFORM_TIME_FORMAT, WindowSection
from .planner import Chunk, bisect, chunk_count, is_bisection_part
from .session import RunSession, operation_type

log = structlog.get_logger("orchestrator.submitter")

DEVICE_LEVEL_CODES = frozenset({"123002", "123016"})
PACKAGE_CODES = frozenset({"123002"})  # device-level refusals that a missing package also gives
START_LEAD = 2.0  # seconds: a custom window's start must not have passed when the create arrives
MIN_WINDOW_SECONDS = 300.0
RETRY_PAUSE = 1.0
# the app's token or budget taken by another process or client: not a sign the run is failing
NOT_THE_RUNS_FAULT = (InvalidToken, Throttled)


@dataclass
class Progress:
    total_targets: int
    done_targets: int = 0
    quarantined: int = 0
    creates: int = 0
    adopted: int = 0
    bisect_creates: int = 0  # creates of bisected parts (the run's, from the journal)
    started: float = field(default_factory=time.monotonic)


ProgressHook = Callable[[Progress], None]
Sleep = Callable[[float], Awaitable[None]]


@dataclass
class CensusView:
    """The run's census, shared by the waves' submitters: what the platform already held."""

    census: Census | None  # None: the census was skipped on the operator's order
    judge: PackageJudge
    unknown: UnknownTasks = UnknownTasks.STOP


async def resolve_package(loaded: LoadedPlan, client: NorthboundClient) -> Package:
    """Find the plan's package on the platform and check it fits the plan (before any create)."""
    plan, source = loaded.plan, str(loaded.path)
    operation = operation_type(plan.operation)
    firmware = plan.firmware
    if firmware.file_id is not None:
        try:
            package = await client.get_package(firmware.file_id)
        except BadRequest as exc:
            raise InputError(
                source,
                "firmware.file_id",
                f"the platform has no package {firmware.file_id} ({exc.code})",
            ) from None
    else:
        page = await client.list_packages(
            file_type=operation.package_type,
            device_type=firmware.device_type,
            model=firmware.model,
            manufacturer=firmware.manufacturer,
            version=firmware.version,
        )
        if page.total != 1:
            found = "no package" if page.total == 0 else f"{page.total} packages"
            raise InputError(
                source, "firmware", f"{found} match version/device_type/model/manufacturer"
            )
        package = page.items[0]
    if package.file_type and package.file_type != operation.package_type:
        raise InputError(
            source,
            "operation",
            f"package {package.file_id} is a {package.file_type}, "
            f"not for a {plan.operation.value} upgrade",
        )
    return package  # a group fleet's type/model/manufacturer: groups.refuse_other_model


def settle_wait(session: RunSession, sent: tuple[float, float | None]) -> float:
    """Seconds until the platform has surely finished with a create sent at `sent` (our clock,
    the platform's or None): `request_timeout + settle` after it, compared on the platform's
    measured clock when the send has a platform time — a step of our clock between the
    process that sent and the one that settles moves nothing."""
    horizon = session.plan.platform.request_timeout + session.plan.execution.settle
    local, on_platform = sent
    clock = session.client.clock
    if on_platform is not None and clock.measured:
        return on_platform + horizon - clock.now()
    return local + horizon - time.time()


class Submitter:
    """Submits the pending chunks of one wave (or of the whole run when `wave` is None)."""

    def __init__(
        self,
        session: RunSession,
        progress: ProgressHook | None = None,
        *,
        wave: int | None = None,
        policy: dict[str, object] | None = None,
        shared_progress: Progress | None = None,
        census: CensusView | None = None,
        sleep: Sleep = asyncio.sleep,
        progress_of_wave: bool = False,
        window: WindowSection | None = None,
    ) -> None:
        """`progress_of_wave`: the progress counts this wave's targets only (a retry pass),
        not the whole run's."""
        self.session = session
        self._window = window  # a wave's daily window: each create takes its next occurrence
        self.wave = wave
        self._progress_wave = wave if progress_of_wave else None
        self._progress_hook = progress
        self.progress = shared_progress or Progress(total_targets=len(session.loaded.fleet.members))
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._error: BaseException | None = None
        self._settling: set[asyncio.Task[bool]] = set()
        self._last_failure: str | None = None
        self._identical_failures = 0
        # left half of a bisected chunk → its right half, held until the left's outcome
        self._held: dict[str, Chunk] = {}
        execution = session.plan.execution
        self._bisect_cap = int(execution.max_bisect_share * chunk_count(session.loaded.waves))
        self._policy = Policy.model_validate(policy or session.plan.policy.wire())
        self._census = census or CensusView(None, PackageJudge(session.client, session.package, {}))
        self._sleep = sleep
        # monotonic time a package look-up that found the package started: refusals of
        # creates sent before it are the devices' own (`_check_package`)
        self._package_seen = float("-inf")
        self._package_lock = asyncio.Lock()

    # ---- the run -----------------------------------------------------------------------------
    async def run(self) -> None:
        counts = self.session.journal.counts(self.session.run_id, self._progress_wave)
        self.progress.done_targets = counts.get("targets_submitted", 0) + counts.get(
            "targets_quarantined", 0
        )
        self.progress.quarantined = counts.get("targets_quarantined", 0)
        self.progress.bisect_creates = self.session.journal.bisect_creates(self.session.run_id)
        self._report()
        for row in self.session.journal.chunks(self.session.run_id, [INTENT], self.wave):
            self._start_settling(row.as_chunk())
        for row in self.session.journal.chunks(self.session.run_id, [PENDING], self.wave):
            self._enqueue(row.as_chunk())
        if self._outstanding == 0:
            return
        workers = [
            asyncio.create_task(self._worker())
            for _ in range(self.session.plan.execution.concurrency)
        ]
        try:
            await self._idle.wait()
        finally:
            for task in [*workers, *self._settling]:
                task.cancel()
            await asyncio.gather(*workers, *self._settling, return_exceptions=True)
        if self._error is not None:
            raise self._error

    def _enqueue(self, chunk: Chunk) -> None:
        self._outstanding += 1
        self._idle.clear()
        self._queue.put_nowait(chunk)

    def _finished(self) -> None:
        self._outstanding -= 1
        if self._outstanding == 0:
            self._idle.set()

    async def _worker(self) -> None:
        while True:
            chunk = await self._queue.get()
            if not await self._guarded(self._submit(chunk)):
                return

    async def _guarded(self, work: Awaitable[None]) -> bool:
        """One chunk's work; done → counted finished (True), failed → the run stops: run()
        re-raises the error (False)."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._abort_with(exc)
            return False
        self._finished()
        return True

    def _abort_with(self, exc: BaseException) -> None:
        # wake run(): it cancels the other workers and re-raises this error
        if self._error is None:
            self._error = exc
            log.error("stopping the run", error=str(exc))
        self._idle.set()

    def _start_settling(self, chunk: Chunk) -> None:
        """Settle an ambiguous chunk in the background: the workers go on meanwhile."""
        self._outstanding += 1
        self._idle.clear()
        task = asyncio.create_task(self._guarded(self._settle(chunk)))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    # ---- one chunk ---------------------------------------------------------------------------
    def _request(self, chunk: Chunk) -> CreateTaskRequest:
        if chunk.kind == "devices":
            targets = Targets(devices=list(chunk.members))
        else:
            fleet = self.session.plan.fleet
            targets = Targets(
                device_groups=list(chunk.members),
                device_type=fleet.device_type,
                model=fleet.model,
                manufacturer=fleet.manufacturer,
            )
        return CreateTaskRequest(
            file_id=self.session.package.file_id, targets=targets, policy=self._current_policy()
        )

    def _current_policy(self) -> Policy:
        """The policy for a create sent now. A custom window whose start has passed on the
        platform's clock (a long wave at 100 calls a minute, a resumed run) would draw 123033:
        its start moves to just after the platform's now — plus the measured uncertainty of
        that clock and `execution.clock_skew` — as long as 5 minutes of the window remain;
        after that the window is over and the run stops rather than send what the platform
        refuses. A wave's daily window instead takes its next occurrence that still has 5
        real minutes (DST-short nights skipped: `WindowSection.next_window`)."""
        policy = self._policy
        if policy.execute_type is not ExecuteType.CUSTOM or policy.start_time is None:
            return policy
        clock = self.session.client.clock
        uncertainty = clock.uncertainty if clock.measured else 0.0
        now = clock.now() + START_LEAD + uncertainty + self.session.plan.execution.clock_skew
        if self._window is not None:
            begin, end_at = self._window.next_window(
                datetime.fromtimestamp(now, UTC), lead=timedelta(0)
            )
            return policy.model_copy(
                update={
                    "start_time": begin.strftime(PLATFORM_TIME_FORMAT),
                    "end_time": end_at.strftime(PLATFORM_TIME_FORMAT),
                }
            )
        start = parse_platform_time(policy.start_time) or now
        end = parse_platform_time(policy.end_time or "") or now
        if start >= now:
            return policy
        if end - now < MIN_WINDOW_SECONDS:
            raise RunAborted(
                f"the custom window ending {policy.end_time} (platform time) has less than 5 "
                "minutes left; the platform would refuse it (123033/123034): give the wave a "
                "later window"
            )
        start_text = datetime.fromtimestamp(now, UTC).strftime(PLATFORM_TIME_FORMAT)
        return policy.model_copy(update={"start_time": start_text})

    async def _submit(self, chunk: Chunk) -> None:
        attempt: int | None = None
        bisecting = is_bisection_part(chunk.chunk_id)
        sent = time.monotonic()

        def journal_intent() -> None:
            nonlocal attempt, sent
            sent = time.monotonic()
            clock = self.session.client.clock
            on_platform = clock.now() if clock.measured else None
            if attempt is None:
                if bisecting:  # judged when the create has its slot: workers do not race past it
                    self._check_bisect_cap()
                    self.progress.bisect_creates += 1
                attempt = self.session.journal.record_intent(
                    self.session.run_id, chunk.chunk_id, on_platform
                )
            else:  # sent again after a refusal that did not act (throttled, token): new time
                self.session.journal.touch_intent(attempt, on_platform)

        try:
            operation_id = await self.session.client.create_upgrade_task(
                self.session.operation, lambda: self._request(chunk), before_send=journal_intent
            )
        except (CannotConnect, PlatformUnreachable) as error:
            if attempt is not None:  # never sent: nothing to reconcile
                self.session.journal.record_failed_attempt(
                    self.session.run_id,
                    chunk.chunk_id,
                    attempt,
                    "not-sent",
                    PENDING,
                    None,
                    type(error).__name__,
                    str(error),
                )
            raise
        except PlatformCallError as error:
            if attempt is None:
                await self._never_sent(chunk, error)
            else:
                await self._failed(chunk, attempt, error, sent)
            return
        assert attempt is not None
        self.session.journal.record_created(
            self.session.run_id, chunk.chunk_id, attempt, operation_id
        )
        self._identical_failures = 0
        self.progress.creates += 1
        self._done(len(chunk.members))
        # the left half of a refused chunk was accepted: its right half holds the refusal
        self._release(chunk.chunk_id, refused_there=True)
        log.debug("chunk submitted", chunk=chunk.chunk_id, operation_id=operation_id)

    def _check_bisect_cap(self) -> None:
        if self.progress.bisect_creates < self._bisect_cap:
            return
        share = self.session.plan.execution.max_bisect_share
        planned = chunk_count(self.session.loaded.waves)
        raise RunAborted(
            f"bisection has spent {self.progress.bisect_creates} creates isolating refused "
            f"targets (execution.max_bisect_share = {share:g} × {planned} planned creates); "
            f"{self.progress.quarantined} targets quarantined so far "
            "(`rollout status` lists them). Too many targets are refused: remove unknown or "
            "wrong-model devices from the fleet file and start with --new-run, or raise "
            "execution.max_bisect_share and `rollout resume`"
        )

    async def _never_sent(self, chunk: Chunk, error: PlatformCallError) -> None:
        """The create never left (the login before it failed): nothing to journal."""
        if isinstance(error, AuthFailed):
            raise RunAborted(
                f"the platform refused the app credentials ({error.code}); "
                "check platform.app_id and the secret"
            )
        if error.transient:
            await self.session.client.wait_until_reachable()
        else:
            code = error.code if isinstance(error, PlatformError) else type(error).__name__
            if not isinstance(error, NOT_THE_RUNS_FAULT):
                self._count_failure(code, str(error))
            await self._sleep(RETRY_PAUSE)
        self._enqueue(chunk)

    async def _failed(
        self, chunk: Chunk, attempt: int, error: PlatformCallError, sent: float
    ) -> None:
        status = error.status if isinstance(error, PlatformError) else None
        code = error.code if isinstance(error, PlatformError) else type(error).__name__
        detail = str(error)
        device_level = isinstance(error, BadRequest) and (
            (code in DEVICE_LEVEL_CODES and chunk.kind == "devices")
            or (code == "123002" and chunk.kind == "groups")
        )
        if error.may_have_taken_effect:
            outcome, state = "ambiguous", INTENT
        elif isinstance(error, BadRequest) and not device_level:
            outcome, state = "refused", FAILED
        elif isinstance(error, AuthFailed | BadRequest):
            outcome, state = "refused", PENDING
        else:  # certainly not sent: connect refused, TLS
            outcome, state = "not-sent", PENDING
        self.session.journal.record_failed_attempt(
            self.session.run_id, chunk.chunk_id, attempt, outcome, state, status, code, detail
        )
        if isinstance(error, AuthFailed):
            raise RunAborted(
                f"the platform refused the app credentials ({code}); "
                "check platform.app_id and the secret"
            )
        if outcome == "refused" and not device_level:
            raise RunAborted(
                f"the platform refused chunk {chunk.chunk_id} for a plan-level "
                f"reason: {code} {error.desc if isinstance(error, PlatformError) else ''}"
                "; fix the cause, then `rollout resume` sends it again"
            )
        if device_level:
            if code in PACKAGE_CODES and (
                len(chunk.members) == 1 or not is_bisection_part(chunk.chunk_id)
            ):
                await self._check_package(chunk, code, sent)  # the refused chunk stays pending
            # the bisection's own work, bounded by max_bisect_share: not a failure streak
            assert isinstance(error, PlatformError)
            self._release(chunk.chunk_id, refused_there=False)
            self._isolate(chunk, code, error.desc)
            return
        # the platform down, or another client's doing, is not a failure of this run
        if not error.transient and not isinstance(error, NOT_THE_RUNS_FAULT):
            self._count_failure(code, detail)
        # the held right half of a bisected chunk is sent: nothing is known of this left half
        self._release(chunk.chunk_id, refused_there=False)
        if error.may_have_taken_effect:
            log.warning(
                "create outcome unknown; settling before looking it up",
                chunk=chunk.chunk_id,
                error=detail,
            )
            self._start_settling(chunk)
        elif not error.transient:
            await self._sleep(RETRY_PAUSE)
            self._enqueue(chunk)
        if error.transient:  # wait for the platform before sending anything more into it
            await self.session.client.wait_until_reachable()
            if not error.may_have_taken_effect:
                self._enqueue(chunk)

    async def _check_package(self, chunk: Chunk, code: str, sent: float) -> None:
        """Before bisecting a chunk refused with `code` (or quarantining its one target): is
        the package still on the platform? One `GET /category/{fileId}` (§3.2), unless a
        look-up that found it started after this create was sent. Raises RunAborted when the
        package is gone (404/123002): nothing is quarantined, the chunk stays to send."""
        async with self._package_lock:
            if sent < self._package_seen:
                return
            started = time.monotonic()
            package = self.session.package
            try:
                await self.session.client.get_package(package.file_id)
            except BadRequest as exc:
                if exc.code != "123002":
                    raise
                raise RunAborted(
                    f"the package {package.file_id} (version {package.version}) is no longer "
                    f"on the platform (GET /category/{package.file_id}: {exc.code}; deleted "
                    f"during the run?), so every create is refused ({code} for chunk "
                    f"{chunk.chunk_id}); nothing was quarantined. Upload the package again, "
                    "point the plan's [firmware] at it, then `rollout run PLAN --new-run` "
                    "(devices already in a task are adopted, not sent)"
                ) from None
            self._package_seen = started

    def _count_failure(self, code: str | None, detail: str) -> None:
        if code == self._last_failure:
            self._identical_failures += 1
        else:
            self._last_failure, self._identical_failures = code, 1
        limit = self.session.plan.execution.stop_after_identical_failures
        if self._identical_failures >= limit:
            raise RunAborted(
                f"{self._identical_failures} identical failures in a row ({code}): {detail}"
            )

    def _isolate(self, chunk: Chunk, code: str, reason: str) -> None:
        """A chunk refused for a device-level cause: quarantine its single target, or split it
        and send the left half first (its right half is held until the left's outcome)."""
        if len(chunk.members) == 1:
            self.session.journal.quarantine(
                self.session.run_id, chunk.chunk_id, chunk.members[0], code, reason
            )
            self.progress.quarantined += 1
            self._done(1)
            log.warning("target quarantined", target=chunk.members[0], code=code)
            return
        left, right = bisect(chunk)
        self.session.journal.split(self.session.run_id, chunk.chunk_id, (left, right))
        self._hold(left, right)

    def _hold(self, left: Chunk, right: Chunk) -> None:
        self._outstanding += 1  # the right half: work still to do
        self._idle.clear()
        self._held[left.chunk_id] = right
        self._enqueue(left)

    def _release(self, left_id: str, *, refused_there: bool) -> None:
        """The left half's outcome is known: send its held right half — or, when the left was
        accepted, split the right half without sending it (the parent's refusal lies there).
        A single target is always sent, so its quarantine rests on its own refusal."""
        right = self._held.pop(left_id, None)
        if right is None:
            return
        if refused_there and len(right.members) > 1:
            left2, right2 = bisect(right)
            self.session.journal.split(
                self.session.run_id, right.chunk_id, (left2, right2), inferred=True
            )
            self._held[left2.chunk_id] = right2  # carries the right half's outstanding count
            self._enqueue(left2)
            return
        self._queue.put_nowait(right)  # counted as outstanding since it was held

    # ---- settling an ambiguous create --------------------------------------------------------
    async def _settle(self, chunk: Chunk) -> None:
        """Look the chunk up only once the platform has surely finished with its create;
        "absent" needs two look-ups `settle` apart."""
        journal, run_id = self.session.journal, self.session.run_id
        execution = self.session.plan.execution
        wait = settle_wait(
            self.session, journal.last_intent(run_id, chunk.chunk_id) or (time.time(), None)
        )
        if wait > 0:
            log.info("settling", chunk=chunk.chunk_id, seconds=round(wait, 1))
            await self._sleep(wait)
        found = await self.find_existing(chunk)
        if not found:
            await self._sleep(execution.settle)
            found = await self.find_existing(chunk)
        if found:
            journal.record_adopted(run_id, chunk.chunk_id, found[0], found[1:])
            self.progress.adopted += 1
            self._done(len(chunk.members))
            log.info(
                "reconciled: task exists, adopted",
                chunk=chunk.chunk_id,
                operation_id=found[0],
                duplicates=len(found) - 1,
            )
            return
        journal.record_absent(run_id, chunk.chunk_id)
        log.info("reconciled: no task exists after settling, sending again", chunk=chunk.chunk_id)
        census = self._census.census
        adoption = plan_adoption(chunk, census, self._census.unknown) if census else None
        if adoption is None:
            self._enqueue(chunk)
            return
        # what the run's census found of this chunk in other tasks is not sent again
        journal.adopt_parts(run_id, chunk.chunk_id, adoption.adopted, adoption.remainder)
        self._done(adoption.targets)
        if adoption.remainder is not None:
            self._enqueue(adoption.remainder)

    async def find_existing(self, chunk: Chunk) -> list[str]:
        """operationIds of tasks on the platform that are exactly this chunk with our package,
        newest first — by createTime, then by the list's creation order (§3.7): the chunk's
        devices have their outcome in the newest, which is adopted; the others are
        duplicates."""
        members = set(chunk.members)
        first_intent = self.session.journal.first_intent(self.session.run_id, chunk.chunk_id)
        matches: list[tuple[str, int, str]] = []
        page_no = 0
        while True:
            if chunk.kind == "devices":
                page = await self.session.client.list_tasks(
                    operation_type=self.session.operation,
                    device_id=chunk.members[0],
                    page_no=page_no,
                    priority=Priority.SUBMIT,
                )
            else:
                fleet = self.session.plan.fleet
                page = await self.session.client.list_tasks(
                    operation_type=self.session.operation,
                    device_type=fleet.device_type,
                    model=fleet.model,
                    manufacturer=fleet.manufacturer,
                    page_no=page_no,
                    priority=Priority.SUBMIT,
                )
            for task in page.items:
                if await self._matches(task, chunk.kind, members, first_intent):
                    matches.append((task.create_time or "", len(matches), task.operation_id))
            if not page.items or (page_no + 1) * (page.page_size or 1) >= page.total:
                break
            page_no += 1
        return [operation_id for _, _, operation_id in sorted(matches, reverse=True)]

    async def _matches(
        self,
        task: Task,
        kind: str,
        members: set[str],
        first_intent: tuple[float, float | None] | None,
    ) -> bool:
        # the chunk's kind, not the fleet's: a retry pass of a group fleet sends devices
        targets = task.targets.devices if kind == "devices" else task.targets.device_groups
        if targets is None or len(targets) != len(members) or set(targets) != members:
            return False
        verdict = await self._census.judge.judge(task)
        if verdict is Match.SAME:
            return True
        if verdict is Match.OTHER or first_intent is None:
            return False
        # the platform does not say which package: a task with exactly this chunk's targets
        # created after our first intent (on the platform's clock) is ours
        created = parse_platform_time(task.create_time)
        clock = self.session.client.clock
        margin = (clock.uncertainty if clock.measured else 0.0) + (
            self.session.plan.execution.clock_skew
        )
        local, on_platform = first_intent
        intent_on_platform = on_platform if on_platform is not None else local + clock.offset
        return created is not None and created + 1 >= intent_on_platform - margin

    def _done(self, targets: int) -> None:
        self.progress.done_targets += targets
        self._report()

    def _report(self) -> None:
        if self._progress_hook is not None:
            self._progress_hook(self.progress)
