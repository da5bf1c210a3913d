"""Access tokens: login on first use, refresh before expiry, re-login when refused.

Single flight: a new login invalidates every older token of the app (platform-api.md §1), so
callers must never log in side by side — neither the tasks of one process (an asyncio lock)
nor the processes of one host (the shared `TokenCache` and its file lock). A caller that
waited finds the fresh token and uses it; a process that draws 1010005 first looks at the
cache and logs in only if the token there is the one that was refused. Tokens are never
logged or put in exception texts (`Token` hides them from its repr).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from ..errors import AuthFailed, BadRequest
from .models import Token
from .tokencache import TokenCache

log = structlog.get_logger("orchestrator.auth")

Login = Callable[[], Awaitable[Token]]
Refresh = Callable[[str], Awaitable[Token]]
RENEW_SHARE = 0.1  # of a token's lifetime: renewed when less than this (or refresh_before) is left


class TokenKeeper:
    def __init__(
        self,
        login: Login,
        refresh: Refresh,
        refresh_before: float,
        clock: Callable[[], float] = time.time,
        cache: TokenCache | None = None,
    ) -> None:
        """`clock`: wall-clock seconds (expiry times are shared between processes through
        `cache`, the host's token file; None keeps the token in this process only)."""
        self._login = login
        self._refresh = refresh
        self._refresh_before = refresh_before
        self._clock = clock
        self.cache = cache
        self._lock = asyncio.Lock()
        self._token: Token | None = None
        self._expires_at = 0.0
        self.logins = 0
        self.refreshes = 0
        self.adopted = 0  # tokens another process obtained, taken from the cache

    def _is_fresh(self, token: Token | None, expires_at: float) -> bool:
        """Renewed shortly before it expires — `refresh_before` (5 min), or a tenth of a
        short lifetime — so once per lifetime, for all processes of the host."""
        if token is None:
            return False
        margin = min(self._refresh_before, token.expires_in * RENEW_SHARE)
        return self._clock() < expires_at - margin

    def _fresh(self) -> bool:
        return self._is_fresh(self._token, self._expires_at)

    async def access_token(self) -> str:
        """A token that is valid now; obtains one (once, for all callers) if needed."""
        if self.cache is not None and self.cache.changed():
            self._adopt(rejected=None)  # another process got a new token: use it at once
        if not self._fresh():
            async with self._lock:
                if not self._fresh():
                    await self._obtain(rejected=None)
        assert self._token is not None
        return self._token.access_token

    def current(self) -> str | None:
        """The token to send now, without waiting: the host's newest one if another process
        replaced it (a `stat` of the cache), None when it needs renewing (`access_token`).
        Called once the call's pacing slot is granted, just before it leaves."""
        if self.cache is not None and self.cache.changed():
            self._adopt(rejected=None)
        return self._token.access_token if self._fresh() and self._token is not None else None

    async def replace(self, rejected: str) -> str:
        """The platform refused `rejected` (1010005): take the host's newer token if there is
        one, else log in again (unless a caller here already did)."""
        async with self._lock:
            if self._token is None or self._token.access_token == rejected:
                await self._obtain(rejected=rejected)
        assert self._token is not None
        return self._token.access_token

    def _adopt(self, rejected: str | None) -> bool:
        """Take the cached token if it is fresh and not `rejected`; True when taken. A stale
        cached token still replaces ours when it is newer: its refresh token is the latest."""
        assert self.cache is not None
        cached = self.cache.read()
        if cached is None:
            return False
        usable = cached.token.access_token != rejected and self._is_fresh(
            cached.token, cached.expires_at
        )
        newer = self._token is None or cached.expires_at > self._expires_at
        different = self._token is None or cached.token.access_token != self._token.access_token
        if (usable or newer) and different:
            if usable:
                self.adopted += 1
                log.debug("access token taken from the host's cache")
            self._token, self._expires_at = cached.token, cached.expires_at
        return usable

    async def _obtain(self, rejected: str | None) -> None:
        if self.cache is None:
            await self._renew(login=rejected is not None)
            return
        if self._adopt(rejected):
            return
        async with self.cache.exclusive():
            if self._adopt(rejected):  # obtained by another process while we waited
                return
            self.cache.check_writable()  # before a login spends a call and others' tokens
            await self._renew(login=rejected is not None)
            assert self._token is not None
            self.cache.write(self._token, self._expires_at)

    async def _renew(self, login: bool) -> None:
        started = self._clock()
        token: Token | None = None
        if self._token is not None and not login:
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
