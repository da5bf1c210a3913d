"""Flow control, tokens, paging, task lifecycles, groups and faults of the simulated platform."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import ssl
from pathlib import Path

import aiohttp
import pytest

from orchestrator.simulator import SimulatorConfig, SimulatorServer, format_platform_time

from .conftest import APP_ID, LOGIN, SECRET, UPGRADE, RawPlatform
from .simhelpers import create_body, devices_of, newest_package, software_package

FW = f"{UPGRADE}/operations/firmwareUpgrade"
CATEGORY = f"{UPGRADE}/category"


# ---- flow control -----------------------------------------------------------------------------
async def test_throttle_is_an_exact_sliding_window(raw: RawPlatform) -> None:
    """Call CALLS+1 inside the window is refused; once the window slides past, it passes."""
    throttle = raw.server.platform.throttle
    throttle.calls, throttle.seconds = 5, 10.0
    await raw.login()  # call 1 at t=0
    for _ in range(4):
        raw.clock.tick(1.0)
        assert (await raw.call("GET", CATEGORY))[0] == 200  # calls 2-5 at t=1..4
    raw.clock.tick(5.9)  # t=9.9: the login at t=0 is still inside the window
    status, body, _ = await raw.call("GET", CATEGORY)
    assert (status, body["error_code"]) == (403, "1010009")
    raw.clock.tick(0.1)  # t=10.0: the login has left the window
    assert (await raw.call("GET", CATEGORY))[0] == 200


async def test_refused_calls_do_not_count(raw: RawPlatform) -> None:
    """Throttled calls neither count toward the window nor act."""
    throttle = raw.server.platform.throttle
    throttle.calls, throttle.seconds = 2, 10.0
    await raw.login()
    assert (await raw.call("POST", FW, json=create_body(raw.server)))[0] == 200
    for _ in range(5):
        assert (await raw.call("POST", FW, json=create_body(raw.server)))[0] == 403
    stats = await raw.admin("/_sim/stats")
    assert (stats["tasks_created"], stats["throttled"]) == (1, 5)
    raw.clock.tick(10.0)
    assert (await raw.call("GET", CATEGORY))[0] == 200


async def test_storm_spends_the_shared_budget(raw: RawPlatform) -> None:
    """A throttle storm at share 1.0 leaves no room for our calls in a full window."""
    throttle = raw.server.platform.throttle
    throttle.calls, throttle.seconds = 10, 10.0
    await raw.admin("/_sim/faults", {"storm_share": 1.0})
    raw.clock.tick(10.0)
    async with raw.session.post(raw.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}) as r:
        assert (r.status, (await r.json())["error_code"]) == (403, "1010009")
    assert (await raw.admin("/_sim/stats"))["storm_admitted"] >= 10


# ---- tokens -----------------------------------------------------------------------------------
async def test_token_expires_after_ttl(raw: RawPlatform) -> None:
    """An access token works until its TTL has passed, then draws 1010005."""
    raw.server.platform.tokens.ttl = 100.0
    await raw.login()
    raw.clock.tick(99.0)
    assert (await raw.call("GET", CATEGORY))[0] == 200
    raw.clock.tick(1.0)
    status, body, _ = await raw.call("GET", CATEGORY)
    assert (status, body["error_code"]) == (403, "1010005")


async def test_new_login_invalidates_older_token(raw: RawPlatform) -> None:
    """Only the newest access token of an app works."""
    old = await raw.login()
    await raw.login()
    status, body, _ = await raw.call(
        "GET", CATEGORY, headers={"app_key": APP_ID, "Authorization": f"Bearer {old}"}
    )
    assert (status, body["error_code"]) == (403, "1010005")
    assert (await raw.call("GET", CATEGORY))[0] == 200


async def test_foreign_app_key_is_refused(raw: RawPlatform) -> None:
    """A valid token presented with another app's app_key draws 1010005."""
    token = await raw.login()
    status, body, _ = await raw.call(
        "GET", CATEGORY, headers={"app_key": "other-app", "Authorization": f"Bearer {token}"}
    )
    assert (status, body["error_code"]) == (403, "1010005")


async def test_bearer_scheme_is_case_insensitive(raw: RawPlatform) -> None:
    """`Authorization: bearer <token>` in lower case is accepted (§5 rule 10)."""
    token = await raw.login()
    status, _, _ = await raw.call(
        "GET", CATEGORY, headers={"app_key": APP_ID, "Authorization": f"bearer {token}"}
    )
    assert status == 200


