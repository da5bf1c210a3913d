"""The fleet file: one device ID per line, or a CSV with a `deviceId` column.

Read streaming, never whole, in the dialects operators produce: UTF-8 (with or without a BOM) or
UTF-16 with its BOM (Excel's "Unicode text"); fields separated by `,`, `;` (Excel in many
locales) or a tab, sniffed from the header; the `deviceId` header recognised in any of them
and in any letter case; lines ending in LF, CRLF or CR alone (old Mac). Checked for the
faults an operator makes — an empty file, blank or duplicate IDs (also in two letter cases),
a missing column, a row with more fields than the header, an opening quote never closed (the
line it opened on is named), an unreadable file, a header line where an ID should be, an ID
holding a space, the field separator, a control character or an invisible one (zero-width
space, no-break space, BOM, …) — each refused with its line number;
fingerprinted so a changed file is noticed on resume.

Only what the plan uses is kept: the IDs (one `str` each, shared by the waves, the chunks
and the census) and the CSV columns asked for, as small-int codes into their distinct values.
A million UUIDs with two such columns take about 100 bytes a device (`bench/plan_scale.py`).
"""

from __future__ import annotations

import codecs
import csv
import gc
import hashlib
import re
import unicodedata
from array import array
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, islice, repeat
from operator import itemgetter
from pathlib import Path
from typing import IO, TYPE_CHECKING, overload

from .errors import InputError

if TYPE_CHECKING:
    from _csv import Reader as _Reader

MAX_DEVICE_ID = 256
ID_COLUMN = "deviceId"
DELIMITERS = (",", ";", "\t")
SNIFF_LINES = 20
HEAD_BYTES = 1 << 16  # the encoding and the line ending are decided on the file's start
READ_BYTES = 1 << 20
READ_ROWS = 4096  # CSV rows taken through the fast passes together
CHECK_BLOCK = 4096  # IDs checked together (one C-speed pass each), then one by one if needed
# what is trimmed around an ID: ASCII blanks and line ends only — a no-break or other odd
# space around an ID is refused like one inside it (it is a different ID to the platform)
TRIM = " \t\r\n"
# names an export gives the ID column or a header line (compared lower-case, letters and
# digits only): such a value where an ID should be is a header, not a device
HEADER_WORDS = frozenset(
    {"deviceid", "deviceids", "device", "devices", "id", "ids", "imei", "nodeid", "serial"}
)
# an ID that may be a header word: short and without a digit (no header word has one)
_MAYBE_HEADER = re.compile(r"^[^\d\n]{1,16}$", re.MULTILINE)
# a line end inside an ID cell: only a quote that opened and never closed puts it there (csv
# takes the line end off an unquoted cell)
_QUOTED_LINE_END = re.compile(r"[\r\n]")


class Column(Sequence[str]):
    """One CSV column, a value per device in fleet order, kept as small-int codes into the
    column's distinct values (`codes[i]` indexes `values`): a million devices in five regions
    take one byte each."""

    __slots__ = ("codes", "values")

    def __init__(self, codes: array[int], values: Sequence[str]) -> None:
        self.codes = codes
        self.values = tuple(values)

    @classmethod
    def of(cls, cells: Iterable[str]) -> Column:
        """A column from its cells (tests and small fleets)."""
        table: dict[str, int] = {}
        codes = array("I", (table.setdefault(cell, len(table)) for cell in cells))
        return cls(_narrow(codes, len(table)), list(table))

    def __len__(self) -> int:
        return len(self.codes)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self.values[code] for code in self.codes[index]]
        return self.values[self.codes[index]]

    def __iter__(self) -> Iterator[str]:
        return map(self.values.__getitem__, self.codes)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Column):
            return list(self) == list(other)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable codes: not hashable, like a list

    def __repr__(self) -> str:
        return f"Column({len(self)} cells, {len(self.values)} distinct)"

    def kept(self, keep: Sequence[int]) -> Column:
        """The cells whose `keep` flag is true, in order."""
        return Column(array(self.codes.typecode, compress(self.codes, keep)), self.values)


