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
operationId that already belongs to another chunk (an anomaly, also in `anomalies`), 4 found
by the census in a task whose package the platform did not tell, on the operator's
`--unknown-tasks skip`. Attempts keep their send time on our clock (`sent_at`) and on the
platform's measured clock (`sent_platform`): settling compares platform times, which a step
of the local clock between two processes does not move.

A run's first pass is its waves; `rollout retry` adds a *retry pass* (`passes`): the devices
whose latest outcome was a chosen failure, in chunks `p<NN>-<index>` of a wave row of its own
(`retry-<N>`, after the plan's waves), so intents, attempts, settling, adoption and
monitoring work for a pass exactly as for a wave. A device thus has one chunk per pass that
holds it; its final outcome is its latest pass's.

Its schema, states and migrations are in journal_schema.py; the gate's view of a wave (`WaveCounts`,
`Approval`) in counts.py. The default journal lives beside the plan file
(`<plan dir>/.rollout/<name>.journal.sqlite`),
so the same plan run from another working directory finds its journal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .counts import WAITING_FOR_DECISION, Approval, WaveCounts
from .errors import InputError, JournalError
from .journal_schema import (
    CENSUS,
    FAILED,
    INTENT,
    PASS_UNFINISHED,
    PENDING,
    QUARANTINED,
    RECONCILED,
    RUNNING,
    SCHEMA,
    SCHEMA_VERSION,
    SECOND_CLAIM,
    SENT,
    SPLIT,
    SUBMITTED,
    UNCONFIRMED,
    UNIQUE_CLAIMS,
    journal_fault,
    migrate,
)
from .planner import Chunk, Wave

if TYPE_CHECKING:  # the journal keeps what the client read; it needs not the client itself
    # (outcomes.py reads the client's models: imported where results are classified, so
    # `rollout status` starts without the client — bench/startup.py)
    from .northbound import SubOperation, Task
    from .outcomes import Outcome


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
class PassRow:
    """A retry pass of a run (pass 1 is the run's own waves, not a row)."""

    pass_no: int
    wave: int  # its wave row: its chunks, tasks and gate
    states: list[str]  # the outcomes it retries (outcomes.Outcome values)
    targets: int
    started_at: float  # local time
    platform_start: float  # the platform's time when it started (its census ignores older tasks)
    status: str
    reason: str | None


def default_journal_path(plan_name: str, plan_dir: Path) -> Path:
    """`<plan dir>/.rollout/<name>.journal.sqlite`: beside the plan, whatever the cwd."""
    return plan_dir.absolute() / ".rollout" / f"{plan_name}.journal.sqlite"


