"""One application, many `rollout` processes on one host, one simulator process: one token,
one call budget. Arrivals are measured on the platform's side (`GET /_sim/arrivals`, on the
host's CLOCK_MONOTONIC), the runs' create times come from their journals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.simulator.testing import get_json, simulator_process

from .enginehelpers import SECRET_ENV

MODELS = {  # model -> (device type, manufacturer, newest firmware)
    "WM-200": ("WaterMeter", "Aqualis", "2.1.0"),
    "WM-310": ("WaterMeter", "Aqualis", "3.1.0"),
    "GM-10": ("GasMeter", "Gastro", "5.4.0"),
    "TR-1": ("Tracker", "Trakko", "1.0.0"),
}


@dataclass
class Fleet:
    url: str
    ids: dict[str, list[str]]  # model -> device IDs
    calls: int
    seconds: float


@dataclass
class Plan:
    path: Path
    targets: list[str]

    @property
    def journal(self) -> Path:
        return self.path.parent / ".rollout" / f"{self.path.stem}.journal.sqlite"


@contextlib.contextmanager
def _fleet(directory: Path, rate: str, *args: str) -> Iterator[Fleet]:
    with simulator_process(directory, "--rate-limit", rate, *args) as (url, fleet_csv):
        ids: dict[str, list[str]] = {model: [] for model in MODELS}
        for line in fleet_csv.read_text().splitlines()[1:]:
            fields = line.split(",")
            ids.setdefault(fields[2], []).append(fields[0])
        calls, seconds = rate.split("/")
        yield Fleet(url, ids, int(calls), float(seconds))


def _plan(
    directory: Path,
    fleet: Fleet,
    name: str,
    model: str,
    targets: list[str],
    monitor: str = "follow = false",
) -> Plan:
    device_type, manufacturer, version = MODELS[model]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.txt").write_text("\n".join(targets) + "\n")
    path = directory / f"{name}.toml"
    path.write_text(f"""
name = "{name}"
[platform]
url = "{fleet.url}"
secret_env = "{SECRET_ENV}"
rate_limit = "{fleet.calls}/{fleet.seconds:g}"
request_timeout = 2
[firmware]
version = "{version}"
device_type = "{device_type}"
model = "{model}"
manufacturer = "{manufacturer}"
[fleet]
devices_file = "{name}.txt"
[execution]
settle = 0.2
[monitor]
{monitor}
""")
    return Plan(path, targets)


def _env() -> dict[str, str]:
    return dict(os.environ, **{SECRET_ENV: "demo-secret"})


def _start(command: str, plan: Plan) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--log-level", "warning", command, str(plan.path)],
        cwd=plan.path.parent,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> int:
    _, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err, err[-2000:]
    if proc.returncode != 0:
        print(err[-2000:])
    return proc.returncode


def _rollout(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _create_span(plan: Plan) -> tuple[float, float]:
    """When the plan's first create left and its last create's reply came, on the host's
    monotonic clock (the journal keeps wall-clock times)."""
    with sqlite3.connect(plan.journal) as db:
        first, last = db.execute(
            "SELECT MIN(sent_at), MAX(finished_at) FROM attempts WHERE outcome = 'created'"
        ).fetchone()
    offset = time.time() - time.monotonic()
    return float(first) - offset, float(last) - offset


def _created(plan: Plan) -> int:
    """Creates the plan's run has had answered so far (read beside the running process)."""
    if not plan.journal.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{plan.journal}?mode=ro", uri=True) as db:
            row = db.execute("SELECT COUNT(*) FROM attempts WHERE outcome = 'created'").fetchone()
    except sqlite3.OperationalError:  # the run has not created its tables yet
        return 0
    return int(row[0])


def _arrivals(fleet: Fleet) -> list[list[Any]]:
    rows = get_json(fleet.url + "/_sim/arrivals")["arrivals"]
    assert isinstance(rows, list)
    return rows


