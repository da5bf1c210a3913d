"""What a run tells those who watch it: the live display, webhooks, metrics.

The engine calls an `Observer` — never the other way round — with three kinds of news:

- `progress(Progress)`: targets put in tasks, as the submitter goes (many per second);
- `view(RunView)`: where each wave stands, after every monitor poll and every gate verdict,
  read from the journal (devices in a task, finished, upgraded, failed, already current; the
  gate's state and what it waits for);
- `notice(Notice)`: the moments a person should hear of — a gate passed, failed or awaiting
  approval; the run completed, halted or aborted; duplicates found; the platform out of reach.

An observer must not block and must not raise: it watches, the rollout goes on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from .journal import Journal
    from .submitter import Progress

log = structlog.get_logger("orchestrator.observe")


class NoticeKind(StrEnum):
    GATE_PASSED = "gate-passed"
    GATE_FAILED = "gate-failed"
    GATE_AWAITING_APPROVAL = "gate-awaiting-approval"
    RUN_COMPLETED = "run-completed"
    RUN_HALTED = "run-halted"
    RUN_ABORTED = "run-aborted"
    DUPLICATES_FOUND = "duplicates-found"
    OUTAGE = "outage"


@dataclass(frozen=True)
class Notice:
    kind: NoticeKind
    plan: str
    run_id: int
    text: str  # one line for people (chat webhooks show it as is)
    detail: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class WaveView:
    name: str
    targets: int
    in_tasks: int  # targets in a task (devices, or groups for a group fleet)
    devices: int | None  # devices in the wave's tasks (a group fleet: None until all are seen)
    finished: int  # devices whose subtask is final
    upgraded: int
    failed: int
    already_current: int | None  # None: the journal does not tell it apart
    gate: str  # pending, waiting, soaking, awaiting-approval, passed, failed, none
    gate_reason: str
    soak_until: float | None
    approved: bool

    @property
    def waiting_for(self) -> str:
        """What the gate waits for, in words ("" when it waits for nothing)."""
        if self.gate == "soaking" and self.soak_until is not None:
            left = max(0.0, self.soak_until - time.time())
            return f"soak, {duration_words(left)} left"
        if self.gate == "awaiting-approval":
            return "an operator's approval (rollout approve)"
        if self.gate == "failed" and not self.approved:
            return "a decision: approve to override"
        if self.gate == "waiting":
            return self.gate_reason
        return ""


def duration_words(seconds: float) -> str:
    """A duration as people say it: "30 s" under 2 min, "25 min" under 2 h, "5.5 h" under
    2 days, then "3 days"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}".removesuffix(".0") + " h"
    return f"{seconds / 86400:.1f}".removesuffix(".0") + " days"


@dataclass(frozen=True)
class RunView:
    plan: str
    run_id: int
    waves: list[WaveView]
    at: float = field(default_factory=time.time)

    @property
    def targets(self) -> int:
        return sum(w.targets for w in self.waves)

    @property
    def finished(self) -> int:
        return sum(w.finished for w in self.waves)

    @property
    def devices(self) -> int:
        """Devices in tasks (targets in tasks where a group fleet's devices are not known)."""
        return sum(w.in_tasks if w.devices is None else w.devices for w in self.waves)


def run_view(journal: Journal, plan: str, run_id: int) -> RunView:
    """The run's waves as the journal knows them now (a few SQL sums per wave)."""
    waves = []
    for row in journal.waves(run_id):
        counts = journal.wave_counts(run_id, row.wave)
        waves.append(
            WaveView(
                name=row.name,
                targets=row.target_count,
                in_tasks=counts.submitted,
                devices=counts.devices,
                # a final subtask (the tasks' counters: success, fail, stop), read or not;
                # upgraded and failed count only what was read (as status.py does)
                finished=counts.succeeded + counts.failed,
                upgraded=counts.upgraded,
                failed=counts.failed_read,
                already_current=counts.already_current,
                gate=row.gate_state,
                gate_reason=row.gate_reason or "",
                soak_until=row.soak_until,
                approved=row.approved_at is not None,
            )
        )
    return RunView(plan, run_id, waves)


class Observer:
    """Watches a run; every method does nothing unless overridden."""

    def progress(self, progress: Progress) -> None:
        """Targets put in tasks so far (called by the submitter, often)."""

    def view(self, view: RunView) -> None:
        """Where the waves stand (after each poll and each gate verdict)."""

    def notice(self, notice: Notice) -> None:
        """A moment people should hear of."""


class Observers(Observer):
    """Several observers as one; one that raises is logged and the others go on."""

    def __init__(self, observers: Iterable[Observer]) -> None:
        self.observers = list(observers)

    def progress(self, progress: Progress) -> None:
        for observer in self.observers:
            self._guard(observer.progress, progress)

    def view(self, view: RunView) -> None:
        for observer in self.observers:
            self._guard(observer.view, view)

    def notice(self, notice: Notice) -> None:
        for observer in self.observers:
            self._guard(observer.notice, notice)

    @staticmethod
    def _guard(method: Any, value: Any) -> None:
        try:
            method(value)
        except Exception as exc:  # an observer never stops the rollout
            log.warning("observer failed", observer=type(method.__self__).__name__, error=str(exc))
