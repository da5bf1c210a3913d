"""What a rollout report holds: the rows and totals `report.collect` reads from the journal,
which the writers (`report.py` for CSV, JSON and JSON Lines, `report_html.py` for the page)
only draw. Both import this module and neither imports the other's drawing.

Per-device data is never held whole: `ReportData.devices` and `ReportData.quarantined` start a
fresh pass over the journal on each call; the page gets only the first `listed` devices of
each list (`ReportData.lists`) and the counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

DEFAULT_LISTED = 1_000  # devices per list on the HTML page (`rollout report --html-list-limit`)
LISTS = ("failed", "quarantined", "already_current")  # the page's device lists, by bucket


class DeviceRow(NamedTuple):
    device_id: str
    wave: str
    chunk: str
    operation_id: str
    task_status: str
    subtask_status: str
    upgraded: bool
    detail: str
    version: str
    task_created: str
    task_finished: str
    device_started: str
    device_finished: str
    in_task_by: str  # created|reconciled|census|census-unconfirmed|second-claim ("": no task)
    outcome: str  # outcomes.Outcome, or quarantined | not-submitted | unknown
    passes: int = 1  # the run's own pass, plus each retry pass that held the device
    pass_outcomes: str = ""  # "1:failed 2:upgraded": the outcome in each pass, oldest first


def clip(text: str, limit: int) -> str:
    """TEXT on one line (each run of white space one space), cut to LIMIT characters, the
    last of them "…" when cut — the key failure reasons are counted by (`report.py`) and what
    the HTML page shows of a reason or a detail (`report_html.py`)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


DEVICE_COLUMNS = DeviceRow._fields
WAVE_COUNTS = (
    "upgraded",
    "failed",
    "already_current",
    "in_progress",
    "quarantined",
    "not_submitted",
)


@dataclass
class ReportData:
    """Everything a report shows. Device rows are streamed from the journal on demand (a
    million of them must not sit in memory); the totals were counted in one pass, which also
    kept the first `listed` devices of each of `LISTS` (in journal order: chunk by chunk).

    `totals` holds `devices`, each of `WAVE_COUNTS`, `failed_unread` (failures the platform
    counted whose subtasks are not read yet: in `in_progress`, no reason known),
    `in_task_by_<how>`, `duplicates`, `tasks` and `calls`; `failure_reasons` holds (reason,
    devices) of the failed devices, most first, at most `report.REASONS_KEPT` reasons and an
    "other reasons" row (empty when the report was collected without reasons); a list of
    `lists[bucket]` is whole when its length equals `totals[bucket]`."""

    run: dict[str, Any]
    waves: list[dict[str, Any]]
    tasks: list[dict[str, Any]]
    quarantined: Callable[[], Iterator[dict[str, Any]]]  # a fresh pass each call
    duplicates: list[dict[str, Any]]  # targets in two or more tasks of the package
    calls: dict[str, int]
    progress: list[dict[str, Any]]
    totals: dict[str, int]
    failure_reasons: list[tuple[str, int]]
    devices: Callable[[], Iterator[DeviceRow]]  # a fresh pass over the journal each call
    passes: list[dict[str, Any]] = field(default_factory=list)  # retry passes, by outcome
    lists: dict[str, list[DeviceRow]] = field(default_factory=dict)  # first `listed` of LISTS
    listed: int = DEFAULT_LISTED
