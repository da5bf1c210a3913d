"""Upgrade tasks and how their subtasks unfold over simulated time.

A subtask's whole life (when the device wakes, each attempt, the outcome) is decided once,
deterministically from the device's seed and the task's sequence number, the first time anyone
looks at the task. After that its status at any moment is a lookup. Creating a task is
therefore cheap (the benchmark needs thousands per second) and the same fleet, seed and calls
always give the same results.

Status vocabulary as the platform spells it: task `wait/processing/failed/success/stop`,
subtask `wait/processing/fail/success/stop` (platform-api.md §3.8).
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .clock import format_platform_time
from .fleet import Device, Package

NOW_OFFLINE_TIMEOUT = 4 * 3600.0  # a task run "now" gives up on a silent device after this
ONLINE_OFFLINE_TIMEOUT = 24 * 3600.0  # "device_online" waits longer
DETAIL_SUCCESS = "Upgrade succeeded."
DETAIL_SAME_VERSION = "The current version of the device is the same as the target version."
DETAIL_OFFLINE = "Device did not come online, upgrade timeout."
DETAIL_WINDOW_CLOSED = "The task time window ended before the device came online."

TASK_STATUSES = ("wait", "processing", "failed", "success", "stop")
SUBTASK_STATUSES = ("wait", "processing", "fail", "success", "stop")


@dataclass(frozen=True, slots=True)
class SubtaskLife:
    """One device's path through a task: status changes at the given simulated times."""

    device_id: str
    sub_operation_id: str
    change_times: tuple[float, ...]
    change_statuses: tuple[str, ...]
    start_time: float | None
    stop_time: float
    detail: str
    reported_version: str
    old_version: str
    timed_out: bool

    def status_at(self, t: float) -> str:
        index = bisect.bisect_right(self.change_times, t) - 1
        return self.change_statuses[max(index, 0)]

    def to_wire(self, t: float, create_time: float, operate_type: str) -> dict[str, Any]:
        status = self.status_at(t)
        finished = status in ("success", "fail")
        started = self.start_time is not None and t >= self.start_time
        return {
            "subOperationId": self.sub_operation_id,
            "createTime": format_platform_time(create_time),
            "startTime": format_platform_time(self.start_time)
            if started and self.start_time is not None
            else "",
            "stopTime": format_platform_time(self.stop_time) if finished else "",
            "operateType": operate_type,
            "deviceId": self.device_id,
            "status": status,
            "detailInfo": self.detail if finished else "",
            "extendInfo": {"fileVersion": self.reported_version if finished else self.old_version},
        }


@dataclass
class Task:
    seq: int
    operation_id: str
    operate_type: str  # firmware_upgrade | software_upgrade
    package: Package
    targets: dict[str, Any]  # as submitted
    policy: dict[str, Any]  # as submitted (executeType defaulted to "now")
    device_ids: list[str]
    create_time: float  # platform time of the commit
    window: tuple[float, float] | None = None  # custom executeType: [startTime, endTime]
    committed_at: float = 0.0  # real (monotonic) time of the commit, for the list's lag
    lives: list[SubtaskLife] | None = None
    first_activity: float = 0.0
    final_time: float = 0.0
    final_status: str = "success"

    def status_at(self, t: float) -> str:
        if t >= self.final_time:
            return self.final_status
        if t >= self.first_activity:
            return "processing"
        return "wait"

    def counters_at(self, t: float) -> dict[str, int]:
        assert self.lives is not None
        counts = {
            "total": len(self.lives),
            "wait": 0,
            "processing": 0,
            "success": 0,
            "fail": 0,
            "stop": 0,
            "timeout": 0,
        }
        for life in self.lives:
            status = life.status_at(t)
            counts[status] += 1
            if status == "fail" and life.timed_out:
                counts["timeout"] += 1
        return counts

    def to_wire(self, t: float, extend_para: bool = True) -> dict[str, Any]:
        status = self.status_at(t)
        reply: dict[str, Any] = {
            "operationId": self.operation_id,
            "createTime": format_platform_time(self.create_time),
            "startTime": format_platform_time(self.first_activity)
            if t >= self.first_activity
            else "",
            "stopTime": format_platform_time(self.final_time) if t >= self.final_time else "",
            "operateType": self.operate_type,
            "targets": self.targets,
            "policy": self.policy,
            "status": status,
            "staResult": self.counters_at(t),
        }
        if extend_para:
            reply["extendPara"] = {"fileId": self.package.file_id, "version": self.package.version}
        return reply