@dataclass(frozen=True)
class Fleet:
    """Targets in file order: device IDs, or group names."""

    kind: str  # "devices" | "groups"
    members: list[str]
    sha256: str
    source: str
    attributes: dict[str, Column] = field(default_factory=dict)  # CSV columns asked for

    def without(self, left_out: Collection[str]) -> Fleet:
        """The same fleet file without some targets (its fingerprint stays the file's)."""
        return self.kept(bytes(member not in left_out for member in self.members))

    def kept(self, keep: Sequence[int]) -> Fleet:
        """The targets whose `keep` flag (one per target, in order) is true, with their
        cells; the fingerprint stays the file's."""
        return Fleet(
            self.kind,
            list(compress(self.members, keep)),
            self.sha256,
            self.source,
            {name: column.kept(keep) for name, column in self.attributes.items()},
        )

    @classmethod
    def of_groups(cls, groups: list[str]) -> Fleet:
        digest = hashlib.sha256("\n".join(groups).encode()).hexdigest()
        return cls("groups", list(groups), digest, "plan groups")


def read_fleet_file(path: Path, columns: Sequence[str] = ()) -> Fleet:
    """Read a fleet file; `columns` are CSV columns to keep (e.g. for stratified waves).

    Streamed: the file is read twice in blocks (once for its SHA-256, once through the csv
    module), never held whole; only the IDs and the asked columns' codes stay. Raises
    InputError (one line: the file, `line N`, the rule) for every fault the module docstring
    lists.

    Device IDs that differ only in letter case are refused as a likely duplicate: platform-api.md
    (§1, IDs) says deviceIds are UUIDs, which name the same device in either case (RFC 4122),
    and does not say whether the platform compares them case-sensitively — sent twice, one
    device may land in two tasks; refused, the operator fixes one line.
    """
    source = str(path)
    digest, head = _scan(path, source)
    encoding = _encoding(head, source)
    where = _Where(path, encoding, _newline(head, encoding))
    collecting = gc.isenabled()
    gc.disable()  # millions of short-lived row lists and no cycle: 0.2 s of 1.7 at 10⁶ rows
    try:
        with path.open(encoding=encoding, newline=where.newline) as handle:
            ids, attributes = _read(handle, where, columns)
    except UnicodeDecodeError:
        if encoding == "utf-8-sig":
            raise InputError(
                source, "", "the fleet file is not UTF-8 (nor UTF-16 with a BOM): save it as UTF-8"
            ) from None
        raise InputError(
            source, "", f"the fleet file starts as {encoding.upper()} but is not"
        ) from None
    except OSError as exc:
        raise InputError(source, "", f"cannot read the fleet file: {exc.strerror}") from None
    finally:
        if collecting:
            gc.enable()
    if not ids:
        raise InputError(source, ID_COLUMN, "the fleet file lists no device")
    _check_ids(ids, where)
    _check_unique(ids, where)
    return Fleet("devices", ids, digest, source, attributes)


@dataclass
class _Where:
    """How the file is read, and the line of each ID — worked out only for a refusal, by
    reading the file again, so that a million IDs need no line number each."""

    path: Path
    encoding: str
    newline: str  # "\n", or "\r" for a file whose lines end with CR alone
    delimiter: str | None = None  # None: one ID a line
    column: int = 0  # the deviceId column of a CSV
    numbers: array[int] | None = None

    @property
    def source(self) -> str:
        return str(self.path)

    def line(self, index: int) -> int:
        """The line of the ID at `index` (0 for the first)."""
        if self.numbers is None:
            self.numbers = self._numbers()
        return self.numbers[index] if index < len(self.numbers) else 0

    def refuse(self, index: int, problem: str) -> InputError:
        """The refusal of the ID at `index`, naming its line."""
        return InputError(self.source, f"line {self.line(index)}", problem)

    def _numbers(self) -> array[int]:
        """The line of each ID (a row that is not blank), as `_read` takes them."""
        numbers = array("I")
        with self.path.open(encoding=self.encoding, newline=self.newline) as handle:
            lines = _lines(handle, self.newline, self.source)
            if self.delimiter is None:
                numbers.extend(n for n, line in enumerate(lines, start=1) if line.strip(TRIM))
                return numbers
            reader = csv.reader(lines, delimiter=self.delimiter)
            for row in reader:  # the header
                if any(cell.strip() for cell in row):
                    break
            column = self.column
            try:
                start = reader.line_num + 1
                for row in reader:  # a row's own line: where it starts (a quote may run on)
                    if (column < len(row) and row[column].strip(TRIM)) or any(
                        cell.strip() for cell in row
                    ):
                        numbers.append(start)
                    start = reader.line_num + 1
            except csv.Error:
                pass  # past the rows read the first time
        return numbers


