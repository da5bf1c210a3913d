"""Creates per second through the whole engine, flow control lifted (goal ≥ 300/s).

The simulator runs in its own process with its limit lifted; this process runs the real
engine (`orchestrator.engine.execute`): plan file, journal (WAL, an fsync'd intent before
every create and an fsync'd outcome after it), pacer, client over loopback HTTP. The figure
is the creates' rate over the submission: chunks created (counted from the journal, checked
against the simulator's own count) over the time from the first create's arrival at the
simulator to the last one's (`/_sim/arrivals`; the census before, and the closing census
that waits `request_timeout + settle` after the last create for late commits, are left out —
the plan sets them to 5 s and 1 s so the run ends sooner). Each run is a fresh simulator and
journal; the figure is the median of `--runs` runs, printed with its spread (min – max),
since fsync latency on a shared machine moves it. Goal: median ≥ 300 creates/s; exits 1
otherwise.

    python bench/engine_overhead.py [--devices 200000 --concurrency 16 --runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.engine import RunOptions, execute
from orchestrator.loaded_plan import load_plan
from orchestrator.logs import configure_logging
from orchestrator.simulator.testing import get_json, simulator_process

GOAL = 300.0


def one_run(devices: int, concurrency: int) -> tuple[float, int, float]:
    """(creates/s, chunks, seconds) of one submission of `devices` WM-200 meters."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator_process(
            Path(tmp),
            *("--devices", str(devices), "--model", "WM-200"),
            *("--rate-limit", "1000000000/1"),
        ) as (url, sim_fleet),
    ):
        directory = Path(tmp)
        ids = [line.split(",", 1)[0] for line in sim_fleet.read_text().splitlines()[1:]]
        (directory / "fleet.txt").write_text("\n".join(ids) + "\n")
        (directory / "plan.toml").write_text(f"""
name = "overhead"
[platform]
url = "{url}"
secret_env = "BENCH_SECRET"
rate_limit = "1000000000/1"
request_timeout = 5
[firmware]
version = "2.1.0"
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[fleet]
devices_file = "fleet.txt"
[execution]
concurrency = {concurrency}
settle = 1
[monitor]
follow = false
""")
        os.environ["BENCH_SECRET"] = "demo-secret"
        os.environ["ROLLOUT_STATE_DIR"] = str(directory / "state")  # not the user's ledger
        journal = directory / "overhead.sqlite"
        loaded = load_plan(directory / "plan.toml")
        started = time.perf_counter()
        asyncio.run(execute(loaded, RunOptions(journal=journal)))
        elapsed = time.perf_counter() - started
        with sqlite3.connect(journal) as db:
            created = db.execute(
                "SELECT COUNT(*) FROM attempts WHERE outcome='created'"
            ).fetchone()[0]
        assert get_json(url + "/_sim/stats")["tasks_created"] == created
        arrivals = get_json(url + "/_sim/arrivals")["arrivals"]
    creates = [row[0] for row in arrivals if row[2] == "createTask" and row[3]]
    assert len(creates) == created, (len(creates), created)
    span = max(creates) - min(creates)
    return (created - 1) / span, created, elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=200_000, help="WM-200 meters to target")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    configure_logging("console", "warning")
    rates = []
    for run in range(args.runs):
        rate, created, elapsed = one_run(args.devices, args.concurrency)
        rates.append(rate)
        print(
            f"  run {run + 1}: {rate:.0f} creates/s ({created} chunks of {args.devices} devices, "
            f"concurrency {args.concurrency}, journal fsyncs included; the whole run "
            f"{elapsed:.1f} s)",
            flush=True,
        )
    median = statistics.median(rates)
    ok = median >= GOAL
    print(
        f"engine: {median:.0f} creates/s median of {args.runs} (spread {min(rates):.0f} – "
        f"{max(rates):.0f}) (goal ≥ {GOAL:.0f}/s)  {'ok' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
