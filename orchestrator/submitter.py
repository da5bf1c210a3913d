"""The exactly-once submitter: one create per chunk, journaled, reconciled, never blindly retried.

For each chunk, in order, under the shared pacing:

1. commit the intent to the journal (durably), then send the create;
2. created → record the operationId;
3. certainly not created (4xx, connect refused, TLS) → per cause: a device-level refusal
   (123002 unknown device, 123016 model mismatch) bisects the chunk until the offending
   devices are isolated and quarantined; a plan-level refusal stops the run (the chunk is
   sent again when the run is resumed); a connection that never opened is sent again after
   a pause;
4. may have been created (timeout, reset, 5xx, or an intent found on resume) → *settle*:
   nothing is concluded until the platform has surely finished with the create — the first
   look-up happens `request_timeout + settle` after the intent's send time (the journal
   holds it, so a resumed run waits for young intents too), and "absent" needs a second
   look-up `settle` later that agrees. A look-up pages the task list filtered by operation
   type and the chunk's first deviceId, and keeps the tasks that hold exactly the chunk's
   targets and carry our package (`census.PackageJudge`); a task whose package the platform
   does not tell is taken as ours only when its createTime, on the platform's measured
   clock, is not older than our first intent. Found → adopt the oldest match; absent →
   what the run's census found of the chunk is adopted, the rest is sent again.

A run of identical failures stops the run rather than burn the budget — except refusals
that are not the run's fault: 1010005 (another process or host replaced the app's token) and
1010009 (another client spent the app's budget), also when a login or refresh drew them.
Those did not act; the chunk is simply sent again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from .census import Census, Match, PackageJudge, UnknownTasks, plan_adoption
from .errors import (
    AuthFailed,
    BadRequest,
    InputError,
    InvalidToken,
    PlatformCallError,
    PlatformError,
    RunAborted,
    Throttled,
)
from .journal import FAILED, INTENT, PENDING
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
from .plan import LoadedPlan
from .planner import Chunk, bisect
from .session import RunSession, operation_type

log = structlog.get_logger("orchestrator.submitter")

DEVICE_LEVEL_CODES = frozenset({"123002", "123016"})
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
    fleet = plan.fleet
    if fleet.groups is not None:
        wanted = (fleet.device_type, fleet.model, fleet.manufacturer)
        actual = (package.device_type, package.model, package.manufacturer)
        if wanted != actual:
            raise InputError(
                source,
                "fleet",
                f"type/model/manufacturer {wanted} do not match "
                f"the package's {actual} (the platform refuses 123016)",
            )
    return package


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
    ) -> None:
        self.session = session
        self.wave = wave
        self._progress_hook = progress
        self.progress = shared_progress or Progress(total_targets=len(session.loaded.fleet.members))
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._error: BaseException | None = None
        self._settling: set[asyncio.Task[None]] = set()
        self._last_failure: str | None = None
        self._identical_failures = 0
        self._policy = Policy.model_validate(policy or session.plan.policy.wire())
        self._census = census or CensusView(None, PackageJudge(session.client, session.package, {}))
        self._sleep = sleep

    # ---- the run -----------------------------------------------------------------------------
    async def run(self) -> None:
        counts = self.session.journal.counts(self.session.run_id)
        self.progress.done_targets = counts.get("targets_submitted", 0) + counts.get(
            "targets_quarantined", 0
        )
        self.progress.quarantined = counts.get("targets_quarantined", 0)
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
            try:
                await self._submit(chunk)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self._abort_with(exc)
                return
            self._finished()

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

        async def settle() -> None:
            try:
                await self._settle(chunk)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self._abort_with(exc)
                return
            self._finished()

        task = asyncio.create_task(settle())
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
        refuses."""
        policy = self._policy
        if policy.execute_type is not ExecuteType.CUSTOM or policy.start_time is None:
            return policy
        clock = self.session.client.clock
        uncertainty = clock.uncertainty if clock.measured else 0.0
        now = clock.now() + START_LEAD + uncertainty + self.session.plan.execution.clock_skew
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
        start_text = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        return policy.model_copy(update={"start_time": start_text})

    async def _submit(self, chunk: Chunk) -> None:
        attempt: int | None = None

        def journal_intent() -> None:
            nonlocal attempt
            attempt = self.session.journal.record_intent(self.session.run_id, chunk.chunk_id)

        try:
            operation_id = await self.session.client.create_upgrade_task(
                self.session.operation, lambda: self._request(chunk), before_send=journal_intent
            )
        except PlatformCallError as error:
            if attempt is None:
                await self._never_sent(chunk, error)
            else:
                await self._failed(chunk, attempt, error)
            return
        assert attempt is not None
        self.session.journal.record_created(
            self.session.run_id, chunk.chunk_id, attempt, operation_id
        )
        self._identical_failures = 0
        self.progress.creates += 1
        self._done(len(chunk.members))
        log.debug("chunk submitted", chunk=chunk.chunk_id, operation_id=operation_id)

    async def _never_sent(self, chunk: Chunk, error: PlatformCallError) -> None:
        """The create never left (the login before it failed): nothing to journal."""
        if isinstance(error, AuthFailed):
            raise RunAborted(
                f"the platform refused the app credentials ({error.code}); "
                "check platform.app_id and the secret"
            )
        code = error.code if isinstance(error, PlatformError) else type(error).__name__
        if not isinstance(error, NOT_THE_RUNS_FAULT):
            self._count_failure(code, str(error))
        await self._sleep(RETRY_PAUSE)
        self._enqueue(chunk)

    async def _failed(self, chunk: Chunk, attempt: int, error: PlatformCallError) -> None:
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
        if not isinstance(error, NOT_THE_RUNS_FAULT):
            self._count_failure(code, detail)
        if error.may_have_taken_effect:
            log.warning(
                "create outcome unknown; settling before looking it up",
                chunk=chunk.chunk_id,
                error=type(error).__name__,
            )
            self._start_settling(chunk)
        elif device_level:
            assert isinstance(error, PlatformError)
            self._isolate(chunk, code, error.desc)
        else:
            await self._sleep(RETRY_PAUSE)
            self._enqueue(chunk)

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
        if len(chunk.members) == 1:
            self.session.journal.quarantine(
                self.session.run_id, chunk.chunk_id, chunk.members[0], code, reason
            )
            self.progress.quarantined += 1
            self._done(1)
            # a refusal that isolated its device is not a sign the whole run is failing
            self._identical_failures = 0
            log.warning("target quarantined", target=chunk.members[0], code=code)
            return
        children = bisect(chunk)
        self.session.journal.split(self.session.run_id, chunk.chunk_id, children)
        for child in children:
            self._enqueue(child)

    # ---- settling an ambiguous create --------------------------------------------------------
    async def _settle(self, chunk: Chunk) -> None:
        """Look the chunk up only once the platform has surely finished with its create;
        "absent" needs two look-ups `settle` apart."""
        journal, run_id = self.session.journal, self.session.run_id
        execution = self.session.plan.execution
        sent = journal.last_intent_at(run_id, chunk.chunk_id) or time.time()
        ready = sent + self.session.plan.platform.request_timeout + execution.settle
        wait = ready - time.time()
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
        self._done(sum(len(part.members) for part, _ in adoption.adopted))
        if adoption.remainder is not None:
            self._enqueue(adoption.remainder)

    async def find_existing(self, chunk: Chunk) -> list[str]:
        """operationIds of tasks on the platform that are exactly this chunk with our package
        (oldest first)."""
        members = set(chunk.members)
        first_intent = self.session.journal.first_intent_at(self.session.run_id, chunk.chunk_id)
        matches: list[tuple[str, str]] = []
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
                if await self._matches(task, members, first_intent):
                    matches.append((task.create_time, task.operation_id))
            if not page.items or (page_no + 1) * (page.page_size or 1) >= page.total:
                break
            page_no += 1
        return [operation_id for _, operation_id in sorted(matches)]

    async def _matches(self, task: Task, members: set[str], first_intent: float | None) -> bool:
        targets = (
            task.targets.devices
            if self.session.plan.fleet.groups is None
            else task.targets.device_groups
        )
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
        intent_on_platform = first_intent + clock.offset
        return created is not None and created + 1 >= intent_on_platform - margin

    def _done(self, targets: int) -> None:
        self.progress.done_targets += targets
        self._report()

    def _report(self) -> None:
        if self._progress_hook is not None:
            self._progress_hook(self.progress)
