"""The platform's clock, measured: every time we send or compare is on the platform's time.

Every time field of the API is the platform's UTC (platform-api.md §1), and nothing bounds its
offset from ours (§7). A custom window's start must not be in the platform's past (123033),
and a task's createTime is stamped by the platform's clock. So the client measures the offset
instead of trusting its own clock:

- each reply's `Date` header (RFC 7231, whole seconds) was stamped by the platform between
  the moment our request left (`sent`) and the moment we read the reply (`received`): the
  platform's time at some local instant in [sent, received] lay in [D, D + 1), so

      offset = platform − local  ∈  [D − received, D + 1 − sent];

- a task we created has the same form with its `createTime` (also whole seconds): it was
  stamped between our intent and the reply carrying its operationId.

Samples are intersected, so the bound narrows to about one second plus the shortest round
trip. When a sample contradicts the bound (the platform's clock was set, or drifts, as the
simulator's accelerated clock does) the bound restarts from that sample.

`now()` is the platform's time in epoch seconds; `uncertainty` the half width of the bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import structlog

log = structlog.get_logger("orchestrator.northbound")

PLATFORM_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
WARN_OFFSET = 30.0  # seconds: beyond this, say once that the clocks disagree
RESOLUTION = 1.0  # the platform's times have whole seconds


class PlatformClock:
    """The platform's time as measured from its replies. `local` is injectable (tests)."""

    def __init__(self, local: Callable[[], float] = time.time) -> None:
        self.local = local
        self._low = -math.inf
        self._high = math.inf
        self.samples = 0
        self._latest = -math.inf  # local receive time of the newest sample in the bound
        self._warned = False

    @property
    def measured(self) -> bool:
        return self.samples > 0

    @property
    def offset(self) -> float:
        """Seconds the platform's clock runs ahead of ours (0 before any sample)."""
        if not self.measured:
            return 0.0
        return (self._low + self._high) / 2

    @property
    def uncertainty(self) -> float:
        """Half the width of the offset's bound, in seconds (inf before any sample)."""
        if not self.measured:
            return math.inf
        return (self._high - self._low) / 2

    def now(self) -> float:
        """The platform's time now, epoch seconds."""
        return self.local() + self.offset

    def to_local(self, platform_time: float) -> float:
        return platform_time - self.offset

    def observe(self, platform_time: float, sent: float, received: float) -> None:
        """A platform timestamp (whole seconds) stamped between local `sent` and `received`."""
        if received < sent:
            return
        low, high = platform_time - received, platform_time + RESOLUTION - sent
        new_low, new_high = max(self._low, low), min(self._high, high)
        if new_low > new_high:  # the platform's clock moved: the newer reading wins
            if received < self._latest:
                return  # an old reading (a createTime from the journal) of the clock before
            new_low, new_high = low, high
        self._low, self._high = new_low, new_high
        self._latest = max(self._latest, received)
        self.samples += 1
        if not self._warned and abs(self.offset) > WARN_OFFSET:
            self._warned = True
            log.warning(
                "the platform's clock differs from ours; times sent and compared use the "
                "platform's",
                offset_seconds=round(self.offset, 1),
                uncertainty_seconds=round(self.uncertainty, 1),
            )

    def observe_date_header(self, value: str | None, sent: float, received: float) -> None:
        """Feed one reply's `Date` header; a missing or malformed header is ignored."""
        if not value:
            return
        try:
            stamped = parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        self.observe(stamped, sent, received)


def parse_platform_time(text: str) -> float | None:
    """The platform's `yyyyMMdd'T'HHmmss'Z'` (platform-api.md §1) → epoch seconds; None when
    empty or malformed."""
    try:
        return datetime.strptime(text, PLATFORM_TIME_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None
