"""The platform client against the real simulator: calls, tokens, errors, TLS, secrets."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import structlog
from pydantic import SecretStr

from orchestrator.errors import (
    AuthFailed,
    BadRequest,
    ConnectionLost,
    NotFound,
    RequestTimedOut,
    ServerError,
    TLSFailed,
)
from orchestrator.northbound import (
    CreateTaskRequest,
    ExecuteType,
    NorthboundClient,
    OperationType,
    Policy,
    Status,
    Targets,
    TLSConfig,
)
from orchestrator.simulator import SimulatorConfig, SimulatorServer

from .conftest import APP_ID, LOGIN, SECRET, client_config
from .simhelpers import devices_of, newest_package, software_package


def _request(server: SimulatorServer, count: int = 5, model: str = "WM-200") -> CreateTaskRequest:
    return CreateTaskRequest(
        file_id=newest_package(server, model).file_id,
        targets=Targets(devices=devices_of(server, model, count)),
    )


async def test_every_call_round_trips(live_sim: SimulatorServer) -> None:
    """Login, packages, both creates, task, subtasks (all pages) and task list all work."""
    async with NorthboundClient(client_config(live_sim)) as client:
        packages = await client.list_packages(model="WM-200", file_type="firmwarePackage")
        assert packages.total >= 2 and all(p.model == "WM-200" for p in packages.items)
        package = await client.get_package(packages.items[0].file_id)
        assert package == packages.items[0]
        big = CreateTaskRequest(
            file_id=newest_package(live_sim).file_id,
            targets=Targets(devices=devices_of(live_sim, count=150)),
            policy=Policy(execute_type=ExecuteType.NOW, retry_type=True, retry_times=2),
        )
        op = await client.create_upgrade_task(OperationType.FIRMWARE, big)
        soft = CreateTaskRequest(
            file_id=software_package(live_sim).file_id,
            targets=Targets(devices=devices_of(live_sim, count=2)),
        )
        soft_op = await client.create_upgrade_task(OperationType.SOFTWARE, soft)
        task = await client.get_task(op)
        assert task.operation_id == op and task.sta_result.total == 150
        assert task.status in (Status.WAITING, Status.PROCESSING)
        subs = await client.sub_operations(op)
        assert sorted(s.device_id for s in subs) == sorted(big.targets.devices or [])
        listed = await client.list_tasks(operation_type=OperationType.SOFTWARE)
        assert [t.operation_id for t in listed.items] == [soft_op]
        by_device = await client.list_tasks(device_id=devices_of(live_sim, count=1)[0])
        assert {t.operation_id for t in by_device.items} == {op, soft_op}


async def test_group_targets_round_trip(live_sim: SimulatorServer) -> None:
    """A group-targeted create sends names plus type/model/manufacturer and is accepted."""
    package = newest_package(live_sim)
    request = CreateTaskRequest(
        file_id=package.file_id,
        targets=Targets(
            device_groups=["north"],
            device_type=package.device_type,
            model=package.model,
            manufacturer=package.manufacturer,
        ),
    )
    async with NorthboundClient(client_config(live_sim)) as client:
        op = await client.create_upgrade_task(OperationType.FIRMWARE, request)
        assert (await client.get_task(op)).targets.device_groups == ["north"]


async def test_group_calls_find_a_group_and_page_its_members(live_sim: SimulatorServer) -> None:
    """list_groups finds a group by name, get_group by id, group_members reads every page
    (100 a page); an unknown id is NotFound 100603. Calls are counted per API."""
    members = live_sim.fleet.groups["north"].device_ids
    assert len(members) > 100
    async with NorthboundClient(client_config(live_sim)) as client:
        page = await client.list_groups(name="north")
        assert [g.name for g in page.items] == ["north"] and page.total == 1
        group = await client.get_group(page.items[0].group_id)
        assert (group.name, group.device_count) == ("north", len(members))
        assert await client.group_members(group.group_id) == members
        with pytest.raises(NotFound) as missing:
            await client.get_group("00000000-0000-4000-8000-000000000000")
        assert missing.value.code == "100603"
        calls = client.take_call_counts()
    pages = -(-len(members) // 100)
    assert (calls["listGroups"], calls["getGroup"], calls["groupMembers"]) == (1, 2, pages)


async def test_https_with_client_certificate(
    tls_config: SimulatorConfig, tls_files: dict[str, Path]
) -> None:
    """Over two-way TLS with a trustme CA, calls round-trip with verification on."""
    tls = TLSConfig(
        ca_file=tls_files["ca"],
        client_cert=tls_files["client_cert"],
        client_key=tls_files["client_key"],
    )
    async with (
        SimulatorServer(tls_config) as server,
        NorthboundClient(client_config(server, tls=tls)) as client,
    ):
        assert (await client.list_packages()).total > 0


async def test_untrusted_certificate_is_tls_failed(tls_config: SimulatorConfig) -> None:
    """Verification is on by default: an unknown CA fails with TLSFailed, not sent."""
    async with (
        SimulatorServer(tls_config) as server,
        NorthboundClient(client_config(server)) as client,
    ):
        with pytest.raises(TLSFailed) as caught:
            await client.login()
        assert caught.value.may_have_taken_effect is False


async def test_insecure_switch_skips_verification_and_warns(tls_config: SimulatorConfig) -> None:
    """`insecure` connects to an untrusted server and logs a loud warning."""
    async with SimulatorServer(tls_config) as server:
        with structlog.testing.capture_logs() as logs:
            async with NorthboundClient(
                client_config(server, tls=TLSConfig(insecure=True))
            ) as client:
                assert (await client.list_packages()).total > 0
        assert any("TLS VERIFICATION IS OFF" in entry["event"] for entry in logs)


# ---- tokens ------------------------------------------------------------------------------------
async def test_token_refreshed_before_expiry(live_sim: SimulatorServer) -> None:
    """A token is refreshed (refreshToken, not login) shortly before its expiry — not at half
    its lifetime — and before it is refused."""
    live_sim.platform.tokens.ttl = 1.0
    async with NorthboundClient(client_config(live_sim, refresh_before=0.6)) as client:
        await client.list_packages()
        await asyncio.sleep(0.5)  # half its lifetime left: not renewed yet
        await client.list_packages()
        renewed_at_half = client.tokens.refreshes
        await asyncio.sleep(0.45)  # under a tenth of its lifetime left: renewed
        await client.list_packages()
    assert renewed_at_half == 0
    assert (client.tokens.logins, client.tokens.refreshes) == (1, 1)
    assert live_sim.platform.stats.replies.get("1010005", 0) == 0


async def test_relogin_when_token_invalidated(live_sim: SimulatorServer) -> None:
    """When another login kills our token, the client logs in again once and succeeds."""
    async with NorthboundClient(client_config(live_sim)) as client:
        await client.list_packages()
        live_sim.platform.tokens.issue(APP_ID)  # someone else logs in
        assert (await client.list_packages()).total > 0
    assert client.tokens.logins == 2
    assert live_sim.platform.stats.replies["1010005"] == 1


async def test_single_flight_login_under_50_concurrent_calls(live_sim: SimulatorServer) -> None:
    """Fifty concurrent first calls cause exactly one login."""
    async with NorthboundClient(client_config(live_sim)) as client:
        file_id = newest_package(live_sim).file_id
        await asyncio.gather(*(client.get_package(file_id) for _ in range(50)))
    assert live_sim.platform.stats.calls["login"] == 1
    assert live_sim.platform.stats.calls["getPackage"] == 50


async def test_wrong_secret_is_auth_failed(live_sim: SimulatorServer) -> None:
    """A wrong secret raises AuthFailed (100208) without the secret in the message."""
    config = client_config(live_sim, secret=SecretStr("hunter2-wrong"))
    async with NorthboundClient(config) as client:
        with pytest.raises(AuthFailed) as caught:
            await client.login()
    assert caught.value.code == "100208" and "hunter2" not in str(caught.value)
    assert "hunter2" not in repr(config)


async def test_tokens_and_secret_never_logged(live_sim: SimulatorServer) -> None:
    """No log event carries the secret or an access token."""
    with structlog.testing.capture_logs() as logs:
        async with NorthboundClient(client_config(live_sim)) as client:
            await client.list_packages()
            live_sim.platform.tokens.issue(APP_ID)
            await client.list_packages()
    token = live_sim.platform.tokens._current[APP_ID].access_token
    text = repr(logs)
    assert SECRET not in text and token not in text and logs


# ---- errors ------------------------------------------------------------------------------------
async def test_plan_level_refusal_is_bad_request(live_sim: SimulatorServer) -> None:
    """A model mismatch raises BadRequest 123016 that certainly did not take effect."""
    request = CreateTaskRequest(
        file_id=newest_package(live_sim, "GM-10").file_id,
        targets=Targets(devices=devices_of(live_sim, count=2)),
    )
    async with NorthboundClient(client_config(live_sim)) as client:
        with pytest.raises(BadRequest) as caught:
            await client.create_upgrade_task(OperationType.FIRMWARE, request)
    assert (caught.value.code, caught.value.may_have_taken_effect) == ("123016", False)


async def test_unknown_task_is_not_found(live_sim: SimulatorServer) -> None:
    """Querying an unknown task raises NotFound 123009."""
    async with NorthboundClient(client_config(live_sim)) as client:
        with pytest.raises(NotFound) as caught:
            await client.get_task("f" * 24)
    assert caught.value.code == "123009"


@pytest.mark.parametrize(
    ("kind", "error", "may"),
    [
        ("refuse", ServerError, True),
        ("500", ServerError, True),
        ("drop", ConnectionLost, True),
        ("delay", RequestTimedOut, True),
    ],
)
async def test_may_have_taken_effect_per_fault(
    live_sim: SimulatorServer, kind: str, error: type[Exception], may: bool
) -> None:
    """Each injected create fault maps to its error class and may-have-taken-effect bit."""
    faults = live_sim.platform.faults
    if kind == "refuse":
        faults.update({"create_refuse_rate": 1.0})
    else:
        faults.update(
            {"create_ambiguous_rate": 1.0, "ambiguous_kinds": [kind], "ambiguous_delay_s": 2.0}
        )
    async with NorthboundClient(client_config(live_sim, total_timeout=0.5)) as client:
        await client.login()
        with pytest.raises(error) as caught:
            await client.create_upgrade_task(OperationType.FIRMWARE, _request(live_sim))
    assert caught.value.may_have_taken_effect is may  # type: ignore[attr-defined]
    assert live_sim.platform.stats.calls["createTask"] == 1  # creates are never retried here


async def test_get_retried_on_transport_error(live_sim: SimulatorServer) -> None:
    """GETs are retried on transport errors: a timed-out, then prompt, reply succeeds."""
    async with NorthboundClient(client_config(live_sim, total_timeout=0.3)) as client:
        await client.login()
        live_sim.platform.faults.update({"latency_ms": 600.0})
        task = asyncio.create_task(client.list_packages())
        await asyncio.sleep(0.4)
        live_sim.platform.faults.update({"latency_ms": 0.0})
        assert (await task).total > 0
    assert client.calls == 3  # login, the timed-out attempt, the retry


async def test_raw_login_shape_matches_client_expectations(live_sim: SimulatorServer) -> None:
    """The client's login is form-encoded and carries no app_key or Authorization."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            live_sim.url + LOGIN,
            data={"appId": APP_ID, "secret": SECRET},
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as reply,
    ):
        assert reply.status == 200
    _ = ssl  # TLS paths are covered by the https tests above