async def test_refresh_token_issues_a_working_token(raw: RawPlatform) -> None:
    """refreshToken (JSON) returns the five fields and a token that works."""
    async with raw.session.post(raw.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}) as r:
        first = await r.json()
    async with raw.session.post(
        raw.url + "/iocm/app/sec/v1.1.0/refreshToken",
        json={"appId": APP_ID, "secret": SECRET, "refreshToken": first["refreshToken"]},
    ) as r:
        second = await r.json()
    assert set(second) == {"accessToken", "tokenType", "refreshToken", "expiresIn", "scope"}
    raw.token = second["accessToken"]
    assert (await raw.call("GET", CATEGORY))[0] == 200


async def test_refresh_with_wrong_refresh_token_is_100208(raw: RawPlatform) -> None:
    """A wrong refreshToken answers 401 / 100208."""
    async with raw.session.post(
        raw.url + "/iocm/app/sec/v1.1.0/refreshToken",
        json={"appId": APP_ID, "secret": SECRET, "refreshToken": "nope"},
    ) as r:
        assert (r.status, (await r.json())["error_code"]) == (401, "100208")


# ---- paging ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("page_size", "status"), [(0, 400), (1, 200), (100, 200), (101, 400)])
async def test_paging_edges(raw: RawPlatform, page_size: int, status: int) -> None:
    """pageSize must be 1–100; outside that the reply is 400 / 123029."""
    await raw.login()
    got, body, _ = await raw.call("GET", CATEGORY, params={"pageSize": page_size, "pageNo": 0})
    assert got == status
    if status == 200:
        assert len(body["data"]) == min(page_size, body["totalCount"])
    else:
        assert body["error_code"] == "123029"


async def test_subtask_paging_walks_every_device_once(raw: RawPlatform) -> None:
    """Pages of subOperations cover every device of a task exactly once."""
    await raw.login()
    body = create_body(raw.server, count=25)
    _, created, _ = await raw.call("POST", FW, json=body)
    seen: list[str] = []
    for page in range(3):
        _, reply, _ = await raw.call(
            "GET",
            f"{UPGRADE}/operations/{created['operationId']}/subOperations",
            params={"pageNo": page, "pageSize": 10},
        )
        seen += [row["deviceId"] for row in reply["data"]]
        assert reply["totalCount"] == 25
    assert sorted(seen) == sorted(body["targets"]["devices"])  # type: ignore[index]


async def test_package_filters_accept_the_doc_typo(raw: RawPlatform) -> None:
    """`manufactureName` filters like `manufacturerName` (§5 rule 11)."""
    await raw.login()
    _, a, _ = await raw.call("GET", CATEGORY, params={"manufactureName": "Gastro", "pageSize": 100})
    _, b, _ = await raw.call(
        "GET", CATEGORY, params={"manufacturerName": "Gastro", "pageSize": 100}
    )
    assert a["totalCount"] == b["totalCount"] > 0
    assert all(row["manufacturerName"] == "Gastro" for row in a["data"])


async def test_every_model_has_two_firmware_packages(raw: RawPlatform) -> None:
    """The fleet ships at least two firmware packages per type/model/manufacturer."""
    await raw.login()
    _, body, _ = await raw.call(
        "GET", CATEGORY, params={"fileType": "firmwarePackage", "pageSize": 100}
    )
    per_model: dict[tuple[str, str, str], int] = {}
    for row in body["data"]:
        key = (row["deviceType"], row["model"], row["manufacturerName"])
        per_model[key] = per_model.get(key, 0) + 1
    assert per_model and min(per_model.values()) >= 2


async def test_delete_package_answers_200_then_404(raw: RawPlatform) -> None:
    """Deleting a package answers 200 without body (platform-api.md §3.3); it is then gone."""
    await raw.login()
    file_id = newest_package(raw.server, "GM-10").file_id
    status, _, reply = await raw.call("DELETE", f"{CATEGORY}/{file_id}")
    assert (status, reply.content_length) == (200, 0)
    status, body, _ = await raw.call("GET", f"{CATEGORY}/{file_id}")
    assert (status, body["error_code"]) == (404, "123002")


# ---- task lifecycle ----------------------------------------------------------------------------
async def _status(raw: RawPlatform, operation_id: str) -> dict[str, object]:
    _, body, _ = await raw.call("GET", f"{UPGRADE}/operations/{operation_id}")
    return body  # type: ignore[no-any-return]


