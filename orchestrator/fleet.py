"""The fleet file: one device ID per line, or a CSV with a `deviceId` column.

Read once, checked for the faults an operator makes (empty file, blank or duplicate IDs,
a missing column, an unreadable file), fingerprinted so a changed file is noticed on resume.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

MAX_DEVICE_ID = 256
ID_COLUMN = "deviceId"


@dataclass(frozen=True)
class Fleet:
    """Targets in file order: device IDs, or group names."""

    kind: str  # "devices" | "groups"
    members: list[str]
    sha256: str
    source: str
    attributes: dict[str, list[str]] = field(default_factory=dict)  # CSV columns asked for

    def without(self, left_out: set[str]) -> Fleet:
        """The same fleet file without some targets (its fingerprint stays the file's)."""
        keep = [index for index, member in enumerate(self.members) if member not in left_out]
        return Fleet(
            self.kind,
            [self.members[index] for index in keep],
            self.sha256,
            self.source,
            {name: [values[index] for index in keep] for name, values in self.attributes.items()},
        )

    @classmethod
    def of_groups(cls, groups: list[str]) -> Fleet:
        digest = hashlib.sha256("\n".join(groups).encode()).hexdigest()
        return cls("groups", list(groups), digest, "plan groups")


def read_fleet_file(path: Path, columns: Sequence[str] = ()) -> Fleet:
    """Read a fleet file; `columns` are CSV columns to keep (e.g. for stratified waves).

    A million-device fleet must stay small in memory: the raw bytes and the text are dropped
    as soon as the IDs are out, and line numbers are worked out only for an error (by
    reading the file again).
    """
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(source, "", f"cannot read the fleet file: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(source, "", "the fleet file is not UTF-8") from None
    del data
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise InputError(source, "", "the fleet file is empty")
    is_csv = "," in first or first.strip() == ID_COLUMN
    attributes: dict[str, list[str]] = {}
    if is_csv:
        ids, attributes = _csv_ids(text, source, columns)
    elif columns:
        raise InputError(source, columns[0], "a column named by the plan needs a CSV fleet file")
    else:
        ids = [line.strip() for line in lines if line.strip()]
    del lines, text
    if not ids:
        raise InputError(source, ID_COLUMN, "the fleet file lists no device")
    for device_id in ids:
        if len(device_id) > MAX_DEVICE_ID or " " in device_id or "\t" in device_id:
            raise InputError(
                source,
                f"line {_line_of(path, device_id)}",
                f"device ID {device_id[:40]!r} has spaces or is over 256 characters",
            )
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for device_id in ids:
            if device_id in seen:
                raise InputError(
                    source,
                    f"line {_line_of(path, device_id, nth=2)}",
                    f"device {device_id} is listed twice",
                )
            seen.add(device_id)
    return Fleet("devices", ids, digest, source, attributes)


def _line_of(path: Path, needle: str, nth: int = 1) -> int:
    found = 0
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if needle in line:
                found += 1
                if found == nth:
                    return number
    return 0


def _csv_ids(
    text: str, source: str, columns: Sequence[str]
) -> tuple[list[str], dict[str, list[str]]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    names = [name.strip() for name in header]
    if ID_COLUMN not in names:
        raise InputError(source, "header", f"a CSV fleet file needs a {ID_COLUMN} column")
    column = names.index(ID_COLUMN)
    for wanted in columns:
        if wanted not in names:
            raise InputError(source, "header", f"no column {wanted!r} (the plan names it)")
    extra = {name: names.index(name) for name in columns}
    attributes: dict[str, list[str]] = {name: [] for name in columns}
    ids: list[str] = []
    for row in reader:
        if not row or not any(cell.strip() for cell in row):
            continue
        value = row[column].strip() if column < len(row) else ""
        if not value:
            raise InputError(source, f"line {reader.line_num}", f"the {ID_COLUMN} cell is empty")
        ids.append(value)
        for name, index in extra.items():
            attributes[name].append(row[index].strip() if index < len(row) else "")
    return ids, attributes
