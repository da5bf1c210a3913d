"""Every error code of the seed page and §3.4, provoked by a request, with the exact wire shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.simulator import SimulatorServer, format_platform_time

from .conftest import UPGRADE, RawPlatform
from .simhelpers import create_body, devices_of, newest_package

FW = f"{UPGRADE}/operations/firmwareUpgrade"
BodyMaker = Callable[[SimulatorServer, float], Any]


def _group_body(server: SimulatorServer, **targets: object) -> dict[str, Any]:
    package = newest_package(server)
    fields: dict[str, object] = {
        "deviceGroups": ["north"],
        "deviceType": package.device_type,
        "model": package.model,
        "manufacturerName": package.manufacturer,
    }
    fields.update(targets)
    return {"fileId": package.file_id, "targets": {k: v for k, v in fields.items() if v != "-"}}


def _custom(now: float, start: float, end: float) -> dict[str, object]:
    return {
        "executeType": "custom",
        "startTime": format_platform_time(now + start),
        "endTime": format_platform_time(now + end),
    }


def _with_policy(server: SimulatorServer, policy: object) -> dict[str, Any]:
    body = create_body(server)
    body["policy"] = policy
    return body


CREATE_CASES: list[tuple[str, BodyMaker, int, str]] = [
    ("not-json-object", lambda s, n: [1, 2], 400, "120015"),
    ("no-fileId", lambda s, n: {"targets": {"devices": devices_of(s, count=1)}}, 400, "120015"),
    (
        "model-mismatch",
        lambda s, n: {
            "fileId": newest_package(s, "GM-10").file_id,
            "targets": {"devices": devices_of(s, count=3)},
        },
        400,
        "123016",
    ),
    ("group-no-manufacturer", lambda s, n: _group_body(s, manufacturerName="-"), 400, "123019"),
    ("group-no-deviceType", lambda s, n: _group_body(s, deviceType=""), 400, "123020"),
    ("group-no-model", lambda s, n: _group_body(s, model="-"), 400, "123021"),
    (
        "no-targets",
        lambda s, n: {"fileId": newest_package(s).file_id, "targets": {}},
        400,
        "123022",
    ),
    (
        "both-targets",
        lambda s, n: {
            "fileId": newest_package(s).file_id,
            "targets": {"devices": devices_of(s, count=1), "deviceGroups": ["north"]},
        },
        400,
        "123023",
    ),
    (
        "257-devices",
        lambda s, n: {
            "fileId": newest_package(s).file_id,
            "targets": {"devices": [f"d{i}" for i in range(257)]},
        },
        400,
        "123024",
    ),
    ("bad-executeType", lambda s, n: _with_policy(s, {"executeType": "later"}), 400, "123025"),
    ("custom-no-times", lambda s, n: _with_policy(s, {"executeType": "custom"}), 400, "123026"),
    (
        "custom-bad-format",
        lambda s, n: _with_policy(
            s, {"executeType": "custom", "startTime": "2030-01-01", "endTime": "20300101T100000Z"}
        ),
        400,
        "123026",
    ),
    (
        "retryTimes-missing",
        lambda s, n: _with_policy(s, {"executeType": "now", "retryType": True}),
        400,
        "123028",
    ),
    (
        "retryTimes-6",
        lambda s, n: _with_policy(s, {"executeType": "now", "retryType": True, "retryTimes": 6}),
        400,
        "123028",
    ),
    ("start-after-end", lambda s, n: _with_policy(s, _custom(n, 7200, 3600)), 400, "123032"),
    ("start-in-past", lambda s, n: _with_policy(s, _custom(n, -600, 3600)), 400, "123033"),
    ("window-under-5-min", lambda s, n: _with_policy(s, _custom(n, 600, 600 + 299)), 400, "123034"),
    (
        "unknown-fileId",
        lambda s, n: {"fileId": "0" * 24, "targets": {"devices": devices_of(s, count=1)}},
        404,
        "123002",
    ),
    (
        "unknown-device",
        lambda s, n: {
            "fileId": newest_package(s).file_id,
            "targets": {"devices": ["no-such-device"]},
        },
        404,
        "123002",
    ),
    ("unknown-group", lambda s, n: _group_body(s, deviceGroups=["atlantis"]), 404, "123002"),
]


def assert_error_shape(status: int, body: Any, reply: Any, want_status: int, code: str) -> None:
    assert (status, body.get("error_code")) == (want_status, code), body
    assert isinstance(body["error_code"], str) and isinstance(body["error_desc"], str)
    assert set(body) == {"error_code", "error_desc"}
    assert reply.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize(
    ("maker", "want_status", "code"),
    [c[1:] for c in CREATE_CASES],
    ids=[c[0] for c in CREATE_CASES],
)
async def test_create_error_codes(
    raw: RawPlatform, maker: BodyMaker, want_status: int, code: str
) -> None:
    """Each broken create body draws its documented code in the exact error shape."""
    await raw.login()
    status, body, reply = await raw.call("POST", FW, json=maker(raw.server, raw.clock.now()))
    assert_error_shape(status, body, reply, want_status, code)
    assert (await raw.admin("/_sim/stats"))["tasks_created"] == 0


async def test_window_of_exactly_five_minutes_is_accepted(raw: RawPlatform) -> None:
    """A custom window whose end is exactly 5 minutes after its start passes 123034."""
    await raw.login()
    now = raw.clock.now()
    status, body, _ = await raw.call(
        "POST", FW, json=_with_policy(raw.server, _custom(now, 60, 360))
    )
    assert status == 200 and len(body["operationId"]) == 24


async def test_sdk_policy_with_retry_type_false_needs_no_retry_times(raw: RawPlatform) -> None:
    """The SDK's `"retryType": false` without retryTimes is accepted (§5 rule 6)."""
    await raw.login()
    body = create_body(raw.server, executeType="now", retryType=False)
    status, reply, _ = await raw.call("POST", FW, json=body)
    assert status == 200, reply


