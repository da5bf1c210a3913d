"""A 1 000 000-device rehearsal: `rollout run` against a standalone `rollout simulator`.

What it does, as an operator would (every step is a command; `--keep DIR` leaves the folder):

    rollout simulator --no-tls --port P --devices 1000000 --model WM-200 \\
        --rate-limit 100000/1 --speed 3600 --write-fleet DIR/sim-fleet.csv
    ROLLOUT_BENCH_SECRET=demo-secret rollout run DIR/plan.toml     # in DIR

The plan (written to DIR/plan.toml) targets the newest WM-200 firmware, `fleet.devices_file =
"sim-fleet.csv"` (the simulator's own CSV: deviceId, deviceType, model, manufacturerName,
firmwareVersion, group), `rate_limit = "100000/1"` (the limit lifted, the same on both
sides), concurrency 16, one wave, `follow = true` (the run watches every task to its end).
`--speed 3600`: an hour of device time a second, so the never-online meters' 4-hour timeout
passes in 4 s.

Measured: the simulator's start (spawn to "Ctrl-C to stop.", the CSV written) and its peak
RSS (`VmHWM`) over the whole rehearsal; the client's wall time and peak RSS (`ru_maxrss` of
the `rollout run` process, from `wait4`) and its exit code; then `/_sim/tasks` (the
platform's ground truth) against the fleet CSV, and `/_sim/stats`.

Goal (issue 12): every device of the fleet in exactly one task; `rollout run` exits 0 and
the platform refused no call (`throttled` 0). Exits 1 when any is missed. Time and memory are
reported, not judged (the client's fleet memory is issue 12's item 1, measured by
bench/plan_scale.py).

    python bench/rehearsal_1m.py [--devices 1000000] [--speed 3600] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

MODEL = "WM-200"
RATE = "100000/1"
SECRET_ENV = "ROLLOUT_BENCH_SECRET"

PLAN = """\
name = "rehearsal-1m"
operation = "firmware"

[platform]
url = "{url}"
app_id = "demo-app"
secret_env = "{secret_env}"
rate_limit = "{rate}"

[firmware]
version = "2.1.0"
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"

[fleet]
devices_file = "sim-fleet.csv"

[policy]
execute_type = "now"

[execution]
concurrency = 16

[monitor]
follow = true
poll_interval = 2
max_poll_interval = 5
"""


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=600) as reply:
        return dict(json.load(reply))


def status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--speed", type=float, default=3600.0)
    parser.add_argument("--keep", type=Path, help="run in this folder and leave it")
    args = parser.parse_args()
    from orchestrator.simulator.testing import free_port

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        directory = args.keep
        holder = None
    else:
        holder = tempfile.TemporaryDirectory(prefix="rehearsal-")
        directory = Path(holder.name)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fleet = directory / "sim-fleet.csv"
    sim_log = directory / "simulator.log"
    rollout = [sys.executable, "-m", "orchestrator"]
    sim_command = [
        *rollout,
        "simulator",
        "--no-tls",
        "--port",
        str(port),
        "--devices",
        str(args.devices),
        "--model",
        MODEL,
        "--rate-limit",
        RATE,
        "--speed",
        f"{args.speed:g}",
        "--write-fleet",
        str(fleet),
    ]
    print("$ rollout " + " ".join(sim_command[3:]), flush=True)
    started = time.perf_counter()
    with sim_log.open("w") as log:
        sim = subprocess.Popen(sim_command, stderr=log, stdout=subprocess.DEVNULL)
    failures: list[str] = []
    try:
        while "Ctrl-C to stop." not in sim_log.read_text():
            if sim.poll() is not None:
                raise SystemExit(f"the simulator stopped: {sim_log.read_text()[-500:]}")
            time.sleep(0.1)
        sim_start = time.perf_counter() - started
        sim_rest = status_mb(sim.pid, "VmRSS")
        print(
            f"simulator ready in {sim_start:.1f} s (fleet CSV written, "
            f"{fleet.stat().st_size / 2**20:.0f} MB), RSS {sim_rest:.0f} MB",
            flush=True,
        )
        plan = directory / "plan.toml"
        plan.write_text(PLAN.format(url=url, secret_env=SECRET_ENV, rate=RATE))
        env = dict(os.environ, **{SECRET_ENV: "demo-secret"})
        run_command = [*rollout, "--log-level", "warning", "run", str(plan)]
        print(f"$ {SECRET_ENV}=… rollout --log-level warning run {plan}", flush=True)
        run_started = time.perf_counter()
        client = subprocess.Popen(
            run_command, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        sim_peak_during = 0.0
        while client.poll() is None:
            sim_peak_during = max(sim_peak_during, status_mb(sim.pid, "VmRSS"))
            time.sleep(0.5)
        out, err = client.communicate()
        run_seconds = time.perf_counter() - run_started
        # the child is reaped by communicate(); its peak comes from RUSAGE_CHILDREN (the only
        # child reaped so far is this one: the simulator is still running)
        import resource

        client_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(
            f"rollout run: exit {client.returncode} in {run_seconds:.1f} s, client peak RSS "
            f"{client_peak:.0f} MB",
            flush=True,
        )
        if client.returncode != 0:
            failures.append(f"rollout run exited {client.returncode}")
            print(err.decode()[-2000:], file=sys.stderr)
        print(out.decode().strip()[-1500:], flush=True)

        truth = get_json(url + "/_sim/tasks")["tasks"]
        stats = get_json(url + "/_sim/stats")
        sim_peak = status_mb(sim.pid, "VmHWM")
        held: Counter[str] = Counter()
        for task in truth:
            held.update(task["devices"])
        with fleet.open(newline="") as handle:
            fleet_ids = [row["deviceId"] for row in csv.DictReader(handle)]
        in_none = sum(1 for d in fleet_ids if held[d] == 0)
        in_several = sum(1 for d in fleet_ids if held[d] > 1)
        strangers = len(set(held) - set(fleet_ids))
        exactly_once = in_none == 0 and in_several == 0 and strangers == 0
        print(
            f"platform: {len(truth)} tasks, {sum(held.values())} device slots for "
            f"{len(fleet_ids)} fleet devices: in no task {in_none}, in several {in_several}, "
            f"not of the fleet {strangers} (goal: every device in exactly one task)  "
            f"{'ok' if exactly_once else 'MISSED'}",
            flush=True,
        )
        print(
            f"platform: {stats['total_calls']} calls ({json.dumps(stats['calls'])}), "
            f"throttled {stats['throttled']} (goal 0)  "
            f"{'ok' if stats['throttled'] == 0 else 'MISSED'}; simulator peak RSS "
            f"{sim_peak:.0f} MB (during the run ≤ {sim_peak_during:.0f} MB sampled)",
            flush=True,
        )
        if not exactly_once:
            failures.append("not every device in exactly one task")
        if stats["throttled"]:
            failures.append(f"{stats['throttled']} calls throttled")
    finally:
        sim.terminate()
        sim.wait(60)
        if holder is not None:
            holder.cleanup()
    total = time.perf_counter() - started
    print(f"rehearsal: {total:.0f} s in all", flush=True)
    if failures:
        print("FAIL: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