class Journal:
    def __init__(self, path: Path, connection: sqlite3.Connection, lock_fd: int) -> None:
        self.path = path
        self._db = connection
        self._lock_fd = lock_fd

    # ---- opening, locking --------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> Journal:
        """Open (or create) the journal and take its lock. Raises JournalError: locked, or
        the folder cannot be created or written, or the disk is full (`journal_fault`)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise journal_fault(path, exc) from None
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
                migrate(connection, int(row[0]), path)
            connection.execute(UNIQUE_CLAIMS)
        except (sqlite3.Error, OSError) as exc:
            os.close(lock_fd)
            raise journal_fault(path, exc) from None
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
        """One durable transaction; all or nothing. A write the disk refuses (full,
        read-only, I/O error) raises JournalError with the transaction rolled back."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (full)
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            raise journal_fault(self.path, exc) from None

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
        already_current: Iterable[tuple[str, str]] = (),
    ) -> int:
        """A new run: its chunks, its waves, and the devices left out because the fleet file
        says they already run the package's version (device, version)."""
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
            cursor = db.executemany(
                "INSERT INTO already_current VALUES (?,?,?)",
                ((run_id, device, version) for device, version in already_current),
            )
            self._event(
                db,
                run_id,
                "run-created",
                {"targets": target_count, "left_out_already_current": cursor.rowcount},
            )
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

    def first_intent(self, run_id: int, chunk_id: str) -> tuple[float, float | None] | None:
        """The chunk's first send: (our clock, the platform's clock or None)."""
        row = self._db.execute(
            "SELECT MIN(sent_at), MIN(sent_platform) FROM attempts WHERE run_id=? AND chunk_id=?",
            (run_id, chunk_id),
        ).fetchone()
        return (float(row[0]), row[1]) if row and row[0] is not None else None

    def record_intent(self, run_id: int, chunk_id: str, platform_time: float | None = None) -> int:
        """Committed durably before the create request leaves (`platform_time`: the send
        time on the platform's measured clock)."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO attempts (run_id, chunk_id, sent_at, sent_platform) VALUES (?,?,?,?)",
                (run_id, chunk_id, time.time(), platform_time),
            )
            db.execute(
                "UPDATE chunks SET state=?, updated_at=? WHERE run_id=? AND chunk_id=?",
                (INTENT, time.time(), run_id, chunk_id),
            )
        return int(cursor.lastrowid or 0)

    def touch_intent(self, attempt_id: int, platform_time: float | None = None) -> None:
        """The attempt leaves again (its earlier send was refused without effect): its send
        time is now, so settling counts from the send that may act."""
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET sent_at=?, sent_platform=? WHERE attempt_id=?",
                (time.time(), platform_time, attempt_id),
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

    def record_lost(
        self, run_id: int, chunk_id: str, operation_id: str, holder: str | None
    ) -> None:
        """The platform holds none of the chunk's targets in a task although the chunk has
        `operation_id` (the platform lost the task, or gave that operationId to another
        chunk's task): the chunk goes back to pending, to be sent again. What the journal
        read of `operation_id` stays with `holder`, the chunk whose targets that task holds
        (a second claim on it becomes its rightful claim), or is dropped (no chunk)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE chunks SET state=?, operation_id=NULL, adopted=?, updated_at=?"
                " WHERE run_id=? AND chunk_id=?",
                (PENDING, SENT, now, run_id, chunk_id),
            )
            if holder is not None:
                db.execute(
                    "UPDATE chunks SET adopted=? WHERE run_id=? AND chunk_id=? AND adopted=?",
                    (RECONCILED, run_id, holder, SECOND_CLAIM),
                )
                db.execute(
                    "UPDATE tasks SET chunk_id=?, wave=(SELECT wave FROM chunks WHERE run_id=?"
                    " AND chunk_id=?) WHERE run_id=? AND operation_id=?",
                    (holder, run_id, holder, run_id, operation_id),
                )
            else:
                db.execute(
                    "DELETE FROM tasks WHERE run_id=? AND operation_id=?", (run_id, operation_id)
                )
                db.execute(
                    "DELETE FROM device_results WHERE run_id=? AND operation_id=?",
                    (run_id, operation_id),
                )
            detail = {"chunk": chunk_id, "operationId": operation_id, "holder": holder}
            self._event(db, run_id, "task-lost", detail)

    def times_lost(self, run_id: int, chunk_id: str) -> int:
        """How often the platform lost this chunk's task (`record_lost`)."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM events WHERE run_id=? AND kind='task-lost'"
            " AND json_extract(detail, '$.chunk')=?",
            (run_id, chunk_id),
        ).fetchone()
        return int(row[0])

    def second_claims(self, run_id: int) -> int:
        """Chunks in a task only by a second claim on another chunk's operationId."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM chunks WHERE run_id=? AND state=? AND adopted=?",
            (run_id, SUBMITTED, SECOND_CLAIM),
        ).fetchone()
        return int(row[0])

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
        adopted: list[tuple[Chunk, str, bool]],
        remainder: Chunk | None,
    ) -> None:
        """The census found part of a chunk in tasks: the parent becomes `split`, each part
        held by a task a submitted child (adopted by census), the rest a pending child."""
        now = time.time()
        with self._tx() as db:
            self._close_open_attempts(db, run_id, parent)
            self._set_chunk(db, run_id, parent, SPLIT)
            self._insert_chunks(db, run_id, [child for child, _, _ in adopted], now)
            for child, operation_id, confirmed in adopted:
                db.execute(
                    "UPDATE chunks SET state=?, operation_id=?, adopted=?, updated_at=?"
                    " WHERE run_id=? AND chunk_id=?",
                    (
                        SUBMITTED,
                        operation_id,
                        CENSUS if confirmed else UNCONFIRMED,
                        now,
                        run_id,
                        child.chunk_id,
                    ),
                )
            if remainder is not None:
                self._insert_chunks(db, run_id, [remainder], now)
            self._event(
                db,
                run_id,
                "census-adopted-part",
                {
                    "chunk": parent,
                    "operationIds": sorted({op for _, op, _ in adopted}),
                    "adopted": sum(len(child.members) for child, _, _ in adopted),
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
            " WHERE c.operation_id IS NOT NULL AND c.adopted IN (0, 1, 2)"
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

    def last_intent(self, run_id: int, chunk_id: str) -> tuple[float, float | None] | None:
        """The chunk's newest send: (our clock, the platform's clock or None)."""
        row = self._db.execute(
            "SELECT sent_at, sent_platform FROM attempts WHERE run_id=? AND chunk_id=?"
            " ORDER BY sent_at DESC LIMIT 1",
            (run_id, chunk_id),
        ).fetchone()
        return (float(row[0]), row[1]) if row else None

    def latest_send(
        self, run_id: int | None, *, unsettled_only: bool, local: bool = False
    ) -> float | None:
        """Platform time (our clock where it was not measured; with `local`, always our
        clock) of the newest create sent by `run_id` (None: by any run of this journal);
        `unsettled_only`: only creates whose outcome was not a clear reply. None when there
        is none."""
        column = "sent_at" if local else "COALESCE(sent_platform, sent_at)"
        query = f"SELECT MAX({column}) FROM attempts WHERE 1"
        params: list[Any] = []
        if run_id is not None:
            query += " AND run_id=?"
            params.append(run_id)
        if unsettled_only:
            query += " AND (outcome IS NULL OR outcome IN ('ambiguous', 'absent', 'lost'))"
        row = self._db.execute(query, params).fetchone()
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

    def record_group_members(self, run_id: int, members: dict[str, Sequence[str]]) -> None:
        """A group fleet's groups as the member API listed them — at the run's start, then
        again just before the creates of each group's wave (groups.py): what each group's
        task was given, to tell a device that a later group would send again."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO group_members VALUES (?,?,?,?)",
                ((run_id, name, "\n".join(devices), now) for name, devices in members.items()),
            )

    def group_members(self, run_id: int) -> dict[str, list[str]]:
        """group name → its devices as last recorded (`record_group_members`)."""
        rows = self._db.execute(
            "SELECT group_name, members FROM group_members WHERE run_id=?", (run_id,)
        ).fetchall()
        return {str(name): (members.split("\n") if members else []) for name, members in rows}

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

    def split(
        self, run_id: int, parent: str, children: Iterable[Chunk], *, inferred: bool = False
    ) -> None:
        """A refused chunk becomes `split` and its halves pending. `inferred`: the chunk was
        not sent itself — its sibling was accepted, so its parent's refusal lies in it."""
        now = time.time()
        with self._tx() as db:
            self._set_chunk(db, run_id, parent, SPLIT)
            self._insert_chunks(db, run_id, children, now)
            if inferred:
                self._event(db, run_id, "bisect-inferred", {"chunk": parent})

    def bisect_creates(self, run_id: int) -> int:
        """Creates sent for halves of bisected chunks (chunk IDs ending in .0 or .1)."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM attempts WHERE run_id=? AND chunk_id GLOB '*.[01]'", (run_id,)
        ).fetchone()
        return int(row[0])

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
    def counts(self, run_id: int, wave: int | None = None) -> dict[str, int]:
        """Chunks and targets by state (of one wave, or of the whole run)."""
        query = "SELECT state, COUNT(*), SUM(member_count) FROM chunks WHERE run_id=?"
        params: tuple[int, ...] = (run_id,)
        if wave is not None:
            query, params = query + " AND wave=?", (run_id, wave)
        rows = self._db.execute(query + " GROUP BY state", params).fetchall()
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

    def approval(self, run_id: int, wave: int) -> Approval | None:
        """The operator's approval of the wave's gate and the verdict it was given for."""
        row = self._db.execute(
            "SELECT name, approved_state, gate_reason, approved_finished, approved_failed,"
            " approved_by, approved_at FROM waves WHERE run_id=? AND wave=?",
            (run_id, wave),
        ).fetchone()
        if row is None or row[6] is None:
            return None
        return Approval(row[0], row[1] or FAILED, "", int(row[3] or 0), int(row[4] or 0), row[5])

    def record_device_results(
        self,
        run_id: int,
        operation_id: str,
        results: Iterable[SubOperation],
        version: str,
        *,
        keep_upgraded: bool = False,
    ) -> dict[Outcome, int]:
        """Every subtask of a finished task, fetched once: each is classified
        (`outcomes.classify`) against the package's `version`; the rows of devices not
        upgraded are kept, the upgraded are counted on the task (`verified`: their reported
        version is the package's; `unreported`: none reported) — and kept too with
        `keep_upgraded` (a group fleet: the journal knows its devices only from here).
        Returns the count per outcome."""
        from .outcomes import Outcome, classify

        tally: dict[Outcome, int] = {}
        verified = unreported = 0
        rows = []
        for r in results:
            reported = r.reported_version
            outcome = classify(r.status, r.detail, reported, bool(r.start_time), version)
            tally[outcome] = tally.get(outcome, 0) + 1
            if outcome is Outcome.UPGRADED:
                verified += reported is not None
                unreported += reported is None
                if not keep_upgraded:
                    continue
            rows.append(self._result_row(run_id, operation_id, r, outcome))
        with self._tx() as db:
            db.executemany(self._RESULT_INSERT, rows)
            db.execute(
                "UPDATE tasks SET details_fetched=1, verified=?, unreported=? WHERE run_id=?"
                " AND operation_id=?",
                (verified, unreported, run_id, operation_id),
            )
        return tally

    def record_failures(
        self, run_id: int, operation_id: str, results: list[SubOperation], version: str
    ) -> int:
        """The failed subtasks of a task still running (a gate needs to tell the already
        current from the failed). Returns how many are already current."""
        from .outcomes import Outcome, classify

        rows = [
            self._result_row(
                run_id,
                operation_id,
                r,
                classify(r.status, r.detail, r.reported_version, bool(r.start_time), version),
            )
            for r in results
        ]
        with self._tx() as db:
            db.executemany(self._RESULT_INSERT, rows)
            db.execute(
                "UPDATE tasks SET fails_seen=? WHERE run_id=? AND operation_id=?",
                (len(results), run_id, operation_id),
            )
        return sum(1 for row in rows if row[-1] == Outcome.ALREADY_CURRENT.value)

    def record_successes(
        self,
        run_id: int,
        operation_id: str,
        results: list[SubOperation],
        version: str,
        *,
        keep_upgraded: bool = False,
    ) -> int:
        """The succeeded subtasks of a task still running, each version-checked
        (`outcomes.classify`): the mismatched are kept as rows, the upgraded counted on the
        task (`verified`/`unreported`, as `record_device_results` does once it is final).
        Returns how many report another version."""
        from .outcomes import Outcome, classify

        verified = unreported = mismatched = 0
        rows = []
        for r in results:
            reported = r.reported_version
            outcome = classify(r.status, r.detail, reported, bool(r.start_time), version)
            if outcome is Outcome.UPGRADED:
                verified += reported is not None
                unreported += reported is None
                if not keep_upgraded:
                    continue
            else:
                mismatched += 1
            rows.append(self._result_row(run_id, operation_id, r, outcome))
        with self._tx() as db:
            db.executemany(self._RESULT_INSERT, rows)
            db.execute(
                "UPDATE tasks SET verified=?, unreported=? WHERE run_id=? AND operation_id=?"
                " AND details_fetched=0",
                (verified, unreported, run_id, operation_id),
            )
        return mismatched

    _RESULT_INSERT = (
        "INSERT OR REPLACE INTO device_results (run_id, device_id, operation_id, status,"
        " detail, version, start_time, stop_time, outcome) VALUES (?,?,?,?,?,?,?,?,?)"
    )

    @staticmethod
    def _result_row(
        run_id: int, operation_id: str, r: SubOperation, outcome: Outcome
    ) -> tuple[Any, ...]:
        return (
            run_id,
            r.device_id,
            operation_id,
            r.status.value,
            r.detail,
            r.reported_version,
            r.start_time,
            r.stop_time,
            outcome.value,
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
                # failed: the platform's fail, less the already current read so far (its
                # fail of a device already on the version is no failure: outcomes.py)
                " MAX(0, COALESCE(SUM(failed + stopped), 0) - (SELECT COUNT(*) FROM"
                "   device_results WHERE run_id=? AND outcome='already-current'))"
                " FROM tasks WHERE run_id=?",
                (run_id, time.time(), run_id, run_id, run_id),
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
        return self.count_wave(self._db, run_id, wave)

    @staticmethod
    def count_wave(db: sqlite3.Connection, run_id: int, wave: int) -> WaveCounts:
        """The wave's counts from a journal's connection (a read-only one too: status)."""
        targets, submitted, quarantined, submitted_tasks, kind = db.execute(
            "SELECT (SELECT target_count FROM waves WHERE run_id=?1 AND wave=?2),"
            " (SELECT COALESCE(SUM(member_count), 0) FROM chunks"
            "   WHERE run_id=?1 AND wave=?2 AND state='submitted'),"
            " (SELECT COUNT(*) FROM chunks WHERE run_id=?1 AND wave=?2"
            "   AND state='quarantined'),"
            " (SELECT COUNT(DISTINCT operation_id) FROM chunks WHERE run_id=?1 AND wave=?2"
            "   AND state='submitted'),"
            # the wave's own kind: a retry pass of a group fleet sends devices
            " (SELECT kind FROM chunks WHERE run_id=?1 AND wave=?2 LIMIT 1)",
            (run_id, wave),
        ).fetchone()
        shared = Journal._shared_tasks(db, run_id, wave)
        outside = f" AND t.operation_id NOT IN ({','.join('?' * len(shared))})"
        tasks, final, succeeded, failed, devices = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(final), 0), COALESCE(SUM(succeeded), 0),"
            " COALESCE(SUM(failed + stopped), 0), COALESCE(SUM(total), 0) FROM tasks t"
            " WHERE run_id=? AND wave=?" + outside,
            (run_id, wave, *shared),
        ).fetchone()
        # a running task's successes read so far: `verified` + `unreported` (set when its
        # success pages were read) + its version-mismatch rows
        unverified = db.execute(
            "SELECT COALESCE(SUM(MAX(0, t.succeeded - t.verified - t.unreported - ("
            "  SELECT COUNT(*) FROM device_results d WHERE d.run_id=t.run_id"
            "  AND d.operation_id=t.operation_id AND d.outcome='version-mismatch'))), 0)"
            " FROM tasks t WHERE t.run_id=? AND t.wave=? AND t.details_fetched=0",
            (run_id, wave),
        ).fetchone()[0]
        seen = any(r[1] == "fails_seen" for r in db.execute("PRAGMA table_info(tasks)"))
        unread_failed = (
            db.execute(
                "SELECT COALESCE(SUM(MAX(0, failed - fails_seen)), 0) FROM tasks"
                " WHERE run_id=? AND wave=? AND details_fetched=0",
                (run_id, wave),
            ).fetchone()[0]
            if seen
            else 0
        )  # a journal not yet opened by this version: none read
        already, mismatched = db.execute(
            "SELECT COALESCE(SUM(d.outcome='already-current'), 0),"
            " COALESCE(SUM(d.outcome='version-mismatch'), 0) FROM device_results d"
            " JOIN tasks t ON t.run_id=d.run_id AND t.operation_id=d.operation_id"
            " WHERE d.run_id=? AND t.wave=?" + outside,
            (run_id, wave, *shared),
        ).fetchone()
        tasks, final, devices = int(tasks) + len(shared), int(final) + len(shared), int(devices)
        succeeded, failed, already, mismatched = (
            int(succeeded),
            int(failed),
            int(already),
            int(mismatched),
        )
        for operation_id, members in shared.items():
            results = dict(
                db.execute(
                    "SELECT device_id, outcome FROM device_results WHERE run_id=?"
                    " AND operation_id=?",
                    (run_id, operation_id),
                ).fetchall()
            )
            devices += len(members)
            for device in members:
                outcome = results.get(device) or "upgraded"  # read, no row: upgraded
                succeeded += outcome in ("upgraded", "version-mismatch")
                failed += outcome not in ("upgraded", "version-mismatch")
                already += outcome == "already-current"
                mismatched += outcome == "version-mismatch"
        return WaveCounts(
            int(targets or 0),
            int(submitted),
            int(quarantined),
            tasks,
            final,
            succeeded,
            failed,
            already_current=already,
            mismatched=mismatched,
            kind=str(kind or "devices"),
            task_devices=devices,
            submitted_tasks=int(submitted_tasks),
            unverified=int(unverified),
            unread_failed=int(unread_failed),
        )

    @staticmethod
    def _shared_tasks(db: sqlite3.Connection, run_id: int, wave: int) -> dict[str, list[str]]:
        """operationId → the wave's devices in it, of the read tasks that hold other devices
        too (a task adopted for part of its devices: the census gave the rest a newer task,
        a retry pass's task spans waves, a task names devices not in this plan). Their
        counters (`staResult`) speak for devices that are not the wave's, so the wave counts
        them device by device from the subtasks read; a running one is counted by its
        counters until it is read."""
        shared: dict[str, list[str]] = {}
        for operation_id, members in db.execute(
            "SELECT c.operation_id, GROUP_CONCAT(c.members, char(10)) FROM chunks c"
            " JOIN tasks t ON t.run_id=c.run_id AND t.operation_id=c.operation_id"
            " WHERE c.run_id=? AND c.wave=? AND c.state='submitted' AND c.kind='devices'"
            " AND t.final=1 AND t.details_fetched=1"
            " GROUP BY c.operation_id HAVING SUM(c.member_count) != MAX(t.total)",
            (run_id, wave),
        ):
            shared[str(operation_id)] = str(members).split("\n")
        return shared

    def unseen_successes(self, run_id: int, wave: int) -> list[str]:
        """operationIds of the wave's running tasks whose successes are not all read (the
        counters show more than were read): a gate about to decide on them asks for these."""
        rows = self._db.execute(
            "SELECT t.operation_id FROM tasks t WHERE t.run_id=? AND t.wave=?"
            " AND t.details_fetched=0 AND t.succeeded > t.verified + t.unreported + ("
            "  SELECT COUNT(*) FROM device_results d WHERE d.run_id=t.run_id"
            "  AND d.operation_id=t.operation_id AND d.outcome='version-mismatch')"
            " ORDER BY t.chunk_id",
            (run_id, wave),
        ).fetchall()
        return [str(row[0]) for row in rows]

    def unseen_failures(self, run_id: int, wave: int) -> list[str]:
        """operationIds of the wave's tasks whose failed devices are not all known yet (the
        counters show more than were fetched): the gate asks for these subtasks."""
        rows = self._db.execute(
            "SELECT operation_id FROM tasks WHERE run_id=? AND wave=? AND details_fetched=0"
            " AND failed > fails_seen ORDER BY chunk_id",
            (run_id, wave),
        ).fetchall()
        return [str(row[0]) for row in rows]

    def set_gate(
        self,
        run_id: int,
        wave: int,
        state: str,
        reason: str | None = None,
        soak_until: float | None = None,
        *,
        finished: int | None = None,
        failed: int | None = None,
    ) -> None:
        """The gate's state and reason, with the devices it judged (finished, failed): an
        approval is given for exactly these numbers."""
        with self._tx() as db:
            db.execute(
                "UPDATE waves SET gate_state=?, gate_reason=?, soak_until=COALESCE(?, soak_until),"
                " gate_finished=?, gate_failed=?, updated_at=? WHERE run_id=? AND wave=?",
                (state, reason, soak_until, finished, failed, time.time(), run_id, wave),
            )
            self._event(db, run_id, f"gate-{state}", {"wave": wave, "reason": reason})

    # ---- retry passes ------------------------------------------------------------------------
    def passes(self, run_id: int) -> list[PassRow]:
        rows = self._db.execute(
            "SELECT pass_no, wave, states, targets, started_at, platform_start, status, reason"
            " FROM passes WHERE run_id=? ORDER BY pass_no",
            (run_id,),
        ).fetchall()
        return [PassRow(r[0], r[1], json.loads(r[2]), *r[3:]) for r in rows]

    def create_pass(
        self, run_id: int, states: Iterable[str], devices: list[str], platform_start: float
    ) -> PassRow:
        """A new retry pass: its wave row, its chunks (≤ 256 devices each), its row — in one
        transaction, so a pass exists whole or not at all."""
        now = time.time()
        wanted = sorted(set(states))
        with self._tx() as db:
            last = db.execute(
                "SELECT COALESCE(MAX(pass_no), 1) FROM passes WHERE run_id=?", (run_id,)
            ).fetchone()[0]
            wave = db.execute(
                "SELECT COALESCE(MAX(wave), -1) + 1 FROM waves WHERE run_id=?", (run_id,)
            ).fetchone()[0]
            pass_no = int(last) + 1
            db.execute(
                "INSERT INTO waves (run_id, wave, name, target_count, updated_at)"
                " VALUES (?,?,?,?,?)",
                (run_id, wave, f"retry-{pass_no}", len(devices), now),
            )
            chunks = [
                Chunk(pass_chunk_id(pass_no, index), "devices", devices[start : start + 256], wave)
                for index, start in enumerate(range(0, len(devices), 256))
            ]
            self._insert_chunks(db, run_id, chunks, now)
            db.execute(
                "INSERT INTO passes VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    pass_no,
                    wave,
                    json.dumps(wanted),
                    len(devices),
                    now,
                    platform_start,
                    RUNNING,
                    None,
                    now,
                ),
            )
            self._event(
                db,
                run_id,
                "pass-created",
                {"pass": pass_no, "states": wanted, "targets": len(devices)},
            )
        return PassRow(pass_no, wave, wanted, len(devices), now, platform_start, RUNNING, None)

    def set_pass_status(
        self, run_id: int, pass_no: int, status: str, reason: str | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE passes SET status=?, reason=?, updated_at=? WHERE run_id=? AND pass_no=?",
                (status, reason, time.time(), run_id, pass_no),
            )
            self._event(db, run_id, f"pass-{status}", {"pass": pass_no, "reason": reason})

    def pass_waves(self, run_id: int) -> dict[int, int]:
        """wave index → pass number, of the run's retry passes."""
        rows = self._db.execute(
            "SELECT wave, pass_no FROM passes WHERE run_id=?", (run_id,)
        ).fetchall()
        return {int(wave): int(pass_no) for wave, pass_no in rows}

    def operations_outside(self, run_id: int, wave: int) -> frozenset[str]:
        """operationIds the run's chunks hold outside one wave (a pass's census ignores them:
        they are the tasks of earlier passes)."""
        rows = self._db.execute(
            "SELECT DISTINCT operation_id FROM chunks WHERE run_id=? AND wave != ?"
            " AND operation_id IS NOT NULL",
            (run_id, wave),
        ).fetchall()
        return frozenset(str(row[0]) for row in rows)

    def retry_operations(self) -> frozenset[str]:
        """operationIds of tasks that retry passes created or adopted (every run): a device
        in one of these and in an earlier task was sent again on purpose."""
        rows = self._db.execute(
            "SELECT DISTINCT c.operation_id FROM chunks c JOIN passes p"
            " ON p.run_id=c.run_id AND p.wave=c.wave WHERE c.operation_id IS NOT NULL"
        ).fetchall()
        return frozenset(str(row[0]) for row in rows)

    def unread_tasks(self, run_id: int) -> int:
        """Tasks of the run whose devices' outcomes are not all known yet (not final, not
        read, or not observed at all)."""
        row = self._db.execute(
            "SELECT COUNT(DISTINCT c.operation_id) FROM chunks c LEFT JOIN tasks t"
            " ON t.run_id=c.run_id AND t.operation_id=c.operation_id WHERE c.run_id=?"
            " AND c.state='submitted' AND NOT (COALESCE(t.final, 0) AND"
            " COALESCE(t.details_fetched, 0))",
            (run_id,),
        ).fetchone()
        return int(row[0])

    def latest_outcomes(self, run_id: int, wanted: set[str]) -> list[str]:
        """Devices whose latest outcome — in the newest pass that holds them — is one of
        `wanted` (outcomes.Outcome values, plus `never-started`: timed out, or stopped before
        starting), in the order of their first chunk. Only kept subtask rows can qualify: an
        upgraded device of a read task has none. A row counts only from the task of the
        device's own chunk in its newest pass: a task adopted for other devices may name it
        too (its older task, when a retry pass holds it now) — never its outcome."""
        from .outcomes import Outcome

        rows = self._db.execute(
            "SELECT d.device_id, d.operation_id, d.outcome, d.start_time FROM device_results d"
            " JOIN chunks c ON c.run_id=d.run_id AND c.operation_id=d.operation_id"
            " WHERE d.run_id=? AND c.state='submitted' GROUP BY d.device_id, d.operation_id"
            " ORDER BY MIN(c.chunk_id)",
            (run_id,),
        ).fetchall()
        candidates = {str(row[0]) for row in rows}
        latest: dict[str, str] = {}  # device → operationId of its chunk in its newest pass
        for members, operation_id in self._db.execute(
            "SELECT c.members, c.operation_id FROM chunks c LEFT JOIN passes p"
            " ON p.run_id=c.run_id AND p.wave=c.wave WHERE c.run_id=? AND c.state='submitted'"
            " ORDER BY COALESCE(p.pass_no, 1), c.chunk_id",
            (run_id,),
        ):
            for device in members.split("\n"):
                if device in candidates:
                    latest[device] = operation_id
        chosen: list[str] = []
        for device, operation_id, outcome, start in rows:
            if latest.get(device, operation_id) != operation_id:
                continue  # its own chunk is in another task: a newer pass, or adopted apart
            never_started = outcome == Outcome.TIMED_OUT or (
                outcome == Outcome.STOPPED and not start
            )
            if outcome in wanted or (never_started and NEVER_STARTED in wanted):
                chosen.append(device)
        return list(dict.fromkeys(chosen))


NEVER_STARTED = "never-started"  # a retry selection: timed out, or stopped before starting


def pass_chunk_id(pass_no: int, index: int) -> str:
    return f"p{pass_no:02d}-{index:06d}"


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


def unfinished_pass(path: Path, plan_name: str) -> int | None:
    """The number of the latest run's retry pass when it is not finished (read only)."""
    if not path.exists():
        return None
    try:
        db = Journal.open_readonly(path)
        try:
            row = db.execute(
                "SELECT pass_no, status FROM passes WHERE run_id=(SELECT MAX(run_id) FROM runs"
                " WHERE plan_name=?) ORDER BY pass_no DESC LIMIT 1",
                (plan_name,),
            ).fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError:  # no journal of this plan, or one without passes
        return None
    if row is None or row[1] not in PASS_UNFINISHED:
        return None
    return int(row[0])


def approve_wave(
    path: Path, plan_name: str, wave_name: str | None, by: str, *, source: str | None = None
) -> Approval:
    """Record an operator's approval of a wave's gate that waits for a decision (failed, or
    passed and awaiting approval) — the first such wave when no name is given. The approval
    holds for that verdict: a later, worse failure share halts again (`Approval.covers`).
    Raises InputError (exit 2, naming the valid waves; `source`, the plan file, in the message)
    for a wave that does not exist or does not wait. It writes beside a running process: the
    lock is for drivers, and an approval is one row that the driver reads."""
    if not path.exists():
        raise JournalError(f"{path}: no journal here (has this plan been run?)")
    try:
        return _approve(path, plan_name, wave_name, by, source)
    except sqlite3.OperationalError as exc:  # read-only folder, full disk: one line
        raise journal_fault(path, exc) from None


def _approve(
    path: Path, plan_name: str, wave_name: str | None, by: str, source: str | None
) -> Approval:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        # a journal last driven by an older rollout (a driver running now has migrated it)
        found = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if found is not None and int(found[0]) < SCHEMA_VERSION:
            db.executescript(SCHEMA)
            migrate(db, int(found[0]), path)
        run = db.execute(
            "SELECT run_id FROM runs WHERE plan_name=? ORDER BY run_id DESC LIMIT 1", (plan_name,)
        ).fetchone()
        if run is None:
            raise JournalError(f"{path}: no run of plan {plan_name!r}")
        retry_waves = (
            "SELECT wave FROM passes WHERE run_id=?1"
            if db.execute("SELECT 1 FROM sqlite_master WHERE name='passes'").fetchone()
            else "SELECT NULL"
        )
        waves = db.execute(  # the plan's waves: a retry pass's verdict is not approved
            "SELECT wave, name, gate_state, gate_reason, gate_finished, gate_failed FROM waves"
            f" WHERE run_id=?1 AND wave NOT IN ({retry_waves}) ORDER BY wave",
            (run[0],),
        ).fetchall()
        waiting = [w for w in waves if w[2] in WAITING_FOR_DECISION]
        where = source or str(path)
        if wave_name is not None and all(w[1] != wave_name for w in waves):
            names = ", ".join(w[1] for w in waves)
            raise InputError(where, "--wave", f"run {run[0]} has no wave {wave_name!r} ({names})")
        row = next((w for w in waiting if wave_name in (None, w[1])), None)
        if row is None:
            states = ", ".join(f"{w[1]} ({w[2]})" for w in waves)
            ask = f"wave {wave_name!r} does not wait" if wave_name else "no wave waits"
            raise InputError(where, "--wave", f"{ask} for a decision in run {run[0]}: {states}")
        wave, name, state, reason, finished, failed = row
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "UPDATE waves SET approved_at=?, approved_by=?, approved_state=?,"
            " approved_finished=?, approved_failed=? WHERE run_id=? AND wave=?",
            (now, by, state, finished, failed, run[0], wave),
        )
        detail = {"wave": wave, "by": by, "state": state, "reason": reason}
        db.execute(
            "INSERT INTO events (run_id, at, kind, detail) VALUES (?,?,?,?)",
            (run[0], now, "gate-approved", json.dumps(detail, sort_keys=True)),
        )
        db.execute("COMMIT")
        return Approval(name, state, reason or "", int(finished or 0), int(failed or 0), by)
    finally:
        db.close()
