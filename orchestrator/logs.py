"""Logging: structlog, readable on a terminal, JSON lines with `--log-format json`.

Logs go to stderr so stdout stays clean for results (`status`, `plan`, the closing summary,
`--json`). They are printed through **one** rich Console — the same one the live display of
a run draws on (orchestrator.display) — so a log line scrolls above the display and never
lands inside it, in console and JSON modes alike. Without a terminal nothing is wrapped.

A processor strips anything that looks like a credential, so a careless
`log.info(..., secret=...)` can never leak one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

SECRET_KEYS = frozenset(
    {
        "secret",
        "app_secret",
        "access_token",
        "accesstoken",
        "refresh_token",
        "refreshtoken",
        "token",
        "authorization",
        "password",
    }
)
REDACTED = "***"
WIDE = 4096  # columns for human output that is not shown on a terminal: never wrapped

_consoles: dict[str, Console] = {}


def stderr_console() -> Console:
    """The one console for logs and the live display (stderr)."""
    console = _consoles.get("stderr")
    if console is None:
        from rich.console import Console

        terminal = sys.stderr.isatty()
        console = Console(stderr=True, width=None if terminal else WIDE)
        _consoles["stderr"] = console
    return console


def stdout_console() -> Console:
    """The console for human results (tables) on stdout; unwrapped without a terminal."""
    console = _consoles.get("stdout")
    if console is None:
        from rich.console import Console

        terminal = sys.stdout.isatty()
        console = Console(width=None if terminal else WIDE)
        _consoles["stdout"] = console
    return console


def use_consoles(stderr: Console | None = None, stdout: Console | None = None) -> None:
    """Draw on these consoles instead (tests record a run through one)."""
    for name, console in (("stderr", stderr), ("stdout", stdout)):
        if console is None:
            _consoles.pop(name, None)
        else:
            _consoles[name] = console


class ConsoleLogger:
    """structlog's output: one printed line per event through the shared console."""

    def msg(self, message: str) -> None:
        from rich.text import Text

        text = Text.from_ansi(message) if "\x1b" in message else Text(message)
        stderr_console().print(text, soft_wrap=True, highlight=False, markup=False, emoji=False)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        if key.lower() in SECRET_KEYS:
            event_dict[key] = REDACTED
    return event_dict


def configure_logging(
    log_format: str = "console", level: str = "info", console: Console | None = None
) -> None:
    """structlog on the shared stderr console (or on `console`, which then becomes it)."""
    import structlog  # here: commands that only read the journal start without it

    if console is not None:
        use_consoles(stderr=console, stdout=_consoles.get("stdout"))
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = console.is_terminal if console is not None else sys.stderr.isatty()
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *_: ConsoleLogger(),
        cache_logger_on_first_use=False,
    )
