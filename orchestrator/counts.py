"""A wave's devices by outcome as its gate judges them, and an operator's approval of a verdict.

Plain values: the journal counts them (`Journal.wave_counts`), gates.py judges them,
status and reports show them. No I/O here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["WAITING_FOR_DECISION", "Approval", "WaveCounts"]


@dataclass(frozen=True)
class WaveCounts:
    """A wave by where its targets and their devices stand, from the journal.

    Device counts come from the tasks' `staResult` (devices, whatever the targets are),
    corrected by what the monitor learned of single subtasks: `already_current` of the
    `failed` found the device on the package's version (neither failed nor upgraded), and
    `mismatched` of the `succeeded` report another version (failed). `unverified` of the
    `succeeded` are in tasks still running whose success pages were not read since: their
    version is not checked yet, so they count as not finished (neither upgraded nor failed)."""

    targets: int  # the wave's targets: devices, or groups for a group fleet
    submitted: int  # targets in submitted chunks
    quarantined: int
    tasks: int  # tasks observed
    final_tasks: int
    succeeded: int  # devices, staResult success
    failed: int  # devices, staResult fail + stop
    already_current: int = 0
    mismatched: int = 0
    kind: str = "devices"
    task_devices: int = 0  # Σ staResult.total of the observed tasks
    submitted_tasks: int = 0  # tasks the submitted chunks are in
    unverified: int = 0  # devices, staResult success not yet read (version unchecked)
    # devices, staResult fail of running tasks whose failed subtasks were not read since:
    # failed or already current, not known yet ("failed, reason not read yet")
    unread_failed: int = 0

    @property
    def devices(self) -> int | None:
        """Devices in the wave's tasks: the submitted targets of a device fleet; for a group
        fleet the tasks' totals, known once every task was observed (None before)."""
        if self.kind == "devices":
            return self.submitted
        return self.task_devices if self.tasks >= self.submitted_tasks else None

    @property
    def upgraded(self) -> int:
        """Devices whose success was read and whose reported version is the package's."""
        return self.succeeded - self.mismatched - self.unverified

    @property
    def real_failed(self) -> int:
        """Failed devices as a gate counts them: a failure whose subtask was not read yet
        counts as failed (the gate reads them before it passes or fails: monitor.py)."""
        return max(0, self.failed - self.already_current) + self.mismatched

    @property
    def failed_read(self) -> int:
        """Failed devices whose subtask was read and judged failed (version mismatches
        included) — what status, reports, metrics and the display count as failed. Never
        falls as a run goes: a failure not read yet (`unread_failed`) becomes either failed
        or already current once read."""
        return max(0, self.failed - self.unread_failed - self.already_current) + self.mismatched

    @property
    def finished(self) -> int:
        """Devices with a real outcome (upgraded or failed; not already current)."""
        return self.upgraded + self.real_failed

    @property
    def base(self) -> int | None:
        """Devices whose outcome the gate judges: all but the already current."""
        devices = self.devices
        return None if devices is None else max(0, devices - self.already_current)


WAITING_FOR_DECISION = ("failed", "awaiting-approval")  # the gate states an approval is for


@dataclass(frozen=True)
class Approval:
    """An operator's approval of a wave's gate, scoped to the verdict it was given for: a
    failed gate with `failed` of `finished` devices failed, or a passed gate awaiting it."""

    wave: str
    state: str  # the gate state approved: failed | awaiting-approval
    reason: str  # the gate's reason then
    finished: int
    failed: int
    by: str

    @property
    def failed_share(self) -> float:
        return self.failed / self.finished if self.finished else 0.0

    @property
    def tolerance(self) -> float:
        """How far the failure share may drift above the approved one by chance: two standard
        errors of the approved sample, 2·√(p(1−p)/n) — the approved 60 % of 50 devices
        covers up to 73.9 %, of 250 devices up to 66.2 %."""
        if not self.finished:
            return 0.0
        p = self.failed_share
        return float(2 * math.sqrt(p * (1 - p) / self.finished))

    @property
    def limit(self) -> float:
        """The failure share this approval lets through: the approved share plus
        `tolerance`."""
        return self.failed_share + self.tolerance

    def rule(self) -> str:
        """The rule `covers` applies, in an operator's words: 'more than 27.5 % of the
        finished devices failed (the approved 7 of 43, 16.3 %, plus two standard errors of
        that sample, 11.3 points)'."""
        return (
            f"more than {self.limit:.1%} of the finished devices failed (the approved "
            f"{self.failed} of {self.finished}, {self.failed_share:.1%}, plus two standard "
            f"errors of that sample, {self.tolerance * 100:.1f} points)"
        )

    def covers(self, passing: bool, finished: int, failed: int) -> bool:
        """Whether this approval lets a verdict through: a passing gate that awaits approval
        always; a failing one only when the approval was for a failed gate and the failure
        share now is not worse than the approved one beyond chance (`tolerance`)."""
        if passing:
            return True
        if self.state != "failed":
            return False
        share = failed / finished if finished else 0.0
        return share <= self.limit
