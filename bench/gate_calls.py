"""Benchmark: the calls a gate spends checking versions before it decides.

A running task's success counter is not a checked upgrade (the device may report another
version), so a gate counts those successes as not finished and, when they would change its
verdict, reads the succeeded subtasks of the wave's running tasks (`Monitor.learn_successes`),
as it reads their failed subtasks before deciding (`Monitor.learn_failures`). The bound
(docs/monitoring-and-reports.md): in a gate that passes, one read of each running task's
successes and one of its failures — at most Σᵢ (⌈sᵢ/100⌉ + ⌈fᵢ/100⌉) ≤ Σᵢ (⌈nᵢ/100⌉ + 1) calls
over the canary's tasks — beyond the ⌈nᵢ/100⌉ every task costs once it is final.

Setup: a canary of 2 560 WM-200 meters (10 tasks) and a rest of 2 560, 2 % upgrade failures
and 2 % rolled back (succeeded, old version reported), simulated time at 300× (a task ends
within about 8 real seconds), `poll_interval` 2 s: the canary's gate (min_finished 0.5,
max_failed 0.1, min_sample 50) judges while its tasks still run. Counted from the simulator:
subtask pages beyond the final reads of every task (Σ over all tasks of ⌈nᵢ/100⌉).

    python bench/gate_calls.py
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import tempfile
from pathlib import Path

from orchestrator.engine import RunOptions, execute
from orchestrator.loaded_plan import load_plan
from orchestrator.logs import configure_logging
from orchestrator.simulator import FaultConfig, SimulatorConfig, SimulatorServer

CANARY = 2560


async def measure(directory: Path) -> tuple[int, int, str]:
    config = SimulatorConfig(
        tls=False,
        devices=30_000,
        seed=5,
        rate_limit=(1_000_000, 1.0),
        speed=300,
        failure_rate=0.02,
        faults=FaultConfig(rollback_rate=0.02),
    )
    async with SimulatorServer(config) as sim:
        ids = [d.device_id for d in sim.fleet.devices.values() if d.model.model == "WM-200"]
        ids = ids[: 2 * CANARY]
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
name = "gate-bench"
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
poll_interval = 2
max_poll_interval = 6
[[waves]]
name = "canary"
count = {CANARY}
[waves.gate]
min_finished = 0.5
max_failed = 0.1
min_sample = 50
[[waves]]
name = "rest"
""")
        os.environ["BENCH_SECRET"] = "demo-secret"
        journal = directory / "j.sqlite"
        await execute(load_plan(plan_file), RunOptions(journal=journal))
        tasks = sim.platform.tasks
        final_reads = sum(math.ceil(len(t.device_ids) / 100) for t in tasks)
        extra = sim.platform.stats.calls["subOperations"] - final_reads
        canary = [t for t in tasks if set(t.device_ids) <= set(ids[:CANARY])]
        bound = sum(math.ceil(len(t.device_ids) / 100) + 1 for t in canary)
        with sqlite3.connect(journal) as db:
            (reason,) = db.execute("SELECT gate_reason FROM waves WHERE wave=0").fetchone()
        return extra, bound, str(reason)


def main() -> None:
    configure_logging("console", "warning")
    with tempfile.TemporaryDirectory() as tmp:
        extra, bound, reason = asyncio.run(measure(Path(tmp)))
    print(
        f"canary of {CANARY} devices: the gate read {extra} subtask pages beyond the final "
        f"reads, bound {bound} (goal <= the bound); its verdict: {reason}"
    )
    if extra > bound:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
