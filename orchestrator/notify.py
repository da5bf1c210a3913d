"""Webhook notifications: the plan's `[[notify]]` entries hear of gates and of the run's end.

Each notice is one JSON POST:

    {"text": "[rollout meters-fw-2-1] wave 'canary' passed its gate: 240 of 256 finished …",
     "event": "gate-passed", "plan": "meters-fw-2-1", "run_id": 1,
     "at": "2026-05-04T12:00:00+00:00", "detail": {"wave": "canary", …}}

`text` is plain, so chat webhooks (Slack, Mattermost, Rocket.Chat, Google Chat, Teams
workflows) show it as is. Events: gate-passed, gate-failed, gate-awaiting-approval,
run-completed, run-halted, run-aborted, duplicates-found, outage (docs/plan-file.md).

Never blocking, never failing the rollout: notices wait in a queue per webhook and are sent
by a background task, retried with backoff (stamina) on connection errors, timeouts, 429 and
5xx; when the run ends, what is still queued gets at most `give_up_after` seconds, then is
dropped with a warning. The URL comes from the environment (`url_env`) because chat webhook
URLs carry their secret; it is never logged — a failed delivery names the webhook by its
place among the plan's `[[notify]]` entries (1 for the first) and the error's type or HTTP
status only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from .observe import Notice, Observer, Observers

if TYPE_CHECKING:
    import aiohttp

    from .loaded_plan import LoadedPlan
    from .plan import NotifySection

log = structlog.get_logger("orchestrator.notify")


class _Retry(Exception):
    """Worth sending again: no reply (connection, timeout), 429 or 5xx. The text never holds
    the URL. Logged here as a webhook's, not by the client's retry hook as a platform call's."""

    logged_by_owner = True


class _Refused(Exception):
    """A 4xx other than 429: sending again would not help."""


def payload(notice: Notice) -> dict[str, object]:
    return {
        "text": f"[rollout {notice.plan}] {notice.text}",
        "event": notice.kind.value,
        "plan": notice.plan,
        "run_id": notice.run_id,
        "at": datetime.fromtimestamp(notice.at, UTC).isoformat(timespec="seconds"),
        "detail": notice.detail,
    }


class Webhook:
    """One `[[notify]]` entry: a queue and the task that empties it."""

    def __init__(self, index: int, section: NotifySection, url: str) -> None:
        self.index, self.section, self._url = index, section, url
        self.queue: asyncio.Queue[Notice] = asyncio.Queue()
        self.delivered = 0
        self.dropped = 0

    def wants(self, notice: Notice) -> bool:
        return not self.section.events or notice.kind.value in self.section.events

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            notice = await self.queue.get()
            try:
                await self._deliver(session, notice)
                self.delivered += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.dropped += 1
                log.warning(
                    "notification not delivered",
                    webhook=self.index + 1,
                    notice=notice.kind.value,
                    error=str(exc) if isinstance(exc, _Retry | _Refused) else type(exc).__name__,
                )
            finally:
                self.queue.task_done()

    async def _deliver(self, session: aiohttp.ClientSession, notice: Notice) -> None:
        import aiohttp
        import stamina

        body = json.dumps(payload(notice)).encode()
        timeout = aiohttp.ClientTimeout(total=self.section.timeout)
        async for attempt in stamina.retry_context(
            on=_Retry,
            attempts=self.section.attempts,
            wait_initial=0.2,
            wait_jitter=0.2,
            wait_max=10.0,
            timeout=self.section.give_up_after,
        ):
            with attempt:
                try:
                    async with session.post(
                        self._url,
                        data=body,
                        headers={"Content-Type": "application/json"},
                        timeout=timeout,
                    ) as reply:
                        status = reply.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # aiohttp's texts may carry the URL, and with it the secret: the type only
                    raise self._again(attempt.num, notice, type(exc).__name__) from None
                if status == 429 or status >= 500:
                    raise self._again(attempt.num, notice, f"HTTP {status}")
                if status >= 400:
                    raise _Refused(f"HTTP {status}")  # not worth a retry

    def _again(self, attempt: int, notice: Notice, error: str) -> _Retry:
        """A failed delivery attempt, logged as the webhook's (1-based, as in the plan's
        order) — never as a platform call, never with the URL."""
        if attempt < self.section.attempts:
            log.info(
                "webhook delivery failed; trying again",
                webhook=self.index + 1,
                notice=notice.kind.value,
                attempt=attempt,
                error=error,
            )
        return _Retry(error)


