"""A custom-window plan whose start passes while its run is interrupted: every reading
command and `resume` go on; nothing is sent twice and the platform refuses nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.simulator import SimulatorConfig, SimulatorServer

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, device_sets, plan_text
from .simhelpers import LoopThread


@pytest.fixture
def platform() -> Iterator[tuple[LoopThread, SimulatorServer]]:
    """A simulator in real time whose devices all upgrade (no offline ones), on a thread."""
    loop = LoopThread()
    sim = SimulatorServer(
        SimulatorConfig(tls=False, devices=12000, seed=21, rate_limit=(1000, 1.0), failure_rate=0)
    )
    loop.run(sim.start())
    yield loop, sim
    loop.run(sim.close())
    loop.close()


def _submitted(journal: Path) -> int:
    try:
        with sqlite3.connect(f"{journal.absolute().as_uri()}?mode=ro", uri=True) as db:
            row = db.execute("SELECT COUNT(*) FROM chunks WHERE state='submitted'").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0])


def test_a_start_that_passed_while_interrupted_blocks_no_command(
    platform: tuple[LoopThread, SimulatorServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted, then the platform's clock passes the start: status, report, watch and
    resume all work, the resumed creates start after the platform's now, 0 duplicates."""
    _, sim = platform
    monkeypatch.setenv(SECRET_ENV, SECRET)
    ids = [d for d, dev in sim.fleet.devices.items() if dev.model.model == "WM-200"][:2560]
    (tmp_path / "fleet.txt").write_text("\n".join(ids) + "\n")
    start = datetime.now(UTC) + timedelta(minutes=3)
    policy = (
        f'execute_type = "custom"\nstart = {start:%Y-%m-%dT%H:%M:%SZ}\n'
        f"end = {start + timedelta(days=1):%Y-%m-%dT%H:%M:%SZ}"
    )
    plan = tmp_path / "plan.toml"
    text = plan_text(sim, policy=policy, monitor="follow = false\npoll_interval = 0.1")
    plan.write_text(text.replace('rate_limit = "1000/1"', 'rate_limit = "4/1"'))
    journal = tmp_path / ".rollout" / "test-plan.journal.sqlite"

    run = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--log-level", "error", "run", str(plan)],
        env=dict(os.environ),
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while _submitted(journal) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    first = len(sim.platform.tasks)
    assert 2 <= first < 10

    # the start passes on the platform's clock (and the first tasks finish meanwhile)
    sim.platform.faults.update({"clock_offset_s": 6 * 3600.0})
    runner = CliRunner()
    status = runner.invoke(main, ["status", "--json", str(plan)])
    assert status.exit_code == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "interrupted"
    report = runner.invoke(main, ["report", str(plan), "--format", "json"])
    assert report.exit_code == 0, report.stderr
    assert len(json.loads(report.stdout)["devices"]) == 2560
    watched = runner.invoke(main, ["watch", str(plan)])
    assert watched.exit_code == 0, watched.stderr
    assert (
        json.loads(runner.invoke(main, ["status", "--json", str(plan)]).stdout)["devices_succeeded"]
        == 256 * first
    )
    plan.write_text(plan.read_text().replace('rate_limit = "4/1"', 'rate_limit = "1000/1"'))
    resumed = runner.invoke(main, ["resume", str(plan)])
    assert resumed.exit_code == 0, resumed.stderr

    counts = device_sets(sim.platform.truth())
    assert set(counts) == set(ids) and set(counts.values()) == {1}
    assert set(sim.platform.stats.replies) == {"200"}  # no 123033, no refusal at all
    for task in sim.platform.tasks[first:]:  # moved forward, on the platform's clock
        sent = datetime.strptime(task.policy["startTime"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        assert sent.timestamp() >= task.create_time