async def test_a_throttled_create_calls_before_send_again_when_it_really_leaves() -> None:
    """A create refused with 1010009 runs `before_send` again for the attempt that leaves."""
    config = SimulatorConfig(tls=False, devices=100, seed=3, rate_limit=(5, 1.0))
    async with SimulatorServer(config) as server:
        sends: list[float] = []
        async with NorthboundClient(client_config(server)) as client:
            await client.login()
            while server.platform.throttle.admit(APP_ID):  # another client fills the window
                pass
            filled = asyncio.get_running_loop().time()
            await client.create_upgrade_task(
                OperationType.FIRMWARE,
                _request(server),
                before_send=lambda: sends.append(asyncio.get_running_loop().time()),
            )
    assert len(sends) == 2 and server.platform.stats.throttled == 1
    assert sends[1] - filled > 0.5  # the second send waited out the other client's window


def test_a_ca_file_without_a_certificate_is_bad_input_naming_it(tmp_path: Path) -> None:
    """A `ca_file` that holds no PEM certificate is one line naming the file and the field."""
    from orchestrator.errors import InputError

    not_a_cert = tmp_path / "fleet.csv"
    not_a_cert.write_text("deviceId\nabc\n")
    with pytest.raises(InputError, match=r"platform\.ca_file: holds no readable PEM"):
        TLSConfig(ca_file=not_a_cert).context()
