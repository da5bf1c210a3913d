"""The simulator's world faults: list lag, late commits, a skewed platform clock, replies without
extendPara, and plan-level refusals, each observed over HTTP on loopback with no client code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.simulator import format_platform_time
from orchestrator.simulator.testing import get_json, simulator_process

from .conftest import UPGRADE, RawPlatform
from .simhelpers import create_body, devices_of

FW = f"{UPGRADE}/operations/firmwareUpgrade"
TASKS = f"{UPGRADE}/operations"
D = 0.3  # late-commit delay of these tests, real seconds


async def _sim_tasks(raw: RawPlatform) -> list[dict[str, Any]]:
    return (await raw.admin("/_sim/tasks"))["tasks"]  # type: ignore[no-any-return]


async def _eventually(check: Callable[[], Awaitable[bool]], within: float = 1.5) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


async def _committed(raw: RawPlatform, count: int) -> None:
    async def check() -> bool:
        return len(await _sim_tasks(raw)) == count

    await _eventually(check)


async def _faults(raw: RawPlatform, **knobs: object) -> None:
    async with raw.session.post(raw.url + "/_sim/faults", json=knobs) as reply:
        assert reply.status == 200, await reply.text()


async def _listed(raw: RawPlatform, **params: object) -> dict[str, Any]:
    status, body, _ = await raw.call("GET", TASKS, params={"pageSize": 100, **params})
    assert status == 200
    return body  # type: ignore[no-any-return]


def _http_date(reply: aiohttp.ClientResponse) -> float:
    return parsedate_to_datetime(reply.headers["Date"]).timestamp()


# ---- list lag ----------------------------------------------------------------------------------
async def test_list_lag_hides_a_young_task_until_it_is_old_enough(raw: RawPlatform) -> None:
    """A task stays out of the list, its deviceId filter and both totals for L real seconds."""
    assert raw.clock is not None
    await raw.login()
    await _faults(raw, list_lag_s=5.0)
    body = create_body(raw.server, count=3)
    _, created, _ = await raw.call("POST", FW, json=body)
    device = devices_of(raw.server, count=1)[0]
    raw.clock.tick(4.5)
    for params in ({}, {"deviceId": device}):
        listed = await _listed(raw, **params)
        assert (listed["totalCount"], listed["totalSize"], listed["data"]) == (0, 0, [])
    raw.clock.tick(0.5)
    for params in ({}, {"deviceId": device}):
        listed = await _listed(raw, **params)
        assert (listed["totalCount"], listed["totalSize"]) == (1, 1)
        assert listed["data"][0]["operationId"] == created["operationId"]


async def test_direct_query_finds_a_lagging_task(raw: RawPlatform) -> None:
    """GET /operations/{operationId} finds a task the list does not show yet."""
    await raw.login()
    await _faults(raw, list_lag_s=60.0)
    _, created, _ = await raw.call("POST", FW, json=create_body(raw.server))
    status, task, _ = await raw.call("GET", f"{TASKS}/{created['operationId']}")
    assert (status, task["operationId"]) == (200, created["operationId"])
    assert (await _listed(raw))["totalCount"] == 0


async def test_list_lag_counts_from_the_commit_not_the_arrival(raw: RawPlatform) -> None:
    """With a late commit, the lag starts when the task is committed."""
    assert raw.clock is not None
    await raw.login()
    await _faults(
        raw,
        list_lag_s=1.0,
        late_commit_s=D,
        create_ambiguous_rate=1.0,
        ambiguous_kinds=["500"],
    )
    assert (await raw.call("POST", FW, json=create_body(raw.server)))[0] == 500
    raw.clock.tick(1.0)  # a lag's worth of real time passes before the commit
    await _committed(raw, 1)
    assert (await _listed(raw))["totalCount"] == 0
    raw.clock.tick(1.0)
    assert (await _listed(raw))["totalCount"] == 1


# ---- late commit -------------------------------------------------------------------------------
async def test_late_commit_outlives_a_client_that_gave_up(raw: RawPlatform) -> None:
    """A create whose client times out before D is still committed D seconds after arrival."""
    await raw.login()
    await _faults(raw, late_commit_s=D)
    loop = asyncio.get_running_loop()
    sent = loop.time()
    with pytest.raises(asyncio.TimeoutError):
        async with raw.session.post(
            raw.url + FW,
            json=create_body(raw.server),
            headers=raw.headers(),
            timeout=aiohttp.ClientTimeout(total=0.1),
        ):
            pass
    assert await _sim_tasks(raw) == []
    await _committed(raw, 1)
    assert loop.time() - sent >= D


async def test_late_commit_after_a_dropped_connection(raw: RawPlatform) -> None:
    """ "drop" aborts the connection at once; the task is committed D seconds later."""
    await raw.login()
    await _faults(raw, late_commit_s=D, create_ambiguous_rate=1.0, ambiguous_kinds=["drop"])
    loop = asyncio.get_running_loop()
    sent = loop.time()
    with pytest.raises(aiohttp.ClientError):
        await raw.call("POST", FW, json=create_body(raw.server))
    assert loop.time() - sent < D
    assert await _sim_tasks(raw) == []
    await _committed(raw, 1)
    assert loop.time() - sent >= D


async def test_late_commit_after_an_immediate_500(raw: RawPlatform) -> None:
    """ "500" answers at once; the task is committed D seconds later."""
    await raw.login()
    await _faults(raw, late_commit_s=D, create_ambiguous_rate=1.0, ambiguous_kinds=["500"])
    loop = asyncio.get_running_loop()
    sent = loop.time()
    status, body, _ = await raw.call("POST", FW, json=create_body(raw.server))
    assert (status, body["error_code"]) == (500, "100001")
    assert loop.time() - sent < D
    assert await _sim_tasks(raw) == []
    await _committed(raw, 1)


async def test_late_commit_replies_after_the_commit(raw: RawPlatform) -> None:
    """Without a fault the 200 comes after the commit, and createTime is the commit's time."""
    assert raw.clock is not None
    await raw.login()
    await _faults(raw, late_commit_s=D)
    arrival = raw.clock.now()
    pending = asyncio.create_task(raw.call("POST", FW, json=create_body(raw.server)))
    await asyncio.sleep(D / 3)
    raw.clock.advance(3600.0)  # platform time moves on while the create waits to commit
    status, created, _ = await pending
    assert status == 200
    truth = await _sim_tasks(raw)
    assert [t["operationId"] for t in truth] == [created["operationId"]]
    assert truth[0]["createTime"] == format_platform_time(arrival + 3600.0)