def _scan(path: Path, source: str) -> tuple[str, bytes]:
    """The file's SHA-256 and its first bytes, read in blocks."""
    digest = hashlib.sha256()
    head = b""
    try:
        with path.open("rb") as handle:
            while block := handle.read(READ_BYTES):
                if len(head) < HEAD_BYTES:
                    head += block[: HEAD_BYTES - len(head)]
                digest.update(block)
    except OSError as exc:
        raise InputError(source, "", f"cannot read the fleet file: {exc.strerror}") from None
    return digest.hexdigest(), head


def _encoding(head: bytes, source: str) -> str:
    """UTF-8 (a BOM is dropped) or UTF-16/32 with a BOM; UTF-16 without one is refused,
    naming what to do."""
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if head.startswith(bom):
            return encoding
    sample = head[:4096]
    if sample.count(0) * 4 >= len(sample) > 0:  # ASCII in UTF-16: every other byte is NUL
        raise InputError(
            source,
            "",
            "the fleet file looks like UTF-16 without a byte-order mark: save it "
            "as UTF-8 (or as UTF-16 with its BOM)",
        )
    return "utf-8-sig"


def _newline(head: bytes, encoding: str) -> str:
    """What ends a line: LF (a CRLF's CR is then the csv module's, a CR elsewhere is refused),
    or CR alone when the file's start holds a CR and no LF (old Mac)."""
    text = head.decode(encoding, errors="ignore")  # a character cut at the end is no matter
    return "\r" if "\r" in text and "\n" not in text else "\n"


def _lines(handle: IO[str], newline: str, source: str) -> Iterator[str]:
    """The file's lines; in a CR-ended file, an LF is refused (two kinds of line ending)."""
    return iter(handle) if newline == "\n" else _cr_lines(handle, source)


def _cr_lines(handle: IO[str], source: str) -> Iterator[str]:
    for number, line in enumerate(handle, start=1):
        if "\n" in line:  # a CRLF's LF starts the next piece: the CR's line is named
            raise InputError(
                source,
                f"line {max(number - line.startswith(chr(10)), 1)}",
                "a line feed in a file whose lines end with a carriage return: save the "
                "file with one kind of line ending",
            )
        yield line


def _read(
    handle: IO[str], where: _Where, columns: Sequence[str]
) -> tuple[list[str], dict[str, Column]]:
    """The IDs and the asked columns, from the open file."""
    source = where.source
    lines = _lines(handle, where.newline, source)
    head: list[str] = []
    first: str | None = None
    for line in lines:
        head.append(line)
        if line.strip(TRIM):
            first = line
            break
    if first is None:
        raise InputError(source, "", "the fleet file is empty")
    for line in lines:
        head.append(line)
        if len(head) >= SNIFF_LINES:
            break
    # a last line without its line end gets one: an unclosed quote there then holds a line
    # end like one opened earlier (csv ends a quoted field silently at the end of the input)
    stream = chain(head, lines, ("\n" if where.newline == "\n" else "\r",))
    delimiter = _delimiter(head, first)
    if delimiter is not None or _is_id_header(first):
        where.delimiter = delimiter or ","
        return _csv_ids(stream, where, columns)
    if columns:
        raise InputError(source, columns[0], "a column named by the plan needs a CSV fleet file")
    return list(filter(None, map(str.strip, stream, repeat(TRIM)))), {}


def _delimiter(lines: list[str], first: str) -> str | None:
    """The field separator among `,` `;` and tab, from the header line (None: one column).
    When the header holds several, the sniffer decides on the first lines, else the most
    frequent in the header."""
    present = [d for d in DELIMITERS if d in first]
    if len(present) <= 1:
        return present[0] if present else None
    sample = "\n".join(line.rstrip("\r\n") for line in lines[:SNIFF_LINES] if line.strip(TRIM))
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


