"""Run `rollout simulator` in a child process for benchmarks (the load must not share its loop)."""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def simulator_process(tmp: Path, *args: str, devices: int = 20000) -> Iterator[tuple[str, Path]]:
    """Start the simulator on plain HTTP; yields its URL and the fleet CSV it wrote."""
    port = free_port()
    fleet = tmp / "fleet.csv"
    cmd = [
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
        "--write-fleet",
        str(fleet),
        *args,
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/_sim/stats", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the simulator did not start") from None
                time.sleep(0.1)
        yield url, fleet
    finally:
        proc.terminate()
        proc.wait(10)


def read_fleet(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
