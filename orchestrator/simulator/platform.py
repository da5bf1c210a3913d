"""The platform's state: fleet, packages, groups, tasks — and the operations on them.

Handlers in `app.py` translate HTTP to these methods and back; everything here raises
`PlatformReject` for a refusal and knows nothing about HTTP.

Every time the platform states (task and subtask times, the "start in the past" check, the
`Date` header) comes from `Platform.now()`: the simulated clock plus the `clock_offset_s` fault.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .clock import Clock, format_platform_time
from .faults import FaultInjector
from .fleet import FIRMWARE, SOFTWARE, Fleet, Group, Package, group_id
from .tasks import SUBTASK_STATUSES, TASK_STATUSES, Task, materialize
from .throttle import SlidingWindowThrottle
from .tokens import TokenStore
from .validation import CreateRequest, validate_create
from .wire import PlatformReject

GROUP_NAME = re.compile(r"[A-Za-z0-9]{1,50}")  # ASCII letters and digits (§4)
MAX_DESCRIPTION = 1024
OPERATE_TYPES = {"firmwareUpgrade": "firmware_upgrade", "softwareUpgrade": "software_upgrade"}
PACKAGE_TYPE_FOR = {"firmware_upgrade": FIRMWARE, "software_upgrade": SOFTWARE}


@dataclass(frozen=True)
class CheckedCreate:
    """A create that passed every rule, ready to commit (now, or later)."""

    operation: str  # firmwareUpgrade | softwareUpgrade, as in the path
    request: CreateRequest
    package: Package  # resolved at arrival: a later commit does not look it up again
    device_ids: list[str]


ARRIVALS_KEPT = 200_000


@dataclass
class Stats:
    calls: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    tasks_created: int = 0
    # every call that reached flow control, newest last: (monotonic time, app, API, admitted)
    arrivals: deque[tuple[float, str, str, bool]] = field(
        default_factory=lambda: deque(maxlen=ARRIVALS_KEPT)
    )

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "total_calls": sum(self.calls.values()),
            "replies": dict(self.replies),
            "throttled": self.throttled,
            "tasks_created": self.tasks_created,
        }


FLIGHT_S = 5.0  # real seconds between a client's reading of the clock and its create's check


class Platform:
    def __init__(
        self,
        fleet: Fleet,
        clock: Clock,
        apps: dict[str, str],
        rate_limit: tuple[int, float] = (100, 60.0),
        token_ttl: float = 3600.0,
        faults: FaultInjector | None = None,
    ) -> None:
        self.fleet = fleet
        self.clock = clock
        self.tokens = TokenStore(apps, token_ttl, clock.monotonic)
        self.throttle = SlidingWindowThrottle(rate_limit[0], rate_limit[1], clock.monotonic)
        self.faults = faults or FaultInjector()
        self.throttle.set_storm(self.faults.config.storm_share)
        self.stats = Stats()
        self.tasks: list[Task] = []
        self.tasks_by_id: dict[str, Task] = {}
        self._device_tasks: dict[str, list[int]] = {}
        self._device_tasks_upto = 0  # the deviceId index is built lazily, off the create path
        self._materialized = 0
        # operationIds and group ids: drawn from the system's entropy, not the fleet's seed,
        # and never from a saved generator state: a state saved before an id was issued
        # would issue that id again after a restart. `new_id` skips every id it knows.
        self._ids = random.Random()
        self.changes = 0  # bumped by every call and admin change (the state file saves on it)
        # called with each task the moment it is committed, before the create is answered
        # (SimulatorServer: the state file's create log) — an acknowledged task is never lost
        self.on_commit: Callable[[Task], None] | None = None
        self._reissue: list[str] = []  # `reuse_lost_ids`: forgotten ids handed out again

    def new_id(self) -> str:
        """A 24-hex-digit id this platform has never issued (operationIds, group ids) — unless
        the `reuse_lost_ids` fault hands out again the id of a task `forget_next_tasks` lost."""
        if self._reissue:
            return self._reissue.pop(0)
        while True:
            candidate = f"{self._ids.getrandbits(96):024x}"
            taken = candidate in self.tasks_by_id or any(
                g.group_id == candidate for g in self.fleet.groups.values()
            )
            if not taken:
                return candidate

    def now(self) -> float:
        """The platform's clock: simulated time plus the `clock_offset_s` fault (signed)."""
        return self.clock.now() + self.faults.config.clock_offset_s

    def start_floor(self) -> float:
        """The earliest custom `startTime` a create may carry (else 123033): the platform's
        now — at `--speed` S > 1, as it stood FLIGHT_S real seconds ago. A client reads the
        platform's clock, then sends; on a real platform the seconds in between are seconds,
        at S they are S times more, and no lead a client could take on a real platform
        would cover them. The speed is the devices' (docs/simulator.md): a start the client
        computed from a reading at most FLIGHT_S real seconds old is accepted as a real
        platform would accept it."""
        speed = float(getattr(self.clock, "speed", 1.0))
        return self.now() - max(0.0, speed - 1.0) * FLIGHT_S

    # ---- packages -------------------------------------------------------------------------
    def list_packages(self, query: dict[str, str]) -> list[dict[str, str]]:
        manufacturer = query.get("manufacturerName", query.get("manufactureName"))
        wanted = {
            "fileType": query.get("fileType"),
            "deviceType": query.get("deviceType"),
            "model": query.get("model"),
            "manufacturerName": manufacturer,
            "version": query.get("version"),
        }
        rows = [package.to_wire() for package in self.fleet.packages.values()]
        return [r for r in rows if all(v is None or r[k] == v for k, v in wanted.items())]

    def package(self, file_id: str) -> dict[str, str]:
        if not _is_hex24(file_id):
            raise PlatformReject("120015", "fileId is malformed.")
        package = self.fleet.packages.get(file_id)
        if package is None:
            raise PlatformReject("123002")
        return package.to_wire()

    def delete_package(self, file_id: str) -> None:
        self.package(file_id)
        del self.fleet.packages[file_id]

    # ---- tasks ----------------------------------------------------------------------------
    def check_create(self, operation: str, body: Any) -> CheckedCreate:
        """Every rule of a create, at the platform's time of arrival."""
        operate_type = OPERATE_TYPES[operation]
        request = validate_create(body, self.start_floor())
        package = self.fleet.packages.get(request.file_id)
        if package is None:
            raise PlatformReject("123002", "fileId not found.")
        if package.file_type != PACKAGE_TYPE_FOR[operate_type]:
            raise PlatformReject("120015", "The package type does not match the operation.")
        package_key = (package.device_type, package.model, package.manufacturer)
        if request.devices is not None:
            keys = self.fleet.devices.model_keys(request.devices)
            if None in keys:
                raise PlatformReject("123002", "Some devices were not found.")
            if keys != {package_key}:
                raise PlatformReject("123016")
            return CheckedCreate(operation, request, package, request.devices)
        assert request.groups is not None
        unknown = [name for name in request.groups if name not in self.fleet.groups]
        if unknown:
            raise PlatformReject("123002", f"{len(unknown)} device group(s) not found.")
        if (request.device_type, request.model, request.manufacturer) != package_key:
            raise PlatformReject("123016")
        resolved: list[str] = []
        seen: set[str] = set()
        for name in request.groups:
            for device_id in self.fleet.groups[name].device_ids:
                matches = self.fleet.devices.model_key(device_id) == package_key
                if matches and device_id not in seen:
                    seen.add(device_id)
                    resolved.append(device_id)
        return CheckedCreate(operation, request, package, resolved)

    def commit_create(self, checked: CheckedCreate) -> str:
        """Create the task now (platform time) and return its operationId."""
        seq = len(self.tasks)
        operation_id = self.new_id()
        request = checked.request
        task = Task(
            seq=seq,
            operation_id=operation_id,
            operate_type=OPERATE_TYPES[checked.operation],
            package=checked.package,
            targets=request.targets,
            policy=request.policy,
            device_ids=checked.device_ids,
            create_time=self.now(),
            window=request.window,
            committed_at=self.clock.monotonic(),
        )
        if self.faults.take_forget():
            # answered, then lost: neither the list nor a query by key ever shows it
            if self.faults.config.reuse_lost_ids:
                self._reissue.append(operation_id)
            return operation_id
        self.tasks.append(task)
        self.tasks_by_id[operation_id] = task
        self.stats.tasks_created += 1
        if self.on_commit is not None:
            self.on_commit(task)
        return operation_id

    def _tasks_of_device(self, device_id: str) -> list[int]:
        for task in self.tasks[self._device_tasks_upto :]:
            for member in task.device_ids:
                self._device_tasks.setdefault(member, []).append(task.seq)
        self._device_tasks_upto = len(self.tasks)
        return self._device_tasks.get(device_id, [])

    def _materialize_through(self, seq: int) -> None:
        # tasks are planned in creation order: a device's version depends on earlier tasks
        while self._materialized <= seq:
            materialize(
                self.tasks[self._materialized],
                self.fleet.devices,
                self.faults.config.rollback_rate,
                self.faults.config.detail_padding,
            )
            self._materialized += 1

    def task(self, operation_id: str) -> Task:
        task = self.tasks_by_id.get(operation_id)
        if task is None:
            raise PlatformReject("123009")
        self._materialize_through(task.seq)
        return task

    def query_task(self, operation_id: str) -> dict[str, Any]:
        """One task by key: found the moment it is committed (no list lag here)."""
        extend_para = not self.faults.config.omit_extend_para
        return self.task(operation_id).to_wire(self.now(), extend_para)

    def sub_operations(self, operation_id: str, status: str | None) -> list[dict[str, Any]]:
        if status is not None and status not in SUBTASK_STATUSES:
            raise PlatformReject("120015", "subOperationStatus is invalid.")
        task = self.task(operation_id)
        assert task.lives is not None
        now = self.now()
        lives = (
            task.lives
            if status is None
            else [life for life in task.lives if life.status_at(now) == status]
        )
        return [life.to_wire(now, task.create_time, task.operate_type) for life in lives]

    def list_tasks(self, query: dict[str, str]) -> list[Task]:
        """The tasks a list query matches; those committed under `list_lag_s` ago are absent."""
        operation_type = query.get("operationType")
        if operation_type is not None and operation_type not in PACKAGE_TYPE_FOR:
            raise PlatformReject("120015", "operationType is invalid.")
        status = query.get("operationStatus")
        if status is not None and status not in TASK_STATUSES:
            raise PlatformReject("120015", "operationStatus is invalid.")
        device_id = query.get("deviceId")
        if device_id is not None:
            candidates = [self.tasks[seq] for seq in self._tasks_of_device(device_id)]
        else:
            candidates = self.tasks
        wanted = (query.get("deviceType"), query.get("model"), query.get("manufacturerName"))
        chosen = []
        now = self.now()
        lag = self.faults.config.list_lag_s
        real_now = self.clock.monotonic()
        for task in candidates:
            if lag > 0 and real_now - task.committed_at < lag:
                continue
            if operation_type is not None and task.operate_type != operation_type:
                continue
            package = task.package
            actual = (package.device_type, package.model, package.manufacturer)
            if any(w is not None and w != a for w, a in zip(wanted, actual, strict=True)):
                continue
            if status is not None:
                self._materialize_through(task.seq)
                if task.status_at(now) != status:
                    continue
            chosen.append(task)
        return chosen

    def task_page_wire(self, tasks: list[Task]) -> list[dict[str, Any]]:
        if tasks:
            self._materialize_through(max(task.seq for task in tasks))
        now = self.now()
        extend_para = not self.faults.config.omit_extend_para
        return [task.to_wire(now, extend_para) for task in tasks]

    # ---- device groups --------------------------------------------------------------------
    # platform-api.md §4. Group errors as the reference lists them: 50400 invalid input,
    # 100602 name used (HTTP 200), 100603 not found, 100601 group full, 100609 too many
    # devices for maxDevNum. A device may be in several groups (the reference disagrees with
    # itself; overlap is the case a client must survive).
    def _group_fields(self, body: dict[str, Any], group: Group | None) -> tuple[str, str, int]:
        """name, description and maxDevNum of a create (group None) or a modify."""
        name = body.get("name", None if group is None else group.name)
        if not isinstance(name, str) or GROUP_NAME.fullmatch(name) is None:
            raise PlatformReject("50400", "name must be 1-50 letters and digits.")
        description = body.get("description", "" if group is None else group.description)
        if description is None:
            description = ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise PlatformReject("50400", "description must be a string of at most 1024.")
        max_devices = body.get("maxDevNum", 0 if group is None else group.max_devices)
        if isinstance(max_devices, bool) or not isinstance(max_devices, int) or max_devices < 0:
            raise PlatformReject("50400", "maxDevNum must be an integer >= 0.")
        if name in self.fleet.groups and self.fleet.groups[name] is not group:
            raise PlatformReject("100602")
        return name, description, max_devices

    def _device_list(self, body: dict[str, Any], required: bool) -> list[str]:
        device_ids = body.get("deviceIds")
        if device_ids is None and not required:
            return []
        if not isinstance(device_ids, list) or any(
            not isinstance(d, str) or d not in self.fleet.devices for d in device_ids
        ):
            raise PlatformReject("50400", "deviceIds must name existing devices.")
        return list(dict.fromkeys(device_ids))

    def create_group(self, body: Any, app_id: str) -> dict[str, object]:
        if not isinstance(body, dict):
            raise PlatformReject("50400", "The body must be a JSON object.")
        name, description, max_devices = self._group_fields(body, None)
        device_ids = self._device_list(body, required=False)
        if max_devices and len(device_ids) > max_devices:
            raise PlatformReject("100609")
        group = Group(
            group_id=group_id(self._ids),
            name=name,
            description=description,
            app_id=app_id,
            max_devices=max_devices,
            device_ids=device_ids,
        )
        self.fleet.groups[name] = group
        return group.to_wire()

    def group_by_id(self, group_id: str) -> Group:
        for group in self.fleet.groups.values():
            if group.group_id == group_id:
                return group
        raise PlatformReject("100603")

    def modify_group(self, group_id: str, body: Any) -> dict[str, object]:
        """PUT: a new name, description or maxDevNum (absent fields are kept)."""
        group = self.group_by_id(group_id)
        if not isinstance(body, dict):
            raise PlatformReject("50400", "The body must be a JSON object.")
        name, description, max_devices = self._group_fields(body, group)
        if max_devices and len(group.device_ids) > max_devices:
            raise PlatformReject("100609")
        del self.fleet.groups[group.name]
        group.name, group.description, group.max_devices = name, description, max_devices
        self.fleet.groups[name] = group
        wire = group.to_wire()
        del wire["deviceIds"]
        return wire

    def delete_group(self, group_id: str) -> None:
        """Tasks created on the group keep their devices; its name is free again."""
        group = self.group_by_id(group_id)
        del self.fleet.groups[group.name]

    def _member_change(self, body: Any) -> tuple[Group, list[str]]:
        if not isinstance(body, dict) or not isinstance(body.get("devGroupId"), str):
            raise PlatformReject("50400", "devGroupId is mandatory.")
        group = self.group_by_id(body["devGroupId"])
        return group, self._device_list(body, required=True)

    def add_group_members(self, body: Any) -> dict[str, object]:
        group, device_ids = self._member_change(body)
        new = [d for d in device_ids if d not in group.device_ids]
        if group.max_devices and len(group.device_ids) + len(new) > group.max_devices:
            raise PlatformReject("100601")
        group.device_ids.extend(new)
        return {"devGroupId": group.group_id, "deviceIds": device_ids}

    def remove_group_members(self, body: Any) -> None:
        group, device_ids = self._member_change(body)
        leaving = set(device_ids)
        group.device_ids = [d for d in group.device_ids if d not in leaving]

    # ---- the state file (state.py) ---------------------------------------------------------
    def export_state(self) -> dict[str, Any]:
        """What a restart must keep, as JSON-ready data (state.py writes it)."""
        return {
            "tasks": [task_row(task) for task in self.tasks],
            "groups": [
                {
                    "group_id": g.group_id,
                    "name": g.name,
                    "description": g.description,
                    "app_id": g.app_id,
                    "max_devices": g.max_devices,
                    "device_ids": g.device_ids,
                }
                for g in self.fleet.groups.values()
            ],
            "packages": sorted(self.fleet.packages),
            "tokens": self.tokens.export(),
            "throttle": self.throttle.export(),
            "stats": {
                "calls": dict(self.stats.calls),
                "replies": dict(self.stats.replies),
                "throttled": self.stats.throttled,
                "tasks_created": self.stats.tasks_created,
            },
            "faults_injected": dict(self.faults.injected),
        }

    def restore_state(self, saved: dict[str, Any], elapsed: float) -> None:
        """Become the platform `export_state` described, `elapsed` real seconds later. Device
        paths and versions are derived again, in creation order, when first looked at."""
        packages = dict(self.fleet.packages)
        self.tasks, self.tasks_by_id = [], {}
        for seq, row in enumerate(saved["tasks"]):
            window = row["window"]
            task = Task(
                seq=seq,
                operation_id=row["operation_id"],
                operate_type=row["operate_type"],
                package=packages[row["file_id"]],
                targets=row["targets"],
                policy=row["policy"],
                device_ids=list(row["device_ids"]),
                create_time=float(row["create_time"]),
                window=(float(window[0]), float(window[1])) if window is not None else None,
                committed_at=-math.inf,  # long listed: no lag after a restart
            )
            self.tasks.append(task)
            self.tasks_by_id[task.operation_id] = task
        self.fleet.groups = {
            row["name"]: Group(
                group_id=row["group_id"],
                name=row["name"],
                description=row["description"],
                app_id=row["app_id"],
                max_devices=int(row["max_devices"]),
                device_ids=list(row["device_ids"]),
            )
            for row in saved["groups"]
        }
        kept = set(saved["packages"])
        self.fleet.packages = {k: v for k, v in packages.items() if k in kept}
        self.tokens.restore(saved["tokens"], elapsed)
        self.throttle.restore(saved["throttle"], elapsed)
        stats = saved["stats"]
        self.stats.calls = Counter(stats["calls"])
        self.stats.replies = Counter(stats["replies"])
        self.stats.throttled = int(stats["throttled"])
        self.stats.tasks_created = int(stats["tasks_created"])
        self.faults.injected = {str(k): int(v) for k, v in saved["faults_injected"].items()}
        # a saved "ids" generator state (older files) is ignored: fresh entropy never repeats
        self._device_tasks, self._device_tasks_upto, self._materialized = {}, 0, 0

    # ---- ground truth ---------------------------------------------------------------------
    def truth(self) -> list[dict[str, Any]]:
        """Every task created, in creation order, with its devices: the tests' oracle."""
        return list(self.truth_rows())

    def truth_rows(self) -> Iterator[dict[str, Any]]:
        """`truth()` one task at a time (`/_sim/tasks` streams it: 10⁶ devices in tasks)."""
        for task in self.tasks:
            row: dict[str, Any] = {
                "operationId": task.operation_id,
                "operateType": task.operate_type,
                "fileId": task.package.file_id,
                "devices": task.device_ids,
                "createTime": format_platform_time(task.create_time),
            }
            if "deviceGroups" in task.targets:
                row["deviceGroups"] = task.targets["deviceGroups"]
            yield row


def task_row(task: Task) -> dict[str, Any]:
    """One task as the state file keeps it (JSON-ready; `restore_state` reads it back)."""
    return {
        "operation_id": task.operation_id,
        "operate_type": task.operate_type,
        "file_id": task.package.file_id,
        "targets": task.targets,
        "policy": task.policy,
        "device_ids": task.device_ids,
        "create_time": task.create_time,
        "window": list(task.window) if task.window is not None else None,
    }


def _is_hex24(text: str) -> bool:
    return len(text) == 24 and all(c in "0123456789abcdefABCDEF" for c in text)
