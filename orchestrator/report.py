"""Rollout reports — CSV, JSON, JSON Lines and a self-contained HTML page — from the journal
alone. `collect` reads what a report holds (`report_model.ReportData`); the writers here stream
the per-device formats, `report_html.py` draws the page.

One row per device (deviceId, wave, chunk, operationId, task status, subtask status,
upgraded, detail, version, timestamps, outcome), per-task and per-wave summaries, the
quarantined devices with their reason, the failure reasons, and the call budget spent per API.

What a device row can say is what the monitor learned: every subtask of a finished task is
read once and classified (`outcomes.py`); the journal keeps the rows of devices not upgraded,
so a device of a finished, read task without a row was upgraded — its subtask succeeded and
the version it reported is the package's. A device of a task still running is
`in-progress`. `already-current` devices (the platform found them on the package's version,
or the fleet file said so and they were never sent) are neither failed nor upgraded.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from .errors import JournalError
from .journal import Journal
from .northbound import Status
from .outcomes import FAILURES, Outcome, classify
from .report_html import write_page
from .report_model import (
    DEFAULT_LISTED,
    DEVICE_COLUMNS,
    LISTS,
    WAVE_COUNTS,
    DeviceRow,
    ReportData,
    clip,
)
from .status import wave_summaries

__all__ = [
    "DEVICE_COLUMNS",
    "WRITERS",
    "DeviceRow",
    "ReportData",
    "collect",
    "render_to_string",
    "write_csv",
    "write_html",
    "write_json",
    "write_jsonl",
]


FAILED_OUTCOMES = frozenset(outcome.value for outcome in FAILURES)
IN_PROGRESS_OUTCOMES = frozenset({Outcome.IN_PROGRESS.value, "unknown"})
IN_TASK_BY = {
    0: "created",
    1: "reconciled",
    2: "census",
    3: "second-claim",
    4: "census-unconfirmed",
}


def _iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


REASON_CHARS = 300  # a failure reason's key: its text, spaces squeezed, cut here with "…"
REASONS_KEPT = 2_000  # distinct reasons counted apart; devices of any further one: "other"
OTHER_REASONS = "other reasons"  # the row of the devices whose reason came past REASONS_KEPT


class _Reasons:
    """Failed devices by reason in bounded memory: at most `REASONS_KEPT` keys of at most
    `REASON_CHARS` characters; a device whose reason is new once that many are kept counts in
    `other` (a million unique details cost kilobytes, not hundreds of megabytes)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.other = 0

    def add(self, text: str) -> None:
        key = clip(text, REASON_CHARS)
        if key in self.counts or len(self.counts) < REASONS_KEPT:
            self.counts[key] += 1
        else:
            self.other += 1

    def ranked(self) -> list[tuple[str, int]]:
        """(reason, devices), most devices first; the "other reasons" row last."""
        ranked = self.counts.most_common()
        if self.other:
            ranked.append((f"{OTHER_REASONS} (past the first {REASONS_KEPT})", self.other))
        return ranked


