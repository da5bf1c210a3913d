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
the package's type, model and manufacturer (the task's `staResult.total` counts them). An
overlap is refused whatever the shared devices' model: the member API does not say it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import InputError
from .northbound import NorthboundClient, Package
from .planner import Chunk

SHOWN = 5  # devices named in a refusal


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
    chunks: Sequence[Chunk], groups: Mapping[str, ResolvedGroup], wave_names: Mapping[int, str]
) -> list[Overlap]:
    """Pairs of groups placed in different tasks (chunks) that share devices, in plan order.
    Groups in one task may share devices: the platform makes one subtask per device."""
    first_seen: dict[str, tuple[str, str]] = {}  # device → (chunk, group)
    shared: dict[tuple[str, str], list[str]] = {}
    chunk_of: dict[str, Chunk] = {}
    for chunk in chunks:
        for name in chunk.members:
            chunk_of[name] = chunk
            for device in groups[name].devices:
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
        "wave's task or make them disjoint",
    )
