"""Wave gates: may the next wave start?

A gate looks at the *devices* of its wave that are in upgrade tasks — for a group fleet the
tasks' own device counts (`staResult.total`), never the number of groups — and judges only
real outcomes (`outcomes`): a device already on the package's version is neither failed nor
upgraded and leaves the base; a device whose subtask succeeded but reports another version is
failed. A success not yet version-checked (counted by a running task, its subtask not read
since) is not finished: a gate never passes or soaks on successes it has not checked (the
engine reads them when they would change the verdict; `monitor.learn_successes`).
Quarantined targets never reached the platform and say nothing about the image.

- it **fails** once the failure share of the finished devices exceeds `max_failed`, judged
  only when at least `min_sample` devices have finished (or the whole wave has): AWS IoT
  Jobs' abort rule, so three early failures out of five do not stop a 10 000-device wave;
- it **passes** when the finished share reaches `min_finished` (and the sample rule is met);
- otherwise it **waits**.

A passed gate may then soak (keep watching for `soak` seconds, failing if the failure share
crosses the limit meanwhile) and may need an operator's approval (`rollout approve`).
"""

from __future__ import annotations

from enum import StrEnum

from .counts import WaveCounts
from .plan import GateSection


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"


def evaluate(gate: GateSection, counts: WaveCounts) -> tuple[Verdict, str]:
    """The verdict on a wave and its reason (one line, with the devices counted)."""
    base = counts.base
    if base is None:
        return Verdict.WAIT, (
            f"{counts.tasks} of the {counts.submitted_tasks} tasks of {counts.submitted} "
            "groups observed: their device count is not known yet"
        )
    if counts.devices == 0:  # empty groups, groups of another model, every target quarantined
        quarantined = (
            f" ({counts.quarantined} of its targets quarantined)" if counts.quarantined else ""
        )
        return Verdict.FAIL, (
            f"nothing to judge: the wave's tasks hold no device{quarantined}; a gate passes "
            "on evidence, not on its absence"
        )
    finished, failed = counts.finished, counts.real_failed
    all_final = counts.tasks > 0 and counts.final_tasks == counts.tasks
    sample_ok = finished >= gate.min_sample or all_final or base == 0
    current = f", {counts.already_current} already current" if counts.already_current else ""
    if counts.unverified:
        current += f", {counts.unverified} succeeded with the version not checked yet"
    if counts.unread_failed:  # counted failed here until read (status counts them apart)
        current += f", {counts.unread_failed} of the failed with the reason not read yet"
    if gate.max_failed is not None and finished and sample_ok:
        share = failed / finished
        if share > gate.max_failed:
            return Verdict.FAIL, (
                f"{failed} of {finished} finished devices failed "
                f"({share:.1%} > max_failed {gate.max_failed:.1%}){current}"
            )
    finished_share = finished / base if base else 1.0
    groups = f" in {counts.submitted} groups" if counts.kind == "groups" else ""
    summary = (
        f"{finished} of {base} devices{groups} finished ({finished_share:.1%}), "
        f"{failed} failed{current}"
    )
    if finished_share >= gate.min_finished and (gate.max_failed is None or sample_ok):
        return Verdict.PASS, summary
    return Verdict.WAIT, summary
