"""Riding out a platform outage: transient faults pause the calls, up to a budget of time.

A fault is *transient* when the platform, or the path to it, is down and may come back on
its own: the connection refused or unreachable, a connect or DNS timeout, a gateway's
502/503/504 (`PlatformCallError.transient`). Such a call is sent again once a pause has
passed; the pauses grow with the outage's age (half of it, from `first_wait` up to
`max_wait`), so a blip of a second costs a second and a long outage is probed every
`max_wait` seconds. Every caller shares one outage: its start is the first transient fault
since the platform last answered, and any reply from the platform ends it.

When the outage has lasted `budget` seconds (`execution.outage_budget`, default 600), the next
transient fault raises `PlatformUnreachable` — exit 1, "platform unreachable for N s" or "N min";
nothing is lost, `rollout resume` goes on once the platform answers. Permanent faults (an
unknown host name, an untrusted certificate, TLS against plain HTTP) are not the outage's
business: they fail at once.

Time is injectable (`monotonic`, `sleep`): tests scale the budget down instead of waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from ..errors import PlatformCallError, PlatformUnreachable
from .config import DEFAULT_OUTAGE_BUDGET

log = structlog.get_logger("orchestrator.northbound")

FIRST_WAIT = 0.5  # seconds before the first retry
MAX_WAIT = 30.0  # a long outage is probed this often
LOG_EVERY = 10.0  # seconds between "still unreachable" log lines
Sleep = Callable[[float], Awaitable[None]]


def describe_duration(seconds: float) -> str:
    """`42 s`, `3 min`, `1 h 5 min` — for people, rounded."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


class Outage:
    """The platform's reachability as every caller of one client sees it."""

    def __init__(
        self,
        budget: float = DEFAULT_OUTAGE_BUDGET,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        first_wait: float = FIRST_WAIT,
        max_wait: float = MAX_WAIT,
    ) -> None:
        self.budget = budget
        self._monotonic = monotonic
        self._sleep = sleep
        self.first_wait = first_wait
        self.max_wait = max_wait
        self.since: float | None = None  # monotonic start of the current outage
        self._last_log = 0.0
        self.outages = 0  # how many outages were ridden out (for tests and the journal)
        self.pauses = 0
        # told once when an outage starts, with its reason (the engine's outage notice);
        # must not block nor raise
        self.on_begin: Callable[[str], None] | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def now(self) -> float:
        """The outage's monotonic clock, in seconds."""
        return self._monotonic()

    def down_for(self) -> float:
        return 0.0 if self.since is None else self._monotonic() - self.since

    def answered(self) -> None:
        """The platform answered a call: any outage is over."""
        if self.since is None:
            return
        log.warning(
            "platform reachable again; going on",
            down_for=describe_duration(self.down_for()),
        )
        self.since = None
        self.outages += 1

    def begin(self, error: PlatformCallError | str) -> None:
        """A transient fault: the outage starts now, unless it already has."""
        if self.since is not None:
            return
        self.since = self._last_log = self._monotonic()
        log.warning(
            "platform unreachable; pausing and trying again",
            reason=_reason(error),
            budget=describe_duration(self.budget),
        )
        if self.on_begin is not None:
            self.on_begin(_reason(error))

    async def pause(self, error: PlatformCallError) -> None:
        """Wait before sending the call that met `error` (transient) again.

        Raises PlatformUnreachable once the outage has lasted the budget."""
        self.begin(error)
        assert self.since is not None
        now = self._monotonic()
        reason = _reason(error)
        down = now - self.since
        left = self.budget - down
        if left <= 0.05 * self.first_wait:
            raise PlatformUnreachable(
                f"platform unreachable for {describe_duration(down)} ({reason}); nothing is "
                "lost: `rollout resume PLAN` goes on once it answers (`rollout run PLAN` if "
                f"no run had started; execution.outage_budget = {self.budget:g} s)"
            )
        wait = min(self.max_wait, max(self.first_wait, down / 2), left)
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.warning(
                "platform still unreachable",
                down_for=describe_duration(down),
                reason=reason,
                gives_up_in=describe_duration(left),
            )
        self.pauses += 1
        await self._sleep(wait)


def _reason(error: PlatformCallError | str) -> str:
    """The error's own words without the call's method and path."""
    if isinstance(error, str):
        return error
    text = str(error)
    prefix = f"{error.method} {error.path}: " if error.method else ""
    return text.removeprefix(prefix)
