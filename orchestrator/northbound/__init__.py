"""The platform client: typed calls, tokens, one error tree, and pacing."""

from .client import NorthboundClient
from .config import ClientConfig, TLSConfig
from .models import (
    CreateTaskRequest,
    DeviceGroup,
    ExecuteType,
    OperationType,
    Package,
    Page,
    Policy,
    StaResult,
    Status,
    SubOperation,
    Targets,
    Task,
)
from .pacing import Pacer, Priority, shared_pacer

__all__ = [
    "ClientConfig",
    "CreateTaskRequest",
    "DeviceGroup",
    "ExecuteType",
    "NorthboundClient",
    "OperationType",
    "Pacer",
    "Package",
    "Page",
    "Policy",
    "Priority",
    "StaResult",
    "Status",
    "SubOperation",
    "TLSConfig",
    "Targets",
    "Task",
    "shared_pacer",
]
