"""Broken plans and fleet files: exit 2, one line naming file, field and rule, nothing sent."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.simulator.testing import get_json, simulator_process

from .enginehelpers import SECRET_ENV

GOOD_ID = "6f1c1a52-8f4e-4c41-9a55-3a8a8f1b2c3d"
OTHER_ID = "0b5d3f1a-1111-4c41-9a55-3a8a8f1b2c3d"


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with simulator_process(tmp_path_factory.mktemp("sim"), "--devices", "200") as (url, _):
        yield url


def _plan(url: str, **sections: str) -> str:
    parts = {
        "top": 'name = "bad-input"',
        "platform": f'[platform]\nurl = "{url}"\nsecret_env = "{SECRET_ENV}"',
        "firmware": '[firmware]\nfile_id = "0123456789abcdef01234567"',
        "fleet": '[fleet]\ndevices_file = "fleet.txt"',
        "policy": '[policy]\nexecute_type = "now"',
    }
    parts.update(sections)
    return "\n".join(parts.values()) + "\n"


Case = tuple[str, Callable[[str], str], str, str, str]  # id, plan, fleet text, field, rule part
CASES: list[Case] = [
    ("toml-syntax", lambda u: "name = \n", GOOD_ID, "", "not valid TOML"),
    ("no-name", lambda u: _plan(u, top=""), GOOD_ID, "name", "required"),
    ("bad-name", lambda u: _plan(u, top='name = "a b"'), GOOD_ID, "name", "pattern"),
    (
        "ftp-url",
        lambda u: _plan(u, platform='[platform]\nurl = "ftp://x"\nsecret_env = "S"'),
        GOOD_ID,
        "platform.url",
        "https",
    ),
    (
        "http-remote",
        lambda u: _plan(
            u, platform='[platform]\nurl = "http://iot.example.com:8743"\nsecret_env = "S"'
        ),
        GOOD_ID,
        "platform.url",
        "loopback",
    ),
    (
        "url-with-path",
        lambda u: _plan(u, platform='[platform]\nurl = "https://h:8743/iocm"\nsecret_env = "S"'),
        GOOD_ID,
        "platform.url",
        "no path",
    ),
    (
        "rate-limit",
        lambda u: _plan(
            u, platform=f'[platform]\nurl = "{u}"\nsecret_env = "S"\nrate_limit = "100 per minute"'
        ),
        GOOD_ID,
        "platform.rate_limit",
        "CALLS/SECONDS",
    ),
    (
        "no-secret-env",
        lambda u: _plan(u, platform='[platform]\nurl = "https://h:8743"'),
        GOOD_ID,
        "platform",
        "secret_env",
    ),
    (
        "secret-in-file",
        lambda u: _plan(u, platform=f'[platform]\nurl = "{u}"\nsecret_env = "S"\nsecret = "x"'),
        GOOD_ID,
        "platform.secret",
        "Extra inputs",
    ),
    (
        "cert-without-key",
        lambda u: _plan(
            u, platform=f'[platform]\nurl = "{u}"\nsecret_env = "S"\nclient_cert = "c.pem"'
        ),
        GOOD_ID,
        "platform",
        "client_key",
    ),
    (
        "missing-ca-file",
        lambda u: _plan(
            u, platform=f'[platform]\nurl = "{u}"\nsecret_env = "S"\nca_file = "nope.pem"'
        ),
        GOOD_ID,
        "platform.ca_file",
        "does not exist",
    ),
    ("no-firmware", lambda u: _plan(u, firmware="[firmware]"), GOOD_ID, "firmware", "file_id"),
    (
        "file-id-not-hex",
        lambda u: _plan(u, firmware='[firmware]\nfile_id = "xyz"'),
        GOOD_ID,
        "firmware.file_id",
        "24-hex",
    ),
    (
        "file-id-and-lookup",
        lambda u: _plan(
            u, firmware='[firmware]\nfile_id = "0123456789abcdef01234567"\nversion = "1"'
        ),
        GOOD_ID,
        "firmware",
        "not both",
    ),
    (
        "devices-and-groups",
        lambda u: _plan(u, fleet='[fleet]\ndevices_file = "fleet.txt"\ngroups = ["north"]'),
        GOOD_ID,
        "fleet",
        "not both",
    ),
    (
        "groups-without-type",
        lambda u: _plan(u, fleet='[fleet]\ngroups = ["north"]\nmodel = "M"\nmanufacturer = "X"'),
        GOOD_ID,
        "fleet",
        "device_type",
    ),
    (
        "group-name",
        lambda u: _plan(
            u,
            fleet='[fleet]\ngroups = ["north-1"]\ndevice_type = "T"\n'
            'model = "M"\nmanufacturer = "X"',
        ),
        GOOD_ID,
        "fleet.groups",
        "letters and digits",
    ),
    (
        "execute-type",
        lambda u: _plan(u, policy='[policy]\nexecute_type = "later"'),
        GOOD_ID,
        "policy.execute_type",
        "now",
    ),
    (
        "custom-no-start",
        lambda u: _plan(u, policy='[policy]\nexecute_type = "custom"\nend = 2099-01-01T10:00:00'),
        GOOD_ID,
        "policy",
        "start and end",
    ),
    (
        "custom-in-past",
        lambda u: _plan(
            u,
            policy='[policy]\nexecute_type = "custom"\nstart = 2020-01-01T10:00:00\n'
            "end = 2020-01-01T12:00:00",
        ),
        GOOD_ID,
        "policy.start",
        "past",
    ),
    (
        "custom-short",
        lambda u: _plan(
            u,
            policy='[policy]\nexecute_type = "custom"\nstart = 2099-01-01T10:00:00\n'
            "end = 2099-01-01T10:04:59",
        ),
        GOOD_ID,
        "policy",
        "5 minutes",
    ),
    (
        "bad-zone",
        lambda u: _plan(u, policy='[policy]\ntimezone = "Mars/Olympus"'),
        GOOD_ID,
        "policy.timezone",
        "time zone",
    ),
    (
        "retry-6",
        lambda u: _plan(u, policy="[policy]\nretry = 6"),
        GOOD_ID,
        "policy.retry",
        "less than or equal to 5",
    ),
    (
        "retry-0",
        lambda u: _plan(u, policy="[policy]\nretry = 0"),
        GOOD_ID,
        "policy.retry",
        "greater than or equal to 1",
    ),
    (
        "typo-key",
        lambda u: _plan(u, policy="[policy]\nretries = 3"),
        GOOD_ID,
        "policy.retries",
        "Extra inputs",
    ),
    (
        "fleet-missing",
        lambda u: _plan(u, fleet='[fleet]\ndevices_file = "nope.txt"'),
        GOOD_ID,
        "fleet.devices_file",
        "not an existing file",
    ),
    ("fleet-empty", _plan, "\n\n", "fleet.txt", "empty"),
    ("fleet-duplicate", _plan, f"{GOOD_ID}\n{OTHER_ID}\n{GOOD_ID}\n", "line 3", "twice"),
    ("fleet-space", _plan, f"{GOOD_ID}\nbad id\n", "line 2", "spaces"),
    ("csv-no-column", _plan, "id,model\nx,y\n", "header", "deviceId"),
    ("csv-empty-cell", _plan, f"deviceId,model\n{GOOD_ID},m\n,m\n", "line 3", "empty"),
    ("fleet-not-utf8", _plan, "\udcff", "fleet.txt", "UTF-8"),
]


def _write(directory: Path, plan: str, fleet: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fleet.txt").write_bytes(fleet.encode("utf-8", "surrogateescape"))
    path = directory / "plan.toml"
    path.write_text(plan)
    return path


def _assert_one_line_exit_2(result: object, path: Path, field: str, rule: str) -> None:
    code = result.exit_code
    err = result.stderr.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(path.parent) in err and field in err and rule in err, err


@pytest.mark.parametrize(
    ("plan_maker", "fleet", "field", "rule"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
@pytest.mark.parametrize("command", ["plan", "run"])
def test_bad_input_exits_2_with_one_line(
    sim_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    plan_maker: Callable[[str], str],
    fleet: str,
    field: str,
    rule: str,
) -> None:
    """Each broken plan or fleet file: exit 2, one line with file, field and rule, 0 calls."""
    monkeypatch.setenv(SECRET_ENV, "demo-secret")
    monkeypatch.chdir(tmp_path)
    before = get_json(sim_url + "/_sim/stats")["total_calls"]
    path = _write(tmp_path / "case", plan_maker(sim_url), fleet)
    result = CliRunner().invoke(main, [command, str(path)])
    _assert_one_line_exit_2(result, path, field, rule)
    assert get_json(sim_url + "/_sim/stats")["total_calls"] == before
    assert not (tmp_path / ".rollout").exists() or command == "run"


def test_missing_plan_file(tmp_path: Path) -> None:
    """A plan path that does not exist: exit 2, one line."""
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "nope.toml")])
    _assert_one_line_exit_2(result, tmp_path / "nope.toml", "", "cannot read")


def test_unset_secret_variable_fails_before_any_call(
    sim_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` with the secret's environment variable unset: exit 2, nothing sent."""
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    before = get_json(sim_url + "/_sim/stats")["total_calls"]
    path = _write(tmp_path / "case", _plan(sim_url), GOOD_ID + "\n")
    result = CliRunner().invoke(main, ["run", str(path)])
    _assert_one_line_exit_2(result, path, "platform.secret_env", SECRET_ENV)
    assert get_json(sim_url + "/_sim/stats")["total_calls"] == before