def _utilisation(fleet: Fleet, api: str | None, start: float, end: float) -> float:
    """Calls (of `api`, or all) the platform admitted in [start, end) over what the limit
    allows in that time."""
    admitted = [
        row
        for row in _arrivals(fleet)
        if row[3] and start <= row[0] < end and (api is None or row[2] == api)
    ]
    return len(admitted) / ((end - start) * fleet.calls / fleet.seconds)


def _in_tasks(fleet: Fleet) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in get_json(fleet.url + "/_sim/tasks")["tasks"]:
        for device in task["devices"]:
            counts[device] = counts.get(device, 0) + 1
    return counts


TTL = 20.0


def test_three_runs_and_a_watch_share_one_budget_and_one_token(tmp_path: Path) -> None:
    """Three plans of one app in three processes plus `watch` of a fourth plan's earlier run:
    0 throttled, one login over all processes, every run completes, the three runs' creates
    reach ≥ 0.95 of the limit while they overlap, and `rollout budget` shows them all."""
    with _fleet(
        tmp_path, "20/2", "--devices", "44000", "--seed", "9", "--speed", "3600",
        "--token-ttl", f"{TTL:g}",
    ) as fleet:  # fmt: skip
        started = time.monotonic()
        earlier = _plan(
            tmp_path / "d",
            fleet,
            "trackers",
            "TR-1",
            fleet.ids["TR-1"][:512],
            "follow = false\npoll_interval = 0.5\nmax_poll_interval = 1",
        )
        assert _finish(_start("run", earlier)) == 0
        runs = [
            _plan(tmp_path / name, fleet, name, model, fleet.ids[model][: 40 * 256])
            for name, model in (("water-a", "WM-200"), ("water-b", "WM-310"), ("gas", "GM-10"))
        ]
        procs = [_start("watch", earlier)] + [_start("run", plan) for plan in runs]
        deadline = time.monotonic() + 30
        sharing: list[dict[str, Any]] = []
        while time.monotonic() < deadline and len(sharing) < 4:
            time.sleep(0.5)
            budget = json.loads(_rollout("budget", "--json", cwd=tmp_path).stdout)
            view = budget[0]["budget"] if budget else None
            if view is not None:
                sharing = [
                    o
                    for o in view["owners"]
                    if o["state"] in ("active", "waiting")
                    and o["label"].startswith(("run", "watch"))
                ]
        codes = [_finish(proc) for proc in procs]
        elapsed = time.monotonic() - started
        stats = get_json(fleet.url + "/_sim/stats")
        spans = [_create_span(plan) for plan in runs]
        overlap = (max(first for first, _ in spans), min(last for _, last in spans))
        utilisation = _utilisation(fleet, "createTask", *overlap)
        counts = _in_tasks(fleet)
    assert codes == [0, 0, 0, 0]
    assert stats["throttled"] == 0
    assert stats["calls"]["login"] == 1  # five processes, one login
    assert stats["calls"].get("refreshToken", 0) <= elapsed / (TTL / 2)
    assert overlap[1] - overlap[0] > 2 * fleet.seconds
    assert utilisation >= 0.95, f"creates reached {utilisation:.3f} of the limit"
    assert all(counts.get(device) == 1 for plan in runs for device in plan.targets)
    labels = sorted(o["label"].split(" (")[0] for o in sharing)
    assert labels == ["run gas", "run water-a", "run water-b", "watch trackers"], sharing
    assert sum(o["calls_last_window"] for o in sharing) > 0