async def test_late_commit_with_delay_commits_before_the_held_reply(raw: RawPlatform) -> None:
    """ "delay" holds the reply for max(D, ambiguous_delay_s) while the commit happens at D."""
    await raw.login()
    await _faults(
        raw,
        late_commit_s=0.2,
        create_ambiguous_rate=1.0,
        ambiguous_kinds=["delay"],
        ambiguous_delay_s=0.6,
    )
    loop = asyncio.get_running_loop()
    sent = loop.time()
    pending = asyncio.create_task(raw.call("POST", FW, json=create_body(raw.server)))
    await _committed(raw, 1)
    assert not pending.done()
    status, created, _ = await pending
    assert status == 200 and loop.time() - sent >= 0.6
    assert (await _sim_tasks(raw))[0]["operationId"] == created["operationId"]


async def test_refused_create_with_late_commit_never_commits(raw: RawPlatform) -> None:
    """ "refuse" answers 500 and nothing is committed, D seconds later either."""
    await raw.login()
    await _faults(raw, late_commit_s=0.1, create_refuse_rate=1.0)
    assert (await raw.call("POST", FW, json=create_body(raw.server)))[0] == 500
    await asyncio.sleep(0.3)
    assert await _sim_tasks(raw) == []


async def test_server_close_cancels_pending_late_commits(raw: RawPlatform) -> None:
    """A late commit still waiting when the server closes never happens."""
    await raw.login()
    await _faults(raw, late_commit_s=D, create_ambiguous_rate=1.0, ambiguous_kinds=["500"])
    assert (await raw.call("POST", FW, json=create_body(raw.server)))[0] == 500
    await raw.server.close()
    await asyncio.sleep(D + 0.1)
    assert raw.server.platform.tasks == []


async def test_server_close_does_not_wait_for_a_create_awaiting_its_commit(
    raw: RawPlatform,
) -> None:
    """Closing the server ends at once although a create's reply waits on a 30 s commit."""
    await raw.login()
    await _faults(raw, late_commit_s=30.0)
    pending = asyncio.create_task(raw.call("POST", FW, json=create_body(raw.server)))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await raw.server.close()
    assert time.monotonic() - started < 1.0
    with pytest.raises(aiohttp.ClientError):
        await pending
    assert raw.server.platform.tasks == []