def collect(
    path: Path, plan_name: str, listed: int = DEFAULT_LISTED, reasons: bool = True
) -> ReportData:
    """The report of PLAN_NAME's latest run in the journal at PATH: one pass over the device
    rows counts the totals and keeps the first `listed` devices of each of `LISTS`; memory
    does not grow with the number of devices (rows are read chunk by chunk, a task's kept
    subtask rows at a time). `reasons`: count the failed devices by reason (`_Reasons`:
    bounded; the formats that show them, HTML and JSON, ask for it; CSV and JSON Lines do
    not). Raises JournalError when the journal holds no run of the plan."""
    db: sqlite3.Connection = Journal.open_readonly(path)
    db.row_factory = sqlite3.Row
    try:
        run = db.execute(
            "SELECT * FROM runs WHERE plan_name=? ORDER BY run_id DESC LIMIT 1", (plan_name,)
        ).fetchone()
        if run is None:
            raise JournalError(f"{path}: no run of plan {plan_name!r}")
        run_id, version = run["run_id"], run["package_version"] or ""
        wave_names = {
            r["wave"]: r["name"]
            for r in db.execute("SELECT wave, name FROM waves WHERE run_id=?", (run_id,))
        }
        tasks = {
            r["operation_id"]: dict(r)
            for r in db.execute("SELECT * FROM tasks WHERE run_id=? ORDER BY chunk_id", (run_id,))
        }
        left_out = _has_table(db, "already_current")
        retry_passes = (
            [dict(r) for r in db.execute("SELECT * FROM passes WHERE run_id=?", (run_id,))]
            if _has_table(db, "passes")
            else []
        )
        scope = _Scope(run_id, wave_names, tasks, version, _pass_waves(retry_passes))

        def rows() -> Iterator[DeviceRow]:
            reader = Journal.open_readonly(path)
            reader.row_factory = sqlite3.Row
            try:
                yield from _device_rows(reader, scope)
                if left_out:
                    yield from _left_out_rows(reader, run_id)
            finally:
                reader.close()

        pass_counts: dict[int, Counter[str]] = {}
        for pass_no, device in _pass_rows(db, scope):
            pass_counts.setdefault(pass_no, Counter())[_bucket(device.outcome)] += 1
        passes = [
            {
                "pass": r["pass_no"],
                "states": ", ".join(json.loads(r["states"])),
                "status": r["status"],
                "targets": r["targets"],
                **{key: pass_counts.get(r["pass_no"], Counter())[key] for key in WAVE_COUNTS},
                "gate_reason": "",
            }
            for r in sorted(retry_passes, key=lambda r: int(r["pass_no"]))
        ]

        def quarantined() -> Iterator[dict[str, Any]]:
            reader = Journal.open_readonly(path)
            try:
                for device_id, chunk_id, code, reason in reader.execute(
                    "SELECT device_id, chunk_id, error_code, reason FROM quarantine"
                    " WHERE run_id=? ORDER BY chunk_id",
                    (run_id,),
                ):
                    yield {
                        "device_id": device_id,
                        "chunk": chunk_id,
                        "error_code": code,
                        "reason": reason,
                    }
            finally:
                reader.close()

        per_wave: dict[str, Counter[str]] = {}
        by_reason = _Reasons()
        lists: dict[str, list[DeviceRow]] = {bucket: [] for bucket in LISTS}
        for device in rows():
            counts = per_wave.get(device.wave)
            if counts is None:
                counts = per_wave[device.wave] = Counter()
            counts["devices"] += 1
            counts["upgraded"] += device.upgraded
            if device.in_task_by:
                counts[f"in_task_by_{device.in_task_by}"] += 1
            bucket = _bucket(device.outcome)
            if bucket != "upgraded":
                counts[bucket] += 1
            if bucket == "failed" and reasons:
                by_reason.add(device.detail or device.outcome)
            kept = lists.get(bucket)
            if kept is not None and len(kept) < listed:
                kept.append(device)
        summaries = {row["wave"]: row for row in wave_summaries(db, run_id)[0]}
        waves = []
        gates = {}
        for w in db.execute("SELECT * FROM waves WHERE run_id=? ORDER BY wave", (run_id,)):
            if w["wave"] in scope.pass_waves:
                gates[scope.pass_waves[w["wave"]]] = w["gate_reason"] or w["gate_state"]
                continue
            counts = per_wave.get(w["name"], Counter())
            waves.append(
                {
                    "wave": w["name"],
                    "targets": w["target_count"],
                    **{key: counts[key] for key in WAVE_COUNTS},
                    **_final_counts(summaries.get(w["wave"]), counts),
                    "gate": w["gate_state"],
                    "gate_reason": w["gate_reason"] or "",
                    "approved": w["approved_at"] is not None,
                }
            )
        everything = sum(per_wave.values(), Counter())
        outside = per_wave.get("", Counter())  # devices left out by the fleet file
        totals = {
            "devices": everything["devices"],
            **{k: sum(w[k] for w in waves) + outside[k] for k in WAVE_COUNTS},
        }
        # failures the platform counted in tasks whose subtasks are not read yet: their
        # devices are in progress (reason unknown, maybe already current) — `rollout status`
        totals["failed_unread"] = sum(int(s.get("failed_unread", 0)) for s in summaries.values())
        totals.update(
            {f"in_task_by_{how}": everything[f"in_task_by_{how}"] for how in IN_TASK_BY.values()}
        )
        has_duplicates = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='duplicates'"
        ).fetchone()
        duplicates = [
            {"target": r["target"], "operation_ids": json.loads(r["operation_ids"])}
            for r in (
                db.execute(
                    "SELECT target, operation_ids FROM duplicates WHERE run_id=? ORDER BY target",
                    (run_id,),
                )
                if has_duplicates
                else []
            )
        ]
        totals["duplicates"] = len(duplicates)
        judged = _task_outcomes(db, run_id)
        task_rows = [
            {
                "operation_id": op,
                "chunk": t["chunk_id"],
                "wave": wave_names.get(t["wave"], ""),
                "status": t["status"],
                "total": t["total"],
                **_task_counts(t, *judged.get(op, (0, 0))),
                "created": t["create_time"] or "",
                "finished": t["stop_time"] or "",
            }
            for op, t in tasks.items()
        ]
        calls = {
            r["api"]: r["calls"]
            for r in db.execute(
                "SELECT api, calls FROM api_calls WHERE run_id=? ORDER BY api", (run_id,)
            )
        }
        progress = [
            {
                "at": _iso(r["at"]),
                "t": r["at"],
                "submitted": r["submitted"],
                "finished": r["finished"],
                "succeeded": r["succeeded"],
                "failed": r["failed"],
            }
            for r in db.execute(
                "SELECT * FROM progress_samples WHERE run_id=? ORDER BY at", (run_id,)
            )
        ]
        run_info = {
            **_presentation(db, run, wave_names),
            "plan": plan_name,
            "run_id": run_id,
            "status": run["status"],
            "stop_reason": run["stop_reason"] or "",
            "operation": run["operation"],
            "file_id": run["file_id"] or "",
            "package_version": version,
            "targets": run["target_count"],
            "created_at": _iso(run["created_at"]),
            "updated_at": _iso(run["updated_at"]),
        }
        for row in passes:
            row["gate_reason"] = gates.get(row["pass"], "")
        return ReportData(
            run_info,
            waves,
            task_rows,
            quarantined,
            duplicates,
            calls,
            progress,
            {**totals, "tasks": len(task_rows), "calls": sum(calls.values())},
            by_reason.ranked(),
            rows,
            passes,
            lists,
            listed,
        )
    finally:
        db.close()


