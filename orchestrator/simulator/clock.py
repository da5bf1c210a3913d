"""Time for the simulator: simulated wall time for devices, real monotonic time for budgets.

Two clocks live in one object because the platform has two kinds of time. Device behaviour
(wake-ups, upgrade durations, task windows) runs in *simulated* time so a rehearsal of a
day-long rollout takes minutes (`--speed`). Flow control and token lifetimes run in *real*
seconds, because that is what a client paces against. Tests inject `ManualClock` and move
both by hand, so nothing depends on sleeping.

The platform's own clock is the simulated clock plus a fault knob's offset
(`Platform.now()`); every time the platform states is read from it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Protocol

PLATFORM_TIME_FORMAT = "%Y%m%dT%H%M%SZ"


class Clock(Protocol):
    def now(self) -> float:
        """Simulated UTC time, as epoch seconds."""
        ...

    def monotonic(self) -> float:
        """Real seconds, for throttle windows and token lifetimes."""
        ...


class ScaledClock:
    """Simulated time runs `speed` times faster than real time from `start` on."""

    def __init__(self, speed: float = 1.0, start: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._start_wall = time.time() if start is None else start
        self._start_real = time.monotonic()
        self._offset = 0.0

    def now(self) -> float:
        return self._start_wall + (time.monotonic() - self._start_real) * self.speed + self._offset

    def monotonic(self) -> float:
        return time.monotonic()

    def advance(self, seconds: float) -> None:
        """Jump simulated time forward (real time cannot be jumped)."""
        self._offset += seconds


class ManualClock:
    """A clock that moves only when told to.

    `advance` jumps simulated time only (like `ScaledClock.advance`); `tick` lets real time
    pass, which moves simulated time along with it.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = start
        self._real = 0.0

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._real

    def advance(self, seconds: float) -> None:
        self._wall += seconds

    def tick(self, seconds: float) -> None:
        self._wall += seconds
        self._real += seconds


def format_platform_time(epoch: float) -> str:
    """Epoch seconds → the platform's `yyyyMMdd'T'HHmmss'Z'`."""
    return datetime.fromtimestamp(epoch, UTC).strftime(PLATFORM_TIME_FORMAT)


def format_http_date(epoch: float) -> str:
    """Epoch seconds → an HTTP `Date` (RFC 7231 IMF-fixdate: `Sun, 29 Nov 2026 22:36:11 GMT`)."""
    return formatdate(epoch, usegmt=True)


def parse_platform_time(text: str) -> float:
    """The platform's `yyyyMMdd'T'HHmmss'Z'` → epoch seconds; ValueError when malformed."""
    if len(text) != 16:
        raise ValueError(f"not in yyyyMMdd'T'HHmmss'Z' format: {text!r}")
    return datetime.strptime(text, PLATFORM_TIME_FORMAT).replace(tzinfo=UTC).timestamp()
