"""Every fault of the world in one line: the platform's connection (transient and permanent),
the operating system (journal folder, disk, output paths, ports) and fleet files in the
dialects operators produce. Each: its documented exit code, one line, no traceback, and no
call to the platform where nothing should be sent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.northbound.hoststate import AppState
from orchestrator.simulator import FaultConfig, SimulatorConfig, SimulatorServer

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, device_sets, plan_text
from .simhelpers import LoopThread

T = TypeVar("T")


class Servers(LoopThread):
    """Simulators on loopback, served by an event loop in a thread so that the CLI can run
    in-process (CliRunner) in the test's thread."""

    def __init__(self, base: Path) -> None:
        super().__init__()
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(base / "ca.pem"))
        self.ca_file = base / "ca.pem"
        files: dict[str, tuple[Path, Path]] = {}
        for name, cert in (
            ("other-host", ca.issue_cert("other.example")),
            (
                "expired",
                ca.issue_cert(
                    "127.0.0.1",
                    not_before=dt.datetime(2019, 1, 1, tzinfo=dt.UTC),
                    not_after=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                ),
            ),
        ):
            cert.cert_chain_pems[0].write_to_path(str(base / f"{name}.pem"))
            cert.private_key_pem.write_to_path(str(base / f"{name}.key"))
            files[name] = (base / f"{name}.pem", base / f"{name}.key")

        def config(**kwargs: Any) -> SimulatorConfig:
            return SimulatorConfig(devices=400, seed=6, rate_limit=(1000, 1.0), **kwargs)

        self.by_name = {
            "plain": SimulatorServer(config(tls=False)),
            "self-signed": SimulatorServer(config(tls=True)),
            "other-host": SimulatorServer(
                config(tls=True, cert_file=files["other-host"][0], key_file=files["other-host"][1])
            ),
            "expired": SimulatorServer(
                config(tls=True, cert_file=files["expired"][0], key_file=files["expired"][1])
            ),
            "gateway-down": SimulatorServer(
                config(tls=False, faults=FaultConfig(outage_s=1e6, outage_status=503))
            ),
        }
        for server in self.by_name.values():
            self.run(server.start())

    def calls(self) -> int:
        return sum(s.platform.stats.as_dict()["total_calls"] for s in self.by_name.values())

    def close(self) -> None:
        for server in self.by_name.values():
            self.run(server.close())
        super().close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    started = Servers(tmp_path_factory.mktemp("fault-servers"))
    yield started
    started.close()


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small filesystem of its own at `path` (root only: mount -t tmpfs)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    """Write into `folder` until its filesystem is full; returns the filler."""
    filler = folder / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return filler


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """`folder` (holding what the test wrote) becomes read-only: chmod for a user, a
    read-only tmpfs for root (whom permissions do not stop)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    saved = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with _tmpfs(folder, "size=1m"):
        for name, data in saved.items():
            (folder / name).write_bytes(data)
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=False)
        if remounted.returncode != 0:
            pytest.skip("cannot remount the tmpfs read-only")
        yield


# ---- the cases -------------------------------------------------------------------------------
@dataclass
class Env:
    servers: Servers
    tmp: Path

    def plan(
        self,
        server: str = "plain",
        *,
        url: str | None = None,
        fleet: bytes | None = None,
        folder: str = "case",
        extra_platform: str = "",
        execution: str = "",
    ) -> Path:
        sim = self.servers.by_name[server]
        directory = self.tmp / folder
        directory.mkdir(parents=True, exist_ok=True)
        ids = [d for d, dev in sim.fleet.devices.items() if dev.model.model == "WM-200"][:20]
        (directory / "fleet.txt").write_bytes(
            fleet if fleet is not None else ("\n".join(ids) + "\n").encode()
        )
        text = plan_text(sim, extra_platform=extra_platform, execution=execution)
        if url is not None:
            text = text.replace(f'url = "{sim.url}"', f'url = "{url}"')
        path = directory / "plan.toml"
        path.write_text(text)
        return path


Case = tuple[str, Callable[[Env], list[str]], int, str, bool]  # id, argv, exit, phrase, 0 calls


def _run(env: Env, server: str = "plain", **kwargs: Any) -> list[str]:
    return ["run", str(env.plan(server, **kwargs))]


def _fleet_case(fleet: bytes) -> Callable[[Env], list[str]]:
    return lambda env: _run(env, fleet=fleet)


def _journal_in_a_file(env: Env) -> list[str]:
    plan = env.plan()
    (plan.parent / ".rollout").write_text("not a folder")
    return ["run", str(plan)]


def _journal_under_a_file(env: Env) -> list[str]:
    plan = env.plan()
    return ["run", str(plan), "--journal", str(plan.parent / "fleet.txt" / "j.sqlite")]


def _report_under_a_file(env: Env) -> list[str]:
    plan = env.plan()
    assert CliRunner().invoke(main, ["run", str(plan)]).exit_code == 0
    (plan.parent / "blocker").write_text("a file")
    return ["report", str(plan), "-o", str(plan.parent / "blocker" / "r.html")]


def _status_without_journal(env: Env) -> list[str]:
    return ["status", str(env.plan())]


def _port_in_use(env: Env) -> list[str]:
    return ["simulator", "--no-tls", "--port", str(env.servers.by_name["plain"].port)]


def _fleet_into_missing_folder(env: Env) -> list[str]:
    return ["simulator", "--no-tls", "--port", "0", "--write-fleet", str(env.tmp / "no/f.csv")]


GOOD = "6f1c1a52-8f4e-4c41-9a55-3a8a8f1b2c3d"
CASES: list[Case] = [
    # item 3: the platform cannot be reached as configured — fails at once, names the fix
    (
        "unknown-host",
        lambda env: _run(env, url="https://nonexistent.invalid:8743"),
        1,
        "is unknown (DNS): check platform.url",
        True,
    ),
    ("self-signed", lambda env: _run(env, "self-signed"), 1, "set platform.ca_file", True),
    (
        "wrong-host",
        lambda env: _run(env, "other-host", extra_platform=f'ca_file = "{env.servers.ca_file}"'),
        1,
        "is not valid for '127.0.0.1'",
        True,
    ),
    (
        "expired",
        lambda env: _run(env, "expired", extra_platform=f'ca_file = "{env.servers.ca_file}"'),
        1,
        "has expired",
        True,
    ),
    (
        "https-to-plain",
        lambda env: _run(env, url=env.servers.by_name["plain"].url.replace("http:", "https:")),
        1,
        "speaks plain HTTP, not TLS: use http://",
        True,
    ),
    (
        "http-to-tls",
        lambda env: _run(
            env, "self-signed", url=env.servers.by_name["self-signed"].url.replace("https", "http")
        ),
        1,
        "speaks TLS, not plain HTTP: use https://",
        True,
    ),
    # item 3: transient faults for longer than the outage budget
    (
        "refused-beyond-budget",
        lambda env: _run(
            env, url=f"http://127.0.0.1:{_closed_port()}", execution="outage_budget = 1"
        ),
        1,
        "refused the connection); nothing is lost: `rollout resume PLAN` goes on once it "
        "answers (`rollout run PLAN` if no run had started",
        True,
    ),
    (
        "gateway-503-beyond-budget",
        lambda env: _run(env, "gateway-down", execution="outage_budget = 1"),
        1,
        "platform unreachable for 1 s",
        True,
    ),
    # item 4: the operating system
    (
        "journal-folder-is-a-file",
        _journal_in_a_file,
        3,
        "cannot create the journal's folder (a file is in the way)",
        True,
    ),
    (
        "journal-under-a-file",
        _journal_under_a_file,
        3,
        "cannot create the journal's folder (a file is in the way)",
        True,
    ),
    ("status-without-journal", _status_without_journal, 3, "no journal here", True),
    ("report-under-a-file", _report_under_a_file, 2, "cannot write the report there", True),
    ("simulator-port-in-use", _port_in_use, 2, "the port is in use", True),
    ("simulator-fleet-nowhere", _fleet_into_missing_folder, 2, "--write-fleet: cannot", True),
    # item 5: fleet files
    (
        "semicolon-csv-without-id-column",
        _fleet_case(b"serial;model\nabc;WM-200\n"),
        2,
        "needs a deviceId column",
        True,
    ),
    (
        "header-looking-id",
        _fleet_case(f"{GOOD}\nDevice_ID\n".encode()),
        2,
        "line 2: 'Device_ID' looks like a column header",
        True,
    ),
    (
        "zero-width-space",
        _fleet_case(f"{GOOD}\nab\u200bcd\n".encode()),
        2,
        "line 2: device ID 'ab\\u200bcd' holds an invisible or control character "
        "(U+200B ZERO WIDTH SPACE)",
        True,
    ),
    (
        "control-character",
        _fleet_case(f"deviceId;x\n{GOOD};1\nab\x07cd;2\n".encode()),
        2,
        "line 3: device ID 'ab\\x07cd' holds an invisible or control character (U+0007",
        True,
    ),
    (
        "utf16-without-bom",
        _fleet_case(f"{GOOD}\n".encode("utf-16-le")),
        2,
        "looks like UTF-16 without a byte-order mark",
        True,
    ),
    (
        "tab-csv-empty-cell",
        _fleet_case(f"model\tdeviceId\nWM\t{GOOD}\nWM\t\n".encode()),
        2,
        "line 3: the deviceId cell is empty",
        True,
    ),
]


@pytest.mark.parametrize(
    ("argv", "code", "phrase", "no_calls"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_fault_is_one_line_with_its_exit_code(
    servers: Servers,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: Callable[[Env], list[str]],
    code: int,
    phrase: str,
    no_calls: bool,
) -> None:
    """Each fault: its documented exit code, one line naming the fix, no traceback, 0 calls."""
    monkeypatch.chdir(tmp_path)
    args = argv(Env(servers, tmp_path))
    before = servers.calls()
    result = CliRunner().invoke(main, ["--log-level", "error", *args])
    err = result.stderr.strip()
    assert result.exit_code == code, (err, result.exception)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert phrase in err, err
    if no_calls:
        assert servers.calls() == before


def test_a_journal_folder_made_read_only_is_one_line(
    servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan whose folder is read-only: exit 3, one line naming the way out, 0 calls."""
    monkeypatch.chdir(tmp_path)
    plan = Env(servers, tmp_path).plan(folder="ro")
    before = servers.calls()
    with _read_only(plan.parent):
        result = CliRunner().invoke(main, ["--log-level", "error", "run", str(plan)])
    err = result.stderr.strip()
    assert result.exit_code == 3, err
    assert len(err.splitlines()) == 1 and "not writable here" in err and "--journal" in err
    assert servers.calls() == before


