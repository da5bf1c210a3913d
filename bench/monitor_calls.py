"""Calls the monitor spends to learn every final status and every finished device's outcome,
beside the least this API allows for the same knowledge (goal ≤ 1.1 × the bound).

The lower bound. The knowledge is: the final status (and counters) of each of our T tasks,
and the outcome of every device — a device counts as upgraded only when its subtask
succeeded *and* the version it reports is the package's, so every subtask must be read, the
succeeded too. The task list returns at most 100 tasks a call with their status and
staResult, so seeing T final statuses takes at least ⌈T / 100⌉ calls (a single-task query
would cost T); no task-level call carries device details, and subOperations returns at most
100 subtasks of one task a call, so the nᵢ devices of task i take at least ⌈nᵢ / 100⌉ calls
(filtering by status cannot help: ⌈s/100⌉ + ⌈f/100⌉ ≥ ⌈(s+f)/100⌉).

    bound = ⌈T / 100⌉ + Σᵢ ⌈nᵢ / 100⌉        (3 subtask calls per 256-device task)

It assumes a clairvoyant client that asks exactly once, after the last task finished. The
monitor does not know when that is: it polls (first after `poll_interval`, each next wait
1.5× longer), re-reading only the list pages that still hold an unfinished task of ours,
and reads a task's subtasks once, when it sees the task final. Its excess over the bound is
the price of not knowing the future. (A gate about to decide also reads the failed subtasks
of its wave's running tasks, and — when its verdict hinges on successes not yet checked —
their succeeded subtasks; this benchmark has no waves.)

Setup: the first 10 000 and 100 000 WM-200 meters of the simulator's default fleet, as
generated — none filtered out: each model's own failure rate (3 % for WM-200), 1 % of the
meters never online (a task run "now" gives up on them after 4 simulated hours) and 2 %
already on the package's version (their subtask fails at once, "same version") — simulated
time at 300× (the meters wake every 30 simulated minutes = 6 s; a task holding a
never-online meter ends 4 h = 48 s after its creation, the others within about 40 minutes
≈ 8 s). The rollout runs as `rollout run` does — submission with the limit lifted, then
the monitor following the tasks to the end with `poll_interval` set to the meters' wake
cycle (6 s, the setting docs/plan-file.md recommends). Counted: the monitor's calls (task
lists, subtask pages, single-task queries), from the journal.

    python bench/monitor_calls.py [--sizes 10000 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from orchestrator.engine import RunOptions, execute
from orchestrator.loaded_plan import load_plan
from orchestrator.logs import configure_logging
from orchestrator.simulator import SimulatorConfig, SimulatorServer

MONITOR_APIS = ("listTasks", "subOperations", "getTask")


def _calls(journal: Path) -> int:
    with sqlite3.connect(journal) as db:
        rows = dict(db.execute("SELECT api, calls FROM api_calls").fetchall())
    return sum(rows.get(api, 0) for api in MONITOR_APIS)


async def measure(size: int, directory: Path) -> tuple[int, int, int]:
    config = SimulatorConfig(
        tls=False,
        devices=size * 4 + 10_000,
        seed=5,
        rate_limit=(1_000_000, 1.0),
        speed=300,
    )
    async with SimulatorServer(config) as sim:
        ids = [d.device_id for d in sim.fleet.devices.values() if d.model.model == "WM-200"]
        ids = ids[:size]
        assert len(ids) == size
        (directory / "fleet.txt").write_text("\n".join(ids) + "\n")
        package = max(
            (
                p
                for p in sim.fleet.packages.values()
                if p.model == "WM-200" and p.file_type == "firmwarePackage"
            ),
            key=lambda p: p.version,
        )
        plan_file = directory / "plan.toml"
        plan_file.write_text(f"""
name = "monitor-bench"
[platform]
url = "{sim.url}"
secret_env = "BENCH_SECRET"
rate_limit = "1000000/1"
[firmware]
file_id = "{package.file_id}"
[fleet]
devices_file = "fleet.txt"
[execution]
concurrency = 16
[monitor]
follow = true
poll_interval = 6
max_poll_interval = 60
""")
        os.environ["BENCH_SECRET"] = "demo-secret"
        journal = directory / "j.sqlite"
        loaded = load_plan(plan_file)
        started = time.perf_counter()
        await execute(loaded, RunOptions(journal=journal))
        elapsed = time.perf_counter() - started
        spent = _calls(journal)
        now = sim.clock.now()
        tasks = sim.platform.tasks
        for task in tasks:
            assert task.status_at(now) in ("success", "failed")
        bound = math.ceil(len(tasks) / 100) + sum(
            math.ceil(len(task.device_ids) / 100) for task in tasks
        )
        with sqlite3.connect(journal) as db:
            by_api = dict(db.execute("SELECT api, calls FROM api_calls").fetchall())
        print(
            f"  (submitted and followed {len(tasks)} tasks in {elapsed:.1f} s; "
            f"task-list pages {by_api.get('listTasks', 0)}, subtask pages "
            f"{by_api.get('subOperations', 0)}, single-task queries {by_api.get('getTask', 0)})"
        )
        return spent, bound, len(tasks)


GOAL = 1.1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    configure_logging("console", "warning")
    missed = False
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            spent, bound, tasks = asyncio.run(measure(size, Path(tmp)))
        per_k = 1000 / size
        ok = spent <= GOAL * bound
        print(
            f"{size} devices, {tasks} tasks, default fleet: monitor {spent} calls "
            f"({spent * per_k:.2f} per 1 000 devices), lower bound {bound} "
            f"({bound * per_k:.2f} per 1 000): {spent / bound:.3f} x the bound "
            f"(goal <= {GOAL} x)  {'ok' if ok else 'MISSED'}",
            flush=True,
        )
        missed = missed or not ok
    if missed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
