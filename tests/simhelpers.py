"""Small helpers that read the simulator's fleet to build valid requests in tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from orchestrator.simulator import SimulatorServer
from orchestrator.simulator.fleet import FIRMWARE, SOFTWARE, Package


def newest_package(server: SimulatorServer, model: str = "WM-200", kind: str = FIRMWARE) -> Package:
    packages = [
        p for p in server.fleet.packages.values() if p.model == model and p.file_type == kind
    ]
    return max(packages, key=lambda p: tuple(int(x) for x in p.version.split(".")))


def software_package(server: SimulatorServer, model: str = "WM-200") -> Package:
    return newest_package(server, model, SOFTWARE)


def devices_of(server: SimulatorServer, model: str = "WM-200", count: int = 10) -> list[str]:
    ids = [d.device_id for d in server.fleet.devices.values() if d.model.model == model]
    assert len(ids) >= count, f"fleet has only {len(ids)} {model} devices"
    return ids[:count]


def create_body(server: SimulatorServer, count: int = 10, **policy: object) -> dict[str, object]:
    body: dict[str, object] = {
        "fileId": newest_package(server).file_id,
        "targets": {"devices": devices_of(server, count=count)},
    }
    if policy:
        body["policy"] = policy
    return body


T = TypeVar("T")


class LoopThread:
    """An event loop in a thread of its own: simulators served there leave the test's thread
    free to run the CLI in-process (CliRunner starts its own event loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