async def test_now_task_runs_wait_processing_to_final(raw: RawPlatform) -> None:
    """An executeType=now task goes wait → processing → success|failed with counters adding up."""
    await raw.login()
    _, created, _ = await raw.call("POST", FW, json=create_body(raw.server, count=50))
    op = created["operationId"]
    first = await _status(raw, op)
    assert first["status"] in ("wait", "processing")
    seen = {first["status"]}
    for _ in range(60):
        raw.clock.advance(600)
        body = await _status(raw, op)
        seen.add(body["status"])
        sta = body["staResult"]
        assert isinstance(sta, dict)
        assert sta["wait"] + sta["processing"] + sta["success"] + sta["fail"] + sta["stop"] == 50
    assert "processing" in seen and body["status"] in ("success", "failed")
    assert body["stopTime"] != ""


async def test_custom_window_holds_devices_until_start(raw: RawPlatform) -> None:
    """A custom task does nothing before startTime and is finished by endTime."""
    await raw.login()
    now = raw.clock.now()
    policy = {
        "executeType": "custom",
        "startTime": format_platform_time(now + 7200),
        "endTime": format_platform_time(now + 7200 + 6 * 3600),
    }
    _, created, _ = await raw.call("POST", FW, json=create_body(raw.server, count=30, **policy))
    op = created["operationId"]
    raw.clock.advance(7000)
    assert (await _status(raw, op))["staResult"]["wait"] == 30  # type: ignore[index]
    raw.clock.advance(200 + 6 * 3600)
    assert (await _status(raw, op))["status"] in ("success", "failed")


async def test_device_online_task_finishes(raw: RawPlatform) -> None:
    """A device_online task waits for wake-ups, then reaches a final status."""
    await raw.login()
    body = create_body(raw.server, count=20, executeType="device_online")
    _, created, _ = await raw.call("POST", FW, json=body)
    raw.clock.advance(25 * 3600)
    assert (await _status(raw, created["operationId"]))["status"] in ("success", "failed")


async def test_failed_subtasks_carry_detail_and_version(raw: RawPlatform) -> None:
    """Finished subtasks report detailInfo and extendInfo.fileVersion; the filter works."""
    await raw.login()
    target = newest_package(raw.server)
    _, created, _ = await raw.call("POST", FW, json=create_body(raw.server, count=150))
    op = created["operationId"]
    raw.clock.advance(5 * 3600)
    _, ok, _ = await raw.call(
        "GET",
        f"{UPGRADE}/operations/{op}/subOperations",
        params={"subOperationStatus": "success", "pageSize": 100},
    )
    _, failed, _ = await raw.call(
        "GET",
        f"{UPGRADE}/operations/{op}/subOperations",
        params={"subOperationStatus": "fail", "pageSize": 100},
    )
    assert ok["totalCount"] + failed["totalCount"] == 150 and failed["totalCount"] > 0
    assert all(row["extendInfo"]["fileVersion"] == target.version for row in ok["data"])
    assert all(row["status"] == "fail" and row["detailInfo"] for row in failed["data"])


async def test_retry_policy_raises_success_share(raw: RawPlatform) -> None:
    """retryType with retryTimes=5 leaves fewer failures than no retry on the same devices."""
    await raw.login()
    for device in raw.server.fleet.devices.values():
        device.model = dataclasses.replace(device.model, failure_probability=0.5)
    plain = create_body(raw.server, count=100)
    _, a, _ = await raw.call("POST", FW, json=plain)
    raw.clock.advance(2 * 24 * 3600)
    retried = dict(
        plain, policy={"executeType": "device_online", "retryType": True, "retryTimes": 5}
    )
    # the first task upgraded half of them; target the other package so versions differ
    retried["fileId"] = next(
        p.file_id
        for p in raw.server.fleet.packages.values()
        if p.model == "WM-200" and p.version == "2.0.0"
    )
    _, b, _ = await raw.call("POST", FW, json=retried)
    raw.clock.advance(3 * 24 * 3600)
    fails_plain = (await _status(raw, a["operationId"]))["staResult"]["fail"]  # type: ignore[index]
    fails_retry = (await _status(raw, b["operationId"]))["staResult"]["fail"]  # type: ignore[index]
    assert fails_retry < fails_plain


