"""Flow control as the platform applies it: one strict sliding window per application.

A call is admitted when fewer than `calls` calls of the same app were admitted in the last
`seconds` (real time); otherwise it is refused with 403 / 1010009 and neither counts nor acts.
The window is strict — unlike a leaky bucket, no burst can ever fit `calls + 1` calls into any
window — so it is the oracle the client's pacing is measured against.

A *throttle storm* simulates another client of the same app: it tries to spend `storm_share`
of the budget at an even rate. Its attempts are replayed lazily (on the next check), so the
storm needs no background task and runs identically under a manual clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _AppWindow:
    admitted: deque[float] = field(default_factory=deque)
    storm_next: float | None = None


class SlidingWindowThrottle:
    def __init__(self, calls: int, seconds: float, monotonic: Callable[[], float]) -> None:
        if calls < 1 or seconds <= 0:
            raise ValueError("the rate limit needs calls >= 1 and seconds > 0")
        self.calls = calls
        self.seconds = seconds
        self._monotonic = monotonic
        self._windows: dict[str, _AppWindow] = {}
        self.storm_share = 0.0
        self._storm_started = 0.0
        self.storm_admitted = 0
        self.enabled = True

    def set_storm(self, share: float) -> None:
        """Let a phantom client of every app try to spend `share` (0–1) of the budget."""
        self.storm_share = max(0.0, min(share, 1.0))
        self._storm_started = self._monotonic()
        for window in self._windows.values():
            window.storm_next = self._storm_started if self.storm_share > 0 else None

    def _window(self, app: str) -> _AppWindow:
        window = self._windows.get(app)
        if window is None:
            window = _AppWindow(storm_next=self._storm_started if self.storm_share > 0 else None)
            self._windows[app] = window
        return window

    def _try(self, window: _AppWindow, at: float) -> bool:
        admitted = window.admitted
        horizon = at - self.seconds
        while admitted and admitted[0] <= horizon:
            admitted.popleft()
        if len(admitted) >= self.calls:
            return False
        admitted.append(at)
        return True

    def _replay_storm(self, window: _AppWindow, now: float) -> None:
        if window.storm_next is None or self.storm_share <= 0:
            return
        period = self.seconds / (self.storm_share * self.calls)
        # attempts older than one window cannot affect the present window
        if window.storm_next < now - self.seconds:
            skipped = int((now - self.seconds - window.storm_next) / period) + 1
            window.storm_next += skipped * period
        while window.storm_next <= now:
            if self._try(window, window.storm_next):
                self.storm_admitted += 1
            window.storm_next += period

    def admit(self, app: str) -> bool:
        """Count a call of `app` now if the window has room; False means refuse it."""
        if not self.enabled:
            return True
        now = self._monotonic()
        window = self._window(app)
        self._replay_storm(window, now)
        return self._try(window, now)

    def export(self) -> dict[str, list[float]]:
        """Per app, the ages (real seconds) of the calls admitted in the current window."""
        now = self._monotonic()
        return {app: [now - at for at in window.admitted] for app, window in self._windows.items()}

    def restore(self, saved: dict[str, list[float]], elapsed: float) -> None:
        """Windows from `export`, `elapsed` real seconds later: only calls still inside count."""
        now = self._monotonic()
        for app, ages in saved.items():
            window = self._window(app)
            window.admitted = deque(
                now - age - elapsed for age in ages if age + elapsed < self.seconds
            )
