"""Access tokens: login and refresh issue them; only the newest one of an app works.

The platform documents that a new login invalidates older access tokens. Whether a refresh
does the same is not documented (platform-api.md §7); the simulator takes the strict reading —
any newly issued token invalidates the previous one — because a client that survives the
strict platform also survives the lenient one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REFRESH_TOKEN_TTL = 30 * 24 * 3600.0


@dataclass
class _Issued:
    access_token: str
    expires_at: float


class TokenStore:
    def __init__(self, apps: dict[str, str], ttl: float, monotonic: Callable[[], float]) -> None:
        self.apps = apps
        self.ttl = ttl
        self._monotonic = monotonic
        self._current: dict[str, _Issued] = {}
        self._refresh: dict[str, tuple[str, float]] = {}  # refresh token -> (app, expiry)
        self.issued_count = 0

    def credentials_ok(self, app_id: str, secret: str) -> bool:
        expected = self.apps.get(app_id)
        return expected is not None and secrets.compare_digest(expected, secret)

    def issue(self, app_id: str) -> dict[str, object]:
        now = self._monotonic()
        access = secrets.token_hex(16)
        refresh = secrets.token_hex(16)
        self._current[app_id] = _Issued(access, now + self.ttl)
        self._refresh[refresh] = (app_id, now + REFRESH_TOKEN_TTL)
        self.issued_count += 1
        return {
            "accessToken": access,
            "tokenType": "bearer",
            "refreshToken": refresh,
            "expiresIn": int(self.ttl),
            "scope": "default",
        }

    def revoke(self, app_id: str) -> None:
        """The app's current access token stops working (as when another client logs in)."""
        self._current.pop(app_id, None)

    def refresh_ok(self, app_id: str, refresh_token: str) -> bool:
        entry = self._refresh.get(refresh_token)
        return entry is not None and entry[0] == app_id and entry[1] > self._monotonic()

    def valid(self, app_id: str, access_token: str) -> bool:
        issued = self._current.get(app_id)
        if issued is None or issued.expires_at <= self._monotonic():
            return False
        return secrets.compare_digest(issued.access_token, access_token)

    def export(self) -> dict[str, object]:
        """The tokens in force, with their lifetimes left (seconds), for the state file."""
        now = self._monotonic()
        return {
            "current": {
                app: [issued.access_token, issued.expires_at - now]
                for app, issued in self._current.items()
            },
            "refresh": {
                token: [app, expiry - now] for token, (app, expiry) in self._refresh.items()
            },
            "issued_count": self.issued_count,
        }

    def restore(self, saved: dict[str, Any], elapsed: float) -> None:
        """Tokens from `export`, `elapsed` real seconds later (they aged meanwhile)."""
        now = self._monotonic() - elapsed
        self._current = {
            str(app): _Issued(str(token), now + float(left))
            for app, (token, left) in saved["current"].items()
        }
        self._refresh = {
            str(token): (str(app), now + float(left))
            for token, (app, left) in saved["refresh"].items()
        }
        self.issued_count = int(saved["issued_count"])