# ---- platform clock ----------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [-600.0, 600.0])
async def test_clock_offset_shows_in_create_time(raw: RawPlatform, offset: float) -> None:
    """createTime (task, subtask, ground truth) is the simulated time plus the offset."""
    assert raw.clock is not None
    await raw.login()
    await _faults(raw, clock_offset_s=offset)
    _, created, _ = await raw.call("POST", FW, json=create_body(raw.server, count=2))
    expected = format_platform_time(raw.clock.now() + offset)
    op = created["operationId"]
    _, task, _ = await raw.call("GET", f"{TASKS}/{op}")
    _, subs, _ = await raw.call("GET", f"{TASKS}/{op}/subOperations")
    assert task["createTime"] == expected
    assert {row["createTime"] for row in subs["data"]} == {expected}
    assert (await _sim_tasks(raw))[0]["createTime"] == expected


@pytest.mark.parametrize("offset", [-600.0, 600.0])
async def test_date_header_states_platform_time_on_every_reply(
    raw: RawPlatform, offset: float
) -> None:
    """Success, error, unknown-path and throttled replies all carry Date = platform time."""
    assert raw.clock is not None
    await raw.login()
    await _faults(raw, clock_offset_s=offset)
    platform_now = raw.clock.now() + offset
    replies = [
        (await raw.call("GET", f"{UPGRADE}/category"))[2],
        (await raw.call("GET", f"{TASKS}/{'0' * 24}"))[2],
        (await raw.call("GET", f"{UPGRADE}/nothing-here"))[2],
        (await raw.call("GET", f"{UPGRADE}/category", headers={"app_key": "demo-app"}))[2],
    ]
    raw.server.platform.throttle.calls = 1  # the window already holds more than one call
    throttled = await raw.call("GET", f"{UPGRADE}/category")
    assert (throttled[0], throttled[1]["error_code"]) == (403, "1010009")
    replies.append(throttled[2])
    assert [r.status for r in replies] == [200, 404, 404, 403, 403]
    assert all(_http_date(r) == int(platform_now) for r in replies)
    assert replies[0].headers["Date"].endswith(" GMT")


async def test_platform_ahead_refuses_a_start_still_in_the_clients_future(
    raw: RawPlatform,
) -> None:
    """With the platform 600 s ahead, a custom start 300 s in the future draws 123033."""
    assert raw.clock is not None
    await raw.login()
    await _faults(raw, clock_offset_s=600.0)
    now = raw.clock.now()
    policy = {
        "executeType": "custom",
        "startTime": format_platform_time(now + 300),
        "endTime": format_platform_time(now + 7200),
    }
    status, body, _ = await raw.call("POST", FW, json=create_body(raw.server, **policy))
    assert (status, body["error_code"]) == (400, "123033")


async def test_platform_behind_accepts_a_start_in_the_clients_recent_past(
    raw: RawPlatform,
) -> None:
    """With the platform 600 s behind, a custom start 300 s ago is accepted."""
    assert raw.clock is not None
    await raw.login()
    await _faults(raw, clock_offset_s=-600.0)
    now = raw.clock.now()
    policy = {
        "executeType": "custom",
        "startTime": format_platform_time(now - 300),
        "endTime": format_platform_time(now + 7200),
    }
    status, body, _ = await raw.call("POST", FW, json=create_body(raw.server, **policy))
    assert status == 200 and "operationId" in body


async def test_sim_clock_shows_simulated_and_platform_time(raw: RawPlatform) -> None:
    """GET /_sim/clock reports both clocks and the offset between them."""
    assert raw.clock is not None
    await _faults(raw, clock_offset_s=-600.0)
    shown = await raw.admin("/_sim/clock")
    assert shown["now"] == raw.clock.now()
    assert shown["platform_now"] == raw.clock.now() - 600.0
    assert shown["platform_now_utc"] == format_platform_time(raw.clock.now() - 600.0)
    assert shown["clock_offset_s"] == -600.0


# ---- extendPara --------------------------------------------------------------------------------
async def test_omit_extend_para_removes_the_key(raw: RawPlatform) -> None:
    """With omit_extend_para, neither the task query nor the task list carries extendPara."""
    await raw.login()
    _, created, _ = await raw.call("POST", FW, json=create_body(raw.server))
    op = created["operationId"]
    assert "extendPara" in (await raw.call("GET", f"{TASKS}/{op}"))[1]
    await _faults(raw, omit_extend_para=True)
    assert "extendPara" not in (await raw.call("GET", f"{TASKS}/{op}"))[1]
    listed = await _listed(raw)
    assert listed["data"] and all("extendPara" not in row for row in listed["data"])