async def test_task_list_filters_and_both_total_keys(raw: RawPlatform) -> None:
    """The task list filters by deviceId and type and returns totalCount and totalSize."""
    await raw.login()
    devices = devices_of(raw.server, count=6)
    pkg = newest_package(raw.server)
    for chunk in (devices[:3], devices[3:]):
        await raw.call("POST", FW, json={"fileId": pkg.file_id, "targets": {"devices": chunk}})
    await raw.call(
        "POST",
        f"{UPGRADE}/operations/softwareUpgrade",
        json={"fileId": software_package(raw.server).file_id, "targets": {"devices": devices[:1]}},
    )
    _, body, _ = await raw.call(
        "GET",
        f"{UPGRADE}/operations",
        params={"deviceId": devices[0], "operationType": "firmware_upgrade"},
    )
    assert body["totalCount"] == body["totalSize"] == 1
    assert body["data"][0]["targets"]["devices"] == devices[:3]
    _, body, _ = await raw.call("GET", f"{UPGRADE}/operations", params={"model": "GM-10"})
    assert body["totalCount"] == 0
    _, body, _ = await raw.call(
        "GET", f"{UPGRADE}/operations", params={"operationStatus": "wait", "pageSize": 100}
    )
    assert all(row["status"] == "wait" for row in body["data"])


async def test_group_task_resolves_members(raw: RawPlatform) -> None:
    """A task on a group created via the API covers exactly its matching members."""
    await raw.login()
    members = devices_of(raw.server, count=4)
    status, group, _ = await raw.call(
        "POST",
        "/iocm/app/devgroup/v1.3.0/devGroups",
        json={"name": "canary1", "deviceIds": members},
    )
    assert status == 200 and group["curDevNum"] == 4
    _, listed, _ = await raw.call(
        "GET",
        "/iocm/app/dm/v1.2.0/devices/ids",
        params={"devGroupId": group["id"], "pageSize": 100},
    )
    assert listed["deviceIds"] == members
    pkg = newest_package(raw.server)
    _, created, _ = await raw.call(
        "POST",
        FW,
        json={
            "fileId": pkg.file_id,
            "targets": {
                "deviceGroups": ["canary1"],
                "deviceType": pkg.device_type,
                "model": pkg.model,
                "manufacturerName": pkg.manufacturer,
            },
        },
    )
    truth = (await raw.admin("/_sim/tasks"))["tasks"]
    assert truth[-1]["operationId"] == created["operationId"]
    assert truth[-1]["devices"] == members and truth[-1]["deviceGroups"] == ["canary1"]


async def test_sim_tasks_streams_every_task_as_one_json_object(raw: RawPlatform) -> None:
    """`/_sim/tasks`, written in batches of tasks, is one valid JSON object holding exactly the
    platform's truth — with no task, a full last batch (64) and one more (65)."""
    await raw.login()
    devices = devices_of(raw.server, count=65)
    package = newest_package(raw.server).file_id
    for created in range(66):
        if created in (0, 64, 65):
            assert (await raw.admin("/_sim/tasks"))["tasks"] == raw.server.platform.truth()
            assert len(raw.server.platform.truth()) == created
        if created < 65:
            body = {"fileId": package, "targets": {"devices": [devices[created]]}}
            status, reply, _ = await raw.call("POST", FW, json=body)
            assert status == 200, reply


async def test_group_name_reuse_errors_with_http_200(raw: RawPlatform) -> None:
    """A used group name answers HTTP 200 with error_code 100602, as the platform does."""
    await raw.login()
    status, body, _ = await raw.call(
        "POST", "/iocm/app/devgroup/v1.3.0/devGroups", json={"name": "north"}
    )
    assert (status, body["error_code"]) == (200, "100602")


# ---- faults ------------------------------------------------------------------------------------
async def test_refused_create_commits_nothing(raw: RawPlatform) -> None:
    """A create refused before commit answers 500 and leaves no task."""
    await raw.login()
    await raw.admin("/_sim/faults", {"create_refuse_rate": 1.0})
    status, body, _ = await raw.call("POST", FW, json=create_body(raw.server))
    assert (status, body["error_code"]) == (500, "100001")
    assert (await raw.admin("/_sim/tasks"))["tasks"] == []


