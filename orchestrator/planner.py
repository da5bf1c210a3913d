"""Fleet → waves → chunks of at most 256 targets, deterministically.

The same plan and the same fleet file always give the same waves and chunks with the same
IDs, so a resumed run and the reconciliation step can rely on them. Targets keep the fleet
file's order inside a wave (operators often order a fleet by region or risk on purpose);
`random` and `stratified` wave selections draw from a seeded generator. A chunk refused for a
cause that belongs to some of its devices is bisected; its children are named `<parent>.0`
and `<parent>.1`, which keeps the sort order of IDs equal to submission order.
"""

from __future__ import annotations

import math
import random
import re
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress
from typing import TYPE_CHECKING

from .errors import InputError
from .fleet import Fleet

if TYPE_CHECKING:  # the plan module loads fleets into waves with this one
    from .plan import Plan, WaveSection

CHUNK_SIZE = 256
DEFAULT_WAVE = "all"
BISECTION_PART = re.compile(r"\.[01]$")
FEW_STRATA = 16  # up to this many values, a stratified pick passes over the pool once a value


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    kind: str  # "devices" | "groups"
    members: Sequence[str]
    wave: int = 0


@dataclass(frozen=True)
class Wave:
    index: int
    name: str
    members: Sequence[str]


def root_chunk_id(wave: int, index: int) -> str:
    return f"w{wave:02d}-{index:06d}"


def _size(wave: WaveSection, total: int, remaining: int, last: bool) -> int:
    if last:
        return remaining
    wanted = wave.count if wave.count is not None else max(1, round((wave.share or 0) * total))
    return wanted


