"""The simulator at scale: a fleet of one model, held as columns, capped by available memory."""

from __future__ import annotations

import csv
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import InputError
from orchestrator.plan import SimulatorSection, parse_plan
from orchestrator.simulator import SimulatorConfig, SimulatorServer, generate_fleet
from orchestrator.simulator.fleet import (
    BYTES_AT_REST,
    BYTES_IN_A_TASK,
    MEMORY_SHARE,
    MODELS,
    FleetTooLarge,
    max_devices,
)
from orchestrator.simulator.state import StateError
from orchestrator.simulator.testing import get_json, simulator_process

from .simhelpers import newest_package

PLAN = """
name = "big"
operation = "firmware"
[platform]
url = "simulator"
[platform.simulator]
{simulator}
[firmware]
version = "2.1.0"
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[fleet]
devices_file = "fleet.csv"
"""


def test_one_model_fleet_holds_only_that_model() -> None:
    """`models=("TR-1",)`: every device is a TR-1, and every model's packages still exist."""
    fleet = generate_fleet(500, 3, models=("TR-1",))
    assert len(fleet.devices) == 500
    assert {row[2] for row in fleet.devices.rows()} == {"TR-1"}
    assert {fleet.devices[d].model.model for d in list(fleet.devices)[:50]} == {"TR-1"}
    assert {p.model for p in fleet.packages.values()} == {m.model for m in MODELS}


def test_device_lookup_keeps_its_version_changes() -> None:
    """A device looked up twice is the same object: an upgrade recorded on it stays."""
    fleet = generate_fleet(50, 3)
    device_id = next(iter(fleet.devices))
    fleet.devices[device_id].version_changes.append((10.0, "9.9"))
    assert fleet.devices[device_id].version_at(11.0) == "9.9"


def test_max_devices_is_memory_over_the_bytes_a_device() -> None:
    """The cap is a share of the available bytes (room left for the server itself) over a
    device's cost at rest plus in a task."""
    assert max_devices(10**9) == int(10**9 * MEMORY_SHARE) // (BYTES_AT_REST + BYTES_IN_A_TASK)


def test_a_fleet_over_the_memory_cap_is_refused_before_it_is_built() -> None:
    """One device more than the available memory holds: FleetTooLarge, naming the room."""
    cap = max_devices()
    assert cap is not None
    with pytest.raises(FleetTooLarge, match=f"room for {cap}"):
        generate_fleet(cap + 1, 1)


def test_simulator_command_over_the_memory_cap_is_one_line() -> None:
    """`rollout simulator --devices` beyond the memory: exit 2, one line naming --devices."""
    result = CliRunner().invoke(
        main, ["simulator", "--no-tls", "--port", "0", "--devices", str(10**13)]
    )
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1, err
    assert "--devices" in err and "available memory" in err and "Traceback" not in err


def test_plan_accepts_an_embedded_fleet_over_two_million() -> None:
    """`[platform.simulator] devices` has no constant cap: 4 000 000 of one model parses."""
    plan = parse_plan(PLAN.format(simulator='devices = 4000000\nmodels = ["WM-200"]'), "p")
    assert plan.platform.simulator.devices == 4_000_000
    assert plan.platform.simulator.models == ("WM-200",)


def test_plan_refuses_an_unknown_simulator_model() -> None:
    """`models = ["XX-1"]`: bad input naming platform.simulator.models."""
    with pytest.raises(InputError) as caught:
        parse_plan(PLAN.format(simulator='models = ["XX-1"]'), "p.toml")
    assert "platform.simulator.models" in str(caught.value)


def test_model_choices_are_the_simulators_models() -> None:
    """The CLI's --model and the plan's models name exactly the simulator's models."""
    names = [m.model for m in MODELS]
    option = next(p for p in main.commands["simulator"].params if p.name == "models")
    assert list(typing.cast(typing.Any, option.type).choices) == names
    field = SimulatorSection.model_fields["models"].annotation
    literal = typing.get_args(typing.get_args(field)[0])[0]
    assert list(typing.get_args(literal)) == names


def test_standalone_model_flag_writes_a_one_model_fleet(tmp_path: Path) -> None:
    """`--devices 300 --model GM-10`: the fleet CSV has 300 GM-10 meters, /_sim/stats serves."""
    with simulator_process(tmp_path, "--devices", "300", "--model", "GM-10") as (url, path):
        assert get_json(url + "/_sim/stats")["total_calls"] == 0
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 300 and {row["model"] for row in rows} == {"GM-10"}


async def test_create_on_a_one_model_fleet(tmp_path: Path) -> None:
    """A create for 256 devices of the one model commits and its task counts them all."""
    config = SimulatorConfig(tls=False, devices=1000, seed=2, models=("WM-200",))
    async with SimulatorServer(config) as sim:
        body = {
            "fileId": newest_package(sim).file_id,
            "targets": {"devices": list(sim.fleet.devices)[:256]},
        }
        checked = sim.platform.check_create("firmwareUpgrade", body)
        operation_id = sim.platform.commit_create(checked)
        wire = sim.platform.query_task(operation_id)
    assert wire["staResult"]["total"] == 256


async def test_state_file_of_a_one_model_fleet_does_not_fit_all_models(tmp_path: Path) -> None:
    """A state saved with models=("WM-200",) refuses a start with every model."""
    state = tmp_path / "sim.json"
    one = SimulatorConfig(tls=False, devices=100, models=("WM-200",), state_file=state)
    async with SimulatorServer(one):
        pass
    with pytest.raises(StateError, match="models"):
        SimulatorServer(SimulatorConfig(tls=False, devices=100, state_file=state))
