"""Webhook notifications (`[[notify]]`) against a local aiohttp receiver."""

from __future__ import annotations

import contextlib
import io
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from rich.console import Console

from orchestrator.engine import RunOptions, execute
from orchestrator.errors import InputError, JournalError, RunHalted
from orchestrator.loaded_plan import load_plan
from orchestrator.logs import configure_logging, use_consoles
from orchestrator.observe import NoticeKind
from orchestrator.plan import NOTICE_EVENTS
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.status import read_status

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, device_sets, write_fleet, write_plan
from .simhelpers import devices_of, newest_package

HOOK_ENV = "ROLLOUT_TEST_WEBHOOK"
HOOK_SECRET = "T000/B000/s3cr3t-hook-token"
MONITOR = "follow = true\npoll_interval = 0.1\nmax_poll_interval = 0.3"


def _waves(gate: str) -> str:
    canary = f'[[waves]]\nname = "canary"\ncount = 256\n[waves.gate]\n{gate}\n'
    return canary + '[[waves]]\nname = "rest"\n'


def _notify(extra: str = "") -> str:
    return f'[[notify]]\nurl_env = "{HOOK_ENV}"\ngive_up_after = 3\nattempts = 4\n{extra}\n'


@dataclass
class Receiver:
    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    fail_first: int = 0  # answer 503 to this many requests first


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A chat-webhook-like receiver on loopback that keeps every JSON body it accepts."""
    state = Receiver("")

    async def hook(request: web.Request) -> web.Response:
        state.requests += 1
        if state.requests <= state.fail_first:
            return web.Response(status=503)
        state.bodies.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/services/{token:.*}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}/services/{HOOK_SECRET}"
    try:
        yield state
    finally:
        await runner.cleanup()


def _gate(journal: Path) -> str | None:
    """The first wave's gate state, None while the journal holds no run yet."""
    try:
        return str(read_status(journal, "test-plan")["waves"][0]["gate"])
    except JournalError:  # no file yet, or the file before its run row
        return None


def _sim() -> SimulatorServer:
    return SimulatorServer(
        SimulatorConfig(tls=False, devices=3000, seed=4, rate_limit=(2000, 1.0), speed=36000)
    )