def test_a_full_disk_before_the_run_is_one_line(
    servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal's disk is full from the start: exit 3, "full", nothing sent."""
    monkeypatch.chdir(tmp_path)
    with _tmpfs(tmp_path / "disk", "size=256k") as disk:
        plan = Env(servers, disk).plan(folder="plan")
        filler = _fill(disk)
        before = servers.calls()
        result = CliRunner().invoke(main, ["--log-level", "error", "run", str(plan)])
        filler.unlink()
    err = result.stderr.strip()
    assert result.exit_code == 3, err
    assert len(err.splitlines()) == 1 and "the disk holding the journal is full" in err
    assert servers.calls() == before


def _submitted_chunks(journal: Path) -> int:
    try:
        db = sqlite3.connect(f"{journal.absolute().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT COUNT(*) FROM chunks WHERE state='submitted'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return 0
    return int(row[0])


def test_a_disk_that_fills_mid_run_stops_it_in_one_line_and_resume_finishes(
    servers: Servers, tmp_path: Path
) -> None:
    """The journal's disk fills mid-run: exit 3 in one line, the journal intact; once space
    is freed, `resume` finishes with every device in exactly one task."""
    sim = SimulatorServer(SimulatorConfig(tls=False, devices=12000, seed=12, rate_limit=(50, 1)))
    servers.run(sim.start())
    try:
        with _tmpfs(tmp_path / "disk", "size=4m") as disk:
            directory = disk / "plan"
            directory.mkdir()
            ids = [d for d, dev in sim.fleet.devices.items() if dev.model.model == "WM-200"]
            (directory / "fleet.txt").write_text("\n".join(ids[:2560]) + "\n")
            plan = directory / "plan.toml"
            plan.write_text(plan_text(sim).replace('rate_limit = "50/1"', 'rate_limit = "5/1"'))
            journal = directory / ".rollout" / "test-plan.journal.sqlite"
            env = dict(os.environ, **{SECRET_ENV: SECRET})
            command = [sys.executable, "-m", "orchestrator", "--log-level", "error"]
            proc = subprocess.Popen(
                [*command, "run", str(plan)], env=env, stderr=subprocess.PIPE, text=True
            )
            deadline = time.monotonic() + 60
            while _submitted_chunks(journal) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            filler = _fill(disk)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 3, err
            last = err.strip().splitlines()[-1]  # after the progress bar and the log line
            assert last.startswith("journal: ") and "the disk holding the journal is full" in last
            assert "Traceback" not in err
            filler.unlink()
            with sqlite3.connect(journal) as db:
                assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            resumed = subprocess.run(
                [*command, "resume", str(plan)], env=env, capture_output=True, text=True
            )
            assert resumed.returncode == 0, resumed.stderr
        counts = device_sets(sim.platform.truth())
        assert set(counts) == set(ids[:2560]) and set(counts.values()) == {1}
    finally:
        servers.run(sim.close())


@pytest.mark.parametrize("name", ["a #1 %41 ?q=1 é 空", "100% sure?#", "C'est l'été"])
def test_paths_with_uri_characters_work_for_every_command(
    servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A plan in a folder named with #, %, ?, spaces and non-ASCII: run, status, report (into
    a folder not yet there), approve and resume all work (the journal's URI is escaped)."""
    monkeypatch.chdir(tmp_path)
    env = Env(servers, tmp_path)
    plan = env.plan(folder=name)
    text = plan.read_text().replace("follow = false", "follow = false\npoll_interval = 0.05")
    plan.write_text(
        text + '[[waves]]\nname = "first"\ncount = 5\n[waves.gate]\napproval = true\n'
        '[[waves]]\nname = "rest"\n'
    )
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(plan)]).exit_code == 4  # waits for approval
    status = runner.invoke(main, ["status", "--json", str(plan)])
    # the first wave's 5, or all 20 when an earlier case's run already put them in tasks
    assert status.exit_code == 0 and json.loads(status.stdout)["targets_in_tasks"] in (5, 20)
    report = plan.parent / "new # folder" / "report %1?.html"
    written = runner.invoke(main, ["report", str(plan), "-o", str(report)])
    assert written.exit_code == 0, written.stderr
    assert report.stat().st_size > 1000
    assert runner.invoke(main, ["approve", str(plan), "--wave", "first"]).exit_code == 0
    assert runner.invoke(main, ["resume", str(plan)]).exit_code == 0
    journal = plan.parent / "j #2 %.sqlite"
    # a second journal: every device is adopted by the census; the gate still asks (exit 4)
    assert runner.invoke(main, ["run", str(plan), "--journal", str(journal)]).exit_code == 4
    assert runner.invoke(main, ["status", str(plan), "--journal", str(journal)]).exit_code == 0


# ---- the host's state (token cache, pacing ledger) failing -------------------------------------
def _app_dir(root: Path) -> Path:
    (directory,) = (root / "apps").iterdir()
    return directory


def test_a_full_state_disk_at_the_start_is_bad_input_naming_the_ledger(
    servers: Servers, tmp_path: Path
) -> None:
    """The state directory's disk is full from the start: exit 2, one line naming the pacing
    ledger and --state-dir, nothing sent; `rollout budget` then says no process used it."""
    with _tmpfs(tmp_path / "state", "size=256k") as state:
        plan = Env(servers, tmp_path).plan()
        runner = CliRunner()
        AppState.open(state, servers.by_name["plain"].url, "demo-app")  # the app's directory
        filler = _fill(state)
        before = servers.calls()
        result = runner.invoke(
            main, ["--state-dir", str(state), "--log-level", "error", "run", str(plan)]
        )
        budget = runner.invoke(main, ["--state-dir", str(state), "budget"])
        filler.unlink()
    err = result.stderr.strip()
    assert result.exit_code == 2, err
    assert len(err.splitlines()) == 1
    assert "ledger.sqlite: pacing ledger: cannot be written" in err and "--state-dir" in err
    assert servers.calls() == before
    assert budget.exit_code == 0, budget.stderr
    assert "no process of this host has used an app's budget lately" in budget.stdout


def test_a_state_disk_that_fills_mid_run_stops_it_naming_the_ledger(
    servers: Servers, tmp_path: Path
) -> None:
    """The state directory's disk fills mid-run: exit 2 with a last line naming the pacing
    ledger — never counted as identical platform failures, never blamed on the journal."""
    sim = SimulatorServer(SimulatorConfig(tls=False, devices=12000, seed=12, rate_limit=(50, 1)))
    servers.run(sim.start())
    try:
        with _tmpfs(tmp_path / "state", "size=2m") as state:
            directory = tmp_path / "plan"
            directory.mkdir()
            ids = [d for d, dev in sim.fleet.devices.items() if dev.model.model == "WM-200"]
            (directory / "fleet.txt").write_text("\n".join(ids[:2560]) + "\n")
            plan = directory / "plan.toml"
            plan.write_text(plan_text(sim).replace('rate_limit = "50/1"', 'rate_limit = "5/1"'))
            journal = directory / ".rollout" / "test-plan.journal.sqlite"
            env = dict(os.environ, **{SECRET_ENV: SECRET})
            command = [sys.executable, "-m", "orchestrator", "--state-dir", str(state)]
            proc = subprocess.Popen(
                [*command, "--log-level", "error", "run", str(plan)],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 60
            while _submitted_chunks(journal) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            filler = _fill(state)
            _, err = proc.communicate(timeout=60)
            filler.unlink()
        assert proc.returncode == 2, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and "ledger.sqlite: pacing ledger" in last, last
        assert "identical failures" not in err and "journal" not in last
        assert "Traceback" not in err
    finally:
        servers.run(sim.close())


def test_a_token_file_that_cannot_be_replaced_stops_before_logging_in(
    servers: Servers, tmp_path: Path
) -> None:
    """token.json made immutable (chattr +i): exit 2 naming it, before any login (no call
    spent, no other process's token invalidated), and no temporary file holds a token."""
    if os.geteuid() != 0:
        pytest.skip("needs root for chattr +i")
    state = tmp_path / "state"
    plan = Env(servers, tmp_path).plan()
    runner = CliRunner()
    first = runner.invoke(
        main, ["--state-dir", str(state), "--log-level", "error", "run", str(plan)]
    )
    assert first.exit_code == 0, first.stderr
    token_file = _app_dir(state) / "token.json"
    token_file.write_text("{}")  # no token: the next run must log in
    if subprocess.run(["chattr", "+i", str(token_file)], check=False).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        before = servers.calls()
        result = runner.invoke(
            main, ["--state-dir", str(state), "--log-level", "error", "run", str(plan), "--new-run"]
        )
        after = servers.calls()
    finally:
        subprocess.run(["chattr", "-i", str(token_file)], check=False)
    err = result.stderr.strip()
    assert result.exit_code == 2, err
    assert len(err.splitlines()) == 1 and "token.json: token cache: cannot be written" in err
    assert after == before
    assert [p.name for p in _app_dir(state).iterdir() if p.name.endswith(".tmp")] == []
