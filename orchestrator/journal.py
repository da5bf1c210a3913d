"""The journal: one SQLite file per plan, the single source of truth of a rollout.

Write-ahead: an attempt's *intent* is committed (WAL, `synchronous=FULL`, so it survives a
power cut) before its request leaves; its *outcome* after the reply. A chunk whose last
attempt has an intent and no outcome — the process died in between, or the reply was
ambiguous — is reconciled against the platform before anything else is sent for it.

It holds no secret (the app secret and tokens never reach it), it is created with mode 0600,
and one process at a time may drive it (an exclusive `flock` on `<journal>.lock`, released
by the kernel even on SIGKILL).

Chunk states: pending → intent → submitted | split | quarantined | failed
(intent → pending again when reconciliation proves nothing was created; failed → pending
again when the run is resumed after a plan-level refusal). `chunks.adopted` says how a
submitted chunk got its task: 0 our create's reply, 1 reconciled after an ambiguous create,
2 found by the census (whatever process, folder or run created it), 3 a second claim on an
operationId that already belongs to another chunk (an anomaly, also in `anomalies`).

The default journal lives beside the plan file (`<plan dir>/.rollout/<name>.journal.sqlite`),
so the same plan run from another working directory finds its journal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import JournalError
from .planner import Chunk, Wave

if TYPE_CHECKING:  # the journal keeps what the client read; it needs not the client itself
    from .northbound import SubOperation, Task

SCHEMA_VERSION = 2
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
    PRIMARY KEY (run_id, device_id, operation_id)
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
SENT, RECONCILED, CENSUS, SECOND_CLAIM = 0, 1, 2, 3  # chunks.adopted
UNIQUE_CLAIMS = (
    "CREATE UNIQUE INDEX IF NOT EXISTS chunks_operation ON chunks(run_id, operation_id)"
    " WHERE operation_id IS NOT NULL AND adopted IN (0, 1)"
)


@dataclass(frozen=True)
class RunRow:
    run_id: int
    plan_name: str
    plan_sha: str
    fleet_sha: str
    fleet_kind: str
    target_count: int
    operation: str
    file_id: str | None
    created_at: float
    status: str
    stop_reason: str | None
    fingerprint: str | None
    settings: str | None


@dataclass(frozen=True)
class ChunkRow:
    chunk_id: str
    kind: str
    members: list[str]
    state: str
    operation_id: str | None
    last_error: str | None
    wave: int

    def as_chunk(self) -> Chunk:
        return Chunk(self.chunk_id, self.kind, self.members, self.wave)


@dataclass(frozen=True)
class WaveRow:
    wave: int
    name: str
    target_count: int
    gate_state: str
    gate_reason: str | None
    soak_until: float | None
    approved_at: float | None


@dataclass(frozen=True)
class WaveCounts:
    """Targets of a wave by where they stand, from the journal."""

    targets: int
    submitted: int
    quarantined: int
    tasks: int
    final_tasks: int
    succeeded: int
    failed: int

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed


def default_journal_path(plan_name: str, plan_dir: Path) -> Path:
    """`<plan dir>/.rollout/<name>.journal.sqlite`: beside the plan, whatever the cwd."""
    return plan_dir.absolute() / ".rollout" / f"{plan_name}.journal.sqlite"


def _migrate(connection: sqlite3.Connection, found: int, path: Path) -> None:
    """Bring an older journal to this schema (in place, in one transaction)."""
    if found > SCHEMA_VERSION:
        raise JournalError(
            f"{path}: journal schema {found} is newer than this rollout ({SCHEMA_VERSION})"
        )
    connection.execute("BEGIN IMMEDIATE")
    if found < 2:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(runs)")}
        for column in ("fingerprint", "settings"):
            if column not in columns:
                connection.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
    connection.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
    connection.execute("COMMIT")


class Journal:
    def __init__(self, path: Path, connection: sqlite3.Connection, lock_fd: int) -> None:
        self.path = path
        self._db = connection
        self._lock_fd = lock_fd

    # ---- opening, locking --------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> Journal:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise JournalError(
                f"{path}: another rollout process is driving this journal (lock held)"
            ) from None
        try:
            if not path.exists():
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
            connection = sqlite3.connect(path, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.executescript(SCHEMA)
            row = connection.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                connection.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                _migrate(connection, int(row[0]), path)
            connection.execute(UNIQUE_CLAIMS)
        except sqlite3.DatabaseError as exc:
            os.close(lock_fd)
            raise JournalError(f"{path}: not a usable journal ({exc})") from None
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, connection, lock_fd)

    @classmethod
    def open_readonly(cls, path: Path) -> sqlite3.Connection:
        """A read-only view for `status` and reports while a run may be going on."""
        if not path.exists():
            raise JournalError(f"{path}: no journal here (has this plan been run?)")
        return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)

    def close(self) -> None:
        self._db.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ---- runs --------------------------------------------------------------------------------
    def latest_run(self, plan_name: str) -> RunRow | None:
        row = self._db.execute(
            "SELECT run_id, plan_name, plan_sha, fleet_sha, fleet_kind, target_count, operation,"
            " file_id, created_at, status, stop_reason, fingerprint, settings FROM runs"
            " WHERE plan_name=?"
            " ORDER BY run_id DESC LIMIT 1",
            (plan_name,),
        ).fetchone()
        return RunRow(*row) if row else None

    def create_run(
        self,
        *,
        plan_name: str,
        plan_path: str,
        plan_sha: str,
        fleet_sha: str,
        fleet_kind: str,
        target_count: int,
        operation: str,
        chunks: Iterable[Chunk],
        waves: Iterable[Wave],
        fingerprint: str | None = None,
        settings: str | None = None,
    ) -> int:
        now = time.time()
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO runs (plan_name, plan_path, plan_sha, fleet_sha, fleet_kind,"
                " target_count, operation, created_at, updated_at, status, fingerprint,"
                " settings) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    plan_name,
                    plan_path,
                    plan_sha,
                    fleet_sha,
                    fleet_kind,
                    target_count,
                    operation,
                    now,
                    now,
                    RUNNING,
                    fingerprint,
                    settings,
                ),
            )
            run_id = int(cursor.lastrowid or 0)
            self._insert_chunks(db, run_id, chunks, now)
            db.executemany(
                "INSERT INTO waves (run_id, wave, name, target_count, updated_at)"
                " VALUES (?,?,?,?,?)",
                ((run_id, w.index, w.name, len(w.members), now) for w in waves),
            )
            self._event(db, run_id, "run-created", {"targets": target_count})
        return run_id

    @staticmethod
    def _insert_chunks(
        db: sqlite3.Connection, run_id: int, chunks: Iterable[Chunk], now: float
    ) -> None:
        db.executemany(
            "INSERT OR IGNORE INTO chunks (run_id, chunk_id, wave, kind, members, member_count,"
            " first_member, state, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                (
                    run_id,
                    c.chunk_id,
                    c.wave,
                    c.kind,
                    "\n".join(c.members),
                    len(c.members),
                    c.members[0],
                    PENDING,
                    now,
                )
                for c in chunks
            ),
        )

    def set_package(self, run_id: int, file_id: str, version: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET file_id=?, package_version=?, updated_at=? WHERE run_id=?",
                (file_id, version, time.time(), run_id),
            )

    def set_settings(self, run_id: int, plan_sha: str, settings: str) -> None:
        """The plan as the run now goes on (edits in non-pinned fields are allowed)."""
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET plan_sha=?, settings=?, updated_at=? WHERE run_id=?",
                (plan_sha, settings, time.time(), run_id),
            )

    def set_status(self, run_id: int, status: str, reason: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET status=?, stop_reason=?, updated_at=? WHERE run_id=?",
                (status, reason, time.time(), run_id),
            )
            self._event(db, run_id, f"run-{status}", {"reason": reason} if reason else {})

    def event(self, run_id: int, kind: str, detail: dict[str, Any]) -> None:
        with self._tx() as db:
            self._event(db, run_id, kind, detail)

    def remember(self, run_id: int, key: str, value: Any) -> None:
        """Keep a small JSON value of the run between processes (the `meta` table): the
        package a step resolved, the monitor's page cursor."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (f"run{run_id}:{key}", json.dumps(value, sort_keys=True)),
            )

    def recall(self, run_id: int, key: str) -> Any:
        """What `remember` kept (None when nothing was)."""
        row = self._db.execute(
            "SELECT value FROM meta WHERE key=?", (f"run{run_id}:{key}",)
        ).fetchone()
        return json.loads(row[0]) if row else None

    @staticmethod
    def _event(db: sqlite3.Connection, run_id: int, kind: str, detail: dict[str, Any]) -> None:
        db.execute(
            "INSERT INTO events (run_id, at, kind, detail) VALUES (?,?,?,?)",
            (run_id, time.time(), kind, json.dumps(detail, sort_keys=True)),
        )

    # ---- chunks ------------------------------------------------------------------------------
    def chunks(
        self, run_id: int, states: Iterable[str] | None = None, wave: int | None = None
    ) -> list[ChunkRow]:
        query = (
            "SELECT chunk_id, kind, members, state, operation_id, last_error, wave"
            " FROM chunks WHERE run_id=?"
        )
        params: list[Any] = [run_id]
        if wave is not None:
            query += " AND wave=?"
            params.append(wave)
        if states is not None:
            wanted = list(states)
            query += f" AND state IN ({','.join('?' * len(wanted))})"
            params += wanted
        rows = self._db.execute(query + " ORDER BY chunk_id", params).fetchall()
        return [ChunkRow(r[0], r[1], r[2].split("\n"), r[3], r[4], r[5], r[6]) for r in rows]

    def first_intent_at(self, run_id: int, chunk_id: str) -> float | None:
        row = self._db.execute(
            "SELECT MIN(sent_at) FROM attempts WHERE run_id=? AND chunk_id=?", (run_id, chunk_id)
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def record_intent(self, run_id: int, chunk_id: str) -> int:
        """Committed durably before the create request leaves."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO attempts (run_id, chunk_id, sent_at) VALUES (?,?,?)",
                (run_id, chunk_id, time.time()),
            )
            db.execute(
                "UPDATE chunks SET state=?, updated_at=? WHERE run_id=? AND chunk_id=?",
                (INTENT, time.time(), run_id, chunk_id),
            )
        return int(cursor.lastrowid or 0)

    def touch_intent(self, attempt_id: int) -> None:
        """The attempt leaves again (its earlier send was refused without effect): its send
        time is now, so settling counts from the send that may act."""
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET sent_at=? WHERE attempt_id=?", (time.time(), attempt_id)
            )

    def _finish_attempt(
        self,
        db: sqlite3.Connection,
        attempt_id: int,
        outcome: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        detail: str | None = None,
        operation_id: str | None = None,
    ) -> None:
        db.execute(
            "UPDATE attempts SET finished_at=?, outcome=?, http_status=?, error_code=?, detail=?,"
            " operation_id=? WHERE attempt_id=?",
            (time.time(), outcome, http_status, error_code, detail, operation_id, attempt_id),
        )

    def _set_chunk(
        self,
        db: sqlite3.Connection,
        run_id: int,
        chunk_id: str,
        state: str,
        operation_id: str | None = None,
        last_error: str | None = None,
        adopted: int = SENT,
    ) -> None:
        db.execute(
            "UPDATE chunks SET state=?, operation_id=COALESCE(?, operation_id), last_error=?,"
            " adopted=MAX(adopted, ?), updated_at=? WHERE run_id=? AND chunk_id=?",
            (state, operation_id, last_error, adopted, time.time(), run_id, chunk_id),
        )

    def _claim(
        self,
        db: sqlite3.Connection,
        run_id: int,
        chunk_id: str,
        operation_id: str,
        adopted: int,
    ) -> bool:
        """Give the chunk its operationId. An operationId belongs to one chunk at most (a
        unique index): a second claim is kept, marked, and recorded as an anomaly."""
        db.execute("SAVEPOINT claim")
        try:
            self._set_chunk(db, run_id, chunk_id, SUBMITTED, operation_id, adopted=adopted)
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK TO claim")
            db.execute("RELEASE claim")
            self._set_chunk(db, run_id, chunk_id, SUBMITTED, operation_id, adopted=SECOND_CLAIM)
            owner = db.execute(
                "SELECT chunk_id FROM chunks WHERE run_id=? AND operation_id=? AND adopted IN"
                " (0, 1) AND chunk_id != ?",
                (run_id, operation_id, chunk_id),
            ).fetchone()
            detail = {"operationId": operation_id, "chunk": chunk_id, "owner": owner[0]}
            db.execute(
                "INSERT INTO anomalies (run_id, at, kind, detail) VALUES (?,?,?,?)",
                (run_id, time.time(), "second-claim", json.dumps(detail, sort_keys=True)),
            )
            self._event(db, run_id, "anomaly-second-claim", detail)
            return False
        db.execute("RELEASE claim")
        return True

    def record_created(
        self, run_id: int, chunk_id: str, attempt_id: int, operation_id: str
    ) -> None:
        with self._tx() as db:
            self._finish_attempt(
                db, attempt_id, "created", http_status=200, operation_id=operation_id
            )
            self._claim(db, run_id, chunk_id, operation_id, SENT)

    def record_failed_attempt(
        self,
        run_id: int,
        chunk_id: str,
        attempt_id: int,
        outcome: str,
        new_state: str,
        http_status: int | None,
        error_code: str | None,
        detail: str,
    ) -> None:
        """An attempt that did not return an operationId: `ambiguous` keeps the chunk in
        `intent` (to be reconciled); `refused` and `not-sent` certainly created nothing."""
        with self._tx() as db:
            self._finish_attempt(
                db,
                attempt_id,
                outcome,
                http_status=http_status,
                error_code=error_code,
                detail=detail,
            )
            self._set_chunk(db, run_id, chunk_id, new_state, last_error=detail)

    def record_adopted(
        self,
        run_id: int,
        chunk_id: str,
        operation_id: str,
        duplicates: list[str],
        how: int = RECONCILED,
    ) -> None:
        """The platform holds the chunk in `operation_id` (found by reconciliation after an
        ambiguous create, or by the census); `duplicates` are further tasks holding it."""
        with self._tx() as db:
            self._close_open_attempts(db, run_id, chunk_id)
            self._claim(db, run_id, chunk_id, operation_id, how)
            kind = "census-adopted" if how == CENSUS else "reconciled-adopted"
            self._event(db, run_id, kind, {"chunk": chunk_id, "operationId": operation_id})
            if duplicates:
                self._event(
                    db, run_id, "duplicate-tasks", {"chunk": chunk_id, "operationIds": duplicates}
                )

    def record_absent(self, run_id: int, chunk_id: str) -> None:
        """Reconciliation proved no task exists for the chunk: it may be sent again."""
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET outcome=COALESCE(outcome, 'lost'), finished_at="
                "COALESCE(finished_at, ?) WHERE run_id=? AND chunk_id=? AND outcome IS NULL",
                (time.time(), run_id, chunk_id),
            )
            db.execute(
                "UPDATE attempts SET outcome='absent' WHERE run_id=? AND chunk_id=?"
                " AND outcome IN ('ambiguous', 'lost')",
                (run_id, chunk_id),
            )
            self._set_chunk(db, run_id, chunk_id, PENDING)
            self._event(db, run_id, "reconciled-absent", {"chunk": chunk_id})

    @staticmethod
    def _close_open_attempts(db: sqlite3.Connection, run_id: int, chunk_id: str) -> None:
        db.execute(
            "UPDATE attempts SET outcome=COALESCE(outcome, 'ambiguous'), finished_at="
            "COALESCE(finished_at, ?) WHERE run_id=? AND chunk_id=? AND outcome IS NULL",
            (time.time(), run_id, chunk_id),
        )

    def adopt_parts(
        self,
        run_id: int,
        parent: str,
        adopted: list[tuple[Chunk, str]],
        remainder: Chunk | None,
    ) -> None:
        """The census found part of a chunk in tasks: the parent becomes `split`, each part
        held by a task a submitted child (adopted by census), the rest a pending child."""
        now = time.time()
        with self._tx() as db:
            self._close_open_attempts(db, run_id, parent)
            self._set_chunk(db, run_id, parent, SPLIT)
            self._insert_chunks(db, run_id, [child for child, _ in adopted], now)
            for child, operation_id in adopted:
                db.execute(
                    "UPDATE chunks SET state=?, operation_id=?, adopted=?, updated_at=?"
                    " WHERE run_id=? AND chunk_id=?",
                    (SUBMITTED, operation_id, CENSUS, now, run_id, child.chunk_id),
                )
            if remainder is not None:
                self._insert_chunks(db, run_id, [remainder], now)
            self._event(
                db,
                run_id,
                "census-adopted-part",
                {
                    "chunk": parent,
                    "operationIds": sorted({op for _, op in adopted}),
                    "adopted": sum(len(child.members) for child, _ in adopted),
                    "remaining": len(remainder.members) if remainder else 0,
                },
            )

    def requeue_failed(self, run_id: int) -> int:
        """Chunks refused for a plan-level reason go back to pending when the run is resumed
        (after the operator's fix): no chunk is left dead. Returns how many."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE chunks SET state=?, updated_at=? WHERE run_id=? AND state=?",
                (PENDING, time.time(), run_id, FAILED),
            )
            if cursor.rowcount:
                self._event(db, run_id, "failed-requeued", {"chunks": cursor.rowcount})
        return int(cursor.rowcount)

    def known_operations(self) -> dict[str, str | None]:
        """operationId → fileId of every task this journal created or adopted (every run)."""
        rows = self._db.execute(
            "SELECT c.operation_id, r.file_id FROM chunks c JOIN runs r USING (run_id)"
            " WHERE c.operation_id IS NOT NULL AND c.adopted IN (0, 1)"
            " UNION SELECT a.operation_id, r.file_id FROM attempts a JOIN runs r USING (run_id)"
            " WHERE a.operation_id IS NOT NULL"
        ).fetchall()
        return {op: file_id for op, file_id in rows}

    def created_windows(self) -> dict[str, tuple[float, float]]:
        """operationId → (intent, reply) local times of every create answered with it."""
        rows = self._db.execute(
            "SELECT operation_id, sent_at, finished_at FROM attempts WHERE outcome='created'"
            " AND operation_id IS NOT NULL AND finished_at IS NOT NULL"
        ).fetchall()
        return {op: (sent, finished) for op, sent, finished in rows}

    def last_intent_at(self, run_id: int, chunk_id: str) -> float | None:
        row = self._db.execute(
            "SELECT MAX(sent_at) FROM attempts WHERE run_id=? AND chunk_id=?", (run_id, chunk_id)
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def latest_unsettled_send(self, run_id: int) -> float | None:
        """When the newest create whose outcome was not a clear reply left (None: none)."""
        row = self._db.execute(
            "SELECT MAX(sent_at) FROM attempts WHERE run_id=? AND (outcome IS NULL OR"
            " outcome IN ('ambiguous', 'absent', 'lost'))",
            (run_id,),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def needs_closing_census(self, run_id: int) -> bool:
        """A create was sent since the last closing census (or there was none yet)."""
        row = self._db.execute(
            "SELECT (SELECT MAX(sent_at) FROM attempts WHERE run_id=?1),"
            " (SELECT MAX(at) FROM events WHERE run_id=?1 AND kind='census-closing')",
            (run_id,),
        ).fetchone()
        last_send, last_census = row
        return last_send is not None and (last_census is None or last_census < last_send)

    def record_census(self, run_id: int, kind: str, summary: dict[str, Any]) -> None:
        self.event(run_id, f"census-{kind}", summary)

    def record_duplicates(self, run_id: int, duplicates: dict[str, list[str]]) -> None:
        """Targets found in two or more tasks of this package (the closing census)."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT INTO duplicates VALUES (?,?,?,?) ON CONFLICT (run_id, target)"
                " DO UPDATE SET operation_ids=excluded.operation_ids",
                ((run_id, t, json.dumps(ops), now) for t, ops in sorted(duplicates.items())),
            )
            if duplicates:
                self._event(db, run_id, "duplicates-found", {"targets": len(duplicates)})

    def duplicates(self, run_id: int) -> dict[str, list[str]]:
        rows = self._db.execute(
            "SELECT target, operation_ids FROM duplicates WHERE run_id=? ORDER BY target",
            (run_id,),
        ).fetchall()
        return {target: json.loads(ops) for target, ops in rows}

    def outstanding(self, run_id: int) -> int:
        """Targets in no task yet and not quarantined."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(member_count), 0) FROM chunks WHERE run_id=?"
            " AND state NOT IN (?, ?, ?)",
            (run_id, SUBMITTED, SPLIT, QUARANTINED),
        ).fetchone()
        return int(row[0])

    def split(self, run_id: int, parent: str, children: Iterable[Chunk]) -> None:
        now = time.time()
        with self._tx() as db:
            self._set_chunk(db, run_id, parent, SPLIT)
            self._insert_chunks(db, run_id, children, now)

    def quarantine(
        self, run_id: int, chunk_id: str, device_id: str, error_code: str, reason: str
    ) -> None:
        with self._tx() as db:
            self._set_chunk(db, run_id, chunk_id, QUARANTINED, last_error=reason)
            db.execute(
                "INSERT OR REPLACE INTO quarantine VALUES (?,?,?,?,?)",
                (run_id, device_id, chunk_id, error_code, reason),
            )

    # ---- summaries ---------------------------------------------------------------------------
    def counts(self, run_id: int) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT state, COUNT(*), SUM(member_count) FROM chunks WHERE run_id=? GROUP BY state",
            (run_id,),
        ).fetchall()
        result = {f"chunks_{state}": int(n) for state, n, _ in rows}
        result.update({f"targets_{state}": int(m or 0) for state, _, m in rows})
        return result

    # ---- monitoring ------------------------------------------------------------------------
    def unfinished_tasks(self, run_id: int) -> dict[str, tuple[str, int, bool]]:
        """operationId → (chunk, wave, final) of every submitted chunk not yet fully known."""
        rows = self._db.execute(
            "SELECT c.operation_id, c.chunk_id, c.wave, COALESCE(t.final, 0),"
            " COALESCE(t.details_fetched, 0) FROM chunks c LEFT JOIN tasks t"
            " ON t.run_id=c.run_id AND t.operation_id=c.operation_id"
            " WHERE c.run_id=? AND c.state='submitted' ORDER BY c.chunk_id",
            (run_id,),
        ).fetchall()
        return {
            op: (chunk, wave, bool(final))
            for op, chunk, wave, final, fetched in rows
            if not (final and fetched)
        }

    def record_task(self, run_id: int, chunk_id: str, wave: int, task: Task) -> None:
        s = task.sta_result
        with self._tx() as db:
            db.execute(
                "INSERT INTO tasks (run_id, operation_id, chunk_id, wave, status, total, waiting,"
                " processing, succeeded, failed, stopped, timed_out, create_time, start_time,"
                " stop_time, final, observed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (run_id, operation_id) DO UPDATE SET status=excluded.status,"
                " total=excluded.total, waiting=excluded.waiting,"
                " processing=excluded.processing, succeeded=excluded.succeeded,"
                " failed=excluded.failed, stopped=excluded.stopped,"
                " timed_out=excluded.timed_out, start_time=excluded.start_time,"
                " stop_time=excluded.stop_time, final=excluded.final,"
                " observed_at=excluded.observed_at",
                (
                    run_id,
                    task.operation_id,
                    chunk_id,
                    wave,
                    task.status.value,
                    s.total,
                    s.wait,
                    s.processing,
                    s.success,
                    s.fail,
                    s.stop,
                    s.timeout,
                    task.create_time,
                    task.start_time,
                    task.stop_time,
                    int(task.status.final),
                    time.time(),
                ),
            )

    def task_failures(self, run_id: int, operation_id: str) -> tuple[int, int]:
        row = self._db.execute(
            "SELECT failed, stopped FROM tasks WHERE run_id=? AND operation_id=?",
            (run_id, operation_id),
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def approved(self, run_id: int, wave: int) -> bool:
        row = self._db.execute(
            "SELECT approved_at FROM waves WHERE run_id=? AND wave=?", (run_id, wave)
        ).fetchone()
        return bool(row and row[0] is not None)

    def record_device_results(
        self, run_id: int, operation_id: str, results: Iterable[SubOperation]
    ) -> None:
        """The non-success subtasks of a finished task, fetched once and kept."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO device_results VALUES (?,?,?,?,?,?,?,?)",
                (
                    (
                        run_id,
                        r.device_id,
                        operation_id,
                        r.status.value,
                        r.detail,
                        r.reported_version,
                        r.start_time,
                        r.stop_time,
                    )
                    for r in results
                ),
            )
            db.execute(
                "UPDATE tasks SET details_fetched=1 WHERE run_id=? AND operation_id=?",
                (run_id, operation_id),
            )

    def add_calls(self, run_id: int, calls: dict[str, int]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO api_calls VALUES (?,?,?) ON CONFLICT (run_id, api)"
                " DO UPDATE SET calls = calls + excluded.calls",
                ((run_id, api, n) for api, n in calls.items() if n),
            )

    def add_progress_sample(self, run_id: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO progress_samples SELECT ?, ?,"
                " (SELECT COALESCE(SUM(member_count), 0) FROM chunks"
                "   WHERE run_id=? AND state='submitted'),"
                " COALESCE(SUM(succeeded + failed + stopped), 0), COALESCE(SUM(succeeded), 0),"
                " COALESCE(SUM(failed + stopped), 0) FROM tasks WHERE run_id=?",
                (run_id, time.time(), run_id, run_id),
            )

    # ---- waves and gates ---------------------------------------------------------------------
    def waves(self, run_id: int) -> list[WaveRow]:
        rows = self._db.execute(
            "SELECT wave, name, target_count, gate_state, gate_reason, soak_until, approved_at"
            " FROM waves WHERE run_id=? ORDER BY wave",
            (run_id,),
        ).fetchall()
        return [WaveRow(*row) for row in rows]

    def wave_counts(self, run_id: int, wave: int) -> WaveCounts:
        targets, submitted, quarantined = self._db.execute(
            "SELECT (SELECT target_count FROM waves WHERE run_id=?1 AND wave=?2),"
            " (SELECT COALESCE(SUM(member_count), 0) FROM chunks"
            "   WHERE run_id=?1 AND wave=?2 AND state='submitted'),"
            " (SELECT COUNT(*) FROM chunks WHERE run_id=?1 AND wave=?2"
            "   AND state='quarantined')",
            (run_id, wave),
        ).fetchone()
        tasks, final, succeeded, failed = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(final), 0), COALESCE(SUM(succeeded), 0),"
            " COALESCE(SUM(failed + stopped), 0) FROM tasks WHERE run_id=? AND wave=?",
            (run_id, wave),
        ).fetchone()
        return WaveCounts(
            int(targets or 0),
            int(submitted),
            int(quarantined),
            int(tasks),
            int(final),
            int(succeeded),
            int(failed),
        )

    def set_gate(
        self,
        run_id: int,
        wave: int,
        state: str,
        reason: str | None = None,
        soak_until: float | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE waves SET gate_state=?, gate_reason=?, soak_until=COALESCE(?, soak_until),"
                " updated_at=? WHERE run_id=? AND wave=?",
                (state, reason, soak_until, time.time(), run_id, wave),
            )
            self._event(db, run_id, f"gate-{state}", {"wave": wave, "reason": reason})


def has_run(path: Path, plan_name: str) -> bool:
    """Whether the journal at `path` holds a run of the plan (read only; False when absent)."""
    if not path.exists():
        return False
    try:
        db = Journal.open_readonly(path)
        try:
            row = db.execute("SELECT 1 FROM runs WHERE plan_name=? LIMIT 1", (plan_name,))
            return row.fetchone() is not None
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return False


def approve_wave(path: Path, plan_name: str, wave_name: str | None, by: str) -> str:
    """Record an operator's approval of a wave's gate (the first gate not yet passed when no
    name is given). It writes beside a running process: the lock is for drivers, and an
    approval is one row that the driver reads."""
    if not path.exists():
        raise JournalError(f"{path}: no journal here (has this plan been run?)")
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        run = db.execute(
            "SELECT run_id FROM runs WHERE plan_name=? ORDER BY run_id DESC LIMIT 1", (plan_name,)
        ).fetchone()
        if run is None:
            raise JournalError(f"{path}: no run of plan {plan_name!r}")
        if wave_name is None:
            row = db.execute(
                "SELECT wave, name FROM waves WHERE run_id=? AND gate_state!="
                "'passed' ORDER BY wave LIMIT 1",
                (run[0],),
            ).fetchone()
        else:
            row = db.execute(
                "SELECT wave, name FROM waves WHERE run_id=? AND name=?", (run[0], wave_name)
            ).fetchone()
        if row is None:
            raise JournalError(f"{path}: no wave {wave_name or 'waiting for a decision'}")
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "UPDATE waves SET approved_at=?, approved_by=? WHERE run_id=? AND wave=?",
            (time.time(), by, run[0], row[0]),
        )
        db.execute(
            "INSERT INTO events (run_id, at, kind, detail) VALUES (?,?,?,?)",
            (run[0], time.time(), "gate-approved", json.dumps({"wave": row[0], "by": by})),
        )
        db.execute("COMMIT")
        return str(row[1])
    finally:
        db.close()
