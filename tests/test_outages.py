"""Transient and permanent faults: an outage pauses the run within its budget; a connection
that cannot work as configured fails at once, in one line that names the fix."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import structlog
import trustme

from orchestrator.engine import RunOptions, execute
from orchestrator.errors import (
    CannotConnect,
    HostNotFound,
    PlatformUnreachable,
    TLSFailed,
)
from orchestrator.loaded_plan import load_plan
from orchestrator.northbound import NorthboundClient, TLSConfig
from orchestrator.northbound.client import _connect_error
from orchestrator.northbound.outage import Outage
from orchestrator.observe import Observer
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.status import read_status
from orchestrator.submitter import Progress

from .conftest import SECRET, client_config
from .enginehelpers import SECRET_ENV, device_sets, write_plan
from .simhelpers import devices_of


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    server = SimulatorServer(
        SimulatorConfig(tls=False, devices=12000, seed=5, rate_limit=(40, 1.0))
    )
    await server.start()
    yield server
    await server.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeTime:
    """Monotonic time that moves only when slept through."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def _each_once(server: SimulatorServer, devices: list[str]) -> None:
    counts = device_sets(server.platform.truth())
    assert set(counts) == set(devices), "some devices are in no task"
    assert set(counts.values()) == {1}, "some devices are in two tasks"


