"""The simulator survives a restart (`--state FILE`), so an outage can be rehearsed: a run
pauses while the platform is down and completes when it is back, or stops after the outage
budget and `resume` finishes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import anyio
import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.simulator.testing import free_port, get_json, simulator_process

from .conftest import APP_ID, LOGIN, SECRET, UPGRADE
from .enginehelpers import SECRET_ENV, device_sets
from .simhelpers import create_body, devices_of


def _config(state: Path, **kwargs: object) -> SimulatorConfig:
    return SimulatorConfig(
        tls=False, devices=600, seed=7, rate_limit=(1000, 60.0), state_file=state, **kwargs
    )


async def _create(session: aiohttp.ClientSession, server: SimulatorServer, token: str) -> str:
    headers = {"app_key": APP_ID, "Authorization": f"Bearer {token}"}
    async with session.post(
        server.url + f"{UPGRADE}/operations/firmwareUpgrade",
        json=create_body(server, count=3),
        headers=headers,
    ) as reply:
        assert reply.status == 200, await reply.text()
        return str((await reply.json())["operationId"])


async def test_a_restarted_simulator_goes_on_where_it_stopped(tmp_path: Path) -> None:
    """Tasks, groups, tokens, clock and counters are the same after a restart from --state."""
    state = tmp_path / "sim.json"
    async with aiohttp.ClientSession() as session:
        async with SimulatorServer(_config(state)) as first:
            async with session.post(
                first.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}
            ) as reply:
                token = (await reply.json())["accessToken"]
            operation = await _create(session, first, token)
            headers = {"app_key": APP_ID, "Authorization": f"Bearer {token}"}
            async with session.post(
                first.url + "/iocm/app/devgroup/v1.3.0/devGroups",
                json={"name": "pilot", "deviceIds": devices_of(first, count=2)},
                headers=headers,
            ) as reply:
                assert reply.status == 200
            truth = first.platform.truth()
            stats = first.platform.stats.as_dict()
            clock = first.clock.now()
        assert json.loads(state.read_text())["version"] == 1
        async with SimulatorServer(_config(state)) as second:
            assert second.restored
            assert second.platform.truth() == truth
            assert second.platform.stats.as_dict() == stats
            assert "pilot" in second.platform.fleet.groups
            assert second.clock.now() >= clock
            async with session.get(
                second.url + f"{UPGRADE}/operations/{operation}", headers=headers
            ) as reply:  # the token issued before the restart still works
                assert reply.status == 200
                assert (await reply.json())["targets"]["devices"] == truth[0]["devices"]


async def test_device_results_after_a_restart_are_the_ones_before(tmp_path: Path) -> None:
    """What happens to each device is the same whether or not the simulator restarted."""
    state = tmp_path / "sim.json"
    async with aiohttp.ClientSession() as session:
        async with SimulatorServer(_config(state)) as first:
            async with session.post(
                first.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}
            ) as reply:
                token = (await reply.json())["accessToken"]
            operations = [await _create(session, first, token) for _ in range(3)]
            first.platform.faults.update({"clock_offset_s": 3 * 86400})
            before = [first.platform.query_task(op)["staResult"] for op in operations]
        async with SimulatorServer(_config(state)) as second:
            second.platform.faults.update({"clock_offset_s": 3 * 86400})
            after = [second.platform.query_task(op)["staResult"] for op in operations]
    assert after == before and all(r["wait"] == 0 for r in after)


async def test_a_restarted_simulator_never_issues_an_operation_id_twice(tmp_path: Path) -> None:
    """Five restarts from one state file, and two fresh simulators of one seed: every
    operationId is new (the seeded generator used to repeat them after a restart)."""
    state = tmp_path / "sim.json"
    seen: list[str] = []
    async with aiohttp.ClientSession() as session:
        for config in [_config(state)] * 5:
            async with SimulatorServer(config) as server:
                async with session.post(
                    server.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}
                ) as reply:
                    token = (await reply.json())["accessToken"]
                seen.append(await _create(session, server, token))
        for _ in range(2):  # no state at all, the same seed
            async with SimulatorServer(SimulatorConfig(tls=False, devices=600, seed=7)) as fresh:
                async with session.post(
                    fresh.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}
                ) as reply:
                    token = (await reply.json())["accessToken"]
                seen.append(await _create(session, fresh, token))
    assert len(set(seen)) == len(seen) == 7


async def _login(session: aiohttp.ClientSession, server: SimulatorServer) -> str:
    async with session.post(server.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}) as reply:
        return str((await reply.json())["accessToken"])


async def test_a_task_answered_survives_a_process_that_dies_before_its_next_save(
    tmp_path: Path,
) -> None:
    """A create is on disk before it is answered: a simulator killed at once (no close, no
    autosave yet) comes back with the task and hands the next create a new operationId."""
    state = tmp_path / "sim.json"
    async with aiohttp.ClientSession() as session:
        first = SimulatorServer(_config(state, state_every=3600.0))
        await first.start()
        try:
            answered = await _create(session, first, await _login(session, first))
            # what a SIGKILL leaves on disk: read it while the first one never saved again
            async with SimulatorServer(_config(state, port=free_port())) as second:
                assert answered in second.platform.tasks_by_id
                following = await _create(session, second, await _login(session, second))
        finally:
            await first.close()
    assert following != answered


async def test_a_cancelled_close_still_saves_the_state(tmp_path: Path) -> None:
    """Ctrl-C cancels an embedded simulator's close mid-way: the state is saved all the same."""
    state = tmp_path / "sim.json"
    server = SimulatorServer(_config(state, state_every=3600.0))
    await server.start()
    server.platform.create_group(
        {"name": "pilot", "deviceIds": devices_of(server, count=2)}, APP_ID
    )
    server.platform.changes += 1
    with anyio.CancelScope() as scope:  # as the command's task group is, on Ctrl-C
        scope.cancel()
        await server.close()
    saved = json.loads(state.read_text())
    assert "pilot" in [g["name"] for g in saved["platform"]["groups"]]


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        (b"not json", "not a simulator state file"),
        (b'{"version": 99}', "not a simulator state file of version 1"),
        (
            b'{"version": 1, "fleet": {"devices": 5, "seed": 1, "app_id": "demo-app", '
            b'"failure_rate": null}}',
            "saved by a simulator of 5 devices, seed 1",
        ),
    ],
    ids=["not-json", "other-version", "other-fleet"],
)
def test_a_state_file_that_does_not_fit_is_one_line(
    tmp_path: Path, content: bytes, rule: str
) -> None:
    """A state file of another kind, version or fleet: exit 2, one line, nothing served."""
    state = tmp_path / "sim.json"
    state.write_bytes(content)
    result = CliRunner().invoke(
        main, ["simulator", "--no-tls", "--port", "0", "--devices", "600", "--state", str(state)]
    )
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1, err
    assert "--state" in err and rule in err and "Traceback" not in err


