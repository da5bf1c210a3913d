"""`rollout retry`: a new pass for the devices whose latest outcome failed — journaled,
exactly once per pass, census-aware, judged by the plan's last gate."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.engine import RunOptions, execute
from orchestrator.errors import RunAborted, RunHalted, RunWaiting
from orchestrator.journal import unfinished_pass
from orchestrator.loaded_plan import load_plan
from orchestrator.passes import RETRY_CHOICES, RetryOptions, retry
from orchestrator.report import collect, render_to_string
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.status import read_status

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, device_sets, write_plan
from .simhelpers import devices_of, newest_package

FAST_MONITOR = "follow = true\npoll_interval = 0.05\nmax_poll_interval = 0.2"


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _sim(failure_rate: float = 0.1) -> SimulatorServer:
    return SimulatorServer(
        SimulatorConfig(
            tls=False,
            devices=5000,
            seed=21,
            speed=36000,
            rate_limit=(5000, 1.0),
            failure_rate=failure_rate,
        )
    )


def _final_status(sim: SimulatorServer) -> dict[str, list[str]]:
    """device → the final subtask status of each task holding it, oldest task first."""
    now = sim.platform.now()
    found: dict[str, list[str]] = {}
    for task in sim.platform.tasks:
        for life in task.lives or []:
            found.setdefault(life.device_id, []).append(life.status_at(now))
    return found


async def test_retry_after_ten_percent_failed_sends_those_devices_once_more(
    tmp_path: Path,
) -> None:
    """After a run with ~10 % failed devices, `retry` makes one new pass: exactly those
    devices are in one more task; every report row shows both passes and the final outcome."""
    async with _sim() as sim:
        devices = devices_of(sim, "WM-200", 1000)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR, settle=0)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        first = _final_status(sim)
        failed = {d for d, statuses in first.items() if statuses == ["fail"]}
        assert 60 < len(failed) < 140
        assert read_status(journal, "test-plan")["devices_failed"] == len(failed)
        tasks_before = len(sim.platform.tasks)

        result = await retry(load_plan(plan), RetryOptions(journal=journal))
        assert (result.pass_no, result.targets) == (2, len(failed))
        counts = device_sets(sim.platform.truth())
        assert {d for d, n in counts.items() if n == 2} == failed
        assert {d for d, n in counts.items() if n == 1} == set(devices) - failed
        assert len(sim.platform.tasks) == tasks_before + -(-len(failed) // 256)
        second = _final_status(sim)

    status = read_status(journal, "test-plan")
    (retry_pass,) = status["passes"]
    assert (retry_pass["pass"], retry_pass["targets"], retry_pass["pass_status"]) == (
        2,
        len(failed),
        "completed",
    )
    still_failed = {d for d in failed if second[d][-1] == "fail"}
    assert retry_pass["failed"] == len(still_failed) and retry_pass["gate"] == "passed"
    assert status["devices_failed"] == len(still_failed)
    assert status["devices_succeeded"] == len(devices) - len(still_failed)
    assert status["targets_in_tasks"] == len(devices)  # each device counted once

    data = collect(journal, "test-plan")
    rows = list(csv.DictReader(io.StringIO(render_to_string(data, "csv"))))
    assert sorted(r["device_id"] for r in rows) == sorted(devices)  # once each
    by_id = {r["device_id"]: r for r in rows}
    for device in devices:
        row = by_id[device]
        if device in failed:
            final = "failed" if device in still_failed else "upgraded"
            assert (row["passes"], row["pass_outcomes"]) == ("2", f"1:failed 2:{final}")
            assert row["outcome"] == final and row["chunk"].startswith("p02-")
        else:
            assert (row["passes"], row["pass_outcomes"], row["outcome"]) == (
                "1",
                "1:upgraded",
                "upgraded",
            )
    assert data.passes[0]["targets"] == len(failed)
    assert data.passes[0]["failed"] == len(still_failed)
    assert json.loads(render_to_string(data, "json"))["passes"][0]["pass"] == 2
    assert 'id="passes"' in render_to_string(data, "html")


async def test_a_second_retry_takes_the_latest_failures_only(tmp_path: Path) -> None:
    """A retry after a finished pass retries only the devices that failed again in it; with
    no device left in the chosen states it makes no pass."""
    async with _sim(failure_rate=0.3) as sim:
        devices = devices_of(sim, "WM-200", 600)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR, settle=0)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        await retry(load_plan(plan), RetryOptions(journal=journal))
        again = {d for d, s in _final_status(sim).items() if s[-1] == "fail" and len(s) == 2}
        third = await retry(load_plan(plan), RetryOptions(journal=journal))
        assert (third.pass_no, third.targets) == (3, len(again))
        counts = device_sets(sim.platform.truth())
        assert {d for d, n in counts.items() if n == 3} == again
        stopped_only = RetryOptions(journal=journal, states=RETRY_CHOICES["stop"])
        nothing = await retry(load_plan(plan), stopped_only)
        assert nothing.pass_no is None
    assert [p["pass"] for p in read_status(journal, "test-plan")["passes"]] == [2, 3]


async def test_an_interrupted_pass_is_finished_without_sending_twice(tmp_path: Path) -> None:
    """A pass whose last create's outcome was lost is finished by the next `retry` (which
    `rollout resume` runs): its census adopts the pass's own task — no second create, no new
    pass; `run` does not mistake the pass's chunks for the run's."""
    async with _sim() as sim:
        devices = devices_of(sim, "WM-200", 800)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR, settle=0)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        await retry(load_plan(plan), RetryOptions(journal=journal))
        creates = sim.platform.stats.calls["createTask"]
        truth = device_sets(sim.platform.truth())
        with sqlite3.connect(journal) as db:  # forge a crash inside the pass's last create
            db.execute("UPDATE passes SET status='interrupted'")
            db.execute(
                "UPDATE chunks SET state='intent', operation_id=NULL WHERE chunk_id='p02-000000'"
            )
            db.execute("UPDATE attempts SET outcome=NULL WHERE chunk_id='p02-000000'")
        assert unfinished_pass(journal, "test-plan") == 2  # `rollout resume` retries
        with pytest.raises(RunAborted, match="retry pass 2 of run 1 is interrupted"):
            await execute(load_plan(plan), RunOptions(journal=journal))
        finished = await retry(load_plan(plan), RetryOptions(journal=journal))
        assert finished.pass_no == 2
        assert unfinished_pass(journal, "test-plan") is None
        assert sim.platform.stats.calls["createTask"] == creates
        assert device_sets(sim.platform.truth()) == truth
    status = read_status(journal, "test-plan")
    assert [(p["pass"], p["pass_status"]) for p in status["passes"]] == [(2, "completed")]


async def test_new_run_after_a_retry_pass_reports_no_duplicates(tmp_path: Path) -> None:
    """Devices a retry pass sent again are not duplicates: --new-run adopts everything and
    exits cleanly."""
    async with _sim() as sim:
        devices = devices_of(sim, "WM-200", 600)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR, settle=0)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        await retry(load_plan(plan), RetryOptions(journal=journal))
        creates = sim.platform.stats.calls["createTask"]
        await execute(load_plan(plan), RunOptions(journal=journal, new_run=True))
        assert sim.platform.stats.calls["createTask"] == creates
    status = read_status(journal, "test-plan")
    assert status["duplicates"] == 0 and status["status"] == "completed"


async def test_new_run_after_a_retry_pass_takes_each_devices_newest_task(tmp_path: Path) -> None:
    """A --new-run after a retry pass adopts each device's newest task of the package: its
    outcome is the pass's, and `retry` of the new run sends only what failed there again."""
    async with _sim(failure_rate=0.3) as sim:
        devices = devices_of(sim, "WM-200", 600)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR, settle=0)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        await retry(load_plan(plan), RetryOptions(journal=journal))
        newest = {d: statuses[-1] for d, statuses in _final_status(sim).items()}
        retried = {d for d, statuses in _final_status(sim).items() if len(statuses) == 2}
        assert any(newest[d] == "success" for d in retried)  # upgraded by the pass
        await execute(load_plan(plan), RunOptions(journal=journal, new_run=True))
        rows = {row.device_id: row for row in collect(journal, "test-plan").devices()}
        assert {d for d, row in rows.items() if row.upgraded} == {
            d for d in devices if newest[d] == "success"
        }
        before = device_sets(sim.platform.truth())
        result = await retry(load_plan(plan), RetryOptions(journal=journal))
        again = {d for d, n in device_sets(sim.platform.truth()).items() if n > before.get(d, 0)}
    assert result.targets == len(again)
    assert again == {d for d in devices if newest[d] == "fail"}


