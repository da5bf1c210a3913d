"""Group fleets: gates and reports count devices, and groups that share devices across tasks
are refused before anything is created."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.engine import RunOptions, execute
from orchestrator.errors import DuplicatesFound, InputError, RunAborted, RunHalted
from orchestrator.journal import approve_wave
from orchestrator.loaded_plan import load_plan
from orchestrator.report import collect
from orchestrator.simulator import SimulatorConfig, SimulatorServer
from orchestrator.simulator.testing import simulator_process
from orchestrator.status import read_status

from .conftest import APP_ID, SECRET
from .enginehelpers import SECRET_ENV, device_sets
from .simhelpers import newest_package

GROUP_WAVES = """
[[waves]]
name = "canary"
count = 1
[waves.gate]
min_finished = 0.9
max_failed = 0.5
min_sample = 10
[[waves]]
name = "rest"
"""


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)


def _group_plan(directory: Path, url: str, file_id: str, groups: list[str], waves: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "plan.toml"
    path.write_text(f"""
name = "groups"
[platform]
url = "{url}"
secret_env = "{SECRET_ENV}"
rate_limit = "5000/1"
request_timeout = 2
[firmware]
file_id = "{file_id}"
[fleet]
groups = {json.dumps(groups)}
device_type = "WaterMeter"
model = "WM-200"
manufacturer = "Aqualis"
[execution]
settle = 0
[monitor]
follow = true
poll_interval = 0.05
max_poll_interval = 0.1
{waves}
""")
    return path


def _finished_share(sim: SimulatorServer, seq: int, at: float) -> float:
    task = sim.platform.tasks[seq]
    assert task.lives is not None
    done = sum(1 for life in task.lives if life.status_at(at) in ("success", "fail"))
    return done / len(task.lives)


async def test_group_canary_gate_waits_for_its_devices_not_its_groups(tmp_path: Path) -> None:
    """A one-group canary with a 90 % gate: the next wave is created only once 90 % of the
    group's devices finished, and the gate's reason counts devices."""
    config = SimulatorConfig(tls=False, devices=6000, seed=4, speed=3600, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        file_id = newest_package(sim).file_id
        plan = _group_plan(tmp_path, sim.url, file_id, ["north", "south", "east"], GROUP_WAVES)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        canary, rest = sim.platform.tasks
        devices = len(canary.device_ids)
        assert canary.targets["deviceGroups"] == ["north"] and devices > 200
        assert _finished_share(sim, 0, rest.create_time) >= 0.9
    status = read_status(journal, "groups")
    wave = status["waves"][0]
    assert wave["gate"] == "passed" and wave["in_tasks"] == 1 and wave["devices"] == devices
    counted = re.match(r"(\d+) of (\d+) devices in 1 groups finished", wave["gate_reason"])
    current = re.search(r"(\d+) already current", wave["gate_reason"])
    assert counted is not None  # devices, and the base leaves out the already current
    assert int(counted[2]) + (int(current[1]) if current else 0) == devices


async def test_group_report_lists_the_devices_of_each_task(tmp_path: Path) -> None:
    """Report rows of a group fleet are the devices the platform put in each task, with
    outcomes, and the totals count devices."""
    config = SimulatorConfig(tls=False, devices=3000, seed=4, speed=36000, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        file_id = newest_package(sim).file_id
        plan = _group_plan(tmp_path, sim.url, file_id, ["north", "west"], GROUP_WAVES)
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        truth = {d: t["operationId"] for t in sim.platform.truth() for d in t["devices"]}
    data = collect(journal, "groups")
    rows = {row.device_id: row for row in data.devices()}
    assert {d: row.operation_id for d, row in rows.items()} == truth
    assert data.totals["devices"] == len(truth)
    assert data.totals["upgraded"] + data.totals["failed"] + data.totals["already_current"] == len(
        truth
    )
    assert {row.wave for row in rows.values()} == {"canary", "rest"}


async def test_overlapping_groups_across_waves_are_refused_before_any_create(
    tmp_path: Path,
) -> None:
    """A new run whose groups in two waves share devices stops with exit-2 input naming the
    devices; nothing is created."""
    config = SimulatorConfig(tls=False, devices=2000, seed=4, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        north = sim.fleet.groups["north"].device_ids
        sim.platform.create_group({"name": "mix", "deviceIds": north[:3]}, APP_ID)
        plan = _group_plan(
            tmp_path, sim.url, newest_package(sim).file_id, ["north", "mix"], GROUP_WAVES
        )
        with pytest.raises(InputError, match="groups 'north' and 'mix'") as refused:
            await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        assert sim.platform.stats.tasks_created == 0
    message = str(refused.value)
    assert all(device in message for device in north[:3]) and "share 3 devices" in message
    assert "wave 'canary' and wave 'rest'" in message


APPROVED_CANARY = GROUP_WAVES.replace("min_sample = 10\n", "min_sample = 10\napproval = true\n")


async def test_a_device_added_to_a_later_waves_group_after_it_was_sent_halts_that_wave(
    tmp_path: Path,
) -> None:
    """Meters of the canary's group added to the next wave's group while the canary waits:
    the next wave halts before any create, naming the meters already in a task and their
    groups — not the added devices of another model, which no task holds; once they are
    taken out, the run goes on and every device is in exactly one task."""
    config = SimulatorConfig(tls=False, devices=2000, seed=4, speed=36000, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        north, south = sim.fleet.groups["north"], sim.fleet.groups["south"]
        models = {d: sim.fleet.devices[d].model.model for d in north.device_ids}
        sent = [d for d in north.device_ids if models[d] == "WM-200"][:3]
        other = [d for d in north.device_ids if models[d] != "WM-200"][:2]
        file_id = newest_package(sim).file_id
        plan = _group_plan(tmp_path, sim.url, file_id, ["north", "south"], APPROVED_CANARY)
        journal = tmp_path / "j.sqlite"
        with pytest.raises(RunHalted, match="waits for approval"):
            await execute(load_plan(plan), RunOptions(journal=journal))
        sim.platform.add_group_members({"devGroupId": south.group_id, "deviceIds": sent + other})
        approve_wave(journal, "groups", "canary", "alice")
        with pytest.raises(RunAborted, match="wave 'rest'") as halted:
            await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        assert len(sim.platform.tasks) == 1  # nothing of wave 'rest'
        message = str(halted.value)
        assert all(device in message for device in sent), message
        assert not any(device in message for device in other), message
        assert "group(s) 'south' now hold 3 devices" in message
        assert "group 'north' (wave 'canary')" in message and "\n" not in message
        sim.platform.remove_group_members({"devGroupId": south.group_id, "deviceIds": sent})
        await execute(load_plan(plan), RunOptions(journal=journal, resume_only=True))
        counts = device_sets(sim.platform.truth())
    assert len(counts) > 0 and max(counts.values()) == 1
    assert all(counts[device] == 1 for device in sent)
    assert read_status(journal, "groups")["duplicates"] == 0


async def test_a_group_member_sent_directly_by_another_task_halts_its_wave(
    tmp_path: Path,
) -> None:
    """A meter of the next wave's group that another task of this package names directly
    (another tool, an earlier device plan) halts that wave before its create, naming it."""
    config = SimulatorConfig(tls=False, devices=2000, seed=4, speed=36000, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        south = sim.fleet.groups["south"].device_ids
        direct = next(d for d in south if sim.fleet.devices[d].model.model == "WM-200")
        file_id = newest_package(sim).file_id
        body = {"fileId": file_id, "targets": {"devices": [direct]}}
        sim.platform.commit_create(sim.platform.check_create("firmwareUpgrade", body))
        plan = _group_plan(tmp_path, sim.url, file_id, ["north", "south"], GROUP_WAVES)
        with pytest.raises(RunAborted, match="wave 'rest'") as halted:
            await execute(load_plan(plan), RunOptions(journal=tmp_path / "j.sqlite"))
        assert len(sim.platform.tasks) == 2  # the direct task and the canary's
    message = str(halted.value)
    assert f"{direct} (sent by a task naming it)" in message and "'south'" in message


async def test_group_duplicates_are_counted_by_device(tmp_path: Path) -> None:
    """Groups sent twice (a second run told to ignore the census): the closing census counts
    the devices the platform holds in two tasks — each by its ID — not the two group names,
    and not the groups' members of another model, which no task holds."""
    config = SimulatorConfig(tls=False, devices=1500, seed=4, speed=36000, rate_limit=(5000, 1.0))
    async with SimulatorServer(config) as sim:
        file_id = newest_package(sim).file_id
        plan = _group_plan(tmp_path, sim.url, file_id, ["north", "west"], "")
        journal = tmp_path / "j.sqlite"
        await execute(load_plan(plan), RunOptions(journal=journal))
        again = RunOptions(journal=journal, new_run=True, ignore_census=True)
        with pytest.raises(DuplicatesFound):
            await execute(load_plan(plan), again)
        twice = {d for d, n in device_sets(sim.platform.truth()).items() if n == 2}
        members = set(sim.fleet.groups["north"].device_ids) | set(
            sim.fleet.groups["west"].device_ids
        )
    status = read_status(journal, "groups")
    assert 0 < len(twice) < len(members)  # other models are members, never in a task
    assert status["duplicates"] == len(twice)
    examples = {e["target"] for e in status["duplicate_examples"]}
    assert examples <= twice and len(examples) == min(20, len(twice))
    data = collect(journal, "groups")
    assert {d["target"] for d in data.duplicates} == twice


