"""One console: logs scroll above the live display of a run, in console and JSON modes."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pyte
import pytest
from rich.console import Console

from orchestrator.display import RunDisplay
from orchestrator.engine import RunOptions, execute
from orchestrator.loaded_plan import load_plan
from orchestrator.logs import configure_logging, use_consoles
from orchestrator.simulator import SimulatorConfig, SimulatorServer

from .conftest import SECRET
from .enginehelpers import SECRET_ENV, write_plan
from .simhelpers import devices_of

WAVES = """
[[waves]]
name = "canary"
count = 256
[waves.gate]
min_finished = 0.9
[[waves]]
name = "rest"
"""
LOG_LINE = re.compile(r"\[(debug|info|warning|error|critical)\s*\]|^\{\"")
DISPLAY_LINE = re.compile(r"targets in tasks|^monitoring: |^wave\s+targets|^(canary|rest)\s+\d")


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


@pytest.fixture
def recording() -> Iterator[Console]:
    """A terminal-like console that records everything printed on it."""
    console = Console(file=io.StringIO(), force_terminal=True, width=WIDTH, record=True)
    yield console
    use_consoles()
    configure_logging("console", "info")


WIDTH = 150


def _screen(raw: str) -> list[str]:
    """What a terminal shows after `raw` (cursor moves and erasures applied), top to bottom."""
    # tall enough that nothing scrolls away, wide enough that no log line wraps
    screen = pyte.Screen(1000, 4000)
    pyte.Stream(screen).feed(raw.replace("\n", "\r\n"))
    return [line.rstrip() for line in screen.display if line.strip()]


async def _record_run(tmp_path: Path, console: Console, log_format: str) -> list[str]:
    configure_logging(log_format, "info", console=console)
    config = SimulatorConfig(tls=False, devices=3000, seed=4, rate_limit=(2000, 1.0), speed=2000)
    async with SimulatorServer(config) as sim:
        devices = devices_of(sim, "WM-200", 600)
        plan = write_plan(
            tmp_path,
            sim,
            devices,
            monitor="follow = true\npoll_interval = 0.2\nmax_poll_interval = 0.3",
            waves=WAVES,
        )
        display = RunDisplay(console, len(devices))
        try:
            await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"), display)
        finally:
            display.stop()
    return console.export_text().splitlines()


@pytest.mark.parametrize("log_format", ["console", "json"])
async def test_log_lines_never_share_a_line_with_the_live_display(
    tmp_path: Path, recording: Console, log_format: str
) -> None:
    """On the terminal every line is a log line or a line of the display, never both, the
    display last; device counts of the canary show while it is monitored, before the rest is
    in tasks."""
    frames = await _record_run(tmp_path, recording, log_format)  # every frame drawn, in order
    assert isinstance(recording.file, io.StringIO)
    lines = _screen(recording.file.getvalue())
    logs = [i for i, line in enumerate(lines) if LOG_LINE.search(line)]
    shown = [i for i, line in enumerate(lines) if DISPLAY_LINE.search(line)]
    assert len(logs) >= 5 and len(shown) >= 3
    assert not set(logs) & set(shown)
    assert max(logs) < min(shown)  # the logs scrolled above the display
    if log_format == "json":
        assert all(json.loads(lines[i])["event"] for i in logs)
    # during the canary's gate: some of its 256 devices finished, the rest not yet in a task
    lines = frames
    canary_only = [
        int(m[1])
        for line in lines
        if (m := re.match(r"monitoring: (\d+) of 256 devices in tasks finished", line))
    ]
    assert any(0 < finished <= 256 for finished in canary_only)
    # rest: targets, in a task, finished, upgraded, failed, already current, gate
    assert any(re.match(r"rest\s+344\s+0\s+0\s+0\s+0\s+0\s+pending", line) for line in lines)
    assert any(re.match(r"rest\s+344\s+344\s+344\s+", line) for line in lines)  # the end


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (30, "30 s"),
        (119, "119 s"),
        (20 * 60, "20 min"),
        (5.5 * 3600, "5.5 h"),
        (3 * 86400, "3 days"),
    ],
)
def test_a_soak_and_a_plans_durations_are_said_in_words(seconds: float, words: str) -> None:
    """A soaking gate's time left and `rollout plan`'s soak read as people say them: seconds
    under 2 min (never "0 min left"), never "0.333333 min"."""
    import time

    from orchestrator.observe import WaveView
    from orchestrator.plan import GateSection
    from orchestrator.preview import gate_words

    view = WaveView(
        "canary", 10, 10, 10, 10, 10, 0, 0, "soaking", "", time.time() + seconds + 0.4, False
    )
    assert view.waiting_for == f"soak, {words} left"
    assert f"then soaks {words}" in gate_words(GateSection(soak=seconds))


def test_the_bar_shows_no_rate_before_a_few_seconds_of_creates() -> None:
    """The first create 0.1 s after the start is not "600 creates/min": the bar says it is
    measuring until a few seconds of creates were seen."""
    import time

    from orchestrator.submitter import Progress

    display = RunDisplay(Console(file=io.StringIO(), width=120), 6098)
    display.progress(Progress(6098, 256, creates=1, started=time.monotonic() - 0.1))
    assert display.bar.tasks[0].fields["rate"] == "rate: measuring"
    display.progress(Progress(6098, 2560, creates=10, started=time.monotonic() - 60))
    assert display.bar.tasks[0].fields["rate"] == "10 creates/min"
