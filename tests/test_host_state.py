"""The app's state on the host: where it lives, the shared token cache, the pacing ledger's
rules across processes (dead owners, priorities, turns, a shared cool-down)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import platformdirs
import pytest
import structlog

from orchestrator.northbound import NorthboundClient, Priority
from orchestrator.northbound.hoststate import AppState, app_key, default_state_root, state_root
from orchestrator.northbound.ledger import Granted, Outcome, PacingLedger, Wait, read_budget
from orchestrator.simulator import SimulatorServer

from .conftest import APP_ID, SECRET, client_config


def _files(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file()]


async def test_every_folder_the_state_needs_is_created_private(
    live_sim: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state root whose parents do not exist yet: every folder created for it is 0700,
    not only the last one (the folder holding it, which existed, is left as it was)."""
    root = tmp_path / "new" / "deeper" / "state"
    monkeypatch.setenv("ROLLOUT_STATE_DIR", str(root))
    async with NorthboundClient(client_config(live_sim)) as client:
        await client.list_packages()
        state = client.state
    assert state.directory.is_relative_to(root)
    created = [state.directory, *state.directory.parents][: len(state.directory.parents)]
    created = [folder for folder in created if folder.is_relative_to(tmp_path / "new")]
    assert tmp_path / "new" in created and len(created) >= 4
    for folder in created:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


