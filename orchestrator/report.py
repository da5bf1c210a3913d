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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from .errors import JournalError
from .journal import Journal
from .report_html import render

DEVICE_COLUMNS = (
    "device_id",
    "wave",
    "chunk",
    "operation_id",
    "task_status",
    "subtask_status",
    "upgraded",
    "detail",
    "version",
    "task_created",
    "task_finished",
    "device_started",
    "device_finished",
)


@dataclass(frozen=True)
class DeviceRow:
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


@dataclass
class ReportData:
    run: dict[str, Any]
    waves: list[dict[str, Any]]
    tasks: list[dict[str, Any]]
    quarantined: list[dict[str, Any]]
    calls: dict[str, int]
    progress: list[dict[str, Any]]
    devices: list[DeviceRow]

    @property
    def failure_reasons(self) -> list[tuple[str, int]]:
        reasons = Counter(
            d.detail or d.subtask_status
            for d in self.devices
            if d.subtask_status in ("failed", "stopped")
        )
        return reasons.most_common()

    @property
    def totals(self) -> dict[str, int]:
        counts = Counter(d.subtask_status for d in self.devices)
        return {
            "devices": len(self.devices),
            "upgraded": sum(d.upgraded for d in self.devices),
            "failed": counts["failed"] + counts["stopped"],
            "in_progress": counts["waiting"]
            + counts["processing"]
            + counts["in-progress"]
            + counts["unknown"],
            "quarantined": counts["quarantined"],
            "not_submitted": counts["not-submitted"],
            "tasks": len(self.tasks),
            "calls": sum(self.calls.values()),
        }


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
        devices = list(_device_rows(db, run_id, wave_names, tasks, results, quarantine, version))
        waves = []
        for w in db.execute("SELECT * FROM waves WHERE run_id=? ORDER BY wave", (run_id,)):
            rows = [d for d in devices if d.wave == w["name"]]
            waves.append(
                {
                    "wave": w["name"],
                    "targets": w["target_count"],
                    "upgraded": sum(d.upgraded for d in rows),
                    "failed": sum(d.subtask_status in ("failed", "stopped") for d in rows),
                    "in_progress": sum(
                        d.subtask_status in ("waiting", "processing", "in-progress", "unknown")
                        for d in rows
                    ),
                    "quarantined": sum(d.subtask_status == "quarantined" for d in rows),
                    "not_submitted": sum(d.subtask_status == "not-submitted" for d in rows),
                    "gate": w["gate_state"],
                    "gate_reason": w["gate_reason"] or "",
                    "approved": w["approved_at"] is not None,
                }
            )
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
            calls,
            progress,
            devices,
        )
    finally:
        db.close()


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
        "SELECT chunk_id, wave, members, state, operation_id FROM chunks"
        " WHERE run_id=? AND state != 'split' ORDER BY chunk_id",
        (run_id,),
    ):
        wave = wave_names.get(chunk["wave"], "")
        op = chunk["operation_id"] or ""
        task = tasks.get(op)
        for device in chunk["members"].split("\n"):
            row = dict(
                device_id=device,
                wave=wave,
                chunk=chunk["chunk_id"],
                operation_id=op,
                task_status="",
                subtask_status="",
                upgraded=False,
                detail="",
                version="",
                task_created="",
                task_finished="",
                device_started="",
                device_finished="",
            )
            if chunk["state"] == "quarantined":
                q = quarantine.get(device, {})
                row.update(
                    subtask_status="quarantined",
                    detail=f"{q.get('error_code', '')} {q.get('reason', '')}".strip(),
                )
            elif chunk["state"] != "submitted":
                row.update(subtask_status="not-submitted")
            elif task is None:
                row.update(subtask_status="unknown", detail="task not observed yet")
            else:
                row.update(
                    task_status=task["status"],
                    task_created=task["create_time"] or "",
                    task_finished=task["stop_time"] or "",
                )
                result = results.get((op, device))
                if result is not None:
                    row.update(
                        subtask_status=result["status"],
                        detail=result["detail"] or "",
                        version=result["version"] or "",
                        device_started=result["start_time"] or "",
                        device_finished=result["stop_time"] or "",
                    )
                elif task["final"] and (
                    task["details_fetched"] or task["failed"] + task["stopped"] == 0
                ):
                    row.update(subtask_status="succeeded")
                elif task["final"]:
                    row.update(subtask_status="unknown", detail="details not fetched yet")
                else:
                    row.update(subtask_status="in-progress")
                reported = row["version"]
                row["upgraded"] = row["subtask_status"] == "succeeded" and (
                    not reported or reported == version
                )
            yield DeviceRow(**row)


# ---- CSV and JSON ------------------------------------------------------------------------------
def write_csv(data: ReportData, out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(DEVICE_COLUMNS)
    for d in data.devices:
        writer.writerow(
            [
                getattr(d, c) if c != "upgraded" else ("yes" if d.upgraded else "no")
                for c in DEVICE_COLUMNS
            ]
        )


def as_json(data: ReportData) -> dict[str, Any]:
    return {
        "run": data.run,
        "summary": data.totals,
        "waves": data.waves,
        "failure_reasons": [{"reason": r, "devices": n} for r, n in data.failure_reasons],
        "quarantined": data.quarantined,
        "calls": data.calls,
        "tasks": data.tasks,
        "progress": data.progress,
        "devices": [asdict(d) for d in data.devices],
    }


def write_json(data: ReportData, out: TextIO) -> None:
    json.dump(as_json(data), out, indent=1)
    out.write("\n")


def write_html(data: ReportData, out: TextIO) -> None:
    out.write(render(data))


WRITERS = {"csv": write_csv, "json": write_json, "html": write_html}


def render_to_string(data: ReportData, fmt: str) -> str:
    buffer = io.StringIO()
    WRITERS[fmt](data, buffer)
    return buffer.getvalue()
