"""Fault injection: the ways a real platform and network misbehave, as knobs.

Kinds:
- latency with jitter on every platform call;
- creates refused *before* committing (HTTP 500, no task exists — safe to resend);
- creates that commit and then fail (the ambiguous cases a client must reconcile):
  an HTTP 500 reply, a dropped connection, or a reply delayed past the client's timeout;
- a throttle storm: another client spending a share of the same app's budget;
- a task list that lags behind commits (`list_lag_s`) and creates committed some real seconds
  after they arrived, even when the client has gone (`late_commit_s`);
- a platform clock running ahead of or behind simulated time (`clock_offset_s`);
- task replies without `extendPara` (`omit_extend_para`);
- the next N valid creates refused before commit with a chosen HTTP status
  (`reject_next_creates`, `reject_status`);
- upgrades reported as succeeded while the device rolled back to its previous image, the
  subtask reporting that old version (`rollback_rate`; decided when a task is first looked
  at, like the rest of its devices' behaviour);
- failure texts that are long and each one different: a failed subtask's `detailInfo` names
  its device and carries `detail_padding` more characters (decided the same way).
- a gateway with no platform behind it: every platform call answers 502/503/504 without
  acting, for some real seconds (`outage_s`, `outage_status`).
- the next N calls refused with 1010009 as if another client had just filled the app's
  window (`throttle_next_calls`);
- the app's token revoked before each of the next N authenticated calls, as another
  client's login would (`revoke_next_tokens`): each of them draws 1010005;
  both only for calls of one API when `only_api` names it.
- the next N tasks answered with an operationId and then lost, as a platform that lost state
  would (`forget_next_tasks`): the list never shows them, a query answers 123009; with
  `reuse_lost_ids` the next create is given the lost task's operationId again (a platform
  whose id generator went back with its state).

Decisions draw from one seeded generator, so a test that sets the same knobs and sends the
same calls sees the same faults.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

AMBIGUOUS_KINDS = ("500", "drop", "delay")
SIGNED_KNOBS = frozenset({"clock_offset_s"})  # the only numbers that may be negative


@dataclass
class FaultConfig:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    create_refuse_rate: float = 0.0
    create_ambiguous_rate: float = 0.0
    ambiguous_kinds: list[str] = field(default_factory=lambda: list(AMBIGUOUS_KINDS))
    ambiguous_delay_s: float = 30.0
    storm_share: float = 0.0
    seed: int = 0
    list_lag_s: float = 0.0  # real seconds a committed task stays out of the task list
    late_commit_s: float = 0.0  # real seconds between a create's arrival and its commit
    clock_offset_s: float = 0.0  # the platform's clock minus the simulated clock (signed)
    omit_extend_para: bool = False  # task replies carry no extendPara key
    reject_next_creates: int = 0  # refuse this many more valid creates before commit
    reject_status: int = 400  # their HTTP status: 400 platform error, else a gateway reply
    rollback_rate: float = 0.0  # share of succeeded upgrades that report the old version
    detail_padding: int = 0  # a failed subtask's detailInfo names its device, plus N chars
    outage_s: float = 0.0  # from the next call on, for this many real seconds: a gateway ...
    outage_status: int = 503  # ... answers every platform call with this (502/503/504)
    throttle_next_calls: int = 0  # refuse this many more calls with 1010009 (not counted)
    revoke_next_tokens: int = 0  # revoke the app's token before this many more calls
    only_api: str = ""  # the two knobs above act on calls of this API only; "": any
    forget_next_tasks: int = 0  # answer this many more creates, then lose their tasks
    reuse_lost_ids: bool = False  # a lost task's operationId goes to the next create

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaultInjector:
    def __init__(self, config: FaultConfig | None = None) -> None:
        # a copy: the countdown of reject_next_creates must not write into the caller's config
        self.config = replace(config) if config is not None else FaultConfig()
        self._rng = random.Random(self.config.seed)
        self.injected: dict[str, int] = {}
        self._outage_started: float | None = None  # real time of the outage's first call

    def update(self, changes: dict[str, Any]) -> FaultConfig:
        """Apply a partial update; unknown knobs or bad values raise ValueError."""
        current = self.config.as_dict()
        for key, value in changes.items():
            if key not in current:
                raise ValueError(f"unknown fault knob {key!r}")
            if key == "ambiguous_kinds":
                if (
                    not isinstance(value, list)
                    or not value
                    or any(kind not in AMBIGUOUS_KINDS for kind in value)
                ):
                    raise ValueError(
                        f"ambiguous_kinds must be a non-empty subset of {AMBIGUOUS_KINDS}"
                    )
            elif key == "seed":
                if not isinstance(value, int):
                    raise ValueError("seed must be an integer")
            elif key in ("omit_extend_para", "reuse_lost_ids"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false")
            elif key in (
                "reject_next_creates",
                "throttle_next_calls",
                "revoke_next_tokens",
                "forget_next_tasks",
            ):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"{key} must be an integer >= 0")
            elif key == "only_api":
                if not isinstance(value, str):
                    raise ValueError("only_api must be an API name or empty")
            elif key == "reject_status":
                if not isinstance(value, int) or isinstance(value, bool) or not 400 <= value <= 599:
                    raise ValueError("reject_status must be an HTTP error status (400-599)")
            elif key == "outage_status":
                if value not in (502, 503, 504) or isinstance(value, bool):
                    raise ValueError("outage_status must be 502, 503 or 504")
            else:
                is_number = isinstance(value, int | float) and not isinstance(value, bool)
                if not is_number or not math.isfinite(value):
                    raise ValueError(f"{key} must be a finite number")
                if value < 0 and key not in SIGNED_KNOBS:
                    raise ValueError(f"{key} must be a non-negative number")
                if (key.endswith("_rate") or key == "storm_share") and value > 1:
                    raise ValueError(f"{key} must be between 0 and 1")
            current[key] = value
        self.config = FaultConfig(**current)
        if "seed" in changes:
            self._rng = random.Random(self.config.seed)
        if "outage_s" in changes:
            self._outage_started = None  # a new outage, from the next call on
        return self.config

    def outage(self, now: float) -> int | None:
        """The gateway status to answer this call with while an outage lasts, else None.

        `now`: real (monotonic) seconds. The outage starts with the first call after
        `outage_s` was set and lasts `outage_s` seconds."""
        if self.config.outage_s <= 0:
            return None
        if self._outage_started is None:
            self._outage_started = now
        if now - self._outage_started >= self.config.outage_s:
            return None
        self._count("outage")
        return self.config.outage_status

    def latency(self) -> float:
        """Seconds to hold this reply."""
        base = self.config.latency_ms
        jitter = self.config.jitter_ms
        if base <= 0 and jitter <= 0:
            return 0.0
        return max(0.0, base + self._rng.uniform(-jitter, jitter)) / 1000.0

    def create_fault(self) -> str | None:
        """What goes wrong with this create: None, "refuse", or an ambiguous kind."""
        refuse = self.config.create_refuse_rate
        ambiguous = self.config.create_ambiguous_rate
        if refuse <= 0 and ambiguous <= 0:
            return None
        draw = self._rng.random()
        if draw < refuse:
            return self._count("refuse")
        if draw < refuse + ambiguous:
            kinds = self.config.ambiguous_kinds
            return self._count(kinds[self._rng.randrange(len(kinds))])
        return None

    def take_rejection(self) -> int | None:
        """The HTTP status to refuse this (valid) create with, or None; counts one down."""
        if self.config.reject_next_creates <= 0:
            return None
        self.config.reject_next_creates -= 1
        self._count("reject")
        return self.config.reject_status

    def take_forget(self) -> bool:
        """Whether to lose the task this create has just committed; counts one down."""
        if self.config.forget_next_tasks <= 0:
            return False
        self.config.forget_next_tasks -= 1
        self._count("forget")
        return True

    def take_throttle(self, api: str) -> bool:
        """Whether to refuse this call of `api` with 1010009 now; counts one down."""
        config = self.config
        if config.throttle_next_calls <= 0 or config.only_api not in ("", api):
            return False
        config.throttle_next_calls -= 1
        self._count("throttle")
        return True

    def take_revoke(self, api: str) -> bool:
        """Whether to revoke the app's token before this call of `api`; counts one down."""
        if self.config.revoke_next_tokens <= 0 or self.config.only_api not in ("", api):
            return False
        self.config.revoke_next_tokens -= 1
        self._count("revoke")
        return True

    def _count(self, kind: str) -> str:
        self.injected[kind] = self.injected.get(kind, 0) + 1
        return kind
