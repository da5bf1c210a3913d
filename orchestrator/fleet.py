"""The fleet file: one device ID per line, or a CSV with a `deviceId` column.

Read once, in the dialects operators produce: UTF-8 (with or without a BOM) or UTF-16 with
its BOM (Excel's "Unicode text"); fields separated by `,`, `;` (Excel in many locales) or a
tab, sniffed from the header; the `deviceId` header recognised in any of them and in any
letter case. Checked for the faults an operator makes — an empty file, blank or duplicate IDs,
a missing column, an unreadable file, a header line where an ID should be, an ID holding a
space, a control character or an invisible one (zero-width space, BOM, …) — each refused
with its line number; fingerprinted so a changed file is noticed on resume.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

MAX_DEVICE_ID = 256
ID_COLUMN = "deviceId"
DELIMITERS = (",", ";", "\t")
SNIFF_LINES = 20
# names an export gives the ID column or a header line (compared lower-case, letters and
# digits only): such a value where an ID should be is a header, not a device
HEADER_WORDS = frozenset(
    {"deviceid", "deviceids", "device", "devices", "id", "ids", "imei", "nodeid", "serial"}
)


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
    text = _decode(data, source)
    del data
    if "\r" in text:  # CRLF (Windows) or CR alone (old Mac) line ends; a stray CR stays
        text = text.replace("\r\n", "\n") if "\n" in text else text.replace("\r", "\n")
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise InputError(source, "", "the fleet file is empty")
    delimiter = _delimiter(lines, first)
    attributes: dict[str, list[str]] = {}
    if delimiter is not None or _is_id_header(first):
        ids, attributes = _csv_ids(text, source, columns, delimiter or ",")
    elif columns:
        raise InputError(source, columns[0], "a column named by the plan needs a CSV fleet file")
    else:
        ids = [line.strip() for line in lines if line.strip()]
    del lines, text
    if not ids:
        raise InputError(source, ID_COLUMN, "the fleet file lists no device")
    for device_id in ids:
        problem = _id_problem(device_id)
        if problem is not None:
            raise InputError(source, f"line {_line_of(path, device_id)}", problem)
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


def _decode(data: bytes, source: str) -> str:
    """UTF-8 (a BOM is dropped) or UTF-16/32 with a BOM; anything else is refused, naming
    what to do."""
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                raise InputError(
                    source, "", f"the fleet file starts as {encoding.upper()} but is not"
                ) from None
    head = data[:4096]
    if head.count(0) * 4 >= len(head) > 0:  # ASCII in UTF-16: every other byte is NUL
        raise InputError(
            source,
            "",
            "the fleet file looks like UTF-16 without a byte-order mark: save it "
            "as UTF-8 (or as UTF-16 with its BOM)",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    raise InputError(
        source, "", "the fleet file is not UTF-8 (nor UTF-16 with a BOM): save it as UTF-8"
    )


def _delimiter(lines: list[str], first: str) -> str | None:
    """The field separator among `,` `;` and tab, from the header line (None: one column).
    When the header holds several, the sniffer decides on the first lines, else the most
    frequent in the header."""
    present = [d for d in DELIMITERS if d in first]
    if len(present) <= 1:
        return present[0] if present else None
    sample = "\n".join(line for line in lines[:SNIFF_LINES] if line.strip())
    try:
        return csv.Sniffer().sniff(sample, delimiters="".join(present)).delimiter
    except csv.Error:
        return max(present, key=first.count)


def _normal(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def _is_id_header(line: str) -> bool:
    return _normal(line) == _normal(ID_COLUMN)


def _id_problem(device_id: str) -> str | None:
    """Why this is not a device ID the platform can know, or None."""
    shown = device_id[:40]
    if len(device_id) > MAX_DEVICE_ID:
        return f"device ID {shown!r}… is over {MAX_DEVICE_ID} characters"
    if " " in device_id or "\t" in device_id:
        return f"device ID {shown!r} has spaces"
    if not device_id.isprintable():  # control, format (zero-width), separator characters
        odd = next(c for c in device_id if not c.isprintable())
        name = unicodedata.name(odd, "a control character")
        return (
            f"device ID {shown!r} holds an invisible or control character "
            f"(U+{ord(odd):04X} {name}): remove it"
        )
    if len(device_id) <= 16 and _normal(device_id) in HEADER_WORDS:
        return f"{shown!r} looks like a column header, not a device ID"
    return None


def _line_of(path: Path, needle: str, nth: int = 1) -> int:
    found = 0
    text = _decode(path.read_bytes(), str(path))
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            found += 1
            if found == nth:
                return number
    return 0


def _csv_ids(
    text: str, source: str, columns: Sequence[str], delimiter: str
) -> tuple[list[str], dict[str, list[str]]]:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header: list[str] = []
    for header in _rows(reader, source):
        if any(cell.strip() for cell in header):
            break
    names = [name.strip() for name in header]
    normal = [_normal(name) for name in names]
    if _normal(ID_COLUMN) not in normal:
        shown = "tab" if delimiter == "\t" else repr(delimiter)
        raise InputError(
            source,
            f"line {reader.line_num}",
            f"a CSV fleet file needs a {ID_COLUMN} column in its header "
            f"(read with {shown} between fields: {', '.join(names)[:80]})",
        )
    column = normal.index(_normal(ID_COLUMN))
    for wanted in columns:
        if wanted not in names:
            raise InputError(source, "header", f"no column {wanted!r} (the plan names it)")
    extra = {name: names.index(name) for name in columns}
    attributes: dict[str, list[str]] = {name: [] for name in columns}
    ids: list[str] = []
    for row in _rows(reader, source):
        if not row or not any(cell.strip() for cell in row):
            continue
        value = row[column].strip() if column < len(row) else ""
        if not value:
            raise InputError(source, f"line {reader.line_num}", f"the {ID_COLUMN} cell is empty")
        ids.append(value)
        for name, index in extra.items():
            attributes[name].append(row[index].strip() if index < len(row) else "")
    return ids, attributes


def _rows(reader: Iterator[list[str]], source: str) -> Iterator[list[str]]:
    """The reader's rows; a line CSV cannot read (a carriage return inside a field, an open
    quote) is bad input naming its line, not a traceback."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            line = max(getattr(reader, "line_num", 1), 1)
            cause = (
                "a carriage return inside a field"
                if "new-line" in str(exc)
                else "a field CSV cannot read (an unclosed quote?)"
            )
            raise InputError(
                source,
                f"line {line}",
                f"not readable as CSV: {cause}; save the file with one kind of line ending",
            ) from None
        yield row