def _check_ids(ids: list[str], where: _Where) -> None:
    """Each ID against `_id_problem`, a block at a time: a block passes in a few C-speed
    passes, and only a block that may hold a fault is looked at ID by ID. In a CSV, an ID
    holding the field separator is refused too: a deviceId is a UUID (platform-api.md §1), so
    the separator there is a quote gone wrong, not part of an ID."""
    separator = where.delimiter
    for start in range(0, len(ids), CHECK_BLOCK):
        block = ids[start : start + CHECK_BLOCK]
        flat = "".join(block)
        lengths = list(map(len, block))
        if (
            flat.isprintable()
            and " " not in flat
            and (separator is None or separator not in flat)
            and max(lengths) <= MAX_DEVICE_ID
            and (min(lengths) > 16 or _MAYBE_HEADER.search("\n".join(block)) is None)
        ):
            continue
        for offset, device_id in enumerate(block):
            problem = _id_problem(device_id)
            if problem is None and separator is not None and separator in device_id:
                shown = "a tab" if separator == "\t" else f"the field separator {separator!r}"
                problem = (
                    f"device ID {device_id[:40]!r} holds {shown} (a quoted field, or a quote "
                    "never closed): device IDs are UUIDs"
                )
            if problem is not None:
                raise where.refuse(start + offset, problem)


def _check_unique(ids: list[str], where: _Where) -> None:
    """No ID twice, nor twice in two letter cases (see `read_fleet_file`)."""
    if len(set(ids)) != len(ids):
        first: dict[str, int] = {}
        for index, device_id in enumerate(ids):
            if device_id in first:
                lines = f"lines {where.line(first[device_id])} and {where.line(index)}"
                raise where.refuse(index, f"device {device_id} is listed twice ({lines})")
            first[device_id] = index
    if not _both_cases(ids):
        return  # IDs that differ only in case need an upper- and a lower-case letter
    folded: set[str] = set()  # a lower-case ID is its own key: no second string for it
    for index, device_id in enumerate(ids):
        key = device_id.lower()
        if key not in folded:
            folded.add(key if key != device_id else device_id)
            continue
        earlier = next(i for i, other in enumerate(ids) if other.lower() == key)
        lines = f"lines {where.line(earlier)} and {where.line(index)}"
        raise where.refuse(
            index,
            f"device {device_id} is listed twice, in two letter cases ({lines}: "
            f"{ids[earlier]}): device IDs are UUIDs, the same in either case — keep one",
        )


def _both_cases(ids: list[str]) -> bool:
    """Whether the IDs hold an upper-case letter and a lower-case one."""
    upper = lower = False
    for start in range(0, len(ids), CHECK_BLOCK):
        text = "".join(ids[start : start + CHECK_BLOCK])
        # bytes' case tests read ASCII only, ten times faster: used when that is all there is
        flat: str | bytes = text.encode() if text.isascii() else text
        if flat.islower():  # cased letters, all lower-case
            lower = True
        elif flat.isupper():
            upper = True
        elif flat.lower() != flat:  # both in this block (else: no cased letter)
            return True
        if upper and lower:
            return True
    return False


def _coded(cells: list[str], raw: dict[str, int], table: dict[str, int]) -> list[int]:
    """The codes of a batch's cells of one column; a cell not seen before gets the code of its
    trimmed value (a new one: the next code, in order of first appearance) — a Python step
    per new cell only, the rest C-speed passes."""
    try:
        return list(map(raw.__getitem__, cells))
    except KeyError:  # new values: each coded once, in order, the known ones in C passes
        new = set(cells).difference(raw)
        for cell in filter(new.__contains__, cells):
            if cell not in raw:
                raw[cell] = table.setdefault(cell.strip(), len(table))
        return list(map(raw.__getitem__, cells))


def _narrow(codes: array[int], distinct: int) -> array[int]:
    """The codes in the smallest unsigned type that holds them."""
    for typecode in ("B", "H"):
        if distinct <= 1 << (8 * array(typecode).itemsize):
            return array(typecode, codes)
    return codes


def _csv_ids(
    lines: Iterator[str], where: _Where, columns: Sequence[str]
) -> tuple[list[str], dict[str, Column]]:
    assert where.delimiter is not None
    reader = csv.reader(lines, delimiter=where.delimiter)
    try:
        return _CsvRead(reader, where, columns).ids_and_columns()
    except csv.Error as exc:  # a line CSV cannot read: bad input naming it, not a traceback
        cause = (
            "a carriage return inside a field"
            if "new-line" in str(exc)
            else "a field CSV cannot read (an unclosed quote?)"
        )
        raise InputError(
            where.source,
            f"line {max(reader.line_num, 1)}",
            f"not readable as CSV: {cause}; save the file with one kind of line ending",
        ) from None