async def test_ambiguous_500_commits_the_task(raw: RawPlatform) -> None:
    """An ambiguous 500 answers an error although the task exists."""
    await raw.login()
    await raw.admin("/_sim/faults", {"create_ambiguous_rate": 1.0, "ambiguous_kinds": ["500"]})
    status, _, _ = await raw.call("POST", FW, json=create_body(raw.server))
    assert status == 500
    assert len((await raw.admin("/_sim/tasks"))["tasks"]) == 1


async def test_dropped_connection_commits_the_task(raw: RawPlatform) -> None:
    """A dropped connection after commit gives the client no reply, yet the task exists."""
    await raw.login()
    await raw.admin("/_sim/faults", {"create_ambiguous_rate": 1.0, "ambiguous_kinds": ["drop"]})
    with pytest.raises(aiohttp.ClientError):
        await raw.call("POST", FW, json=create_body(raw.server))
    assert len((await raw.admin("/_sim/tasks"))["tasks"]) == 1


async def test_delayed_reply_commits_the_task(raw: RawPlatform) -> None:
    """A reply held past the client's timeout still leaves the task committed."""
    await raw.login()
    await raw.admin(
        "/_sim/faults",
        {"create_ambiguous_rate": 1.0, "ambiguous_kinds": ["delay"], "ambiguous_delay_s": 5.0},
    )
    with pytest.raises(asyncio.TimeoutError):
        async with raw.session.post(
            raw.url + FW,
            json=create_body(raw.server),
            headers=raw.headers(),
            timeout=aiohttp.ClientTimeout(total=0.3),
        ):
            pass
    assert len((await raw.admin("/_sim/tasks"))["tasks"]) == 1


async def test_latency_is_added(raw: RawPlatform) -> None:
    """Latency with jitter delays replies by at least base minus jitter."""
    await raw.login()
    await raw.admin("/_sim/faults", {"latency_ms": 80.0, "jitter_ms": 20.0})
    loop = asyncio.get_running_loop()
    started = loop.time()
    await raw.call("GET", CATEGORY)
    assert loop.time() - started >= 0.06


async def test_fault_knobs_reject_bad_values(raw: RawPlatform) -> None:
    """POST /_sim/faults refuses unknown knobs and out-of-range shares."""
    async with raw.session.post(raw.url + "/_sim/faults", json={"create_refuse_rate": 2}) as r:
        assert r.status == 400
    async with raw.session.post(raw.url + "/_sim/faults", json={"nope": 1}) as r:
        assert r.status == 400


# ---- TLS ---------------------------------------------------------------------------------------
async def test_https_with_client_certificate(
    tls_config: SimulatorConfig, client_ssl: ssl.SSLContext
) -> None:
    """Over HTTPS the platform accepts a client certificate and serves the API."""
    async with SimulatorServer(tls_config) as server, aiohttp.ClientSession() as session:
        assert server.url.startswith("https://")
        async with session.post(
            server.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}, ssl=client_ssl
        ) as reply:
            assert reply.status == 200 and "accessToken" in await reply.json()


async def test_https_without_client_certificate(
    tls_config: SimulatorConfig, tls_files: dict[str, Path]
) -> None:
    """A client certificate is allowed, not required."""
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    async with SimulatorServer(tls_config) as server, aiohttp.ClientSession() as session:
        reply = await session.post(
            server.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}, ssl=context
        )
        assert reply.status == 200
        reply.release()


async def test_self_signed_certificate_is_served_by_default() -> None:
    """With TLS on and no certificate given, the simulator makes one clients can trust."""
    config = SimulatorConfig(devices=10)
    async with SimulatorServer(config) as server, aiohttp.ClientSession() as session:
        assert server.cert_file is not None
        context = ssl.create_default_context(cafile=str(server.cert_file))
        async with session.post(
            server.url + LOGIN, data={"appId": APP_ID, "secret": SECRET}, ssl=context
        ) as reply:
            assert reply.status == 200


# ---- independence ------------------------------------------------------------------------------
def test_simulator_imports_nothing_from_client_or_engine() -> None:
    """The simulator is an independent implementation: it imports only itself and libraries."""
    root = Path(__file__).parent.parent / "orchestrator" / "simulator"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert node.level <= 1, f"{path.name} reaches outside the simulator"
                assert not module.startswith("orchestrator") or module.startswith(
                    "orchestrator.simulator"
                ), f"{path.name} imports {module}"
            elif isinstance(node, ast.Import):
                assert all(not a.name.startswith("orchestrator") for a in node.names), path.name
