"""The platform simulator: an independent implementation of `platform-api.md`.

It imports nothing from the client or the engine (a test pins this), so a mistake shared by
both sides cannot hide: the simulator is the oracle for tests and the load for benchmarks.
"""

from .clock import Clock, ManualClock, ScaledClock, format_platform_time, parse_platform_time
from .faults import FaultConfig
from .fleet import Fleet, generate_fleet, write_fleet_csv
from .server import DEFAULT_APP_ID, DEFAULT_SECRET, SimulatorConfig, SimulatorServer

__all__ = [
    "DEFAULT_APP_ID",
    "DEFAULT_SECRET",
    "Clock",
    "FaultConfig",
    "Fleet",
    "ManualClock",
    "ScaledClock",
    "SimulatorConfig",
    "SimulatorServer",
    "format_platform_time",
    "generate_fleet",
    "parse_platform_time",
    "write_fleet_csv",
]