class _CsvRead:
    """The rows of a CSV fleet file, a batch of rows at a time: a batch of plain rows goes
    through C-speed passes (`map`, `itemgetter`; a column value not seen before costs one
    Python step, `_coded`), and only a batch holding a blank, short or long row or an ID cell
    with a line end in it (a quote never closed) is read row by row."""

    def __init__(self, reader: _Reader, where: _Where, columns: Sequence[str]) -> None:
        self.reader = reader
        self.where = where
        self.columns = columns
        self.ids: list[str] = []
        self.width = 0
        # per kept column: its index, its codes, raw cell → code, trimmed value → code
        self.kept: list[tuple[int, array[int], dict[str, int], dict[str, int]]] = []

    def ids_and_columns(self) -> tuple[list[str], dict[str, Column]]:
        self._header()
        ids, kept = self.ids, self.kept
        pick = itemgetter(self.where.column)
        while batch := list(islice(self.reader, READ_ROWS)):
            try:
                cells = list(map(pick, batch))
                values = list(map(str.strip, cells, repeat(TRIM)))
                if not all(values) or max(map(len, batch)) > self.width:
                    raise LookupError  # a blank row, or more fields than the header
                joined = "".join(cells)
                if "\n" in joined or "\r" in joined:
                    raise LookupError  # a line end inside an ID: a quote never closed
                coded = [
                    _coded(list(map(itemgetter(i), batch)), raw, table) for i, _, raw, table in kept
                ]
            except LookupError:  # also a short row (IndexError)
                self._rows(batch)
                continue
            ids.extend(values)
            for (_, codes, _, _), new in zip(kept, coded, strict=True):
                codes.extend(new)
        attributes = {
            name: Column(_narrow(codes, len(table)), list(table))
            for name, (_, codes, _, table) in zip(self.columns, kept, strict=True)
        }
        return ids, attributes

    def _header(self) -> None:
        header: list[str] = []
        for header in self.reader:
            if any(cell.strip() for cell in header):
                break
        names = [name.strip() for name in header]
        normal = [_normal(name) for name in names]
        if _normal(ID_COLUMN) not in normal:
            delimiter = self.where.delimiter
            shown = "tab" if delimiter == "\t" else repr(delimiter)
            raise InputError(
                self.where.source,
                f"line {self.reader.line_num}",
                f"a CSV fleet file needs a {ID_COLUMN} column in its header "
                f"(read with {shown} between fields: {', '.join(names)[:80]})",
            )
        self.where.column = normal.index(_normal(ID_COLUMN))
        for wanted in self.columns:
            if wanted not in names:
                raise InputError(
                    self.where.source, "header", f"no column {wanted!r} (the plan names it)"
                )
        self.width = len(header)
        self.kept = [(names.index(name), array("I"), {}, {}) for name in self.columns]

    def _rows(self, batch: list[list[str]]) -> None:
        """A batch row by row: blank rows skipped, faults refused, new values coded."""
        column, width, ids = self.where.column, self.width, self.ids
        for row in batch:
            cell = row[column] if column < len(row) else ""
            value = cell.strip(TRIM)
            if _QUOTED_LINE_END.search(cell) is not None:
                raise self.where.refuse(
                    len(ids),
                    "an opening quote is never closed (the ID runs on over the next lines): "
                    "close it or remove it",
                )
            if not value:
                if not any(cell.strip() for cell in row):
                    continue  # a blank line, or only separators
                raise self.where.refuse(len(ids), f"the {ID_COLUMN} cell is empty")
            if len(row) > width and any(cell.strip() for cell in row[width:]):
                raise self.where.refuse(
                    len(ids),
                    f"{len(row)} fields where the header has {width}: a separator inside a "
                    "field must be quoted",
                )
            ids.append(value)
            for index, codes, raw, table in self.kept:
                cell = row[index] if index < len(row) else ""
                code = raw.get(cell)
                if code is None:
                    code = raw[cell] = table.setdefault(cell.strip(), len(table))
                codes.append(code)
