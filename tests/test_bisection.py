"""Bisection isolates any number of refused targets, within its documented bound and cap."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import uuid
from pathlib import Path

import aiohttp
import pytest

from orchestrator.engine import RunOptions, execute
from orchestrator.errors import RunAborted
from orchestrator.loaded_plan import load_plan
from orchestrator.planner import CHUNK_SIZE, bisection_bound
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.status import read_status

from .conftest import SECRET, UPGRADE, RawPlatform
from .enginehelpers import SECRET_ENV, device_sets, write_plan
from .simhelpers import devices_of, newest_package


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _unknown(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def _bound(fleet: list[str], bad: set[str]) -> int:
    """The documented bound, summed over the plan's chunks (one wave, file order)."""
    total = 0
    for start in range(0, len(fleet), CHUNK_SIZE):
        chunk = fleet[start : start + CHUNK_SIZE]
        total += bisection_bound(len(chunk), sum(1 for d in chunk if d in bad))
    return total


def test_bisection_bound_is_two_creates_per_level_per_bad_target() -> None:
    """One bad target in 256 costs at most 16 creates; the bound saturates when bad ones crowd."""
    assert bisection_bound(256, 0) == 0
    assert bisection_bound(256, 1) == 2 * 8
    assert bisection_bound(256, 3) == 2 * (1 + 2 + 3 * 6)
    assert bisection_bound(256, 256) == 2 * 255  # every part of the tree is refused and split
    assert bisection_bound(1, 1) == 0


