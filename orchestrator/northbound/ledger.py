"""The pacing ledger: every call slot of one application on this host, in one SQLite file.

The platform admits at most CALLS calls of an app in any sliding SECONDS window, counted when
each call *arrives* (platform-api.md §1, 1010009). A call arrives somewhere between our send
and our reading of its reply. So a slot is taken (a row is inserted) just before the send and
stays taken until HOLD = SECONDS (+ the plan's `pacing_margin`) after the reply — or the
failure — was observed (`released_at`); a new slot is granted only while fewer than CALLS
slots are taken. Proof that no window of arrivals ever holds CALLS + 1 calls: take the calls
arriving in a window (t − SECONDS, t] and the last of them to be granted, at r. Every other
one was granted before r and is released after its arrival, so it stays taken until after
its arrival + SECONDS > t ≥ r: all were taken at r, so at most CALLS − 1 of them. No margin
is guessed; the cost is one round trip per slot, about RTT/SECONDS of the budget.

All processes of the app on the host share the file (WAL; each decision is one
`BEGIN IMMEDIATE` transaction), so together they stay within CALLS. Rules, exactly:

- *Taken*: a row counts while `until > now`. At reservation `until = reserved_at +
  request_timeout + SEND_SLACK + HOLD` (the latest a request still pending could arrive,
  plus a window); at release `until = released_at + HOLD`. A call that never left (its body
  could not be built) is released with `until = now`.
- *Dead processes*: a slot not released whose owner process is gone (pid and start time,
  checked when the budget is full) is released as of the moment that was noticed:
  `until = min(until, noticed + HOLD)` — spent for one window, never leaked beyond it.
- *Priorities*: a process waiting with priority P (AUTH 0 < SUBMIT 1 < MONITOR 2) registers
  in `waiters`; a process may take a slot only if no other live process waits with a more
  urgent priority (seen within STALE_WAITER seconds), so one process's monitoring never
  delays another's logins or creates.
- *Fair share*: among processes waiting with the same priority, the slot goes to the one
  with the lowest ticket; a process that got a slot takes a new ticket (the back of the
  line) — round robin. A slot left free for GRACE by the process whose turn it is goes to
  whoever asks, so no slot idles for a late process.
- *Smooth*: besides the slots, grants are paced at CALLS per SECONDS + margin with a burst
  of at most BURST_SHARE of CALLS (a token bucket shared by the processes). This is not
  what keeps the limit — the slots do — it keeps the calls spread over the window, instead
  of CALLS at once and then a window of silence.
- *Throttled* (1010009 — a client on another host, or a platform that counts differently):
  every process pauses for a cool-down (`paused_until`: min(SECONDS, 4 × SECONDS/CALLS ×
  the number of throttles in a row)), and the share of CALLS the host grants itself drops
  by a quarter (SHRINK; never under one call per window); each later reply raises it again
  by RECOVERY of CALLS, up to the full budget. A throttled slot stays taken like any other.

Times are CLOCK_MONOTONIC (`time.monotonic`, one clock for all processes of a boot); the
ledger remembers the boot and forgets slots of an earlier one.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from .hoststate import HostStateFailed, boot_id, private_file, process_alive, process_start

log = structlog.get_logger("orchestrator.pacing")

Clock = Callable[[], float]

SEND_SLACK = 1.0  # seconds between a slot's grant and its request's start (body, journal)
STALE_WAITER = 1.0  # a waiter not seen for this long is not waited for
MAX_POLL = 0.25  # a waiting process looks again at least this often
MIN_SHARE_CALLS = 1  # the host never grants itself less than one call per window
RECOVERY = 0.02  # of CALLS: the share regained per reply after a throttle
SHRINK = 0.75  # the share kept after a throttle
BURST_SHARE = 0.05  # of CALLS: grants that may go out at once after a quiet spell
PRUNE_EVERY = 64
BUSY_TIMEOUT_MS = 10_000
WAL_FILES = ("-wal", "-shm")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS budget (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    boot TEXT NOT NULL,
    share REAL NOT NULL DEFAULT 1.0,
    paused_until REAL NOT NULL DEFAULT 0,
    streak INTEGER NOT NULL DEFAULT 0,
    next_ticket INTEGER NOT NULL DEFAULT 1,
    throttled INTEGER NOT NULL DEFAULT 0,
    tokens REAL NOT NULL DEFAULT 0,
    tokens_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS owners (
    owner TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    pid_start INTEGER,
    label TEXT NOT NULL,
    calls INTEGER NOT NULL,
    seconds REAL NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL
);
CREATE TABLE IF NOT EXISTS waiters (
    owner TEXT PRIMARY KEY,
    priority INTEGER NOT NULL,
    ticket INTEGER NOT NULL,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    priority INTEGER NOT NULL,
    reserved_at REAL NOT NULL,
    released_at REAL,
    hold REAL NOT NULL,
    until REAL NOT NULL,
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS slots_until ON slots (until);
CREATE INDEX IF NOT EXISTS slots_open ON slots (released_at) WHERE released_at IS NULL;
"""


