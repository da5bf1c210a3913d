"""HTTP face of the simulated platform: routes, flow control, auth, faults, admin endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import orjson
from aiohttp import web

from .clock import format_http_date, format_platform_time
from .platform import CheckedCreate, Platform
from .validation import paging
from .wire import PlatformReject, error_reply, gateway_reply, json_reply

UPGRADE = "/iodm/northbound/v1.5.0"
SEC = "/iocm/app/sec/v1.1.0"
GROUPS = "/iocm/app/devgroup/v1.3.0/devGroups"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNAUTHENTICATED = frozenset({"login", "refreshToken"})
T = TypeVar("T")
log = logging.getLogger(__name__)


class Background:
    """Detached work of the platform (late commits): it outlives the request that started it,
    survives the client going away and aiohttp cancelling the handler, and ends with the server.

    Strong references are kept here (the event loop keeps only weak ones); `close` cancels and
    awaits whatever is still pending.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())

    async def close(self) -> None:
        while self._tasks:
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


PLATFORM_KEY: web.AppKey[Platform] = web.AppKey("platform", Platform)
BACKGROUND_KEY: web.AppKey[Background] = web.AppKey("background", Background)


def _platform(request: web.Request) -> Platform:
    return request.app[PLATFORM_KEY]


async def _json_body(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise PlatformReject("120015", "The body is not valid JSON.") from exc


async def _app_id_of(request: web.Request, api: str) -> str:
    """The application a call is charged to: app_key header, or appId in login/refresh."""
    if api == "login":
        form = await request.post()
        value = form.get("appId")
        return value if isinstance(value, str) else ""
    if api == "refreshToken":
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ""
        value = body.get("appId") if isinstance(body, dict) else None
        return value if isinstance(value, str) else ""
    return request.headers.get("app_key", "")


def _check_token(platform: Platform, request: web.Request, app_id: str) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if not app_id or scheme.lower() != "bearer" or not platform.tokens.valid(app_id, token.strip()):
        raise PlatformReject("1010005")


@web.middleware
async def platform_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    platform = _platform(request)
    platform.changes += 1  # the state file (--state) is saved after changes
    if request.path.startswith("/_sim/"):
        return await handler(request)
    try:
        response = await _platform_reply(platform, request, handler)
    except web.HTTPException as exc:  # raised by aiohttp itself, e.g. 413 on an oversized body
        exc.headers["Date"] = format_http_date(platform.now())
        raise
    # aiohttp only fills Date in when it is absent: every platform reply states platform time
    response.headers["Date"] = format_http_date(platform.now())
    return response


async def _platform_reply(
    platform: Platform, request: web.Request, handler: Handler
) -> web.StreamResponse:
    missing = request.match_info.http_exception
    if missing is not None:  # no such API (404) or method (405): keep the error shape
        platform.stats.replies[str(missing.status)] += 1
        return json_reply({"error_code": "120015", "error_desc": missing.reason}, missing.status)
    api = request.match_info.route.name or "unknown"
    outage = platform.faults.outage(platform.clock.monotonic())
    if outage is not None:  # a gateway with no platform behind it: nothing counted or done
        platform.stats.replies[str(outage)] += 1
        return gateway_reply(outage)
    delay = platform.faults.latency()
    if delay:
        await asyncio.sleep(delay)
    try:
        app_id = await _app_id_of(request, api)
        # an injected throttle refuses before the window: like a real refusal, it does not count
        admitted = not platform.faults.take_throttle(api) and platform.throttle.admit(app_id)
        platform.stats.arrivals.append((platform.clock.monotonic(), app_id, api, admitted))
        if not admitted:
            platform.stats.throttled += 1
            raise PlatformReject("1010009")
        platform.stats.calls[api] += 1
        if api not in UNAUTHENTICATED:
            if platform.faults.take_revoke(api):
                platform.tokens.revoke(app_id)
            _check_token(platform, request, app_id)
        response = await handler(request)
    except PlatformReject as reject:
        platform.stats.replies[reject.code] += 1
        return error_reply(reject)
    platform.stats.replies[str(response.status)] += 1
    return response


# ---- application access security -------------------------------------------------------------
async def login(request: web.Request) -> web.Response:
    platform = _platform(request)
    form = await request.post()
    app_id, secret = form.get("appId"), form.get("secret")
    if not isinstance(app_id, str) or not isinstance(secret, str) or not app_id or not secret:
        raise PlatformReject("102202")
    if not platform.tokens.credentials_ok(app_id, secret):
        raise PlatformReject("100208")
    return json_reply(platform.tokens.issue(app_id))


async def refresh_token(request: web.Request) -> web.Response:
    platform = _platform(request)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise PlatformReject("50400")
    fields = [body.get("appId"), body.get("secret"), body.get("refreshToken")]
    if any(not isinstance(value, str) or not value for value in fields):
        raise PlatformReject("102202")
    app_id, secret, refresh = fields
    assert isinstance(app_id, str) and isinstance(secret, str) and isinstance(refresh, str)
    if not platform.tokens.credentials_ok(app_id, secret) or not platform.tokens.refresh_ok(
        app_id, refresh
    ):
        raise PlatformReject("100208")
    return json_reply(platform.tokens.issue(app_id))


# ---- packages ----------------------------------------------------------------------------------
def _page(rows: list[Any], page_no: int, page_size: int) -> list[Any]:
    return rows[page_no * page_size : (page_no + 1) * page_size]


async def list_packages(request: web.Request) -> web.Response:
    page_no, page_size = paging(dict(request.query))
    rows = _platform(request).list_packages(dict(request.query))
    return json_reply(
        {
            "data": _page(rows, page_no, page_size),
            "pageNo": page_no,
            "pageSize": page_size,
            "totalCount": len(rows),
        }
    )


async def get_package(request: web.Request) -> web.Response:
    return json_reply(_platform(request).package(request.match_info["file_id"]))


async def delete_package(request: web.Request) -> web.Response:
    """§3.3: 200 OK with no body (the reference's words; not 204)."""
    _platform(request).delete_package(request.match_info["file_id"])
    return web.Response(status=200)


# ---- tasks -------------------------------------------------------------------------------------
def _abort_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _commit_later(platform: Platform, checked: CheckedCreate, delay: float) -> str:
    await asyncio.sleep(delay)
    return platform.commit_create(checked)


async def create_task(request: web.Request) -> web.StreamResponse:
    """Validate at arrival; then injected refusals, faults, and a commit now or `late_commit_s`
    later (a detached task: the commit happens even if the client is gone by then)."""
    platform = _platform(request)
    operation = request.match_info["operation"]
    body = await _json_body(request)
    checked = platform.check_create(operation, body)
    loop = asyncio.get_running_loop()
    arrived = loop.time()
    refusal = platform.faults.take_rejection()
    if refusal == 400:
        raise PlatformReject("120015", desc="Injected plan-level refusal.")
    if refusal is not None:
        return gateway_reply(refusal)
    fault = platform.faults.create_fault()
    if fault == "refuse":
        raise PlatformReject("100001", "Injected fault before commit.")
    late = platform.faults.config.late_commit_s
    commit: asyncio.Task[str] | None = None
    if late > 0:
        commit = request.app[BACKGROUND_KEY].spawn(_commit_later(platform, checked, late))
    else:
        operation_id = platform.commit_create(checked)
    if fault == "500":
        later = commit is not None
        raise PlatformReject(
            "100001",
            "Injected fault; the task commits later." if later else "Injected fault after commit.",
        )
    if fault == "drop":
        _abort_connection(request)
        raise asyncio.CancelledError
    if commit is not None:
        # shielded: a cancelled handler (client gone) must not cancel the commit
        operation_id = await asyncio.shield(commit)
    if fault == "delay":
        hold = max(late, platform.faults.config.ambiguous_delay_s)
        await asyncio.sleep(max(0.0, arrived + hold - loop.time()))
    return json_reply({"operationId": operation_id})


async def query_task(request: web.Request) -> web.Response:
    return json_reply(_platform(request).query_task(request.match_info["operation_id"]))


async def sub_operations(request: web.Request) -> web.Response:
    page_no, page_size = paging(dict(request.query))
    rows = _platform(request).sub_operations(
        request.match_info["operation_id"], request.query.get("subOperationStatus")
    )
    return json_reply(
        {
            "data": _page(rows, page_no, page_size),
            "pageNo": page_no,
            "pageSize": page_size,
            "totalCount": len(rows),
        }
    )


async def list_tasks(request: web.Request) -> web.Response:
    platform = _platform(request)
    page_no, page_size = paging(dict(request.query))
    tasks = platform.list_tasks(dict(request.query))
    return json_reply(
        {
            "data": platform.task_page_wire(_page(tasks, page_no, page_size)),
            "pageNo": page_no,
            "pageSize": page_size,
            "totalCount": len(tasks),
            "totalSize": len(tasks),  # the vendor SDK's DTO reads this key (§5 rule 5)
        }
    )


# ---- device groups -----------------------------------------------------------------------------
async def create_group(request: web.Request) -> web.Response:
    platform = _platform(request)
    group = platform.create_group(await _json_body(request), request.headers.get("app_key", ""))
    return json_reply(group)


async def list_groups(request: web.Request) -> web.Response:
    page_no, page_size = paging(dict(request.query))
    name = request.query.get("name")
    groups = [
        g.to_wire()
        for g in _platform(request).fleet.groups.values()
        if name is None or g.name == name
    ]
    for group in groups:
        del group["deviceIds"]  # the list reply carries counts, not members
    return json_reply(
        {
            "totalCount": len(groups),
            "pageNo": page_no,
            "pageSize": page_size,
            "list": _page(groups, page_no, page_size),
        }
    )


async def group_members(request: web.Request) -> web.Response:
    group_id = request.query.get("devGroupId")
    if not group_id:
        raise PlatformReject("50400", "devGroupId is mandatory.")
    page_no, page_size = paging(dict(request.query))
    group = _platform(request).group_by_id(group_id)
    return json_reply(
        {
            "totalCount": len(group.device_ids),
            "pageNo": page_no,
            "pageSize": page_size,
            "deviceIds": _page(group.device_ids, page_no, page_size),
        }
    )


async def add_group_members(request: web.Request) -> web.Response:
    return json_reply(_platform(request).add_group_members(await _json_body(request)))


async def remove_group_members(request: web.Request) -> web.Response:
    """No reply body on the platform: 204 (a 200 without body or type breaks the SDK)."""
    _platform(request).remove_group_members(await _json_body(request))
    return web.Response(status=204)


async def query_group(request: web.Request) -> web.Response:
    return json_reply(_platform(request).group_by_id(request.match_info["group_id"]).to_wire())


async def modify_group(request: web.Request) -> web.Response:
    platform = _platform(request)
    return json_reply(
        platform.modify_group(request.match_info["group_id"], await _json_body(request))
    )


async def delete_group(request: web.Request) -> web.Response:
    _platform(request).delete_group(request.match_info["group_id"])
    return web.Response(status=204)


# ---- admin (not part of the platform) ----------------------------------------------------------
async def sim_stats(request: web.Request) -> web.Response:
    platform = _platform(request)
    stats = platform.stats.as_dict()
    stats["faults_injected"] = dict(platform.faults.injected)
    stats["storm_admitted"] = platform.throttle.storm_admitted
    stats["logins"] = platform.tokens.issued_count
    return json_reply(stats)


async def sim_arrivals(request: web.Request) -> web.Response:
    """Calls as flow control saw them arrive (the last 200 000): `[time, app, api, admitted]`,
    time on the simulator's monotonic clock — the host's CLOCK_MONOTONIC, comparable across
    its processes, unless a test drives a manual clock. `?since=T` keeps the later ones.
    Storm attempts are not listed."""
    platform = _platform(request)
    try:
        since = float(request.query.get("since", "-inf"))
    except ValueError:
        return json_reply({"error": "since must be a number (monotonic seconds)"}, 400)
    rows = [list(row) for row in platform.stats.arrivals if row[0] > since]
    return json_reply({"now": platform.clock.monotonic(), "arrivals": rows})


async def sim_tasks(request: web.Request) -> web.StreamResponse:
    """`{"tasks": [...]}`, every task created with its devices, written a batch of tasks at a
    time so that 10⁶ devices in tasks never sit in memory as one JSON text."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    opening, batch = b'{"tasks":[', []
    for row in _platform(request).truth_rows():
        batch.append(orjson.dumps(row))
        if len(batch) == 64:
            await response.write(opening + b",".join(batch))
            opening, batch = b",", []
    if batch or opening != b",":  # the last part batch, or no task at all
        await response.write(opening + b",".join(batch))
    await response.write(b"]}")
    await response.write_eof()
    return response


async def sim_faults(request: web.Request) -> web.Response:
    platform = _platform(request)
    if request.method == "POST":
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of knobs")
            config = platform.faults.update(changes)
        except (ValueError, json.JSONDecodeError) as exc:
            return json_reply({"error": str(exc)}, 400)
        platform.throttle.set_storm(config.storm_share)
    return json_reply(platform.faults.config.as_dict())


async def sim_clock(request: web.Request) -> web.Response:
    """Advance simulated time (POST {"advance": seconds}); GET shows it and the platform's."""
    platform = _platform(request)
    if request.method == "POST":
        body = await request.json()
        advance = getattr(platform.clock, "advance", None)
        seconds = body.get("advance") if isinstance(body, dict) else None
        if advance is None or not isinstance(seconds, int | float) or seconds < 0:
            return json_reply({"error": 'POST {"advance": seconds >= 0}'}, 400)
        advance(float(seconds))
    simulated, platform_now = platform.clock.now(), platform.now()
    return json_reply(
        {
            "now": simulated,
            "now_utc": format_platform_time(simulated),
            "platform_now": platform_now,
            "platform_now_utc": format_platform_time(platform_now),
            "clock_offset_s": platform.faults.config.clock_offset_s,
        }
    )


def build_app(platform: Platform) -> web.Application:
    app = web.Application(middlewares=[platform_middleware], client_max_size=4 * 1024 * 1024)
    app[PLATFORM_KEY] = platform
    app[BACKGROUND_KEY] = Background()
    r = app.router
    r.add_post(f"{SEC}/login", login, name="login")
    r.add_post(f"{SEC}/refreshToken", refresh_token, name="refreshToken")
    r.add_get(f"{UPGRADE}/category", list_packages, name="listPackages")
    r.add_get(f"{UPGRADE}/category/{{file_id}}", get_package, name="getPackage")
    r.add_delete(f"{UPGRADE}/category/{{file_id}}", delete_package, name="deletePackage")
    r.add_post(
        f"{UPGRADE}/operations/{{operation:firmwareUpgrade|softwareUpgrade}}",
        create_task,
        name="createTask",
    )
    r.add_get(f"{UPGRADE}/operations", list_tasks, name="listTasks")
    r.add_get(f"{UPGRADE}/operations/{{operation_id}}", query_task, name="queryTask")
    r.add_get(
        f"{UPGRADE}/operations/{{operation_id}}/subOperations", sub_operations, name="subOperations"
    )
    r.add_post(GROUPS, create_group, name="createGroup")
    r.add_get(GROUPS, list_groups, name="listGroups")
    r.add_get(f"{GROUPS}/{{group_id}}", query_group, name="queryGroup")
    r.add_put(f"{GROUPS}/{{group_id}}", modify_group, name="modifyGroup")
    r.add_delete(f"{GROUPS}/{{group_id}}", delete_group, name="deleteGroup")
    r.add_get("/iocm/app/dm/v1.2.0/devices/ids", group_members, name="groupMembers")
    r.add_post(
        "/iocm/app/dm/v1.1.0/devices/addDevGroupTagToDevices",
        add_group_members,
        name="addGroupMembers",
    )
    r.add_post(
        "/iocm/app/dm/v1.1.0/devices/deleteDevGroupTagFromDevices",
        remove_group_members,
        name="removeGroupMembers",
    )
    r.add_get("/_sim/stats", sim_stats)
    r.add_get("/_sim/tasks", sim_tasks)
    r.add_get("/_sim/arrivals", sim_arrivals)
    r.add_route("*", "/_sim/faults", sim_faults)
    r.add_route("*", "/_sim/clock", sim_clock)
    return app
