"""The rollout plan file (TOML): its model and every offline check.

A plan that passes `load_plan` must not draw a 4xx from the platform for a plan-level rule:
each create-task rule of the platform (platform-api.md §3.4) has its twin here, checked
before any call. Errors are `InputError(file, field, rule)` — one line, exit code 2.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import InputError

MAX_TARGETS = 256
MIN_WINDOW = timedelta(minutes=5)
PLATFORM_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
SIMULATOR_URL = "simulator"
HEX24 = re.compile(r"^[0-9a-fA-F]{24}$")
GROUP_NAME = re.compile(r"^[A-Za-z0-9]{1,50}$")
RATE_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Operation(StrEnum):
    FIRMWARE = "firmware"
    SOFTWARE = "software"


class SimulatorSection(_Section):
    """Settings of the embedded simulator (only with `url = "simulator"`)."""

    devices: int = Field(default=24000, ge=1)  # the cap is the simulator's: available memory
    seed: int = 1
    speed: float = Field(default=60.0, gt=0)
    models: tuple[Literal["WM-200", "WM-310", "GM-10", "TR-1"], ...] | None = Field(
        default=None, min_length=1
    )  # only devices of these models (docs/simulator.md); None: all four


class PlatformSection(_Section):
    url: str
    app_id: str = Field(default="demo-app", min_length=1, max_length=256)
    secret_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    insecure: bool = False
    rate_limit: str = "100/60"
    pacing_margin: float | None = Field(default=None, ge=0, le=60)  # None: 0 s
    connect_timeout: float = Field(default=10.0, gt=0, le=300)
    request_timeout: float = Field(default=30.0, gt=0, le=600)
    simulator: SimulatorSection = Field(default_factory=SimulatorSection)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value == SIMULATOR_URL:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError('must be "simulator" or an https:// URL')
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError("plain http is allowed only on loopback; the platform is HTTPS")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError("must be the server's base URL (scheme, host, port), no path")
        return value.rstrip("/")

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str) -> str:
        match = RATE_LIMIT.match(value)
        if not match or int(match[1]) < 1 or float(match[2]) <= 0:
            raise ValueError('must be "CALLS/SECONDS" with CALLS >= 1, e.g. "100/60"')
        return value

    @model_validator(mode="after")
    def _pairs(self) -> PlatformSection:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if self.url != SIMULATOR_URL and self.secret_env is None:
            raise ValueError("secret_env is required: the secret comes from the environment")
        return self

    @property
    def rate(self) -> tuple[int, float]:
        match = RATE_LIMIT.match(self.rate_limit)
        assert match is not None
        return int(match[1]), float(match[2])

    @property
    def is_simulator(self) -> bool:
        return self.url == SIMULATOR_URL


class FirmwareSection(_Section):
    file_id: str | None = None
    version: str | None = Field(default=None, min_length=1, max_length=256)
    device_type: str | None = Field(default=None, min_length=1, max_length=256)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    manufacturer: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("file_id")
    @classmethod
    def _file_id(cls, value: str | None) -> str | None:
        if value is not None and not HEX24.match(value):
            raise ValueError("must be the package's 24-hex-digit fileId")
        return value

    @model_validator(mode="after")
    def _one_way(self) -> FirmwareSection:
        lookup = (self.version, self.device_type, self.model, self.manufacturer)
        if self.file_id is None and any(v is None for v in lookup):
            raise ValueError("give file_id, or version + device_type + model + manufacturer")
        if self.file_id is not None and any(v is not None for v in lookup):
            raise ValueError("give file_id or the lookup fields, not both")
        return self


INVENTORY_MODEL = "model"  # the inventory's column of each device's model


class FleetSection(_Section):
    devices_file: Path | None = None
    # a CSV column with each device's current version: devices already on the package's
    # version (firmware.version) are left out before any create
    version_column: str | None = Field(default=None, min_length=1, max_length=100)
    groups: list[str] | None = None
    # with groups: a CSV with deviceId and model columns (e.g. the platform's device export);
    # shared members it lists with another model than the package's are not overlaps
    inventory: Path | None = None
    device_type: str | None = Field(default=None, min_length=1, max_length=256)
    model: str | None = Field(default=None, min_length=1, max_length=256)
    manufacturer: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("must name at least one group")
        for name in value:
            if not GROUP_NAME.match(name):
                raise ValueError(f"group name {name!r} must be 1-50 letters and digits")
        if len(set(value)) != len(value):
            raise ValueError("lists a group twice")
        return value

    @model_validator(mode="after")
    def _mode(self) -> FleetSection:
        if (self.devices_file is None) == (self.groups is None):
            raise ValueError("give devices_file or groups, not both and not neither")
        if self.version_column is not None and self.devices_file is None:
            raise ValueError("version_column goes with devices_file (a CSV column)")
        if self.inventory is not None and self.groups is None:
            raise ValueError("inventory goes with groups (the models of their members)")
        if self.groups is not None:
            for name in ("device_type", "model", "manufacturer"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name} is required with groups (the platform needs it)")
        return self


class PolicySection(_Section):
    execute_type: Literal["now", "device_online", "custom"] = "now"
    start: datetime | None = None  # custom: local time in `timezone`, or with an offset
    end: datetime | None = None
    timezone: str = "UTC"
    retry: Annotated[int, Field(ge=1, le=5)] | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from None
        return value

    @model_validator(mode="after")
    def _window(self) -> PolicySection:
        if self.execute_type != "custom":
            if self.start is not None or self.end is not None:
                raise ValueError("start/end apply only to execute_type = 'custom'")
            return self
        if self.start is None or self.end is None:
            raise ValueError("execute_type = 'custom' needs start and end")
        start, end = self.start_utc, self.end_utc
        assert start is not None and end is not None
        if end < start + MIN_WINDOW:
            raise ValueError("end must be at least 5 minutes after start")
        return self

    def _utc(self, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=ZoneInfo(self.timezone))
        return value.astimezone(UTC)

    @property
    def start_utc(self) -> datetime | None:
        return self._utc(self.start)

    @property
    def end_utc(self) -> datetime | None:
        return self._utc(self.end)

    def wire(self) -> dict[str, Any]:
        """The platform's OperatePolicy for this section."""
        policy: dict[str, Any] = {"executeType": self.execute_type}
        if self.execute_type == "custom":
            start, end = self.start_utc, self.end_utc
            assert start is not None and end is not None
            policy["startTime"] = start.strftime(PLATFORM_TIME_FORMAT)
            policy["endTime"] = end.strftime(PLATFORM_TIME_FORMAT)
        policy["retryType"] = self.retry is not None
        if self.retry is not None:
            policy["retryTimes"] = self.retry
        return policy


