"""Wave assignment and chunking are deterministic and follow the plan's selection rules."""

from __future__ import annotations

from collections import Counter

import pytest

from orchestrator.errors import InputError
from orchestrator.fleet import Column, Fleet
from orchestrator.plan import parse_plan
from orchestrator.planner import assign_waves, bisect, plan_chunks

BASE = """
name = "p"
[platform]
url = "https://h:8743"
secret_env = "S"
[firmware]
file_id = "0123456789abcdef01234567"
[fleet]
devices_file = "f.csv"
"""


def _fleet(n: int, regions: tuple[str, ...] = ("north", "south", "east", "west")) -> Fleet:
    members = [f"dev-{i:05d}" for i in range(n)]
    # north holds 70 % of the fleet: an ordered canary would be all north
    groups = ["north" if i < n * 0.7 else regions[1 + i % (len(regions) - 1)] for i in range(n)]
    return Fleet("devices", members, "sha", "f.csv", {"group": Column.of(groups)})


def test_same_plan_and_fleet_give_the_same_chunks() -> None:
    """Chunking twice yields identical chunk IDs and members; every chunk holds ≤ 256."""
    fleet = _fleet(1000)
    plan = parse_plan(BASE, "p.toml")
    first = [
        (c.chunk_id, list(c.members))
        for c in plan_chunks(fleet, assign_waves(plan, fleet, "p.toml"))
    ]
    second = [
        (c.chunk_id, list(c.members))
        for c in plan_chunks(fleet, assign_waves(plan, fleet, "p.toml"))
    ]
    assert first == second and len(first) == 4
    assert max(len(m) for _, m in first) == 256
    assert [d for _, m in first for d in m] == fleet.members


def test_stratified_canary_draws_from_every_region() -> None:
    """A stratified canary mirrors the regions' shares instead of filling with the first one."""
    plan = parse_plan(
        BASE
        + """
[[waves]]
name = "canary"
count = 100
selection = "stratified"
stratify_by = "group"
seed = 3
[[waves]]
name = "rest"
""",
        "p.toml",
    )
    fleet = _fleet(2000)
    canary, rest = assign_waves(plan, fleet, "p.toml")
    groups = dict(zip(fleet.members, fleet.attributes["group"], strict=True))
    share = Counter(groups[d] for d in canary.members)
    assert share["north"] == 70 and min(share.values()) >= 9
    assert len(canary.members) == 100 and len(rest.members) == 1900
    assert not set(canary.members) & set(rest.members)


def test_random_selection_is_seeded() -> None:
    """The same seed picks the same random canary; another seed picks another."""
    text = (
        BASE + '[[waves]]\nname = "c"\ncount = 50\nselection = "random"\nseed = {seed}\n'
        '[[waves]]\nname = "rest"\n'
    )
    fleet = _fleet(1000)
    pick = [
        assign_waves(parse_plan(text.format(seed=s), "p"), fleet, "p")[0].members for s in (1, 1, 2)
    ]
    assert pick[0] == pick[1] != pick[2]


def test_wave_larger_than_the_fleet_is_bad_input() -> None:
    """A wave that asks for more targets than remain is refused offline."""
    plan = parse_plan(BASE + '[[waves]]\nname = "c"\ncount = 5000\n[[waves]]\nname = "r"\n', "p")
    with pytest.raises(InputError, match="waves"):
        assign_waves(plan, _fleet(100), "p")


def test_bisect_splits_in_halves_and_keeps_the_wave() -> None:
    """Bisection yields two children covering the parent, named after it."""
    chunk = next(plan_chunks(_fleet(5)))
    left, right = bisect(chunk)
    assert (left.chunk_id, right.chunk_id) == ("w00-000000.0", "w00-000000.1")
    assert list(left.members) + list(right.members) == list(chunk.members)
    assert left.wave == right.wave == chunk.wave


def _stratified(count: int, seed: int) -> str:
    return (
        BASE + f'[[waves]]\nname = "c"\ncount = {count}\nselection = "stratified"\n'
        f'stratify_by = "group"\nseed = {seed}\n[[waves]]\nname = "rest"\n'
    )


def test_one_value_a_device_draws_a_seeded_random_canary() -> None:
    """With a value per device, the seed decides the canary: the same seed gives the same
    one, and over seeds every device is drawn about as often as any other."""
    members = [f"dev-{i:03d}" for i in range(200)]
    fleet = Fleet("devices", members, "sha", "f.csv", {"group": Column.of(members)})
    draws = {
        seed: assign_waves(parse_plan(_stratified(10, seed), "p"), fleet, "p")[0].members
        for seed in range(200)
    }
    assert draws[5] == assign_waves(parse_plan(_stratified(10, 5), "p"), fleet, "p")[0].members
    times = Counter(device for members in draws.values() for device in members)
    assert all(len(members) == 10 for members in draws.values())
    assert set(times) == set(members) and max(times.values()) <= 30  # 10 expected each


def test_leftover_seats_go_to_strata_in_proportion_to_their_size() -> None:
    """Seats no stratum fills whole go to small and large strata alike by share: half the
    devices in groups of three and half alone give half of a canary each, on average."""
    groups = [f"trio-{i // 3:02d}" for i in range(150)] + [f"solo-{i:03d}" for i in range(150)]
    members = [f"dev-{i:03d}" for i in range(300)]
    fleet = Fleet("devices", members, "sha", "f.csv", {"group": Column.of(groups)})
    in_trios = [
        sum(
            int(member[4:]) < 150
            for member in assign_waves(parse_plan(_stratified(10, seed), "p"), fleet, "p")[
                0
            ].members
        )
        for seed in range(200)
    ]
    assert 4.5 <= sum(in_trios) / len(in_trios) <= 5.5


def test_many_strata_with_whole_shares_mirror_them() -> None:
    """Past sixteen values (the one-pass path), whole shares are taken exactly, from each
    stratum's own devices."""
    groups = [f"g{i % 40:02d}" for i in range(4000)]
    fleet = Fleet(
        "devices", [f"dev-{i:04d}" for i in range(4000)], "sha", "f", {"group": Column.of(groups)}
    )
    canary = assign_waves(parse_plan(_stratified(200, 1), "p"), fleet, "p")[0].members
    share = Counter(groups[int(member[4:])] for member in canary)
    assert len(share) == 40 and set(share.values()) == {5}