async def test_state_is_private_and_never_holds_the_secret(
    live_sim: SimulatorServer, private_host_state: Path
) -> None:
    """The app's directory is 0700, its files 0600, and no file holds the app's secret."""
    async with NorthboundClient(client_config(live_sim)) as client:
        await client.list_packages()
        state = client.state
    assert state.directory.is_relative_to(private_host_state)
    assert stat.S_IMODE(state.directory.stat().st_mode) == 0o700
    files = _files(state.directory)
    assert {p.name for p in files} >= {"token.json", "ledger.sqlite", "app.json", "token.lock"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert SECRET.encode() not in path.read_bytes(), path


def test_option_then_environment_then_user_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--state-dir wins over $ROLLOUT_STATE_DIR, which wins over the user's state directory."""
    monkeypatch.setenv("ROLLOUT_STATE_DIR", str(tmp_path / "env"))
    assert state_root(tmp_path / "option") == tmp_path / "option"
    assert state_root(None) == tmp_path / "env"
    monkeypatch.delenv("ROLLOUT_STATE_DIR")
    assert default_state_root() == platformdirs.user_state_path("rollout")
    one = AppState.locate(tmp_path, "https://h:8743/", "app")
    assert one == AppState.locate(tmp_path, "https://h:8743", "app")
    assert one.directory != AppState.locate(tmp_path, "https://h:8743", "other").directory
    assert one.directory != AppState.locate(tmp_path, "https://g:8743", "app").directory


def test_an_unusable_state_directory_is_bad_input(tmp_path: Path) -> None:
    """A state directory that cannot be created: exit 2, one line naming it, nothing sent."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--state-dir", str(blocker / "state"), "budget"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0  # reading nothing is fine: budget creates nothing
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'name = "p"\n[platform]\nurl = "http://127.0.0.1:9"\nsecret_env = "S"\n'
        '[firmware]\nfile_id = "0123456789abcdef01234567"\n[fleet]\ndevices_file = "f.txt"\n'
    )
    (tmp_path / "f.txt").write_text("d1\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--state-dir",
            str(blocker / "state"),
            "run",
            str(plan),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, S="x"),
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(blocker / "state") in lines[0] and "state directory" in lines[0]


# ---- the token cache -------------------------------------------------------------------------
async def test_a_second_process_takes_the_token_from_the_cache(live_sim: SimulatorServer) -> None:
    """Two clients of one app (as two processes): one login; neither logs the token."""
    with structlog.testing.capture_logs() as logs:
        async with (
            NorthboundClient(client_config(live_sim)) as first,
            NorthboundClient(client_config(live_sim)) as second,
        ):
            await first.list_packages()
            await second.list_packages()
    token = live_sim.platform.tokens._current[APP_ID].access_token
    assert live_sim.platform.stats.calls["login"] == 1
    assert (first.tokens.logins, second.tokens.logins, second.tokens.adopted) == (1, 0, 1)
    assert token not in repr(logs)


async def test_a_refused_token_is_replaced_from_the_cache_if_it_can(
    live_sim: SimulatorServer,
) -> None:
    """After a 1010005 a process logs in only if the cache still holds the refused token."""
    async with (
        NorthboundClient(client_config(live_sim)) as first,
        NorthboundClient(client_config(live_sim)) as second,
    ):
        old = await first.tokens.access_token()
        assert await second.tokens.access_token() == old
        new = await second.tokens.replace(old)  # the cache holds `old`: a login
        assert new != old
        assert await first.tokens.replace(old) == new  # the cache holds `new`: no login
        live_sim.platform.tokens.revoke(APP_ID)  # another client's doing
        await first.list_packages()  # 1010005, the cache holds the refused token: a login
        await second.list_packages()  # sees the new token in the cache before sending
    assert live_sim.platform.stats.calls["login"] == 3
    assert live_sim.platform.stats.replies["1010005"] == 1
    assert (first.tokens.logins, second.tokens.logins) == (2, 1)


CLIENT = """
import asyncio, sys
from pydantic import SecretStr
from orchestrator.northbound import ClientConfig, NorthboundClient

async def main() -> None:
    config = ClientConfig(base_url=sys.argv[1], app_id="demo-app", secret=SecretStr("demo-secret"))
    async with NorthboundClient(config) as client:
        await client.list_packages()

asyncio.run(main())
"""


async def test_processes_started_together_log_in_once(live_sim: SimulatorServer) -> None:
    """Five processes of one app starting at once: one login (the others wait for the lock)."""
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENT, live_sim.url)
        for _ in range(5)
    ]
    codes = await asyncio.gather(*(proc.wait() for proc in procs))
    assert codes == [0] * 5
    assert live_sim.platform.stats.calls["login"] == 1
    assert live_sim.platform.stats.calls["listPackages"] == 5


# ---- the ledger ----------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ledgers(path: Path, clock: Clock, *labels: str) -> list[PacingLedger]:
    handles = []
    for label in labels:
        ledger = PacingLedger(path, clock=clock, grace=0.05)
        ledger.register(label, 1, 0.5)
        handles.append(ledger)
    return handles


def _try(ledger: PacingLedger, priority: Priority = Priority.SUBMIT) -> Granted | Wait:
    return ledger.try_reserve(priority, Priority.SUBMIT, 1, 0.5, 5.0)


def test_monitoring_waits_while_another_process_waits_to_submit(tmp_path: Path) -> None:
    """A free slot goes to another process's SUBMIT waiter before this one's MONITOR call."""
    clock = Clock()
    a, b = _ledgers(tmp_path / "ledger.sqlite", clock, "a", "b")
    first = _try(a)
    assert isinstance(first, Granted)
    clock.now += 0.1
    a.release(first.slot, Outcome.REPLIED, 1, 0.5)  # taken until now + 0.5
    clock.now += 0.3
    assert isinstance(_try(a), Wait)  # a waits to submit
    clock.now += 0.3  # the slot is free
    refused = _try(b, Priority.MONITOR)
    assert isinstance(refused, Wait) and refused.reason == "priority"
    assert isinstance(_try(a), Granted)


def test_processes_waiting_with_one_priority_take_turns(tmp_path: Path) -> None:
    """Two processes that both wait get the slot in turn, whoever asks first."""
    clock = Clock()
    a, b = _ledgers(tmp_path / "ledger.sqlite", clock, "a", "b")
    order: list[str] = []
    for _ in range(7):
        for name, ledger in (("a", a), ("b", b)):  # a always asks first
            decision = _try(ledger)
            if isinstance(decision, Granted):
                order.append(name)
                clock.now += 0.05
                ledger.release(decision.slot, Outcome.REPLIED, 1, 0.5)
        clock.now += 0.51
    assert order[1:] == ["a", "b", "a", "b", "a", "b"]  # first come first served, then turns


def test_a_late_process_does_not_idle_the_slot_beyond_the_grace(tmp_path: Path) -> None:
    """When the process whose turn it is does not come within the grace, the slot goes on."""
    clock = Clock()
    a, b = _ledgers(tmp_path / "ledger.sqlite", clock, "a", "b")
    granted = a.try_reserve(1, None, 1, 0.5, 5.0)  # a's only call: a waits no more
    assert isinstance(granted, Granted)
    assert isinstance(_try(b), Wait)  # b waits: its turn is next
    clock.now += 0.05
    a.release(granted.slot, Outcome.REPLIED, 1, 0.5)
    clock.now += 0.51
    deferred = _try(a)
    assert isinstance(deferred, Wait) and deferred.reason == "turn"
    clock.now += 0.06  # b does not come
    assert isinstance(a.try_reserve(1, 1, 1, 0.5, 5.0, deferred.free_since), Granted)


def test_a_throttle_seen_by_one_process_pauses_them_all(tmp_path: Path) -> None:
    """A 1010009 released by one process pauses the others and shrinks the host's share."""
    clock = Clock()
    a, b = _ledgers(tmp_path / "ledger.sqlite", clock, "a", "b")
    granted = _try(a)
    assert isinstance(granted, Granted)
    throttle = a.release(granted.slot, Outcome.THROTTLED, 100, 60.0)
    assert throttle is not None and throttle.share == pytest.approx(0.75)
    paused = b.try_reserve(1, None, 100, 60.0, 5.0)
    assert isinstance(paused, Wait) and paused.reason == "paused"
    assert paused.at == pytest.approx(clock.now + throttle.cooldown)


VICTIM = """
import sys, time
from pathlib import Path
from orchestrator.northbound.ledger import PacingLedger
ledger = PacingLedger(Path(sys.argv[1]))
ledger.register("victim", 1, 0.5)
print(ledger.try_reserve(1, None, 1, 0.5, 30.0).slot, flush=True)
time.sleep(120)
"""


def test_the_open_slot_of_a_killed_process_is_spent_for_one_window(tmp_path: Path) -> None:
    """A slot taken by a process killed mid-call counts for one window after its death is
    seen — not for the 30 s its request could have lasted."""
    path = tmp_path / "ledger.sqlite"
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip().isdigit()
        ledger = PacingLedger(path)
        ledger.register("survivor", 1, 0.5)
        waiting = ledger.try_reserve(1, None, 1, 0.5, 30.0)
        assert isinstance(waiting, Wait) and waiting.at - ledger.now() > 30
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    after = ledger.try_reserve(1, None, 1, 0.5, 30.0)
    assert isinstance(after, Wait) and after.firm
    assert 0.4 < after.at - ledger.now() <= 0.5


# ---- rollout budget ------------------------------------------------------------------------
def _budget(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "budget", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="60"),  # off a terminal: nothing is wrapped anyway
        check=False,
    )