class Outcome(StrEnum):
    """How a slot's call ended."""

    REPLIED = "replied"  # the platform answered (success or an error reply other than 1010009)
    THROTTLED = "throttled"  # 1010009: refused by flow control
    FAILED = "failed"  # no reply (timeout, reset, connect failure): it may have arrived
    UNSENT = "unsent"  # never left this process


@dataclass(frozen=True)
class Granted:
    slot: int


@dataclass(frozen=True)
class Wait:
    """No slot now. Look again at `at` (monotonic seconds) or when woken."""

    at: float
    reason: str  # "paused" | "full" | "pace" | "priority" | "turn"
    firm: bool = True  # False: a release here may free a slot before `at`
    free_since: float | None = None  # "turn": when this process first saw the slot free


@dataclass(frozen=True)
class Throttle:
    cooldown: float
    share: float
    streak: int


class PacingLedger:
    """One process's handle on an app's ledger (or a private in-memory one, `path=None`).

    Every method is one short SQLite transaction, run on the caller's thread (the event
    loop's): a decision takes well under a millisecond (bench/multi_process.py)."""

    def __init__(
        self,
        path: Path | None,
        *,
        clock: Clock = time.monotonic,
        grace: float = 0.02,
    ) -> None:
        self.path = path
        self._clock = clock
        self.grace = grace
        self.pid = os.getpid()
        self.owner = f"{self.pid}:{secrets.token_hex(4)}"
        self._alive: dict[str, tuple[float, bool]] = {}
        self._grants = 0
        self.closed = False
        self._opening = True
        if path is None:
            self._db = sqlite3.connect(":memory:", isolation_level=None)
            self._prepare()
            return
        try:
            self._open_racing(path)
        except sqlite3.DatabaseError as exc:
            if "not a database" not in str(exc):
                raise HostStateFailed(path, "pacing ledger", exc) from None
            # the ledger is disposable (its slots are a window old at most): start afresh
            log.warning("the pacing ledger was damaged; rebuilt empty", file=str(path))
            self._db.close()
            try:
                for stale in (path, *(path.with_name(path.name + end) for end in WAL_FILES)):
                    stale.unlink(missing_ok=True)
            except OSError as error:
                raise HostStateFailed(path, "pacing ledger", error) from None
            self._open(path)
        self._opening = False

    def _open_racing(self, path: Path) -> None:
        """`_open`, again while another process opens the same new ledger: switching a fresh
        file to WAL (or recovering its WAL) answers "database is locked" at once, without
        SQLite's busy handler — several `rollout` processes started together meet it. Tried
        again for up to the busy timeout, then it is the host's fault (HostStateFailed)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        pause = 0.005
        while True:
            try:
                self._open(path, racing=True)
                return
            except sqlite3.OperationalError as exc:
                self._db.close()
                if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                    raise HostStateFailed(path, "pacing ledger", exc) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.2)

    def _open(self, path: Path, *, racing: bool = False) -> None:
        """Open (creating) the ledger file; HostStateFailed names it when it cannot be."""
        try:
            private_file(path)
        except OSError as exc:
            raise HostStateFailed(path, "pacing ledger", exc) from None
        self._db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            # the ledger need not survive a power cut: after a reboot its slots are void
            self._db.execute("PRAGMA synchronous = OFF")
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc) or (racing and "locked" in str(exc)):
                raise  # rebuilt, or tried again, by the caller
            raise HostStateFailed(path, "pacing ledger", exc) from None
        self._prepare()

    def _prepare(self) -> None:
        with self._write() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                # another version's ledger: its slots are a window old at most, start afresh
                for table in ("budget", "owners", "waiters", "slots"):
                    db.execute(f"DROP TABLE IF EXISTS {table}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            self._check_boot()

    # ---- plumbing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction. A ledger file that fails (a full disk, a damaged file) raises
        HostStateFailed naming it (exit 2) — a fault of this host, not of the platform."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            if self.path is None or (self._opening and "not a database" in str(exc)):
                raise  # in memory: a bug; damaged while opening: rebuilt by __init__
            raise HostStateFailed(self.path, "pacing ledger", exc) from None

    def _check_boot(self) -> None:
        boot = boot_id()
        row = self._db.execute("SELECT boot FROM budget WHERE id = 1").fetchone()
        if row is None:
            self._db.execute("INSERT INTO budget (id, boot) VALUES (1, ?)", (boot,))
        elif row[0] != boot:  # monotonic times of another boot mean nothing now
            for table in ("slots", "waiters", "owners"):
                self._db.execute(f"DELETE FROM {table}")
            self._db.execute(
                "UPDATE budget SET boot = ?, share = 1.0, paused_until = 0, streak = 0", (boot,)
            )

    def now(self) -> float:
        return self._clock()

    # ---- this process -------------------------------------------------------------------------
    def register(self, label: str, calls: int, seconds: float) -> None:
        """Name this process's share of the budget (shown by `rollout budget`)."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO owners (owner, pid, pid_start, label, calls, seconds,"
                " started_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (self.owner, self.pid, process_start(self.pid), label, calls, seconds, self.now()),
            )

    def relabel(self, label: str) -> None:
        with self._write() as db:
            db.execute("UPDATE owners SET label = ? WHERE owner = ?", (label, self.owner))

    def withdraw(self) -> None:
        """This process waits for no slot now."""
        if self.closed:
            return
        with self._write() as db:
            db.execute("DELETE FROM waiters WHERE owner = ?", (self.owner,))

    def close(self) -> None:
        """Leave the ledger: no more waiting; the slots taken stay taken until their time.
        A ledger that cannot be written any more is closed all the same."""
        if self.closed:
            return
        try:
            with self._write() as db:
                db.execute("DELETE FROM waiters WHERE owner = ?", (self.owner,))
                db.execute(
                    "UPDATE owners SET ended_at = ? WHERE owner = ?", (self.now(), self.owner)
                )
        except HostStateFailed as exc:
            log.warning("could not mark this process as ended in the pacing ledger", error=exc.rule)
        finally:
            self._db.close()
            self.closed = True

    # ---- slots --------------------------------------------------------------------------------
    def try_reserve(
        self,
        priority: int,
        then: int | None,
        calls: int,
        hold: float,
        request_timeout: float,
        free_since: float | None = None,
    ) -> Granted | Wait:
        """A slot for a call of `priority` now, or when to look again.

        `then`: the priority this process waits with after this grant (None: no more
        waiters). `hold`: SECONDS + margin. `free_since`: from the previous `Wait("turn")`."""
        with self._write() as db:
            now = self.now()
            share, paused_until, tokens, tokens_at = db.execute(
                "SELECT share, paused_until, tokens, tokens_at FROM budget WHERE id = 1"
            ).fetchone()
            if now < paused_until:
                self._wait_as(priority, now)
                return Wait(paused_until, "paused")
            limit = max(MIN_SHARE_CALLS, math.floor(share * calls + 1e-9))
            taken = self._taken(now)
            if taken >= limit and self._reap(now):
                taken = self._taken(now)
            if taken >= limit:
                self._wait_as(priority, now)
                until, released = db.execute(
                    "SELECT until, released_at IS NOT NULL FROM slots WHERE until > ?"
                    " ORDER BY until LIMIT 1 OFFSET ?",
                    (now, taken - limit),
                ).fetchone()
                return Wait(until, "full", firm=bool(released))
            # smoothing, not the limit: grants flow at CALLS per window with a small burst, so
            # the slots (and the platform's windows) fill evenly instead of all at once
            rate = calls / hold
            burst = max(1.0, calls * BURST_SHARE)
            tokens = min(burst, tokens + (now - tokens_at) * rate)
            if tokens < 1.0:
                self._wait_as(priority, now)
                return Wait(now + (1.0 - tokens) / rate, "pace")
            ticket = self._wait_as(priority, now)
            ahead = self._ahead_of_me(priority, ticket, now)
            if ahead == "priority":
                return Wait(now + self._poll(calls, hold), "priority")
            if ahead == "turn":
                since = now if free_since is None else free_since
                if now - since < self.grace:
                    return Wait(min(since + self.grace, now + self.grace / 2), "turn", True, since)
            cursor = db.execute(
                "INSERT INTO slots (owner, priority, reserved_at, hold, until)"
                " VALUES (?, ?, ?, ?, ?)",
                (self.owner, priority, now, hold, now + request_timeout + SEND_SLACK + hold),
            )
            slot = cursor.lastrowid
            assert slot is not None
            db.execute(
                "UPDATE budget SET tokens = ?, tokens_at = ? WHERE id = 1", (tokens - 1.0, now)
            )
            if then is None:
                db.execute("DELETE FROM waiters WHERE owner = ?", (self.owner,))
            else:
                self._requeue(then, now)
            self._grants += 1
            if self._grants % PRUNE_EVERY == 0:
                self._prune(now)
            return Granted(slot)

    def release(self, slot: int, outcome: Outcome, calls: int, seconds: float) -> Throttle | None:
        """The call of `slot` ended: it stays taken HOLD from now (or is freed when it never
        left). A throttle starts the app's cool-down and shrinks the host's share."""
        with self._write() as db:
            now = self.now()
            if outcome is Outcome.UNSENT:  # the slot and its pacing token go back
                db.execute(
                    "UPDATE slots SET released_at = ?, until = ?, outcome = ? WHERE id = ?",
                    (now, now, outcome.value, slot),
                )
                db.execute("UPDATE budget SET tokens = tokens + 1.0 WHERE id = 1")
                return None
            db.execute(
                "UPDATE slots SET released_at = ?, until = ? + hold, outcome = ? WHERE id = ?",
                (now, now, outcome.value, slot),
            )
            if outcome is Outcome.THROTTLED:
                return self._throttled(now, calls, seconds)
            if outcome is Outcome.REPLIED:
                db.execute(
                    "UPDATE budget SET share = MIN(1.0, share + ?), streak = 0"
                    " WHERE id = 1 AND (share < 1.0 OR streak > 0)",
                    (RECOVERY,),
                )
            return None

    def note_throttled(self, calls: int, seconds: float) -> Throttle:
        """A 1010009 seen outside a slot: the same cool-down and shrink as in `release`."""
        with self._write():
            return self._throttled(self.now(), calls, seconds)

    def note_success(self) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE budget SET share = MIN(1.0, share + ?), streak = 0"
                " WHERE id = 1 AND (share < 1.0 OR streak > 0)",
                (RECOVERY,),
            )

    # ---- inside a transaction -----------------------------------------------------------------
    def _taken(self, now: float) -> int:
        return int(
            self._db.execute("SELECT COUNT(*) FROM slots WHERE until > ?", (now,)).fetchone()[0]
        )

    def _throttled(self, now: float, calls: int, seconds: float) -> Throttle:
        share, streak = self._db.execute("SELECT share, streak FROM budget WHERE id = 1").fetchone()
        streak += 1
        share = max(MIN_SHARE_CALLS / calls, share * SHRINK)
        cooldown = min(seconds, seconds / calls * 4 * streak)
        self._db.execute(
            "UPDATE budget SET share = ?, streak = ?, throttled = throttled + 1,"
            " paused_until = MAX(paused_until, ?) WHERE id = 1",
            (share, streak, now + cooldown),
        )
        return Throttle(cooldown, share, streak)

    def _wait_as(self, priority: int, now: float) -> int:
        """Register (or refresh) this process as waiting with `priority`; its ticket."""
        row = self._db.execute(
            "SELECT priority, ticket FROM waiters WHERE owner = ?", (self.owner,)
        ).fetchone()
        if row is not None:
            if row[0] != priority:
                self._db.execute(
                    "UPDATE waiters SET priority = ?, seen_at = ? WHERE owner = ?",
                    (priority, now, self.owner),
                )
            else:
                self._db.execute(
                    "UPDATE waiters SET seen_at = ? WHERE owner = ?", (now, self.owner)
                )
            return int(row[1])
        return self._requeue(priority, now)

    def _requeue(self, priority: int, now: float) -> int:
        (ticket,) = self._db.execute(
            "UPDATE budget SET next_ticket = next_ticket + 1 WHERE id = 1 RETURNING next_ticket"
        ).fetchone()
        self._db.execute(
            "INSERT OR REPLACE INTO waiters (owner, priority, ticket, seen_at) VALUES (?, ?, ?, ?)",
            (self.owner, priority, ticket, now),
        )
        return int(ticket)

    def _ahead_of_me(self, priority: int, ticket: int, now: float) -> str | None:
        """`priority` when another live process waits with a more urgent priority; `turn`
        when one waits with the same priority and an earlier ticket; else None."""
        verdict: str | None = None
        rows = self._db.execute(
            "SELECT w.owner, w.priority, w.ticket, o.pid, o.pid_start FROM waiters w"
            " LEFT JOIN owners o ON o.owner = w.owner WHERE w.owner != ? AND w.seen_at > ?"
            " AND w.priority <= ?",
            (self.owner, now - STALE_WAITER, priority),
        ).fetchall()
        for owner, their_priority, their_ticket, pid, pid_start in rows:
            if pid is None or not self._owner_alive(owner, pid, pid_start, now):
                continue
            if their_priority < priority:
                return "priority"
            if their_ticket < ticket:
                verdict = "turn"
        return verdict

    def _owner_alive(self, owner: str, pid: int, pid_start: int | None, now: float) -> bool:
        if pid == self.pid:
            return True
        known = self._alive.get(owner)
        if known is not None and now - known[0] < 1.0:
            return known[1]
        alive = process_alive(pid, pid_start)
        self._alive[owner] = (now, alive)
        return alive

    def _reap(self, now: float) -> bool:
        """Release the open slots of processes that died: taken for one window from now."""
        reaped = False
        rows = self._db.execute(
            "SELECT DISTINCT s.owner, o.pid, o.pid_start FROM slots s"
            " LEFT JOIN owners o ON o.owner = s.owner"
            " WHERE s.released_at IS NULL AND s.until > ? AND s.owner != ?",
            (now, self.owner),
        ).fetchall()
        for owner, pid, pid_start in rows:
            if pid is not None and process_alive(pid, pid_start):
                continue
            self._db.execute(
                "UPDATE slots SET released_at = ?, until = MIN(until, ? + hold), outcome = 'dead'"
                " WHERE owner = ? AND released_at IS NULL",
                (now, now, owner),
            )
            self._db.execute("DELETE FROM waiters WHERE owner = ?", (owner,))
            self._db.execute(
                "UPDATE owners SET ended_at = COALESCE(ended_at, ?) WHERE owner = ?", (now, owner)
            )
            reaped = True
        return reaped

    def _prune(self, now: float) -> None:
        """Forget slots a window past counting, processes that ended a window ago (a process
        that died without a word ends when this notices), and waiters long silent."""
        horizon = self._db.execute("SELECT MAX(hold) FROM slots").fetchone()[0] or 0.0
        self._db.execute("DELETE FROM slots WHERE until < ?", (now - horizon,))
        for owner, pid, pid_start in self._db.execute(
            "SELECT owner, pid, pid_start FROM owners WHERE ended_at IS NULL AND owner != ?",
            (self.owner,),
        ).fetchall():
            if not process_alive(pid, pid_start):
                self._db.execute("UPDATE owners SET ended_at = ? WHERE owner = ?", (now, owner))
        self._db.execute(
            "DELETE FROM owners WHERE ended_at IS NOT NULL AND ended_at < ?", (now - horizon,)
        )
        self._db.execute(
            "DELETE FROM waiters WHERE seen_at < ? OR owner NOT IN"
            " (SELECT owner FROM owners WHERE ended_at IS NULL)",
            (now - max(horizon, STALE_WAITER),),
        )

    @staticmethod
    def _poll(calls: int, hold: float) -> float:
        return min(MAX_POLL, max(0.005, hold / calls / 2))


