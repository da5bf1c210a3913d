"""The census: which of our targets the platform already holds in a task of this package.

The platform has no idempotency key, but its task list names each task's devices (or device
groups), filtered by operation type and by the package's device type, model and manufacturer,
100 tasks a page (platform-api.md §3.7). Reading every page costs ceil(tasks / 100) calls —
about 20 for 500 000 meters — and makes the platform, not a local file, the authority on which
target is already in a task: a lost journal, another folder or `--new-run` never sends a
target twice.

*Which package a task carries* is not promised by the reference (§7: `extendPara` contents
unknown). `PackageJudge` decides, in this order:

1. `extendPara.fileId` when the platform reports it (the simulator does, unless told not to);
2. the journal: a task this journal created or adopted carries the package its run recorded;
3. `extendPara.version` / `fileVersion` when reported;
4. otherwise, for a task that holds our targets, one subtask that succeeded (a one-item page,
   `subOperationStatus=success`): its `extendInfo.fileVersion` is the version that task
   installed (§3.6; the reference's example shows the key, not its meaning — documented as a
   residual risk in docs/resume-and-reconciliation.md);
5. still unknown: the operator decides (`--unknown-tasks stop|skip|send`).

`take_census` reads the list; `plan_adoptions` turns the result into what the journal records
for each chunk not yet in a task. Neither sends a create.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from .northbound import NorthboundClient, OperationType, Package, Page, Priority, Status, Task
from .northbound.clock import parse_platform_time
from .planner import Chunk

log = structlog.get_logger("orchestrator.census")

PAGE_SIZE = 100


class Match(StrEnum):
    SAME = "same"  # the task carries our package
    OTHER = "other"  # another package (e.g. the previous firmware of this model)
    UNKNOWN = "unknown"  # the platform did not say


class UnknownTasks(StrEnum):
    """What to do with targets held by tasks whose package cannot be told."""

    STOP = "stop"  # stop before the first create and ask (default)
    SKIP = "skip"  # count them as in a task: they are not sent
    SEND = "send"  # send them: a second task if that one was ours after all


@dataclass
class PackageJudge:
    """Tells whether a task carries our package, spending at most one call per task."""

    client: NorthboundClient
    package: Package
    known: dict[str, str | None]  # operationId → fileId, from the journal (every run)
    priority: Priority = Priority.SUBMIT
    # operationId → (intent, reply) local times of our creates: their createTime was stamped
    # in between, one more sample of the platform's clock
    created_windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    probes: int = 0
    _verdicts: dict[str, Match] = field(default_factory=dict)

    def without_call(self, task: Task) -> Match:
        para = task.extend_para or {}
        file_id = para.get("fileId")
        if isinstance(file_id, str) and file_id:
            return Match.SAME if file_id == self.package.file_id else Match.OTHER
        known = self.known.get(task.operation_id)
        if known:
            return Match.SAME if known == self.package.file_id else Match.OTHER
        version = para.get("version") or para.get("fileVersion")
        if isinstance(version, str) and version:
            return Match.SAME if version == self.package.version else Match.OTHER
        return Match.UNKNOWN

    async def list_tasks(
        self, operation: OperationType, *, device_id: str | None = None, page_no: int = 0
    ) -> Page[Task]:
        """A page (PAGE_SIZE tasks) of the task list filtered to this package's device type,
        model and manufacturer (platform-api.md §3.7), and to `device_id` when given."""
        package = self.package
        return await self.client.list_tasks(
            operation_type=operation,
            device_type=package.device_type or None,
            model=package.model or None,
            manufacturer=package.manufacturer or None,
            device_id=device_id,
            page_no=page_no,
            page_size=PAGE_SIZE,
            priority=self.priority,
        )

    async def judge(self, task: Task) -> Match:
        verdict = self._verdicts.get(task.operation_id)
        if verdict is not None:
            return verdict
        verdict = self.without_call(task)
        if verdict is Match.UNKNOWN:
            self.probes += 1
            page = await self.client.sub_operation_page(
                task.operation_id, Status.SUCCEEDED, page_size=1, priority=self.priority
            )
            reported = page.items[0].reported_version if page.items else None
            if reported:
                verdict = Match.SAME if reported == self.package.version else Match.OTHER
        self._verdicts[task.operation_id] = verdict
        return verdict


Entry = tuple[str, int, str]  # (createTime, place in the list, operationId): sorts oldest first


@dataclass
class Census:
    """Our targets as the platform's task list shows them (only targets of this plan).

    A target in several tasks of this package (a retry pass sent it again, or a duplicate)
    has its outcome in the **newest** of them — by createTime, then by the list's order (the
    list is in creation order, §3.7) — which `operation_of` names and adoption takes."""

    holder: dict[str, Entry] = field(default_factory=dict)  # target → its first task
    extra: dict[str, list[str]] = field(default_factory=dict)  # target → further ops (duplicates)
    newest: dict[str, Entry] = field(default_factory=dict)  # target in ≥ 2 tasks → the newest
    unknown: dict[str, list[str]] = field(default_factory=dict)  # target → ops, package unknown
    other_package: int = 0  # our targets found in tasks of another package (information)
    newest_foreign: float | None = None  # platform time: newest task holding ours, not ours
    tasks_listed: int = 0
    tasks_holding_ours: int = 0
    pages: int = 0
    probes: int = 0
    seconds: float = 0.0

    def operation_of(self, target: str) -> str | None:
        """The newest task of this package that names `target` (None: none does)."""
        held = self.newest.get(target) or self.holder.get(target)
        return held[2] if held else None

    def duplicates(self, *, with_unknown: bool = False) -> dict[str, list[str]]:
        """Targets in two or more tasks of this package → their operationIds, oldest first.
        `with_unknown`: a target in one of these and in a task whose package the platform does
        not tell counts too (possibly two tasks of this package)."""
        found = {t: [self.holder[t][2], *ops] for t, ops in self.extra.items()}
        if with_unknown:
            for target, ops in self.unknown.items():
                if target in self.holder:
                    found[target] = [*found.get(target, [self.holder[target][2]]), *ops]
        return found

    @property
    def unknown_tasks(self) -> set[str]:
        return {op for ops in self.unknown.values() for op in ops}

    def summary(self) -> dict[str, int | float]:
        return {
            "tasks_listed": self.tasks_listed,
            "tasks_holding_ours": self.tasks_holding_ours,
            "targets_in_tasks": len(self.holder),
            "targets_in_two_tasks": len(self.extra),
            "targets_package_unknown": len(self.unknown),
            "targets_in_other_packages": self.other_package,
            "pages": self.pages,
            "probes": self.probes,
            "seconds": round(self.seconds, 3),
        }

    def _hold(self, target: str, entry: Entry, again: bool = False) -> None:
        """`again`: the task sent the target again on purpose (a retry pass): it may be the
        target's newest task, never a duplicate."""
        held = self.holder.get(target)
        if held is None:
            self.holder[target] = entry  # one tuple per task, shared by its targets
            return
        if held[2] == entry[2]:
            return
        newest = max(self.newest.get(target, held), entry)
        if not again:
            older, newer = sorted((held, entry))
            self.holder[target] = older
            self.extra.setdefault(target, []).append(newer[2])
        self.newest[target] = newest


