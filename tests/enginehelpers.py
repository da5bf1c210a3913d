"""Helpers to write plans and fleet files that point at a simulator under test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.simulator import SimulatorServer

from .simhelpers import newest_package

SECRET_ENV = "ROLLOUT_TEST_SECRET"


def write_fleet(path: Path, device_ids: list[str], csv: bool = False) -> Path:
    if csv:
        path.write_text("deviceId,note\n" + "".join(f"{d},x\n" for d in device_ids))
    else:
        path.write_text("".join(f"{d}\n" for d in device_ids))
    return path


def plan_text(
    server: SimulatorServer,
    fleet_file: str = "fleet.txt",
    *,
    name: str = "test-plan",
    model: str = "WM-200",
    policy: str = 'execute_type = "now"',
    execution: str = "",
    extra_platform: str = "",
    monitor: str = "follow = false",
    waves: str = "",
    settle: float = 0.2,
    request_timeout: float = 2,
) -> str:
    package = newest_package(server, model)
    calls, seconds = server.platform.throttle.calls, server.platform.throttle.seconds
    return f"""
name = "{name}"
[platform]
url = "{server.url}"
app_id = "demo-app"
secret_env = "{SECRET_ENV}"
rate_limit = "{calls}/{seconds:g}"
request_timeout = {request_timeout:g}
{extra_platform}
[firmware]
file_id = "{package.file_id}"
[fleet]
devices_file = "{fleet_file}"
[policy]
{policy}
[execution]
settle = {settle:g}
{execution}
[monitor]
{monitor}
{waves}
"""


def write_plan(
    directory: Path, server: SimulatorServer, device_ids: list[str], **kwargs: Any
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_fleet(directory / "fleet.txt", device_ids)
    path = directory / "plan.toml"
    path.write_text(plan_text(server, **kwargs))
    return path


def device_sets(truth: list[dict[str, Any]]) -> dict[str, int]:
    """How many tasks each device is in, by the simulator's ground truth."""
    counts: dict[str, int] = {}
    for task in truth:
        for device in task["devices"]:
            counts[device] = counts.get(device, 0) + 1
    return counts