class Notifier(Observer):
    """Hands each notice to the webhooks that want it; sending happens elsewhere."""

    def __init__(self, hooks: list[Webhook]) -> None:
        self.hooks = hooks

    def notice(self, notice: Notice) -> None:
        for hook in self.hooks:
            if hook.wants(notice):
                hook.queue.put_nowait(notice)


def url_problem(url: str) -> str | None:
    """What is wrong with a webhook URL, in words that never quote it (it carries a secret),
    or None: it must be set, http or https, with a host, a port in 1–65535 and no blank —
    what aiohttp could not send to, or would send somewhere else, is refused before any
    call instead of being retried."""
    from yarl import URL

    if not url:
        return "is not set"
    try:
        parsed = URL(url)
        port = parsed.port
    except ValueError:
        return "does not hold a valid URL"
    if parsed.scheme not in ("http", "https"):
        return "does not hold an http(s) URL"
    if not parsed.host or any(c.isspace() for c in url):
        return "does not hold a valid host name"
    if port is None or not 0 < port < 65536:
        return "does not hold a valid port"
    return None


def webhook_urls(loaded: LoadedPlan) -> list[str]:
    """The URL of each `[[notify]]` entry, from its environment variable. Raises InputError
    (exit 2, before any call) when one is unset or not a URL a webhook can be sent to
    (`url_problem`); the message names the variable, never its value."""
    import os

    from .errors import InputError

    urls = []
    for index, section in enumerate(loaded.plan.notify):
        url = os.environ.get(section.url_env, "")
        problem = url_problem(url)
        if problem is not None:
            raise InputError(
                str(loaded.path),
                f"notify.{index}.url_env",
                f"environment variable {section.url_env} {problem}",
            )
        urls.append(url)
    return urls


@contextlib.asynccontextmanager
async def notifying(loaded: LoadedPlan, observer: Observer | None) -> AsyncIterator[Observer]:
    """`observer` plus the plan's webhooks, for the time of a run; at its end, what is still
    queued gets at most the longest `give_up_after` of the entries."""
    sections = loaded.plan.notify
    if not sections:
        yield observer or Observer()
        return
    import aiohttp

    hooks = [
        Webhook(index, section, url)
        for index, (section, url) in enumerate(zip(sections, webhook_urls(loaded), strict=True))
    ]
    session = aiohttp.ClientSession()
    workers = [asyncio.create_task(hook.run(session)) for hook in hooks]
    try:
        yield Observers([o for o in (observer, Notifier(hooks)) if o is not None])
    finally:
        import anyio

        # shielded, all of it: a run stopped by Ctrl-C still tells, within the same time
        # limit, and a run that got to its end keeps its result; a Ctrl-C (or SIGTERM)
        # during this wait (`interrupt_drains`) ends it at once
        stop = asyncio.Event()
        _DRAINS.add(stop)
        try:
            with anyio.CancelScope(shield=True):
                budget = max(section.give_up_after for section in sections)
                with anyio.move_on_after(budget):
                    drained: asyncio.Task[Any] = asyncio.create_task(_joined(hooks))
                    stopped: asyncio.Task[Any] = asyncio.create_task(stop.wait())
                    try:
                        await asyncio.wait([drained, stopped], return_when=FIRST_COMPLETED)
                    finally:
                        drained.cancel()
                        stopped.cancel()
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                await session.close()
        finally:
            _DRAINS.discard(stop)
        left = sum(hook.queue.qsize() for hook in hooks)
        if left:
            log.warning("notifications dropped at the end of the run", notices=left)


async def _joined(hooks: list[Webhook]) -> None:
    await asyncio.gather(*(hook.queue.join() for hook in hooks))


_DRAINS: set[asyncio.Event] = set()  # end-of-run waits for queued notices, now


def interrupt_drains() -> None:
    """Ctrl-C or SIGTERM: end every wait for queued notices that has begun (the CLI's
    signal handler calls it; a signal before the wait began leaves the wait its limit)."""
    for stop in _DRAINS:
        stop.set()
