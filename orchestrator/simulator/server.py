"""Running the simulator: in-process on an ephemeral port, or as `rollout simulator`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from aiohttp import web

from .app import BACKGROUND_KEY, build_app
from .certs import server_context, write_self_signed
from .clock import Clock, ScaledClock
from .faults import FaultConfig, FaultInjector
from .fleet import Fleet, generate_fleet
from .platform import Platform, task_row
from .state import (
    append_create,
    elapsed_since,
    fleet_key,
    read_state,
    simulated_now,
    write_state,
)
from .tasks import Task

log = logging.getLogger(__name__)

DEFAULT_APP_ID = "demo-app"
DEFAULT_SECRET = "demo-secret"


@dataclass
class SimulatorConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: an ephemeral port (tests, the embedded demo)
    tls: bool = True
    cert_file: Path | None = None  # with key_file: serve this certificate instead of a new one
    key_file: Path | None = None
    client_ca: Path | None = None
    app_id: str = DEFAULT_APP_ID
    secret: str = DEFAULT_SECRET
    devices: int = 2000  # at most fleet.max_devices(): what the available memory holds
    seed: int = 1
    models: tuple[str, ...] | None = None  # model names (WM-200, ...); None: every model
    rate_limit: tuple[int, float] = (100, 60.0)
    token_ttl: float = 3600.0
    speed: float = 1.0
    failure_rate: float | None = None  # None: each model's own; else every model's, and no
    # never-online or already-upgraded devices, so the failure share is known exactly
    faults: FaultConfig = field(default_factory=FaultConfig)
    state_file: Path | None = None  # load on start, save on change and on shutdown (state.py)
    state_every: float = 0.5  # seconds: the most a change waits before it is saved


class SimulatorServer:
    """The simulated platform served over HTTP(S); use as an async context manager."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        clock: Clock | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        self.config = config or SimulatorConfig()
        cfg = self.config
        self._fleet_key = fleet_key(cfg.devices, cfg.seed, cfg.app_id, cfg.failure_rate, cfg.models)
        saved = read_state(cfg.state_file, self._fleet_key) if cfg.state_file else None
        if clock is None:
            start = simulated_now(saved, cfg.speed) if saved is not None else None
            clock = ScaledClock(cfg.speed, start=start)
        self.clock: Clock = clock
        if fleet is None and cfg.failure_rate is not None:
            fleet = generate_fleet(
                cfg.devices,
                cfg.seed,
                cfg.app_id,
                failure_probability=cfg.failure_rate,
                never_online_share=0.0,
                already_upgraded_share=0.0,
                models=cfg.models,
            )
        self.fleet = fleet or generate_fleet(cfg.devices, cfg.seed, cfg.app_id, models=cfg.models)
        self.platform = Platform(
            self.fleet,
            self.clock,
            {cfg.app_id: cfg.secret},
            rate_limit=cfg.rate_limit,
            token_ttl=cfg.token_ttl,
            faults=FaultInjector(cfg.faults),
        )
        if saved is not None:
            self.platform.restore_state(saved["platform"], elapsed_since(saved))
        self.restored = saved is not None
        self._autosave: asyncio.Task[None] | None = None
        self._saving = False  # the state file is saved on change and on close
        self._runner: web.AppRunner | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.cert_file: Path | None = None
        self.port = 0

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{self.config.host}:{self.port}"

    def _ssl_context(self) -> ssl.SSLContext | None:
        cfg = self.config
        if not cfg.tls:
            return None
        if cfg.cert_file is not None and cfg.key_file is not None:
            cert, key = cfg.cert_file, cfg.key_file
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="rollout-sim-")
            cert, key = write_self_signed(Path(self._tmp.name), cfg.host)
        self.cert_file = cert
        return server_context(cert, key, cfg.client_ca)

    async def start(self) -> None:
        """Listen on the configured host and port. Raises OSError (port in use, …) with
        nothing left running."""
        app = build_app(self.platform)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.host, self.config.port, ssl_context=self._ssl_context()
        )
        try:
            await site.start()
        except BaseException:
            await self.close()
            raise
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        if self.config.state_file is not None:
            try:
                self.save_state()  # at once: a file that cannot be written fails the start
            except BaseException:
                await self.close()
                raise
            self._saving = True
            self.platform.on_commit = self._log_create
            self._autosave = asyncio.get_running_loop().create_task(self._save_on_change())

    def _log_create(self, task: Task) -> None:
        """Before a create is answered: its task in the create log (state.py). A log that
        cannot be written fails the create (HTTP 500 from the app): no answer, no loss."""
        assert self.config.state_file is not None
        append_create(self.config.state_file, task_row(task))

    def save_state(self) -> None:
        """Write the state file now (state.py). Raises OSError when it cannot be written."""
        assert self.config.state_file is not None
        write_state(
            self.config.state_file,
            self._fleet_key,
            self.clock.now(),
            self.platform.export_state(),
        )

    async def _save_on_change(self) -> None:
        saved = self.platform.changes
        while True:
            await asyncio.sleep(self.config.state_every)
            if self.platform.changes != saved:
                saved = self.platform.changes
                try:
                    self.save_state()
                except OSError as exc:  # a full disk: keep serving, try again on the next change
                    log.error("cannot save the state file %s: %s", exc.filename, exc.strerror)

    async def close(self) -> None:
        """Stop serving and save the state. The save runs even when the close is cancelled
        (Ctrl-C cancels an embedded simulator's close along with the command)."""
        try:
            if self._autosave is not None:
                self._autosave.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._autosave
                self._autosave = None
            if self._runner is not None:
                background = self._runner.app[BACKGROUND_KEY]
                # pending late commits first: a handler waiting for one then ends at once
                # instead of holding the graceful shutdown; again after, for any a last
                # request started
                await background.close()
                await self._runner.cleanup()
                await background.close()
                self._runner = None
        finally:
            self.platform.on_commit = None
            if self._saving:
                self._saving = False
                self.save_state()  # after the last request: every commit is in it
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
