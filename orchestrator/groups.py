"""Group fleets: the devices behind the plan's group names, and the overlaps that would send a
device twice.

A task that targets device groups names them; the platform expands each name into its member
devices when the task is created (platform-api.md §3.4, §4). A device that is a member of two
groups placed in two tasks (two waves, or two chunks of one wave) therefore gets two subtasks
— two upgrades — and the reference says a device may belong to several groups (its English
and Chinese pages disagree: §4). So before anything is created, `rollout plan` and a new run
resolve every group of the plan through the member API and refuse the plan when groups in
different tasks share devices, naming them.

Calls: one `GET /iocm/app/devgroup/v1.3.0/devGroups?name=…` per group (its id from its name),
then ⌈members/100⌉ pages of `GET /iocm/app/dm/v1.2.0/devices/ids?devGroupId=…` — for the
five 200-member region groups of a 1 000-device fleet, 5 + 10 calls and a login.

Members are every device of a group, whatever its model; the platform upgrades only those of
the package's type, model and manufacturer (the task's `staResult.total` counts them). The
member API does not say a member's model, and the reference has no device query: a shared
device counts as an overlap unless `[fleet] inventory` (a CSV with deviceId and model, e.g.
the platform's device export) lists it with another model than the package's — such a device
would receive nothing.

Membership changes while a run goes on: a device added to a later wave's group after it was
sent (through an earlier group, or by a task naming it) would be sent again by that group's
task. So before each wave's creates the wave's groups are read again (`find_resent`): a
member that an earlier group of the run held when its task was created — or that a task of
this package names — is looked up with the task list's `deviceId` filter (§3.7; one call per
such device, at most CONFIRM_LIMIT): the platform lists the tasks that really hold it, so a
device of another model (never in a task of this package) does not count. Any found halts the
run before the wave's first create (`refuse_resent`, exit 1, naming devices and groups); the
operator takes them out of the group and resumes. The closing census counts duplicates of a
group fleet by device: the tasks it finds sharing devices are read (`device_duplicates`).
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

from .census import Census, Match, PackageJudge
from .errors import InputError, RunAborted
from .northbound import NorthboundClient, OperationType, Package
from .planner import Chunk

SHOWN = 5  # devices named in a refusal
CONFIRM_LIMIT = 50  # devices looked up one by one (one task-list call each) per check


@dataclass(frozen=True)
class ResolvedGroup:
    name: str
    group_id: str
    devices: tuple[str, ...]  # every member, as the member API lists them


@dataclass(frozen=True)
class Overlap:
    """Two groups in different tasks that share devices."""

    first: str
    first_wave: str
    second: str
    second_wave: str
    devices: list[str]


async def resolve_groups(
    client: NorthboundClient, names: Sequence[str], source: str
) -> dict[str, ResolvedGroup]:
    """Every group of the plan with its members, by name. Raises InputError (exit 2) for a
    name the platform does not know — a create would be refused 123002."""
    resolved: dict[str, ResolvedGroup] = {}
    for name in names:
        page = await client.list_groups(name=name)
        group = next((g for g in page.items if g.name == name), None)
        if group is None:
            raise InputError(
                source,
                "fleet.groups",
                f"the platform has no device group named {name!r} (a create would be refused "
                "123002)",
            )
        members = await client.group_members(group.group_id)
        resolved[name] = ResolvedGroup(name, group.group_id, tuple(members))
    return resolved


def refuse_other_model(
    groups: Mapping[str, ResolvedGroup],
    fleet: tuple[str | None, str | None, str | None],
    package: Package,
    source: str,
) -> None:
    """A group fleet's task carries the fleet's device type, model and manufacturer; the
    platform refuses it (123016) when they are not the package's (platform-api.md §3.4), so
    no device of the groups would be upgraded. One line naming the groups, their devices and
    both models (InputError, exit 2) — before anything is created, as a device fleet's
    wrong-model devices are quarantined before they are in a task."""
    wanted = (package.device_type, package.model, package.manufacturer)
    if fleet == wanted:
        return
    devices = len({device for group in groups.values() for device in group.devices})
    names = ", ".join(repr(name) for name in groups)
    raise InputError(
        source,
        "fleet.model",
        f"group(s) {names} ({devices} devices) are targeted as {'/'.join(map(str, fleet))} "
        f"but package {package.file_id} is for {'/'.join(wanted)} (type/model/manufacturer): "
        "the platform refuses such a task (123016) and none of them would be upgraded",
    )


def find_overlaps(
    chunks: Sequence[Chunk],
    groups: Mapping[str, ResolvedGroup],
    wave_names: Mapping[int, str],
    other_model: Container[str] = frozenset(),
) -> list[Overlap]:
    """Pairs of groups placed in different tasks (chunks) that share devices, in plan order.
    Groups in one task may share devices: the platform makes one subtask per device. Devices
    in `other_model` (known to be of another model than the package's: `[fleet] inventory`)
    would receive nothing and are no overlap; a member of unknown model counts (the member
    API does not tell models)."""
    first_seen: dict[str, tuple[str, str]] = {}  # device → (chunk, group)
    shared: dict[tuple[str, str], list[str]] = {}
    chunk_of: dict[str, Chunk] = {}
    for chunk in chunks:
        for name in chunk.members:
            chunk_of[name] = chunk
            for device in groups[name].devices:
                if device in other_model:
                    continue
                seen = first_seen.get(device)
                if seen is None:
                    first_seen[device] = (chunk.chunk_id, name)
                elif seen[0] != chunk.chunk_id:
                    shared.setdefault((seen[1], name), []).append(device)
    return [
        Overlap(
            first,
            wave_names.get(chunk_of[first].wave, ""),
            second,
            wave_names.get(chunk_of[second].wave, ""),
            devices,
        )
        for (first, second), devices in shared.items()
    ]


def refuse_overlaps(overlaps: Sequence[Overlap], source: str) -> None:
    """One line naming the first pair of groups and their shared devices (exit 2)."""
    if not overlaps:
        return
    first = overlaps[0]
    shown = ", ".join(first.devices[:SHOWN])
    more = f" and {len(first.devices) - SHOWN} more" if len(first.devices) > SHOWN else ""
    where = (
        f"wave {first.first_wave!r} and wave {first.second_wave!r}"
        if first.first_wave != first.second_wave
        else f"two tasks of wave {first.first_wave!r}"
    )
    others = f"; {len(overlaps) - 1} more pairs of groups overlap" if len(overlaps) > 1 else ""
    raise InputError(
        source,
        "fleet.groups",
        f"groups {first.first!r} and {first.second!r} ({where}) share {len(first.devices)} "
        f"devices ({shown}{more}): each would be sent twice{others}; put such groups in one "
        "wave's task or make them disjoint (shared devices of another model do not count "
        "when `[fleet] inventory` lists their models)",
    )


async def tasks_holding(
    judge: PackageJudge,
    operation: OperationType,
    device: str,
    ignore: frozenset[str] = frozenset(),
) -> list[str]:
    """operationIds of the tasks of this package that hold `device`, by the task list's
    `deviceId` filter (platform-api.md §3.7: the platform's own expansion of group targets,
    so a device of another model is in none), less `ignore`; a task whose package the
    platform does not tell counts. One call (the first 100 tasks)."""
    page = await judge.list_tasks(operation, device_id=device)
    found = []
    for task in page.items:
        if task.operation_id in ignore:
            continue
        verdict = await judge.judge(task)
        if verdict is not Match.OTHER:
            found.append(task.operation_id)
    return found


@dataclass(frozen=True)
class Resent:
    """A device a wave's group would send again: already in a task of this package."""

    device: str
    group: str  # the group of the wave about to be created
    held_by: str  # how it was sent: "group 'north' (wave 'canary')", or "a task naming it"
    operations: list[str]


async def find_resent(
    judge: PackageJudge,
    operation: OperationType,
    wave_groups: Mapping[str, ResolvedGroup],
    earlier: Mapping[str, str],
) -> tuple[list[Resent], int]:
    """The members of a wave's groups (as read now) that are already in a task of this
    package: those `earlier` names (device → how it was sent: an earlier group's member
    when that group's task was created, or a device a task names) are looked up one by one
    (`tasks_holding`), at most CONFIRM_LIMIT. Returns the devices found in a task and how
    many suspects were not looked up (the call bound): both halt the wave."""
    suspects: dict[str, str] = {}
    for name, group in wave_groups.items():
        for device in group.devices:
            if device in earlier and device not in suspects:
                suspects[device] = name
    found: list[Resent] = []
    for device, name in list(suspects.items())[:CONFIRM_LIMIT]:
        operations = await tasks_holding(judge, operation, device)
        if operations:
            found.append(Resent(device, name, earlier[device], operations))
    return found, max(0, len(suspects) - CONFIRM_LIMIT)


def refuse_resent(wave: str, found: Sequence[Resent], unchecked: int) -> None:
    """One line (RunAborted, exit 1) naming the devices a wave's groups would send again,
    their groups and how they were sent; nothing of the wave was created."""
    if not found and not unchecked:
        return
    groups = sorted({r.group for r in found})
    shown = ", ".join(f"{r.device} (sent by {r.held_by})" for r in found[:SHOWN])
    more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    unsure = (
        f"; {unchecked} more members were in an earlier group and not looked up (at most "
        f"{CONFIRM_LIMIT} a check)"
        if unchecked
        else ""
    )
    named = ", ".join(repr(g) for g in groups) or "its groups"
    raise RunAborted(
        f"wave {wave!r}: group(s) {named} now hold {len(found)} devices already in a task "
        f"of this package: {shown}{more}{unsure}. Creating the wave's tasks would send them "
        "twice; nothing of the wave was created. Take them out of those groups (or the "
        "groups out of the plan with --new-run), then `rollout resume`"
    )


async def device_duplicates(
    judge: PackageJudge,
    census: Census,
    members: Mapping[str, Sequence[str]],
) -> dict[str, list[str]]:
    """The closing census of a group fleet, by device: when the census shows a device in two
    tasks of this package — through two groups (their recorded `members`), or a group and a
    task naming it — the tasks involved are read (every subtask page, ⌈devices/100⌉ calls
    each, platform-api.md §3.6: the platform's own expansion, so a device of another model,
    in no task, does not count) and each device listed by two or more of them is counted.
    device → operationIds (oldest task first, as the census orders them). No call when no
    device is suspect."""
    ops_of: dict[str, set[str]] = {}
    created: dict[str, str] = {}
    for target, (create_time, _, operation_id) in census.holder.items():
        created.setdefault(operation_id, create_time)
        ops = {operation_id, *census.extra.get(target, [])}
        for device in members.get(target, [target]):
            ops_of.setdefault(device, set()).update(ops)
    involved = sorted({op for ops in ops_of.values() if len(ops) > 1 for op in ops})
    held: dict[str, list[str]] = {}
    for operation_id in involved:
        for sub in await judge.client.sub_operations(operation_id, priority=judge.priority):
            held.setdefault(sub.device_id, []).append(operation_id)
    order = {op: (created.get(op, ""), op) for op in involved}
    return {
        device: sorted(set(ops), key=order.__getitem__)
        for device, ops in held.items()
        if len(set(ops)) > 1
    }
