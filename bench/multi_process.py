"""One app, 1, 2 and 4 processes on the host: the share of the limit they reach together.

A simulator process enforces CALLS per SECONDS (scaled down from the platform's 100/60 so a
row takes seconds, not hours), once without and once with 20 ± 15 ms of latency on every
call (`--latency-ms 20 --jitter-ms 15`: the platform counts a call when it arrives, and the
arrival drifts from the send by that much). For each row, N worker processes start their
load at one agreed moment and keep CALLERS concurrent GETs going for WINDOWS windows; a
throttled call is sent again, as any client must. Figures come from the platform's side
(`GET /_sim/arrivals`): calls admitted during the load ÷ what the limit allows in that time,
and the calls refused with 1010009.

- ours: `NorthboundClient` — the app's token cache and pacing ledger shared through the
  host's state directory (a temporary one here);
- AsyncLimiter: `aiolimiter.AsyncLimiter(1, SECONDS / CALLS)` in each process — the best a
  user could pick off the shelf (one call per SECONDS/CALLS, no burst) — with a token all
  processes share (logged in once, so only the pacing differs).

Goal: ours ≥ 0.95 of the limit with 0 throttled in every row; exit 1 if a row misses it.
First it times the ledger itself: one grant and one release, each a SQLite transaction on a
file in WAL mode (median of 2 000 pairs, one process, nothing else waiting).

    python bench/multi_process.py [--calls 20 --seconds 2 --windows 8 --processes 1,2,4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter
from pydantic import SecretStr

from orchestrator.logs import configure_logging
from orchestrator.northbound import ClientConfig, NorthboundClient
from orchestrator.northbound.client import LOGIN_PATH, UPGRADE
from orchestrator.northbound.ledger import Granted, Outcome, PacingLedger
from orchestrator.simulator.testing import get_json, simulator_process

CALLERS = 8
APP, SECRET = "demo-app", "demo-secret"
GOAL = 0.95


# ---- a worker process ------------------------------------------------------------------------
async def _ours(url: str, calls: int, seconds: float, start: float, end: float) -> dict[str, int]:
    config = ClientConfig(
        base_url=url, app_id=APP, secret=SecretStr(SECRET), rate_limit=(calls, seconds)
    )
    done = 0
    async with NorthboundClient(config) as client:
        file_id = (await client.list_packages(model="WM-200")).items[0].file_id
        await asyncio.sleep(max(0.0, start - time.monotonic()))

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < end:
                await client.get_package(file_id)
                done += 1

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
        return {"ok": done, "throttled": client.pacer.throttled}


async def _naive(
    url: str, calls: int, seconds: float, start: float, end: float, token: str
) -> dict[str, int]:
    limiter = AsyncLimiter(1, seconds / calls)
    headers = {"app_key": APP, "Authorization": f"Bearer {token}"}
    done = throttled = 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}{UPGRADE}/category", headers=headers) as reply:
            file_id = (await reply.json())["data"][0]["fileId"]
        await asyncio.sleep(max(0.0, start - time.monotonic()))

        async def caller() -> None:
            nonlocal done, throttled
            while time.monotonic() < end:
                await limiter.acquire()
                async with session.get(
                    f"{url}{UPGRADE}/category/{file_id}", headers=headers
                ) as reply:
                    await reply.read()
                    if reply.status == 200:
                        done += 1
                    else:
                        throttled += 1

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return {"ok": done, "throttled": throttled}


def worker(argv: list[str]) -> None:
    kind, url, calls, seconds, start, end, token = argv
    configure_logging("console", "error")
    if kind == "ours":
        result = asyncio.run(_ours(url, int(calls), float(seconds), float(start), float(end)))
    else:
        result = asyncio.run(
            _naive(url, int(calls), float(seconds), float(start), float(end), token)
        )
    print(json.dumps(result), flush=True)


# ---- the benchmark ---------------------------------------------------------------------------
def _login(url: str) -> str:
    data = f"appId={APP}&secret={SECRET}".encode()
    with urllib.request.urlopen(url + LOGIN_PATH, data=data, timeout=10) as reply:
        return str(json.load(reply)["accessToken"])


def _row(
    kind: str, processes: int, latency: bool, calls: int, seconds: float, windows: int
) -> dict[str, Any]:
    faults = ["--latency-ms", "20", "--jitter-ms", "15"] if latency else []
    rate = f"{calls}/{seconds:g}"
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator_process(Path(tmp), "--devices", "200", "--rate-limit", rate, *faults) as (
            url,
            _,
        ),
    ):
        token = _login(url) if kind == "naive" else "-"
        start = time.monotonic() + 3.0 + 0.5 * processes  # every worker has started by then
        end = start + windows * seconds
        env = dict(os.environ, ROLLOUT_STATE_DIR=str(Path(tmp) / "state"))
        procs = [
            subprocess.Popen(
                [
                    *(sys.executable, __file__, "--worker", kind, url),
                    *(str(calls), str(seconds), str(start), str(end), token),
                ],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(processes)
        ]
        results = [
            json.loads(proc.communicate(timeout=windows * seconds + 120)[0]) for proc in procs
        ]
        arrivals = get_json(url + "/_sim/arrivals")["arrivals"]
    during = [row for row in arrivals if start <= row[0] < end]
    admitted = sum(1 for row in during if row[3])
    refused = sum(1 for row in during if not row[3])
    shares = sorted(result["ok"] for result in results)
    return {
        "kind": kind,
        "processes": processes,
        "latency": latency,
        "utilisation": admitted / (windows * calls),
        "throttled": refused,
        "spread": (shares[0], shares[-1]),
    }


def _ledger_cost(pairs: int = 2000) -> float:
    """Median seconds of one grant plus one release on a file ledger."""
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PacingLedger(Path(tmp) / "ledger.sqlite")
        ledger.register("bench", 10**9, 1.0)
        times = []
        for _ in range(pairs):
            began = time.perf_counter()
            granted = ledger.try_reserve(1, None, 10**9, 1.0, 30.0)
            assert isinstance(granted, Granted)
            ledger.release(granted.slot, Outcome.REPLIED, 10**9, 1.0)
            times.append(time.perf_counter() - began)
        ledger.close()
    return sorted(times)[pairs // 2]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--processes", default="1,2,4")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    print(f"ledger: a grant and a release take {_ledger_cost() * 1e6:.0f} µs (median)")
    print(
        f"limit {args.calls} calls / {args.seconds:g} s, {args.windows} windows, "
        f"{CALLERS} callers per process; goal: ours >= {GOAL} of the limit, 0 throttled"
    )
    header = f"{'latency':>12} {'processes':>9} {'limiter':>30} {'of limit':>9} {'throttled':>9}"
    print(f"{header}  calls done per process (fewest–most)")
    missed = False
    for latency in (False, True):
        for processes in counts:
            for kind in ("ours", "naive"):
                row = _row(kind, processes, latency, args.calls, args.seconds, args.windows)
                name = (
                    "ours (shared ledger)"
                    if kind == "ours"
                    else (f"AsyncLimiter(1, {args.seconds / args.calls:g}) each")
                )
                verdict = ""
                if kind == "ours":
                    ok = row["utilisation"] >= GOAL and row["throttled"] == 0
                    verdict = "  ok" if ok else "  MISSED"
                    missed = missed or not ok
                print(
                    f"{'20±15 ms' if latency else '0 ms':>12} {processes:>9} {name:>30} "
                    f"{row['utilisation']:>9.3f} {row['throttled']:>9}  "
                    f"{row['spread'][0]}–{row['spread'][1]}{verdict}",
                    flush=True,
                )
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
