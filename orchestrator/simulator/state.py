"""The simulator's state on disk: `rollout simulator --state FILE` survives a restart.

Saved as JSON, atomically (a temporary file, fsync, rename): every task as created (targets,
policy, device IDs, package, createTime, window), the device groups with their members, the
packages not deleted, the tokens in force with their lifetimes left, the flow-control windows,
the simulated clock, the counters (calls, replies, throttled, tasks created, logins, faults
injected). Ids come from fresh entropy at every start (never from a saved generator state),
so a restarted simulator never issues an operationId it issued before. Not saved: the fault
knobs (the flags of the new start apply) and creates still waiting for a late commit
(`late_commit_s`): they are lost with the process, like creates a platform had not committed
when it went down.

What derives from the saved data — each device's path through its tasks, the versions — is
computed again, in creation order, the first time anyone looks, so the restarted platform
answers as the old one would have.

The downtime passes for the platform: its simulated clock goes on from the saved instant at
`--speed`, tokens age, the flow-control window moves on.

`SimulatorServer` loads the file on start (a missing file: a fresh platform), saves it within
`state_every` seconds of any change and on shutdown. Each task is also appended to a create
log beside it (`<file>.creates`, one JSON line, fsync) the moment it is committed, before
the create is answered, and the log is emptied by each full save: a task the platform
acknowledged is never lost, whatever kills the process. A SIGKILL loses at most
`state_every` of counters, tokens and group changes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_VERSION = 1


class StateError(ValueError):
    """The state file cannot be used: unreadable, not a state file, or another fleet's."""


def fleet_key(
    devices: int,
    seed: int,
    app_id: str,
    failure_rate: float | None,
    models: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """What makes the generated fleet: a state file only fits a simulator with the same.
    `models` is in the key only when set, so files saved before `--model` still fit."""
    key: dict[str, Any] = {
        "devices": devices,
        "seed": seed,
        "app_id": app_id,
        "failure_rate": failure_rate,
    }
    if models is not None:
        key["models"] = list(models)
    return key


def creates_log(path: Path) -> Path:
    """The create log beside the state file `path`."""
    return path.with_name(path.name + ".creates")


def append_create(path: Path, row: dict[str, Any]) -> None:
    """Append one committed task (platform.task_row) to the create log of state file `path`
    and fsync it. Raises OSError when it cannot be written."""
    line = json.dumps(row, separators=(",", ":")) + "\n"
    with creates_log(path).open("a", encoding="utf-8") as out:
        out.write(line)
        out.flush()
        os.fsync(out.fileno())


def _logged_creates(path: Path) -> list[dict[str, Any]]:
    """The tasks in the create log (a last line cut by a crash is no task: it was never
    answered)."""
    try:
        lines = creates_log(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StateError(f"cannot read its create log: {exc.strerror}") from None
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("operation_id"), str):
            rows.append(row)
    return rows


def read_state(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state with the create log's tasks added, or None when the file does not
    exist yet. Raises StateError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read it: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise StateError("not a simulator state file (not JSON)") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise StateError(f"not a simulator state file of version {STATE_VERSION}")
    if data.get("fleet") != key:
        saved = data.get("fleet") or {}
        raise StateError(
            f"saved by a simulator of {saved.get('devices')} devices, seed {saved.get('seed')}, "
            f"app {saved.get('app_id')!r}, failure rate {saved.get('failure_rate')}, models "
            f"{saved.get('models') or 'all'}: start it with the same --devices, --seed, "
            "--app-id, --failure-rate and --model, or use another file"
        )
    platform = data["platform"]
    known = {row["operation_id"] for row in platform["tasks"]}
    for row in _logged_creates(path):
        if row["operation_id"] not in known:
            known.add(row["operation_id"])
            platform["tasks"].append(row)
            platform["stats"]["tasks_created"] = int(platform["stats"]["tasks_created"]) + 1
    return data


def simulated_now(data: dict[str, Any], speed: float) -> float:
    """The simulated time now, had the platform kept running at `speed` since the save."""
    return float(data["clock"]) + max(0.0, time.time() - float(data["saved_at"])) * speed


def elapsed_since(data: dict[str, Any]) -> float:
    """Real seconds since the state was saved."""
    return max(0.0, time.time() - float(data["saved_at"]))


def write_state(path: Path, key: dict[str, Any], clock: float, platform: dict[str, Any]) -> None:
    """Write the state atomically: a crash mid-write leaves the previous file. Then empty
    the create log: every task in it is in the file now."""
    data = {
        "version": STATE_VERSION,
        "saved_at": time.time(),
        "fleet": key,
        "clock": clock,
        "platform": platform,
    }
    directory = path.parent
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    creates_log(path).unlink(missing_ok=True)
