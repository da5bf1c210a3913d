"""Calls and seconds the census spends with N devices already in tasks, beside the bound.

The census (`orchestrator/census.py`) reads the app's task list, filtered by operation type
and by the package's device type, model and manufacturer, 100 tasks a page, and indexes our
targets by the task that holds them. With one task per 256 devices, T = ⌈N / 256⌉ tasks:

    bound = ⌈T / 100⌉ list calls, + 0 probe calls

(a probe — a one-item subtask page — is spent only on a task whose package neither the reply's
`extendPara` nor the journal names; the simulator reports `extendPara.fileId`).

Setup, not timed: a fleet of N WM-200 meters only (`generate_fleet(models=("WM-200",))`,
none offline or already upgraded), an in-process simulator on plain HTTP with its rate limit
lifted (100 000 calls/s, so throttling does not count), and ⌈N / 256⌉ tasks of the newest
WM-200 firmware created directly through `Platform.check_create` + `commit_create` (this
measures the census, not the creates). The simulator plans its tasks' subtasks lazily, on
the first query; that planning is done before the clock starts (the real platform has it
done), and the simulator's objects are moved out of the garbage collector's sight
(`gc.freeze`), as they would be in a process of their own.

Timed: `take_census` with a real `NorthboundClient` over HTTP, given every device ID as
the targets. The seconds include the simulator's side of each page (filter, serialise),
since both run in one process on one event loop. Checked: every device found in a task
(`len(census.holder) == N`), list calls ≤ the bound and no probe — the goal, printed beside
each row; exit status 1 otherwise.

    python bench/census_cost.py [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import resource
import sys
import time
from dataclasses import dataclass

from pydantic import SecretStr

from orchestrator.census import PAGE_SIZE, PackageJudge, take_census
from orchestrator.logs import configure_logging
from orchestrator.northbound import NorthboundClient, OperationType
from orchestrator.northbound.config import ClientConfig
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.simulator.fleet import FIRMWARE, MODELS, Fleet, generate_fleet
from orchestrator.simulator.server import DEFAULT_APP_ID, DEFAULT_SECRET
from orchestrator.simulator.validation import MAX_TARGETS

MODEL = MODELS[0]  # WM-200
RATE_LIMIT = (100_000, 1.0)
SEED = 7


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_model_fleet(size: int) -> Fleet:
    """`size` WM-200 meters, none offline or already upgraded, and every model's packages."""
    return generate_fleet(
        size,
        SEED,
        DEFAULT_APP_ID,
        never_online_share=0.0,
        already_upgraded_share=0.0,
        models=(MODEL.model,),
    )


@dataclass
class Result:
    devices: int
    tasks: int
    list_calls: int
    probes: int
    other_calls: int
    seconds: float
    found: int
    setup_seconds: float
    rss_before: float
    rss_after: float

    @property
    def bound(self) -> int:
        return math.ceil(self.tasks / PAGE_SIZE)

    @property
    def ok(self) -> bool:
        return self.found == self.devices and self.list_calls <= self.bound and self.probes == 0


async def measure(size: int) -> Result:
    setup_started = time.perf_counter()
    fleet = one_model_fleet(size)
    config = SimulatorConfig(tls=False, devices=size, seed=SEED, rate_limit=RATE_LIMIT)
    async with SimulatorServer(config, fleet=fleet) as sim:
        platform = sim.platform
        package = max(
            (
                p
                for p in fleet.packages.values()
                if p.model == MODEL.model and p.file_type == FIRMWARE
            ),
            key=lambda p: tuple(map(int, p.version.split("."))),
        )
        device_ids = list(fleet.devices)
        last = ""
        for start in range(0, size, MAX_TARGETS):
            body = {
                "fileId": package.file_id,
                "targets": {"devices": device_ids[start : start + MAX_TARGETS]},
                "policy": {"executeType": "now"},
            }
            last = platform.commit_create(platform.check_create("firmwareUpgrade", body))
        platform.task(last)  # plans every task's subtasks now, not on the census's first page
        tasks = len(platform.tasks)
        targets = {device: device for device in device_ids}
        del device_ids
        client_config = ClientConfig(
            base_url=sim.url,
            app_id=DEFAULT_APP_ID,
            secret=SecretStr(DEFAULT_SECRET),
            rate_limit=RATE_LIMIT,
        )
        async with NorthboundClient(client_config) as client:
            wire_package = await client.get_package(package.file_id)
            client.take_call_counts()  # the login and the package lookup are not the census's
            sim_before = platform.stats.calls.copy()
            gc.collect()
            gc.freeze()
            setup_seconds = time.perf_counter() - setup_started
            rss_before = _rss_mb()
            judge = PackageJudge(client, wire_package, {})
            started = time.perf_counter()
            census = await take_census(judge, OperationType.FIRMWARE, "devices", targets)
            seconds = time.perf_counter() - started
            rss_after = _rss_mb()
            counts = client.take_call_counts()
        sim_calls = platform.stats.calls - sim_before
        gc.unfreeze()
    list_calls = counts.pop("listTasks", 0)
    probes = counts.pop("subOperations", 0)
    # the client's count and the simulator's agree, or the figure is not the census's
    assert sim_calls.get("listTasks", 0) == list_calls, (sim_calls, list_calls)
    assert judge.probes == probes == census.probes, (judge.probes, probes, census.probes)
    return Result(
        devices=size,
        tasks=tasks,
        list_calls=list_calls,
        probes=probes,
        other_calls=sum(counts.values()),
        seconds=seconds,
        found=len(census.holder),
        setup_seconds=setup_seconds,
        rss_before=rss_before,
        rss_after=rss_after,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--sizes",
        default="10000,100000,1000000",
        help="comma-separated device counts (default 10000,100000,1000000)",
    )
    args = parser.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    configure_logging("console", "warning")
    failed = False
    for size in sizes:
        r = asyncio.run(measure(size))
        print(
            f"census  devices={r.devices} tasks={r.tasks} list_calls={r.list_calls} "
            f"bound={r.bound} probes={r.probes} seconds={r.seconds:.2f} "
            f"rate={r.tasks / r.seconds:.0f} tasks/s  found={r.found}"
            f"  (setup {r.setup_seconds:.1f} s; RSS {r.rss_before:.0f} -> {r.rss_after:.0f} MB"
            f"{f'; {r.other_calls} other calls' if r.other_calls else ''})"
            f"  goal: all found, list calls ≤ bound, 0 probes  {'ok' if r.ok else 'MISSED'}",
            flush=True,
        )
        if not r.ok:
            failed = True
            print(
                f"  FAIL: found {r.found} of {r.devices} devices, {r.list_calls} list calls "
                f"(bound {r.bound}), {r.probes} probes",
                file=sys.stderr,
            )
        gc.collect()
    print(f"peak RSS {_peak_mb():.0f} MB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