def test_a_state_file_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """A --state file in a folder that does not exist: exit 2, one line."""
    state = tmp_path / "missing" / "sim.json"
    result = CliRunner().invoke(
        main, ["simulator", "--no-tls", "--port", "0", "--state", str(state)]
    )
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1, err
    assert "--state: cannot write it" in err


# ---- an outage rehearsed ---------------------------------------------------------------------
def _plan(directory: Path, url: str, ids: list[str], outage_budget: float) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fleet.txt").write_text("\n".join(ids) + "\n")
    plan = directory / "plan.toml"
    plan.write_text(f"""
name = "outage"
[platform]
url = "{url}"
secret_env = "{SECRET_ENV}"
rate_limit = "6/1"
request_timeout = 2
[firmware]
version = "2.1.0"
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[fleet]
devices_file = "fleet.txt"
[execution]
settle = 0.3
outage_budget = {outage_budget:g}
[monitor]
follow = false
""")
    return plan


def _submitted(journal: Path) -> int:
    try:
        with sqlite3.connect(f"{journal.absolute().as_uri()}?mode=ro", uri=True) as db:
            row = db.execute("SELECT COUNT(*) FROM chunks WHERE state='submitted'").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0])


def _rollout(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, **{SECRET_ENV: SECRET})
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--log-level", "warning", *args],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(journal: Path, chunks: int) -> None:
    deadline = time.monotonic() + 60
    while _submitted(journal) < chunks:
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.05)


def test_the_simulator_stopped_mid_run_pauses_it_and_then_it_completes(tmp_path: Path) -> None:
    """The simulator (with --state) stops for 5 s mid-run and comes back: the run pauses,
    goes on, exits 0; every device is in exactly one task of the restarted platform."""
    state, port = tmp_path / "sim.json", free_port()
    args = ("--devices", "12000", "--seed", "4", "--rate-limit", "100/1", "--state", str(state))
    with simulator_process(tmp_path, *args, port=port) as (url, fleet):
        ids = [line.split(",")[0] for line in fleet.read_text().splitlines() if ",WM-200," in line]
        plan = _plan(tmp_path / "p", url, ids[:2560], outage_budget=600)
        run = _rollout("run", str(plan))
        _wait_for(tmp_path / "p" / ".rollout" / "outage.journal.sqlite", 2)
    time.sleep(5.0)  # the platform is down; the run waits
    assert run.poll() is None, run.stderr.read() if run.stderr else ""
    with simulator_process(tmp_path, *args, port=port) as (url, _):
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert "platform unreachable; pausing and trying again" in err
        assert "platform reachable again" in err
        truth = get_json(url + "/_sim/tasks")["tasks"]
    counts = device_sets(truth)
    assert set(counts) == set(ids[:2560]) and set(counts.values()) == {1}
    assert len({task["operationId"] for task in truth}) == len(truth) == 10


def test_the_simulator_down_longer_than_the_budget_stops_the_run_and_resume_finishes(
    tmp_path: Path,
) -> None:
    """Down longer than execution.outage_budget: exit 1 with "platform unreachable for";
    once the simulator is back (from --state), `resume` finishes: every device once."""
    state, port = tmp_path / "sim.json", free_port()
    args = ("--devices", "12000", "--seed", "4", "--rate-limit", "100/1", "--state", str(state))
    with simulator_process(tmp_path, *args, port=port) as (url, fleet):
        ids = [line.split(",")[0] for line in fleet.read_text().splitlines() if ",WM-200," in line]
        plan = _plan(tmp_path / "p", url, ids[:2560], outage_budget=2)
        run = _rollout("run", str(plan))
        _wait_for(tmp_path / "p" / ".rollout" / "outage.journal.sqlite", 2)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("platform:") and "platform unreachable for 2 s" in last, err
    assert "Traceback" not in err
    with simulator_process(tmp_path, *args, port=port) as (url, _):
        resume = _rollout("resume", str(plan))
        _, err = resume.communicate(timeout=120)
        assert resume.returncode == 0, err
        truth = get_json(url + "/_sim/tasks")["tasks"]
    counts = device_sets(truth)
    assert set(counts) == set(ids[:2560]) and set(counts.values()) == {1}