def test_unknown_package_is_bad_input_and_creates_nothing(
    sim_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fileId the platform does not know: exit 2 after the lookup, no task created."""
    monkeypatch.setenv(SECRET_ENV, "demo-secret")
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "case", _plan(sim_url), GOOD_ID + "\n")
    result = CliRunner().invoke(main, ["--log-level", "warning", "run", str(path)])
    _assert_one_line_exit_2(result, path, "firmware.file_id", "no package")
    assert get_json(sim_url + "/_sim/stats")["tasks_created"] == 0


TOML_VALUES = st.one_of(
    st.integers(-10, 10**6),
    st.text(max_size=30),
    st.booleans(),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=8), max_size=3),
    st.just("2099-01-01T10:00:00"),
)
FIELDS = [
    ("", "name"),
    ("platform", "url"),
    ("platform", "rate_limit"),
    ("platform", "secret_env"),
    ("platform", "app_id"),
    ("firmware", "file_id"),
    ("firmware", "version"),
    ("fleet", "devices_file"),
    ("fleet", "groups"),
    ("policy", "execute_type"),
    ("policy", "retry"),
    ("policy", "start"),
    ("policy", "end"),
    ("policy", "timezone"),
    ("execution", "concurrency"),
    ("policy", "bogus"),
]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", value):
        return value
    escaped = str(value).encode("unicode_escape").decode().replace('"', '\\"')
    return f'"{escaped}"'


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutations=st.lists(st.tuples(st.sampled_from(FIELDS), TOML_VALUES), min_size=1, max_size=3))
def test_fuzzed_plans_fail_cleanly(
    tmp_path: Path, mutations: list[tuple[tuple[str, str], object]]
) -> None:
    """Randomly broken plans give exit 0 or exit 2 with one line — never a traceback."""
    sections: dict[str, dict[str, str]] = {
        "": {"name": '"fuzz"'},
        "platform": {"url": '"https://h:8743"', "secret_env": '"S"'},
        "firmware": {"file_id": '"0123456789abcdef01234567"'},
        "fleet": {"devices_file": '"fleet.txt"'},
        "policy": {},
        "execution": {},
    }
    for (section, key), value in mutations:
        sections[section][key] = _toml_value(value)
    text = "\n".join(
        ("" if not name else f"[{name}]\n") + "\n".join(f"{k} = {v}" for k, v in body.items())
        for name, body in sections.items()
    )
    path = _write(tmp_path / "fuzz", text, GOOD_ID + "\n")
    result = CliRunner().invoke(main, ["plan", str(path)])
    err = result.stderr.strip()
    assert result.exit_code in (0, 2), (text, err, result.exception)
    assert "Traceback" not in err
    if result.exit_code == 2:
        assert len(err.splitlines()) == 1 and str(path) in err, (text, err)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["status"], "Missing argument 'PLAN'"),
        (["report", "p.toml", "--format", "pdf"], "'--format'"),
        (["retry", "p.toml", "--states", "often"], "not often"),
        (["run", "p.toml", "--bogus"], "No such option '--bogus'"),
        (["rollback", "p.toml"], "No such command 'rollback'"),
        (["--log-level", "loud", "status", "p.toml"], "'--log-level'"),
    ],
)
def test_click_usage_errors_are_one_line(args: list[str], named: str) -> None:
    """A usage error of any command (missing argument, bad value, unknown option or command)
    is one line naming what is wrong and the command, exit 2 — not click's three lines."""
    result = CliRunner().invoke(main, args)
    err = result.stderr.strip()
    assert result.exit_code == 2, err
    assert len(err.splitlines()) == 1 and named in err and "Usage:" not in err, err
    assert err.startswith("error: ")
