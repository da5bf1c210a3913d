"""Shared fixtures: the real simulator on loopback (HTTP and HTTPS), started with AppRunner."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import trustme

from orchestrator.simulator import ManualClock, SimulatorConfig, SimulatorServer

APP_ID = "demo-app"
SECRET = "demo-secret"
LOGIN = "/iocm/app/sec/v1.1.0/login"
UPGRADE = "/iodm/northbound/v1.5.0"


@dataclass
class RawPlatform:
    """A bare aiohttp session against the simulator: tests of the simulator use no client code."""

    server: SimulatorServer
    session: aiohttp.ClientSession
    clock: ManualClock | None
    token: str = ""

    @property
    def url(self) -> str:
        return self.server.url

    async def login(self) -> str:
        async with self.session.post(
            self.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}
        ) as reply:
            assert reply.status == 200, await reply.text()
            self.token = (await reply.json())["accessToken"]
        return self.token

    def headers(self) -> dict[str, str]:
        return {"app_key": APP_ID, "Authorization": f"Bearer {self.token}"}

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.session.request(
            method,
            self.url + path,
            json=json,
            params=params,
            headers=self.headers() if headers is None else headers,
        ) as reply:
            empty = reply.status == 204 or reply.content_length == 0  # e.g. §3.3's 200
            body = None if empty else await reply.json()
            return reply.status, body, reply

    async def admin(self, path: str, json: Any = None) -> Any:
        method = "POST" if json is not None else "GET"
        async with self.session.request(method, self.url + path, json=json) as reply:
            return await reply.json()


@pytest.fixture(autouse=True)
def private_host_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test has its own host state (token cache, pacing ledger), inherited by the
    processes it starts: never the user's, never another test's."""
    root = tmp_path / "host-state"
    monkeypatch.setenv("ROLLOUT_STATE_DIR", str(root))
    return root


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Each test starts with structlog's defaults and the shared consoles unset: a command
    run in-process (CliRunner) configures logging globally, for the tests after it too."""
    yield
    from orchestrator.logs import use_consoles

    structlog.reset_defaults()
    use_consoles()


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sim_config() -> SimulatorConfig:
    return SimulatorConfig(tls=False, devices=600, seed=7, rate_limit=(1000, 60.0))


@pytest.fixture
async def raw(sim_config: SimulatorConfig, manual_clock: ManualClock) -> AsyncIterator[RawPlatform]:
    server = SimulatorServer(sim_config, clock=manual_clock)
    await server.start()
    session = aiohttp.ClientSession()
    try:
        yield RawPlatform(server, session, manual_clock)
    finally:
        await session.close()
        await server.close()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Server and client certificates issued by one trustme CA, written as PEM files."""
    base = tmp_path_factory.mktemp("tls")
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("fleet-client@example.com")
    files = {
        "ca": base / "ca.pem",
        "server_cert": base / "server.pem",
        "server_key": base / "server.key",
        "client_cert": base / "client.pem",
        "client_key": base / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["server_cert"]))
    server_cert.private_key_pem.write_to_path(str(files["server_key"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client_cert.private_key_pem.write_to_path(str(files["client_key"]))
    return files


@pytest.fixture
def tls_config(tls_files: dict[str, Path]) -> SimulatorConfig:
    return SimulatorConfig(
        tls=True,
        devices=300,
        seed=3,
        rate_limit=(1000, 60.0),
        cert_file=tls_files["server_cert"],
        key_file=tls_files["server_key"],
        client_ca=tls_files["ca"],
    )


@pytest.fixture
def client_ssl(tls_files: dict[str, Path]) -> Iterator[ssl.SSLContext]:
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    context.load_cert_chain(str(tls_files["client_cert"]), str(tls_files["client_key"]))
    yield context


@pytest.fixture
async def live_sim() -> AsyncIterator[SimulatorServer]:
    """The simulator in real time (for pacing and token tests), plain HTTP."""
    server = SimulatorServer(
        SimulatorConfig(tls=False, devices=1000, seed=11, rate_limit=(1000, 60.0))
    )
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def client_config(server: SimulatorServer, **overrides: Any) -> Any:
    from pydantic import SecretStr

    from orchestrator.northbound import ClientConfig

    values: dict[str, Any] = {
        "base_url": server.url,
        "app_id": APP_ID,
        "secret": SecretStr(SECRET),
        "rate_limit": (server.platform.throttle.calls, server.platform.throttle.seconds),
    }
    values.update(overrides)
    return ClientConfig(**values)