STRICT_CANARY = """
[[waves]]
name = "canary"
count = 256
[waves.gate]
min_finished = 0.9
max_failed = 0.1
min_sample = 50
[[waves]]
name = "rest"
"""


async def test_new_run_after_a_retry_pass_judges_its_gates_on_the_newest_tasks(
    tmp_path: Path,
) -> None:
    """After retry passes upgraded most of the canary's failed meters, a --new-run's canary
    gate (and `status`) counts each device once, by its newest task: it passes where the
    first task's failures alone would fail it, and nothing is sent."""
    async with _sim(failure_rate=0.25) as sim:
        devices = devices_of(sim, "WM-200", 600)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR, settle=0)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        await retry(load_plan(plan), RetryOptions(journal=journal))
        await retry(load_plan(plan), RetryOptions(journal=journal))
        newest = {d: statuses[-1] for d, statuses in _final_status(sim).items()}
        canary_failed = sum(newest[d] == "fail" for d in devices[:256])
        assert (
            canary_failed
            < 0.1 * 256
            < sum(_final_status(sim)[d][0] == "fail" for d in devices[:256])
        )
        plan.write_text(plan.read_text() + STRICT_CANARY)
        creates = sim.platform.stats.calls["createTask"]
        await execute(load_plan(plan), RunOptions(journal=journal, new_run=True))
        assert sim.platform.stats.calls["createTask"] == creates
    with sqlite3.connect(journal) as db:
        gate, finished, failed = db.execute(
            "SELECT gate_state, gate_finished, gate_failed FROM waves WHERE run_id=2 AND wave=0"
        ).fetchone()
    assert (gate, finished, failed) == ("passed", 256, canary_failed)
    canary = read_status(journal, "test-plan")["waves"][0]  # status counts as the gate does
    assert (canary["succeeded"], canary["failed"]) == (256 - canary_failed, canary_failed)


