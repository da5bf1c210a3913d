"""Pacing: every call of an application takes a slot in the app's ledger first.

The platform refuses a call that would make more than CALLS calls of the app in any sliding
SECONDS window, counted on arrival (platform-api.md §1, 1010009). A call's slot is taken from
just before its send until SECONDS (+ `margin`, default 0) after its reply or failure was
seen, and a slot is granted only while fewer than CALLS are taken — so arrivals never exceed
CALLS in any window, whatever the network's jitter, and no spacing is guessed. The ledger
(`ledger.PacingLedger`) is one SQLite file per app shared by every process of the host, so
all of them together keep to the one budget; the rules (dead processes, fair share between
processes, priorities across processes, throttle cool-down) are in ledger.py.

In one process, slots go to waiters by priority (logins, then submission, then monitoring),
first come first served within one priority; one dispatcher task asks the ledger on their
behalf. Every attempt — logins, retries — takes a slot, and must give it back with
`release(slot, outcome)` once its reply or failure is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import sqlite3
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import structlog

from .hoststate import AppState, HostStateFailed, canonical_url
from .ledger import Granted, Outcome, PacingLedger, Wait

log = structlog.get_logger("orchestrator.pacing")

Clock = Callable[[], float]
DEFAULT_REQUEST_TIMEOUT = 30.0


class Priority(IntEnum):
    """Lower value is served first (in this process and across the host's processes)."""

    AUTH = 0
    SUBMIT = 1
    MONITOR = 2


@dataclass(frozen=True)
class Slot:
    """A granted slot of the ledger: give it back with `Pacer.release`."""

    id: int
    priority: Priority


class Pacer:
    def __init__(
        self,
        calls: int,
        seconds: float,
        margin: float | None = None,
        *,
        ledger: PacingLedger | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        label: str = "",
        clock: Clock = time.monotonic,
    ) -> None:
        """`calls` per `seconds`: the app's limit. `margin`: extra seconds a slot stays taken
        after its reply (default 0). `ledger`: the app's shared ledger (default: a private one
        in memory, for this pacer alone). `request_timeout`: the longest a call may take,
        bounding how long the slot of a process that died mid-call stays taken."""
        if calls < 1 or seconds <= 0:
            raise ValueError("a rate limit needs calls >= 1 and seconds > 0")
        self.calls = calls
        self.seconds = seconds
        self.margin = 0.0 if margin is None else margin
        self.hold = seconds + self.margin
        self.request_timeout = request_timeout
        grace = min(0.05, max(0.005, seconds / calls / 4))
        if ledger is None:
            ledger = PacingLedger(None, clock=clock, grace=grace)
        else:
            ledger.grace = grace
        self.ledger = ledger
        self.ledger.register(label or f"pid {os.getpid()}", calls, seconds)
        self._waiters: list[tuple[int, int, asyncio.Future[Slot]]] = []
        self._order = itertools.count()
        self._dispatcher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._waiting_as: int | None = None
        self._firm = True
        self._refs = 0
        self.granted = 0
        self.throttled = 0

    # ---- callers ------------------------------------------------------------------------------
    async def acquire(self, priority: Priority = Priority.SUBMIT) -> Slot:
        """Wait for this call's slot."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Slot] = loop.create_future()
        heapq.heappush(self._waiters, (int(priority), next(self._order), future))
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = loop.create_task(self._dispatch())
        elif self._waiting_as is not None and priority < self._waiting_as:
            self._wake.set()  # the ledger must learn the more urgent priority now
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result(), Outcome.UNSENT)  # granted as we were cancelled
            raise

    def release(self, slot: Slot, outcome: Outcome) -> None:
        """The slot's call ended (`outcome`): its slot stays taken SECONDS + margin from now
        (freed at once when it never left). A throttle pauses every process of the app."""
        try:
            throttle = self.ledger.release(slot.id, outcome, self.calls, self.seconds)
        except HostStateFailed as exc:  # the slot then stays taken until its worst-case time
            log.warning("could not release a pacing slot", error=exc.rule)
            return
        if throttle is not None:
            self.throttled += 1
            log.warning(
                "throttled by the platform; pausing every process of the app",
                cooldown_s=round(throttle.cooldown, 3),
                share=round(throttle.share, 3),
            )
        if not self._firm and self._wake is not None:
            self._wake.set()

    def on_throttled(self) -> None:
        """The platform said 1010009 to a call made without a slot: pause everyone."""
        throttle = self.ledger.note_throttled(self.calls, self.seconds)
        self.throttled += 1
        log.warning(
            "throttled by the platform; pausing every process of the app",
            cooldown_s=round(throttle.cooldown, 3),
        )

    def on_success(self) -> None:
        """A call made without a slot went through: recover the full budget gradually."""
        self.ledger.note_success()

    def describe(self, label: str) -> None:
        """What this process is doing, for `rollout budget` (e.g. "run meters-fw (run 3)")."""
        self.ledger.relabel(label)

    # ---- lifetime -----------------------------------------------------------------------------
    def attach(self) -> None:
        self._refs += 1

    async def detach(self) -> None:
        """One user fewer; the last one closes the ledger handle."""
        self._refs -= 1
        if self._refs <= 0:
            await self.close()

    async def close(self) -> None:
        if self._dispatcher is not None and not self._dispatcher.done():
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for _, _, future in self._waiters:
            if not future.done():
                future.cancel()
        self._waiters.clear()
        self.ledger.close()
        _forget(self)

    # ---- the dispatcher -----------------------------------------------------------------------
    def _top(self) -> tuple[int, int | None] | None:
        """The priority of the next waiter, and of the one after it (None: no other)."""
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)  # cancelled while waiting
        if not self._waiters:
            return None
        rest = [entry for entry in self._waiters[1:] if not entry[2].done()]
        return self._waiters[0][0], (min(rest)[0] if rest else None)

    async def _dispatch(self) -> None:
        assert self._wake is not None
        free_since: float | None = None
        try:
            while (top := self._top()) is not None:
                priority, then = top
                try:
                    decision = self.ledger.try_reserve(
                        priority, then, self.calls, self.hold, self.request_timeout, free_since
                    )
                except HostStateFailed as exc:  # this host's fault: the command stops (exit 2)
                    self._fail_all(exc)
                    return
                if isinstance(decision, Granted):
                    _, _, future = heapq.heappop(self._waiters)
                    future.set_result(Slot(decision.slot, Priority(priority)))
                    self.granted += 1
                    free_since = None
                    continue
                self._await_decision(decision, priority)
                free_since = decision.free_since
                delay = min(max(0.0, decision.at - self.ledger.now()), _poll(self))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            self._waiting_as = None
            if not self.ledger.closed:
                with contextlib.suppress(HostStateFailed, sqlite3.Error):
                    self.ledger.withdraw()

    def _await_decision(self, decision: Wait, priority: int) -> None:
        self._waiting_as = priority
        self._firm = decision.firm

    def _fail_all(self, error: BaseException) -> None:
        log.error("pacing stopped", error=str(error))
        for _, _, future in self._waiters:
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()


def _poll(pacer: Pacer) -> float:
    """A waiting process looks at the ledger again at least this often (other processes'
    releases, waiters and deaths are seen by looking)."""
    return min(0.25, max(0.005, pacer.hold / pacer.calls))


_registry: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[str, str, str], Pacer]
] = weakref.WeakKeyDictionary()


def _forget(pacer: Pacer) -> None:
    for pacers in _registry.values():
        for key, value in list(pacers.items()):
            if value is pacer:
                del pacers[key]


def shared_pacer(
    base_url: str,
    app_id: str,
    calls: int,
    seconds: float,
    margin: float | None = None,
    *,
    state: AppState | None = None,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    label: str = "",
) -> Pacer:
    """The one pacer of an application (base URL + app id) in this process and event loop,
    on the app's ledger in `state` (shared with the host's other processes; None: a ledger
    private to this process)."""
    pacers = _registry.setdefault(asyncio.get_running_loop(), {})
    where = str(state.directory) if state is not None else ""
    key = (canonical_url(base_url), app_id, where)
    pacer = pacers.get(key)
    if pacer is None or (pacer.calls, pacer.seconds) != (calls, seconds):
        ledger = PacingLedger(state.ledger_file) if state is not None else None
        pacer = Pacer(
            calls, seconds, margin, ledger=ledger, request_timeout=request_timeout, label=label
        )
        pacers[key] = pacer
    return pacer
