"""The monitor: task statuses and device results in the journal, for as few calls as the API allows.

Knowing where a rollout stands needs, at the least, every task's final status and every
finished device's outcome (`outcomes.classify`): a device counts as upgraded only when its
subtask succeeded *and* the version it reports is the package's, so the subtasks that
succeeded must be read too, not only the failed. The cheapest way the API offers:

- statuses from task-list pages (up to 100 tasks a call, filtered to the package's
  type/model/manufacturer), never one call per task. The list is in creation order and tasks
  are only appended, so pages holding nothing of ours but finished tasks are not read again:
  a cursor remembers the first page that still holds an unfinished task of ours;
- device results once per finished task: every subtask, unfiltered, 100 a page — ⌈nᵢ/100⌉
  calls for a task of nᵢ devices (3 for 256). Filtering by status cannot do better: the
  pages of success, fail and stop cost ⌈s/100⌉ + ⌈f/100⌉ + ⌈t/100⌉ ≥ ⌈nᵢ/100⌉. The rows of
  devices not upgraded are kept; the upgraded are counted on the task;
- a success counted by a running task's counters is not version-checked, so a gate counts
  it as not finished; when that changes the verdict (the gate would pass, or would not fail,
  were those successes upgrades), the gate asks for the succeeded subtasks of the tasks
  whose success counter grew since last read (`learn_successes`, ⌈sᵢ/100⌉ calls each) and
  judges again on checked versions — so a gate never passes or soaks on unchecked successes;
- a gate that is about to pass or fail while tasks of its wave still run asks for their
  failed subtasks (`learn_failures`) — only then, only for tasks whose failure counter grew
  since, because an already-current device counts as failed in the counters but is neither
  failed nor upgraded. (Learning more already-current devices only lowers the failure share
  and the finished share, so a gate that waits would still wait: asking then is useless.);
- polls back off: the first after `poll_interval`, each next one 1.5× later, up to
  `max_poll_interval` — devices that sleep for hours do not finish faster when asked often.

The bound (`bench/monitor_calls.py`): seeing T final statuses takes ⌈T/100⌉ list calls, and
reading every device of task i takes ⌈nᵢ/100⌉ subtask calls, so the least any client can
spend is `⌈T/100⌉ + Σᵢ ⌈nᵢ/100⌉` (about 3 calls per 256-device task); the monitor adds the
polls that found tasks still running and the gate's failed- and succeeded-subtask pages (the
latter only on a judgement whose verdict depends on them: in a gate that then passes, once;
docs/monitoring-and-reports.md).

All of it at `Priority.MONITOR`, so submission goes first in the shared pacing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from .errors import NotFound
from .northbound import Priority, StaResult, Status
from .plan import MonitorSection
from .session import RunSession

log = structlog.get_logger("orchestrator.monitor")

Sleep = Callable[[float], Awaitable[None]]
PAGE_SIZE = 100
BACKOFF = 1.5


@dataclass(frozen=True)
class PollResult:
    changed: bool
    unfinished: int  # our tasks not yet final, or final without their device details


class Monitor:
    def __init__(self, session: RunSession, *, sleep: Sleep = asyncio.sleep) -> None:
        self.session = session
        self.settings: MonitorSection = session.plan.monitor
        self.sleep = sleep
        # the first page that may hold an unfinished task of ours; kept in the journal, so
        # a step (`--step`) in a new process does not read the finished pages again
        self._cursor = int(session.journal.recall(session.run_id, "monitor-cursor") or 0)
        self._last_seen: dict[str, StaResult] = {}
        self.polls = 0
        self.on_poll: Callable[[PollResult], None] | None = None  # e.g. the live display
        # tasks of ours the platform answers 123009 for (not in its list either): the engine
        # settles them (engine.settle_lost: late, or lost and sent again); None: an error
        self.on_lost: Callable[[list[str]], Awaitable[None]] | None = None

    async def poll(self) -> PollResult:
        """One sweep over our unfinished tasks, then the details of newly finished ones."""
        self.polls += 1
        ours = self.session.journal.unfinished_tasks(self.session.run_id)
        pending_status = {op for op, (_, _, final) in ours.items() if not final}
        needs_details = [op for op, (_, _, final) in ours.items() if final]
        changed = False
        if pending_status:
            finished, changed = await self._sweep(ours, pending_status)
            needs_details += finished
        for operation_id in needs_details:
            await self._fetch_details(operation_id)
            changed = True
        self.session.journal.add_calls(self.session.run_id, self.session.client.take_call_counts())
        self.session.journal.add_progress_sample(self.session.run_id)
        remaining = len(self.session.journal.unfinished_tasks(self.session.run_id))
        log.info("monitor poll", unfinished=remaining, changed=changed)
        result = PollResult(changed, remaining)
        if self.on_poll is not None:
            self.on_poll(result)
        return result

    async def _sweep(
        self, ours: dict[str, tuple[str, int, bool]], wanted: set[str]
    ) -> tuple[list[str], bool]:
        seen: set[str] = set()
        finished: list[str] = []
        changed = False
        first_unfinished_page: int | None = None
        page_no = self._cursor
        while True:
            page = await self.session.client.list_tasks(
                operation_type=self.session.operation,
                device_type=self.session.package.device_type or None,
                model=self.session.package.model or None,
                manufacturer=self.session.package.manufacturer or None,
                page_no=page_no,
                page_size=PAGE_SIZE,
                priority=Priority.MONITOR,
            )
            for task in page.items:
                if task.operation_id not in wanted:
                    continue
                seen.add(task.operation_id)
                chunk_id, wave, _ = ours[task.operation_id]
                if self._last_seen.get(task.operation_id) != task.sta_result or task.status.final:
                    self.session.journal.record_task(self.session.run_id, chunk_id, wave, task)
                    self._last_seen[task.operation_id] = task.sta_result
                    changed = True
                if task.status.final:
                    finished.append(task.operation_id)
                elif first_unfinished_page is None:
                    first_unfinished_page = page_no
            last_page = not page.items or (page_no + 1) * PAGE_SIZE >= page.total
            if seen >= wanted or last_page:
                break
            page_no += 1
        missing = wanted - seen
        if missing:
            # not where the cursor said: read from the start next time, and ask for these now
            self._set_cursor(0)
            unknown: list[str] = []
            for operation_id in sorted(missing):
                try:
                    task = await self.session.client.get_task(
                        operation_id, priority=Priority.MONITOR
                    )
                except NotFound:
                    if self.on_lost is None:
                        raise
                    unknown.append(operation_id)  # 123009: late, or lost by the platform
                    continue
                chunk_id, wave, _ = ours[operation_id]
                self.session.journal.record_task(self.session.run_id, chunk_id, wave, task)
                if task.status.final:
                    finished.append(operation_id)
            if unknown and self.on_lost is not None:
                await self.on_lost(unknown)
            return finished, True
        self._set_cursor(first_unfinished_page if first_unfinished_page is not None else page_no)
        return finished, changed

    def _set_cursor(self, page_no: int) -> None:
        if page_no != self._cursor:
            self._cursor = page_no
            self.session.journal.remember(self.session.run_id, "monitor-cursor", page_no)

    async def _fetch_details(self, operation_id: str) -> None:
        """Every subtask of a finished task, once: each device's outcome, versions checked."""
        results = await self.session.client.sub_operations(operation_id)
        self.session.journal.record_device_results(
            self.session.run_id,
            operation_id,
            results,
            self.session.package.version,
            keep_upgraded=self.session.loaded.fleet.kind == "groups",
        )

    async def learn_successes(self, wave: int) -> int:
        """The succeeded subtasks of the wave's running tasks whose success counter grew since
        they were last read, version-checked (a gate whose verdict hinges on successes not
        yet checked reads them: a device the platform rolled back, or that reports another
        version, is failed, not upgraded). ⌈sᵢ/100⌉ calls for a task with sᵢ successes.
        Returns the tasks read."""
        journal, run_id = self.session.journal, self.session.run_id
        operations = journal.unseen_successes(run_id, wave)
        for operation_id in operations:
            results = await self.session.client.sub_operations(operation_id, Status.SUCCEEDED)
            journal.record_successes(
                run_id,
                operation_id,
                results,
                self.session.package.version,
                keep_upgraded=self.session.loaded.fleet.kind == "groups",
            )
        if operations:
            journal.add_calls(run_id, self.session.client.take_call_counts())
        return len(operations)

    async def learn_failures(self, wave: int) -> int:
        """The failed subtasks of the wave's tasks whose failure counter grew since they were
        last read (a gate about to decide needs the already current told apart). Returns
        the tasks read."""
        journal, run_id = self.session.journal, self.session.run_id
        operations = journal.unseen_failures(run_id, wave)
        for operation_id in operations:
            results = await self.session.client.sub_operations(operation_id, Status.FAILED)
            journal.record_failures(run_id, operation_id, results, self.session.package.version)
        if operations:
            journal.add_calls(run_id, self.session.client.take_call_counts())
        return len(operations)

    async def follow(
        self, done: Callable[[PollResult], bool] | None = None, *, first_wait: float = 0.0
    ) -> PollResult:
        """Poll until every task is final with its details (or until `done` says so).

        `first_wait`: tasks created a moment ago cannot have finished; the engine waits one
        poll interval before the first look instead of spending a call on it.
        """
        interval = self.settings.poll_interval
        if first_wait > 0 and self.session.journal.unfinished_tasks(self.session.run_id):
            await self.sleep(first_wait)
            interval = min(self.settings.max_poll_interval, interval * BACKOFF)
        while True:
            result = await self.poll()
            if result.unfinished == 0 or (done is not None and done(result)):
                return result
            await self.sleep(interval)
            interval = min(self.settings.max_poll_interval, interval * BACKOFF)
