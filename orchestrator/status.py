"""What a run looks like, read from the journal alone (no platform call)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from .errors import JournalError
from .journal import Journal


def read_status(path: Path, plan_name: str) -> dict[str, Any]:
    db: sqlite3.Connection = Journal.open_readonly(path)
    try:
        run = db.execute(
            "SELECT run_id, status, stop_reason, target_count, file_id, created_at, updated_at,"
            " fleet_kind FROM runs WHERE plan_name=? ORDER BY run_id DESC LIMIT 1",
            (plan_name,),
        ).fetchone()
        if run is None:
            raise JournalError(f"{path}: no run of plan {plan_name!r}")
        run_id = run[0]
        chunks = {
            state: {"chunks": n, "targets": m or 0}
            for state, n, m in db.execute(
                "SELECT state, COUNT(*), SUM(member_count) FROM chunks WHERE run_id=?"
                " GROUP BY state",
                (run_id,),
            )
        }
        attempts = dict(
            db.execute(
                "SELECT COALESCE(outcome, 'in-flight'), COUNT(*) FROM attempts WHERE run_id=?"
                " GROUP BY 1",
                (run_id,),
            ).fetchall()
        )
        quarantined = [
            {"target": t, "chunk": c, "error_code": e, "reason": r}
            for t, c, e, r in db.execute(
                "SELECT device_id, chunk_id, error_code, reason FROM quarantine WHERE run_id=?"
                " ORDER BY chunk_id",
                (run_id,),
            )
        ]
        duplicate_events = db.execute(
            "SELECT COUNT(*) FROM events WHERE run_id=? AND kind='duplicate-tasks'", (run_id,)
        ).fetchone()[0]
        schema_2 = _has_table(db, "duplicates")  # a journal not yet opened by this version
        duplicates = (
            db.execute("SELECT COUNT(*) FROM duplicates WHERE run_id=?", (run_id,)).fetchone()[0]
            if schema_2
            else 0
        )
        duplicate_examples = [
            {"target": t, "operation_ids": json.loads(ops)}
            for t, ops in (
                db.execute(
                    "SELECT target, operation_ids FROM duplicates WHERE run_id=? ORDER BY target"
                    " LIMIT 20",
                    (run_id,),
                )
                if schema_2
                else []
            )
        ]
        in_task_by = {
            {
                0: "created",
                1: "reconciled",
                2: "census",
                3: "second-claim",
                4: "census-unconfirmed",
            }.get(how, str(how)): n
            for how, n in db.execute(
                "SELECT adopted, COALESCE(SUM(member_count), 0) FROM chunks WHERE run_id=?"
                " AND state='submitted' GROUP BY adopted",
                (run_id,),
            )
        }
        anomalies = (
            db.execute("SELECT COUNT(*) FROM anomalies WHERE run_id=?", (run_id,)).fetchone()[0]
            if schema_2
            else 0
        )
        tasks_final, tasks_known = db.execute(
            "SELECT COALESCE(SUM(final), 0), COUNT(*) FROM tasks WHERE run_id=?", (run_id,)
        ).fetchone()
        schema_3 = _has_column(db, "device_results", "outcome")
        outcomes = _outcomes(db, run_id) if schema_3 else {}
        verified = (
            db.execute(
                "SELECT COALESCE(SUM(verified), 0) FROM tasks WHERE run_id=?", (run_id,)
            ).fetchone()[0]
            if schema_3
            else 0
        )
        left_out = 0  # devices the fleet file says are already current: never sent
        if _has_table(db, "already_current"):
            query = "SELECT COUNT(*) FROM already_current WHERE run_id=?"
            left_out = db.execute(query, (run_id,)).fetchone()[0]
        retry_passes = (
            {
                int(wave): (pass_no, json.loads(states), status, targets, reason)
                for pass_no, wave, states, status, targets, reason in db.execute(
                    "SELECT pass_no, wave, states, status, targets, reason FROM passes"
                    " WHERE run_id=? ORDER BY pass_no",
                    (run_id,),
                )
            }
            if _has_table(db, "passes")
            else {}
        )
        waves: list[dict[str, Any]] = []
        passes: list[dict[str, Any]] = []
        for wave, name, targets, gate, reason, soak_until, approved_at in db.execute(
            "SELECT wave, name, target_count, gate_state, gate_reason, soak_until,"
            " approved_at FROM waves WHERE run_id=? ORDER BY wave",
            (run_id,),
        ).fetchall():
            in_tasks, w_succeeded, w_failed, w_devices = db.execute(
                "SELECT (SELECT COALESCE(SUM(member_count), 0) FROM chunks WHERE run_id=?1"
                " AND wave=?2 AND state='submitted'), COALESCE(SUM(succeeded), 0),"
                " COALESCE(SUM(failed + stopped), 0), COALESCE(SUM(total), 0) FROM tasks"
                " WHERE run_id=?1 AND wave=?2",
                (run_id, wave),
            ).fetchone()
            current, mismatched = outcomes.get(wave, (0, 0))
            upgraded, failed = w_succeeded - mismatched, max(0, w_failed - current) + mismatched
            if schema_3:  # as the gates count: versions checked, each device by its newest task
                counts = Journal.count_wave(db, run_id, wave)
                upgraded, failed = counts.upgraded, counts.real_failed
                current, w_devices = counts.already_current, counts.task_devices
            retry = retry_passes.get(wave)
            (waves if retry is None else passes).append(
                {
                    "wave": wave,
                    "name": name,
                    "targets": targets,
                    "in_tasks": in_tasks,  # targets: devices, or groups for a group fleet
                    "devices": w_devices,  # in the wave's tasks (staResult.total)
                    "succeeded": upgraded,
                    "failed": failed,
                    "already_current": current,
                    "gate": gate,
                    "gate_reason": reason,
                    "soak_until": soak_until,
                    "approved": approved_at is not None,
                }
                | (
                    {}
                    if retry is None
                    else {
                        "pass": retry[0],
                        "states": retry[1],
                        "pass_status": retry[2],
                        "stop_reason": retry[4],
                    }
                )
            )
        # devices by final outcome (outcomes.py), across passes: each pass's devices were
        # failures of an earlier pass, so they leave the failed of the pass before
        final_upgraded = sum(w["succeeded"] for w in waves + passes)
        final_failed = sum(w["failed"] for w in waves + passes) - sum(w["targets"] for w in passes)
        final_current = sum(w["already_current"] for w in waves + passes)
        plan_waves = [w["wave"] for w in waves]
        submitted = _plan_count(
            db,
            run_id,
            plan_waves,
            "SELECT COALESCE(SUM(member_count), 0) FROM chunks"
            " WHERE run_id=? AND state='submitted'",
        )
        in_plan_quarantine = _plan_count(
            db,
            run_id,
            plan_waves,
            "SELECT COUNT(*) FROM quarantine q JOIN chunks c ON c.run_id=q.run_id"
            " AND c.chunk_id=q.chunk_id WHERE q.run_id=?",
            "c.wave",
        )
        calls = dict(
            db.execute(
                "SELECT api, calls FROM api_calls WHERE run_id=? ORDER BY api", (run_id,)
            ).fetchall()
        )
        return {
            "plan": plan_name,
            "journal": str(path),
            "run_id": run_id,
            "status": run[1],
            "stop_reason": run[2],
            "file_id": run[4],
            "targets": run[3],
            "target_kind": run[7],
            "targets_in_tasks": submitted,
            "targets_quarantined": in_plan_quarantine,
            "targets_remaining": run[3] - submitted - in_plan_quarantine,
            # devices by final outcome: upgraded (succeeded and reporting the package's
            # version), failed (less the already current, plus version mismatches), already
            # current (the platform's word, or left out by the fleet file)
            "devices_succeeded": final_upgraded,
            "devices_version_verified": verified,
            "devices_failed": max(0, final_failed),
            "devices_already_current": final_current + left_out,
            "devices_left_out_already_current": left_out,
            "tasks_final": tasks_final,
            "tasks_observed": tasks_known,
            "waves": waves,
            "passes": passes,
            "chunks": chunks,
            "attempts": attempts,
            "quarantined": quarantined,
            "targets_in_tasks_by": in_task_by,
            "duplicate_task_events": duplicate_events,
            "duplicates": duplicates,
            "duplicate_examples": duplicate_examples,
            "anomalies": anomalies,
            "calls": calls,
            "created_at": run[5],
            "updated_at": run[6],
        }
    finally:
        db.close()


def _outcomes(db: sqlite3.Connection, run_id: int) -> dict[int, tuple[int, int]]:
    """wave → (already current, version mismatch) devices, from the subtasks read."""
    return {
        int(wave): (int(current), int(mismatched))
        for wave, current, mismatched in db.execute(
            "SELECT t.wave, COALESCE(SUM(d.outcome='already-current'), 0),"
            " COALESCE(SUM(d.outcome='version-mismatch'), 0) FROM device_results d"
            " JOIN tasks t ON t.run_id=d.run_id AND t.operation_id=d.operation_id"
            " WHERE d.run_id=? GROUP BY t.wave",
            (run_id,),
        )
    }


def _plan_count(
    db: sqlite3.Connection, run_id: int, waves: list[int], query: str, column: str = "wave"
) -> int:
    """A count over the chunks of the plan's waves (not those of retry passes)."""
    marks = ",".join("?" * len(waves)) or "NULL"
    row = db.execute(f"{query} AND {column} IN ({marks})", (run_id, *waves)).fetchone()
    return int(row[0])


def _has_column(db: sqlite3.Connection, table: str, column: str) -> bool:
    return any(row[1] == column for row in db.execute(f"PRAGMA table_info({table})"))


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,))
    return row.fetchone() is not None
