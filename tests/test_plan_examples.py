"""The shipped plan files are valid plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.loaded_plan import load_plan
from orchestrator.plan import parse_plan

PLANS = Path(__file__).parent.parent / "plans"


@pytest.mark.parametrize("path", sorted(PLANS.glob("examples/*.toml")), ids=lambda p: p.name)
def test_examples_follow_the_plan_schema(path: Path) -> None:
    """Each commented example parses and passes every schema rule."""
    plan = parse_plan(path.read_text(), str(path))
    assert plan.name and plan.platform.url.startswith("https://")


def test_demo_plan_loads_with_its_fleet() -> None:
    """The demo plan and its fleet file pass the offline checks, into three waves."""
    loaded = load_plan(PLANS / "demo.toml")
    assert [w.name for w in loaded.waves] == ["canary", "quarter", "rest"]
    assert len(loaded.fleet.members) == sum(len(w.members) for w in loaded.waves) > 5000


def test_demo_fleet_is_the_simulators_wm200_meters() -> None:
    """The committed demo fleet equals what the embedded simulator generates."""
    from orchestrator.simulator import generate_fleet

    loaded = load_plan(PLANS / "demo.toml")
    sim = loaded.plan.platform.simulator
    fleet = generate_fleet(sim.devices, sim.seed)
    expected = [d.device_id for d in fleet.devices.values() if d.model.model == "WM-200"]
    assert loaded.fleet.members == expected
