"""1 000 000 devices of one model in the simulator: start time and memory, embedded and standalone.

Three measurements, each in a fresh process (so no figure carries another's memory):

- embedded: `SimulatorServer(SimulatorConfig(devices=N, models=("WM-200",)))` built and
  started on plain HTTP — seconds from before the constructor to a listening server, and the
  process's peak RSS (`ru_maxrss`);
- standalone: `rollout simulator --no-tls --devices N --model WM-200` — seconds from spawn to
  the first `/_sim/stats` reply, and its peak RSS (`VmHWM` of /proc/PID/status); with
  `--write-fleet`, the same with the fleet CSV streamed out before serving;
- in a task (embedded, not a goal of the issue; it checks the cap's constants): every device
  put in ⌈N/256⌉ tasks through `Platform.check_create` + `commit_create`, every task's
  subtasks planned (`Platform.task`), then the RSS per device at rest and the RSS added per
  device in a task, beside `fleet.BYTES_AT_REST` and `fleet.BYTES_IN_A_TASK` — the cap
  (`fleet.max_devices`: available memory over their sum) is only honest when the measured
  figures are under them.

Goals (issue 12): start ≤ 15 s and peak RSS ≤ 1 GB, embedded and standalone. Exits 1 when a
goal is missed.

    python bench/simulator_scale.py [--devices 1000000] [--skip-task]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

START_GOAL_S = 15.0
RSS_GOAL_MB = 1024.0
MODEL = "WM-200"


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embedded(devices: int, in_task: bool) -> dict[str, float]:
    """Run in a child: build and start the embedded simulator; optionally fill its tasks."""
    from orchestrator.simulator import SimulatorConfig, SimulatorServer
    from orchestrator.simulator.fleet import FIRMWARE
    from orchestrator.simulator.validation import MAX_TARGETS

    base = _rss_mb()

    async def run() -> dict[str, float]:
        started = time.perf_counter()
        config = SimulatorConfig(
            tls=False, devices=devices, models=(MODEL,), rate_limit=(100_000, 1.0)
        )
        server = SimulatorServer(config)
        await server.start()
        seconds = time.perf_counter() - started
        figures = {"seconds": seconds, "peak_mb": _peak_mb(), "base_mb": base}
        rest = _rss_mb()
        figures["rest_mb"] = rest
        if in_task:
            platform = server.platform
            package = next(
                p
                for p in server.fleet.packages.values()
                if p.model == MODEL and p.file_type == FIRMWARE and p.version == "2.1.0"
            )
            ids = server.fleet.devices.ids
            last = ""
            for first in range(0, devices, MAX_TARGETS):
                body = {
                    "fileId": package.file_id,
                    "targets": {"devices": ids[first : first + MAX_TARGETS]},
                }
                last = platform.commit_create(platform.check_create("firmwareUpgrade", body))
            platform.task(last)  # plans every task's subtasks
            figures["task_mb"] = _rss_mb()
        await server.close()
        return figures

    return asyncio.run(run())


def _stats_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/_sim/stats", timeout=5):
            return True
    except OSError:
        return False


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def standalone(devices: int, write_fleet: bool) -> dict[str, float]:
    from orchestrator.simulator.testing import free_port

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sim-scale-") as directory:
        extra = ["--write-fleet", str(Path(directory) / "fleet.csv")] if write_fleet else []
        command = [
            sys.executable,
            "-m",
            "orchestrator",
            "--log-level",
            "warning",
            "simulator",
            "--no-tls",
            "--port",
            str(port),
            "--devices",
            str(devices),
            "--model",
            MODEL,
            *extra,
        ]
        started = time.perf_counter()
        proc = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            while not _stats_up(url):
                if proc.poll() is not None or time.perf_counter() - started > 300:
                    raise RuntimeError("the simulator did not start")
                time.sleep(0.05)
            seconds = time.perf_counter() - started
            peak = _vm_hwm_mb(proc.pid)
            size = (Path(directory) / "fleet.csv").stat().st_size if write_fleet else 0
        finally:
            proc.terminate()
            proc.wait(30)
    return {"seconds": seconds, "peak_mb": peak, "csv_mb": size / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--skip-task", action="store_true", help="leave out the in-a-task row")
    parser.add_argument("--child", choices=["embedded", "task"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(embedded(args.devices, args.child == "task")))
        return 0

    from orchestrator.simulator.fleet import BYTES_AT_REST, BYTES_IN_A_TASK, max_devices

    def child(kind: str) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, __file__, "--devices", str(args.devices), "--child", kind],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return dict(json.loads(out.strip().splitlines()[-1]))

    n = args.devices
    missed: list[str] = []

    def judge(label: str, seconds: float, peak: float, extra: str = "") -> None:
        ok = seconds <= START_GOAL_S and peak <= RSS_GOAL_MB
        print(
            f"{label:<28} {n} devices of {MODEL}: start {seconds:5.2f} s "
            f"(goal ≤ {START_GOAL_S:g} s), peak RSS {peak:4.0f} MB "
            f"(goal ≤ {RSS_GOAL_MB:.0f} MB){extra}  "
            f"{'ok' if ok else 'MISSED'}",
            flush=True,
        )
        if not ok:
            missed.append(label)

    e = child("embedded")
    judge("embedded", e["seconds"], e["peak_mb"], f"; interpreter + imports {e['base_mb']:.0f} MB")
    s = standalone(n, write_fleet=False)
    judge("standalone", s["seconds"], s["peak_mb"])
    w = standalone(n, write_fleet=True)
    judge("standalone --write-fleet", w["seconds"], w["peak_mb"], f"; CSV {w['csv_mb']:.0f} MB")
    if not args.skip_task:
        t = child("task")
        at_rest = (t["rest_mb"] - t["base_mb"]) * 2**20 / n
        in_task = (t["task_mb"] - t["rest_mb"]) * 2**20 / n
        ok = at_rest <= BYTES_AT_REST and in_task <= BYTES_IN_A_TASK
        print(
            f"{'bytes a device':<28} at rest {at_rest:.0f} (cap constant {BYTES_AT_REST}), in an "
            f"observed task +{in_task:.0f} (cap constant {BYTES_IN_A_TASK}); RSS with every "
            f"device in a task {t['task_mb']:.0f} MB; cap here {max_devices()} devices  "
            f"{'ok' if ok else 'MISSED'}",
            flush=True,
        )
        if not ok:
            missed.append("bytes a device")
    if missed:
        print(f"FAIL: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
