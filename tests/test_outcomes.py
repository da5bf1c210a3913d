"""Outcomes an operator can trust: already current is its own outcome, success is verified
by the version the device reports, against the simulator in fast simulated time."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.engine import RunOptions, execute
from orchestrator.errors import RunHalted, RunWaiting
from orchestrator.loaded_plan import load_plan
from orchestrator.northbound import Status
from orchestrator.outcomes import Outcome, classify
from orchestrator.report import collect, render_to_string
from orchestrator.simulator import FaultConfig, SimulatorConfig, SimulatorServer
from orchestrator.simulator.tasks import DETAIL_SAME_VERSION
from orchestrator.status import read_status

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, device_sets, write_plan
from .simhelpers import devices_of

PLANS = Path(__file__).parent.parent / "plans"
FAST_MONITOR = "follow = true\npoll_interval = 0.1\nmax_poll_interval = 0.3"


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _demo_sim(**config: object) -> SimulatorServer:
    """The demo's simulated platform (24 000 devices, seed 1), with time and rate sped up."""
    return SimulatorServer(
        SimulatorConfig(
            tls=False, devices=24000, seed=1, speed=36000, rate_limit=(5000, 1.0), **config
        )
    )


@pytest.mark.parametrize(
    ("status", "detail", "version", "started", "outcome"),
    [
        (Status.SUCCEEDED, "Upgrade succeeded.", "2.1.0", True, Outcome.UPGRADED),
        (Status.SUCCEEDED, "Upgrade succeeded.", None, True, Outcome.UPGRADED),
        (Status.SUCCEEDED, "Upgrade succeeded.", "1.8.0", True, Outcome.VERSION_MISMATCH),
        (Status.FAILED, DETAIL_SAME_VERSION, "2.1.0", True, Outcome.ALREADY_CURRENT),
        (Status.FAILED, DETAIL_SAME_VERSION.upper(), None, True, Outcome.ALREADY_CURRENT),
        (Status.FAILED, DETAIL_SAME_VERSION, "1.8.0", True, Outcome.FAILED),  # contradiction
        (Status.FAILED, "Device did not come online.", "2.1.0", False, Outcome.ALREADY_CURRENT),
        (Status.FAILED, "Package verification failed.", "2.1.0", True, Outcome.FAILED),
        (Status.FAILED, "Package verification failed.", "1.8.0", True, Outcome.FAILED),
        (Status.FAILED, "Device did not come online.", "1.8.0", False, Outcome.TIMED_OUT),
        (Status.STOPPED, "", None, False, Outcome.STOPPED),
        (Status.PROCESSING, "", "1.8.0", True, Outcome.IN_PROGRESS),
    ],
)
def test_classify_tells_each_outcome_from_the_subtask(
    status: Status, detail: str, version: str | None, started: bool, outcome: Outcome
) -> None:
    """A subtask's status, detail, reported version and start decide its outcome."""
    assert classify(status, detail, version, started, "2.1.0") is outcome


def _current_ids(sim: SimulatorServer, model: str = "WM-200") -> list[str]:
    newest = {
        "WM-200": "2.1.0",
    }[model]
    return [
        d.device_id
        for d in sim.fleet.devices.values()
        if d.model.model == model and d.version == newest
    ]


async def test_already_current_devices_do_not_fail_a_canary(tmp_path: Path) -> None:
    """A canary half made of devices already on the target passes a 20 % max_failed gate:
    they are neither failed nor upgraded."""
    async with _demo_sim() as sim:
        current = _current_ids(sim)[:100]
        others = [d for d in devices_of(sim, "WM-200", 600) if d not in set(current)][:400]
        waves = """
[[waves]]
name = "canary"
count = 200
[waves.gate]
min_finished = 0.9
max_failed = 0.2
min_sample = 50
[[waves]]
name = "rest"
"""
        plan = write_plan(
            tmp_path, sim, current + others, monitor=FAST_MONITOR, waves=waves, settle=0
        )
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
    status = read_status(journal, "test-plan")
    canary = status["waves"][0]
    assert canary["gate"] == "passed"
    assert canary["already_current"] == 100
    assert canary["failed"] < 20
    assert canary["succeeded"] + canary["failed"] + canary["already_current"] == 200
    assert status["devices_already_current"] == 100
    rows = {row.device_id: row for row in collect(journal, "test-plan").devices()}
    assert {d for d, row in rows.items() if row.outcome == "already-current"} == set(current)
    assert not any(rows[d].upgraded for d in current)