# ---- reading it (rollout budget) -----------------------------------------------------------------
@dataclass(frozen=True)
class OwnerUse:
    label: str
    pid: int
    state: str  # "active" | "waiting" | "ended" | "gone"
    waiting_priority: int | None
    calls_last_window: int
    throttled_last_window: int
    in_flight: int


@dataclass(frozen=True)
class BudgetView:
    calls: int
    seconds: float
    share: float
    paused_for: float
    taken: int
    throttled_total: int
    owners: list[OwnerUse]

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "seconds": self.seconds,
            "share": round(self.share, 3),
            "paused_for": round(self.paused_for, 3),
            "taken": self.taken,
            "throttled_total": self.throttled_total,
            "owners": [owner.__dict__ for owner in self.owners],
        }


def read_budget(path: Path, clock: Clock = time.monotonic) -> BudgetView | None:
    """Who shares the app's budget on this host now, and how much each used in the last
    window (SECONDS of the most recent process). None when the ledger does not exist, holds
    nothing yet, or no process is running or made a call in the last window."""
    if not path.exists():
        return None
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        db.execute("BEGIN")  # one snapshot for every read: the per-process counts add up
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'budget'").fetchone() is None:
            return None  # created, never written (e.g. a full disk): nothing recorded
        now = clock()
        budget = db.execute(
            "SELECT boot, share, paused_until, throttled FROM budget WHERE id = 1"
        ).fetchone()
        if budget is None or budget[0] != boot_id():
            return None
        owners = db.execute(
            "SELECT owner, pid, pid_start, label, calls, seconds, ended_at FROM owners"
            " ORDER BY started_at"
        ).fetchall()
        if not owners:
            return None
        calls, seconds = owners[-1][4], owners[-1][5]
        waiting = dict(
            db.execute(
                "SELECT owner, priority FROM waiters WHERE seen_at > ?", (now - STALE_WAITER,)
            ).fetchall()
        )
        use: list[OwnerUse] = []
        for owner, pid, pid_start, label, _, _, ended_at in owners:
            used, throttled, open_ = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(outcome = 'throttled'), 0),"
                " COALESCE(SUM(released_at IS NULL), 0) FROM slots"
                " WHERE owner = ? AND reserved_at > ?",
                (owner, now - seconds),
            ).fetchone()
            alive = process_alive(pid, pid_start)
            if ended_at is not None:
                state = "ended"
            elif not alive:
                state = "gone"
            elif owner in waiting:
                state = "waiting"
            else:
                state = "active"
            if state in ("ended", "gone") and used == 0:
                continue
            use.append(
                OwnerUse(
                    label,
                    pid,
                    state,
                    waiting.get(owner) if state == "waiting" else None,
                    int(used),
                    int(throttled),
                    int(open_),
                )
            )
        if not use:  # only processes that ended or died a window ago or more
            return None
        taken = db.execute("SELECT COUNT(*) FROM slots WHERE until > ?", (now,)).fetchone()[0]
        return BudgetView(
            calls,
            seconds,
            float(budget[1]),
            max(0.0, float(budget[2]) - now),
            int(taken),
            int(budget[3]),
            use,
        )
    finally:
        db.close()
