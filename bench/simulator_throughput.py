"""Creates per second the simulator serves on this machine, with flow control lifted.

The simulator must never be the bottleneck of an engine benchmark (goal: ≥ 2 000 creates/s).
It runs in its own process; the load is 256-device firmware creates from 32 keep-alive
connections for a fixed time. The rate is counted by the simulator itself (`tasks_created` in
`/_sim/stats` before and after, over the wall time of the load), so it does not depend on the
load generator's own bookkeeping. The load comes from `wrk` when it is installed (a C load
generator leaves the second core to the server) and from an aiohttp client otherwise; the
output names which one. Goal ≥ 2 000 creates/s with no reply but 200; exits 1 otherwise
(with the aiohttp load the load generator takes about half the CPU: expect a miss).

    python bench/simulator_throughput.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp

from orchestrator.simulator.testing import simulator_process

UPGRADE = "/iodm/northbound/v1.5.0"
CONNECTIONS = 32
GOAL = 2000


def _get(url: str, headers: dict[str, str] | None = None) -> dict[str, object]:
    request = urllib.request.Request(url, headers=headers or {})
    return dict(json.load(urllib.request.urlopen(request)))


def _login(url: str) -> str:
    data = urllib.parse.urlencode({"appId": "demo-app", "secret": "demo-secret"}).encode()
    reply = json.load(urllib.request.urlopen(f"{url}/iocm/app/sec/v1.1.0/login", data=data))
    return str(reply["accessToken"])


def _bodies(url: str, token: str, fleet: list[dict[str, str]]) -> list[bytes]:
    model = fleet[0]["model"]
    headers = {"app_key": "demo-app", "Authorization": f"Bearer {token}"}
    rows = _get(
        f"{url}{UPGRADE}/category?model={model}&fileType=firmwarePackage&pageSize=100", headers
    )["data"]
    assert isinstance(rows, list)
    file_id = rows[-1]["fileId"]
    ids = [row["deviceId"] for row in fleet if row["model"] == model]
    return [
        json.dumps({"fileId": file_id, "targets": {"devices": ids[i : i + 256]}}).encode()
        for i in range(0, len(ids) - 255, 256)
    ]


def _wrk_load(url: str, token: str, body: bytes, seconds: float, tmp: Path) -> None:
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body.decode()}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.headers["app_key"] = "demo-app"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
    )
    subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{int(seconds)}s",
            "-s",
            str(script),
            f"{url}{UPGRADE}/operations/firmwareUpgrade",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


async def _aiohttp_load(url: str, token: str, bodies: list[bytes], seconds: float) -> None:
    headers = {
        "app_key": "demo-app",
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
    }
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(index: int) -> None:
            while time.perf_counter() < deadline:
                async with session.post(
                    f"{url}{UPGRADE}/operations/firmwareUpgrade",
                    data=bodies[index % len(bodies)],
                    headers=headers,
                ) as reply:
                    assert reply.status == 200, await reply.text()
                    await reply.read()
                index += CONNECTIONS

        await asyncio.gather(*(worker(i) for i in range(CONNECTIONS)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--load", choices=["auto", "wrk", "aiohttp"], default="auto")
    args = parser.parse_args()
    load = args.load if args.load != "auto" else ("wrk" if shutil.which("wrk") else "aiohttp")
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator_process(Path(tmp), "--rate-limit", "1000000000/1", "--devices", "20000") as (
            url,
            fleet_csv,
        ),
    ):
        token = _login(url)
        with fleet_csv.open(newline="") as handle:
            bodies = _bodies(url, token, list(csv.DictReader(handle)))
        before = _get(f"{url}/_sim/stats")
        started = time.perf_counter()
        if load == "wrk":
            _wrk_load(url, token, bodies[0], args.seconds, Path(tmp))
        else:
            asyncio.run(_aiohttp_load(url, token, bodies, args.seconds))
        elapsed = time.perf_counter() - started
        after = _get(f"{url}/_sim/stats")
    created = int(str(after["tasks_created"])) - int(str(before["tasks_created"]))
    refused = {k: v for k, v in dict(after["replies"]).items() if k != "200"}  # type: ignore[call-overload]
    rate = created / elapsed
    ok = rate >= GOAL and not refused
    print(
        f"simulator: {rate:.0f} creates/s (goal ≥ {GOAL}/s, every reply 200) (256 devices "
        f"each; {created} tasks in {elapsed:.1f} s; load: {load}, {CONNECTIONS} connections; "
        f"non-200 replies: {refused or 'none'})  {'ok' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
