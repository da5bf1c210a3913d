"""Reports of a 1 000 000-device run: seconds and peak memory for CSV and JSON.

A journal with a million devices is built first (as `plan_scale.py` does; every chunk then
marked submitted to a finished task with 2 % failed devices, so rows take the real path);
then `collect` plus the CSV and the JSON writers run to /dev/null. Device rows are
streamed from the journal, so memory stays flat in the number of devices; peak RSS is
printed beside the baseline before the reports.

    python bench/report_scale.py [--devices 1000000]
"""

from __future__ import annotations

import argparse
import random
import resource
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

from orchestrator.engine import start_run
from orchestrator.journal import Journal
from orchestrator.plan import load_plan
from orchestrator.report import collect, write_csv, write_json


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(directory: Path, devices: int) -> Path:
    rng = random.Random(1)
    with (directory / "fleet.txt").open("w") as fleet:
        for _ in range(devices):
            fleet.write(f"{uuid.UUID(int=rng.getrandbits(128), version=4)}\n")
    (directory / "plan.toml").write_text(
        'name = "scale"\n[platform]\nurl = "https://iot.example.com:8743"\n'
        'secret_env = "ROLLOUT_SECRET"\n[firmware]\nfile_id = "0123456789abcdef01234567"\n'
        '[fleet]\ndevices_file = "fleet.txt"\n'
    )
    loaded = load_plan(directory / "plan.toml")
    path = directory / "scale.sqlite"
    journal = Journal.open(path)
    run_id = start_run(journal, loaded)
    journal.set_package(run_id, "0123456789abcdef01234567", "2.1.0")
    journal.close()
    with sqlite3.connect(path) as db:
        chunks = db.execute("SELECT chunk_id, members FROM chunks").fetchall()
        for index, (chunk_id, members) in enumerate(chunks):
            op = f"{index:024x}"
            db.execute(
                "UPDATE chunks SET state='submitted', operation_id=? WHERE chunk_id=?",
                (op, chunk_id),
            )
            ids = members.split("\n")
            failed = ids[::50]
            db.execute(
                "INSERT INTO tasks (run_id, operation_id, chunk_id, wave, status, total,"
                " succeeded, failed, final, details_fetched, verified) VALUES"
                " (?,?,?,?,?,?,?,?,1,1,?)",
                (
                    run_id,
                    op,
                    chunk_id,
                    0,
                    "failed",
                    len(ids),
                    len(ids) - len(failed),
                    len(failed),
                    len(ids) - len(failed),
                ),
            )
            db.executemany(
                "INSERT INTO device_results (run_id, device_id, operation_id, status, detail,"
                " version, start_time, stop_time, outcome) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    (
                        run_id,
                        d,
                        op,
                        "failed",
                        "Download package timeout.",
                        "1.8.0",
                        "T",
                        "T",
                        "failed",
                    )
                    for d in failed
                ),
            )
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = _build(Path(tmp), args.devices)
        baseline = _peak_mb()
        started = time.perf_counter()
        data = collect(path, "scale")
        with open("/dev/null", "w") as sink:
            write_csv(data, sink)
            csv_done = time.perf_counter()
            write_json(data, sink)
        elapsed_json = time.perf_counter() - csv_done
    print(
        f"report of {data.totals['devices']} devices ({data.totals['failed']} failed): "
        f"collect + CSV {csv_done - started:.1f} s, JSON {elapsed_json:.1f} s, peak RSS "
        f"{_peak_mb():.0f} MB (before the reports: {baseline:.0f} MB)"
    )


if __name__ == "__main__":
    main()
