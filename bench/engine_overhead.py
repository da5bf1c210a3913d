"""Creates per second through the whole engine, flow control lifted (goal ≥ 300/s).

The simulator runs in its own process with its limit lifted; this process runs the real
engine (`orchestrator.engine.execute`): plan file, journal (WAL, an fsync'd intent before
every create and an fsync'd outcome after it), pacer, client over loopback HTTP. The figure
is chunks created ÷ wall time of the submission, counted from the journal.

    python bench/engine_overhead.py [--devices 200000 --concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from orchestrator.engine import RunOptions, execute
from orchestrator.loaded_plan import load_plan
from orchestrator.logs import configure_logging
from orchestrator.simulator.testing import get_json, simulator_process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=200_000, help="WM-200 meters to target")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    configure_logging("console", "warning")
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator_process(
            Path(tmp), "--devices", str(args.devices * 4 + 20_000), "--rate-limit", "1000000000/1"
        ) as (url, sim_fleet),
    ):
        directory = Path(tmp)
        ids = [
            line.split(",", 1)[0]
            for line in sim_fleet.read_text().splitlines()[1:]
            if ",WM-200," in line
        ][: args.devices]
        (directory / "fleet.txt").write_text("\n".join(ids) + "\n")
        (directory / "plan.toml").write_text(f"""
name = "overhead"
[platform]
url = "{url}"
secret_env = "BENCH_SECRET"
rate_limit = "1000000000/1"
[firmware]
version = "2.1.0"
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[fleet]
devices_file = "fleet.txt"
[execution]
concurrency = {args.concurrency}
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
    print(
        f"engine: {created / elapsed:.0f} creates/s ({created} chunks of {len(ids)} devices "
        f"in {elapsed:.2f} s, concurrency {args.concurrency}, journal fsyncs included)"
    )


if __name__ == "__main__":
    main()
