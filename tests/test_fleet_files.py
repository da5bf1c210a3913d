"""Fleet files in the dialects operators produce: Excel's `;` and tab exports, UTF-16,
headers in any letter case — read right, or refused with the line that is wrong."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.errors import InputError
from orchestrator.fleet import read_fleet_file

A = "6f1c1a52-8f4e-4c41-9a55-3a8a8f1b2c3d"
B = "0b5d3f1a-1111-4c41-9a55-3a8a8f1b2c3d"
C = "77777777-2222-4c41-9a55-3a8a8f1b2c3d"

READ: list[tuple[str, bytes]] = [
    ("one-per-line", f"{A}\n{B}\n{C}\n".encode()),
    ("one-column-with-header", f"deviceId\n{A}\n{B}\n{C}\n".encode()),
    ("one-column-header-any-case", f"DEVICE_ID\n{A}\n{B}\n{C}\n".encode()),
    ("comma", f"deviceId,region\n{A},north\n{B},south\n{C},east\n".encode()),
    (
        "semicolon-excel",
        f"Region;DeviceId;Model\nnorth;{A};WM\nsouth;{B};WM\neast;{C};WM\n".encode(),
    ),
    ("tab", f"region\tdeviceId\nnorth\t{A}\nsouth\t{B}\neast\t{C}\n".encode()),
    ("crlf-and-blank-lines", f"deviceId;region\r\n{A};n\r\n\r\n{B};s\r\n{C};e\r\n".encode()),
    ("quoted-fields", f'"deviceId";"note"\n"{A}";"a; b"\n"{B}";"c"\n"{C}";"d"\n'.encode()),
    ("utf8-bom", b"\xef\xbb\xbf" + f"deviceId;region\n{A};n\n{B};s\n{C};e\n".encode()),
    (
        "utf16-le-bom",
        f"\ufeffdeviceId\tregion\r\n{A}\tn\r\n{B}\ts\r\n{C}\te\r\n".encode("utf-16-le"),
    ),
    ("utf16-be-bom", f"\ufeffdeviceId;region\n{A};n\n{B};s\n{C};e\n".encode("utf-16-be")),
    ("semicolons-in-a-comma-file", f"deviceId,note\n{A},x;y\n{B},x;y\n{C},z\n".encode()),
    ("cr-only-line-ends", f"deviceId,model\r{A},m\r{B},m\r{C},m\r".encode()),
]


@pytest.mark.parametrize("data", [case[1] for case in READ], ids=[case[0] for case in READ])
def test_each_dialect_reads_the_three_devices(tmp_path: Path, data: bytes) -> None:
    """Every dialect gives exactly the three device IDs, header never taken as a device."""
    path = tmp_path / "fleet.csv"
    path.write_bytes(data)
    assert read_fleet_file(path).members == [A, B, C]


def test_a_stratify_column_is_read_from_a_semicolon_file(tmp_path: Path) -> None:
    """Columns asked for (stratified waves) come from a `;` file too."""
    path = tmp_path / "fleet.csv"
    path.write_bytes(f"deviceId;region\n{A};north\n{B};south\n{C};north\n".encode())
    assert read_fleet_file(path, ["region"]).attributes == {"region": ["north", "south", "north"]}


REFUSED: list[tuple[str, bytes, str]] = [
    ("header-word-mid-file", f"{A}\ndeviceId\n{B}\n".encode(), "line 2: 'deviceId' looks like"),
    ("imei-header-one-column", f"IMEI\n{A}\n".encode(), "line 1: 'IMEI' looks like a column"),
    ("zero-width-joiner", f"{A}\n{B}\u200d\n".encode(), "line 2: device ID"),
    ("bom-mid-file", f"{A}\n\ufeff{B}\n".encode(), "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
    ("nul-byte", f"deviceId;x\n{A};1\n{B}\x00;2\n".encode(), "line 3: device ID"),
    ("utf16-without-bom", f"{A}\n{B}\n".encode("utf-16-le"), "UTF-16 without a byte-order"),
    ("latin-1", "deviceId\nstraße-1\n".encode("latin-1"), "not UTF-8 (nor UTF-16 with a BOM)"),
    ("semicolon-no-id-column", b"serial;model\nx;y\n", "line 1: a CSV fleet file needs"),
    ("stray-cr-in-a-line", f"deviceId,group\n{A},no\rrth\n{B},s\n".encode(), "line 2: not"),
    (
        "unclosed-quote-on-the-last-line",
        f'deviceId,group\n{A},north\n"{B},north\n'.encode(),
        "line 3: an opening quote is never closed",
    ),
    (
        "unclosed-quote-at-the-end-without-line-end",
        f'deviceId,group\n{A},north\n"{B},north'.encode(),
        "line 3: an opening quote is never closed",
    ),
    (
        "unclosed-quote-mid-file",
        f'deviceId,group\n{A},north\n"{B},north\n{C},south\n'.encode(),
        "line 3: an opening quote is never closed",
    ),
    (
        "unclosed-quote-closed-later-past-many-rows",
        (
            'deviceId,group\n"x-0,n\n' + "".join(f"x-{i},n\n" for i in range(1, 5000)) + 'x",n\n'
        ).encode(),
        "line 2: an opening quote is never closed",
    ),
    (
        "separator-inside-a-quoted-id",
        f'deviceId;group\n{A};north\n"{B};x";north\n'.encode(),
        "line 3: device ID '0b5d3f1a-1111-4c41-9a55-3a8a8f1b2c3d;x' holds the field separator",
    ),
]


@pytest.mark.parametrize(
    ("data", "rule"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_each_bad_fleet_is_refused_naming_the_line(tmp_path: Path, data: bytes, rule: str) -> None:
    """A header where an ID belongs, an invisible or control character, an unknown encoding:
    InputError naming the file and the line."""
    path = tmp_path / "fleet.csv"
    path.write_bytes(data)
    with pytest.raises(InputError) as caught:
        read_fleet_file(path)
    assert rule in str(caught.value) and str(path) in str(caught.value)


def test_rollout_plan_counts_a_semicolon_fleet_without_its_header(tmp_path: Path) -> None:
    """The reported bug: a `;` CSV no longer counts its header line as a device."""
    (tmp_path / "fleet.csv").write_bytes(
        f"deviceId;region\n{A};north\n{B};south\n{C};east\n".encode()
    )
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'name = "semi"\n[platform]\nurl = "simulator"\n'
        '[firmware]\nfile_id = "0123456789abcdef01234567"\n'
        '[fleet]\ndevices_file = "fleet.csv"\n'
    )
    result = CliRunner().invoke(main, ["plan", "--json", str(plan)])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["targets"] == 3


def _plan(tmp_path: Path, fleet: bytes, extra: str = "") -> Path:
    (tmp_path / "fleet.csv").write_bytes(fleet)
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'name = "odd"\n[platform]\nurl = "simulator"\n'
        '[firmware]\nfile_id = "0123456789abcdef01234567"\n'
        '[fleet]\ndevices_file = "fleet.csv"\n' + extra
    )
    return plan


def _one_line_exit_2(plan: Path, rule: str) -> None:
    result = CliRunner().invoke(main, ["plan", str(plan)])
    err = result.stderr.strip()
    assert result.exit_code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(plan.parent / "fleet.csv") in err and rule in err, err


REFUSED_BY_PLAN: list[tuple[str, bytes, str]] = [
    (
        "unclosed-quote-mid-file",
        f'deviceId,group\n{A},north\n"{B},north\n{C},south\n'.encode(),
        "line 3: an opening quote is never closed",
    ),
    (
        "same-id-two-letter-cases",
        f"{A}\n{B}\n{A.upper()}\n".encode(),
        f"line 3: device {A.upper()} is listed twice, in two letter cases (lines 1 and 3",
    ),
    (
        "same-id-two-letter-cases-csv",
        f"deviceId,group\n{B.upper()},n\n{A},s\n\n{B},e\n".encode(),
        f"line 5: device {B} is listed twice, in two letter cases (lines 2 and 5",
    ),
    (
        "no-break-space-after-an-id",
        f"{A}\n{B}\u00a0\n".encode(),
        "line 2: device ID " + repr(f"{B}\u00a0") + " holds an invisible or control "
        "character (U+00A0 NO-BREAK SPACE)",
    ),
    (
        "no-break-space-before-a-csv-id",
        f"deviceId;region\n{A};n\n\u00a0{B};s\n".encode(),
        "line 3: device ID " + repr(f"\u00a0{B}") + " holds an invisible",
    ),
    (
        "ideographic-space-in-a-csv-id",
        f"deviceId,region\n{A},n\n{B}\u3000,s\n".encode(),
        "(U+3000 IDEOGRAPHIC SPACE)",
    ),
    (
        "more-fields-than-the-header",
        f"deviceId,model,group\n{A},WM-200,north\n{B},WM-200,Aqualis, Inc,south\n".encode(),
        "line 3: 5 fields where the header has 3: a separator inside a field must be quoted",
    ),
    (
        "after-a-quoted-field-over-two-lines",
        f'deviceId,note\n{A},"two\nlines"\n{B}\u200b,x\n'.encode(),
        "line 4: device ID",
    ),
    (
        "exact-duplicate-names-both-lines",
        f"deviceId\n{A}\n{B}\n\n{A}\n".encode(),
        f"line 5: device {A} is listed twice (lines 2 and 5)",
    ),
    (
        "lf-late-in-a-cr-file",  # its first 64 KB end lines with CR alone
        (
            "deviceId,model\r" + "".join(f"dev-{i:05d},m\r" for i in range(8000)) + f"{A},m\r\n"
        ).encode(),
        "line 8002: a line feed in a file whose lines end with a carriage return",
    ),
    (
        "stray-cr-in-a-one-per-line-file",
        f"{A}\r\n{B}\rX\r\n{C}\r\n".encode(),
        "line 2: device ID " + repr(f"{B}\rX") + " holds an invisible or control character",
    ),
]


@pytest.mark.parametrize(
    ("fleet", "rule"),
    [case[1:] for case in REFUSED_BY_PLAN],
    ids=[case[0] for case in REFUSED_BY_PLAN],
)
def test_an_odd_fleet_file_is_refused_in_one_line_exit_2(
    tmp_path: Path, fleet: bytes, rule: str
) -> None:
    """`rollout plan` refuses the fleet file in one line naming the file and the line, exit 2."""
    _one_line_exit_2(_plan(tmp_path, fleet), rule)


def test_a_trailing_separator_is_not_an_extra_field(tmp_path: Path) -> None:
    """A row ending in an empty extra field (a trailing separator) reads like the others."""
    path = tmp_path / "fleet.csv"
    path.write_bytes(f"deviceId,group\n{A},north,\n{B},south\n{C},east,,\n".encode())
    assert read_fleet_file(path, ["group"]).members == [A, B, C]


def test_ascii_blanks_around_an_id_are_trimmed(tmp_path: Path) -> None:
    """Spaces and tabs around an ID (a hand-edited CSV) are not part of it."""
    path = tmp_path / "fleet.csv"
    path.write_bytes(f"deviceId, group\n {A} ,north\n\t{B},south\n".encode())
    assert read_fleet_file(path).members == [A, B]


def test_the_compact_columns_round_trip(tmp_path: Path) -> None:
    """Asked columns come back cell for cell, stored as one-byte codes into their values."""
    groups = ["north", "south", " east ", "north", ""] * 40
    rows = [f"dev-{i:04d},WM-{i % 7},{group}" for i, group in enumerate(groups)]
    path = tmp_path / "fleet.csv"
    path.write_text("deviceId,model,group\n" + "\n".join(rows) + "\n")
    fleet = read_fleet_file(path, ["group", "model"])
    column = fleet.attributes["group"]
    assert list(column) == [group.strip() for group in groups]
    assert column[2] == "east" and column[3:5] == ["north", ""]
    assert column.codes.typecode == "B" and sorted(column.values) == ["", "east", "north", "south"]
    assert list(fleet.attributes["model"]) == [f"WM-{i % 7}" for i in range(len(groups))]


def test_thousands_of_rows_read_alike_in_batches(tmp_path: Path) -> None:
    """Past the first batch of rows, a blank line, a short row and a value first seen late
    read as on their own: every ID and cell in order."""
    cells = [("north", "1.0") if i % 3 else ("south", "2.0") for i in range(30_000)]
    cells[25_000] = ("far-east", "9.9")
    lines = [f"dev-{i:05d},{version},{group}" for i, (group, version) in enumerate(cells)]
    lines[10_000] += "\n"  # a blank line after it
    lines[14_000] = "dev-14000"  # no version, no group
    cells[14_000] = ("", "")
    path = tmp_path / "fleet.csv"
    path.write_text("deviceId,version,group\n" + "\n".join(lines) + "\n")
    fleet = read_fleet_file(path, ["group", "version"])
    assert fleet.members == [f"dev-{i:05d}" for i in range(30_000)]
    assert list(fleet.attributes["group"]) == [group for group, _ in cells]
    assert list(fleet.attributes["version"]) == [version for _, version in cells]


def test_many_new_values_are_coded_in_order_of_first_appearance(tmp_path: Path) -> None:
    """A column with a new value in most rows reads cell for cell, its values numbered in the
    order they first appear (as row by row)."""
    groups = [f"grp-{(i * 7919) % 20_000:05d}" for i in range(30_000)]
    path = tmp_path / "fleet.csv"
    path.write_text(
        "deviceId,group\n" + "".join(f"dev-{i:05d}, {g}\n" for i, g in enumerate(groups))
    )
    column = read_fleet_file(path, ["group"]).attributes["group"]
    assert list(column) == groups
    assert list(column.values) == list(dict.fromkeys(groups))


def test_a_fleet_without_some_devices_keeps_its_columns_aligned(tmp_path: Path) -> None:
    """`without` drops the devices and their cells together, in file order."""
    path = tmp_path / "fleet.csv"
    path.write_bytes(f"deviceId,version\n{A},1.0\n{B},2.0\n{C},1.0\n".encode())
    fleet = read_fleet_file(path, ["version"]).without({B})
    assert fleet.members == [A, C] and list(fleet.attributes["version"]) == ["1.0", "1.0"]


def test_status_and_report_do_not_read_the_fleet_file(tmp_path: Path) -> None:
    """With the fleet file gone after the run was planned, `status` and `report` still answer
    from the journal."""
    from orchestrator.engine import journal_path, start_run
    from orchestrator.journal import Journal
    from orchestrator.loaded_plan import load_plan

    plan = _plan(tmp_path, f"deviceId\n{A}\n{B}\n{C}\n".encode())
    loaded = load_plan(plan)
    journal = Journal.open(journal_path(loaded, None))
    try:
        start_run(journal, loaded)
    finally:
        journal.close()
    (tmp_path / "fleet.csv").unlink()
    status = CliRunner().invoke(main, ["status", "--json", str(plan)])
    assert status.exit_code == 0, status.stderr
    assert json.loads(status.stdout)["targets"] == 3
    report = CliRunner().invoke(main, ["report", "--format", "csv", str(plan)])
    assert report.exit_code == 0, report.stderr
    assert {row["device_id"] for row in csv.DictReader(io.StringIO(report.stdout))} == {A, B, C}
