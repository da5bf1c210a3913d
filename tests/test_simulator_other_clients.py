"""The simulator's knobs for another client of the same app (a refusal at a chosen moment)
and its record of arrivals as flow control saw them."""

from __future__ import annotations

from .conftest import UPGRADE, RawPlatform

CATEGORY = f"{UPGRADE}/category"


async def test_throttle_next_calls_refuses_without_counting(raw: RawPlatform) -> None:
    """throttle_next_calls = 2: two calls draw 403/1010009, flow control counts neither."""
    await raw.login()
    raw.server.platform.throttle.calls = 3
    await raw.admin("/_sim/faults", {"throttle_next_calls": 2})
    statuses = [(await raw.call("GET", CATEGORY))[:2] for _ in range(5)]
    codes = [body.get("error_code") if isinstance(body, dict) else None for _, body in statuses]
    # login took 1 of 3: the two refused calls did not count, so two more are admitted
    assert codes[:2] == ["1010009", "1010009"] and [s for s, _ in statuses[2:4]] == [200, 200]
    assert codes[4] == "1010009"  # now the window is full for real
    stats = await raw.admin("/_sim/stats")
    assert stats["faults_injected"]["throttle"] == 2 and stats["throttled"] == 3


async def test_only_api_aims_the_refusal_at_one_api(raw: RawPlatform) -> None:
    """With only_api = refreshToken, other calls pass and the next refresh is throttled."""
    await raw.login()
    await raw.admin("/_sim/faults", {"throttle_next_calls": 1, "only_api": "refreshToken"})
    status, _, _ = await raw.call("GET", CATEGORY)
    assert status == 200
    async with raw.session.post(
        raw.url + "/iocm/app/sec/v1.1.0/login", data={"appId": "demo-app", "secret": "demo-secret"}
    ) as reply:
        refresh_token = (await reply.json())["refreshToken"]
    status, body, _ = await raw.call(
        "POST",
        "/iocm/app/sec/v1.1.0/refreshToken",
        json={"appId": "demo-app", "secret": "demo-secret", "refreshToken": refresh_token},
        headers={},
    )
    assert (status, body["error_code"]) == (403, "1010009")
    assert (await raw.admin("/_sim/faults"))["throttle_next_calls"] == 0


async def test_revoke_next_tokens_makes_calls_draw_1010005(raw: RawPlatform) -> None:
    """revoke_next_tokens = 1: the next call's token is revoked (1010005); a login mends it."""
    await raw.login()
    await raw.admin("/_sim/faults", {"revoke_next_tokens": 1})
    status, body, _ = await raw.call("GET", CATEGORY)
    assert (status, body["error_code"]) == (403, "1010005")
    status, _, _ = await raw.call("GET", CATEGORY)
    assert status == 403  # revoked for good, not for one call
    await raw.login()
    status, _, _ = await raw.call("GET", CATEGORY)
    assert status == 200
    stats = await raw.admin("/_sim/stats")
    assert stats["faults_injected"]["revoke"] == 1 and stats["logins"] == 2


async def test_bad_knob_values_change_nothing(raw: RawPlatform) -> None:
    """A negative count or a non-string API answers 400 and leaves the knobs as they were."""
    for change in ({"throttle_next_calls": -1}, {"revoke_next_tokens": 1.5}, {"only_api": 3}):
        async with raw.session.post(raw.url + "/_sim/faults", json=change) as reply:
            assert reply.status == 400
    knobs = await raw.admin("/_sim/faults")
    assert (knobs["throttle_next_calls"], knobs["revoke_next_tokens"], knobs["only_api"]) == (
        0,
        0,
        "",
    )


async def test_arrivals_list_every_call_with_its_verdict(raw: RawPlatform) -> None:
    """/_sim/arrivals lists each call at its arrival on the simulator's monotonic clock,
    admitted or refused; `since` keeps the later ones."""
    assert raw.clock is not None
    await raw.login()
    raw.server.platform.throttle.calls = 2
    raw.clock.tick(0.5)
    await raw.call("GET", CATEGORY)
    raw.clock.tick(0.25)
    await raw.call("GET", CATEGORY)  # the third call in the window: refused
    rows = (await raw.admin("/_sim/arrivals"))["arrivals"]
    assert rows == [
        [0.0, "demo-app", "login", True],
        [0.5, "demo-app", "listPackages", True],
        [0.75, "demo-app", "listPackages", False],
    ]
    later = (await raw.admin("/_sim/arrivals?since=0.5"))["arrivals"]
    assert later == rows[2:]
