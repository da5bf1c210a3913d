"""Waves, gates, the monitor and the reports, against the simulator in fast simulated time."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from html.parser import HTMLParser
from pathlib import Path

import pytest

from orchestrator.counts import WaveCounts
from orchestrator.engine import RunOptions, execute
from orchestrator.errors import RunHalted
from orchestrator.gates import Verdict, evaluate
from orchestrator.journal import approve_wave
from orchestrator.loaded_plan import load_plan
from orchestrator.plan import GateSection
from orchestrator.report import collect, render_to_string
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.status import read_status

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, device_sets, write_plan
from .simhelpers import devices_of

FAST_MONITOR = "follow = true\npoll_interval = 0.1\nmax_poll_interval = 0.3"
THREE_WAVES = """
[[waves]]
name = "canary"
count = 256
[waves.gate]
min_finished = 0.9
max_failed = {max_failed}
min_sample = 50
{extra}
[[waves]]
name = "quarter"
share = 0.25
[waves.gate]
min_finished = 0.9
max_failed = {max_failed}
min_sample = 50
[[waves]]
name = "rest"
"""


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


async def _sim(failure_rate: float, devices: int = 6000, speed: float = 36000) -> SimulatorServer:
    server = SimulatorServer(
        SimulatorConfig(
            tls=False,
            devices=devices,
            seed=9,
            rate_limit=(2000, 1.0),
            speed=speed,
            failure_rate=failure_rate,
        )
    )
    await server.start()
    return server


def _waves(max_failed: float, extra: str = "") -> str:
    return THREE_WAVES.format(max_failed=max_failed, extra=extra)


async def test_failing_canary_halts_and_submits_nothing_more(tmp_path: Path) -> None:
    """A canary with a high failure rate fails its gate; no later wave is submitted."""
    sim = await _sim(failure_rate=0.6)
    try:
        plan = write_plan(
            tmp_path, sim, devices_of(sim, "WM-200", 1000), monitor=FAST_MONITOR, waves=_waves(0.2)
        )
        with pytest.raises(RunHalted, match="canary"):
            await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        assert sim.platform.stats.tasks_created == 1
        status = read_status(tmp_path / "j.sqlite", "test-plan")
        assert status["status"] == "halted"
        assert status["waves"][0]["gate"] == "failed"
        assert status["waves"][1]["in_tasks"] == 0
    finally:
        await sim.close()


async def test_approval_overrides_a_failed_gate_on_resume(tmp_path: Path) -> None:
    """After `approve`, resume passes the failed gate and submits the remaining waves."""
    sim = await _sim(failure_rate=0.6)
    try:
        devices = devices_of(sim, "WM-200", 1000)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR, waves=_waves(0.2))
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted):
            await execute(load_plan(plan), RunOptions(journal=journal))
        assert approve_wave(journal, "test-plan", "canary", "tester").wave == "canary"
        with pytest.raises(RunHalted, match="quarter"):  # the next gate fails on its own
            await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        approve_wave(journal, "test-plan", "quarter", "tester")
        await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        counts = device_sets(sim.platform.truth())
        assert set(counts) == set(devices) and set(counts.values()) == {1}
    finally:
        await sim.close()


async def test_healthy_rollout_passes_every_gate(tmp_path: Path) -> None:
    """With 2 % failures every gate passes, every device is in one task, all tasks final."""
    sim = await _sim(failure_rate=0.02)
    try:
        devices = devices_of(sim, "WM-200", 1200)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR, waves=_waves(0.1))
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        status = read_status(tmp_path / "j.sqlite", "test-plan")
        assert [w["gate"] for w in status["waves"]] == ["passed", "passed", "none"]
        assert status["status"] == "completed"
        assert status["tasks_final"] == status["tasks_observed"] == len(sim.platform.tasks)
        counts = device_sets(sim.platform.truth())
        assert set(counts) == set(devices) and set(counts.values()) == {1}
    finally:
        await sim.close()


async def test_approval_gate_waits_for_the_operator(tmp_path: Path) -> None:
    """A gate with approval halts after passing until `rollout approve`, then resume goes on."""
    sim = await _sim(failure_rate=0.0)
    try:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", 800),
            monitor=FAST_MONITOR,
            waves=_waves(0.1, "approval = true"),
        )
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted, match="waits for approval"):
            await execute(load_plan(plan), RunOptions(journal=journal))
        assert sim.platform.stats.tasks_created == 1
        assert read_status(journal, "test-plan")["waves"][0]["gate"] == "awaiting-approval"
        approve_wave(journal, "test-plan", None, "tester")
        await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        assert read_status(journal, "test-plan")["targets_in_tasks"] == 800
    finally:
        await sim.close()


async def test_soak_gate_waits_before_the_next_wave(tmp_path: Path) -> None:
    """The next wave's first create comes at least `soak` seconds after the gate passed."""
    sim = await _sim(failure_rate=0.0)
    try:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", 800),
            monitor=FAST_MONITOR,
            waves=_waves(0.1, "soak = 1.5"),
        )
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        with sqlite3.connect(journal) as db:
            soak_started = db.execute(
                "SELECT MIN(at) FROM events WHERE kind='gate-soaking'"
            ).fetchone()[0]
            next_wave = db.execute(
                "SELECT MIN(sent_at) FROM attempts WHERE chunk_id LIKE 'w01-%'"
            ).fetchone()[0]
        assert soak_started is not None and next_wave - soak_started >= 1.5
    finally:
        await sim.close()