class GateSection(_Section):
    """When the next wave may start (all optional; the default gate passes at once)."""

    # shares of the wave's devices (gates.py: devices, never groups; already current left out)
    min_finished: float = Field(default=0.0, ge=0, le=1)  # with a real outcome
    max_failed: float | None = Field(default=None, ge=0, le=1)  # of the finished
    min_sample: int = Field(default=0, ge=0)  # finished devices before max_failed is judged
    soak: float = Field(default=0.0, ge=0, le=7 * 86400)  # seconds to watch after passing
    approval: bool = False  # an operator must run `rollout approve`


@dataclass(frozen=True)
class Occurrence:
    """One night's maintenance window in real (UTC) time.

    `night`: the local date the window opens on; `start`/`end`: UTC instants. A local time in
    a DST gap (spring forward) becomes the gap's end; an ambiguous one (fall back) its first
    occurrence. So the real length can differ from the wall-clock length on DST nights."""

    night: date
    start: datetime
    end: datetime

    @property
    def minutes(self) -> float:
        """Real minutes between start and end (0 or negative when DST swallows the window)."""
        return (self.end - self.start).total_seconds() / 60

    @property
    def usable(self) -> bool:
        """At least the platform's 5 minutes (123034)."""
        return self.end - self.start >= MIN_WINDOW


_skips_logged: set[tuple[str, str, str, date]] = set()


