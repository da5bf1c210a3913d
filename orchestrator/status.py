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
        waves, passes = wave_summaries(db, run_id)
        # devices by final outcome (outcomes.py): each counted once, in its plan wave
        final_upgraded = sum(w["succeeded"] for w in waves)
        final_failed = sum(w["failed"] for w in waves)
        final_current = sum(w["already_current"] for w in waves)
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
            # version), failed (subtask read: less the already current, plus version
            # mismatches), already current (the platform's word, or left out by the fleet
            # file); failed_unread: a running task's failures whose subtasks are not read yet
            "devices_succeeded": final_upgraded,
            "devices_version_verified": verified,
            "devices_failed": max(0, final_failed),
            "devices_failed_unread": sum(w["failed_unread"] for w in waves),
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


def wave_summaries(
    db: sqlite3.Connection, run_id: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's plan waves and its retry passes, each with its devices by outcome — the one
    source of the per-wave counts of `rollout status` and the reports. A plan wave counts
    each of its devices once, by its final outcome (a retried device's latest pass's:
    `retried_outcomes`); a pass counts its own devices' outcomes in it. From the tasks'
    counters (`staResult`), corrected by the subtasks the monitor read (already current,
    version mismatch)."""
    schema_3 = _has_column(db, "device_results", "outcome")
    outcomes = _outcomes(db, run_id) if schema_3 else {}
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
    finals = retried_outcomes(db, run_id, {w: p[0] for w, p in retry_passes.items()})
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
        unread = 0
        if schema_3:  # versions checked, each device by its newest task; a failure whose
            # subtask is not read yet is not counted failed (it may be already current)
            counts = Journal.count_wave(db, run_id, wave)
            upgraded, failed = counts.upgraded, counts.failed_read
            current, w_devices = counts.already_current, counts.task_devices
            unread = counts.unread_failed
        retry = retry_passes.get(wave)
        # a plan wave: its devices by final outcome (a retried device's latest pass's);
        # a pass: its own devices' outcomes in it
        final = finals.get(wave, {}) if retry is None else {}
        (waves if retry is None else passes).append(
            {
                "wave": wave,
                "name": name,
                "targets": targets,
                "in_tasks": in_tasks,  # targets: devices, or groups for a group fleet
                "devices": w_devices,  # in the wave's tasks (staResult.total)
                "succeeded": upgraded + final.get("upgraded", 0),
                "failed": failed + final.get("failed", 0),
                "already_current": current + final.get("already_current", 0),
                # failed per the running tasks' counters, subtask not read yet: neither failed
                # nor already current yet — counted as not finished
                "failed_unread": unread,
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
    return waves, passes


FAILED_OUTCOMES = frozenset({"failed", "version-mismatch", "timed-out", "stopped"})


def _bucket(outcome: str) -> str:
    """The column a device's outcome counts in (outcomes.Outcome values, spelled out: status
    imports neither the client nor outcomes)."""
    if outcome == "upgraded":
        return "upgraded"
    if outcome == "already-current":
        return "already_current"
    return "failed" if outcome in FAILED_OUTCOMES else "in_progress"


def retried_outcomes(
    db: sqlite3.Connection, run_id: int, pass_waves: dict[int, int]
) -> dict[int, dict[str, int]]:
    """The one correction both `rollout status` and the reports apply to a plan wave's
    counts after retry passes: plan wave → change per column (upgraded, failed,
    already_current, in_progress) once each retried device counts by its final outcome —
    its latest pass's — instead of the failure that got it retried. A device's outcome in
    a pass: its kept subtask row, else upgraded when the pass's task is final and read,
    else in progress. Reads the passes' chunks and the kept rows of failed devices only."""
    if not pass_waves:
        return {}
    marks = ",".join("?" * len(pass_waves))
    latest: dict[str, str] = {}  # device → operationId of its newest pass (None: no task)
    for members, operation_id in db.execute(
        "SELECT members, operation_id FROM chunks WHERE run_id=? AND state='submitted'"
        f" AND wave IN ({marks}) ORDER BY wave",
        (run_id, *sorted(pass_waves, key=pass_waves.__getitem__)),
    ):
        for device in members.split("\n"):
            latest[device] = operation_id
    if not latest:
        return {}
    read = {
        op: bool(final and fetched)
        for op, final, fetched in db.execute(
            f"SELECT operation_id, final, details_fetched FROM tasks WHERE run_id=?"
            f" AND wave IN ({marks})",
            (run_id, *pass_waves),
        )
    }
    in_pass: dict[tuple[str, str], str] = {}  # (device, operationId) → outcome
    first: dict[str, tuple[int, str]] = {}  # device → (plan wave, outcome there)
    for device, operation_id, wave, outcome in db.execute(
        "SELECT d.device_id, d.operation_id, t.wave, d.outcome FROM device_results d JOIN"
        " tasks t ON t.run_id=d.run_id AND t.operation_id=d.operation_id WHERE d.run_id=?"
        " AND d.outcome != 'upgraded' ORDER BY t.chunk_id",
        (run_id,),
    ):
        if device not in latest:
            continue
        if wave in pass_waves:
            in_pass[(device, operation_id)] = outcome
        else:
            first.setdefault(device, (int(wave), outcome))
    changes: dict[int, dict[str, int]] = {}
    for device, operation_id in latest.items():
        start = first.get(device)
        if start is None:
            continue  # not a failure of a plan wave's task (nothing to move)
        wave, before = start
        outcome = in_pass.get((device, operation_id))
        if outcome is None:
            outcome = "upgraded" if read.get(operation_id) else "in-progress"
        change = changes.setdefault(wave, {})
        change[_bucket(before)] = change.get(_bucket(before), 0) - 1
        change[_bucket(outcome)] = change.get(_bucket(outcome), 0) + 1
    return changes


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
