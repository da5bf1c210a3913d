"""Prometheus metrics of a run, read from its journal (prometheus_client).

Two ways out, one source:

- `rollout run|resume|watch --metrics-port PORT`: an HTTP endpoint (`/metrics`) served while
  the command goes; every scrape reads the journal (read-only, beside the writing engine);
- `rollout status PLAN --format prometheus`: the same metrics as a textfile for
  node_exporter's textfile collector (write it to `*.prom` atomically: `> x.tmp && mv`).

The metrics (labels; every one also carries `plan`) — the table with their meanings is in
docs/monitoring-and-reports.md: `rollout_run_info` (run, status), `rollout_targets` (wave,
state), `rollout_devices` (wave, outcome), `rollout_gate_state` (wave, state),
`rollout_gate_soak_until_timestamp_seconds` (wave), `rollout_platform_calls_total` (api),
`rollout_throttled_replies_total` (api), `rollout_last_progress_timestamp_seconds`.

The journal is flushed after every monitor poll and wave, so a scrape is at most one poll
behind the engine.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

GATE_STATES = ("pending", "waiting", "soaking", "awaiting-approval", "passed", "failed", "none")


def _extra(path: Path, run_id: int) -> dict[str, Any]:
    """What read_status does not give: quarantined per wave, throttled replies, progress."""
    import json

    from .journal import Journal

    db: sqlite3.Connection = Journal.open_readonly(path)
    try:
        quarantined = dict(
            db.execute(
                "SELECT c.wave, COUNT(*) FROM quarantine q JOIN chunks c"
                " ON c.run_id=q.run_id AND c.chunk_id=q.chunk_id WHERE q.run_id=? GROUP BY 1",
                (run_id,),
            ).fetchall()
        )
        row = db.execute("SELECT value FROM meta WHERE key=?", (f"run{run_id}:throttled",))
        found = row.fetchone()
        progress = db.execute(
            "SELECT MAX(at) FROM (SELECT MAX(finished_at) AS at FROM attempts WHERE run_id=?1"
            " AND outcome='created' UNION ALL SELECT MAX(observed_at) FROM tasks"
            " WHERE run_id=?1)",
            (run_id,),
        ).fetchone()[0]
        return {
            "quarantined": quarantined,
            "throttled": json.loads(found[0]) if found else {},
            "last_progress": progress,
        }
    finally:
        db.close()


def families(path: Path, plan_name: str) -> list[Metric]:
    """Every metric of the plan's latest run, read from the journal at `path`."""
    from .errors import JournalError
    from .status import read_status

    try:
        status = read_status(path, plan_name)
    except JournalError:
        return []  # nothing run yet: an empty scrape, not an error
    extra = _extra(path, status["run_id"])
    plan = plan_name
    info = GaugeMetricFamily(
        "rollout_run_info", "The latest run of the plan.", labels=["plan", "run", "status"]
    )
    info.add_metric([plan, str(status["run_id"]), status["status"]], 1)
    targets = GaugeMetricFamily(
        "rollout_targets", "Targets by state, per wave.", labels=["plan", "wave", "state"]
    )
    devices = GaugeMetricFamily(
        "rollout_devices",
        "Devices in tasks by outcome, per wave.",
        labels=["plan", "wave", "outcome"],
    )
    gates = GaugeMetricFamily(
        "rollout_gate_state",
        "1 for the state a wave's gate is in.",
        labels=["plan", "wave", "state"],
    )
    soak = GaugeMetricFamily(
        "rollout_gate_soak_until_timestamp_seconds",
        "When a soaking gate may pass (Unix time).",
        labels=["plan", "wave"],
    )
    for w in status["waves"]:
        name = w["name"]
        quarantined = int(extra["quarantined"].get(w["wave"], 0))
        remaining = max(0, w["targets"] - w["in_tasks"] - quarantined)
        for state, value in (
            ("in_task", w["in_tasks"]),
            ("quarantined", quarantined),
            ("remaining", remaining),
        ):
            targets.add_metric([plan, name, state], value)
        # status.py: `succeeded` are the upgraded (version verified where reported), `failed`
        # the real failures (less the already current, plus version mismatches)
        finished = w["succeeded"] + w["failed"] + w["already_current"]
        in_tasks = w["devices"] if status["target_kind"] == "groups" else w["in_tasks"]
        outcomes = {
            "finished": finished,
            "upgraded": w["succeeded"],
            "failed": w["failed"],
            "already_current": w["already_current"],
            "unfinished": max(0, in_tasks - finished),
        }
        for outcome, value in outcomes.items():
            devices.add_metric([plan, name, outcome], value)
        for state in GATE_STATES:
            gates.add_metric([plan, name, state], 1 if w["gate"] == state else 0)
        if w["gate"] == "soaking" and w["soak_until"]:
            soak.add_metric([plan, name], w["soak_until"])
    calls = CounterMetricFamily(
        "rollout_platform_calls", "Calls sent to the platform, per API.", labels=["plan", "api"]
    )
    for api, count in sorted(status["calls"].items()):
        calls.add_metric([plan, api], count)
    throttled = CounterMetricFamily(
        "rollout_throttled_replies",
        "Replies 403/1010009 (throttled; the call did not count), per API.",
        labels=["plan", "api"],
    )
    for api, count in sorted(extra["throttled"].items()):
        throttled.add_metric([plan, api], count)
    last = GaugeMetricFamily(
        "rollout_last_progress_timestamp_seconds",
        "The last create answered or task seen changing (Unix time).",
        labels=["plan"],
    )
    last.add_metric([plan], extra["last_progress"] or status["created_at"])
    return [info, targets, devices, gates, soak, calls, throttled, last]


class JournalCollector(Collector):
    """Collects on every scrape, from the journal (read-only)."""

    def __init__(self, path: Path, plan_name: str) -> None:
        self.path, self.plan_name = path, plan_name

    def collect(self) -> Iterator[Metric]:
        yield from families(self.path, self.plan_name)


def registry_for(path: Path, plan_name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JournalCollector(path, plan_name))
    return registry


def textfile(path: Path, plan_name: str) -> str:
    """The metrics in Prometheus' text format (for node_exporter's textfile collector)."""
    from prometheus_client import generate_latest

    return generate_latest(registry_for(path, plan_name)).decode()


def serve(path: Path, plan_name: str, port: int, host: str = "127.0.0.1") -> WSGIServer:
    """Serve `/metrics` on host:port in a daemon thread; `.shutdown()` stops it. Port 0
    takes a free one (`.server_port`). Raises OSError when the port is taken."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry_for(path, plan_name))
    return server