class WindowSection(_Section):
    """A daily maintenance window in local time: the wave's tasks use executeType custom.

    Each night's window is computed on that night's local wall clock with zoneinfo and
    converted to UTC per occurrence (`occurrence`): a night on which DST leaves fewer than 5
    real minutes is skipped (logged), never sent."""

    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    end: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return PolicySection._zone(value)

    @model_validator(mode="after")
    def _length(self) -> WindowSection:
        # on the wall clock: a night shortened by DST is skipped at run time, not refused here
        if self.minutes() < 5:
            raise ValueError("a maintenance window must last at least 5 minutes")
        return self

    def minutes(self) -> int:
        """The window's length on the local wall clock (minutes, 1–1439)."""
        start_h, start_m = map(int, self.start.split(":"))
        end_h, end_m = map(int, self.end.split(":"))
        return (end_h * 60 + end_m - start_h * 60 - start_m) % (24 * 60)

    def occurrence(self, night: date) -> Occurrence:
        """The window opening on local date `night`, in UTC (a window past midnight ends on
        the next local date)."""
        zone = ZoneInfo(self.timezone)
        opens = time.fromisoformat(self.start)
        closes = time.fromisoformat(self.end)
        end_day = night + timedelta(days=1) if closes <= opens else night
        return Occurrence(night, _instant(night, opens, zone), _instant(end_day, closes, zone))

    def occurrences(self, after: datetime, count: int) -> list[Occurrence]:
        """The next `count` usable occurrences that end after `after` (aware), with the
        nights skipped among them (not `usable`)."""
        night = after.astimezone(ZoneInfo(self.timezone)).date() - timedelta(days=1)
        found: list[Occurrence] = []
        while sum(o.usable for o in found) < count:
            occurrence = self.occurrence(night)
            if occurrence.end > after:
                found.append(occurrence)
            night += timedelta(days=1)
        return found

    def next_window(
        self, now: datetime, lead: timedelta = timedelta(minutes=1)
    ) -> tuple[datetime, datetime]:
        """The next occurrence (UTC) with at least 5 real minutes left after `now + lead`:
        its start (moved to `now + lead` when it has passed) and its end. A night whose
        window DST makes shorter than 5 real minutes is skipped and logged.

        `now`: aware; the caller's clock (the platform's, for a create)."""
        earliest = now + lead
        night = now.astimezone(ZoneInfo(self.timezone)).date() - timedelta(days=1)
        for _ in range(9):  # two DST changes are months apart: a usable night comes soon
            occurrence = self.occurrence(night)
            night += timedelta(days=1)
            if occurrence.end <= earliest:
                continue
            if not occurrence.usable:
                key = (self.timezone, self.start, self.end, occurrence.night)
                if key not in _skips_logged:
                    _skips_logged.add(key)
                    import structlog  # here: `rollout status` reads plans without logging

                    structlog.get_logger("orchestrator.plan").warning(
                        "maintenance window skipped: DST leaves too little of it that night",
                        night=occurrence.night.isoformat(),
                        window=f"{self.start}-{self.end} {self.timezone}",
                        real_minutes=round(occurrence.minutes, 1),
                    )
                continue
            begin = max(occurrence.start, earliest)
            if occurrence.end - begin >= MIN_WINDOW:
                return begin, occurrence.end
        raise AssertionError("a daily window of 5 minutes or more recurs within days")


def _instant(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The UTC instant of local wall time `at` on `day`. An ambiguous time (the hour DST
    repeats) is its first occurrence; a time in a gap (the hour DST skips) is the gap's end."""
    wall = datetime.combine(day, at, tzinfo=zone)  # fold=0: the first occurrence
    instant = wall.astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) == wall.replace(tzinfo=None):
        return instant
    # in a gap: the two readings of the wall time lie either side of the change; find the
    # change to the second (zone transitions fall on whole seconds)
    readings = sorted((instant, wall.replace(fold=1).astimezone(UTC)))
    low, high = int(readings[0].timestamp()), int(readings[1].timestamp())
    after = readings[1].astimezone(zone).utcoffset()
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == after:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