async def test_gate_and_run_notices_reach_the_webhook(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A passed gate and the completed run each arrive once as JSON with a plain `text`; a
    receiver that answers 503 at first gets them on a retry, logged as webhook 1's (never as
    a platform call's); the URL is never logged."""
    monkeypatch.setenv(HOOK_ENV, receiver.url)
    receiver.fail_first = 2
    console = Console(file=io.StringIO(), width=200, record=True)
    configure_logging("console", "debug", console=console)
    try:
        async with _sim() as sim:
            plan = write_plan(
                tmp_path,
                sim,
                devices_of(sim, "WM-200", 600),
                monitor=MONITOR + "\n" + _notify(),
                waves=_waves("min_finished = 0.9"),
            )
            await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    finally:
        use_consoles()
        configure_logging()
    assert [body["event"] for body in receiver.bodies] == ["gate-passed", "run-completed"]
    assert receiver.requests == 4  # two refused, then one each
    passed, completed = receiver.bodies
    assert passed["text"].startswith("[rollout test-plan] wave 'canary' passed its gate")
    assert passed["detail"]["wave"] == "canary" and passed["run_id"] == 1
    assert "600 targets in tasks" in completed["text"]
    logs = console.export_text()
    assert HOOK_SECRET not in logs
    retries = [line for line in logs.splitlines() if "HTTP 503" in line]
    assert len(retries) == 2, retries
    assert all("webhook delivery failed" in line and "webhook=1" in line for line in retries)
    assert "call failed; trying again" not in logs


async def test_a_receiver_that_is_down_never_stops_the_rollout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing listening at the webhook's address the run completes, waiting for the
    notices no longer than give_up_after; the warning names no URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/services/{HOOK_SECRET}"
    monkeypatch.setenv(HOOK_ENV, url)
    console = Console(file=io.StringIO(), width=200, record=True)
    configure_logging("console", "info", console=console)
    try:
        async with _sim() as sim:
            devices = devices_of(sim, "WM-200", 600)
            plan = write_plan(
                tmp_path,
                sim,
                devices,
                monitor=MONITOR + "\n" + _notify(),
                waves=_waves("min_finished = 0.9"),
            )
            started = time.monotonic()
            result = await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
            elapsed = time.monotonic() - started
            counts = device_sets(sim.platform.truth())
    finally:
        use_consoles()
        configure_logging()
    assert result.counts["targets_submitted"] == 600
    assert set(counts) == set(devices) and set(counts.values()) == {1}
    logs = console.export_text()
    assert "notification not delivered" in logs
    assert HOOK_SECRET not in logs and str(port) not in logs
    assert elapsed < 15  # the rollout itself takes a few seconds; notices add at most 3 s


async def test_a_halt_at_an_approval_gate_is_told(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gate that waits for approval sends gate-awaiting-approval and run-halted; an entry
    with `events` hears only those it names."""
    monkeypatch.setenv(HOOK_ENV, receiver.url)
    async with _sim() as sim:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", 600),
            monitor=MONITOR + "\n" + _notify() + _notify('events = ["run-halted"]'),
            waves=_waves("min_finished = 0.9\napproval = true"),
        )
        with pytest.raises(RunHalted):
            await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
    events = sorted(body["event"] for body in receiver.bodies)
    assert events == ["gate-awaiting-approval", "run-halted", "run-halted"]


async def test_an_unset_webhook_variable_is_bad_input_before_any_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `[[notify]]` whose environment variable is unset is refused (exit 2), nothing sent."""
    monkeypatch.delenv(HOOK_ENV, raising=False)
    async with _sim() as sim:
        plan = write_plan(
            tmp_path, sim, devices_of(sim, "WM-200", 10), monitor=MONITOR + "\n" + _notify()
        )
        with pytest.raises(InputError, match=rf"notify\.0\.url_env.*{HOOK_ENV} is not set"):
            await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        assert sum(sim.platform.stats.calls.values()) == 0


def test_the_plan_knows_every_notice_the_engine_sends() -> None:
    """`notify.events` accepts exactly the notices the engine can send."""
    assert set(NOTICE_EVENTS) == {kind.value for kind in NoticeKind}


async def test_a_platform_out_of_reach_is_told_as_an_outage(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The platform going away while a gate waits is told as an `outage` when the pause
    begins, and the run stopping once the outage outlasts its budget as `run-aborted`."""
    import asyncio

    from orchestrator.errors import PlatformCallError

    monkeypatch.setenv(HOOK_ENV, receiver.url)
    sim = SimulatorServer(  # real-time meters: the canary's gate waits
        SimulatorConfig(tls=False, devices=3000, seed=4, rate_limit=(2000, 1.0), speed=1)
    )
    await sim.start()
    plan = write_plan(
        tmp_path,
        sim,
        devices_of(sim, "WM-200", 600),
        monitor=MONITOR + "\n" + _notify(),
        waves=_waves("min_finished = 0.9"),
        execution="outage_budget = 2",  # ridden out for 2 s, then the run stops
    )
    journal = tmp_path / "j.sqlite"
    run = asyncio.create_task(execute(load_plan(plan), RunOptions(journal=journal)))
    try:
        for _ in range(200):
            await asyncio.sleep(0.05)
            if _gate(journal) == "waiting":
                break
    finally:
        await sim.close()
    with pytest.raises(PlatformCallError):
        await run
    assert [body["event"] for body in receiver.bodies] == ["outage", "run-aborted"]
    assert "out of reach" in receiver.bodies[0]["text"]
    assert "rollout resume" in receiver.bodies[0]["text"]
    assert "rollout resume" in receiver.bodies[1]["text"]


def test_ctrl_c_while_the_end_waits_on_webhooks_stops_at_once_with_the_runs_code(
    tmp_path: Path,
) -> None:
    """A run that got to its end waits on a webhook that answers late; Ctrl-C then stops the
    wait at once and the command exits with the run's code (0), not 130."""
    import http.server
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import threading

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            time.sleep(25)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    hook.daemon_threads = True
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    sim = SimulatorServer(SimulatorConfig(devices=600, seed=3))  # not started: its fleet only
    write_fleet(tmp_path / "fleet.txt", devices_of(sim, "WM-200", 50))
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'name = "drain"\n[platform]\nurl = "simulator"\napp_id = "demo-app"\n'
        f'rate_limit = "1000/1"\nrequest_timeout = 2\n'
        f"[platform.simulator]\ndevices = 600\nseed = 3\n"
        f'[firmware]\nfile_id = "{newest_package(sim).file_id}"\n'
        f'[fleet]\ndevices_file = "fleet.txt"\n[policy]\nexecute_type = "now"\n'
        f"[execution]\nsettle = 0.2\n[monitor]\nfollow = false\n"
        + _notify().replace("give_up_after = 3", "give_up_after = 20\ntimeout = 25")
    )
    env = dict(os.environ, ROLLOUT_STATE_DIR=str(tmp_path / "state"))
    env[HOOK_ENV] = f"http://127.0.0.1:{hook.server_address[1]}/services/x"
    run = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--log-level", "error", "run", str(plan)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = tmp_path / ".rollout" / "drain.journal.sqlite"
    deadline = time.monotonic() + 60
    status = None
    while status != "submitted" and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.1)
        if journal.exists():
            with contextlib.suppress(sqlite3.Error), sqlite3.connect(journal) as db:
                row = db.execute("SELECT status FROM runs").fetchone()
                status = row[0] if row else None
    time.sleep(1.0)  # the run has ended; its end waits on the webhook
    interrupted = time.monotonic()
    run.send_signal(signal.SIGINT)
    try:
        _, err = run.communicate(timeout=40)
    finally:
        run.kill()
        hook.shutdown()
    assert time.monotonic() - interrupted < 5, err
    assert run.returncode == 0, err
    assert "interrupted" not in err


async def test_steps_on_a_halted_run_spend_no_call_and_tell_it_once(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps on a run halted by a failed gate (not approved) make no call and send no
    notice again: run-halted arrives once, each step exits as a halt."""
    monkeypatch.setenv(HOOK_ENV, receiver.url)
    sim = SimulatorServer(
        SimulatorConfig(
            tls=False, devices=3000, seed=9, rate_limit=(2000, 1.0), speed=36000, failure_rate=0.6
        )
    )
    async with sim:
        plan = write_plan(
            tmp_path,
            sim,
            devices_of(sim, "WM-200", 600),
            monitor=MONITOR + "\n" + _notify(),
            waves=_waves("min_finished = 0.9\nmax_failed = 0.15\nmin_sample = 100"),
        )
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted, match="canary"):
            await execute(load_plan(plan), RunOptions(journal=journal))
        calls_before = sim.platform.stats.calls.copy()
        for _ in range(3):
            with pytest.raises(RunHalted, match=r"canary.*failed its gate"):
                await execute(load_plan(plan), RunOptions(journal=journal, step=True))
        assert sim.platform.stats.calls == calls_before  # not even a login
    events = [body["event"] for body in receiver.bodies]
    assert events.count("run-halted") == 1 and events.count("gate-failed") == 1, events


@pytest.mark.parametrize(
    "url",
    [
        "http://",
        "http://[::1",
        "http://127.0.0.1:99999/hook",
        "http://exa mple.com/hook",
        "ftp://example.com/hook",
    ],
)
async def test_a_malformed_webhook_url_is_bad_input_before_any_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """A webhook URL that could not be sent to is refused (exit 2) naming the variable, never
    its value, before any call — not retried as a delivery."""
    monkeypatch.setenv(HOOK_ENV, url)
    async with _sim() as sim:
        plan = write_plan(
            tmp_path, sim, devices_of(sim, "WM-200", 10), monitor=MONITOR + "\n" + _notify()
        )
        with pytest.raises(InputError, match=rf"notify\.0\.url_env.*{HOOK_ENV} does not") as bad:
            await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        assert url not in str(bad.value) and len(str(bad.value).splitlines()) == 1
        assert sum(sim.platform.stats.calls.values()) == 0