def plan_subtask(task: Task, device: Device, index: int, rollback_rate: float = 0.0) -> SubtaskLife:
    """Decide, once, how `device` goes through `task`.

    `rollback_rate` (the fault knob): the share of upgrades that the platform reports as
    succeeded while the device rolled back to its previous image — the subtask succeeds and
    reports the old version, and the device keeps it."""
    rng = random.Random(device.behaviour_seed * 1_000_003 + task.seq)
    sub_id = f"{task.operation_id[:12]}{index:012x}"
    created = task.create_time
    target = task.package.version
    old = device.version_at(created)
    policy = task.policy
    execute_type = policy.get("executeType", "now")
    retries = int(policy.get("retryTimes", 0)) if policy.get("retryType") is True else 0

    window_end: float | None = None
    if task.window is not None:
        earliest = max(created, task.window[0])
        window_end = task.window[1]
        deadline = window_end
        give_up_detail = DETAIL_WINDOW_CLOSED
    elif execute_type == "device_online":
        earliest = device.next_wake_transition(created)
        deadline = created + ONLINE_OFFLINE_TIMEOUT
        give_up_detail = DETAIL_OFFLINE
    else:
        earliest = created
        deadline = created + NOW_OFFLINE_TIMEOUT
        give_up_detail = DETAIL_OFFLINE

    times: list[float] = [created]
    statuses: list[str] = ["wait"]

    def give_up(at: float, detail: str, timed_out: bool, start: float | None) -> SubtaskLife:
        times.append(at)
        statuses.append("fail")
        return SubtaskLife(
            device.device_id,
            sub_id,
            tuple(times),
            tuple(statuses),
            start,
            at,
            detail,
            device.version_at(at),
            old,
            timed_out,
        )

    if device.never_online:
        return give_up(deadline, give_up_detail, execute_type != "custom", None)
    start = device.next_wake(earliest)
    if start > deadline:
        return give_up(deadline, give_up_detail, execute_type != "custom", None)
    if device.version_at(start) == target:
        times.append(start)
        statuses.append("fail")
        return SubtaskLife(
            device.device_id,
            sub_id,
            tuple(times),
            tuple(statuses),
            start,
            start,
            DETAIL_SAME_VERSION,
            target,
            old,
            False,
        )

    first_start = start
    attempt_start = start
    for attempt in range(retries + 1):
        duration = device.model.upgrade_duration * rng.uniform(0.8, 1.2)
        end = attempt_start + duration
        times.append(attempt_start)
        statuses.append("processing")
        if rng.random() >= device.model.failure_probability:
            times.append(end)
            statuses.append("success")
            # a draw of its own, only when asked: the other draws stay as without the knob
            rolled_back = (
                rollback_rate > 0
                and random.Random(device.behaviour_seed * 7_919 + task.seq).random() < rollback_rate
            )
            if not rolled_back:
                device.version_changes.append((end, target))
            return SubtaskLife(
                device.device_id,
                sub_id,
                tuple(times),
                tuple(statuses),
                first_start,
                end,
                DETAIL_SUCCESS,
                old if rolled_back else target,
                old,
                False,
            )
        reason = device.model.failure_reasons[rng.randrange(len(device.model.failure_reasons))]
        next_start = device.next_wake_transition(end)
        last = attempt == retries or (window_end is not None and next_start >= window_end)
        if last:
            times.append(end)
            statuses.append("fail")
            return SubtaskLife(
                device.device_id,
                sub_id,
                tuple(times),
                tuple(statuses),
                first_start,
                end,
                reason,
                old,
                old,
                False,
            )
        times.append(end)
        statuses.append("wait")
        attempt_start = next_start
    raise AssertionError("unreachable: the loop returns on its last attempt")


def materialize(
    task: Task, devices: Mapping[str, Device], rollback_rate: float = 0.0, detail_padding: int = 0
) -> None:
    """Plan every subtask's life at once. `detail_padding` (the fault knob): each failed
    subtask's detailInfo also names its device and carries that many more characters — a
    platform whose failure texts are long and each one different."""
    if task.lives is not None:
        return
    lives = [
        plan_subtask(task, devices[d], i, rollback_rate) for i, d in enumerate(task.device_ids)
    ]
    if detail_padding > 0:
        lives = [
            dataclasses.replace(
                life,
                detail=f"{life.detail} (device {life.device_id}) {'x' * detail_padding}",
            )
            if life.change_statuses[-1] == "fail"
            else life
            for life in lives
        ]
    task.lives = lives
    if lives:
        task.first_activity = min(life.change_times[1] for life in lives)
        task.final_time = max(life.stop_time for life in lives)
        all_ok = all(life.change_statuses[-1] == "success" for life in lives)
        task.final_status = "success" if all_ok else "failed"
    else:
        task.first_activity = task.final_time = task.create_time
        task.final_status = "success"
