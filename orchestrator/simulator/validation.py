"""Request validation for the simulator, in a documented order of precedence.

When several rules are broken, the first in this list answers (README: "Simulator error
precedence"):

1. route unknown → HTTP 404 (no platform code applies; the reply still has the error shape)
2. flow control → 403 / 1010009 (checked before anything else about the app)
3. authentication → 403 / 1010005 (login/refresh: 102202 then 100208)
4. malformed body or parameter types → 400 / 120015; paging out of range → 400 / 123029
5. create-task structure: 123023 both targets, 123022 no targets, 123024 more than 256,
   group mode 123019 manufacturerName, 123020 deviceType, 123021 model
6. policy: 123025 executeType, 123026 start/end missing or malformed, 123032 start after end,
   123033 start in the past, 123034 end less than 5 minutes after start, 123028 retryTimes
7. existence: 123002 unknown fileId, then unknown device IDs or group names
8. consistency: 123016 type/model/manufacturer do not match the package
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Any

from .clock import parse_platform_time
from .wire import PlatformReject

MAX_TARGETS = 256
EXECUTE_TYPES = ("now", "device_online", "custom")
MIN_WINDOW_SECONDS = 300.0


def paging(query: dict[str, str], default_size: int = 10, max_size: int = 100) -> tuple[int, int]:
    """pageNo ≥ 0 (default 0) and pageSize 1–max_size (default 10)."""
    try:
        page_no = int(query.get("pageNo", "0"))
        page_size = int(query.get("pageSize", str(default_size)))
    except ValueError as exc:
        raise PlatformReject("120015", "pageNo and pageSize must be integers.") from exc
    if page_no < 0 or page_size < 1 or page_size > max_size:
        raise PlatformReject("123029")
    return page_no, page_size


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _string_list(value: Any, field: str) -> list[str]:
    # map() over a builtin: this runs on every create, 256 items at a time
    if not isinstance(value, list) or not all(map(isinstance, value, repeat(str))) or "" in value:
        raise PlatformReject("120015", f"{field} must be a list of non-empty strings.")
    return value


@dataclass(frozen=True)
class CreateRequest:
    file_id: str
    devices: list[str] | None
    groups: list[str] | None
    device_type: str | None
    model: str | None
    manufacturer: str | None
    targets: dict[str, Any]
    policy: dict[str, Any]
    window: tuple[float, float] | None


def validate_create(body: Any, now: float) -> CreateRequest:
    """Check a create-task body against every structural and policy rule (steps 4–6)."""
    if not isinstance(body, dict):
        raise PlatformReject("120015", "The body must be a JSON object.")
    file_id = body.get("fileId")
    if not isinstance(file_id, str) or not file_id:
        raise PlatformReject("120015", "fileId is mandatory.")
    targets = body.get("targets")
    if not isinstance(targets, dict):
        raise PlatformReject("120015", "targets is mandatory.")

    raw_devices = targets.get("devices")
    raw_groups = targets.get("deviceGroups")
    has_devices = raw_devices is not None and raw_devices != []
    has_groups = raw_groups is not None and raw_groups != []
    if has_devices and has_groups:
        raise PlatformReject("123023")
    if not has_devices and not has_groups:
        raise PlatformReject("123022")
    devices = _string_list(raw_devices, "devices") if has_devices else None
    groups = _string_list(raw_groups, "deviceGroups") if has_groups else None
    chosen = devices if devices is not None else groups
    assert chosen is not None
    if len(chosen) > MAX_TARGETS:
        raise PlatformReject("123024")
    if len(frozenset(chosen)) != len(chosen):
        raise PlatformReject("120015", "The target list contains duplicates.")

    for field in ("deviceType", "model", "manufacturerName"):
        value = targets.get(field)
        if value is not None and not isinstance(value, str):
            raise PlatformReject("120015", f"{field} must be a string.")
    if groups is not None:
        if _is_blank(targets.get("manufacturerName")):
            raise PlatformReject("123019")
        if _is_blank(targets.get("deviceType")):
            raise PlatformReject("123020")
        if _is_blank(targets.get("model")):
            raise PlatformReject("123021")

    policy, window = _validate_policy(body.get("policy"), now)
    return CreateRequest(
        file_id=file_id,
        devices=devices,
        groups=groups,
        device_type=targets.get("deviceType"),
        model=targets.get("model"),
        manufacturer=targets.get("manufacturerName"),
        targets=targets,
        policy=policy,
        window=window,
    )


def _validate_policy(raw: Any, now: float) -> tuple[dict[str, Any], tuple[float, float] | None]:
    if raw is None:
        return {"executeType": "now"}, None
    if not isinstance(raw, dict):
        raise PlatformReject("120015", "policy must be an object.")
    execute_type = raw.get("executeType")
    if execute_type not in EXECUTE_TYPES:
        raise PlatformReject("123025")
    window: tuple[float, float] | None = None
    if execute_type == "custom":
        start_text, end_text = raw.get("startTime"), raw.get("endTime")
        if not isinstance(start_text, str) or not isinstance(end_text, str):
            raise PlatformReject("123026")
        try:
            start, end = parse_platform_time(start_text), parse_platform_time(end_text)
        except ValueError as exc:
            raise PlatformReject("123026") from exc
        if start > end:
            raise PlatformReject("123032")
        if start < now:
            raise PlatformReject("123033")
        if end - start < MIN_WINDOW_SECONDS:
            raise PlatformReject("123034")
        window = (start, end)
    retry_type = raw.get("retryType", False)
    if not isinstance(retry_type, bool):
        raise PlatformReject("120015", "retryType must be a boolean.")
    if retry_type:
        retry_times = raw.get("retryTimes")
        is_int = isinstance(retry_times, int) and not isinstance(retry_times, bool)
        if not is_int or not 1 <= int(retry_times or 0) <= 5:
            raise PlatformReject("123028")
    return dict(raw), window
