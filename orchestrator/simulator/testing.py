"""Helpers for tests and benchmarks that drive the simulator from outside, as a process.

In-process use needs nothing more than `SimulatorServer`; these are for subjects that are
processes themselves (the CLI under SIGKILL, a benchmark whose load must not share the
simulator's event loop).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return dict(json.load(reply))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def simulator_process(
    directory: Path, *args: str, port: int | None = None
) -> Iterator[tuple[str, Path]]:
    """`rollout simulator --no-tls` on `port` (default: a free one); yields its URL and its
    fleet CSV, and stops it (SIGTERM: a `--state` file is saved) on leaving."""
    port = port or free_port()
    fleet = directory / "sim-fleet.csv"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--log-level",
            "warning",
            "simulator",
            "--no-tls",
            "--port",
            str(port),
            "--write-fleet",
            str(fleet),
            *args,
        ],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                get_json(url + "/_sim/stats")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the simulator did not start") from None
                time.sleep(0.1)
        yield url, fleet
    finally:
        proc.terminate()
        proc.wait(10)
