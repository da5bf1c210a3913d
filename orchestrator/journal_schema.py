"""The journal's file: its SQLite schema, the states it records, its migrations, and what
the operating system or SQLite refusing it means (one line naming the fix).

journal.py reads and writes through this schema; status.py and reports read it read-only.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from .errors import JournalError

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY,
    plan_name TEXT NOT NULL,
    plan_path TEXT NOT NULL,
    plan_sha TEXT NOT NULL,
    fleet_sha TEXT NOT NULL,
    fleet_kind TEXT NOT NULL,
    target_count INTEGER NOT NULL,
    operation TEXT NOT NULL,
    file_id TEXT,
    package_version TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL,
    stop_reason TEXT,
    fingerprint TEXT,
    settings TEXT
);
CREATE TABLE IF NOT EXISTS chunks (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    chunk_id TEXT NOT NULL,
    wave INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL,
    members TEXT NOT NULL,
    member_count INTEGER NOT NULL,
    first_member TEXT NOT NULL,
    state TEXT NOT NULL,
    operation_id TEXT,
    adopted INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (run_id, chunk_id)
);
CREATE INDEX IF NOT EXISTS chunks_state ON chunks(run_id, state);
CREATE TABLE IF NOT EXISTS duplicates (
    run_id INTEGER NOT NULL,
    target TEXT NOT NULL,
    operation_ids TEXT NOT NULL,
    found_at REAL NOT NULL,
    PRIMARY KEY (run_id, target)
);
CREATE TABLE IF NOT EXISTS anomalies (
    anomaly_id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    attempt_id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    chunk_id TEXT NOT NULL,
    sent_at REAL NOT NULL,
    sent_platform REAL,
    finished_at REAL,
    outcome TEXT,
    http_status INTEGER,
    error_code TEXT,
    detail TEXT,
    operation_id TEXT
);
CREATE INDEX IF NOT EXISTS attempts_chunk ON attempts(run_id, chunk_id);
CREATE TABLE IF NOT EXISTS quarantine (
    run_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    error_code TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (run_id, device_id)
);
CREATE TABLE IF NOT EXISTS waves (
    run_id INTEGER NOT NULL,
    wave INTEGER NOT NULL,
    name TEXT NOT NULL,
    target_count INTEGER NOT NULL,
    gate_state TEXT NOT NULL DEFAULT 'pending',
    gate_reason TEXT,
    soak_until REAL,
    approved_at REAL,
    approved_by TEXT,
    updated_at REAL NOT NULL,
    gate_finished INTEGER,
    gate_failed INTEGER,
    approved_state TEXT,
    approved_finished INTEGER,
    approved_failed INTEGER,
    PRIMARY KEY (run_id, wave)
);
CREATE TABLE IF NOT EXISTS tasks (
    run_id INTEGER NOT NULL,
    operation_id TEXT NOT NULL,
    chunk_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    status TEXT NOT NULL,
    total INTEGER NOT NULL DEFAULT 0,
    waiting INTEGER NOT NULL DEFAULT 0,
    processing INTEGER NOT NULL DEFAULT 0,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    stopped INTEGER NOT NULL DEFAULT 0,
    timed_out INTEGER NOT NULL DEFAULT 0,
    create_time TEXT,
    start_time TEXT,
    stop_time TEXT,
    final INTEGER NOT NULL DEFAULT 0,
    details_fetched INTEGER NOT NULL DEFAULT 0,
    observed_at REAL,
    verified INTEGER NOT NULL DEFAULT 0,
    unreported INTEGER NOT NULL DEFAULT 0,
    fails_seen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, operation_id)
);
CREATE TABLE IF NOT EXISTS device_results (
    run_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    operation_id TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT,
    version TEXT,
    start_time TEXT,
    stop_time TEXT,
    outcome TEXT,
    PRIMARY KEY (run_id, device_id, operation_id)
);
CREATE INDEX IF NOT EXISTS device_results_task ON device_results(run_id, operation_id);
CREATE TABLE IF NOT EXISTS passes (
    run_id INTEGER NOT NULL,
    pass_no INTEGER NOT NULL,
    wave INTEGER NOT NULL,
    states TEXT NOT NULL,
    targets INTEGER NOT NULL,
    started_at REAL NOT NULL,
    platform_start REAL NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (run_id, pass_no)
);
CREATE TABLE IF NOT EXISTS already_current (
    run_id INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    version TEXT NOT NULL,
    PRIMARY KEY (run_id, device_id)
);
CREATE TABLE IF NOT EXISTS group_members (
    run_id INTEGER NOT NULL,
    group_name TEXT NOT NULL,
    members TEXT NOT NULL,
    read_at REAL NOT NULL,
    PRIMARY KEY (run_id, group_name)
);
CREATE TABLE IF NOT EXISTS api_calls (
    run_id INTEGER NOT NULL,
    api TEXT NOT NULL,
    calls INTEGER NOT NULL,
    PRIMARY KEY (run_id, api)
);
CREATE TABLE IF NOT EXISTS progress_samples (
    run_id INTEGER NOT NULL,
    at REAL NOT NULL,
    submitted INTEGER NOT NULL,
    finished INTEGER NOT NULL,
    succeeded INTEGER NOT NULL,
    failed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    event_id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

PENDING, INTENT, SUBMITTED, SPLIT, QUARANTINED, FAILED = (
    "pending",
    "intent",
    "submitted",
    "split",
    "quarantined",
    "failed",
)
FINAL_STATES = frozenset({SUBMITTED, SPLIT, QUARANTINED})
RUNNING, INTERRUPTED, COMPLETED, ABORTED = "running", "interrupted", "completed", "aborted"
WAITING = "waiting"  # a step (`--step`) ended cleanly; the rest needs time
# a retry pass still to finish (`rollout retry` or `resume` go on with it): a pass submitted
# without following ("submitted") too — it is not judged by the plan's last gate yet;
# completed and halted (its gate failed) passes are over
PASS_SUBMITTED = "submitted"  # engine.SUBMITTED_ALL
PASS_UNFINISHED = frozenset({RUNNING, INTERRUPTED, ABORTED, PASS_SUBMITTED})
SENT, RECONCILED, CENSUS, SECOND_CLAIM, UNCONFIRMED = 0, 1, 2, 3, 4  # chunks.adopted
UNIQUE_CLAIMS = (
    "CREATE UNIQUE INDEX IF NOT EXISTS chunks_operation ON chunks(run_id, operation_id)"
    " WHERE operation_id IS NOT NULL AND adopted IN (0, 1)"
)


# columns added after schema 1, in the order they came (ALTER TABLE appends them)
ADDED_COLUMNS = (
    ("runs", "fingerprint", "TEXT"),  # 2
    ("runs", "settings", "TEXT"),
    ("attempts", "sent_platform", "REAL"),
    ("waves", "gate_finished", "INTEGER"),  # 3: the verdict's numbers, and what was approved
    ("waves", "gate_failed", "INTEGER"),
    ("waves", "approved_state", "TEXT"),
    ("waves", "approved_finished", "INTEGER"),
    ("waves", "approved_failed", "INTEGER"),
    ("tasks", "verified", "INTEGER NOT NULL DEFAULT 0"),  # 3: versions checked
    ("tasks", "unreported", "INTEGER NOT NULL DEFAULT 0"),
    ("tasks", "fails_seen", "INTEGER NOT NULL DEFAULT 0"),
    ("device_results", "outcome", "TEXT"),  # 3: outcomes.Outcome
)
SQLITE_IOERR, SQLITE_READONLY, SQLITE_FULL, SQLITE_CANTOPEN = 10, 8, 13, 14
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def journal_fault(path: Path, exc: BaseException) -> JournalError:
    """What the operating system or SQLite refused, as one line that names the fix.

    A full disk leaves the journal consistent — SQLite rolls the failed transaction back, and
    a create is sent only after its intent was committed — so `resume` after freeing space
    finishes the run."""
    folder = path.parent
    number = exc.errno if isinstance(exc, OSError) else None
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if number in FULL_ERRNOS or primary == SQLITE_FULL:
        return JournalError(
            f"{path}: the disk holding the journal is full; free space, then the same command "
            "again — `rollout resume` once a run has started (the journal is consistent: "
            "nothing in flight is lost)"
        )
    if number in READ_ONLY_ERRNOS or primary == SQLITE_READONLY:
        return JournalError(
            f"{folder}: the journal's folder is not writable here; make it writable, or pass "
            "--journal PATH to keep the journal elsewhere"
        )
    if number in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG):
        reason = (
            "a file is in the way"
            if number in (errno.ENOTDIR, errno.EEXIST)
            else ("its path is too long" if number == errno.ENAMETOOLONG else "a parent is missing")
        )
        return JournalError(
            f"{folder}: cannot create the journal's folder ({reason}); pass --journal PATH "
            "to keep the journal elsewhere"
        )
    if primary == SQLITE_CANTOPEN:
        return JournalError(
            f"{path}: cannot open the journal (its folder is missing or not writable); pass "
            "--journal PATH to keep it elsewhere"
        )
    if number is not None or primary == SQLITE_IOERR:
        said = exc.strerror if isinstance(exc, OSError) and exc.strerror else "I/O error"
        return JournalError(f"{path}: the disk refused the journal ({said.lower()})")
    return JournalError(f"{path}: not a usable journal ({exc})")


def migrate(connection: sqlite3.Connection, found: int, path: Path) -> None:
    """Bring an older journal to this schema (in place, in one transaction)."""
    if found > SCHEMA_VERSION:
        raise JournalError(
            f"{path}: journal schema {found} is newer than this rollout ({SCHEMA_VERSION})"
        )
    connection.execute("BEGIN IMMEDIATE")
    for table, column, declaration in ADDED_COLUMNS:
        columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    connection.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
    connection.execute("COMMIT")