def test_a_killed_run_leaves_the_others_the_whole_budget(tmp_path: Path) -> None:
    """SIGKILL one of three runs mid-run: from one window later the other two reach ≥ 0.95
    of the limit, no call is ever throttled, and a resume of the killed run completes it."""
    with _fleet(
        tmp_path, "20/2", "--devices", "44000", "--seed", "10", "--speed", "36000",
    ) as fleet:  # fmt: skip
        runs = [
            _plan(tmp_path / name, fleet, name, model, fleet.ids[model][: 40 * 256])
            for name, model in (("water-a", "WM-200"), ("water-b", "WM-310"), ("gas", "GM-10"))
        ]
        procs = [_start("run", plan) for plan in runs]
        deadline = time.monotonic() + 60
        while _created(runs[1]) < 5:  # the victim is well into its run
            assert time.monotonic() < deadline, "the run did not start creating"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        procs[1].wait(10)
        codes = [_finish(procs[0]), _finish(procs[2])]
        spans = [_create_span(runs[0]), _create_span(runs[2])]
        end = min(last for _, last in spans)
        utilisation = _utilisation(fleet, None, killed_at + fleet.seconds, end)
        throttled_during = get_json(fleet.url + "/_sim/stats")["throttled"]
        resumed = _finish(_start("resume", runs[1]))
        stats = get_json(fleet.url + "/_sim/stats")
        counts = _in_tasks(fleet)
    assert codes == [0, 0] and resumed == 0
    assert throttled_during == 0 and stats["throttled"] == 0
    assert end - (killed_at + fleet.seconds) > fleet.seconds
    assert utilisation >= 0.95, f"the two runs reached {utilisation:.3f} of the limit"
    assert all(counts.get(device) == 1 for plan in runs for device in plan.targets)


def test_another_client_spending_half_and_4_s_tokens(tmp_path: Path) -> None:
    """Another client spends half the budget and tokens live 4 s: the run completes, no
    error (refreshes and throttles are waited out)."""
    with _fleet(
        tmp_path, "30/3", "--devices", "28000", "--seed", "11", "--speed", "36000",
        "--storm-share", "0.5", "--token-ttl", "4",
    ) as fleet:  # fmt: skip
        plan = _plan(tmp_path / "water", fleet, "water", "WM-200", fleet.ids["WM-200"][: 24 * 256])
        code = _finish(_start("run", plan))
        stats = get_json(fleet.url + "/_sim/stats")
        counts = _in_tasks(fleet)
        status = json.loads(_rollout("status", "--json", str(plan.path), cwd=tmp_path).stdout)
    assert code == 0
    assert status["status"] == "submitted" and status["stop_reason"] in (None, "")
    assert stats["storm_admitted"] > 0 and stats["calls"].get("refreshToken", 0) >= 1
    assert all(counts.get(device) == 1 for device in plan.targets)


def test_three_runs_with_4_s_tokens_beside_another_client_send_each_create_once(
    tmp_path: Path,
) -> None:
    """Three runs in three processes, tokens living 4 s, another client spending half the
    budget: every run completes, each chunk's create is admitted once (no create is spent on
    a token replaced while it waited for its slot), one renewal per token lifetime over all
    processes, and 1010005 stays rare."""
    with _fleet(
        tmp_path, "20/2", "--devices", "44000", "--seed", "12", "--speed", "36000",
        "--storm-share", "0.5", "--token-ttl", "4",
    ) as fleet:  # fmt: skip
        runs = [
            _plan(tmp_path / name, fleet, name, model, fleet.ids[model][: 10 * 256])
            for name, model in (("water-a", "WM-200"), ("water-b", "WM-310"), ("gas", "GM-10"))
        ]
        started = time.monotonic()
        codes = [_finish(proc, timeout=180) for proc in [_start("run", plan) for plan in runs]]
        elapsed = time.monotonic() - started
        stats = get_json(fleet.url + "/_sim/stats")
        creates = [row for row in _arrivals(fleet) if row[2] == "createTask" and row[3]]
        counts = _in_tasks(fleet)
    assert codes == [0, 0, 0]
    assert stats["storm_admitted"] > 0 and stats["calls"].get("refreshToken", 0) >= 1
    assert len(creates) == stats["tasks_created"] == 30
    renewals = stats["calls"]["login"] + stats["calls"]["refreshToken"]
    assert renewals <= elapsed / 4 + 1, f"{renewals} logins and refreshes in {elapsed:.0f} s"
    refusals = stats["replies"].get("1010005", 0)
    assert refusals <= elapsed / 4 + 3, f"{refusals} calls refused 1010005 in {elapsed:.0f} s"
    assert all(counts.get(device) == 1 for plan in runs for device in plan.targets)