def _task_outcomes(db: sqlite3.Connection, run_id: int) -> dict[str, tuple[int, int]]:
    """operationId → (already current, version mismatch) devices, from the subtasks read
    (none in a journal whose results predate outcomes)."""
    if not any(r[1] == "outcome" for r in db.execute("PRAGMA table_info(device_results)")):
        return {}
    return {
        str(op): (int(current), int(mismatched))
        for op, current, mismatched in db.execute(
            "SELECT operation_id, COALESCE(SUM(outcome='already-current'), 0),"
            " COALESCE(SUM(outcome='version-mismatch'), 0) FROM device_results WHERE run_id=?"
            " GROUP BY operation_id",
            (run_id,),
        )
    }


def _task_counts(task: dict[str, Any], current: int, mismatched: int) -> dict[str, int]:
    """A task's devices in the outcome classes of the summary (outcomes.py), from its
    counters (`staResult`) corrected by its subtasks read: the platform's `fail` holds the
    already current, its `success` the version mismatches; a running task's successes not
    version-checked and failures not read yet are in progress, as `rollout status` counts."""
    read = bool(task.get("details_fetched"))
    seen = int(task.get("verified") or 0) + int(task.get("unreported") or 0)
    unverified = 0 if read else max(0, task["succeeded"] - seen - mismatched)
    unread = 0 if read else max(0, task["failed"] - int(task.get("fails_seen") or 0))
    return {
        "upgraded": task["succeeded"] - mismatched - unverified,
        "failed": max(0, task["failed"] + task["stopped"] - current - unread) + mismatched,
        "already_current": current,
        "in_progress": task["waiting"] + task["processing"] + unverified + unread,
    }


