"""What one device's subtask means for the rollout — the one classification that the monitor,
the gates, `rollout status`, the reports and a retry pass all use.

| outcome | the subtask | counts as |
| --- | --- | --- |
| `upgraded` | succeeded; its reported version is the package's (or none reported) | upgraded |
| `version-mismatch` | succeeded, yet the device reports another version | failed |
| `already-current` | failed because the device already runs the package's version | neither |
| `failed` | failed after the device started the upgrade | failed |
| `timed-out` | failed without the device ever starting (offline, window closed) | failed |
| `stopped` | stopped | failed |
| `in-progress` | waiting or processing | — |

Platform facts (platform-api.md): the platform does not start an upgrade when the device's
current version already equals the target, and says so in the subtask ("…is the same as the
target version", the FAQ's wording, §3.4); a subtask reports the device's version in
`extendInfo.fileVersion` (§3.6, inferred from one example: a residual risk stated in
docs/resume-and-reconciliation.md); subtask statuses are `wait/processing/fail/success/stop`
(§3.8), and `timeout` exists only as a task counter — a subtask that failed without a
`startTime` is the device that never came online in time.

*Already current* is a failed subtask that the platform says found the device on the
package's version, from the subtask's own words:

- its detail says the versions are the same (matched case-insensitively) and its reported
  version, when there is one, is the package's; or
- its reported version is the package's and the device never started an upgrade (no
  `startTime`: a device already on the target that did not come online in the task's time).

A device that started an upgrade and failed is `failed` whatever version it reports, and a
detail that says "same" beside another reported version is a contradiction, judged `failed`:
a platform that words the detail otherwise makes these devices count as failed — loud, never
a failure hidden as "already current".
"""

from __future__ import annotations

import re
from enum import StrEnum

from .northbound import Status

SAME_VERSION = re.compile(r"same as the target version", re.IGNORECASE)


class Outcome(StrEnum):
    UPGRADED = "upgraded"
    VERSION_MISMATCH = "version-mismatch"
    ALREADY_CURRENT = "already-current"
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    STOPPED = "stopped"
    IN_PROGRESS = "in-progress"

    @property
    def failure(self) -> bool:
        """Counts against a gate's `max_failed` (a real outcome that is not an upgrade)."""
        return self in FAILURES


FAILURES = frozenset({Outcome.VERSION_MISMATCH, Outcome.FAILED, Outcome.TIMED_OUT, Outcome.STOPPED})


def classify(
    status: Status, detail: str, reported_version: str | None, started: bool, target: str
) -> Outcome:
    """The outcome of one subtask of a task carrying the package of version `target`.

    `reported_version`: `extendInfo.fileVersion` (None when absent); `started`: the subtask
    has a `startTime`."""
    if status is Status.SUCCEEDED:
        if reported_version is None or not target or reported_version == target:
            return Outcome.UPGRADED
        return Outcome.VERSION_MISMATCH
    if status is Status.STOPPED:
        return Outcome.STOPPED
    if status is Status.FAILED:
        on_target = bool(target) and reported_version == target
        if SAME_VERSION.search(detail or "") is not None:
            if reported_version is None or on_target:
                return Outcome.ALREADY_CURRENT
        elif on_target and not started:
            return Outcome.ALREADY_CURRENT
        return Outcome.FAILED if started else Outcome.TIMED_OUT
    return Outcome.IN_PROGRESS
