"""Crash safety: SIGKILL `rollout run` at 20+ seeded random moments, resume each time.

The simulator runs in its own process (it must outlive the rollout processes) and makes 10 %
of creates ambiguous (500 after commit, dropped connection, reply past the client timeout).
At the end the simulator's ground truth must hold every device exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.simulator.testing import get_json as _get
from orchestrator.simulator.testing import simulator_process

from .enginehelpers import SECRET_ENV

KILLS = 20
DEVICES = 12800  # 50 chunks
RATE = "3/1"


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with simulator_process(
        tmp_path,
        "--devices",
        "54000",
        "--seed",
        "3",
        "--rate-limit",
        RATE,
        "--create-ambiguous-rate",
        "0.1",
        "--ambiguous-delay",
        "1.5",
        "--fault-seed",
        "7",
    ) as started:
        yield started


def _has_run(journal: Path) -> bool:
    if not journal.exists():
        return False
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] > 0
        except sqlite3.OperationalError:
            return False


def test_sigkill_at_random_moments_then_resume(
    sim_process: tuple[str, Path], tmp_path: Path
) -> None:
    """After 20 SIGKILLs and resumes, with 10 % ambiguous creates: 0 duplicates, 0 missing."""
    url, sim_fleet = sim_process
    ids = [
        line.split(",")[0] for line in sim_fleet.read_text().splitlines()[1:] if ",WM-200," in line
    ][:DEVICES]
    assert len(ids) == DEVICES
    (tmp_path / "fleet.txt").write_text("\n".join(ids) + "\n")
    plan = tmp_path / "plan.toml"
    plan.write_text(f"""
name = "crash"
[platform]
url = "{url}"
secret_env = "{SECRET_ENV}"
rate_limit = "{RATE}"
request_timeout = 1
[firmware]
version = "2.1.0"
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[fleet]
devices_file = "fleet.txt"
[execution]
settle = 0.2
stop_after_identical_failures = 50
[monitor]
follow = false
""")
    journal = tmp_path / "crash.sqlite"
    env = dict(os.environ, **{SECRET_ENV: "demo-secret"})
    rng = random.Random(20261128)
    kills = 0
    attempts = 0
    while kills < KILLS and attempts < 3 * KILLS:
        attempts += 1
        command = "resume" if _has_run(journal) else "run"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "--log-level",
                "error",
                command,
                str(plan),
                "--journal",
                str(journal),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.5, 1.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(30)
    assert kills == KILLS, f"only {kills} kills landed while the run was going"
    final = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--log-level",
            "error",
            "resume",
            str(plan),
            "--journal",
            str(journal),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert final.returncode == 0, final.stderr[-2000:]
    truth = _get(url + "/_sim/tasks")["tasks"]
    assert isinstance(truth, list)
    seen: dict[str, int] = {}
    for task in truth:
        for device in task["devices"]:
            seen[device] = seen.get(device, 0) + 1
    duplicates = [d for d, n in seen.items() if n > 1]
    missing = set(ids) - set(seen)
    assert (len(duplicates), len(missing)) == (0, 0)
    stats = _get(url + "/_sim/stats")
    assert sum(dict(stats["faults_injected"]).values()) > 0  # type: ignore[call-overload]
    with sqlite3.connect(journal) as db:
        kinds = dict(db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())
    # the crash paths were taken: chunks were found in flight and reconciled both ways
    print(kinds)
    assert kinds.get("reconciled-adopted", 0) > 0