def _final_counts(summary: dict[str, Any] | None, rows: Counter[str]) -> dict[str, int]:
    """A wave's devices by outcome as `rollout status` counts them (`wave_summaries`: the one
    source of per-wave counts, each device once by its final outcome); those of its tasks
    not counted there are in progress. `rows`: the wave's device rows by column."""
    if summary is None:
        return {}
    final = {
        "upgraded": int(summary["succeeded"]),
        "failed": int(summary["failed"]),
        "already_current": int(summary["already_current"]),
    }
    in_tasks = sum(rows[k] for k in ("upgraded", "failed", "already_current", "in_progress"))
    return final | {"in_progress": max(0, in_tasks - sum(final.values()))}


def _presentation(
    db: sqlite3.Connection, run: sqlite3.Row, wave_names: dict[int, str]
) -> dict[str, Any]:
    """How to show times: the plan's time zone (the policy's, else a wave window's, else
    UTC), the embedded simulator's speed when its times are simulated, and when each wave's
    first create left (markers on the progress chart)."""
    raw = run["settings"] if "settings" in run.keys() else None  # noqa: SIM118 (sqlite3.Row)
    settings = json.loads(raw) if raw else {}
    platform = settings.get("platform") or {}
    embedded = platform.get("url") == "simulator"
    speed = (platform.get("simulator") or {}).get("speed", 60.0) if embedded else None
    zones = [(settings.get("policy") or {}).get("timezone")]
    zones += [(wave.get("window") or {}).get("timezone") for wave in settings.get("waves") or []]
    starts = db.execute(
        "SELECT c.wave, MIN(a.sent_at) FROM attempts a JOIN chunks c ON c.run_id=a.run_id"
        " AND c.chunk_id=a.chunk_id WHERE a.run_id=? GROUP BY c.wave ORDER BY 2",
        (run["run_id"],),
    ).fetchall()
    return {
        "time_zone": next((z for z in zones if z and z != "UTC"), "UTC"),
        "simulated_speed": speed,
        "wave_starts": [{"wave": wave_names.get(w, str(w)), "t": t} for w, t in starts],
    }


@dataclass(frozen=True)
class _Scope:
    """What every device row of one run is read against."""

    run_id: int
    wave_names: dict[int, str]
    tasks: dict[str, dict[str, Any]]
    version: str
    pass_waves: dict[int, int]  # wave of a retry pass → its number


def _pass_waves(passes: list[dict[str, Any]]) -> dict[int, int]:
    return {int(r["wave"]): int(r["pass_no"]) for r in passes}


def _bucket(outcome: str) -> str:
    """The summary column an outcome counts in."""
    if outcome == Outcome.UPGRADED:
        return "upgraded"
    if outcome in FAILED_OUTCOMES:
        return "failed"
    if outcome == Outcome.ALREADY_CURRENT:
        return "already_current"
    if outcome in IN_PROGRESS_OUTCOMES:
        return "in_progress"
    return "quarantined" if outcome == "quarantined" else "not_submitted"


def _chunks(db: sqlite3.Connection, scope: _Scope, passes: bool) -> Iterator[sqlite3.Row]:
    """The run's chunks that hold devices: of its retry passes (in pass order), or its own."""
    rows = db.execute(
        "SELECT chunk_id, wave, kind, members, state, operation_id, adopted FROM chunks"
        " WHERE run_id=? AND state != 'split' ORDER BY chunk_id",
        (scope.run_id,),
    )
    if passes:
        yield from sorted(
            (r for r in rows if r["wave"] in scope.pass_waves),
            key=lambda r: (scope.pass_waves[r["wave"]], r["chunk_id"]),
        )
    else:
        yield from (r for r in rows if r["wave"] not in scope.pass_waves)


def _pass_rows(db: sqlite3.Connection, scope: _Scope) -> Iterator[tuple[int, DeviceRow]]:
    """(pass number, row) of every device of every retry pass, oldest pass first."""
    if not scope.pass_waves:
        return
    results_of = db.cursor()
    for chunk in list(_chunks(db, scope, passes=True)):
        for row in _chunk_rows(results_of, scope, chunk):
            yield scope.pass_waves[chunk["wave"]], row