async def test_invalid_json_body_is_120015(raw: RawPlatform) -> None:
    """A body that is not JSON is a generic bad request."""
    await raw.login()
    async with raw.session.post(raw.url + FW, data=b"{nope", headers=raw.headers()) as reply:
        assert_error_shape(reply.status, await reply.json(), reply, 400, "120015")


async def test_wrong_secret_is_100208(raw: RawPlatform) -> None:
    """Login with a wrong secret answers 401 / 100208."""
    async with raw.session.post(
        raw.url + "/iocm/app/sec/v1.1.0/login", data={"appId": "demo-app", "secret": "wrong"}
    ) as reply:
        assert_error_shape(reply.status, await reply.json(), reply, 401, "100208")


async def test_unknown_task_is_123009(raw: RawPlatform) -> None:
    """Querying a task that does not exist answers 404 / 123009."""
    await raw.login()
    status, body, reply = await raw.call("GET", f"{UPGRADE}/operations/{'a' * 24}")
    assert_error_shape(status, body, reply, 404, "123009")


async def test_a_forgotten_task_is_123009_and_its_id_may_come_again(raw: RawPlatform) -> None:
    """`forget_next_tasks` answers a create and loses the task (query: 123009, absent from the
    list); with `reuse_lost_ids` the next create is given that operationId again."""
    await raw.login()
    raw.server.platform.faults.update({"forget_next_tasks": 1, "reuse_lost_ids": True})
    status, body, _ = await raw.call("POST", FW, json=create_body(raw.server, count=2))
    assert status == 200
    lost = body["operationId"]
    status, reply_body, reply = await raw.call("GET", f"{UPGRADE}/operations/{lost}")
    assert_error_shape(status, reply_body, reply, 404, "123009")
    status, listed, _ = await raw.call("GET", f"{UPGRADE}/operations")
    assert lost not in [task["operationId"] for task in listed["data"]]
    status, body, _ = await raw.call("POST", FW, json=create_body(raw.server, count=2))
    assert body["operationId"] == lost
    assert raw.server.platform.query_task(lost)["operationId"] == lost


async def test_unknown_package_is_123002(raw: RawPlatform) -> None:
    """Querying a package that does not exist answers 404 / 123002."""
    await raw.login()
    status, body, reply = await raw.call("GET", f"{UPGRADE}/category/{'b' * 24}")
    assert_error_shape(status, body, reply, 404, "123002")


async def test_malformed_package_id_is_120015(raw: RawPlatform) -> None:
    """A fileId that is not 24 hex digits is a bad request."""
    await raw.login()
    status, body, reply = await raw.call("GET", f"{UPGRADE}/category/xyz")
    assert_error_shape(status, body, reply, 400, "120015")


async def test_missing_token_is_1010005(raw: RawPlatform) -> None:
    """A call without Authorization answers 403 / 1010005."""
    status, body, reply = await raw.call(
        "GET", f"{UPGRADE}/category", headers={"app_key": "demo-app"}
    )
    assert_error_shape(status, body, reply, 403, "1010005")


async def test_throttled_reply_is_1010009(raw: RawPlatform) -> None:
    """The call beyond the limit answers 403 / 1010009."""
    raw.server.platform.throttle.calls = 3
    await raw.login()
    for _ in range(2):
        status, _body, _ = await raw.call("GET", f"{UPGRADE}/category")
        assert status == 200
    status, body, reply = await raw.call("GET", f"{UPGRADE}/category")
    assert_error_shape(status, body, reply, 403, "1010009")


async def test_precedence_throttle_before_auth_before_body(raw: RawPlatform) -> None:
    """With a bad token and a bad body, the auth error answers (documented precedence)."""
    status, body, reply = await raw.call(
        "POST",
        FW,
        json={"targets": {}},
        headers={"app_key": "demo-app", "Authorization": "Bearer x"},
    )
    assert_error_shape(status, body, reply, 403, "1010005")


async def test_precedence_structure_before_existence(raw: RawPlatform) -> None:
    """Unknown fileId and both target kinds: the structural 123023 answers first."""
    await raw.login()
    body = {"fileId": "0" * 24, "targets": {"devices": ["x"], "deviceGroups": ["y"]}}
    status, reply_body, reply = await raw.call("POST", FW, json=body)
    assert_error_shape(status, reply_body, reply, 400, "123023")


async def test_unknown_route_keeps_error_shape(raw: RawPlatform) -> None:
    """Even a 404 for an unknown path carries a JSON error body and Content-Type."""
    status, body, reply = await raw.call("GET", "/iodm/northbound/v9/nothing")
    assert_error_shape(status, body, reply, 404, "120015")
