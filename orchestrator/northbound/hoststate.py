"""Where an application's state on this host lives: one private directory per app.

Every `rollout` process of one application on one host shares that app's access token and
its call budget (platform-api.md §1: one valid token per app — a new login invalidates the
older ones — and one flow-control budget per app over all APIs). What they share lives in

    <state root>/apps/<key>/        mode 0700
        app.json                    the platform URL and app id the key stands for (0600)
        token.json, token.lock      the token cache and its lock (tokencache.py)
        ledger.sqlite               the pacing ledger (ledger.py), WAL

The state root is `--state-dir`, else `$ROLLOUT_STATE_DIR`, else the user's state directory
(platformdirs: `~/.local/state/rollout` on Linux). The key is a hash of the platform's base
URL (one spelling: `canonical_url`) and the app id, so two platforms, or two apps of one
platform, never share anything, and one platform written two ways shares everything.
Nothing here ever holds the app's secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from yarl import URL

from ..errors import InputError

ENV_VAR = "ROLLOUT_STATE_DIR"
APP_NAME = "rollout"
DIR_MODE = 0o700
FILE_MODE = 0o600


def default_state_root() -> Path:
    """`$ROLLOUT_STATE_DIR` if set, else the user's state directory for `rollout`."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return platformdirs.user_state_path(APP_NAME)


def state_root(override: Path | None = None) -> Path:
    """The state root: `override` (the `--state-dir` option), else `default_state_root()`."""
    return override.expanduser() if override is not None else default_state_root()


DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_url(base_url: str) -> str:
    """The platform's base URL in one spelling, so that one platform is one application on
    the host however the plans write it: scheme and host in lower case, the host without a
    trailing dot, the default port (80, 443) left out, no trailing `/`, no user info, query
    or fragment (yarl parses it). Names are not resolved: `localhost` and `127.0.0.1` (or
    two names of one host) stay two spellings, so two keys."""
    try:
        url = URL(base_url.strip())
        scheme = url.scheme.lower()
        host = (url.host or "").rstrip(".").lower()
        if not scheme or not host:
            return base_url.rstrip("/")
        port = url.port if url.port != DEFAULT_PORTS.get(scheme) else None
        return str(URL.build(scheme=scheme, host=host, port=port, path=url.path.rstrip("/")))
    except ValueError:
        return base_url.rstrip("/")


def app_key(base_url: str, app_id: str) -> str:
    """The directory name of an application: 20 hex digits of sha256(canonical base URL,
    app id)."""
    text = f"{canonical_url(base_url)}\n{app_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _private_dir(path: Path) -> None:
    """Create `path` and each missing parent with mode 0700 (mkdir's `parents` would give
    the parents the umask's mode); an existing `path` is made 0700 too, its parents kept."""
    missing = [folder for folder in (path, *path.parents) if not folder.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(folder, DIR_MODE)
    os.chmod(path, DIR_MODE)


def private_file(path: Path) -> None:
    """Create `path` if missing, and make it mode 0600 either way."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data` (mode 0600): a reader sees the old or the new.
    On failure (OSError: a full disk, a file that may not be replaced) the temporary file is
    removed — what it held (a token) is never left in a stray file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class HostStateFailed(InputError):
    """A file of the app's state on this host (the token cache, the pacing ledger) cannot be
    used — a full disk, a file that may not be replaced: exit 2, one line naming the file and
    what to do. Never a platform failure, never counted as one."""

    def __init__(self, path: Path, what: str, error: BaseException) -> None:
        self.path = path
        reason = (
            error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        ) or type(error).__name__
        super().__init__(
            str(path),
            what,
            f"cannot be written ({reason}); free space or fix the file, or choose another "
            f"state directory with --state-dir or ${ENV_VAR}",
        )


@dataclass(frozen=True)
class AppState:
    """The private directory of one application on this host."""

    directory: Path
    base_url: str
    app_id: str

    @property
    def token_file(self) -> Path:
        return self.directory / "token.json"

    @property
    def lock_file(self) -> Path:
        return self.directory / "token.lock"

    @property
    def ledger_file(self) -> Path:
        return self.directory / "ledger.sqlite"

    @classmethod
    def locate(cls, root: Path, base_url: str, app_id: str) -> AppState:
        """Where the app's state is (nothing is created)."""
        base = canonical_url(base_url)
        return cls(root / "apps" / app_key(base, app_id), base, app_id)

    @classmethod
    def open(cls, root: Path, base_url: str, app_id: str) -> AppState:
        """The app's state directory, created private (0700) if needed.

        Raises InputError (exit 2) naming the directory when it cannot be created or written.
        """
        state = cls.locate(root, base_url, app_id)
        try:
            if not root.is_dir():  # a root we create is private; an existing one is left as is
                _private_dir(root)
        except OSError as exc:
            raise _unusable(root, exc) from None
        try:
            _private_dir(state.directory.parent)
            _private_dir(state.directory)
            about = state.directory / "app.json"
            if not about.exists():
                body = {"base_url": state.base_url, "app_id": app_id}
                write_private(about, json.dumps(body).encode())
        except OSError as exc:
            raise _unusable(state.directory, exc) from None
        return state


def _unusable(path: Path, exc: OSError) -> InputError:
    reason = exc.strerror or type(exc).__name__
    return InputError(
        str(path),
        "state directory",
        f"cannot be created or written ({reason}); choose another with --state-dir or ${ENV_VAR}",
    )


def known_apps(root: Path) -> Iterator[AppState]:
    """Every application that has state under `root` (for `rollout budget`)."""
    apps = root / "apps"
    if not apps.is_dir():
        return
    for directory in sorted(apps.iterdir()):
        about = directory / "app.json"
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            body = json.loads(about.read_text())
            yield AppState(directory, str(body["base_url"]), str(body["app_id"]))


# ---- processes -----------------------------------------------------------------------------------
def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux /proc), or None when
    there is no such process. A pid and its start time name one process: pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, started: int | None) -> bool:
    """Whether the process `pid` that started at `started` (ticks) is still running."""
    now_started = process_start(pid)
    if now_started is None:
        if not Path("/proc").is_dir():  # no /proc: fall back to signal 0
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return False
    return started is None or now_started == started


def boot_id() -> str:
    """This boot of the host (CLOCK_MONOTONIC, which the ledger uses, restarts with it)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"