async def test_budget_shows_who_used_the_app_in_the_last_window(
    live_sim: SimulatorServer,
) -> None:
    """`rollout budget` lists each process of the app with its calls in the last window,
    under a title on one line."""
    empty = await asyncio.to_thread(_budget)
    assert empty.returncode == 0 and "no process of this host" in empty.stdout
    async with NorthboundClient(client_config(live_sim, label="run meters")) as client:
        for _ in range(3):
            await client.list_packages()  # a login and three calls
    shown = await asyncio.to_thread(_budget)
    assert shown.returncode == 0, shown.stderr
    title = f"app {APP_ID} at {live_sim.url}: 1000 calls / 60 s, 4 slots taken now"
    assert title in shown.stdout.splitlines()
    row = next(line for line in shown.stdout.splitlines() if "run meters" in line)
    assert "ended" in row and " 4 " in row
    data = (await asyncio.to_thread(_budget, "--json")).stdout
    assert '"calls_last_window": 4' in data and SECRET not in data


async def test_a_damaged_ledger_is_rebuilt_with_a_warning_naming_it(
    live_sim: SimulatorServer, private_host_state: Path
) -> None:
    """A ledger file replaced by garbage is disposable: rebuilt empty, with a warning naming
    it, and the calls go on."""
    state = AppState.open(private_host_state, live_sim.url, APP_ID)
    state.ledger_file.write_bytes(b"not a database, " * 512)
    with structlog.testing.capture_logs() as logs:
        async with NorthboundClient(client_config(live_sim)) as client:
            page = await client.list_packages()
    assert page.total > 0
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry.get("file") for entry in warnings] == [str(state.ledger_file)]
    assert state.ledger_file.read_bytes().startswith(b"SQLite format 3")


