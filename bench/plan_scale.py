"""Plan and journal a 1 000 000-device fleet: seconds and peak memory (goal ≤ 5 s, ≤ 300 MB).

Measured from the plan file to a committed journal: read and check the fleet file (blank,
duplicate and malformed IDs), split it into 3 907 chunks, and insert the run and its chunks
into a new SQLite journal (WAL, synchronous=FULL). The fleet file is written first, streamed,
so its making does not count; peak memory is the process's peak RSS (`ru_maxrss`), which
includes the interpreter and the imported libraries (printed separately as the baseline).

    python bench/plan_scale.py [--devices 1000000]
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
import time
import uuid
from pathlib import Path

from orchestrator.engine import start_run
from orchestrator.journal import Journal
from orchestrator.plan import load_plan
from orchestrator.planner import chunk_count


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        rng = random.Random(1)
        with (directory / "fleet.txt").open("w") as fleet:
            for _ in range(args.devices):
                fleet.write(f"{uuid.UUID(int=rng.getrandbits(128), version=4)}\n")
        (directory / "plan.toml").write_text(
            'name = "scale"\n[platform]\nurl = "https://iot.example.com:8743"\n'
            'secret_env = "ROLLOUT_SECRET"\n[firmware]\nfile_id = "0123456789abcdef01234567"\n'
            '[fleet]\ndevices_file = "fleet.txt"\n'
        )
        baseline = _peak_mb()
        started = time.perf_counter()
        loaded = load_plan(directory / "plan.toml")
        journal = Journal.open(directory / "scale.journal.sqlite")
        start_run(journal, loaded)
        journal.close()
        elapsed = time.perf_counter() - started
        chunks = chunk_count(loaded.waves)
    print(
        f"plan + journal of {args.devices} devices ({chunks} chunks): {elapsed:.2f} s, "
        f"peak RSS {_peak_mb():.0f} MB (interpreter and libraries before: {baseline:.0f} MB)"
    )


if __name__ == "__main__":
    main()