async def test_ten_thousand_devices_with_seven_percent_bad(tmp_path: Path) -> None:
    """10 000 devices, 5 % unknown and 2 % another model, shuffled: every good device in one
    task, every bad one quarantined with its code, creates within the documented bound."""
    config = SimulatorConfig(tls=False, devices=40000, seed=12, rate_limit=(20000, 1.0))
    async with SimulatorServer(config) as sim:
        good = devices_of(sim, "WM-200", 9300)
        unknown = _unknown(500, seed=3)
        wrong_model = devices_of(sim, "GM-10", 200)
        fleet = good + unknown + wrong_model
        random.Random(8).shuffle(fleet)
        plan = write_plan(tmp_path, sim, fleet, execution="concurrency = 8")
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        counts = device_sets(sim.platform.truth())
        creates = sim.platform.stats.calls["createTask"]
    assert set(counts) == set(good) and set(counts.values()) == {1}
    status = read_status(journal, "test-plan")
    quarantined = {row["target"]: row["error_code"] for row in status["quarantined"]}
    assert quarantined == {d: "123002" for d in unknown} | {d: "123016" for d in wrong_model}
    chunks = -(-len(fleet) // CHUNK_SIZE)
    bound = _bound(fleet, set(unknown) | set(wrong_model))
    assert chunks < creates <= chunks + bound
    assert status["status"] == "submitted"
    # the package is looked up once per refused chunk and quarantined target at most
    assert sim.platform.stats.calls["getPackage"] - 1 <= chunks + len(quarantined)


async def test_bad_devices_bisect_without_tripping_identical_failures(tmp_path: Path) -> None:
    """5 % unknown IDs among 1 050 (any stop_after_identical_failures): all isolated, run done."""
    config = SimulatorConfig(tls=False, devices=6000, seed=5, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        good = devices_of(sim, "WM-200", 998)
        unknown = _unknown(52, seed=4)
        fleet = good + unknown
        random.Random(2).shuffle(fleet)
        plan = write_plan(tmp_path, sim, fleet, execution="stop_after_identical_failures = 2")
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        counts = device_sets(sim.platform.truth())
    assert set(counts) == set(good) and set(counts.values()) == {1}
    status = read_status(tmp_path / "j.sqlite", "test-plan")
    assert {row["target"] for row in status["quarantined"]} == set(unknown)


async def test_bisection_cap_stops_the_run_with_the_count_quarantined(tmp_path: Path) -> None:
    """Past max_bisect_share × planned creates the run stops, naming the quarantined count;
    resume with a raised cap finishes the isolation."""
    config = SimulatorConfig(tls=False, devices=6000, seed=5, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        good = devices_of(sim, "WM-200", 400)
        wrong_model = devices_of(sim, "GM-10", 4)
        fleet = good + wrong_model
        random.Random(5).shuffle(fleet)
        plan = write_plan(tmp_path, sim, fleet, execution="max_bisect_share = 16\nconcurrency = 1")
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunAborted, match="bisection has spent 32 creates") as stopped:
            await execute(load_plan(plan), RunOptions(journal=journal))
        status = read_status(journal, "test-plan")
        assert status["status"] == "aborted"
        assert 0 < len(status["quarantined"]) < 4
        assert f"{len(status['quarantined'])} targets quarantined so far" in str(stopped.value)
        # planned creates: 2 chunks; the cap: 2 × 16 creates of bisected halves, none beyond
        assert sim.platform.stats.calls["createTask"] == 2 + 32
        plan.write_text(plan.read_text().replace("max_bisect_share = 16", ""))
        await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        counts = device_sets(sim.platform.truth())
    assert set(counts) == set(good) and set(counts.values()) == {1}
    status = read_status(journal, "test-plan")
    assert {row["target"] for row in status["quarantined"]} == set(wrong_model)


@pytest.mark.parametrize(("position", "extra"), [(0, 16), (255, 9)])
async def test_one_bad_target_costs_between_nine_and_sixteen_creates(
    tmp_path: Path, position: int, extra: int
) -> None:
    """One unknown ID among 256: 16 creates when it sits in every left half, 9 when in every
    right half (an accepted left half spares its sibling's create); never more than the bound."""
    config = SimulatorConfig(tls=False, devices=2000, seed=5, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        fleet = devices_of(sim, "WM-200", 255)
        fleet.insert(position, _unknown(1, seed=9)[0])
        plan = write_plan(tmp_path, sim, fleet)
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        creates = sim.platform.stats.calls["createTask"]
        assert len(device_sets(sim.platform.truth())) == 255
    assert creates - 1 == extra <= bisection_bound(256, 1)


async def test_package_deleted_mid_run_stops_the_run_and_quarantines_nothing(
    tmp_path: Path,
) -> None:
    """A package deleted during the run (every create then refused 123002) stops the run at
    the first refusal with one line naming the fix: nothing quarantined, nothing bisected."""
    config = SimulatorConfig(tls=False, devices=6000, seed=5, rate_limit=(10, 1.0))
    async with SimulatorServer(config) as sim, aiohttp.ClientSession() as http:
        fleet = devices_of(sim, "WM-200", 1400)  # 6 chunks, ~0.1 s apart
        plan = write_plan(tmp_path, sim, fleet, execution="concurrency = 1")
        file_id = newest_package(sim).file_id
        platform = RawPlatform(sim, http, None)

        async def delete_after_two_creates() -> None:
            while sim.platform.stats.tasks_created < 2:  # noqa: ASYNC110 - the simulator's count
                await asyncio.sleep(0.01)
            await platform.login()
            status, _, _ = await platform.call("DELETE", f"{UPGRADE}/category/{file_id}")
            assert status == 200

        deleting = asyncio.create_task(delete_after_two_creates())
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunAborted, match=r"package \w+ .* is no longer on the platform"):
            await execute(load_plan(plan), RunOptions(journal=journal))
        await deleting
        created = sim.platform.stats.tasks_created
    assert 2 <= created < 6
    with sqlite3.connect(journal) as db:
        refused = db.execute("SELECT COUNT(*) FROM attempts WHERE outcome='refused'").fetchone()
        split = db.execute("SELECT COUNT(*) FROM chunks WHERE state='split'").fetchone()
    assert (refused[0], split[0]) == (1, 0)  # the first refusal stopped it: no bisection
    status = read_status(journal, "test-plan")
    assert status["quarantined"] == [] and status["status"] == "aborted"
