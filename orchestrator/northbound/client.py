"""The async platform client: typed calls, shared pacing, tokens, one error boundary.

Every call takes a pacing slot first (retries and logins too). GETs are retried with
backoff on transport errors and 5xx; creates are never retried here on those, because they
may have taken effect — the engine reconciles them. A throttle reply (1010009) certainly did
not act, so any call — a create included — waits for the pacer's cool-down and goes again.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import aiohttp
import stamina
import structlog

from ..errors import (
    ConnectFailed,
    ConnectionLost,
    InvalidToken,
    PlatformCallError,
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
from .models import (
    SUBTASK_STATUS_TO_WIRE,
    TASK_STATUS_TO_WIRE,
    CreateTaskRequest,
    OperationType,
    Package,
    Page,
    Status,
    SubOperation,
    Task,
    Token,
)
from .pacing import Pacer, Priority, shared_pacer

log = structlog.get_logger("orchestrator.northbound")

LOGIN_PATH = "/iocm/app/sec/v1.1.0/login"
REFRESH_PATH = "/iocm/app/sec/v1.1.0/refreshToken"
UPGRADE = "/iodm/northbound/v1.5.0"
MAX_PAGE_SIZE = 100
MAX_THROTTLED_ATTEMPTS = 20
BeforeSend = Callable[[], None]


class NorthboundClient:
    """Use as `async with NorthboundClient(config) as client:`."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        pacer: Pacer | None = None,
        clock: PlatformClock | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or PlatformClock()
        self._base = config.base_url.rstrip("/")
        self._pacer = pacer
        self._session: aiohttp.ClientSession | None = None
        self.tokens = TokenKeeper(self._login, self._refresh, config.refresh_before)
        self.calls = 0
        self._calls_by_api: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()  # 1010009 replies per API since the start

    def take_call_counts(self) -> dict[str, int]:
        """Calls sent per API since the last time this was asked (for the journal)."""
        counts, self._calls_by_api = dict(self._calls_by_api), Counter()
        return counts

    @property
    def pacer(self) -> Pacer:
        if self._pacer is None:
            calls, seconds = self.config.rate_limit
            self._pacer = shared_pacer(
                self._base, self.config.app_id, calls, seconds, self.config.pacing_margin
            )
        return self._pacer

    async def __aenter__(self) -> NorthboundClient:
        ssl_context = self.config.tls.context() if self._base.startswith("https") else None
        connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True)
        timeout = aiohttp.ClientTimeout(
            total=self.config.total_timeout, connect=self.config.connect_timeout
        )
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        _ = self.pacer
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
        token: str | None = None,
        before_send: BeforeSend | None = None,
    ) -> Any:
        if self._session is None:
            raise RuntimeError("use the client as `async with NorthboundClient(...)`")
        headers: dict[str, str] = {}
        if token is not None:
            headers = {"app_key": self.config.app_id, "Authorization": f"Bearer {token}"}
        await self.pacer.acquire(priority)
        if callable(body):  # built first: a body that cannot be built leaves no intent behind
            body = body()
        if before_send is not None:
            before_send()
        self.calls += 1
        self._calls_by_api[_api_name(method, path)] += 1
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
        except aiohttp.ClientSSLError as exc:
            raise TLSFailed(f"TLS failed: {type(exc).__name__}", method=method, path=path) from None
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(
                f"cannot connect: {exc.os_error.strerror or type(exc).__name__}",
                method=method,
                path=path,
            ) from None
        except aiohttp.ConnectionTimeoutError:
            raise ConnectFailed("connect timed out", method=method, path=path) from None
        except (TimeoutError, aiohttp.SocketTimeoutError):
            raise RequestTimedOut("no reply in time", method=method, path=path) from None
        except aiohttp.ClientError as exc:
            raise ConnectionLost(
                f"connection lost: {type(exc).__name__}", method=method, path=path
            ) from None
        return self._interpret(method, path, status, raw)

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
            self.pacer.on_success()
            return payload
        if isinstance(error, Throttled):
            self.throttled[_api_name(method, path)] += 1
            self.pacer.on_throttled()
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
        """One logical call: token, one re-login on 1010005, waits out throttling.

        `before_send` runs each time an attempt has its pacing slot and is about to leave —
        the engine journals its intent there (the first time) and the send time of the
        attempt that really leaves (after a throttled or re-authenticated one, which certainly
        did not act), so a process killed while waiting for a slot leaves nothing to reconcile
        and the settle time counts from the last send.
        """
        relogged = False
        token = await self.tokens.access_token()
        for _ in range(MAX_THROTTLED_ATTEMPTS):
            try:
                return await self._send(
                    method, path, priority, token=token, before_send=before_send, **kwargs
                )
            except InvalidToken:
                if relogged:
                    raise
                relogged = True
                token = await self.tokens.replace(token)
            except Throttled:
                continue  # refused and not counted: safe to send again after the cool-down
        raise Throttled(
            403, "1010009", "still throttled after many attempts", method=method, path=path
        )

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
                return await self._call("GET", path, priority, params=params)
        raise AssertionError("unreachable: retry_context returns or raises")

    async def _login(self) -> Token:
        form = {"appId": self.config.app_id, "secret": self.config.secret.get_secret_value()}
        for _ in range(MAX_THROTTLED_ATTEMPTS):
            try:
                return Token.model_validate(
                    await self._send("POST", LOGIN_PATH, Priority.AUTH, form=form)
                )
            except Throttled:
                continue
        raise Throttled(403, "1010009", "login throttled", method="POST", path=LOGIN_PATH)

    async def _refresh(self, refresh_token: str) -> Token:
        body = {
            "appId": self.config.app_id,
            "secret": self.config.secret.get_secret_value(),
            "refreshToken": refresh_token,
        }
        return Token.model_validate(
            await self._send("POST", REFRESH_PATH, Priority.AUTH, body=body)
        )

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
            params = _params(
                subOperationStatus=SUBTASK_STATUS_TO_WIRE[status] if status else None,
                pageNo=page_no,
                pageSize=MAX_PAGE_SIZE,
            )
            reply = await self._get(
                f"{UPGRADE}/operations/{operation_id}/subOperations", priority, params
            )
            page = _page(reply, SubOperation)
            found.extend(page.items)
            if not page.items or len(found) >= page.total:
                return found
            page_no += 1


def _api_name(method: str, path: str) -> str:
    if path == LOGIN_PATH:
        return "login"
    if path == REFRESH_PATH:
        return "refreshToken"
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


def _page(reply: Any, model: Any, total_keys: tuple[str, ...] = ("totalCount",)) -> Page[Any]:
    if not isinstance(reply, dict):
        raise PlatformCallError("a page reply is not a JSON object")
    total = next((reply[k] for k in total_keys if isinstance(reply.get(k), int)), 0)
    items = [model.model_validate(row) for row in reply.get("data") or []]
    return Page(
        items=items,
        page_no=int(reply.get("pageNo", 0)),
        page_size=int(reply.get("pageSize", 0)),
        total=int(total),
    )


__all__ = ["NorthboundClient"]
