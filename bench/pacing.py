"""Our pacer against a naive leaky bucket, on the simulator's strict sliding window.

For each limiter, a fresh in-process simulator enforces CALLS per SECONDS (scaled down from
the platform's 100/60 so the run takes seconds, not hours) and 50 concurrent callers send
GETs for WINDOWS windows; a throttled call is sent again, as any client must. Printed per
limiter: calls the platform accepted per window ÷ the limit, and how many it refused.

- ours: `orchestrator.northbound.Pacer` (a slot taken from the send until SECONDS after the
  reply, grants spread at CALLS per window; priorities; pause on throttle), on a private
  ledger;
- naive: `aiolimiter.AsyncLimiter(CALLS, SECONDS)`, the leaky bucket the aiolimiter docs
  suggest for "CALLS per SECONDS" — it admits a full bucket and then its refill in the same
  window, so the platform refuses the excess.

    python bench/pacing.py [--calls 50 --seconds 2 --windows 10]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import aiohttp
from aiolimiter import AsyncLimiter

from orchestrator.northbound import Pacer
from orchestrator.northbound.ledger import Outcome
from orchestrator.simulator import SimulatorConfig, SimulatorServer

CALLERS = 50


Limiter = Callable[[], AbstractAsyncContextManager[Callable[[bool], None]]]


async def _run(
    limit: Limiter,
    calls: int,
    seconds: float,
    windows: int,
) -> tuple[float, int]:
    config = SimulatorConfig(tls=False, devices=50, rate_limit=(calls, seconds))
    async with SimulatorServer(config) as server, aiohttp.ClientSession() as session:
        url = server.url
        async with session.post(
            f"{url}/iocm/app/sec/v1.1.0/login", data={"appId": "demo-app", "secret": "demo-secret"}
        ) as r:
            token = (await r.json())["accessToken"]
        headers = {"app_key": "demo-app", "Authorization": f"Bearer {token}"}
        server.platform.throttle._windows.clear()  # start the measured windows empty
        deadline = time.monotonic() + windows * seconds
        accepted = 0

        async def caller() -> None:
            nonlocal accepted
            while time.monotonic() < deadline:
                async with limit() as outcome:
                    if time.monotonic() >= deadline:
                        return
                    async with session.get(
                        f"{url}/iodm/northbound/v1.5.0/category", headers=headers
                    ) as reply:
                        await reply.read()
                        accepted += reply.status == 200
                        outcome(reply.status == 200)

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
        return accepted / windows / calls, server.platform.stats.throttled


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--windows", type=int, default=10)
    args = parser.parse_args()
    pacer = Pacer(args.calls, args.seconds)

    @asynccontextmanager
    async def paced() -> AsyncIterator[Callable[[bool], None]]:
        slot = await pacer.acquire()
        seen = [Outcome.UNSENT]

        def outcome(ok: bool) -> None:
            seen[0] = Outcome.REPLIED if ok else Outcome.THROTTLED

        try:
            yield outcome
        finally:
            pacer.release(slot, seen[0])

    ours = await _run(paced, args.calls, args.seconds, args.windows)
    bucket = AsyncLimiter(args.calls, args.seconds)

    @asynccontextmanager
    async def leaky() -> AsyncIterator[Callable[[bool], None]]:
        await bucket.acquire()
        yield lambda ok: None

    naive = await _run(leaky, args.calls, args.seconds, args.windows)
    print(
        f"limit {args.calls} calls / {args.seconds:g} s, {args.windows} windows, {CALLERS} callers"
    )
    print(f"  ours  (Pacer):                   {ours[0]:.3f} of the limit, {ours[1]} throttled")
    print(
        f"  naive (AsyncLimiter(limit, period)): {naive[0]:.3f} of the limit, {naive[1]} throttled"
    )


if __name__ == "__main__":
    asyncio.run(main())
