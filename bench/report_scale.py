"""Reports of a 1 000 000-device run, each format in a fresh process: seconds, peak memory and
file size beside their goals; the HTML page opened in headless Chromium.

Three journals are built first, not timed, in a builder process of their own (on Linux a child's
peak RSS starts from its parent's), from a fleet CSV shaped like the
simulator's (deviceId, type, model, manufacturer, version, group; 1 % of it already on the
target version, so left out by `fleet.version_column`), planned in two waves (`canary` 1 000,
`rest`) into 3 907 chunks:

- finished: every task final and read; 2 % of the devices failed, 0.5 % found
  already current by the platform, 20 chunks (5 120 devices) quarantined, 300 progress samples;
- mid-run: the canary's tasks finished, a third of the rest's tasks running (not final), a
  third created but not observed yet (no task row), the last third not submitted;
- unique details: the finished run, but each failed device's detail is its own ~4 KB text
  (a platform answering long, unique failure texts: the reasons must be counted in bounded
  memory and cut on the page).

Then for each journal and each format (CSV, JSON Lines, JSON, HTML), a fresh
`python -m orchestrator report PLAN --journal J --format F -o FILE`: wall time, the child's
peak RSS (`os.wait4`'s rusage, so nothing of the build counts) and the file's size. With
Debian's `chromium`, each HTML file is then opened with `--dump-dom` (wall time; the DOM must
hold the summary; the capped lists' "more" counts are printed), beside an empty page's time
(Chromium's own start).

Goals: HTML ≤ 5 MB and open ≤ 5 s (issue 12). Every format ≤ 100 MB peak RSS: the interpreter
and the imported modules take ~56 MB (the same commands on a 1 000-device run), and what a
report holds besides (SQLite's page cache, the tasks table, the first 1 000 devices of each
HTML list) does not grow with the devices, while a million rows held would take hundreds of
MB. CSV, JSON and JSON Lines ≤ 30 s. Exits 1 when a goal is missed, 3 when a report command
failed.

    python bench/report_scale.py [--devices 1000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.loaded_plan import LoadedPlan

FORMATS = ("csv", "jsonl", "json", "html")
JOURNALS = {
    "finished.sqlite": "finished",
    "mid.sqlite": "mid-run",
    "details.sqlite": "unique details",
}
DETAIL_BYTES = 4_000  # a failed device's detail in the unique-details journal
HTML_BYTES_GOAL = 5_000_000
OPEN_SECONDS_GOAL = 5.0
PEAK_MB_GOAL = 100.0
SECONDS_GOAL = 30.0
TARGET = "2.1.0"
PLAN = f"""name = "scale"
[platform]
url = "https://iot.example.com:8743"
secret_env = "ROLLOUT_SECRET"
[firmware]
version = "{TARGET}"
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[fleet]
devices_file = "fleet.csv"
version_column = "version"
[[waves]]
name = "canary"
count = {{canary}}
[[waves]]
name = "rest"
"""
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _fleet(path: Path, devices: int) -> None:
    rng = random.Random(1)
    groups = ("north", "central", "south")
    with path.open("w") as fleet:
        fleet.write("deviceId,type,model,manufacturer,version,group\n")
        for index in range(devices):
            device = uuid.UUID(int=rng.getrandbits(128), version=4)
            version = TARGET if index % 100 == 7 else "1.8.0"
            fleet.write(f"{device},WaterMeter,WM-200,Aqualis,{version},{groups[index % 3]}\n")


def _journal(path: Path, loaded: LoadedPlan, kind: str) -> None:
    """A run's journal as the engine and the monitor leave it (see the module docstring)."""
    from orchestrator.engine import start_run
    from orchestrator.journal import Journal

    mid_run, unique = kind == "mid-run", kind == "unique details"
    journal = Journal.open(path)
    run_id = start_run(journal, loaded)
    journal.set_package(run_id, "0123456789abcdef01234567", TARGET)
    journal.close()
    with sqlite3.connect(path) as db:
        chunks = db.execute(
            "SELECT chunk_id, wave, members FROM chunks WHERE run_id=? ORDER BY chunk_id",
            (run_id,),
        ).fetchall()
        rest = [c for c in chunks if c[1] == 1]
        for index, (chunk_id, wave, members) in enumerate(chunks):
            ids = members.split("\n")
            rest_index = index - (len(chunks) - len(rest))
            if not mid_run and index % 195 == 100:  # 20 chunks refused before any task
                db.execute(
                    "UPDATE chunks SET state='quarantined' WHERE run_id=? AND chunk_id=?",
                    (run_id, chunk_id),
                )
                db.executemany(
                    "INSERT INTO quarantine VALUES (?,?,?,?,?)",
                    ((run_id, d, chunk_id, "100418", "The device does not exist.") for d in ids),
                )
                continue
            phase = "final"
            if mid_run and wave == 1:
                phase = ("running", "unobserved", "pending")[3 * rest_index // len(rest)]
            if phase == "pending":
                continue
            op = f"{index:024x}"
            db.execute(
                "UPDATE chunks SET state='submitted', operation_id=? WHERE run_id=? AND chunk_id=?",
                (op, run_id, chunk_id),
            )
            if phase == "unobserved":
                continue
            final = phase == "final"
            failed, current = (ids[::50], ids[3::200]) if final else ([], [])
            done = len(ids) - len(failed) - len(current) if final else 0
            db.execute(
                "INSERT INTO tasks (run_id, operation_id, chunk_id, wave, status, total,"
                " processing, succeeded, failed, create_time, stop_time, final,"
                " details_fetched, verified) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    op,
                    chunk_id,
                    wave,
                    "failed" if final else "processing",
                    len(ids),
                    0 if final else len(ids),
                    done,
                    len(failed) + len(current),
                    "20261128T211233Z",
                    "20261128T231233Z" if final else None,
                    int(final),
                    int(final),
                    done,
                ),
            )
            rows = [(d, _detail(d, unique), "1.8.0", "failed") for d in failed]
            rows += [
                (
                    d,
                    f"The version {TARGET} is the same as the target version.",
                    "",
                    "already-current",
                )
                for d in current
            ]
            db.executemany(
                "INSERT INTO device_results (run_id, device_id, operation_id, status, detail,"
                " version, start_time, stop_time, outcome) VALUES (?,?,?,'failed',?,?,?,?,?)",
                (
                    (run_id, d, op, detail, version, "20261128T211300Z", "20261128T221300Z", o)
                    for d, detail, version, o in rows
                ),
            )
        t0 = time.time() - 7200
        samples = 150 if mid_run else 300
        total = sum(len(c[2].split("\n")) for c in chunks)
        db.executemany(
            "INSERT INTO progress_samples VALUES (?,?,?,?,?,?)",
            (
                (
                    run_id,
                    t0 + 24 * i,
                    total * i // samples,
                    total * i // samples // 2,
                    total * i // samples // 2 * 97 // 100,
                    total * i // samples // 2 * 2 // 100,
                )
                for i in range(1, samples + 1)
            ),
        )
        db.executemany(
            "INSERT INTO api_calls VALUES (?,?,?)",
            ((run_id, api, n) for api, n in (("createTask", 3907), ("listTasks", 900))),
        )


