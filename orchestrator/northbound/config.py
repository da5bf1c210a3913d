"""Connection settings of the platform client, with every default named."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydantic import SecretStr

from ..errors import InputError

log = structlog.get_logger("orchestrator.northbound")

DEFAULT_RATE_LIMIT = (100, 60.0)
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_TOTAL_TIMEOUT = 30.0
DEFAULT_REFRESH_BEFORE = 300.0  # refresh a token this long before it expires
DEFAULT_GET_ATTEMPTS = 5
DEFAULT_OUTAGE_BUDGET = 600.0  # seconds a platform outage is ridden out (outage.py)


@dataclass(frozen=True)
class TLSConfig:
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    insecure: bool = False  # no certificate or host name check: explicit, and logged loudly

    def context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
        except (ssl.SSLError, OSError):
            raise InputError(
                str(self.ca_file), "platform.ca_file", "holds no readable PEM certificate"
            ) from None
        if self.client_cert is not None:
            try:
                context.load_cert_chain(
                    str(self.client_cert),
                    str(self.client_key) if self.client_key is not None else None,
                )
            except (ssl.SSLError, OSError):
                raise InputError(
                    str(self.client_cert),
                    "platform.client_cert/client_key",
                    "not a readable PEM certificate and its matching key",
                ) from None
        if self.insecure:
            log.warning(
                "TLS VERIFICATION IS OFF: the platform's certificate is not checked; "
                "anyone on the path can read the secret and forge replies"
            )
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    app_id: str
    secret: SecretStr = field(repr=False)
    tls: TLSConfig = field(default_factory=TLSConfig)
    rate_limit: tuple[int, float] = DEFAULT_RATE_LIMIT
    pacing_margin: float | None = None  # seconds a slot stays taken beyond the window; None: 0
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT
    refresh_before: float = DEFAULT_REFRESH_BEFORE
    get_attempts: int = DEFAULT_GET_ATTEMPTS
    outage_budget: float = DEFAULT_OUTAGE_BUDGET
    # the host's shared state of the app (token cache, pacing ledger): hoststate.py;
    # None: $ROLLOUT_STATE_DIR, else the user's state directory
    state_dir: Path | None = None
    label: str = ""  # who is calling, as `rollout budget` shows it (e.g. "run meters-fw")
