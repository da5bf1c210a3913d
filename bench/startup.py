"""How fast `rollout` starts: `--help`, `--version` and `status` (goal: under 0.4 s each).

Each command runs REPEAT times in a fresh process; the best time is compared with the goal
(noise from other processes only adds), the median is printed beside it. `status` reads the
journal of the demo plan (24 chunks, created here offline) with the fleet file removed: it
reads the plan file and the journal, never the fleet. Exits 1 when a goal is missed (or a
command fails).

    python bench/startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.4  # seconds
ROOT = Path(__file__).resolve().parent.parent


def _journal(directory: Path) -> Path:
    """The demo plan and fleet in `directory`, with a journal holding one run (no call)."""
    from orchestrator.engine import journal_path, start_run
    from orchestrator.journal import Journal
    from orchestrator.loaded_plan import load_plan

    for name in ("demo.toml", "demo-fleet.csv"):
        shutil.copy(ROOT / "plans" / name, directory / name)
    loaded = load_plan(directory / "demo.toml")
    journal = Journal.open(journal_path(loaded, None))
    try:
        start_run(journal, loaded)
    finally:
        journal.close()
    (directory / "demo-fleet.csv").unlink()  # `status` must not need it
    return directory / "demo.toml"


def _time(args: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(args, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            sys.exit(f"{' '.join(args)} failed: {done.stderr.decode()[-500:]}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    repeat = parser.parse_args().repeat
    rollout = [sys.executable, "-m", "orchestrator"]
    missed = 0
    with tempfile.TemporaryDirectory() as temp:
        plan = _journal(Path(temp))
        commands = {
            "rollout --help": [*rollout, "--help"],
            "rollout --version": [*rollout, "--version"],
            "rollout status PLAN": [*rollout, "status", str(plan)],
        }
        print(f"{'command':<22} {'best':>7} {'median':>7}  goal")
        for name, args in commands.items():
            times = _time(args, repeat)
            best, median = min(times), statistics.median(times)
            ok = best < GOAL
            missed += not ok
            print(f"{name:<22} {best:6.3f}s {median:6.3f}s  < {GOAL} s  {'ok' if ok else 'MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
