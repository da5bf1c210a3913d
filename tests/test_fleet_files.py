"""Fleet files in the dialects operators produce: Excel's `;` and tab exports, UTF-16,
headers in any letter case — read right, or refused with the line that is wrong."""

from __future__ import annotations

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