def test_one_platform_written_several_ways_is_one_app() -> None:
    """Scheme and host case, a trailing dot, an explicit default port and trailing slashes
    give one app key; another port, path or app id another; names are not resolved."""
    same = [
        "https://iot.example.com:8743",
        "HTTPS://IoT.Example.COM:8743/",
        "https://iot.example.com.:8743//",
    ]
    default_port = [
        "https://iot.example.com",
        "https://iot.example.com:443/",
        "HTTPS://IOT.example.com.",
    ]
    assert len({app_key(url, APP_ID) for url in same}) == 1
    assert len({app_key(url, APP_ID) for url in default_port}) == 1
    assert app_key(same[0], APP_ID) != app_key(default_port[0], APP_ID)
    assert app_key(same[0], APP_ID) != app_key(same[0], "another-app")
    assert app_key("http://localhost:8080", APP_ID) != app_key("http://127.0.0.1:8080", APP_ID)


async def test_two_spellings_of_one_platform_share_one_token(live_sim: SimulatorServer) -> None:
    """Two clients whose plans spell the platform's URL differently (scheme case, trailing
    slash) share one state directory: one login between them."""
    shouted = live_sim.url.replace("http://", "HTTP://") + "/"
    async with (
        NorthboundClient(client_config(live_sim)) as first,
        NorthboundClient(client_config(live_sim, base_url=shouted)) as second,
    ):
        await first.list_packages()
        await second.list_packages()
    assert first.state.directory == second.state.directory
    assert live_sim.platform.stats.calls["login"] == 1


def test_budget_forgets_processes_that_ended_a_window_ago(tmp_path: Path) -> None:
    """A ledger whose processes all ended more than a window ago reads as nobody using the
    budget (not as an empty table)."""
    clock = Clock()
    (ledger,) = _ledgers(tmp_path / "ledger.sqlite", clock, "run meters")
    granted = _try(ledger)
    assert isinstance(granted, Granted)
    ledger.release(granted.slot, Outcome.REPLIED, 1, 0.5)
    ledger.close()
    assert read_budget(tmp_path / "ledger.sqlite", clock) is not None
    clock.now += 1.0
    assert read_budget(tmp_path / "ledger.sqlite", clock) is None


def _open_ledger_at(path: str, start: float) -> str:
    while time.time() < start:
        pass
    try:
        PacingLedger(Path(path)).close()
    except Exception as exc:  # the report names what went wrong in the child
        return repr(exc)
    return "ok"


def test_processes_opening_a_new_ledger_together_all_get_it(tmp_path: Path) -> None:
    """Eight processes that open a new ledger at the same instant all open it (switching a new
    file to WAL answers "locked" without SQLite's busy handler: tried again, not a failure)."""
    failures = []
    with multiprocessing.get_context("fork").Pool(8) as pool:
        for trial in range(30):
            path = str(tmp_path / f"ledger-{trial}.sqlite")
            start = time.time() + 0.2
            answers = pool.starmap(_open_ledger_at, [(path, start)] * 8)
            failures += [answer for answer in answers if answer != "ok"]
    assert failures == []