def _demo_plan(directory: Path, sim: SimulatorServer, extra_fleet: str = "") -> Path:
    """plans/demo.toml and its fleet, pointed at `sim` with fast polls and a lifted limit."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(PLANS / "demo-fleet.csv", directory / "demo-fleet.csv")
    text = (PLANS / "demo.toml").read_text()
    text = text.replace('url = "simulator"', f'url = "{sim.url}"\nsecret_env = "{SECRET_ENV}"')
    text = text.replace('rate_limit = "100/60"', 'rate_limit = "5000/1"\nrequest_timeout = 2')
    text = text.replace("poll_interval = 4", "poll_interval = 0.1")
    text = text.replace("max_poll_interval = 15", "max_poll_interval = 0.3")
    text = text.replace("concurrency = 4", "concurrency = 4\nsettle = 0")
    text = text.replace(
        'devices_file = "demo-fleet.csv"', f'devices_file = "demo-fleet.csv"\n{extra_fleet}'
    )
    path = directory / "demo.toml"
    path.write_text(text)
    return path


def _demo_versions() -> dict[str, str]:
    with (PLANS / "demo-fleet.csv").open() as handle:
        return {row["deviceId"]: row["firmwareVersion"] for row in csv.DictReader(handle)}


async def test_demo_fleet_reports_already_current_and_a_new_run_passes(tmp_path: Path) -> None:
    """The demo's 130 meters on 2.1.0 are reported already current, not failed (in the
    summary and the task table alike); every gate judges real outcomes; --new-run after the
    clean run sends nothing and passes its gates."""
    versions = _demo_versions()
    current = {d for d, v in versions.items() if v == "2.1.0"}
    assert len(current) == 130
    async with _demo_sim() as sim:
        plan = _demo_plan(tmp_path, sim)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        status = read_status(journal, "demo-wm200-2-1-0")
        assert status["status"] == "completed"
        assert [w["gate"] for w in status["waves"]] == ["passed", "passed", "none"]
        assert status["devices_already_current"] == 130
        data = collect(journal, "demo-wm200-2-1-0")
        rows = list(data.devices())
        assert {r.device_id for r in rows if r.outcome == "already-current"} == current
        failed = {r.device_id for r in rows if r.outcome in ("failed", "timed-out")}
        assert not failed & current
        assert status["devices_failed"] == len(failed) == data.totals["failed"]
        assert status["devices_succeeded"] + len(failed) + 130 == len(versions)
        assert data.totals["already_current"] == 130
        # the task table counts in the summary's classes: its failed leave the current out
        by_task = {k: sum(t[k] for t in data.tasks) for k in ("failed", "already_current")}
        assert by_task == {"failed": data.totals["failed"], "already_current": 130}
        assert sum(t["upgraded"] for t in data.tasks) == data.totals["upgraded"]
        assert all(reason != DETAIL_SAME_VERSION for reason, _ in data.failure_reasons)
        with sqlite3.connect(journal) as db:
            canary = {
                d
                for (members,) in db.execute("SELECT members FROM chunks WHERE wave=0")
                for d in members.split("\n")
            }
        assert status["waves"][0]["already_current"] == len(canary & current)
        assert status["waves"][0]["succeeded"] + status["waves"][0]["failed"] == 256 - len(
            canary & current
        )

        created = sim.platform.stats.tasks_created
        await execute(load_plan(plan), RunOptions(journal=journal, new_run=True))
        again = read_status(journal, "demo-wm200-2-1-0")
        assert sim.platform.stats.tasks_created == created  # nothing was sent again
        assert again["run_id"] == status["run_id"] + 1
        assert [w["gate"] for w in again["waves"]] == ["passed", "passed", "none"]
        assert again["targets_in_tasks_by"] == {"census": len(versions)}
        assert again["devices_already_current"] == 130
        counts = device_sets(sim.platform.truth())
    assert set(counts) == set(versions) and set(counts.values()) == {1}


async def test_version_column_leaves_already_current_devices_out(tmp_path: Path) -> None:
    """With fleet.version_column the demo's 130 meters on 2.1.0 are never sent, `rollout
    plan` counts them, and status and reports list them as already current."""
    versions = _demo_versions()
    async with _demo_sim() as sim:
        plan = _demo_plan(tmp_path, sim, 'version_column = "firmwareVersion"')
        preview = CliRunner().invoke(main, ["plan", str(plan), "--json"])
        assert preview.exit_code == 0, preview.output
        shown = json.loads(preview.stdout)
        assert shown["left_out_already_current"] == 130
        assert shown["targets"] == len(versions) - 130
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        sent = device_sets(sim.platform.truth())
    current = {d for d, v in versions.items() if v == "2.1.0"}
    assert set(sent) == set(versions) - current
    status = read_status(journal, "demo-wm200-2-1-0")
    assert status["devices_already_current"] == 130
    assert status["devices_left_out_already_current"] == 130
    rows = list(
        csv.DictReader(io.StringIO(render_to_string(collect(journal, status["plan"]), "csv")))
    )
    left_out = {r["device_id"] for r in rows if r["outcome"] == "already-current"}
    assert left_out == current
    assert len(rows) == len(versions)


async def test_success_counts_only_with_the_package_version(tmp_path: Path) -> None:
    """A subtask that succeeded but reports the old version (the device rolled back) is not
    upgraded: every finished device's version is checked, within ⌈n/100⌉ calls per task."""
    config = SimulatorConfig(
        tls=False,
        devices=4000,
        seed=9,
        speed=36000,
        rate_limit=(5000, 1.0),
        failure_rate=0.0,
        faults=FaultConfig(rollback_rate=0.1),
    )
    async with SimulatorServer(config) as sim:
        devices = devices_of(sim, "WM-200", 600)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        rolled_back = {
            sub["deviceId"]
            for task in sim.platform.truth()
            for sub in sim.platform.sub_operations(task["operationId"], "success")
            if sub["extendInfo"]["fileVersion"] != "2.1.0"
        }
        pages = sum(-(-len(t.device_ids) // 100) for t in sim.platform.tasks)
    assert 30 < len(rolled_back) < 90
    status = read_status(journal, "test-plan")
    assert status["devices_succeeded"] == 600 - len(rolled_back)
    assert status["devices_version_verified"] == 600 - len(rolled_back)
    assert status["devices_failed"] == len(rolled_back)
    assert status["calls"]["subOperations"] == pages
    rows = {row.device_id: row for row in collect(journal, "test-plan").devices()}
    mismatched = {d for d, row in rows.items() if row.outcome == "version-mismatch"}
    assert mismatched == rolled_back
    assert all(rows[d].subtask_status == "succeeded" and not rows[d].upgraded for d in mismatched)
    assert all(
        row.upgraded and row.version == "2.1.0" for d, row in rows.items() if d not in mismatched
    )


ROLLBACK_CANARY = """
[[waves]]
name = "canary"
count = 256
[waves.gate]
min_finished = 0.5
max_failed = 0.1
min_sample = 50
[[waves]]
name = "rest"
"""


async def test_gate_never_passes_on_successes_not_version_checked(tmp_path: Path) -> None:
    """A canary whose tasks still run does not pass on counted successes: their versions are
    read first, so 30 % rolled back devices fail the gate before the canary's task is final."""
    config = SimulatorConfig(
        tls=False,
        devices=4000,
        seed=9,
        speed=300,  # the canary's devices finish over ~5 s: the gate judges a running task
        rate_limit=(5000, 1.0),
        failure_rate=0.0,
        faults=FaultConfig(rollback_rate=0.3),
    )
    async with SimulatorServer(config) as sim:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", 400),
            monitor="follow = true\npoll_interval = 0.1\nmax_poll_interval = 0.2",
            waves=ROLLBACK_CANARY,
        )
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted, match="canary' failed its gate"):
            await execute(load_plan(plan), RunOptions(journal=journal))
        assert sim.platform.stats.tasks_created == 1  # nothing of the next wave
    with sqlite3.connect(journal) as db:
        final, fetched = db.execute("SELECT final, details_fetched FROM tasks").fetchone()
        finished, failed = db.execute(
            "SELECT gate_finished, gate_failed FROM waves WHERE name='canary'"
        ).fetchone()
    assert (final, fetched) == (0, 0)  # judged on success pages read while it ran
    assert read_status(journal, "test-plan")["waves"][0]["gate"] == "failed"
    assert finished >= 50 and failed > 0.1 * finished


async def test_status_counts_no_success_as_upgraded_before_its_version_is_read(
    tmp_path: Path,
) -> None:
    """While a canary's task runs and its gate waits, successes the task counts are not
    upgraded in `status` (their versions are unread): upgraded only once the task is read."""
    config = SimulatorConfig(
        tls=False, devices=4000, seed=9, speed=300, rate_limit=(5000, 1.0), failure_rate=0.0
    )
    waves = ROLLBACK_CANARY.replace("min_finished = 0.5", "min_finished = 0.95")
    async with SimulatorServer(config) as sim:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", 400),
            monitor="follow = true\npoll_interval = 0.1\nmax_poll_interval = 0.2",
            waves=waves,
        )
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunWaiting):  # creates the canary's task
            await execute(load_plan(plan), RunOptions(journal=journal, step=True))
        await asyncio.sleep(2.5)  # 750 simulated s: the first meters have upgraded
        with pytest.raises(RunWaiting, match="gate waits"):
            await execute(load_plan(plan), RunOptions(journal=journal, step=True))
    with sqlite3.connect(journal) as db:
        counted, final = db.execute("SELECT succeeded, final FROM tasks").fetchone()
    assert counted > 0 and not final
    assert read_status(journal, "test-plan")["waves"][0]["succeeded"] == 0