def _device_rows(db: sqlite3.Connection, scope: _Scope) -> Iterator[DeviceRow]:
    """One row per device, chunk by chunk: its final outcome — its latest pass's — once, with
    the outcome of each pass. The subtask rows the journal kept are read one task at a time (a
    million of them never sit in memory); only the devices of retry passes are held."""
    later: dict[str, list[tuple[int, DeviceRow]]] = {}
    for pass_no, row in _pass_rows(db, scope):
        later.setdefault(row.device_id, []).append((pass_no, row))
    results_of = db.cursor()
    for chunk in _chunks(db, scope, passes=False):
        for row in _chunk_rows(results_of, scope, chunk):
            retried = later.get(row.device_id)
            if retried is None:
                yield row  # _chunk_rows wrote it as the run's own pass
                continue
            history = " ".join([f"1:{row.outcome}", *(f"{n}:{r.outcome}" for n, r in retried)])
            final = retried[-1][1]
            yield final._replace(wave=row.wave, passes=1 + len(retried), pass_outcomes=history)


def _chunk_rows(
    results_of: sqlite3.Cursor, scope: _Scope, chunk: sqlite3.Row
) -> Iterator[DeviceRow]:
    """The rows of one chunk's devices, as of the run's own pass (`passes` 1). A group chunk
    lists its groups until its task is read, then the task's devices."""
    wave = scope.wave_names.get(chunk["wave"], "")
    chunk_id, state = chunk["chunk_id"], chunk["state"]
    op = chunk["operation_id"] or ""
    how = IN_TASK_BY.get(chunk["adopted"], "") if state == "submitted" else ""
    task = scope.tasks.get(op)
    if state != "submitted" or task is None:
        for device in chunk["members"].split("\n"):
            if state == "quarantined":
                q = results_of.execute(
                    "SELECT error_code, reason FROM quarantine WHERE run_id=? AND device_id=?",
                    (scope.run_id, device),
                ).fetchone()
                status = "quarantined"
                detail = f"{q[0]} {q[1]}".strip() if q else ""
            elif state != "submitted":
                status, detail = "not-submitted", ""
            else:
                status, detail = "unknown", "task not observed yet"
            yield DeviceRow(
                device,
                wave,
                chunk_id,
                op,
                "",
                status,
                False,
                detail,
                "",
                "",
                "",
                "",
                "",
                how,
                status,
                1,
                f"1:{status}",
            )
        return
    # one task: what its devices say unless the journal kept their own result
    if task["final"] and task["details_fetched"]:
        # every subtask was read: a device without a row was upgraded, version checked
        default = ("succeeded", Outcome.UPGRADED.value, "")
        checked = scope.version if task.get("verified") and not task.get("unreported") else ""
    elif task["final"]:
        default, checked = ("unknown", "unknown", "subtasks not read yet"), ""
    else:
        default, checked = ("in-progress", Outcome.IN_PROGRESS.value, ""), ""
    task_status = task["status"]
    created, finished = task["create_time"] or "", task["stop_time"] or ""
    results = {
        r["device_id"]: r
        for r in results_of.execute(
            "SELECT * FROM device_results WHERE run_id=? AND operation_id=?", (scope.run_id, op)
        )
    }
    members = chunk["members"].split("\n")
    if chunk["kind"] == "groups":
        if task["final"] and task["details_fetched"]:
            members = list(results)  # the platform's own expansion of the groups
        else:
            groups = f"device groups {', '.join(members)}: devices listed once read"
            default = (default[0], default[1], groups)
    for device in members:
        result = results.get(device)
        if result is None:
            status, outcome, detail = default
            yield DeviceRow(
                device,
                wave,
                chunk_id,
                op,
                task_status,
                status,
                outcome == Outcome.UPGRADED,
                detail,
                checked,
                created,
                finished,
                "",
                "",
                how,
                outcome,
                1,
                f"1:{outcome}",
            )
            continue
        reported = result["version"] or ""
        outcome = _outcome_of(result, scope.version)
        yield DeviceRow(
            device,
            wave,
            chunk_id,
            op,
            task_status,
            result["status"],
            outcome == Outcome.UPGRADED,
            result["detail"] or "",
            reported,
            created,
            finished,
            result["start_time"] or "",
            result["stop_time"] or "",
            how,
            outcome,
            1,
            f"1:{outcome}",
        )