async def test_wave_window_becomes_a_custom_policy(tmp_path: Path) -> None:
    """A wave's local maintenance window is sent as executeType custom in UTC."""
    # real-time platform clock: at ×36000 a window starting within hours has begun on the
    # platform before the create arrives (refused 123033 in the hours before 02:00 Berlin)
    sim = await _sim(failure_rate=0.0, speed=1)
    try:
        waves = (
            '[[waves]]\nname = "night"\n[waves.window]\nstart = "02:00"\nend = "04:00"\n'
            'timezone = "Europe/Berlin"'
        )
        plan = write_plan(
            tmp_path, sim, devices_of(sim, "WM-200", 300), monitor="follow = false", waves=waves
        )
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        policies = [task.policy for task in sim.platform.tasks]
        assert {p["executeType"] for p in policies} == {"custom"}
        start, end = policies[0]["startTime"], policies[0]["endTime"]
        assert start.endswith("Z") and end.endswith("Z") and start < end
        # 02:00-04:00 in Berlin is 00:00-02:00 or 01:00-03:00 UTC, depending on the season
        assert end[9:11] in ("02", "03")
    finally:
        await sim.close()


async def test_a_wave_window_open_now_works_on_a_fast_simulated_clock(tmp_path: Path) -> None:
    """At ×36000 (the platform's clock races ahead while a create is in flight) a wave whose
    daily window is open now is created, not refused 123033."""
    sim = await _sim(failure_rate=0.0)
    try:
        waves = (
            '[[waves]]\nname = "day"\n[waves.window]\nstart = "00:00"\nend = "23:55"\n'
            'timezone = "UTC"'
        )
        plan = write_plan(
            tmp_path, sim, devices_of(sim, "WM-200", 300), monitor="follow = false", waves=waves
        )
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        assert len(sim.platform.tasks) == 2
        assert {t.policy["executeType"] for t in sim.platform.tasks} == {"custom"}
        assert "123033" not in sim.platform.stats.replies
    finally:
        await sim.close()


async def test_monitor_uses_list_pages_and_reads_each_subtask_once(tmp_path: Path) -> None:
    """The monitor never queries tasks one by one; it reads every subtask of a finished task
    once, 100 a page: ⌈n/100⌉ calls for a task of n devices."""
    sim = await _sim(failure_rate=0.05)
    try:
        plan = write_plan(tmp_path, sim, devices_of(sim, "WM-200", 1400), monitor=FAST_MONITOR)
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        status = read_status(tmp_path / "j.sqlite", "test-plan")
        calls = status["calls"]
        pages = sum(-(-len(t.device_ids) // 100) for t in sim.platform.tasks)
        assert calls.get("getTask", 0) == 0
        assert calls["subOperations"] == pages == 3 * 5 + 2  # five tasks of 256, one of 120
        assert sim.platform.stats.calls["subOperations"] == pages
        assert status["devices_version_verified"] == status["devices_succeeded"]
    finally:
        await sim.close()


class _DeviceTable(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_devices = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._in_devices = dict(attrs).get("id") == "devices"
        elif self._in_devices and tag == "tr":
            self.rows.append([])
        elif self._in_devices and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_devices = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


async def test_report_rows_equal_the_simulator_truth(tmp_path: Path) -> None:
    """CSV, JSON and HTML device rows match /_sim/tasks and the subtasks of every device."""
    sim = await _sim(failure_rate=0.1)
    try:
        devices = devices_of(sim, "WM-200", 700)
        plan = write_plan(tmp_path, sim, devices, monitor=FAST_MONITOR)
        await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        truth: dict[str, tuple[str, str, str]] = {}
        for task in sim.platform.truth():
            for sub in sim.platform.sub_operations(task["operationId"], None):
                status = {"success": "succeeded", "fail": "failed"}[sub["status"]]
                detail = sub["detailInfo"] if status == "failed" else ""
                truth[sub["deviceId"]] = (task["operationId"], status, detail)
        assert set(truth) == set(devices)
        data = collect(tmp_path / "j.sqlite", "test-plan")

        rows = list(csv.DictReader(io.StringIO(render_to_string(data, "csv"))))
        from_csv = {
            r["device_id"]: (r["operation_id"], r["subtask_status"], r["detail"]) for r in rows
        }
        from_json = {
            d["device_id"]: (d["operation_id"], d["subtask_status"], d["detail"])
            for d in json.loads(render_to_string(data, "json"))["devices"]
        }
        parser = _DeviceTable()
        parser.feed(render_to_string(data, "html"))
        from_html = {r[0]: (r[3], r[5], r[7]) for r in parser.rows if r}
        assert len(rows) == len(devices)
        assert from_csv == truth
        assert from_json == truth
        assert from_html == truth
        assert any(status == "failed" for _, status, _ in truth.values())
    finally:
        await sim.close()


@pytest.mark.parametrize(
    ("counts", "verdict"),
    [
        (WaveCounts(256, 256, 0, 1, 0, 3, 3), Verdict.WAIT),  # 3 of 6 failed, sample too small
        (WaveCounts(256, 256, 0, 1, 0, 30, 25), Verdict.FAIL),  # 25 of 55 failed
        (WaveCounts(256, 256, 0, 1, 0, 200, 5), Verdict.PASS),  # 205 finished, 2.4 % failed
        (WaveCounts(256, 256, 0, 1, 1, 2, 2), Verdict.FAIL),  # wave over: judged on what there is
        (WaveCounts(256, 256, 0, 1, 0, 100, 2), Verdict.WAIT),  # 40 % finished < 80 %
    ],
)
def test_gate_verdicts_follow_the_min_sample_rule(counts: WaveCounts, verdict: Verdict) -> None:
    """Failure share is judged only from min_sample finished devices, or a finished wave."""
    gate = GateSection(min_finished=0.8, max_failed=0.1, min_sample=50)
    assert evaluate(gate, counts)[0] is verdict
