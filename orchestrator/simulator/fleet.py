"""The simulated fleet: device models, devices, firmware packages and device groups.

A generated fleet is a pure function of `(devices, seed)`, so a test, a demo and a benchmark
that ask for the same fleet get the same device IDs, versions and behaviour.
"""

from __future__ import annotations

import csv
import dataclasses
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FIRMWARE = "firmwarePackage"
SOFTWARE = "softwarePackage"


@dataclass(frozen=True)
class DeviceModel:
    """How one hardware model behaves in the field (simulated seconds)."""

    device_type: str
    model: str
    manufacturer: str
    versions: tuple[str, ...]  # oldest first; the last is the newest package
    wake_interval: float  # a PSM device wakes this often ...
    awake_for: float  # ... and stays reachable this long
    upgrade_duration: float
    failure_probability: float
    failure_reasons: tuple[str, ...]


MODELS: tuple[DeviceModel, ...] = (
    DeviceModel(
        "WaterMeter",
        "WM-200",
        "Aqualis",
        ("1.8.0", "2.0.0", "2.1.0"),
        wake_interval=1800.0,
        awake_for=120.0,
        upgrade_duration=420.0,
        failure_probability=0.03,
        failure_reasons=("Download package timeout.", "Package verification failed."),
    ),
    DeviceModel(
        "WaterMeter",
        "WM-310",
        "Aqualis",
        ("3.0.1", "3.1.0"),
        wake_interval=3600.0,
        awake_for=90.0,
        upgrade_duration=600.0,
        failure_probability=0.05,
        failure_reasons=("Download package timeout.", "Battery too low to upgrade."),
    ),
    DeviceModel(
        "GasMeter",
        "GM-10",
        "Gastro",
        ("5.2.0", "5.3.0", "5.4.0"),
        wake_interval=2700.0,
        awake_for=60.0,
        upgrade_duration=900.0,
        failure_probability=0.04,
        failure_reasons=("Flash write error.", "Download package timeout."),
    ),
    DeviceModel(
        "Tracker",
        "TR-1",
        "Trakko",
        ("0.9.4", "1.0.0"),
        wake_interval=300.0,
        awake_for=240.0,
        upgrade_duration=180.0,
        failure_probability=0.02,
        failure_reasons=("Device rejected the package.",),
    ),
)

REGIONS = ("north", "south", "east", "west", "central")
NEVER_ONLINE_SHARE = 0.01
ALREADY_UPGRADED_SHARE = 0.02


@dataclass
class Device:
    device_id: str
    model: DeviceModel
    version: str  # as at fleet creation; later changes live in `version_changes`
    group: str
    wake_phase: float  # seconds into its wake cycle at epoch 0
    never_online: bool
    behaviour_seed: int
    version_changes: list[tuple[float, str]] = field(default_factory=list)

    def version_at(self, t: float) -> str:
        version = self.version
        for when, new_version in self.version_changes:
            if when <= t:
                version = new_version
        return version

    def next_wake(self, t: float) -> float:
        """Start of the first wake period at or after t (t itself if awake now)."""
        interval = self.model.wake_interval
        cycle_start = t - ((t - self.wake_phase) % interval)
        if t < cycle_start + self.model.awake_for:
            return t
        return cycle_start + interval

    def next_wake_transition(self, t: float) -> float:
        """The first moment strictly after t at which the device goes online."""
        interval = self.model.wake_interval
        cycle_start = t - ((t - self.wake_phase) % interval)
        return cycle_start + interval


@dataclass(frozen=True)
class Package:
    file_id: str
    name: str
    version: str
    file_type: str
    device_type: str
    model: str
    manufacturer: str
    date: str
    upload_time: str

    def to_wire(self) -> dict[str, str]:
        return {
            "fileId": self.file_id,
            "name": self.name,
            "version": self.version,
            "fileType": self.file_type,
            "deviceType": self.device_type,
            "model": self.model,
            "manufacturerName": self.manufacturer,
            "protocolType": "CoAP",
            "description": f"{self.model} {self.version}",
            "date": self.date,
            "uploadTime": self.upload_time,
        }