def _outcome_of(result: sqlite3.Row, version: str) -> str:
    """The row's outcome as the monitor judged it (classified here for rows kept before
    outcomes were journaled)."""
    keys = result.keys()
    if "outcome" in keys and result["outcome"]:
        return str(result["outcome"])
    return classify(
        Status(result["status"]),
        result["detail"] or "",
        result["version"] or None,
        bool(result["start_time"]),
        version,
    ).value


def _left_out_rows(db: sqlite3.Connection, run_id: int) -> Iterator[DeviceRow]:
    """Devices the fleet file said already run the package's version: never sent."""
    for row in db.execute(
        "SELECT device_id, version FROM already_current WHERE run_id=? ORDER BY device_id",
        (run_id,),
    ):
        detail = f"left out: the fleet file says version {row['version']}"
        yield DeviceRow(
            row["device_id"],
            "",
            "",
            "",
            "",
            "not-submitted",
            False,
            detail,
            row["version"],
            "",
            "",
            "",
            "",
            "",
            Outcome.ALREADY_CURRENT.value,
            0,
            "",
        )


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
    return row.fetchone() is not None


# ---- CSV and JSON ------------------------------------------------------------------------------
def write_csv(data: ReportData, out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(DEVICE_COLUMNS)
    upgraded = DEVICE_COLUMNS.index("upgraded")
    for d in data.devices():
        writer.writerow((*d[:upgraded], "yes" if d.upgraded else "no", *d[upgraded + 1 :]))


def write_json(data: ReportData, out: TextIO) -> None:
    """One JSON object, written as it is read: lists one item per line, the devices and the
    quarantined devices streamed from the journal, never held whole."""
    sections: list[tuple[str, Any]] = [
        ("run", data.run),
        ("summary", data.totals),
        ("waves", data.waves),
        ("failure_reasons", [{"reason": r, "devices": n} for r, n in data.failure_reasons]),
        ("quarantined", data.quarantined()),
        ("duplicates", data.duplicates),
        ("calls", data.calls),
        ("tasks", data.tasks),
        ("progress", data.progress),
        ("passes", data.passes),
        ("devices", data.devices()),
    ]
    out.write("{")
    for index, (key, value) in enumerate(sections):
        out.write(("\n" if index == 0 else ",\n") + f" {json.dumps(key)}: ")
        if isinstance(value, dict):
            out.write(json.dumps(value, indent=1).replace("\n", "\n "))
            continue
        separator = "\n  "
        for item in value:
            text = _device_json(item) if isinstance(item, DeviceRow) else json.dumps(item)
            out.write(("[" if separator == "\n  " else "") + separator + text)
            separator = ",\n  "
        out.write("[]" if separator == "\n  " else "\n ]")
    out.write("\n}\n")


def write_jsonl(data: ReportData, out: TextIO) -> None:
    """JSON Lines: one object per device per line (the CSV's columns, `upgraded` a boolean,
    `passes` a number), streamed from the journal — for pipelines (`jq`, a log shipper)."""
    for device in data.devices():
        out.write(_device_json(device) + "\n")


def _device_json(device: DeviceRow) -> str:
    """One device as a JSON object (orjson: a million rows in seconds, not tens of them)."""
    return orjson.dumps(dict(zip(DEVICE_COLUMNS, device, strict=True))).decode()


def write_html(data: ReportData, out: TextIO) -> None:
    """The self-contained page (`report_html.py`), written section by section."""
    write_page(data, out)


WRITERS = {"csv": write_csv, "json": write_json, "jsonl": write_jsonl, "html": write_html}


def render_to_string(data: ReportData, fmt: str) -> str:
    buffer = io.StringIO()
    WRITERS[fmt](data, buffer)
    return buffer.getvalue()