class _Once(Observer):
    """Does `action` once, when the second create has been answered."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action, self.done = action, False

    def progress(self, progress: Progress) -> None:
        if progress.creates >= 2 and not self.done:
            self.done = True
            self.action()


def _once(action: Callable[[], None]) -> Observer:
    return _Once(action)


# ---- the client ------------------------------------------------------------------------------
async def test_a_refused_port_pauses_with_backoff_until_the_budget_then_names_the_outage() -> None:
    """Connection refused is transient: retried with growing pauses for 10 min, then one error."""
    server = SimulatorServer(SimulatorConfig(tls=False, devices=1))
    server.port = _closed_port()
    fake = FakeTime()
    outage = Outage(600.0, monotonic=fake.monotonic, sleep=fake.sleep)
    config = client_config(server, rate_limit=(1000, 1.0))
    async with NorthboundClient(config, outage=outage) as client:
        with pytest.raises(PlatformUnreachable) as caught:
            await client.login()
    assert "platform unreachable for 10 min" in str(caught.value)
    assert "refused the connection" in str(caught.value)
    assert 10 <= outage.pauses <= 60  # backoff: neither a busy loop nor a single long wait
    assert client.calls == outage.pauses + 1


async def test_a_gateway_outage_is_ridden_out_and_logged_without_internals(
    live_sim: SimulatorServer,
) -> None:
    """GETs during 1 s of gateway 502s pause, then succeed; the log names the outage plainly."""
    live_sim.platform.faults.update({"outage_s": 1.0, "outage_status": 502})
    with structlog.testing.capture_logs() as logs:
        async with NorthboundClient(client_config(live_sim, get_attempts=1)) as client:
            assert (await client.list_packages()).total > 0
    assert live_sim.platform.stats.replies["502"] >= 2
    assert client.outage.outages == 1 and not client.outage.active
    events = [entry["event"] for entry in logs]
    assert "platform unreachable; pausing and trying again" in events
    assert "platform reachable again; going on" in events
    assert not any("aiohttp" in repr(entry) or "Error(" in repr(entry) for entry in logs)


@pytest.fixture(scope="module")
def bad_certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a certificate for another host and an expired one for 127.0.0.1 (trustme)."""
    ca = trustme.CA()
    base = tmp_path_factory.mktemp("bad-certs")
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    other = ca.issue_cert("other.example")
    expired = ca.issue_cert(
        "127.0.0.1",
        not_before=dt.datetime(2019, 1, 1, tzinfo=dt.UTC),
        not_after=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
    )
    for name, cert in (("other", other), ("expired", expired)):
        cert.cert_chain_pems[0].write_to_path(str(base / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(base / f"{name}.key"))
    return {name: base / f"{name}" for name in ("ca", "other", "expired")}


PERMANENT = [
    ("unknown-host", "plain", HostNotFound, "is unknown (DNS): check platform.url"),
    ("self-signed", "self-signed", TLSFailed, "set platform.ca_file"),
    ("wrong-host", "other", TLSFailed, "not valid for '127.0.0.1'"),
    ("expired", "expired", TLSFailed, "has expired"),
    ("https-to-plain", "plain", TLSFailed, "speaks plain HTTP, not TLS: use http://"),
    ("http-to-tls", "self-signed", TLSFailed, "speaks TLS, not plain HTTP: use https://"),
]


@pytest.mark.parametrize(
    ("case", "server_kind", "error", "fix"),
    PERMANENT,
    ids=[case[0] for case in PERMANENT],
)
async def test_permanent_faults_fail_at_once_naming_the_fix(
    bad_certificates: dict[str, Path],
    case: str,
    server_kind: str,
    error: type[CannotConnect],
    fix: str,
) -> None:
    """Unknown host, untrusted/expired/misnamed certificate, TLS vs plain: one try, the fix."""
    config = SimulatorConfig(tls=server_kind != "plain", devices=1)
    if server_kind in ("other", "expired"):
        config.cert_file = bad_certificates[server_kind].with_suffix(".pem")
        config.key_file = bad_certificates[server_kind].with_suffix(".key")
    tls = TLSConfig(ca_file=bad_certificates["ca"].with_suffix(".pem"))
    if server_kind in ("plain", "self-signed"):
        tls = TLSConfig()
    async with SimulatorServer(config) as server:
        url = server.url
        if case == "unknown-host":
            url = "https://nonexistent.invalid:8743"
        elif case == "https-to-plain":
            url = url.replace("http://", "https://")
        elif case == "http-to-tls":
            url = url.replace("https://", "http://")
        with structlog.testing.capture_logs() as logs:
            async with NorthboundClient(
                client_config(server, base_url=url, tls=tls, outage_budget=30)
            ) as client:
                with pytest.raises(error) as caught:
                    await client.list_packages()
        assert server.platform.stats.as_dict()["total_calls"] == 0
    assert fix in str(caught.value), str(caught.value)
    assert caught.value.may_have_taken_effect is False and not caught.value.transient
    assert client.calls == 1, "a permanent fault is never retried"
    assert logs == [], "nothing retried, nothing logged"
    assert "aiohttp" not in str(caught.value) and "_ssl.c" not in str(caught.value)


CONNECT_ERRORS = [
    ("dns-unknown-name", socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
    (
        "dns-timeout",
        socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        True,
    ),
    ("refused", ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"), True),
    ("no-route", OSError(errno.EHOSTUNREACH, "No route to host"), True),
    ("network-down", OSError(errno.ENETUNREACH, "Network is unreachable"), True),
    ("connect-timeout", TimeoutError(errno.ETIMEDOUT, "timed out"), True),
]


@pytest.mark.parametrize(
    ("error", "transient"),
    [case[1:] for case in CONNECT_ERRORS],
    ids=[case[0] for case in CONNECT_ERRORS],
)
def test_a_connection_that_did_not_open_is_transient_unless_dns_knows_no_such_host(
    error: OSError, transient: bool
) -> None:
    """DNS timeouts, refusals, no route: transient (an outage); an unknown name: permanent."""
    kind, message = _connect_error(error, "iot.example.com", "iot.example.com:8743")
    raised = kind(message)
    assert raised.transient is transient and not raised.may_have_taken_effect
    assert (kind is HostNotFound) is (not transient)
    assert "Errno" not in message and "gaierror" not in message


# ---- the run ---------------------------------------------------------------------------------
async def test_a_gateway_outage_mid_run_pauses_the_run_which_completes(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """503s for 1.5 s mid-run: creates settle, nothing counts as identical failures, all done."""
    devices = devices_of(sim, "WM-200", 2560)
    plan = write_plan(
        tmp_path, sim, devices, execution="stop_after_identical_failures = 2", request_timeout=1
    )
    hook = _once(lambda: sim.platform.faults.update({"outage_s": 1.5}))
    await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"), hook)
    _each_once(sim, devices)
    assert sim.platform.stats.replies["503"] >= 2
    assert read_status(tmp_path / "j.sqlite", "test-plan")["status"] == "submitted"


async def test_a_platform_restart_mid_run_pauses_the_run_which_completes(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """The platform stops listening for 1.5 s mid-run (refused): the run waits and completes."""
    devices = devices_of(sim, "WM-200", 2560)
    plan = write_plan(tmp_path, sim, devices, execution="stop_after_identical_failures = 2")
    restarts: list[asyncio.Task[None]] = []

    sim.config.port = sim.port  # the platform comes back where it was

    async def restart() -> None:
        await sim.close()
        await asyncio.sleep(1.5)
        await sim.start()

    hook = _once(lambda: restarts.append(asyncio.get_running_loop().create_task(restart())))
    await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"), hook)
    await asyncio.gather(*restarts)
    _each_once(sim, devices)
    status = read_status(tmp_path / "j.sqlite", "test-plan")
    assert status["status"] == "submitted"
    failed = sum(n for outcome, n in status["attempts"].items() if outcome != "created")
    assert 1 <= failed <= 8  # each worker waits for the platform, not sending into the outage
    # refused connections count apart: the journal's calls are those the platform received
    received = {api: n for api, n in status["calls"].items() if api != "unreachable"}
    assert received == dict(sim.platform.stats.calls), (status["calls"], sim.platform.stats.calls)
    assert status["calls"].get("unreachable", 0) >= 1


async def test_an_outage_beyond_the_budget_stops_the_run_and_resume_finishes(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """503s longer than execution.outage_budget: the run stops with the reason; resume ends it."""
    devices = devices_of(sim, "WM-200", 2560)
    plan = write_plan(
        tmp_path, sim, devices, execution="outage_budget = 1", request_timeout=1, settle=0.2
    )
    journal = tmp_path / "j.sqlite"
    hook = _once(lambda: sim.platform.faults.update({"outage_s": 2.5}))
    with pytest.raises(PlatformUnreachable, match="platform unreachable for 1 s"):
        await execute(load_plan(plan), RunOptions(journal=journal), hook)
    status = read_status(journal, "test-plan")
    assert status["status"] == "aborted" and "unreachable" in status["stop_reason"]
    assert status["targets_in_tasks"] < len(devices)
    await asyncio.sleep(1.5)  # the outage is over
    await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
    _each_once(sim, devices)