@dataclass
class Group:
    group_id: str
    name: str
    description: str
    app_id: str
    max_devices: int
    device_ids: list[str] = field(default_factory=list)

    def to_wire(self) -> dict[str, object]:
        return {
            "id": self.group_id,
            "name": self.name,
            "description": self.description,
            "appId": self.app_id,
            "maxDevNum": self.max_devices,
            "curDevNum": len(self.device_ids),
            "deviceIds": list(self.device_ids),
            "creator": self.app_id,
        }


@dataclass
class Fleet:
    devices: dict[str, Device]
    packages: dict[str, Package]
    groups: dict[str, Group]  # by name


def _hex24(rng: random.Random) -> str:
    return f"{rng.getrandbits(96):024x}"


def group_id(rng: random.Random) -> str:
    """A devGroupId: a UUID, as the platform's (platform-api.md §1, IDs)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def generate_fleet(
    device_count: int,
    seed: int,
    app_id: str = "demo-app",
    *,
    failure_probability: float | None = None,
    never_online_share: float = NEVER_ONLINE_SHARE,
    already_upgraded_share: float = ALREADY_UPGRADED_SHARE,
) -> Fleet:
    """Build a deterministic fleet of `device_count` devices across every model and region.

    `failure_probability` replaces every model's own upgrade failure rate (benchmarks and
    tests that need a known failure share set it, with the other two shares at 0).
    """
    rng = random.Random(seed)
    models = MODELS
    if failure_probability is not None:
        models = tuple(
            dataclasses.replace(m, failure_probability=failure_probability) for m in MODELS
        )
    packages: dict[str, Package] = {}
    for model in models:
        for index, version in enumerate(model.versions):
            file_id = _hex24(rng)
            packages[file_id] = Package(
                file_id=file_id,
                name=f"{model.model}_fw_{version}.bin",
                version=version,
                file_type=FIRMWARE,
                device_type=model.device_type,
                model=model.model,
                manufacturer=model.manufacturer,
                date=f"2026-0{index + 1}-15",
                upload_time=f"2026{index + 1:02d}15T080000Z",
            )
        file_id = _hex24(rng)
        packages[file_id] = Package(
            file_id=file_id,
            name=f"{model.model}_app_1.0.zip",
            version="1.0",
            file_type=SOFTWARE,
            device_type=model.device_type,
            model=model.model,
            manufacturer=model.manufacturer,
            date="2026-03-01",
            upload_time="20260301T080000Z",
        )

    devices: dict[str, Device] = {}
    groups: dict[str, Group] = {
        region: Group(group_id(rng), region, f"meters in the {region}", app_id, 0)
        for region in REGIONS
    }
    for _ in range(device_count):
        model = models[rng.randrange(len(models))]
        device_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        already_upgraded = rng.random() < already_upgraded_share
        region = REGIONS[rng.randrange(len(REGIONS))]
        devices[device_id] = Device(
            device_id=device_id,
            model=model,
            version=model.versions[-1] if already_upgraded else model.versions[0],
            group=region,
            wake_phase=rng.random() * model.wake_interval,
            never_online=rng.random() < never_online_share,
            behaviour_seed=rng.getrandbits(32),
        )
        groups[region].device_ids.append(device_id)
    return Fleet(devices=devices, packages=packages, groups=groups)


FLEET_CSV_COLUMNS = (
    "deviceId",
    "deviceType",
    "model",
    "manufacturerName",
    "firmwareVersion",
    "group",
)


def fleet_rows(fleet: Fleet) -> Iterable[tuple[str, ...]]:
    for device in fleet.devices.values():
        yield (
            device.device_id,
            device.model.device_type,
            device.model.model,
            device.model.manufacturer,
            device.version,
            device.group,
        )


def write_fleet_csv(fleet: Fleet, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(FLEET_CSV_COLUMNS)
        writer.writerows(fleet_rows(fleet))
