"""The embedded simulator (`url = "simulator"`) keeps its platform beside the journal, so the
demo can be interrupted and resumed like a rollout against a real platform."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from orchestrator.engine import RunOptions, execute, simulator_state_path
from orchestrator.errors import InputError
from orchestrator.journal import has_run
from orchestrator.loaded_plan import load_plan
from orchestrator.status import read_status

PLANS = Path(__file__).resolve().parent.parent / "plans"


def _demo(directory: Path, targets: int = 600) -> Path:
    """plans/demo.toml scaled down: its first `targets` meters, a faster clock and limit."""
    fleet = (PLANS / "demo-fleet.csv").read_text().splitlines()
    (directory / "demo-fleet.csv").write_text("\n".join(fleet[: targets + 1]) + "\n")
    text = (PLANS / "demo.toml").read_text()
    for old, new in (
        ('rate_limit = "100/60"', 'rate_limit = "2000/1"\nrequest_timeout = 2'),
        ("concurrency = 4", "concurrency = 4\nsettle = 0.5"),
        ("speed = 600", "speed = 3600"),
        ("poll_interval = 4", "poll_interval = 0.2"),
        ("max_poll_interval = 15", "max_poll_interval = 0.5"),
        ("min_sample = 200", "min_sample = 100"),
        ("max_failed = 0.15", "max_failed = 0.5"),
    ):
        assert old in text, old
        text = text.replace(old, new)  # every occurrence
    plan = directory / "demo.toml"
    plan.write_text(text)
    return plan


async def test_the_demo_resumed_after_ctrl_c_meets_the_platform_it_left(tmp_path: Path) -> None:
    """Interrupted while its canary's gate waits, the demo resumes against the same embedded
    platform (kept beside the journal): its tasks are followed to the end, none sent twice."""
    plan = _demo(tmp_path)
    loaded = load_plan(plan)
    journal = tmp_path / ".rollout" / f"{loaded.plan.name}.journal.sqlite"
    run = asyncio.create_task(execute(loaded, RunOptions()))
    try:
        for _ in range(400):
            await asyncio.sleep(0.05)
            if has_run(journal, loaded.plan.name):
                status = read_status(journal, loaded.plan.name)
                if status["waves"][0]["gate"] == "waiting":
                    break
        else:
            pytest.fail("the canary's gate never waited")
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    before = read_status(journal, loaded.plan.name)
    assert before["status"] == "interrupted" and before["targets_in_tasks"] == 256
    assert simulator_state_path(journal, loaded.plan.name).exists()

    result = await execute(load_plan(plan), RunOptions(resume_only=True))
    after = read_status(journal, loaded.plan.name)
    assert result.counts["targets_submitted"] == 600
    assert after["status"] == "completed" and after["duplicates"] == 0
    assert after["targets_in_tasks_by"] == {"created": 600}  # nothing adopted: one platform
    assert after["tasks_final"] == after["tasks_observed"] == 3  # one task per wave
    outcomes = (
        after["devices_succeeded"] + after["devices_failed"] + after["devices_already_current"]
    )
    assert outcomes == 600


async def test_a_saved_platform_that_does_not_fit_is_bad_input(tmp_path: Path) -> None:
    """A file beside the journal that is not the plan's saved platform is refused in one line
    naming it (exit 2), before the embedded platform starts."""
    plan = _demo(tmp_path)
    loaded = load_plan(plan)
    journal = tmp_path / ".rollout" / f"{loaded.plan.name}.journal.sqlite"
    state = simulator_state_path(journal, loaded.plan.name)
    state.parent.mkdir()
    state.write_text("{}")
    with pytest.raises(InputError, match=r"simulator-state\.json.*platform\.simulator.*delete"):
        await execute(loaded, RunOptions())
    assert not has_run(journal, loaded.plan.name)
