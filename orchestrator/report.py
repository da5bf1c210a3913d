"""Rollout reports — CSV, JSON and a self-contained HTML page — from the journal alone.

One row per device (deviceId, wave, chunk, operationId, task status, subtask status,
upgraded, detail, version, timestamps), per-task and per-wave summaries, the quarantined
devices with their reason, the failure reasons, and the call budget spent per API.

What a device row can say is what the monitor learned at the least cost: a device of a
finished task that is not among its fetched non-success subtasks succeeded; a device of a
task still running is `in-progress`. A device counts as upgraded when its subtask succeeded
and the version it reports (when the platform gives one) is the package's.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from .errors import JournalError
from .journal import Journal
from .report_html import render


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
    in_task_by: str  # created | reconciled | census | second-claim ("" when in no task)


DEVICE_COLUMNS = DeviceRow._fields
FAILED_STATES = frozenset({"failed", "stopped"})
WAVE_COUNTS = ("upgraded", "failed", "in_progress", "quarantined", "not_submitted")
IN_PROGRESS_STATES = frozenset({"waiting", "processing", "in-progress", "unknown"})
IN_TASK_BY = {0: "created", 1: "reconciled", 2: "census", 3: "second-claim"}


@dataclass
class ReportData:
    """Everything a report shows. Device rows are streamed from the journal on demand (a
    million of them must not sit in memory); the totals were counted in one pass."""

    run: dict[str, Any]
    waves: list[dict[str, Any]]
    tasks: list[dict[str, Any]]
    quarantined: list[dict[str, Any]]
    duplicates: list[dict[str, Any]]  # targets in two or more tasks of the package
    calls: dict[str, int]
    progress: list[dict[str, Any]]
    totals: dict[str, int]
    failure_reasons: list[tuple[str, int]]
    devices: Callable[[], Iterator[DeviceRow]]  # a fresh pass over the journal each call


def _iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def collect(path: Path, plan_name: str) -> ReportData:
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
        results: dict[tuple[str, str], sqlite3.Row] = {
            (r["operation_id"], r["device_id"]): r
            for r in db.execute("SELECT * FROM device_results WHERE run_id=?", (run_id,))
        }
        quarantine = {
            r["device_id"]: dict(r)
            for r in db.execute(
                "SELECT * FROM quarantine WHERE run_id=? ORDER BY chunk_id", (run_id,)
            )
        }

        def rows() -> Iterator[DeviceRow]:
            reader = Journal.open_readonly(path)
            reader.row_factory = sqlite3.Row
            try:
                yield from _device_rows(
                    reader, run_id, wave_names, tasks, results, quarantine, version
                )
            finally:
                reader.close()

        per_wave: dict[str, Counter[str]] = {}
        reasons: Counter[str] = Counter()
        for device in rows():
            counts = per_wave.get(device.wave)
            if counts is None:
                counts = per_wave[device.wave] = Counter()
            counts["devices"] += 1
            counts["upgraded"] += device.upgraded
            if device.in_task_by:
                counts[f"in_task_by_{device.in_task_by}"] += 1
            status = device.subtask_status
            if status in FAILED_STATES:
                counts["failed"] += 1
                reasons[device.detail or status] += 1
            elif status in IN_PROGRESS_STATES:
                counts["in_progress"] += 1
            elif status == "quarantined":
                counts["quarantined"] += 1
            elif status == "not-submitted":
                counts["not_submitted"] += 1
        waves = []
        for w in db.execute("SELECT * FROM waves WHERE run_id=? ORDER BY wave", (run_id,)):
            counts = per_wave.get(w["name"], Counter())
            waves.append(
                {
                    "wave": w["name"],
                    "targets": w["target_count"],
                    **{key: counts[key] for key in WAVE_COUNTS},
                    "gate": w["gate_state"],
                    "gate_reason": w["gate_reason"] or "",
                    "approved": w["approved_at"] is not None,
                }
            )
        everything = sum(per_wave.values(), Counter())
        totals = {"devices": everything["devices"], **{k: everything[k] for k in WAVE_COUNTS}}
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
        task_rows = [
            {
                "operation_id": op,
                "chunk": t["chunk_id"],
                "wave": wave_names.get(t["wave"], ""),
                "status": t["status"],
                "total": t["total"],
                "succeeded": t["succeeded"],
                "failed": t["failed"] + t["stopped"],
                "in_progress": t["waiting"] + t["processing"],
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
        return ReportData(
            run_info,
            waves,
            task_rows,
            [
                {
                    "device_id": d,
                    "chunk": q["chunk_id"],
                    "error_code": q["error_code"],
                    "reason": q["reason"],
                }
                for d, q in quarantine.items()
            ],
            duplicates,
            calls,
            progress,
            {**totals, "tasks": len(task_rows), "calls": sum(calls.values())},
            reasons.most_common(),
            rows,
        )
    finally:
        db.close()


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


def _device_rows(
    db: sqlite3.Connection,
    run_id: int,
    wave_names: dict[int, str],
    tasks: dict[str, dict[str, Any]],
    results: dict[tuple[str, str], sqlite3.Row],
    quarantine: dict[str, dict[str, Any]],
    version: str,
) -> Iterator[DeviceRow]:
    for chunk in db.execute(
        "SELECT chunk_id, wave, members, state, operation_id, adopted FROM chunks"
        " WHERE run_id=? AND state != 'split' ORDER BY chunk_id",
        (run_id,),
    ):
        wave, chunk_id, state = wave_names.get(chunk["wave"], ""), chunk["chunk_id"], chunk["state"]
        op = chunk["operation_id"] or ""
        how = IN_TASK_BY.get(chunk["adopted"], "") if state == "submitted" else ""
        task = tasks.get(op)
        if state != "submitted" or task is None:
            for device in chunk["members"].split("\n"):
                if state == "quarantined":
                    q = quarantine.get(device, {})
                    status = "quarantined"
                    detail = f"{q.get('error_code', '')} {q.get('reason', '')}".strip()
                elif state != "submitted":
                    status, detail = "not-submitted", ""
                else:
                    status, detail = "unknown", "task not observed yet"
                yield DeviceRow(
                    device, wave, chunk_id, op, "", status, False, detail, "", "", "", "", "", how
                )
            continue
        # one task: what its devices say unless the monitor fetched their own result
        if task["final"] and (task["details_fetched"] or task["failed"] + task["stopped"] == 0):
            default_status, default_detail = "succeeded", ""
        elif task["final"]:
            default_status, default_detail = "unknown", "details not fetched yet"
        else:
            default_status, default_detail = "in-progress", ""
        task_status = task["status"]
        created, finished = task["create_time"] or "", task["stop_time"] or ""
        for device in chunk["members"].split("\n"):
            result = results.get((op, device))
            if result is None:
                yield DeviceRow(
                    device,
                    wave,
                    chunk_id,
                    op,
                    task_status,
                    default_status,
                    default_status == "succeeded",
                    default_detail,
                    "",
                    created,
                    finished,
                    "",
                    "",
                    how,
                )
                continue
            reported = result["version"] or ""
            upgraded = result["status"] == "succeeded" and (not reported or reported == version)
            yield DeviceRow(
                device,
                wave,
                chunk_id,
                op,
                task_status,
                result["status"],
                upgraded,
                result["detail"] or "",
                reported,
                created,
                finished,
                result["start_time"] or "",
                result["stop_time"] or "",
                how,
            )


# ---- CSV and JSON ------------------------------------------------------------------------------
def write_csv(data: ReportData, out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(DEVICE_COLUMNS)
    upgraded = DEVICE_COLUMNS.index("upgraded")
    for d in data.devices():
        writer.writerow((*d[:upgraded], "yes" if d.upgraded else "no", *d[upgraded + 1 :]))


def write_json(data: ReportData, out: TextIO) -> None:
    """One JSON object; the device list is written row by row, never held whole."""
    head = {
        "run": data.run,
        "summary": data.totals,
        "waves": data.waves,
        "failure_reasons": [{"reason": r, "devices": n} for r, n in data.failure_reasons],
        "quarantined": data.quarantined,
        "duplicates": data.duplicates,
        "calls": data.calls,
        "tasks": data.tasks,
        "progress": data.progress,
    }
    out.write(json.dumps(head, indent=1)[:-2] + ',\n "devices": [')
    for index, device in enumerate(data.devices()):
        out.write(("\n  " if index == 0 else ",\n  ") + json.dumps(device._asdict()))
    out.write("\n ]\n}\n")


def write_html(data: ReportData, out: TextIO) -> None:
    out.write(render(data))


WRITERS = {"csv": write_csv, "json": write_json, "html": write_html}


def render_to_string(data: ReportData, fmt: str) -> str:
    buffer = io.StringIO()
    WRITERS[fmt](data, buffer)
    return buffer.getvalue()