def members_of(task: Task, kind: str) -> list[str]:
    """What a task names: its devices; for a group fleet its groups and the devices it names
    (a device of the fleet's groups sent directly is in that task too: groups.py)."""
    if kind == "devices":
        return task.targets.devices or []
    return [*(task.targets.device_groups or []), *(task.targets.devices or [])]


async def take_census(
    judge: PackageJudge,
    operation: OperationType,
    kind: str,
    targets: Mapping[str, str],
    *,
    since: float | None = None,
    ignore: frozenset[str] = frozenset(),
    again: frozenset[str] = frozenset(),
) -> Census:
    """Read every page of the app's tasks of this operation and the package's device type,
    model and manufacturer (every status) and index our `targets` (device IDs, or group
    names when `kind` is "groups"), each mapped to itself: the index keys are the caller's
    strings, not a second copy decoded from the replies (85 MB at 1 000 000 devices).

    A retry pass sends devices again on purpose: its census passes `since` (the platform's
    time when the pass started: older tasks are not indexed) and `ignore` (the operationIds
    of earlier passes), so it adopts only tasks made for the pass itself. A run's census
    passes the passes' operationIds as `again`: they sent their devices again on purpose, so
    they are no duplicates, yet a device they hold has its outcome there when they are its
    newest task (`Census.operation_of`).

    Costs ceil(tasks / 100) list calls, plus one probe call per task that holds our targets
    when neither the reply nor the journal tells its package. Raises PlatformCallError."""
    started = time.monotonic()
    census = Census()
    seen: set[str] = set()
    page_no = 0
    while True:
        page = await judge.list_tasks(operation, page_no=page_no)
        census.pages += 1
        for task in page.items:
            if task.operation_id in seen:
                continue  # the list moved between pages
            seen.add(task.operation_id)
            census.tasks_listed += 1
            window = judge.created_windows.get(task.operation_id)
            stamped = parse_platform_time(task.create_time)
            if window is not None and stamped is not None:
                judge.client.clock.observe(stamped, *window)
            if task.operation_id in ignore or (
                since is not None and stamped is not None and stamped < since
            ):
                continue
            ours = [canon for m in members_of(task, kind) if (canon := targets.get(m)) is not None]
            if not ours:
                continue
            census.tasks_holding_ours += 1
            verdict = await judge.judge(task)
            if verdict is not Match.OTHER and task.operation_id not in judge.known:
                created = parse_platform_time(task.create_time)
                if created is not None and (
                    census.newest_foreign is None or created > census.newest_foreign
                ):
                    census.newest_foreign = created
            if verdict is Match.OTHER:
                census.other_package += len(ours)
            elif verdict is Match.SAME:
                entry = (task.create_time or "", census.tasks_listed, task.operation_id)
                again_ = task.operation_id in again
                for target in ours:
                    census._hold(target, entry, again_)
            elif verdict is Match.UNKNOWN:
                for target in ours:
                    census.unknown.setdefault(target, []).append(task.operation_id)
        size = page.page_size or PAGE_SIZE
        if not page.items or (page_no + 1) * size >= page.total:
            break
        page_no += 1
    census.probes = judge.probes
    census.seconds = time.monotonic() - started
    log.info("census", **census.summary())
    return census


