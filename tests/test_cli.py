"""The `rollout` command end to end, in a child process against a simulator process."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.simulator.testing import get_json, simulator_process

from .enginehelpers import SECRET_ENV


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """A simulator with a 60 % failure rate and fast time, and its ~5 000 WM-200 device IDs.

    The platform is the authority on what is in a task (a second run of the same devices is
    adopted, not sent), so each test takes its own slice of the IDs."""
    directory = tmp_path_factory.mktemp("cli-sim")
    with simulator_process(
        directory,
        "--devices",
        "21000",
        "--speed",
        "36000",
        "--failure-rate",
        "0.6",
        "--rate-limit",
        "2000/1",
    ) as (url, fleet):
        ids = [
            line.split(",")[0] for line in fleet.read_text().splitlines()[1:] if ",WM-200," in line
        ]
        assert len(ids) >= 5136
        yield url, ids


def _plan(directory: Path, url: str, ids: list[str], waves: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fleet.txt").write_text("\n".join(ids) + "\n")
    plan = directory / "plan.toml"
    plan.write_text(f"""
name = "cli"
[platform]
url = "{url}"
secret_env = "{SECRET_ENV}"
rate_limit = "2000/1"
[firmware]
version = "2.1.0"
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[fleet]
devices_file = "fleet.txt"
[monitor]
poll_interval = 0.2
max_poll_interval = 0.5
{waves}
""")
    return plan


def _rollout(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **{SECRET_ENV: "demo-secret"})
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_json_logs_are_one_json_object_per_line(sim: tuple[str, list[str]], tmp_path: Path) -> None:
    """With --log-format json every stderr line is a JSON event; the closing summary is one
    JSON object on stdout (the result, not a log event)."""
    url, ids = sim
    plan = _plan(tmp_path, url, ids[0:300])
    result = _rollout("--log-format", "json", "run", str(plan), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert events and all("event" in e and "level" in e for e in events)
    summary = json.loads(result.stdout)
    assert summary["targets_in_tasks"] == 300 and summary["status"] == "completed"


def test_status_and_plan_print_json_on_stdout(sim: tuple[str, list[str]], tmp_path: Path) -> None:
    """`plan --json` previews chunks and census calls; `status --json` reads the journal."""
    url, ids = sim
    plan = _plan(tmp_path, url, ids[300:900])
    preview = json.loads(_rollout("plan", "--json", str(plan), cwd=tmp_path).stdout)
    assert (preview["targets"], preview["chunks"], preview["calls"]) == (600, 3, 7)
    assert preview["census_calls"] == 2
    assert _rollout("run", str(plan), cwd=tmp_path).returncode == 0
    status = json.loads(_rollout("status", "--json", str(plan), cwd=tmp_path).stdout)
    assert status["targets_in_tasks"] == 600 and status["calls"]["createTask"] == 3
    assert status["calls"]["listTasks"] >= preview["census_calls"]  # the monitor reads it too
    assert status["devices_succeeded"] + status["devices_failed"] == 600


def test_failed_gate_exits_4_and_approve_then_resume_goes_on(
    sim: tuple[str, list[str]], tmp_path: Path
) -> None:
    """A failing canary exits 4; `approve` and `resume` submit the rest and exit 0."""
    url, ids = sim
    waves = (
        '[[waves]]\nname = "canary"\ncount = 256\n[waves.gate]\nmax_failed = 0.2\n'
        'min_sample = 50\nmin_finished = 0.5\n[[waves]]\nname = "rest"\n'
    )
    plan = _plan(tmp_path, url, ids[900:1600], waves)
    before = get_json(url + "/_sim/stats")["tasks_created"]
    halted = _rollout("run", str(plan), cwd=tmp_path)
    assert halted.returncode == 4, halted.stderr[-2000:]
    assert "canary" in halted.stderr and "Traceback" not in halted.stderr
    assert get_json(url + "/_sim/stats")["tasks_created"] == before + 1
    approved = _rollout("approve", str(plan), "--wave", "canary", "--by", "tester", cwd=tmp_path)
    assert approved.returncode == 0, approved.stderr
    resumed = _rollout("resume", str(plan), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert get_json(url + "/_sim/stats")["tasks_created"] == before + 3


def test_report_writes_each_format(sim: tuple[str, list[str]], tmp_path: Path) -> None:
    """`rollout report` writes CSV, JSON, JSON Lines (one device a line, the CSV's rows) and
    HTML files from the journal."""
    url, ids = sim
    plan = _plan(tmp_path, url, ids[1600:1856])
    assert _rollout("run", str(plan), cwd=tmp_path).returncode == 0
    for fmt in ("csv", "json", "jsonl", "html"):
        out = tmp_path / f"report.{fmt}"
        result = _rollout("report", str(plan), "--format", fmt, "-o", str(out), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert out.stat().st_size > 1000
    with (tmp_path / "report.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    lines = (tmp_path / "report.jsonl").read_text().splitlines()
    assert len(rows) == len(lines) == 256
    devices = [json.loads(line) for line in lines]
    assert [d["device_id"] for d in devices] == [r["device_id"] for r in rows]
    assert [d["outcome"] for d in devices] == [r["outcome"] for r in rows]
    assert devices == json.loads((tmp_path / "report.json").read_text())["devices"]


def test_module_entry_point_is_the_same_command(tmp_path: Path) -> None:
    """`python -m orchestrator` answers like `rollout`."""
    result = _rollout("--version", cwd=tmp_path)
    assert result.returncode == 0 and "rollout" in result.stdout


def test_sigterm_stops_cleanly_and_resume_finishes(
    sim: tuple[str, list[str]], tmp_path: Path
) -> None:
    """SIGTERM mid-run exits 130 with the run marked interrupted; resume then finishes it."""
    url, ids = sim
    plan = _plan(tmp_path, url, ids[1856:3856])
    plan.write_text(plan.read_text().replace('rate_limit = "2000/1"', 'rate_limit = "3/1"'))
    env = dict(os.environ, **{SECRET_ENV: "demo-secret"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(plan)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.5)
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    status = json.loads(_rollout("status", "--json", str(plan), cwd=tmp_path).stdout)
    assert status["status"] == "interrupted" and status["targets_in_tasks"] < 2000
    assert _rollout("resume", str(plan), cwd=tmp_path).returncode == 0
    status = json.loads(_rollout("status", "--json", str(plan), cwd=tmp_path).stdout)
    assert status["targets_in_tasks"] == 2000 and status["status"] == "completed"


def test_watch_follows_tasks_submitted_without_following(
    sim: tuple[str, list[str]], tmp_path: Path
) -> None:
    """`run --no-follow` only submits; `watch` then brings every task to its final status."""
    url, ids = sim
    plan = _plan(tmp_path, url, ids[3856:4368])
    assert _rollout("run", "--no-follow", str(plan), cwd=tmp_path).returncode == 0
    status = json.loads(_rollout("status", "--json", str(plan), cwd=tmp_path).stdout)
    assert status["status"] == "submitted" and status["tasks_observed"] == 0
    assert _rollout("watch", str(plan), cwd=tmp_path).returncode == 0
    status = json.loads(_rollout("status", "--json", str(plan), cwd=tmp_path).stdout)
    assert status["tasks_final"] == status["tasks_observed"] == 2
    assert status["devices_succeeded"] + status["devices_failed"] == 512


def test_report_refresh_polls_once_before_reporting(
    sim: tuple[str, list[str]], tmp_path: Path
) -> None:
    """`report --refresh` asks the platform once; without it the journal alone answers."""
    url, ids = sim
    plan = _plan(tmp_path, url, ids[4368:4624])
    assert _rollout("run", "--no-follow", str(plan), cwd=tmp_path).returncode == 0
    stale = json.loads(_rollout("report", str(plan), "--format", "json", cwd=tmp_path).stdout)
    assert {d["subtask_status"] for d in stale["devices"]} == {"unknown"}
    time.sleep(0.5)  # at 36 000x, every meter has woken and finished by now
    fresh = json.loads(
        _rollout("report", str(plan), "--format", "json", "--refresh", cwd=tmp_path).stdout
    )
    assert {d["subtask_status"] for d in fresh["devices"]} <= {"succeeded", "failed"}
    assert fresh["calls"]["listTasks"] >= 1


def test_step_exits_75_until_done_then_makes_no_call(
    sim: tuple[str, list[str]], tmp_path: Path
) -> None:
    """`run --step` exits 75 with one line while tasks run, 0 when done; a completed run is
    said so without any call."""
    url, ids = sim
    assert len(ids) >= 5136
    plan = _plan(tmp_path, url, ids[4624:4880])
    first = _rollout("run", "--step", str(plan), cwd=tmp_path)
    assert first.returncode == 75, first.stderr[-2000:]
    assert "waiting: tasks were just created" in first.stderr and "Traceback" not in first.stderr
    codes = [first.returncode]
    while codes[-1] == 75 and len(codes) < 20:
        time.sleep(0.3)
        codes.append(_rollout("run", "--step", str(plan), cwd=tmp_path).returncode)
    assert codes[-1] == 0 and set(codes[:-1]) == {75}, codes
    before = get_json(url + "/_sim/stats")["calls"]
    again = _rollout("resume", "--step", str(plan), cwd=tmp_path)
    assert again.returncode == 0 and again.stderr.count("already completed") == 1  # once
    assert get_json(url + "/_sim/stats")["calls"] == before


def test_status_and_plan_to_a_file_hold_their_tables_unwrapped(
    sim: tuple[str, list[str]], tmp_path: Path
) -> None:
    """`rollout status PLAN > file` and `rollout plan PLAN > file` write their tables to
    stdout, each row on one line however wide; stderr stays empty."""
    url, ids = sim
    plan = _plan(tmp_path, url, ids[4880:5136])
    assert _rollout("run", str(plan), cwd=tmp_path).returncode == 0
    status = _rollout("status", str(plan), cwd=tmp_path)
    assert status.returncode == 0 and status.stderr == ""
    assert "in upgrade tasks" in status.stdout and "256" in status.stdout
    preview = _rollout("plan", str(plan), cwd=tmp_path)
    assert preview.returncode == 0 and preview.stderr == ""
    lines = preview.stdout.splitlines()
    monitor = next(line for line in lines if "calls to monitor" in line)
    # 256 devices in one task: every subtask read, 100 a page
    assert "plus 3 reading every device's subtask once" in monitor and len(monitor) > 80
    assert any("2.1.0 for WM-200 (WaterMeter, Aqualis)" in line for line in lines)
    assert any("run 1 completed: 256 targets in tasks" in line for line in lines)
    metrics = _rollout("status", "--format", "prometheus", str(plan), cwd=tmp_path).stdout
    assert 'rollout_platform_calls_total{api="createTask",plan="cli"} 1.0' in metrics


def test_a_missing_dependency_is_one_line_naming_it() -> None:
    """A dependency missing from the environment (updated code, not reinstalled) ends in one
    line naming the package and the reinstall command, exit 1, no traceback."""
    program = (
        "import sys; sys.modules['aiohttp'] = None\n"  # its import raises ModuleNotFoundError
        "from orchestrator.cli import main\n"
        "main(['simulator', '--no-tls', '--port', '0'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "installation: the Python package 'aiohttp' is missing; reinstall: "
        "pip install -e .  (in the project folder, with its virtual environment active)"
    ]


def test_plan_checks_webhook_urls_and_a_missing_journal_fails_every_status_format(
    sim: tuple[str, list[str]], tmp_path: Path
) -> None:
    """`rollout plan` says a webhook variable's URL is unusable as `run` refuses it (never
    quoting it); `status --format prometheus` without a journal exits 3 with one line, as
    the table does, instead of printing nothing."""
    url, ids = sim
    notify = '[[notify]]\nurl_env = "ROLLOUT_CLI_HOOK"\n'
    plan = _plan(tmp_path, url, ids[0:10], waves=notify)
    hook = "ftp://example.com/s3cr3t"
    env = dict(os.environ, **{SECRET_ENV: "demo-secret", "ROLLOUT_CLI_HOOK": hook})
    preview = subprocess.run(
        [sys.executable, "-m", "orchestrator", "plan", str(plan)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "$ROLLOUT_CLI_HOOK does not hold an http(s) URL" in preview.stdout
    assert "s3cr3t" not in preview.stdout + preview.stderr
    missing = str(tmp_path / "nowhere" / "x.sqlite")
    for fmt in ("table", "prometheus"):
        result = _rollout("status", str(plan), "--format", fmt, "--journal", missing, cwd=tmp_path)
        assert result.returncode == 3, (fmt, result.stderr)
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1


def test_status_on_a_narrow_terminal_keeps_each_gate_reason_on_one_line(
    sim: tuple[str, list[str]], tmp_path: Path
) -> None:
    """At 80 columns the waves table leaves the reasons out and prints each below it on one
    line (not one word a line)."""
    from rich.console import Console

    from orchestrator.cli import _print_status
    from orchestrator.logs import use_consoles
    from orchestrator.status import read_status

    url, ids = sim
    waves = '[[waves]]\nname = "canary"\ncount = 20\n[waves.gate]\nmin_finished = 0.5\n'
    plan = _plan(tmp_path, url, ids[5136:5236], waves=waves + '[[waves]]\nname = "rest"\n')
    journal = tmp_path / "j.sqlite"
    assert _rollout("run", str(plan), "--journal", str(journal), cwd=tmp_path).returncode == 0
    status = read_status(journal, "cli")
    reason = status["waves"][0]["gate_reason"]
    assert len(reason) > 40
    screen = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    use_consoles(stdout=screen)
    try:
        _print_status(status)
    finally:
        use_consoles()
    assert isinstance(screen.file, io.StringIO)
    lines = screen.file.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert f"canary: {reason}" in lines


def test_a_closed_stdout_pipe_ends_quietly_with_141(
    sim: tuple[str, list[str]], tmp_path: Path
) -> None:
    """`rollout report|status|plan … | head`: once stdout's reader has gone, each command ends
    with exit 141 (SIGPIPE's) and nothing on stderr — no `system: Broken pipe`."""
    url, ids = sim
    plan = _plan(tmp_path, url, ids[4624:4880])
    assert _rollout("run", str(plan), cwd=tmp_path).returncode == 0
    env = dict(os.environ, **{SECRET_ENV: "demo-secret"})
    for args in (
        ("report", "--format", "jsonl"),
        ("report", "--format", "csv"),
        ("status",),
        ("status", "--json"),
        ("plan", "--offline"),
    ):
        reader, writer = os.pipe()
        os.close(reader)  # the reader went away before the first line
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args, str(plan)],
            cwd=tmp_path,
            env=env,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
        os.close(writer)
        assert (result.returncode, result.stderr) == (141, ""), args


