"""Access tokens: login on first use, refresh before expiry, re-login once when refused.

Single flight: a new login invalidates every older token of the app, so concurrent callers
must never log in side by side. One lock serialises obtaining a token; a caller that waited
for it finds the fresh token and uses it. Tokens are never logged or put in exception texts
(`Token` hides them from its repr).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from ..errors import AuthFailed, BadRequest
from .models import Token

log = structlog.get_logger("orchestrator.auth")

Login = Callable[[], Awaitable[Token]]
Refresh = Callable[[str], Awaitable[Token]]


class TokenKeeper:
    def __init__(
        self,
        login: Login,
        refresh: Refresh,
        refresh_before: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._login = login
        self._refresh = refresh
        self._refresh_before = refresh_before
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: Token | None = None
        self._expires_at = 0.0
        self.logins = 0
        self.refreshes = 0

    def _fresh(self) -> bool:
        margin = min(self._refresh_before, (self._token.expires_in / 2) if self._token else 0)
        return self._token is not None and self._clock() < self._expires_at - margin

    async def access_token(self) -> str:
        """A token that is valid now; logs in or refreshes (once, for all callers) if needed."""
        if not self._fresh():
            async with self._lock:
                if not self._fresh():
                    await self._renew()
        assert self._token is not None
        return self._token.access_token

    async def replace(self, rejected: str) -> str:
        """The platform refused `rejected` (1010005): log in again unless someone already did."""
        async with self._lock:
            if self._token is None or self._token.access_token == rejected:
                self._token = None
                await self._renew()
        assert self._token is not None
        return self._token.access_token

    async def _renew(self) -> None:
        started = self._clock()
        token: Token | None = None
        if self._token is not None:
            try:
                token = await self._refresh(self._token.refresh_token)
                self.refreshes += 1
                log.info("access token refreshed", expires_in=token.expires_in)
            except (AuthFailed, BadRequest):
                token = None  # the refresh token is no good: fall back to a login
        if token is None:
            token = await self._login()
            self.logins += 1
            log.info("logged in", expires_in=token.expires_in)
        self._token = token
        self._expires_at = started + token.expires_in
