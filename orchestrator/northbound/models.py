"""Typed requests and replies of the northbound API.

The platform's spelling stays at the wire (aliases); inside we use our own enums. The one
place where task `failed` and subtask `fail` become the same `Status.FAILED` is here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Status(StrEnum):
    """Our status of a task or a subtask."""

    WAITING = "waiting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def final(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED, Status.STOPPED)


TASK_STATUS_WIRE: dict[str, Status] = {
    "wait": Status.WAITING,
    "processing": Status.PROCESSING,
    "failed": Status.FAILED,
    "success": Status.SUCCEEDED,
    "stop": Status.STOPPED,
}
SUBTASK_STATUS_WIRE: dict[str, Status] = {
    "wait": Status.WAITING,
    "processing": Status.PROCESSING,
    "fail": Status.FAILED,
    "success": Status.SUCCEEDED,
    "stop": Status.STOPPED,
}
TASK_STATUS_TO_WIRE = {status: wire for wire, status in TASK_STATUS_WIRE.items()}
SUBTASK_STATUS_TO_WIRE = {status: wire for wire, status in SUBTASK_STATUS_WIRE.items()}


class OperationType(StrEnum):
    FIRMWARE = "firmware_upgrade"
    SOFTWARE = "software_upgrade"

    @property
    def create_path(self) -> str:
        return "firmwareUpgrade" if self is OperationType.FIRMWARE else "softwareUpgrade"

    @property
    def package_type(self) -> str:
        return "firmwarePackage" if self is OperationType.FIRMWARE else "softwarePackage"


class ExecuteType(StrEnum):
    NOW = "now"
    DEVICE_ONLINE = "device_online"
    CUSTOM = "custom"


class _Wire(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class Token(_Wire):
    access_token: str = Field(alias="accessToken", repr=False)
    refresh_token: str = Field(alias="refreshToken", repr=False)
    expires_in: int = Field(alias="expiresIn")
    token_type: str = Field(default="bearer", alias="tokenType")


class Package(_Wire):
    file_id: str = Field(alias="fileId")
    name: str = ""
    version: str = ""
    file_type: str = Field(default="", alias="fileType")
    device_type: str = Field(default="", alias="deviceType")
    model: str = ""
    manufacturer: str = Field(default="", alias="manufacturerName")


class StaResult(_Wire):
    total: int = 0
    wait: int = 0
    processing: int = 0
    success: int = 0
    fail: int = 0
    stop: int = 0
    timeout: int = 0


class Targets(_Wire):
    devices: list[str] | None = None
    device_groups: list[str] | None = Field(default=None, alias="deviceGroups")
    device_type: str | None = Field(default=None, alias="deviceType")
    model: str | None = None
    manufacturer: str | None = Field(default=None, alias="manufacturerName")


class Policy(_Wire):
    execute_type: ExecuteType = Field(default=ExecuteType.NOW, alias="executeType")
    start_time: str | None = Field(default=None, alias="startTime")
    end_time: str | None = Field(default=None, alias="endTime")
    retry_type: bool = Field(default=False, alias="retryType")
    retry_times: int | None = Field(default=None, alias="retryTimes")


class Task(_Wire):
    operation_id: str = Field(alias="operationId")
    create_time: str = Field(default="", alias="createTime")
    start_time: str = Field(default="", alias="startTime")
    stop_time: str = Field(default="", alias="stopTime")
    operate_type: str = Field(default="", alias="operateType")
    targets: Targets = Field(default_factory=Targets)
    policy: Policy | None = None
    status: Status
    sta_result: StaResult = Field(default_factory=StaResult, alias="staResult")
    extend_para: dict[str, Any] | None = Field(default=None, alias="extendPara")

    @field_validator("status", mode="before")
    @classmethod
    def _task_status(cls, value: Any) -> Status:
        return TASK_STATUS_WIRE[value] if isinstance(value, str) else Status(value)


class SubOperation(_Wire):
    sub_operation_id: str = Field(default="", alias="subOperationId")
    device_id: str = Field(alias="deviceId")
    status: Status
    create_time: str = Field(default="", alias="createTime")
    start_time: str = Field(default="", alias="startTime")
    stop_time: str = Field(default="", alias="stopTime")
    detail: str = Field(default="", alias="detailInfo")
    extend_info: dict[str, Any] | None = Field(default=None, alias="extendInfo")

    @field_validator("status", mode="before")
    @classmethod
    def _subtask_status(cls, value: Any) -> Status:
        return SUBTASK_STATUS_WIRE[value] if isinstance(value, str) else Status(value)

    @property
    def reported_version(self) -> str | None:
        version = (self.extend_info or {}).get("fileVersion")
        return version if isinstance(version, str) else None


class DeviceGroup(_Wire):
    """A device group (platform-api.md §4): tasks target groups by name, the member API
    by id (a UUID on the platform)."""

    group_id: str = Field(alias="id")
    name: str
    description: str = ""
    app_id: str = Field(default="", alias="appId")
    max_devices: int = Field(default=0, alias="maxDevNum")  # 0: unlimited
    device_count: int = Field(default=0, alias="curDevNum")
    creator: str = ""


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    page_no: int
    page_size: int
    total: int


class CreateTaskRequest(_Wire):
    """The create-task body (CreateUpgradeTaskInDTO)."""

    file_id: str = Field(alias="fileId")
    targets: Targets
    policy: Policy | None = None

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
