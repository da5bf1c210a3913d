"""The exactly-once submitter: one create per chunk, journaled, reconciled, never blindly retried.

For each chunk, in order, under the shared pacing:

1. commit the intent to the journal (durably), then send the create;
2. created → record the operationId;
3. certainly not created (4xx, connect refused, TLS) → per cause: a device-level refusal
   (123002 unknown device, 123016 model mismatch) bisects the chunk until the offending
   devices are isolated and quarantined; a plan-level refusal stops the run; a connection
   that never opened is sent again after a pause;
4. may have been created (timeout, reset, 5xx) → reconcile: look the chunk up in the task
   list (filtered by operationType and the chunk's first deviceId) and match fileId (when
   the platform reports it), the exact device set, and createTime no earlier than the first
   intent minus the clock-skew allowance. Found → adopt its operationId; not found → send
   again. The same happens first, on resume, for every chunk left with an intent and no
   outcome.

A run of identical failures stops the run rather than burn the budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from .errors import (
    AuthFailed,
    BadRequest,
    InputError,
    PlatformCallError,
    PlatformError,
    RunAborted,
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
from .plan import LoadedPlan
from .planner import Chunk, bisect
from .session import RunSession, operation_type

log = structlog.get_logger("orchestrator.submitter")

DEVICE_LEVEL_CODES = frozenset({"123002", "123016"})
START_LEAD = 2.0  # a custom window's start must not have passed when the create arrives
MIN_WINDOW_SECONDS = 300.0
RETRY_PAUSE = 1.0


@dataclass
class Progress:
    total_targets: int
    done_targets: int = 0
    quarantined: int = 0
    creates: int = 0
    adopted: int = 0
    started: float = field(default_factory=time.monotonic)


ProgressHook = Callable[[Progress], None]


def _platform_time(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


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
    ) -> None:
        self.session = session
        self.wave = wave
        self._progress_hook = progress
        self.progress = shared_progress or Progress(total_targets=len(session.loaded.fleet.members))
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._outstanding = 0
        self._idle = asyncio.Event()
        self._last_failure: str | None = None
        self._identical_failures = 0
        self._policy = Policy.model_validate(policy or session.plan.policy.wire())

    # ---- the run -----------------------------------------------------------------------------
    async def run(self) -> None:
        counts = self.session.journal.counts(self.session.run_id)
        self.progress.done_targets = counts.get("targets_submitted", 0) + counts.get(
            "targets_quarantined", 0
        )
        self.progress.quarantined = counts.get("targets_quarantined", 0)
        self._report()
        for row in self.session.journal.chunks(self.session.run_id, [INTENT], self.wave):
            await self._reconcile_or_requeue(row.as_chunk(), enqueue=False)
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
            for worker in workers:
                worker.cancel()
            results = await asyncio.gather(*workers, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result

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
            except BaseException as exc:
                if not isinstance(exc, asyncio.CancelledError):
                    self._abort_with(exc)
                raise
            self._finished()

    def _abort_with(self, exc: BaseException) -> None:
        # wake run(): it cancels the other workers and re-raises this error
        self._idle.set()
        log.error("stopping the run", error=str(exc))

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
        """The policy for a create sent now. A custom window whose start has passed while the
        rollout went on (a long wave at 100 calls a minute) would draw 123033: its start
        moves to just after now, as long as 5 minutes of the window remain; after that the
        window is over and the run stops rather than send what the platform refuses."""
        policy = self._policy
        if policy.execute_type is not ExecuteType.CUSTOM or policy.start_time is None:
            return policy
        now = time.time()
        start = _platform_time(policy.start_time) or now
        end = _platform_time(policy.end_time or "") or now
        if start >= now + START_LEAD:
            return policy
        moved = now + START_LEAD
        if end - moved < MIN_WINDOW_SECONDS:
            raise RunAborted(
                f"the custom window ending {policy.end_time} has less than 5 minutes left; "
                "the platform would refuse it (123033/123034): give the wave a later window"
            )
        start_text = datetime.fromtimestamp(moved, UTC).strftime("%Y%m%dT%H%M%SZ")
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
        self._count_failure(code, str(error))
        await asyncio.sleep(RETRY_PAUSE)
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
            )
        self._count_failure(code, detail)
        if error.may_have_taken_effect:
            log.warning(
                "create outcome unknown; reconciling",
                chunk=chunk.chunk_id,
                error=type(error).__name__,
            )
            await asyncio.sleep(self.session.plan.execution.reconcile_delay)
            await self._reconcile_or_requeue(chunk, enqueue=True)
        elif device_level:
            assert isinstance(error, PlatformError)
            self._isolate(chunk, code, error.desc)
        else:
            await asyncio.sleep(RETRY_PAUSE)
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

    # ---- reconciliation ----------------------------------------------------------------------
    async def _reconcile_or_requeue(self, chunk: Chunk, *, enqueue: bool) -> None:
        since = self.session.journal.first_intent_at(self.session.run_id, chunk.chunk_id) or 0.0
        found = await self.find_existing(chunk, since - self.session.plan.execution.clock_skew)
        if found:
            self.session.journal.record_adopted(
                self.session.run_id, chunk.chunk_id, found[0], found[1:]
            )
            self.progress.adopted += 1
            self._done(len(chunk.members))
            log.info(
                "reconciled: task exists, adopted",
                chunk=chunk.chunk_id,
                operation_id=found[0],
                duplicates=len(found) - 1,
            )
        else:
            self.session.journal.record_absent(self.session.run_id, chunk.chunk_id)
            log.info("reconciled: no task exists, sending again", chunk=chunk.chunk_id)
            if enqueue:
                self._enqueue(chunk)

    async def find_existing(self, chunk: Chunk, not_before: float) -> list[str]:
        """operationIds of tasks on the platform that are exactly this chunk (oldest first)."""
        members = set(chunk.members)
        matches: list[tuple[float, str]] = []
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
                if self._matches(task, members, not_before):
                    matches.append((_platform_time(task.create_time) or 0.0, task.operation_id))
            if not page.items or (page_no + 1) * page.page_size >= page.total:
                break
            page_no += 1
        return [operation_id for _, operation_id in sorted(matches)]

    def _matches(self, task: Task, members: set[str], not_before: float) -> bool:
        targets = (
            task.targets.devices
            if self.session.plan.fleet.groups is None
            else task.targets.device_groups
        )
        if targets is None or set(targets) != members:
            return False
        created = _platform_time(task.create_time)
        if created is not None and created < not_before:
            return False
        reported = (task.extend_para or {}).get("fileId")
        return reported is None or reported == self.session.package.file_id

    def _done(self, targets: int) -> None:
        self.progress.done_targets += targets
        self._report()

    def _report(self) -> None:
        if self._progress_hook is not None:
            self._progress_hook(self.progress)