@pytest.fixture(scope="module")
def sim_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("groups-sim")
    with simulator_process(
        directory, "--devices", "2000", "--seed", "4", "--rate-limit", "2000/1"
    ) as found:
        yield found


def _post(url: str, path: str, body: bytes, headers: dict[str, str]) -> dict[str, object]:
    request = urllib.request.Request(url + path, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        return dict(json.load(reply))


def _create_group(url: str, name: str, devices: list[str]) -> None:
    """Over HTTP, as an operator's tool would: log in, then create the group."""
    form = urllib.parse.urlencode({"appId": APP_ID, "secret": SECRET}).encode()
    token = _post(url, "/iocm/app/sec/v1.1.0/login", form, {})["accessToken"]
    headers = {
        "app_key": APP_ID,
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
    }
    body = json.dumps({"name": name, "deviceIds": devices}).encode()
    created = _post(url, "/iocm/app/devgroup/v1.3.0/devGroups", body, headers)
    assert created["name"] == name


def _plan_command(plan: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "plan", "--json", str(plan)],
        env=dict(os.environ, **{SECRET_ENV: SECRET}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_rollout_plan_resolves_group_members_and_shows_the_calls(
    sim_process: tuple[str, Path], tmp_path: Path
) -> None:
    """`rollout plan` reads each group's members through the paged member API and shows the
    calls it made: a login, a list call per group, ⌈members/100⌉ member pages."""
    url, fleet = sim_process
    with fleet.open() as handle:
        regions = [row["group"] for row in csv.DictReader(handle)]
    file_id = _package_of(url)
    plan = _group_plan(tmp_path, url, file_id, ["north", "south"], GROUP_WAVES)
    result = _plan_command(plan)
    assert result.returncode == 0, result.stderr
    preview = json.loads(result.stdout)
    members = {name: regions.count(name) for name in ("north", "south")}
    assert preview["group_members"] == members
    assert preview["devices_in_groups"] == sum(members.values())
    assert [w["devices_in_groups"] for w in preview["waves"]] == [
        members["north"],
        members["south"],
    ]
    pages = sum(-(-n // 100) for n in members.values())
    assert preview["calls_made_to_resolve_groups"] == {
        "login": 1,
        "getPackage": 1,  # the groups are checked against the package's model
        "listGroups": 2,
        "groupMembers": pages,
    }


def test_rollout_plan_refuses_groups_sharing_devices_across_waves(
    sim_process: tuple[str, Path], tmp_path: Path
) -> None:
    """Groups in two waves that share devices: `rollout plan` exits 2 naming the devices."""
    url, fleet = sim_process
    with fleet.open() as handle:
        north = [row["deviceId"] for row in csv.DictReader(handle) if row["group"] == "north"]
    _create_group(url, "overlap", north[:2] + north[-1:])
    plan = _group_plan(tmp_path, url, _package_of(url), ["north", "east", "overlap"], GROUP_WAVES)
    result = _plan_command(plan)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "groups 'north' and 'overlap'" in line and "share 3 devices" in line
    assert all(device in line for device in [*north[:2], north[-1]])
    assert "Traceback" not in result.stderr


def test_rollout_plan_refuses_groups_targeted_as_another_model(
    sim_process: tuple[str, Path], tmp_path: Path
) -> None:
    """A group fleet of WM-310 meters targeted as WM-310 with a WM-200 package: `rollout plan`
    exits 2 with one line naming the group, its devices and both models (the platform would
    refuse the task, 123016) — and nothing is created."""
    url, fleet = sim_process
    with fleet.open() as handle:
        wm310 = [row["deviceId"] for row in csv.DictReader(handle) if row["model"] == "WM-310"]
    _create_group(url, "wm310meters", wm310[:40])
    plan = _group_plan(tmp_path, url, _package_of(url), ["wm310meters"], "")
    plan.write_text(plan.read_text().replace('model = "WM-200"', 'model = "WM-310"'))
    result = _plan_command(plan)
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr
    (line,) = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert "'wm310meters' (40 devices)" in line and "WM-310" in line and "WM-200" in line
    assert "123016" in line


def test_rollout_plan_offline_refuses_groups_of_another_model_than_the_firmware(
    tmp_path: Path,
) -> None:
    """With the firmware given by version/type/model/manufacturer, a group fleet targeted as
    another model is refused offline (exit 2, one line naming the groups and the models)."""
    plan = _group_plan(tmp_path, "http://127.0.0.1:9", "0" * 24, ["north", "south"], "")
    text = plan.read_text().replace(
        f'file_id = "{"0" * 24}"',
        'version = "5.4.0"\ndevice_type = "GasMeter"\nmodel = "GM-10"\nmanufacturer = "Gastro"',
    )
    plan.write_text(text)
    result = CliRunner().invoke(main, ["plan", "--offline", str(plan)])
    err = result.stderr.strip()
    assert result.exit_code == 2 and len(err.splitlines()) == 1, err
    assert "'north', 'south'" in err and "WM-200" in err and "GM-10" in err and "123016" in err


def test_rollout_plan_counts_only_shared_devices_that_would_receive_the_package(
    sim_process: tuple[str, Path], tmp_path: Path
) -> None:
    """Groups in two waves that share only a gas meter (another model than the WM-200
    package): with `[fleet] inventory` listing models, `rollout plan` passes; a shared
    WM-200 meter is still refused, and without an inventory the shared device's model is
    unknown, so it counts."""
    url, fleet = sim_process
    with fleet.open() as handle:
        rows = list(csv.DictReader(handle))
    water = [r["deviceId"] for r in rows if r["model"] == "WM-200"]
    gas = next(r["deviceId"] for r in rows if r["model"] == "GM-10")
    _create_group(url, "sharegasa", [*water[:5], gas])
    _create_group(url, "sharegasb", [*water[5:10], gas])
    _create_group(url, "sharewatb", [*water[5:10], water[0]])
    package = _package_of(url)
    inventory = f'inventory = "{fleet}"\n'

    def plan(name: str, groups: list[str], extra: str) -> Path:
        path = _group_plan(tmp_path / name, url, package, groups, GROUP_WAVES)
        path.write_text(path.read_text().replace("[fleet]\n", f"[fleet]\n{extra}"))
        return path

    passed = _plan_command(plan("gas", ["sharegasa", "sharegasb"], inventory))
    assert passed.returncode == 0, passed.stderr
    unknown = _plan_command(plan("unknown", ["sharegasa", "sharegasb"], ""))
    assert unknown.returncode == 2 and gas in unknown.stderr
    water_shared = _plan_command(plan("water", ["sharegasa", "sharewatb"], inventory))
    assert water_shared.returncode == 2
    assert f"share 1 devices ({water[0]})" in water_shared.stderr


def _package_of(url: str) -> str:
    form = urllib.parse.urlencode({"appId": APP_ID, "secret": SECRET}).encode()
    token = _post(url, "/iocm/app/sec/v1.1.0/login", form, {})["accessToken"]
    request = urllib.request.Request(
        url + "/iodm/northbound/v1.5.0/category?model=WM-200&version=2.1.0",
        headers={"app_key": APP_ID, "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return str(json.load(reply)["data"][0]["fileId"])


def test_rollout_plan_offline_makes_no_call(tmp_path: Path) -> None:
    """`rollout plan --offline` checks a group plan without reading its groups (no platform
    listens here), and says nothing about their members."""
    plan = _group_plan(tmp_path, "http://127.0.0.1:9", "0" * 24, ["north", "south"], GROUP_WAVES)
    result = CliRunner().invoke(main, ["plan", "--offline", "--json", str(plan)])
    assert result.exit_code == 0, result.output
    preview = json.loads(result.stdout)
    assert preview["targets"] == 2 and "group_members" not in preview
