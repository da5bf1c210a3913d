"""The async platform client: typed calls, shared pacing, tokens, one error boundary.

Every call takes a pacing slot first (retries and logins too) and gives it back when its
reply or failure is seen. The pacing ledger and the token are shared with every other
process of the app on this host (hoststate.py, ledger.py, tokencache.py). Faults are sorted
at the one boundary with aiohttp (`_exchange`):

- *transient* — connection refused or unreachable, a connect or DNS timeout, a gateway's
  502/503/504: the platform is down. GETs and logins pause and go again (`outage.py`) until
  it answers, for up to `outage_budget` seconds, then raise PlatformUnreachable;
- *permanent* — an unknown host name, a certificate not trusted (or expired, or for another
  host), TLS against a plain-HTTP port or the reverse: raised at once, never retried, with
  one line that names the fix;
- *ambiguous* — a timeout, a connection lost after sending, a 5xx: GETs are retried a few
  times with backoff (stamina); creates never are here, because they may have taken effect —
  the engine settles them.

A throttle reply (1010009) certainly did not act, so any call — a create, a look-up, a
login, a refresh — waits for the pacer's cool-down and goes again; an invalid token (1010005)
is replaced (from the host's cache, or by a new login) and the call goes again. Both are
another client's doing (platform-api.md §1), waited out for up to `outage_budget` seconds in
a row, then KeptRefusing. A call's token is taken once its pacing slot is granted, just
before it leaves, so a token renewed by another process while it waited is never sent.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import stamina
import structlog

from ..errors import (
    GATEWAY_STATUSES,
    CannotConnect,
    ConnectFailed,
    ConnectionLost,
    HostNotFound,
    InvalidToken,
    KeptRefusing,
    PlatformCallError,
    PlatformError,
    RequestTimedOut,
    ServerError,
    Throttled,
    TLSFailed,
    TransportError,
    platform_error,
)
from .auth import TokenKeeper
from .clock import PlatformClock
from .config import ClientConfig
from .hoststate import AppState, state_root
from .ledger import Outcome
from .models import (
    SUBTASK_STATUS_TO_WIRE,
    TASK_STATUS_TO_WIRE,
    CreateTaskRequest,
    DeviceGroup,
    OperationType,
    Package,
    Page,
    Status,
    SubOperation,
    Task,
    Token,
)
from .outage import Outage, describe_duration
from .pacing import Pacer, Priority, shared_pacer
from .tokencache import TokenCache

log = structlog.get_logger("orchestrator.northbound")
T = TypeVar("T")

LOGIN_PATH = "/iocm/app/sec/v1.1.0/login"
REFRESH_PATH = "/iocm/app/sec/v1.1.0/refreshToken"
UPGRADE = "/iodm/northbound/v1.5.0"
GROUPS = "/iocm/app/devgroup/v1.3.0/devGroups"
GROUP_MEMBERS = "/iocm/app/dm/v1.2.0/devices/ids"
MAX_PAGE_SIZE = 100
BeforeSend = Callable[[], None]


class NorthboundClient:
    """Use as `async with NorthboundClient(config) as client:`."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        pacer: Pacer | None = None,
        clock: PlatformClock | None = None,
        outage: Outage | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or PlatformClock()
        self.outage = outage or Outage(config.outage_budget)
        self._base = config.base_url.rstrip("/")
        parts = urlsplit(self._base)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._where = f"{self._host}:{self._port}"
        self._probe_timeout = min(config.connect_timeout, 5.0)
        self._pacer = pacer
        self._shares_pacer = pacer is None  # the app's shared pacer: counted users, closed
        self._attached: Pacer | None = None
        self._state: AppState | None = None
        self._session: aiohttp.ClientSession | None = None
        self.tokens = TokenKeeper(self._login, self._refresh, config.refresh_before)
        self.calls = 0  # attempts, those that never reached the platform included
        self._calls_by_api: Counter[str] = Counter()
        self._reachable_lock = asyncio.Lock()
        self.throttled: Counter[str] = Counter()  # 1010009 replies per API since the start

    def take_call_counts(self) -> dict[str, int]:
        """Calls sent per API since the last time this was asked (for the journal); calls
        whose connection never opened (refused, no route, DNS) are not the platform's: they
        count apart, as `unreachable`."""
        counts, self._calls_by_api = dict(self._calls_by_api), Counter()
        return counts

    @property
    def state(self) -> AppState:
        """The app's directory of shared state on this host (created on first use; raises
        InputError naming it when it cannot be)."""
        if self._state is None:
            root = state_root(self.config.state_dir)
            self._state = AppState.open(root, self._base, self.config.app_id)
        return self._state

    @property
    def pacer(self) -> Pacer:
        if self._pacer is None:
            calls, seconds = self.config.rate_limit
            self._pacer = shared_pacer(
                self._base,
                self.config.app_id,
                calls,
                seconds,
                self.config.pacing_margin,
                state=self.state,
                request_timeout=self.config.total_timeout,
                label=self.config.label,
            )
        return self._pacer

    async def __aenter__(self) -> NorthboundClient:
        self.tokens.cache = TokenCache(self.state)
        if self._shares_pacer:
            self._attached = self.pacer
            self._attached.attach()
        ssl_context = self.config.tls.context() if self._tls else None
        connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True)
        timeout = aiohttp.ClientTimeout(
            total=self.config.total_timeout, connect=self.config.connect_timeout
        )
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._attached is not None:
            await self._attached.detach()
            self._attached = None

    # ---- the one boundary with aiohttp ------------------------------------------------------
    async def _send(
        self,
        method: str,
        path: str,
        priority: Priority,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        form: Mapping[str, str] | None = None,
        sent_with: list[str] | None = None,
        before_send: BeforeSend | None = None,
    ) -> Any:
        """One attempt: a pacing slot, then the request. With `sent_with` (a list) the call
        carries the app's token, taken *after* the slot is granted — the token another
        process may have renewed while this call waited is never sent — and the token sent
        is appended to `sent_with` (to name the refused one on 1010005)."""
        if self._session is None:
            raise RuntimeError("use the client as `async with NorthboundClient(...)`")
        headers: dict[str, str] = {}
        while True:
            if sent_with is not None:
                await self.tokens.access_token()  # a login or refresh takes its own slot first
            slot = await self.pacer.acquire(priority)
            if sent_with is None:
                break
            token = self.tokens.current()  # the host's newest token, checked just now
            if token is not None:
                sent_with.append(token)
                headers = {"app_key": self.config.app_id, "Authorization": f"Bearer {token}"}
                break
            # the token went stale while this call waited: renew it before sending
            self.pacer.release(slot, Outcome.UNSENT)
        outcome = Outcome.UNSENT
        try:
            if callable(body):  # built first: a body that cannot be built leaves no intent
                body = body()
            if before_send is not None:
                before_send()
            self.calls += 1
            self._calls_by_api[_api_name(method, path)] += 1
            outcome = Outcome.FAILED  # from here on the call may reach the platform
            status, raw = await self._exchange(method, path, params, body, form, headers)
            outcome = Outcome.REPLIED
            try:
                return self._interpret(method, path, status, raw)
            except Throttled:
                outcome = Outcome.THROTTLED
                self.throttled[_api_name(method, path)] += 1
                raise
        except (ConnectFailed, CannotConnect):
            outcome = Outcome.UNSENT  # the connection never opened: nothing arrived
            # not a call the platform received: counted apart, as `unreachable`
            api = _api_name(method, path)
            self._calls_by_api[api] -= 1
            if not self._calls_by_api[api]:
                del self._calls_by_api[api]
            self._calls_by_api[UNREACHABLE] += 1
            raise
        finally:
            # the slot stays taken until SECONDS after this moment: the call arrived by now
            self.pacer.release(slot, outcome)

    async def _exchange(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: Any,
        form: Mapping[str, str] | None,
        headers: dict[str, str],
    ) -> tuple[int, bytes]:
        assert self._session is not None
        sent = self.clock.local()
        try:
            async with self._session.request(
                method,
                self._base + path,
                params=params,
                json=body,
                data=form,
                headers=headers,
            ) as reply:
                status = reply.status
                raw = await reply.read()
                self.clock.observe_date_header(reply.headers.get("Date"), sent, self.clock.local())
        except aiohttp.ClientError as exc:
            error = await self._transport_error(exc, method, path)
            if error.transient:
                self.outage.begin(error)
            raise error from None
        except TimeoutError:  # the total timeout, while waiting for or reading the reply
            raise RequestTimedOut("no reply in time", method=method, path=path) from None
        if status in GATEWAY_STATUSES:
            self.outage.begin(f"HTTP {status} from a gateway")
        else:
            self.outage.answered()
        return status, raw

    async def _transport_error(
        self, exc: aiohttp.ClientError, method: str, path: str
    ) -> PlatformCallError:
        """An aiohttp failure as the orchestrator's error: transient (the platform is down),
        permanent (the configuration is wrong — the message names the fix) or ambiguous.
        Library class names and internals never reach the message."""
        where = self._where
        kind: type[PlatformCallError]
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            kind, message = TLSFailed, _certificate_fix(exc.certificate_error, self._host, where)
        elif isinstance(exc, aiohttp.ClientConnectorSSLError):
            kind, message = await self._tls_refused(exc.os_error)
        elif isinstance(exc, aiohttp.ClientConnectorError):
            kind, message = _connect_error(exc.os_error, self._host, where)
        elif isinstance(exc, aiohttp.ConnectionTimeoutError):
            kind, message = ConnectFailed, f"connecting to {where} timed out"
        elif isinstance(exc, aiohttp.ServerTimeoutError):
            kind, message = RequestTimedOut, "no reply in time"
        elif not self._tls and await _speaks_tls(self._host, self._port, self._probe_timeout):
            kind = TLSFailed
            message = f"{where} speaks TLS, not plain HTTP: use https:// in platform.url"
        else:
            kind, message = ConnectionLost, _lost_reason(exc)
        return kind(message, method=method, path=path)

    async def _tls_refused(self, os_error: OSError) -> tuple[type[PlatformCallError], str]:
        where = self._where
        if isinstance(os_error, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionError):
            return ConnectFailed, f"{where} closed the connection during the TLS handshake"
        if await _speaks_plain_http(self._host, self._port, self._probe_timeout):
            return TLSFailed, (
                f"{where} speaks plain HTTP, not TLS: use http:// in platform.url "
                "(loopback only), or the platform's HTTPS port"
            )
        reason = str(getattr(os_error, "reason", None) or "refused").lower().replace("_", " ")
        return TLSFailed, (
            f"the TLS handshake with {where} failed ({reason}): check the port in "
            "platform.url, and platform.client_cert/client_key if the platform asks for a "
            "client certificate"
        )

    def _interpret(self, method: str, path: str, status: int, raw: bytes) -> Any:
        payload: Any = None
        if raw:
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = None
        # the platform sometimes reports errors with HTTP 200: any error_code is an error
        if isinstance(payload, dict) and "error_code" in payload:
            error = platform_error(
                status,
                str(payload["error_code"]),
                str(payload.get("error_desc", ""))[:300],
                method=method,
                path=path,
            )
        elif status >= 400:
            error = platform_error(
                status,
                str(status),
                f"HTTP {status} without an error body",
                method=method,
                path=path,
            )
        else:
            return payload
        raise error

    # ---- authenticated calls ----------------------------------------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        priority: Priority,
        before_send: BeforeSend | None = None,
        **kwargs: Any,
    ) -> Any:
        """One logical call: token, waits out throttling, replaces a refused token.

        A 1010009 reply did not act: the call goes again after the pacer's cool-down. A
        1010005 reply did not act either: the token is replaced — by the host's newer one if
        another process already got it, else by a new login — and the call goes again. Both
        are the doing of another client, never the run's: they are waited out for as long as
        `execution.outage_budget` allows (then KeptRefusing, exit 1), reads and creates
        alike. `before_send` runs each time an attempt has its pacing slot and is about to
        leave — the engine journals its intent there (the first time) and the send time of
        the attempt that really leaves (after a throttled or re-authenticated one, which
        certainly did not act), so a process killed while waiting for a slot leaves nothing
        to reconcile and the settle time counts from the last send.
        """
        refusals = _Refusals(self.outage)
        while True:
            sent_with: list[str] = []
            try:
                return await self._send(
                    method, path, priority, sent_with=sent_with, before_send=before_send, **kwargs
                )
            except InvalidToken as error:
                refusals.note(error)
                await self.tokens.replace(sent_with[-1])
            except Throttled as error:
                # refused and not counted: safe to send again after the cool-down (the pacer
                # holds the next slot back), with the host's newest token
                refusals.note(error)

    async def ride_out(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, sent again after a pause while it meets transient faults (the platform
        is down); raises PlatformUnreachable when the outage outlasts the budget. Only for
        calls that have no effect, or whose repetition is harmless (a login)."""
        while True:
            try:
                return await call()
            except PlatformCallError as error:
                if not error.transient:
                    raise
                await self.outage.pause(error)

    async def wait_until_reachable(self) -> None:
        """After a transient fault met a call that is not ridden out (a create): return once
        the platform answers again — at once if it already has. One caller at a time probes
        with a cheap look-up, ridden out (pauses with backoff; PlatformUnreachable past the
        budget); the others wait for it. A create then goes out again, not into the outage."""
        async with self._reachable_lock:
            if self.outage.active:
                await self.list_packages(page_size=1)

    async def _get(
        self, path: str, priority: Priority, params: Mapping[str, str] | None = None
    ) -> Any:
        async for attempt in stamina.retry_context(
            on=(TransportError, ServerError),
            attempts=self.config.get_attempts,
            wait_initial=0.2,
            wait_max=5.0,
            timeout=None,
        ):
            with attempt:
                return await self.ride_out(lambda: self._call("GET", path, priority, params=params))
        raise AssertionError("unreachable: retry_context returns or raises")

    async def _login(self) -> Token:
        """A throttled login (another client spending the budget) is waited out: the call
        did not act and goes again after the cool-down, within `execution.outage_budget`."""
        form = {"appId": self.config.app_id, "secret": self.config.secret.get_secret_value()}
        refusals = _Refusals(self.outage)
        while True:
            try:
                reply = await self.ride_out(
                    lambda: self._send("POST", LOGIN_PATH, Priority.AUTH, form=form)
                )
                return Token.model_validate(reply)
            except Throttled as error:
                refusals.note(error)

    async def _refresh(self, refresh_token: str) -> Token:
        """A throttled refresh is waited out like a login."""
        body = {
            "appId": self.config.app_id,
            "secret": self.config.secret.get_secret_value(),
            "refreshToken": refresh_token,
        }
        refusals = _Refusals(self.outage)
        while True:
            try:
                return Token.model_validate(
                    await self.ride_out(
                        lambda: self._send("POST", REFRESH_PATH, Priority.AUTH, body=body)
                    )
                )
            except Throttled as error:
                refusals.note(error)

    async def login(self) -> None:
        """Make sure a valid token is held (logs in if needed)."""
        await self.tokens.access_token()

    # ---- packages ----------------------------------------------------------------------------
    async def list_packages(
        self,
        *,
        file_type: str | None = None,
        device_type: str | None = None,
        model: str | None = None,
        manufacturer: str | None = None,
        version: str | None = None,
        page_no: int = 0,
        page_size: int = MAX_PAGE_SIZE,
        priority: Priority = Priority.SUBMIT,
    ) -> Page[Package]:
        params = _params(
            fileType=file_type,
            deviceType=device_type,
            model=model,
            manufacturerName=manufacturer,
            version=version,
            pageNo=page_no,
            pageSize=page_size,
        )
        reply = await self._get(f"{UPGRADE}/category", priority, params)
        return _page(reply, Package)

    async def get_package(self, file_id: str, priority: Priority = Priority.SUBMIT) -> Package:
        return Package.model_validate(await self._get(f"{UPGRADE}/category/{file_id}", priority))

    # ---- tasks -------------------------------------------------------------------------------
    async def create_upgrade_task(
        self,
        operation: OperationType,
        request: CreateTaskRequest | Callable[[], CreateTaskRequest],
        before_send: BeforeSend | None = None,
    ) -> str:
        """Create a task; never retried here on an outcome that may have taken effect.

        `request` may be a function: it is then called when the pacing slot is granted, so
        a time in the body (a custom window's start) is as fresh as the moment it leaves.
        """
        build = request if callable(request) else (lambda: request)
        reply = await self._call(
            "POST",
            f"{UPGRADE}/operations/{operation.create_path}",
            Priority.SUBMIT,
            before_send,
            body=lambda: build().wire(),
        )
        if not isinstance(reply, dict) or not isinstance(reply.get("operationId"), str):
            raise ServerError(
                200,
                "no-operation-id",
                "the create reply has no operationId",
                method="POST",
                path=f"{UPGRADE}/operations",
            )
        return str(reply["operationId"])

    async def get_task(self, operation_id: str, priority: Priority = Priority.MONITOR) -> Task:
        return Task.model_validate(
            await self._get(f"{UPGRADE}/operations/{operation_id}", priority)
        )

    async def list_tasks(
        self,
        *,
        operation_type: OperationType | None = None,
        status: Status | None = None,
        device_type: str | None = None,
        model: str | None = None,
        manufacturer: str | None = None,
        device_id: str | None = None,
        page_no: int = 0,
        page_size: int = MAX_PAGE_SIZE,
        priority: Priority = Priority.MONITOR,
    ) -> Page[Task]:
        params = _params(
            operationType=operation_type.value if operation_type else None,
            operationStatus=TASK_STATUS_TO_WIRE[status] if status else None,
            deviceType=device_type,
            model=model,
            manufacturerName=manufacturer,
            deviceId=device_id,
            pageNo=page_no,
            pageSize=page_size,
        )
        reply = await self._get(f"{UPGRADE}/operations", priority, params)
        return _page(reply, Task, total_keys=("totalCount", "totalSize"))

    async def sub_operation_page(
        self,
        operation_id: str,
        status: Status | None = None,
        *,
        page_no: int = 0,
        page_size: int = MAX_PAGE_SIZE,
        priority: Priority = Priority.MONITOR,
    ) -> Page[SubOperation]:
        """One page of a task's subtasks (a one-item page is the cheapest look at one)."""
        params = _params(
            subOperationStatus=SUBTASK_STATUS_TO_WIRE[status] if status else None,
            pageNo=page_no,
            pageSize=page_size,
        )
        reply = await self._get(
            f"{UPGRADE}/operations/{operation_id}/subOperations", priority, params
        )
        return _page(reply, SubOperation)

    async def sub_operations(
        self,
        operation_id: str,
        status: Status | None = None,
        priority: Priority = Priority.MONITOR,
    ) -> list[SubOperation]:
        """Every subtask of a task (optionally of one status), all pages fetched."""
        found: list[SubOperation] = []
        page_no = 0
        while True:
            page = await self.sub_operation_page(
                operation_id, status, page_no=page_no, priority=priority
            )
            found.extend(page.items)
            if not page.items or len(found) >= page.total:
                return found
            page_no += 1

    # ---- device groups (platform-api.md §4) --------------------------------------------------
    async def list_groups(
        self,
        *,
        name: str | None = None,
        page_no: int = 0,
        page_size: int = MAX_PAGE_SIZE,
        priority: Priority = Priority.SUBMIT,
    ) -> Page[DeviceGroup]:
        """One page of the app's device groups (`name`: exactly that name)."""
        params = _params(name=name, pageNo=page_no, pageSize=page_size)
        reply = await self._get(GROUPS, priority, params)
        return _page(reply, DeviceGroup, items_key="list")

    async def get_group(self, group_id: str, priority: Priority = Priority.SUBMIT) -> DeviceGroup:
        """One device group by its id (404/100603 when there is none)."""
        return DeviceGroup.model_validate(await self._get(f"{GROUPS}/{group_id}", priority))

    async def group_member_page(
        self,
        group_id: str,
        *,
        page_no: int = 0,
        page_size: int = MAX_PAGE_SIZE,
        priority: Priority = Priority.SUBMIT,
    ) -> Page[str]:
        """One page of a group's device IDs."""
        params = _params(devGroupId=group_id, pageNo=page_no, pageSize=page_size)
        reply = await self._get(GROUP_MEMBERS, priority, params)
        return _page(reply, None, items_key="deviceIds")

    async def group_members(self, group_id: str, priority: Priority = Priority.SUBMIT) -> list[str]:
        """Every device ID of a group, all pages read: ⌈members / 100⌉ calls."""
        found: list[str] = []
        page_no = 0
        while True:
            page = await self.group_member_page(group_id, page_no=page_no, priority=priority)
            found.extend(page.items)
            if not page.items or len(found) >= page.total:
                return found
            page_no += 1


class _Refusals:
    """Refusals of one call that are not the run's fault (1010005, 1010009), in a row: waited
    out for up to the outage budget (`execution.outage_budget`), then KeptRefusing."""

    def __init__(self, outage: Outage) -> None:
        self._outage = outage
        self._since: float | None = None

    def note(self, error: PlatformError) -> None:
        now = self._outage.now()
        if self._since is None:
            self._since = now
        refused_for = now - self._since
        if refused_for >= self._outage.budget:
            raise KeptRefusing(
                f"refused {error.code} ({_REFUSAL.get(error.code, error.desc)}) on every "
                f"attempt for {describe_duration(refused_for)}; nothing is lost: "
                "`rollout resume` goes on later "
                f"(execution.outage_budget = {self._outage.budget:g} s)",
                method=error.method,
                path=error.path,
            )


_REFUSAL = {
    "1010009": "another client spends the app's budget",
    "1010005": "another client replaces the app's token",
}


def _api_name(method: str, path: str) -> str:
    if path == LOGIN_PATH:
        return "login"
    if path == REFRESH_PATH:
        return "refreshToken"
    if path == GROUP_MEMBERS:
        return "groupMembers"
    if path.startswith(GROUPS):
        return "getGroup" if path != GROUPS else "listGroups"
    tail = path.removeprefix(UPGRADE)
    if tail.startswith("/category"):
        if method == "DELETE":
            return "deletePackage"
        return "getPackage" if tail.count("/") > 1 else "listPackages"
    if method == "POST":
        return "createTask"
    if tail.endswith("/subOperations"):
        return "subOperations"
    return "getTask" if tail.count("/") > 1 else "listTasks"


def _params(**values: str | int | None) -> dict[str, str]:
    return {key: str(value) for key, value in values.items() if value is not None}


def _page(
    reply: Any,
    model: Any,
    total_keys: tuple[str, ...] = ("totalCount",),
    items_key: str = "data",
) -> Page[Any]:
    """A page reply: `items_key` holds the rows (`model` validates each; None: strings)."""
    if not isinstance(reply, dict):
        raise PlatformCallError("a page reply is not a JSON object")
    total = next((reply[k] for k in total_keys if isinstance(reply.get(k), int)), 0)
    rows = reply.get(items_key) or []
    if model is None:
        if not all(isinstance(row, str) for row in rows):
            raise PlatformCallError(f"{items_key} of a page reply is not a list of strings")
        items: list[Any] = list(rows)
    else:
        items = [model.model_validate(row) for row in rows]
    return Page(
        items=items,
        page_no=int(reply.get("pageNo", 0)),
        page_size=int(reply.get("pageSize", 0)),
        total=int(total),
    )


# ---- what a failed connection means, in the operator's words ------------------------------------
UNTRUSTED = frozenset({2, 18, 19, 20, 21, 27})  # X509_V_ERR_*: issuer unknown, self-signed
EXPIRED, NOT_YET_VALID = 10, 9
WRONG_HOST = frozenset({62, 64})  # host name or IP address mismatch
UNKNOWN_HOST = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


def _certificate_fix(error: BaseException, host: str, where: str) -> str:
    code = getattr(error, "verify_code", None)
    said = str(getattr(error, "verify_message", "") or "refused")
    if code in UNTRUSTED:
        return (
            f"the certificate of {where} is not trusted ({said}): set platform.ca_file to the "
            "CA that issued it (for a self-signed certificate, the certificate itself)"
        )
    if code == EXPIRED:
        return f"the certificate of {where} has expired: the platform's operators must renew it"
    if code == NOT_YET_VALID:
        return f"the certificate of {where} is not valid yet: check this machine's clock"
    if code in WRONG_HOST:
        return (
            f"the certificate of {where} is not valid for {host!r}: use the host name it was "
            "issued for in platform.url"
        )
    return f"the certificate of {where} was refused ({said}): check platform.ca_file"


def _connect_error(error: OSError, host: str, where: str) -> tuple[type[PlatformCallError], str]:
    if isinstance(error, socket.gaierror):
        if error.errno in UNKNOWN_HOST:
            return HostNotFound, f"the host name {host!r} is unknown (DNS): check platform.url"
        return ConnectFailed, f"the DNS lookup of {host!r} failed for now"
    if isinstance(error, ConnectionRefusedError):
        return ConnectFailed, f"{where} refused the connection"
    if isinstance(error, TimeoutError) or error.errno == errno.ETIMEDOUT:
        return ConnectFailed, f"connecting to {where} timed out"
    if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return ConnectFailed, f"{where} is unreachable (no route)"
    reason = (error.strerror or "failed").lower() if error.errno else "failed"
    return ConnectFailed, f"connecting to {where} {reason}"


def _lost_reason(error: aiohttp.ClientError) -> str:
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "the platform closed the connection before replying"
    if isinstance(error, aiohttp.ClientPayloadError):
        return "the reply was cut off"
    if isinstance(error, aiohttp.ClientResponseError):
        return "the reply was not valid HTTP"
    os_error = error if isinstance(error, OSError) else None
    if os_error is not None and os_error.errno == errno.ECONNRESET:
        return "the connection was reset"
    return "the connection was lost"


async def _speaks_tls(host: str, port: int, seconds: float) -> bool:
    """Does this port complete a TLS handshake (certificate unchecked: only the protocol)?"""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(seconds):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def _speaks_plain_http(host: str, port: int, seconds: float) -> bool:
    """Does this port answer a plain-HTTP request with an HTTP status line?"""
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"HEAD / HTTP/1.0\r\nHost: " + host.encode("idna") + b"\r\n\r\n")
                await writer.drain()
                head = await reader.read(5)
            finally:
                writer.close()
    except (OSError, TimeoutError, UnicodeError):
        return False
    return head == b"HTTP/"


UNREACHABLE = "unreachable"  # take_call_counts' key for calls whose connection never opened


def _log_retry(details: stamina.instrumentation.RetryDetails) -> None:
    """stamina's retries of a GET, in our words (its default line carries a repr). The
    hook is stamina's, global: a retry whose error says its owner logs it (`logged_by_owner`,
    a webhook's delivery: notify.py) is not told as a platform call's."""
    if getattr(details.caused_by, "logged_by_owner", False):
        return
    log.warning(
        "call failed; trying again",
        error=str(details.caused_by),
        retry=details.retry_num,
        wait_s=round(details.wait_for, 2),
    )


stamina.instrumentation.set_on_retry_hooks([_log_retry])

__all__ = ["NorthboundClient"]