async def test_retry_waits_for_a_finished_run_and_is_judged_by_the_last_gate(
    tmp_path: Path,
) -> None:
    """`retry` refuses a run whose tasks are not all read; a pass failing the plan's last
    gate (the gate of the wave before the last) halts with exit 4's error, and is over: the
    next `retry` makes a new pass."""
    waves = """
[[waves]]
name = "canary"
count = 100
[waves.gate]
min_finished = 0.5
max_failed = 0.9
min_sample = 20
[[waves]]
name = "rest"
"""
    async with _sim(failure_rate=0.5) as sim:
        devices = devices_of(sim, "WM-200", 500)
        no_follow = "follow = false\npoll_interval = 0.05\nmax_poll_interval = 0.2"
        plan = write_plan(tmp_path, sim, devices, monitor=no_follow, waves=waves, settle=0)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal, follow=False))
        with pytest.raises(RunAborted, match="rollout watch PLAN"):
            await retry(load_plan(plan), RetryOptions(journal=journal))
        await execute(load_plan(plan), RunOptions(journal=journal, follow=True))
        strict = plan.read_text().replace("max_failed = 0.9", "max_failed = 0.1")
        plan.write_text(strict)  # a gate is not pinned: the pass is judged by the new one
        with pytest.raises(RunHalted, match="retry pass 2 failed the plan's last gate"):
            await retry(load_plan(plan), RetryOptions(journal=journal, follow=True))
        assert unfinished_pass(journal, "test-plan") is None  # halted: over, not resumed
        with pytest.raises(RunHalted, match="retry pass 3 failed"):  # a new, deliberate pass
            await retry(load_plan(plan), RetryOptions(journal=journal, follow=True))
    status = read_status(journal, "test-plan")
    assert [p["pass"] for p in status["passes"]] == [2, 3]
    assert status["passes"][0]["gate"] == "failed"
    assert status["passes"][0]["pass_status"] == "halted"


STRICT_LAST_GATE = """
[[waves]]
name = "canary"
count = 100
[waves.gate]
min_finished = 0.5
max_failed = 0.9
min_sample = 20
[[waves]]
name = "rest"
"""


async def test_status_and_reports_count_each_wave_alike_after_retry_passes(
    tmp_path: Path,
) -> None:
    """After two retry passes, `rollout status` and the report give every plan wave the same
    counts: each device once, by its final outcome, in its own wave — as its report row says."""
    async with _sim(failure_rate=0.3) as sim:
        devices = devices_of(sim, "WM-200", 600)
        plan = write_plan(
            tmp_path, sim, devices, monitor=FAST_MONITOR, waves=STRICT_LAST_GATE, settle=0
        )
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        for _ in range(2):
            await retry(load_plan(plan), RetryOptions(journal=journal))
    status = read_status(journal, "test-plan")
    data = collect(journal, "test-plan")
    assert [p["pass"] for p in status["passes"]] == [2, 3]
    truth: dict[str, dict[str, int]] = {}
    for row in data.devices():
        bucket = {"upgraded": "upgraded", "already-current": "already_current"}
        column = bucket.get(row.outcome, "failed")
        wave = truth.setdefault(row.wave, {"upgraded": 0, "failed": 0, "already_current": 0})
        wave[column] += 1
    assert sum(w["failed"] for w in truth.values()) > 0
    in_status = {
        w["name"]: {
            "upgraded": w["succeeded"],
            "failed": w["failed"],
            "already_current": w["already_current"],
        }
        for w in status["waves"]
    }
    in_report = {
        w["wave"]: {k: w[k] for k in ("upgraded", "failed", "already_current")} for w in data.waves
    }
    assert in_status == in_report == truth
    assert (
        status["devices_failed"]
        == data.totals["failed"]
        == sum(w["failed"] for w in truth.values())
    )


