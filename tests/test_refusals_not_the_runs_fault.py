"""Refusals that are not the run's fault — 1010005 (another client replaced the app's token)
and 1010009 (another client spent the app's budget), on any call, a refresh included — and
their retries never stop a run as "identical failures"."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from orchestrator.engine import RunOptions, execute
from orchestrator.errors import KeptRefusing, Throttled
from orchestrator.loaded_plan import load_plan
from orchestrator.northbound import NorthboundClient
from orchestrator.simulator import SimulatorConfig, SimulatorServer

from .conftest import SECRET, client_config
from .enginehelpers import SECRET_ENV, device_sets, write_plan
from .simhelpers import devices_of


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


async def test_revoked_tokens_on_every_create_never_stop_the_run(tmp_path: Path) -> None:
    """50 creates in a row drawing 1010005 (two calls' worth of attempts) with
    stop_after_identical_failures = 2: the run completes, every device once."""
    config = SimulatorConfig(tls=False, devices=4000, seed=4, rate_limit=(1000, 1.0))
    async with SimulatorServer(config) as server:
        server.platform.faults.update({"revoke_next_tokens": 50, "only_api": "createTask"})
        devices = devices_of(server, "WM-200", 512)
        plan = write_plan(tmp_path, server, devices, execution="stop_after_identical_failures = 2")
        result = await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        truth = server.platform.truth()
        stats = server.platform.stats
    assert result.counts["targets_submitted"] == 512
    assert set(device_sets(truth).values()) == {1}
    assert stats.replies["1010005"] == 50


async def test_throttled_refreshes_never_stop_the_run(tmp_path: Path) -> None:
    """With 2 s tokens and the first 4 refreshes throttled (1010009), a run with
    stop_after_identical_failures = 2 waits them out like logins and completes."""
    config = SimulatorConfig(tls=False, devices=14000, seed=4, rate_limit=(10, 1.0), token_ttl=2.0)
    async with SimulatorServer(config) as server:
        server.platform.faults.update({"throttle_next_calls": 4, "only_api": "refreshToken"})
        devices = devices_of(server, "WM-200", 12 * 256)
        plan = write_plan(tmp_path, server, devices, execution="stop_after_identical_failures = 2")
        result = await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        stats = server.platform.stats
    assert result.counts["targets_submitted"] == 12 * 256
    assert server.platform.faults.injected["throttle"] == 4  # the refreshes were throttled
    assert stats.calls["refreshToken"] >= 1


async def test_a_throttled_refresh_is_sent_again(live_sim: SimulatorServer) -> None:
    """A refresh that draws 1010009 is sent again after the cool-down; the call succeeds."""
    live_sim.platform.tokens.ttl = 1.0
    async with NorthboundClient(client_config(live_sim, refresh_before=0.6)) as client:
        await client.list_packages()
        await asyncio.sleep(0.95)  # renewed shortly before expiry: a tenth of 1 s before
        live_sim.platform.faults.update({"throttle_next_calls": 2, "only_api": "refreshToken"})
        try:
            page = await client.list_packages()
        except Throttled:  # the kind of bug this pins: a throttled refresh failed the call
            pytest.fail("a throttled refresh failed the call")
    assert page.total > 0
    assert client.tokens.refreshes == 1 and client.pacer.throttled == 2


@pytest.mark.parametrize(
    ("fault", "code"), [("throttle_next_calls", "1010009"), ("revoke_next_tokens", "1010005")]
)
async def test_a_read_refused_25_times_in_a_row_is_waited_out(
    tmp_path: Path, fault: str, code: str
) -> None:
    """The census's task list refused 25 times in a row (1010009, or 1010005) is waited out
    like a create: the run completes, every device once."""
    config = SimulatorConfig(tls=False, devices=4000, seed=4, rate_limit=(1000, 1.0))
    async with SimulatorServer(config) as server:
        server.platform.faults.update({fault: 25, "only_api": "listTasks"})
        devices = devices_of(server, "WM-200", 256)
        plan = write_plan(tmp_path, server, devices, execution="stop_after_identical_failures = 2")
        result = await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        truth = server.platform.truth()
        stats = server.platform.stats
    assert result.counts["targets_submitted"] == 256
    assert set(device_sets(truth).values()) == {1}
    assert stats.replies[code] == 25


async def test_refusals_are_waited_out_for_the_outage_budget_then_stop_the_call(
    live_sim: SimulatorServer,
) -> None:
    """A read refused 1010009 on every attempt is given up after outage_budget seconds with
    KeptRefusing, whose one line names the code and the budget."""
    live_sim.platform.faults.update({"throttle_next_calls": 10**6, "only_api": "listTasks"})
    async with NorthboundClient(client_config(live_sim, outage_budget=1.5)) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(KeptRefusing) as raised:
            await client.list_tasks()
        took = asyncio.get_running_loop().time() - started
    assert 1.5 <= took < 6
    assert "1010009" in str(raised.value) and "execution.outage_budget = 1.5 s" in str(raised.value)