def _detail(device: str, unique: bool) -> str:
    """A failed device's detail: one common reason, or its own ~`DETAIL_BYTES` text."""
    return f"{device} " + "x" * DETAIL_BYTES if unique else "Download package timeout."


def _build(directory: Path, devices: int) -> None:
    """The fleet, the plan and both journals, in the process `--build` runs in."""
    from orchestrator.loaded_plan import load_plan

    _fleet(directory / "fleet.csv", devices)
    (directory / "plan.toml").write_text(PLAN.format(canary=min(1000, devices // 10)))
    loaded = load_plan(directory / "plan.toml")
    for name, kind in JOURNALS.items():
        (directory / name).unlink(missing_ok=True)
        _journal(directory / name, loaded, kind)


def _report(directory: Path, journal: Path, fmt: str) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, bytes) of one `rollout report` in a fresh process."""
    out = directory / f"{journal.stem}.{fmt}"
    command = [sys.executable, "-m", "orchestrator", "report", str(directory / "plan.toml")]
    command += ["--journal", str(journal), "--format", fmt, "-o", str(out)]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.stderr is not None
    errors = child.stderr.read().decode()
    if child.returncode != 0:
        print(f"report --format {fmt} of {journal.name} exited {child.returncode}: {errors}")
        sys.exit(3)
    return elapsed, usage.ru_maxrss / 1024, out.stat().st_size


def _open(chromium: str, directory: Path, page: Path) -> tuple[float, str]:
    """(seconds, rendered DOM) of headless Chromium opening PAGE."""
    started = time.perf_counter()
    result = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={directory / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return time.perf_counter() - started, result.stdout


def _own_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="build and keep the files in this folder")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the builder process
    args = parser.parse_args()
    if args.build:
        _build(args.build, args.devices)
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        # built in another process: a child's peak RSS starts from its parent's (Linux keeps
        # the forking process's high-water mark across exec), so this one stays small
        subprocess.run(
            [sys.executable, __file__, "--devices", str(args.devices), "--build", str(directory)],
            check=True,
        )
        print(
            f"{args.devices} devices (CSV fleet, {args.devices // 100} left out as already "
            f"current): three journals built in {time.perf_counter() - started:.0f} s (not "
            f"timed); this launcher's own peak RSS {_own_peak_mb():.0f} MB"
        )
        missed = False
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium:
            (directory / "empty.html").write_text("<!doctype html><title>empty</title>")
            empty, _ = _open(chromium, directory, directory / "empty.html")
            print(f"chromium opens an empty page in {empty:.1f} s")
        for file, name in JOURNALS.items():
            journal = directory / file
            for fmt in FORMATS:
                seconds, peak, size = _report(directory, journal, fmt)
                ok_peak = peak <= PEAK_MB_GOAL
                ok_size = fmt != "html" or size <= HTML_BYTES_GOAL
                ok_time = fmt == "html" or seconds <= SECONDS_GOAL
                goals = f"peak ≤ {PEAK_MB_GOAL:.0f} MB"
                goals += f", ≤ {HTML_BYTES_GOAL / 1e6:.0f} MB" if fmt == "html" else ""
                goals += f", ≤ {SECONDS_GOAL:.0f} s" if fmt != "html" else ""
                print(
                    f"{name:14} {fmt:5}: {seconds:5.1f} s, peak RSS {peak:4.0f} MB, "
                    f"{size / 1e6:7.1f} MB  (goal: {goals}) "
                    f"{_verdict(ok_peak and ok_size and ok_time)}"
                )
                missed |= not (ok_peak and ok_size and ok_time)
            if chromium:
                seconds, dom = _open(chromium, directory, directory / f"{journal.stem}.html")
                rendered = 'id="summary"' in dom and "</html>" in dom
                more = re.findall(r'id="([a-z-]+)-more"><b>(\d+)</b>', dom)
                ok = rendered and seconds <= OPEN_SECONDS_GOAL
                print(
                    f"{name:14} html in chromium: {seconds:.1f} s to the dumped DOM, summary "
                    f"{'rendered' if rendered else 'MISSING'}, more beyond the lists: "
                    f"{', '.join(f'{k} {n}' for k, n in more) or 'none'}  "
                    f"(goal: ≤ {OPEN_SECONDS_GOAL:.0f} s) {_verdict(ok)}"
                )
                missed |= not ok
            else:
                print("chromium not installed: the HTML pages were not opened")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
