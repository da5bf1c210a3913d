"""Prometheus metrics of a run: scraped while it goes, and as a textfile."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.engine import RunOptions, execute
from orchestrator.loaded_plan import load_plan
from orchestrator.metrics import serve, textfile
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.status import read_status

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, write_plan
from .simhelpers import devices_of

MONITOR = "follow = true\npoll_interval = 0.2\nmax_poll_interval = 0.3"
WAVES = '[[waves]]\nname = "canary"\ncount = 256\n[waves.gate]\nmin_finished = 0.9\n'
WAVES += '[[waves]]\nname = "rest"\n'

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _samples(text: str) -> Samples:
    """(metric name, sorted labels without plan) → value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "plan"))
            found[(sample.name, labels)] = sample.value
    return found


async def _scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(url) as reply:
        assert reply.status == 200
        return _samples(await reply.text())


async def test_metrics_scraped_during_a_run_follow_the_journal(tmp_path: Path) -> None:
    """Scrapes while the run goes show it moving; the last one equals the journal: devices
    by outcome and wave, calls by API, gate states, run status, last progress."""
    config = SimulatorConfig(tls=False, devices=3000, seed=4, rate_limit=(2000, 1.0), speed=3000)
    async with SimulatorServer(config) as sim:
        plan = write_plan(
            tmp_path, sim, devices_of(sim, "WM-200", 600), monitor=MONITOR, waves=WAVES
        )
        journal = tmp_path / "j.sqlite"
        server = serve(journal, "test-plan", 0)
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        try:
            async with aiohttp.ClientSession() as session:
                assert await _scrape(session, url) == {}  # no run yet: empty, not an error
                run = asyncio.create_task(execute(load_plan(plan), RunOptions(journal=journal)))
                seen: list[Samples] = []
                while not run.done():
                    seen.append(await _scrape(session, url))
                    await asyncio.sleep(0.05)
                await run
                last = await _scrape(session, url)
        finally:
            server.shutdown()
            server.server_close()
    status = read_status(journal, "test-plan")
    running = [
        s for s in seen if s.get(("rollout_run_info", (("run", "1"), ("status", "running"))))
    ]
    assert running, "no scrape saw the run going"
    assert any(
        s.get(("rollout_gate_state", (("state", "waiting"), ("wave", "canary")))) == 1
        or s.get(("rollout_targets", (("state", "remaining"), ("wave", "rest")))) == 344
        for s in running
    )
    assert last[("rollout_run_info", (("run", "1"), ("status", "completed")))] == 1
    for api, calls in status["calls"].items():
        assert last[("rollout_platform_calls_total", (("api", api),))] == calls
    for w in status["waves"]:
        wave = ("wave", w["name"])
        assert last[("rollout_devices", (("outcome", "failed"), wave))] == w["failed"]
        assert last[("rollout_devices", (("outcome", "upgraded"), wave))] == w["succeeded"]
        assert last[("rollout_targets", (("state", "in_task"), wave))] == w["targets"]
        assert last[("rollout_gate_state", (("state", w["gate"]), wave))] == 1
    assert last[("rollout_last_progress_timestamp_seconds", ())] >= status["created_at"]


async def test_throttled_replies_reach_the_textfile(tmp_path: Path) -> None:
    """A plan whose rate exceeds the platform's draws throttled replies; the textfile counts
    exactly as many as the platform refused."""
    config = SimulatorConfig(tls=False, devices=3000, seed=4, rate_limit=(6, 1.0), speed=3000)
    async with SimulatorServer(config) as sim:
        plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 750), monitor=MONITOR)
        plan.write_text(plan.read_text().replace('rate_limit = "6/1"', 'rate_limit = "60/1"'))
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        refused = sim.platform.stats.throttled
    samples = _samples(textfile(journal, "test-plan"))
    counted = sum(
        v for (name, _), v in samples.items() if name == "rollout_throttled_replies_total"
    )
    assert refused > 0 and counted == refused


async def test_failed_never_falls_when_a_running_tasks_failures_are_read(tmp_path: Path) -> None:
    """A running task's failures not read yet are `failed_unread` (not finished), not failed:
    reading them (7 already current, 3 failed) takes status, the gauge and the report from 0
    to 3 failed — never from 10 down to 3 — and the report counts as status does."""
    from orchestrator.journal import Journal
    from orchestrator.northbound import StaResult, SubOperation, Task
    from orchestrator.report import collect

    async with SimulatorServer(SimulatorConfig(tls=False, devices=600, seed=3)) as sim:
        plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 100), monitor="follow = false")
        journal_path = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal_path))
    journal = Journal.open(journal_path)
    try:
        run = journal.latest_run("test-plan")
        assert run is not None
        (version,) = journal._db.execute("SELECT package_version FROM runs").fetchone()
        ((chunk_id, operation_id, members),) = journal._db.execute(
            "SELECT chunk_id, operation_id, members FROM chunks WHERE state='submitted'"
        ).fetchall()
        devices = members.split("\n")
        counters = StaResult(total=100, processing=80, success=10, fail=10)
        running = Task(operationId=operation_id, status="processing", staResult=counters)
        journal.record_task(run.run_id, chunk_id, 0, running)

        def seen() -> tuple[int, int, int, float, int]:
            status = read_status(journal_path, "test-plan")
            gauge = _samples(textfile(journal_path, "test-plan"))
            report = collect(journal_path, "test-plan").totals
            assert report["failed"] == status["devices_failed"]
            assert report["already_current"] == status["devices_already_current"]
            failed = gauge[("rollout_devices", (("outcome", "failed"), ("wave", "all")))]
            return (
                status["devices_failed"],
                status["devices_failed_unread"],
                status["devices_already_current"],
                failed,
                report["in_progress"],
            )

        assert seen() == (0, 10, 0, 0.0, 100)
        same = f"current version {version} is the same as the target version"
        fails = [
            SubOperation(
                deviceId=d,
                status="fail",
                detailInfo=same,
                extendInfo={"fileVersion": version},
            )
            for d in devices[:7]
        ] + [
            SubOperation(
                deviceId=d, status="fail", startTime="2026-01-01T00:00:00Z", detailInfo="x"
            )
            for d in devices[7:10]
        ]
        journal.record_failures(run.run_id, operation_id, fails, version)
        assert seen() == (3, 0, 7, 3.0, 90)
    finally:
        journal.close()