def test_watch_and_report_refresh_need_no_fleet_file(
    sim: tuple[str, list[str]], tmp_path: Path
) -> None:
    """`watch` and `report --refresh` follow the journal's tasks from the plan file alone:
    the fleet file moved away after `run --no-follow`, both still end the tasks' story."""
    url, ids = sim
    plan = _plan(tmp_path, url, ids[4880:5136])
    assert _rollout("run", "--no-follow", str(plan), cwd=tmp_path).returncode == 0
    (tmp_path / "fleet.txt").rename(tmp_path / "moved.txt")
    time.sleep(0.5)  # at 36 000x, every meter has woken and finished by now
    refreshed = _rollout("report", str(plan), "--format", "json", "--refresh", cwd=tmp_path)
    assert refreshed.returncode == 0, refreshed.stderr
    assert json.loads(refreshed.stdout)["calls"]["listTasks"] >= 1
    watched = _rollout("watch", str(plan), cwd=tmp_path)
    assert watched.returncode == 0, watched.stderr
    status = json.loads(_rollout("status", "--json", str(plan), cwd=tmp_path).stdout)
    assert status["tasks_final"] == status["tasks_observed"] == 1
    assert status["devices_succeeded"] + status["devices_failed"] == 256


def test_resume_without_a_run_is_one_line_and_leaves_no_journal(tmp_path: Path) -> None:
    """`rollout resume` of a plan never run: exit 3 naming the journal, one line, and no
    journal file (nor its folder) left behind."""
    plan = _plan(tmp_path, "http://127.0.0.1:9", ["00000000-0000-4000-8000-000000000001"])
    result = _rollout("resume", str(plan), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no run of plan 'cli' to resume" in result.stderr
    assert not (tmp_path / ".rollout").exists()