class WaveSection(_Section):
    name: str = Field(min_length=1, max_length=50, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    count: int | None = Field(default=None, ge=1)
    share: float | None = Field(default=None, gt=0, le=1)
    selection: Literal["ordered", "random", "stratified"] = "ordered"
    stratify_by: str | None = None  # a column of the fleet CSV, e.g. "group" or "model"
    seed: int = 0
    window: WindowSection | None = None
    gate: GateSection = Field(default_factory=GateSection)

    @model_validator(mode="after")
    def _selection(self) -> WaveSection:
        if self.count is not None and self.share is not None:
            raise ValueError("give count or share, not both")
        if (self.selection == "stratified") != (self.stratify_by is not None):
            raise ValueError("stratify_by goes with selection = 'stratified'")
        return self


class MonitorSection(_Section):
    follow: bool = True  # `run` watches the tasks to their end (else: `rollout watch`)
    poll_interval: float = Field(default=30.0, gt=0, le=3600)
    max_poll_interval: float = Field(default=600.0, gt=0, le=86400)


class ExecutionSection(_Section):
    concurrency: int = Field(default=4, ge=1, le=64)
    stop_after_identical_failures: int = Field(default=8, ge=1, le=1000)
    # creates spent bisecting refused chunks, as a multiple of the run's planned creates (one
    # per chunk); past it the run stops. 0: the first device-level refusal stops the run.
    # Isolating b bad targets costs at most 2·b·log2(256) creates (planner.bisection_bound).
    max_bisect_share: float = Field(default=256.0, ge=0, le=1024)
    # an ambiguous create is looked up once request_timeout + settle after it left, and is
    # "absent" only when a second look, settle later, agrees (docs/resume-and-reconciliation.md)
    settle: float = Field(default=15.0, ge=0, le=3600)
    # allowance beyond the measured uncertainty of the platform's clock (seconds)
    clock_skew: float = Field(default=2.0, ge=0, le=600)
    # seconds the platform may stay unreachable (refused, DNS timeout, 502/503/504) before
    # the run stops with exit 1; meanwhile every call pauses and goes again (outage.py)
    outage_budget: float = Field(default=600.0, gt=0, le=7 * 86400)


NOTICE_EVENTS = (
    "gate-passed",
    "gate-failed",
    "gate-awaiting-approval",
    "run-completed",
    "run-halted",
    "run-aborted",
    "duplicates-found",
    "outage",
)


class NotifySection(_Section):
    """A webhook told of gates and of the run's end (JSON POST with a plain `text` field)."""

    url_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the URL holds a secret
    events: list[str] = Field(default_factory=list)  # empty: every event
    timeout: float = Field(default=10.0, gt=0, le=120)  # seconds per request
    attempts: int = Field(default=5, ge=1, le=20)
    give_up_after: float = Field(default=30.0, gt=0, le=600)  # seconds for one notice

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        unknown = [event for event in value if event not in NOTICE_EVENTS]
        if unknown:
            raise ValueError(f"unknown event {unknown[0]!r} (one of {', '.join(NOTICE_EVENTS)})")
        return value


class Plan(_Section):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    operation: Operation = Operation.FIRMWARE
    platform: PlatformSection
    firmware: FirmwareSection
    fleet: FleetSection
    policy: PolicySection = Field(default_factory=PolicySection)
    execution: ExecutionSection = Field(default_factory=ExecutionSection)
    monitor: MonitorSection = Field(default_factory=MonitorSection)
    waves: list[WaveSection] = Field(default_factory=list)
    notify: list[NotifySection] = Field(default_factory=list)

    @model_validator(mode="after")
    def _waves(self) -> Plan:
        if not self.waves:
            return self
        names = [wave.name for wave in self.waves]
        if len(set(names)) != len(names):
            raise ValueError("wave names must be unique")
        last = self.waves[-1]
        if last.count is not None or last.share is not None:
            raise ValueError("the last wave takes the rest: give it no count or share")
        if any(w.count is None and w.share is None for w in self.waves[:-1]):
            raise ValueError("every wave but the last needs a count or a share")
        if sum(w.share or 0 for w in self.waves) >= 1:
            raise ValueError("the shares of the waves before the last must add up to under 1")
        if self.policy.execute_type == "custom" and any(w.window for w in self.waves):
            raise ValueError("a wave window and policy.execute_type = 'custom' exclude each other")
        if self.fleet.groups is not None and any(w.selection != "ordered" for w in self.waves):
            raise ValueError("group fleets support only ordered waves")
        return self

    @model_validator(mode="after")
    def _group_model(self) -> Plan:
        """A group fleet targeted as another type/model/manufacturer than the firmware's:
        the platform refuses the task (123016, platform-api.md §3.4) — said offline when the
        firmware is given by its lookup fields (with a file_id, `rollout plan` and a run say
        it once the package is read: groups.refuse_other_model)."""
        fleet, firmware = self.fleet, self.firmware
        if fleet.groups is None or firmware.model is None:
            return self
        targeted = (fleet.device_type, fleet.model, fleet.manufacturer)
        wanted = (firmware.device_type, firmware.model, firmware.manufacturer)
        if targeted != wanted:
            names = ", ".join(repr(name) for name in fleet.groups)
            raise ValueError(
                f"fleet.model: group(s) {names} are targeted as {'/'.join(map(str, targeted))} "
                f"but the firmware is for {'/'.join(map(str, wanted))} "
                "(type/model/manufacturer): the platform refuses such a task (123016) and "
                "none of their devices would be upgraded"
            )
        return self

    @model_validator(mode="after")
    def _version_column(self) -> Plan:
        if self.fleet.version_column is not None and self.firmware.version is None:
            raise ValueError(
                "fleet.version_column needs firmware.version: the target version to compare "
                "offline (give version, device_type, model and manufacturer)"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def check_times(plan: Plan, source: str, now: datetime | None = None) -> None:
    """The rules that depend on the present: a custom window must not start in the past."""
    start = plan.policy.start_utc
    if start is not None and start < (now or datetime.now(UTC)):
        raise InputError(source, "policy.start", "is in the past (the platform refuses 123033)")


def parse_plan(text: str, source: str) -> Plan:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(source, "", f"not valid TOML: {exc}") from None
    try:
        return Plan.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        raise InputError(source, _field_path(tuple(first["loc"])), message) from None


def read_plan_file(path: Path) -> tuple[Plan, bytes]:
    """The plan file checked, and its bytes (fingerprinted by the journal). Raises InputError."""
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(source, "", f"cannot read the plan file: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # an editor's byte-order mark is not TOML
    except UnicodeDecodeError:
        raise InputError(source, "", "the plan file is not UTF-8") from None
    return parse_plan(text, source), data


def read_plan(path: Path) -> Plan:
    """The plan file alone, checked, without its fleet (for commands that read the journal).
    Raises InputError."""
    return read_plan_file(path)[0]
