"""The app's access token, shared by every process of the app on this host.

The platform keeps one valid access token per app: a new login (and, on the strict reading,
a refresh) invalidates the older ones (platform-api.md §1, §2.2). Processes that each logged
in on their own would invalidate each other's tokens in turn. So the token lives in one file
of the app's state directory (`hoststate.AppState.token_file`, mode 0600, written atomically)
and one process at a time may obtain a new one, under an exclusive `flock` on
`AppState.lock_file`; the others wait for the lock, then find the new token in the file.

What is written: the access token, the refresh token, their lifetime and the wall-clock time
the access token expires. Never the app's secret. The file is treated like the journal: its
content never reaches a log, a report or an exception text (a damaged file reads as empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .hoststate import FILE_MODE, AppState, HostStateFailed, write_private
from .models import Token

LOCK_POLL = 0.02  # seconds between attempts at a lock another process holds


@dataclass(frozen=True)
class CachedToken:
    token: Token
    expires_at: float  # wall clock (time.time()) when the platform stops accepting it


class TokenCache:
    """The token file of one app. `read` and `changed` need no lock; obtaining a new token
    happens inside `async with cache.exclusive():`."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._signature: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.state.token_file)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        """Whether the file was replaced since this process last read or wrote it (a stat)."""
        return self._stat() != self._signature

    def read(self) -> CachedToken | None:
        """The cached token, or None when there is none or the file is damaged."""
        self._signature = self._stat()
        try:
            body = json.loads(self.state.token_file.read_bytes())
            token = Token.model_validate(body["token"])
            return CachedToken(token, float(body["expires_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, token: Token, expires_at: float) -> None:
        """Replace the cached token (call inside `exclusive()`). HostStateFailed (exit 2)
        names the file when it cannot be replaced; no copy of the token is left behind."""
        body = {"token": token.model_dump(by_alias=True), "expires_at": expires_at}
        self._replace(json.dumps(body).encode())

    def check_writable(self) -> None:
        """Replace the file with what it holds now (an empty object when there is none), so
        that a file that cannot be replaced stops the command (HostStateFailed) *before* a
        login spends a call and invalidates the other processes' token. Call inside
        `exclusive()`."""
        try:
            current = self.state.token_file.read_bytes()
        except FileNotFoundError:
            current = b"{}"  # reads as no token
        except OSError as exc:
            raise HostStateFailed(self.state.token_file, "token cache", exc) from None
        self._replace(current)

    def _replace(self, data: bytes) -> None:
        try:
            write_private(self.state.token_file, data)
        except OSError as exc:
            raise HostStateFailed(self.state.token_file, "token cache", exc) from None
        self._signature = self._stat()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the app's token lock (one login or refresh at a time on this host). Waiting
        polls a non-blocking `flock`, so a cancelled waiter leaves no lock behind; the kernel
        drops the lock of a process that dies holding it."""
        try:
            fd = os.open(self.state.lock_file, os.O_CREAT | os.O_RDWR, FILE_MODE)
        except OSError as exc:
            raise HostStateFailed(self.state.lock_file, "token lock", exc) from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
