"""The run being driven: what the submitter, the monitor and the engine all act on."""

from __future__ import annotations

from dataclasses import dataclass

from .journal import Journal
from .loaded_plan import LoadedPlan
from .northbound import NorthboundClient, OperationType, Package
from .plan import Operation, Plan


@dataclass(frozen=True)
class RunSession:
    loaded: LoadedPlan
    journal: Journal
    client: NorthboundClient
    run_id: int
    package: Package

    @property
    def plan(self) -> Plan:
        return self.loaded.plan

    @property
    def operation(self) -> OperationType:
        return operation_type(self.plan.operation)


def operation_type(operation: Operation) -> OperationType:
    return OperationType.FIRMWARE if operation is Operation.FIRMWARE else OperationType.SOFTWARE