async def _rollout(args: list[str]) -> tuple[int, str]:
    """`rollout ARGS` in a child process (the simulator keeps serving here): exit code,
    stderr."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        *args,
        env=dict(os.environ, **{SECRET_ENV: SECRET}),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await child.communicate()
    assert child.returncode is not None
    return child.returncode, err.decode()


@pytest.mark.parametrize("later", ["watch", "resume", "resume --step", "retry"])
async def test_a_pass_submitted_without_following_is_judged_when_followed_later(
    tmp_path: Path, later: str
) -> None:
    """`retry --no-follow` leaves its pass to be judged: a later watch, resume, step or retry
    follows its tasks and halts it (exit 4) on the plan's last gate — never a pass let by."""
    async with _sim(failure_rate=0.5) as sim:
        devices = devices_of(sim, "WM-200", 400)
        plan = write_plan(
            tmp_path, sim, devices, monitor=FAST_MONITOR, waves=STRICT_LAST_GATE, settle=0
        )
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        plan.write_text(plan.read_text().replace("max_failed = 0.9", "max_failed = 0.1"))
        result = await retry(load_plan(plan), RetryOptions(journal=journal, follow=False))
        assert result.pass_no == 2
        tasks = len(sim.platform.tasks)
        (submitted,) = read_status(journal, "test-plan")["passes"]
        assert (submitted["pass_status"], submitted["gate"]) == ("submitted", "pending")
        assert unfinished_pass(journal, "test-plan") == 2  # not over: still to be judged
        args = [*later.split()[:1], str(plan), "--journal", str(journal), *later.split()[1:]]
        for _ in range(50):  # steps until the tasks are final
            code, err = await _rollout(args)
            if code != 75:
                break
            await asyncio.sleep(0.1)
        assert code == 4, err
        assert "retry pass 2 failed the plan's last gate" in err
        assert len(sim.platform.tasks) == tasks  # judged, nothing sent again
    (judged,) = read_status(journal, "test-plan")["passes"]
    assert (judged["pass_status"], judged["gate"]) == ("halted", "failed")
    assert unfinished_pass(journal, "test-plan") is None


async def test_retry_step_exits_75_until_a_later_step_judges_the_pass(tmp_path: Path) -> None:
    """`rollout retry --step` creates the pass's tasks and exits 75 (they need time); later
    steps poll once each and finish the pass, judged — no sleep in any step."""
    async with _sim() as sim:
        devices = devices_of(sim, "WM-200", 600)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR, settle=0)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        code, err = await _rollout(["retry", str(plan), "--journal", str(journal), "--step"])
        assert code == 75, err
        assert "tasks were just created" in err
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)

        for _ in range(80):
            try:
                done = await retry(
                    load_plan(plan), RetryOptions(journal=journal, step=True), sleep=sleep
                )
                break
            except RunWaiting:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the pass did not finish in 80 steps")
        assert slept == [] and done.pass_no == 2
        (judged,) = read_status(journal, "test-plan")["passes"]
        assert judged["pass_status"] == "completed"


def test_retry_states_option_is_checked(tmp_path: Path) -> None:
    """An unknown --states name is bad input (exit 2), before anything is read or sent."""
    result = CliRunner().invoke(
        main, ["retry", str(tmp_path / "plan.toml"), "--states", "fail,lost"]
    )
    assert result.exit_code == 2
    assert "not lost" in result.output


async def test_retry_of_a_group_fleet_sends_devices_and_settles_by_them(tmp_path: Path) -> None:
    """A group fleet's retry pass targets the failed devices themselves; its ambiguous create
    (committed, answered 500) is found by those devices and adopted, not sent twice."""
    async with _sim(failure_rate=0.2) as sim:
        package = newest_package(sim)
        plan = tmp_path / "plan.toml"
        plan.write_text(f"""
name = "groups"
[platform]
url = "{sim.url}"
secret_env = "{SECRET_ENV}"
rate_limit = "5000/1"
request_timeout = 1
[firmware]
file_id = "{package.file_id}"
[fleet]
groups = ["north", "south"]
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[execution]
settle = 0.2
[monitor]
{FAST_MONITOR}
""")
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        failed = {d for d, s in _final_status(sim).items() if s == ["fail"]}
        sim.platform.faults.update({"create_ambiguous_rate": 1.0, "ambiguous_kinds": ["500"]})
        result = await retry(load_plan(plan), RetryOptions(journal=journal))
        assert result.targets == len(failed) > 0
        truth = sim.platform.truth()
        assert truth[-1]["devices"] == sorted(failed, key=truth[-1]["devices"].index)
        assert "deviceGroups" not in truth[-1]
        counts = device_sets(truth)
        assert {d for d, n in counts.items() if n == 2} == failed
    status = read_status(journal, "groups")
    assert status["duplicates"] == 0 and status["passes"][0]["pass_status"] == "completed"
