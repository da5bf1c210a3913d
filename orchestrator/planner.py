"""Fleet → chunks of at most 256 targets, deterministically.

The same plan and the same fleet file always give the same chunks with the same IDs, so a
resumed run and the reconciliation step can rely on them. Chunks keep the fleet file's order
(operators often order a fleet by region or by risk on purpose). A chunk refused for a cause
that belongs to some of its devices is bisected; its children are named `<parent>.0` and
`<parent>.1`, which keeps the natural sort order of IDs equal to submission order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .fleet import Fleet

CHUNK_SIZE = 256


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    kind: str  # "devices" | "groups"
    members: Sequence[str]


def root_chunk_id(index: int) -> str:
    return f"{index:07d}"


def plan_chunks(fleet: Fleet, size: int = CHUNK_SIZE) -> Iterator[Chunk]:
    if not 1 <= size <= CHUNK_SIZE:
        raise ValueError(f"a chunk holds 1 to {CHUNK_SIZE} targets")
    members = fleet.members
    for index, start in enumerate(range(0, len(members), size)):
        yield Chunk(root_chunk_id(index), fleet.kind, members[start : start + size])


def chunk_count(fleet: Fleet, size: int = CHUNK_SIZE) -> int:
    return -(-len(fleet.members) // size)


def bisect(chunk: Chunk) -> tuple[Chunk, Chunk]:
    """Split a chunk in two halves (the first half takes the odd one)."""
    if len(chunk.members) < 2:
        raise ValueError("a single-target chunk cannot be split")
    middle = (len(chunk.members) + 1) // 2
    return (
        Chunk(f"{chunk.chunk_id}.0", chunk.kind, chunk.members[:middle]),
        Chunk(f"{chunk.chunk_id}.1", chunk.kind, chunk.members[middle:]),
    )
