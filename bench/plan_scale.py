"""Plan a 1 000 000-device fleet, each step in a fresh process: seconds, peak RSS, bytes a device.

The fleet is the simulator's own CSV (`write_fleet_csv`: deviceId, deviceType, model,
manufacturerName, firmwareVersion, group — what `rollout simulator --write-fleet` writes),
made before anything is timed, and the same IDs one per line. Rows, each a fresh process:

- `rollout plan --json` — what an operator runs. The CSV's plan has a 1 000-device canary
  stratified by `group` and `version_column = "firmwareVersion"` (the devices already on
  the package's version are left out), so both kept columns are read; the one-per-line
  plan has a random canary. A third fleet is the CSV with 100 000 distinct `group` values
  (a site or street column; seeded random, about 10 devices each): `rollout plan` only.
- plan + journal — `load_plan`, then the run and its chunks (3 888 for the CSV, 3 907 one a
  line) inserted into a new SQLite journal (WAL, synchronous=FULL): what `rollout run` does
  before its first call.
- fleet alone — `read_fleet_file` with the plan's columns: the growth of the process's
  resident memory from just before the call to just after it (garbage collected), per device;
  the goal is for a large fleet (at 10⁴ devices the reader's few fixed MB dominate it).

Time is the child's wall time from its start (interpreter and imports included) to its exit,
with its CPU time (user + system) beside it — on a machine other jobs share, the wall time
grows and the CPU time hardly; peak RSS is the child's `ru_maxrss` (`os.wait4`). With
`--runs N` each row runs N times and the spread is printed; the goal is checked on the best
wall time (other processes' load only adds) and the worst memory. Exits 1 when a goal is
missed.

    python bench/plan_scale.py [--devices 1000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GOAL_SECONDS = 5.0
GOAL_PEAK_MB = 300.0
GOAL_BYTES_PER_DEVICE = 150.0
GROUPS = 100_000  # distinct values of `group` in the many-groups CSV

CSV_PLAN = """name = "scale-csv"
[platform]
url = "https://iot.example.com:8743"
secret_env = "ROLLOUT_SECRET"
[firmware]
version = "2.1.0"
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[fleet]
devices_file = "fleet.csv"
version_column = "firmwareVersion"
[[waves]]
name = "canary"
count = 1000
selection = "stratified"
stratify_by = "group"
seed = 7
[[waves]]
name = "quarter"
share = 0.25
[[waves]]
name = "rest"
"""

LINES_PLAN = """name = "scale-lines"
[platform]
url = "https://iot.example.com:8743"
secret_env = "ROLLOUT_SECRET"
[firmware]
file_id = "0123456789abcdef01234567"
[fleet]
devices_file = "fleet.txt"
[[waves]]
name = "canary"
count = 1000
selection = "random"
seed = 7
[[waves]]
name = "rest"
"""


@dataclass
class Child:
    seconds: float  # wall time
    cpu: float  # user + system seconds: what the child itself spent, whatever else runs
    peak_mb: float
    output: str


def _child(args: list[str]) -> Child:
    """Run `args` in a fresh process; its wall time and its own peak RSS (`os.wait4` reaps it,
    so the usage is this child's alone)."""
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errors)
        assert process.stdout is not None
        output = process.stdout.read()
        process.stdout.close()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(args)} failed: {errors.read().decode()[-800:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return Child(seconds, cpu, usage.ru_maxrss / 1024, output.decode())


def _write_fleets(directory: Path, devices: int) -> None:
    """The simulator's fleet CSV, and its IDs one per line (made in a child, not timed)."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from orchestrator.simulator import generate_fleet, write_fleet_csv; "
            "write_fleet_csv(generate_fleet(int(sys.argv[1]), 1), Path(sys.argv[2]))",
            str(devices),
            str(directory / "fleet.csv"),
        ],
        check=True,
    )
    with (
        (directory / "fleet.csv").open(newline="") as rows,
        (directory / "fleet.txt").open("w") as lines,
    ):
        reader = csv.reader(rows)
        next(reader)
        lines.writelines(f"{row[0]}\n" for row in reader)
    # the same rows with 100 000 distinct groups (a site or street column): most 4 096-row
    # batches bring values not seen before, and the canary is drawn among 100 000 strata
    picker = random.Random(1)
    with (
        (directory / "fleet.csv").open(newline="") as rows,
        (directory / "groups.csv").open("w", newline="") as out,
    ):
        reader, writer = csv.reader(rows), csv.writer(out, lineterminator="\n")
        writer.writerow(next(reader))
        writer.writerows(
            [*row[:5], f"grp-{picker.randrange(GROUPS):06d}", *row[6:]] for row in reader
        )
    (directory / "groups.toml").write_text(CSV_PLAN.replace("fleet.csv", "groups.csv"))
    (directory / "csv.toml").write_text(CSV_PLAN)
    (directory / "lines.toml").write_text(LINES_PLAN)


def _journal_child(plan: Path) -> None:
    """plan + journal, in this (fresh) process."""
    from orchestrator.engine import start_run
    from orchestrator.journal import Journal
    from orchestrator.loaded_plan import load_plan
    from orchestrator.planner import chunk_count

    loaded = load_plan(plan)
    journal = Journal.open(plan.with_suffix(".journal.sqlite"))
    try:
        start_run(journal, loaded)
    finally:
        journal.close()
    plan.with_suffix(".journal.sqlite").unlink()
    shown = {
        "targets": len(loaded.fleet.members),
        "left_out_already_current": len(loaded.already_current),
        "chunks": chunk_count(loaded.waves),
    }
    print(json.dumps(shown))


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fleet_child(path: Path, columns: list[str]) -> None:
    """The fleet alone: resident growth across `read_fleet_file`, after a collection."""
    import gc

    from orchestrator.fleet import read_fleet_file

    gc.collect()
    before = _resident()
    fleet = read_fleet_file(path, columns)
    gc.collect()
    grown = _resident() - before
    held = sys.getsizeof(fleet.members) + sum(map(sys.getsizeof, fleet.members))
    held += sum(sys.getsizeof(c.codes) for c in fleet.attributes.values())
    print(json.dumps({"devices": len(fleet.members), "grown": grown, "held": held}))


def _spread(values: list[float], digits: int) -> str:
    low, high = min(values), max(values)
    return (
        f"{low:.{digits}f}"
        if f"{low:.{digits}f}" == f"{high:.{digits}f}"
        else (f"{low:.{digits}f} – {high:.{digits}f}")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # this file run again as a fresh process: one measured step
        kind, path, *columns = args.child
        if kind == "journal":
            _journal_child(Path(path))
        else:
            _fleet_child(Path(path), columns)
        return 0
    me = [sys.executable, str(Path(__file__).resolve())]
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _write_fleets(directory, args.devices)
        print(
            f"{args.devices} devices; fleet.csv {(directory / 'fleet.csv').stat().st_size >> 20} MB"
            f" (the simulator's 6 columns), fleet.txt"
            f" {(directory / 'fleet.txt').stat().st_size >> 20} MB; {args.runs} run(s) a row"
        )
        print(f"{'row':<30} {'seconds':>13} {'CPU seconds':>13} {'peak RSS MB':>13}  goals")
        plan_only = ("rollout plan", [sys.executable, "-m", "orchestrator", "plan", "--json"])
        journal = ("plan + journal", [*me, "--child", "journal"])
        for fleet, plan, rows in (
            ("CSV", "csv.toml", (plan_only, journal)),
            ("CSV 100 k groups", "groups.toml", (plan_only,)),
            ("one per line", "lines.toml", (plan_only, journal)),
        ):
            for label, command in rows:
                runs = [_child([*command, str(directory / plan)]) for _ in range(args.runs)]
                for run in runs:  # every device accounted for: the child did the whole work
                    shown = json.loads(run.output)
                    if shown["targets"] + shown["left_out_already_current"] != args.devices:
                        raise SystemExit(f"{label}, {fleet}: {shown['targets']} targets?")
                seconds = [run.seconds for run in runs]
                cpu = [run.cpu for run in runs]
                peaks = [run.peak_mb for run in runs]
                ok = min(seconds) <= GOAL_SECONDS and max(peaks) <= GOAL_PEAK_MB
                missed += not ok
                print(
                    f"{label + ', ' + fleet:<30} {_spread(seconds, 2):>13} {_spread(cpu, 2):>13}"
                    f" {_spread(peaks, 0):>13}"
                    f"  ≤ {GOAL_SECONDS:g} s, ≤ {GOAL_PEAK_MB:g} MB  {'ok' if ok else 'MISSED'}"
                )
        for fleet, name, columns in (
            ("CSV", "fleet.csv", ["firmwareVersion", "group"]),
            ("one per line", "fleet.txt", []),
        ):
            runs = [
                json.loads(
                    _child([*me, "--child", "fleet", str(directory / name), *columns]).output
                )
                for _ in range(args.runs)
            ]
            grown = [run["grown"] / run["devices"] for run in runs]
            held = [run["held"] / run["devices"] for run in runs]
            ok = max(grown) <= GOAL_BYTES_PER_DEVICE
            missed += not ok
            print(
                f"{'fleet alone, ' + fleet:<30} {_spread(grown, 0):>9} B/device resident"
                f" ({_spread(held, 0)} in its objects)  ≤ {GOAL_BYTES_PER_DEVICE:g}"
                f"  {'ok' if ok else 'MISSED'}"
            )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
