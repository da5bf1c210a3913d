"""Pacing against the simulator's strict sliding window, at a scaled limit (20 calls / 1 s)."""

from __future__ import annotations

import asyncio
import time

from orchestrator.northbound import NorthboundClient, Pacer, Priority, shared_pacer
from orchestrator.northbound.ledger import Outcome
from orchestrator.simulator import SimulatorServer

from .conftest import client_config
from .simhelpers import newest_package

CALLS, SECONDS = 20, 1.0


def _scale(server: SimulatorServer) -> None:
    server.platform.throttle.calls = CALLS
    server.platform.throttle.seconds = SECONDS


async def _hammer(client: NorthboundClient, file_id: str, total: int, workers: int) -> list[float]:
    """`workers` concurrent callers share `total` GETs; returns the completion times."""
    remaining = total
    done: list[float] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await client.get_package(file_id)
            done.append(time.monotonic())

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done


async def test_pacing_uses_the_budget_and_is_never_throttled(live_sim: SimulatorServer) -> None:
    """Over 10+ windows with 40 callers: no call refused, ≥ 95 % of the limit achieved."""
    _scale(live_sim)
    async with NorthboundClient(client_config(live_sim)) as client:
        file_id = newest_package(live_sim).file_id
        started = time.monotonic()
        await client.login()
        done = await _hammer(client, file_id, total=10 * CALLS + 1, workers=40)
    elapsed = done[-1] - started
    achieved = (len(done)) / elapsed * SECONDS / CALLS  # len(done) calls after the login
    assert live_sim.platform.stats.throttled == 0
    assert elapsed >= 10 * SECONDS
    assert achieved >= 0.95, f"achieved {achieved:.3f} of the limit"


async def test_backs_off_when_another_client_spends_half(live_sim: SimulatorServer) -> None:
    """With a second client spending half the budget, ours is throttled, backs off, completes."""
    _scale(live_sim)
    live_sim.platform.faults.update({"storm_share": 0.5})
    live_sim.platform.throttle.set_storm(0.5)
    async with NorthboundClient(client_config(live_sim)) as client:
        file_id = newest_package(live_sim).file_id
        done = await _hammer(client, file_id, total=3 * CALLS, workers=10)
    assert len(done) == 3 * CALLS
    assert client.pacer.throttled >= 1
    assert live_sim.platform.throttle.storm_admitted > 0


async def test_submission_is_served_before_monitoring() -> None:
    """Waiting SUBMIT callers get slots before MONITOR callers that queued earlier."""
    pacer = Pacer(1, 0.02, request_timeout=1.0)
    order: list[str] = []

    async def call(name: str, priority: Priority) -> None:
        slot = await pacer.acquire(priority)
        order.append(name)
        pacer.release(slot, Outcome.REPLIED)

    first = await pacer.acquire()  # occupy the only slot so the rest must queue
    monitors = [asyncio.create_task(call(f"m{i}", Priority.MONITOR)) for i in range(3)]
    await asyncio.sleep(0)
    submits = [asyncio.create_task(call(f"s{i}", Priority.SUBMIT)) for i in range(3)]
    await asyncio.sleep(0)
    pacer.release(first, Outcome.REPLIED)
    await asyncio.gather(*monitors, *submits)
    assert order == ["s0", "s1", "s2", "m0", "m1", "m2"]


async def test_a_slot_is_free_again_only_a_window_after_its_reply() -> None:
    """The (CALLS + 1)-th grant comes SECONDS or more after the first slot's release."""
    pacer = Pacer(10, 0.2, request_timeout=1.0)
    grants: list[float] = []
    releases: list[float] = []

    async def caller() -> None:
        for _ in range(5):
            slot = await pacer.acquire()
            grants.append(time.monotonic())
            await asyncio.sleep(0.01)  # the round trip
            releases.append(time.monotonic())
            pacer.release(slot, Outcome.REPLIED)

    await asyncio.gather(*(caller() for _ in range(5)))
    releases.sort()
    gaps = [grants[i + 10] - releases[i] for i in range(len(grants) - 10)]
    assert min(gaps) >= 0.2


async def test_a_call_that_never_left_frees_its_slot_at_once() -> None:
    """A slot released as UNSENT (the body could not be built) is granted again at once."""
    pacer = Pacer(1, 60.0, request_timeout=1.0)
    slot = await pacer.acquire()
    pacer.release(slot, Outcome.UNSENT)
    started = time.monotonic()
    await asyncio.wait_for(pacer.acquire(), 1.0)
    assert time.monotonic() - started < 0.5


async def test_one_pacer_per_application() -> None:
    """Every client of the same base URL and app id shares one pacer."""
    a = shared_pacer("https://h:8743/", "app", 100, 60.0)
    b = shared_pacer("https://h:8743", "app", 100, 60.0)
    c = shared_pacer("https://h:8743", "other", 100, 60.0)
    assert a is b and a is not c