CONFIRMED, UNCONFIRMED = True, False  # the task's package was told, or the operator skipped


@dataclass(frozen=True)
class Adoption:
    """What the census means for one chunk not yet in a task."""

    parent: str
    adopted: list[tuple[Chunk, str, bool]]  # (child chunk, operationId, package confirmed)
    remainder: Chunk | None  # still to send (None: nothing left)

    @property
    def whole(self) -> bool:
        return self.remainder is None and len(self.adopted) == 1

    @property
    def targets(self) -> int:
        return sum(len(part.members) for part, _, _ in self.adopted)


def plan_adoption(
    chunk: Chunk, census: Census, unknown: UnknownTasks, *, exact_only: bool = False
) -> Adoption | None:
    """Split `chunk` into the parts the census found in tasks and the rest (None: no part
    found). `unknown = skip` counts a target held by a task of unknown package as in that task.
    `exact_only`: adopt only when one task holds the whole chunk (a chunk whose own create may
    still land is never partly resent)."""
    by_operation: dict[tuple[str, bool], list[str]] = {}
    rest: list[str] = []
    for member in chunk.members:
        operation_id = census.operation_of(member)
        key = (operation_id, CONFIRMED) if operation_id is not None else None
        if key is None and unknown is UnknownTasks.SKIP and member in census.unknown:
            key = (census.unknown[member][-1], UNCONFIRMED)  # the newest (list order)
        if key is None:
            rest.append(member)
        else:
            by_operation.setdefault(key, []).append(member)
    if not by_operation:
        return None
    if len(by_operation) == 1 and not rest:
        (operation_id, confirmed), _ = next(iter(by_operation.items()))
        return Adoption(chunk.chunk_id, [(chunk, operation_id, confirmed)], None)
    if exact_only:
        return None
    adopted = [
        (Chunk(f"{chunk.chunk_id}.c{i}", chunk.kind, members, chunk.wave), op, confirmed)
        for i, ((op, confirmed), members) in enumerate(by_operation.items())
    ]
    remainder = Chunk(f"{chunk.chunk_id}.r", chunk.kind, rest, chunk.wave) if rest else None
    return Adoption(chunk.chunk_id, adopted, remainder)