def _pick(wave: WaveSection, pool: Sequence[int], size: int, fleet: Fleet) -> Sequence[int]:
    """Positions (into `pool`, fleet indexes) of the targets this wave takes, in file order:
    a `range` when they are the pool's first.

    A stratified wave gives each stratum (devices sharing a value of `stratify_by`) its whole
    share of `size` seats, then draws the seats left over among the strata with the seeded
    generator, each stratum taking one with probability its share's fraction (systematic
    sampling over a seeded shuffle of the strata): every stratum's expected seats equal its
    share, every device can be drawn, and another seed draws others. Inside a stratum the
    devices are a seeded sample."""
    if wave.selection == "ordered" or size >= len(pool):
        return range(min(size, len(pool)))
    rng = random.Random(wave.seed)
    if wave.selection == "random":
        return sorted(rng.sample(range(len(pool)), size))
    assert wave.stratify_by is not None
    column = fleet.attributes[wave.stratify_by]
    # each pool device's code, in pool order (one C-speed gather)
    codes = column.codes
    if len(pool) != len(codes):
        codes = array(codes.typecode, map(codes.__getitem__, pool))
    keys, counts, members = _strata(codes, column.values)
    total = len(pool)
    # proportional allocation in whole numbers: size·count // total seats each, and the
    # remainder (size·count mod total, in 1/total seats) decides who takes the seats left
    quota = array("q", (size * counts[key] // total for key in keys))
    short = size - sum(quota)
    if short:
        rests = array("q", (size * counts[key] % total for key in keys))
        order = array("I", compress(range(len(rests)), rests))
        rng.shuffle(order)
        reach = array("q", accumulate(map(rests.__getitem__, order)))
        start = rng.randrange(total)
        for seat in range(short):  # each rest < total: a stratum takes at most one more
            quota[order[bisect_right(reach, start + seat * total)]] += 1
    chosen: list[int] = []
    for key, seats in zip(keys, quota, strict=True):
        if seats:
            chosen.extend(rng.sample(members(key), seats))
    return sorted(chosen)


def _strata(
    codes: array[int], values: Sequence[str]
) -> tuple[list[int], Sequence[int], Callable[[int], Sequence[int]]]:
    """The strata of the pool's `codes`: the codes present, ordered by their value; the count
    of each code; and a stratum's positions in the pool (ascending).

    Up to `FEW_STRATA` values, a C-speed pass a stratum; beyond, the positions sorted by code
    once (a counting sort) into one array (4 bytes a device), each stratum a slice of it."""
    if len(values) <= FEW_STRATA:
        found: dict[int, array[int]] = {}
        for code in range(len(values)):
            positions = array("l", compress(range(len(codes)), _in_stratum(codes, code)))
            if positions:
                found[code] = positions
        sizes = [len(found.get(code, ())) for code in range(len(values))]
        return sorted(found, key=values.__getitem__), sizes, found.__getitem__
    counts = array("I", bytes(4 * len(values)))
    for code in codes:
        counts[code] += 1
    starts = array("I", accumulate(counts, initial=0))
    ordered = array("I", bytes(4 * len(codes)))  # a counting sort: each stratum in pool order
    cursor = starts[:-1]
    for position, code in enumerate(codes):
        ordered[cursor[code]] = position
        cursor[code] += 1
    present = sorted(compress(range(len(values)), counts), key=values.__getitem__)

    def members(code: int) -> Sequence[int]:
        return ordered[starts[code] : starts[code + 1]]

    return present, counts, members


def _in_stratum(codes: array[int], code: int) -> Iterable[int]:
    """Per cell of `codes`, whether it is `code` (truthy), in C-speed passes: one
    `bytes.translate` for one-byte codes."""
    if codes.typecode == "B":
        return codes.tobytes().translate(bytes(code) + b"\x01" + bytes(255 - code))
    return map(code.__eq__, codes)


def assign_waves(plan: Plan, fleet: Fleet, source: str) -> list[Wave]:
    """Split the fleet into the plan's waves (one wave "all" when the plan has none).

    The pool of fleet indexes not yet in a wave is a `range` or an `array` (8 bytes a
    device), never a list of int objects."""
    if not plan.waves:
        return [Wave(0, DEFAULT_WAVE, fleet.members)]
    total = len(fleet.members)
    pool: Sequence[int] = range(total)
    waves: list[Wave] = []
    for index, section in enumerate(plan.waves):
        last = index == len(plan.waves) - 1
        size = _size(section, total, len(pool), last)
        if size > len(pool) or (size == 0 and not last):
            raise InputError(
                source,
                f"waves[{index}]",
                f"wave {section.name!r} needs {size} targets, {len(pool)} remain",
            )
        taken = _pick(section, pool, size, fleet)
        if isinstance(taken, range):  # the first targets of the pool, in order
            members = [fleet.members[item] for item in pool[: len(taken)]]
            pool = pool[len(taken) :]
        else:
            members = [fleet.members[pool[p]] for p in taken]
            keep = bytearray(b"\x01") * len(pool)
            for position in taken:
                keep[position] = 0
            pool = array("l", compress(pool, keep))
        waves.append(Wave(index, section.name, members))
    return waves


def plan_chunks(
    fleet: Fleet, waves: Sequence[Wave] | None = None, size: int = CHUNK_SIZE
) -> Iterator[Chunk]:
    if not 1 <= size <= CHUNK_SIZE:
        raise ValueError(f"a chunk holds 1 to {CHUNK_SIZE} targets")
    for wave in waves or [Wave(0, DEFAULT_WAVE, fleet.members)]:
        members = wave.members
        for index, start in enumerate(range(0, len(members), size)):
            yield Chunk(
                root_chunk_id(wave.index, index),
                fleet.kind,
                members[start : start + size],
                wave.index,
            )


def chunk_count(waves: Sequence[Wave], size: int = CHUNK_SIZE) -> int:
    return sum(-(-len(wave.members) // size) for wave in waves)


def bisect(chunk: Chunk) -> tuple[Chunk, Chunk]:
    """Split a chunk in two halves (the first half takes the odd one)."""
    if len(chunk.members) < 2:
        raise ValueError("a single-target chunk cannot be split")
    middle = (len(chunk.members) + 1) // 2
    return (
        Chunk(f"{chunk.chunk_id}.0", chunk.kind, chunk.members[:middle], chunk.wave),
        Chunk(f"{chunk.chunk_id}.1", chunk.kind, chunk.members[middle:], chunk.wave),
    )


def is_bisection_part(chunk_id: str) -> bool:
    """Whether the chunk is a half made by `bisect` (its create is the bisection's cost)."""
    return BISECTION_PART.search(chunk_id) is not None


def bisection_bound(size: int, bad: int) -> int:
    """The most creates that isolating `bad` refused targets in a chunk of `size` costs
    beyond the chunk's own create.

    Every part that holds a refused target is refused and split, and its two halves cost at
    most two creates; at depth l of the halving tree at most min(bad, 2^l) parts hold one,
    and a part of one target is not split (depth ⌈log2 size⌉). Hence
    2 · Σ_{l < ⌈log2 size⌉} min(bad, 2^l) ≤ 2 · bad · ⌈log2 size⌉ — 16 for one bad target in
    256 (12.5 on average: a left half that is accepted spares its right half's create)."""
    if bad <= 0 or size < 2:
        return 0
    depth = math.ceil(math.log2(size))
    return 2 * sum(min(bad, 1 << level) for level in range(depth))