# ---- plan-level refusals -----------------------------------------------------------------------
async def test_reject_next_creates_refuses_exactly_n_with_a_platform_400(raw: RawPlatform) -> None:
    """N valid creates draw 400/120015 "Injected plan-level refusal.", then creates pass."""
    await raw.login()
    await _faults(raw, reject_next_creates=2)
    for _ in range(2):
        status, body, reply = await raw.call("POST", FW, json=create_body(raw.server))
        assert status == 400 and reply.content_type == "application/json"
        assert body == {"error_code": "120015", "error_desc": "Injected plan-level refusal."}
        assert await _sim_tasks(raw) == []
    assert (await raw.call("POST", FW, json=create_body(raw.server)))[0] == 200
    assert len(await _sim_tasks(raw)) == 1
    assert (await raw.admin("/_sim/faults"))["reject_next_creates"] == 0


@pytest.mark.parametrize(
    ("status", "phrase"),
    [(413, "Request Entity Too Large"), (429, "Too Many Requests"), (502, "Bad Gateway")],
)
async def test_reject_with_other_status_is_a_gateway_reply(
    raw: RawPlatform, status: int, phrase: str
) -> None:
    """A non-400 refusal is an HTML reply with that status and no platform error body."""
    await raw.login()
    await _faults(raw, reject_next_creates=1, reject_status=status)
    async with raw.session.post(
        raw.url + FW, json=create_body(raw.server), headers=raw.headers()
    ) as reply:
        text = await reply.text()
        assert (reply.status, reply.content_type) == (status, "text/html")
    assert text == f"<html><body>{status} {phrase}</body></html>"
    assert await _sim_tasks(raw) == []
    assert (await raw.call("POST", FW, json=create_body(raw.server)))[0] == 200


async def test_reject_counts_only_creates_that_pass_validation(raw: RawPlatform) -> None:
    """An invalid create keeps its own error and does not use up a refusal."""
    await raw.login()
    await _faults(raw, reject_next_creates=1)
    invalid = {"fileId": create_body(raw.server)["fileId"], "targets": {}}
    status, body, _ = await raw.call("POST", FW, json=invalid)
    assert (status, body["error_code"]) == (400, "123022")
    status, body, _ = await raw.call("POST", FW, json=create_body(raw.server))
    assert body["error_desc"] == "Injected plan-level refusal."


# ---- knob validation and the command line ------------------------------------------------------
@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("list_lag_s", -1.0),
        ("late_commit_s", -0.5),
        ("reject_next_creates", -1),
        ("latency_ms", -5),
        ("omit_extend_para", 1),
        ("reject_status", 200),
        ("reject_next_creates", 1.5),
    ],
)
async def test_fault_knobs_refuse_bad_values(raw: RawPlatform, knob: str, value: object) -> None:
    """/_sim/faults refuses a negative value (except clock_offset_s) or a wrong type."""
    async with raw.session.post(raw.url + "/_sim/faults", json={knob: value}) as reply:
        assert reply.status == 400
    assert (await raw.admin("/_sim/faults"))[knob] != value


async def test_clock_offset_accepts_a_negative_value(raw: RawPlatform) -> None:
    """clock_offset_s is the one knob that may be negative."""
    async with raw.session.post(raw.url + "/_sim/faults", json={"clock_offset_s": -600}) as reply:
        assert reply.status == 200
        assert (await reply.json())["clock_offset_s"] == -600


def test_cli_flags_reach_the_fault_config(tmp_path: Path) -> None:
    """`rollout simulator` flags set the new knobs, a negative clock offset included."""
    flags = ("--list-lag", "2.5", "--late-commit", "0.4", "--clock-offset", "-600")
    more = ("--omit-extend-para", "--reject-next-creates", "3", "--reject-status", "429")
    with simulator_process(tmp_path, "--devices", "20", *flags, *more) as (url, _):
        faults = get_json(url + "/_sim/faults")
    assert {k: faults[k] for k in ("list_lag_s", "late_commit_s", "clock_offset_s")} == {
        "list_lag_s": 2.5,
        "late_commit_s": 0.4,
        "clock_offset_s": -600.0,
    }
    assert (faults["omit_extend_para"], faults["reject_next_creates"]) == (True, 3)
    assert faults["reject_status"] == 429
