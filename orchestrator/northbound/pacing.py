"""Pacing: one limiter per application, shared by every call in the process.

The platform refuses a call that would make more than CALLS calls of the app in any sliding
SECONDS window. A leaky bucket such as `AsyncLimiter(CALLS, SECONDS)` lets almost 2×CALLS
through in one window (a full bucket, then its refill), so it gets throttled. This pacer
hands out one slot every `(SECONDS + margin) / CALLS` seconds instead — a burst of one — which
keeps any two calls CALLS apart at least `SECONDS + margin` apart: the margin absorbs network
jitter between our send time and the platform's arrival time (half of it is kept for the
event loop's own lateness, see `_dispatch`). The cost is `margin / SECONDS` of the budget
(1 % by default).

Slots go to waiters by priority (submission before monitoring), first come first served
within one priority. Every attempt — logins, retries — takes a slot. A throttle reply
(another client spending the same app's budget) pauses all senders for a cool-down and slows
the pace; each call that then succeeds speeds it up again towards the full rate.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
import weakref
from collections.abc import Awaitable, Callable
from enum import IntEnum

import structlog

log = structlog.get_logger("orchestrator.pacing")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

DEFAULT_MARGIN_SHARE = 0.01
MIN_MARGIN_SECONDS = 0.02
MAX_SLOWDOWN = 8.0


class Priority(IntEnum):
    """Lower value is served first."""

    AUTH = 0
    SUBMIT = 1
    MONITOR = 2


class Pacer:
    def __init__(
        self,
        calls: int,
        seconds: float,
        margin: float | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if calls < 1 or seconds <= 0:
            raise ValueError("a rate limit needs calls >= 1 and seconds > 0")
        self.calls = calls
        self.seconds = seconds
        self.margin = (
            max(MIN_MARGIN_SECONDS, seconds * DEFAULT_MARGIN_SHARE) if margin is None else margin
        )
        self.spacing = (seconds + self.margin) / calls
        self._clock = clock
        self._sleep = sleep
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._next_slot = 0.0
        self._paused_until = 0.0
        self._slowdown = 1.0
        self._throttle_streak = 0
        self._dispatcher: asyncio.Task[None] | None = None
        self.granted = 0
        self.throttled = 0

    async def acquire(self, priority: Priority = Priority.SUBMIT) -> None:
        """Wait for this call's slot."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (int(priority), next(self._order), future))
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())
        await future  # a cancelled waiter is skipped by the dispatcher

    def on_throttled(self) -> None:
        """The platform said 1010009: pause everyone, then go on more slowly."""
        self.throttled += 1
        self._throttle_streak += 1
        self._slowdown = min(MAX_SLOWDOWN, self._slowdown * 2)
        cooldown = min(self.seconds, self.spacing * 4 * self._throttle_streak)
        self._paused_until = max(self._paused_until, self._clock() + cooldown)
        log.warning(
            "throttled by the platform; pausing all senders",
            cooldown_s=round(cooldown, 3),
            pace_factor=self._slowdown,
        )

    def on_success(self) -> None:
        """A call went through: recover the full rate gradually."""
        self._throttle_streak = 0
        if self._slowdown > 1.0:
            self._slowdown = max(1.0, self._slowdown * 0.9)

    async def _dispatch(self) -> None:
        while self._waiters:
            now = self._clock()
            ready_at = max(self._next_slot, self._paused_until)
            if ready_at > now:
                await self._sleep(ready_at - now)
                continue
            _, _, future = heapq.heappop(self._waiters)
            if future.done():  # cancelled while waiting: its slot goes to the next one
                continue
            future.set_result(None)
            self.granted += 1
            # Keep the cadence from the planned slot, so the event loop's wake-up lateness
            # does not add up; but never bank more than half the margin of idle time, so
            # any CALLS + 1 grants still span at least SECONDS + margin / 2.
            self._next_slot = max(ready_at, now - self.margin / 2) + self.spacing * self._slowdown


_registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], Pacer]] = (
    weakref.WeakKeyDictionary()
)


def shared_pacer(
    base_url: str, app_id: str, calls: int, seconds: float, margin: float | None = None
) -> Pacer:
    """The one pacer of an application (base URL + app id) in this process and event loop."""
    pacers = _registry.setdefault(asyncio.get_running_loop(), {})
    key = (base_url.rstrip("/"), app_id)
    pacer = pacers.get(key)
    if pacer is None or (pacer.calls, pacer.seconds) != (calls, seconds):
        pacer = Pacer(calls, seconds, margin)
        pacers[key] = pacer
    return pacer
