"""A plan loaded: the checked plan file, its fleet and the waves the planner assigns.

`load_plan` is what every command that sends or reads targets starts from; commands that
only read the journal take the plan file alone (`plan.read_plan`). Data flows one way:
plan (the file's model and rules) → fleet → planner (waves) → this module.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from datetime import datetime
from itertools import compress
from pathlib import Path
from typing import Any

from .errors import InputError
from .fleet import Fleet, read_fleet_file
from .plan import INVENTORY_MODEL, Plan, check_times, read_plan_file
from .planner import assign_waves

__all__ = ["LoadedPlan", "load_following", "load_plan"]


class LoadedPlan:
    """A validated plan, its fleet, and the fingerprints the journal pins.

    `fingerprint` pins what defines the run's targets and package — the platform and app
    (the census sees one app's tasks), the fleet's targets in order, the firmware section,
    the operation, the group fleet's type/model/manufacturer and the waves' names, sizes and
    selection — and nothing else: timeouts, TLS files, rate, monitor
    settings, gates, windows, a comment or a moved start may change between `run` and
    `resume` (the engine logs what changed, from `settings`)."""

    def __init__(
        self, path: Path, plan: Plan, fleet: Fleet, plan_sha: str, *, following: bool = False
    ) -> None:
        """`following`: the fleet was not read (`load_following`): no waves, nothing to send."""
        self.path = path
        self.plan = plan
        self.plan_sha = plan_sha
        # devices the fleet file says already run the target version: left out, never sent
        self.already_current: list[tuple[str, str]] = []
        # deviceId → model, from `[fleet] inventory` (a group fleet's members; else empty)
        self.device_models: dict[str, str] = {}
        if following:
            self.fleet, self.waves = fleet, []
            return
        column, target = plan.fleet.version_column, plan.firmware.version
        if column is not None and target is not None:
            versions = fleet.attributes[column]
            if target in versions.values:  # compared by code, in C-speed passes
                code = versions.values.index(target)
                current = compress(fleet.members, map(code.__eq__, versions.codes))
                self.already_current = [(member, target) for member in current]
                fleet = fleet.kept(bytes(map(code.__ne__, versions.codes)))
            if not fleet.members:
                raise InputError(
                    str(path),
                    "fleet.version_column",
                    f"every device of the fleet file already runs {target}: nothing to send",
                )
        self.fleet = fleet
        self.waves = assign_waves(plan, fleet, str(path))

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def targets_digest(self) -> str:
        """SHA-256 of the targets in order (and of the fleet columns the waves select by):
        the fleet's contents as the run sees them, not its file's bytes — line endings, extra
        columns or a moved file change nothing."""
        digest = hashlib.sha256(self.fleet.kind.encode())
        _digest_lines(digest, self.fleet.members)
        for column in sorted({w.stratify_by for w in self.plan.waves if w.stratify_by}):
            digest.update(f"\x00{column}".encode())
            _digest_lines(digest, self.fleet.attributes.get(column, []))
        return digest.hexdigest()

    def pinned(self) -> dict[str, Any]:
        """What defines the run's targets and package, by part (see the class docstring)."""
        plan = self.plan
        platform = plan.platform
        return {
            "platform (url, app_id)": [
                "simulator" if platform.is_simulator else platform.url,
                platform.app_id,
            ],
            "operation": plan.operation.value,
            "firmware": plan.firmware.model_dump(mode="json"),
            "fleet targets": self.targets_digest(),
            "fleet device_type/model/manufacturer": [
                plan.fleet.device_type,
                plan.fleet.model,
                plan.fleet.manufacturer,
            ],
            # only when set: fingerprints of runs before the key existed stay the same
            **(
                {"fleet version_column": plan.fleet.version_column}
                if plan.fleet.version_column
                else {}
            ),
            "waves (names, sizes, selection)": [
                w.model_dump(
                    mode="json", include={"name", "count", "share", "selection", "stratify_by"}
                )
                | {"seed": w.seed if w.selection != "ordered" else None}
                for w in plan.waves
            ],
        }

    @property
    def fingerprint(self) -> str:
        """The pinned parts as canonical JSON (kept in the journal, compared on resume)."""
        return json.dumps(self.pinned(), sort_keys=True)

    def settings(self) -> str:
        """The whole plan as canonical JSON (kept in the journal to tell what was edited)."""
        return json.dumps(self.plan.model_dump(mode="json"), sort_keys=True)

    def secret(self) -> str:
        """The app secret from the environment (never from the plan file)."""
        platform = self.plan.platform
        if platform.secret_env is None:
            raise InputError(str(self.path), "platform.secret_env", "is required for this URL")
        value = os.environ.get(platform.secret_env)
        if not value:
            raise InputError(
                str(self.path),
                "platform.secret_env",
                f"environment variable {platform.secret_env} is not set or empty",
            )
        return value


def _digest_lines(digest: Any, values: Sequence[str], block: int = 4096) -> None:
    """Feed `\\n` + value for each value, a block at a time (the same bytes as one by one)."""
    for start in range(0, len(values), block):
        digest.update(("\n" + "\n".join(values[start : start + block])).encode())


def load_plan(path: Path, now: datetime | None = None, *, check_start: bool = False) -> LoadedPlan:
    """Read and check a plan and its fleet file, offline. Raises InputError.

    `check_start`: also refuse a custom start in the past (`rollout plan` and a first run;
    reading commands and `resume` must work after the start has passed)."""
    source = str(path)
    plan, data = read_plan_file(path)
    if check_start:
        check_times(plan, source, now)
    base = path.parent
    _check_platform_files(plan, path)
    if plan.fleet.devices_file is not None:
        fleet_path = base / plan.fleet.devices_file
        if not fleet_path.is_file():
            raise InputError(
                source, "fleet.devices_file", f"{plan.fleet.devices_file} is not an existing file"
            )
        named = {w.stratify_by for w in plan.waves if w.stratify_by}
        if plan.fleet.version_column:
            named.add(plan.fleet.version_column)
        fleet = read_fleet_file(fleet_path, sorted(named))
    else:
        assert plan.fleet.groups is not None
        fleet = Fleet.of_groups(plan.fleet.groups)
    loaded = LoadedPlan(path, plan, fleet, hashlib.sha256(data).hexdigest())
    if plan.fleet.inventory is not None:
        inventory = base / plan.fleet.inventory
        if not inventory.is_file():
            raise InputError(
                source, "fleet.inventory", f"{plan.fleet.inventory} is not an existing file"
            )
        listed = read_fleet_file(inventory, [INVENTORY_MODEL])
        loaded.device_models = dict(
            zip(listed.members, listed.attributes[INVENTORY_MODEL], strict=True)
        )
    return loaded


def load_following(path: Path) -> LoadedPlan:
    """The plan for commands that only follow tasks already submitted (`watch`, `report
    --refresh`): the plan file read and checked, the fleet file NOT read — the targets are in
    the journal, as for `status`, and the fleet may have moved or changed since. Its fleet is
    empty (of its kind) and it has no waves: it cannot plan or submit. Raises InputError."""
    plan, data = read_plan_file(path)
    _check_platform_files(plan, path)
    kind = "groups" if plan.fleet.groups is not None else "devices"
    fleet = Fleet(kind, [], "", "not read: following the journal's tasks")
    return LoadedPlan(path, plan, fleet, hashlib.sha256(data).hexdigest(), following=True)


def _check_platform_files(plan: Plan, path: Path) -> None:
    """The platform's TLS files exist beside the plan. Raises InputError naming the field."""
    for name in ("ca_file", "client_cert", "client_key"):
        value = getattr(plan.platform, name)
        if value is not None and not (path.parent / value).is_file():
            raise InputError(str(path), f"platform.{name}", f"file {value} does not exist")
