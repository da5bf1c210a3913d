"""The simulated fleet: device models, devices, firmware packages and device groups.

A generated fleet is a pure function of `(devices, seed)`, so a test, a demo and a benchmark
that ask for the same fleet get the same device IDs, versions and behaviour.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
import uuid
from array import array
from collections.abc import Iterable, Iterator, Mapping
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


@dataclass(slots=True)
class Device:
    """One device as the platform sees it; made from the fleet's columns on first look."""

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


class Devices(Mapping[str, Device]):
    """The fleet's devices by deviceId, held as columns: about 200 bytes a device at rest.

    A `Device` object is made the first time anyone looks a device up and kept from then on
    (its version changes live in it), so a 1 000 000-device fleet costs its columns plus the
    devices its tasks touched. Iterating `values()` makes every device: use `rows()` (the CSV
    export) or `model_key()` for fleet-wide work.
    """

    def __init__(self, models: tuple[DeviceModel, ...]) -> None:
        self.models = models
        self._keys = [(m.device_type, m.model, m.manufacturer) for m in models]
        self.ids: list[str] = []
        self._index: dict[str, int] = {}
        self._model = bytearray()  # index into `models`
        self._upgraded = bytearray()  # 1: created on the model's newest version
        self._region = bytearray()  # index into REGIONS
        self._never_online = bytearray()
        self._wake_phase = array("d")
        self._seed = array("Q")
        self._made: dict[int, Device] = {}

    def add(
        self,
        device_id: str,
        model: int,
        upgraded: bool,
        region: int,
        wake_phase: float,
        never_online: bool,
        behaviour_seed: int,
    ) -> None:
        self._index[device_id] = len(self.ids)
        self.ids.append(device_id)
        self._model.append(model)
        self._upgraded.append(upgraded)
        self._region.append(region)
        self._never_online.append(never_online)
        self._wake_phase.append(wake_phase)
        self._seed.append(behaviour_seed)

    def __getitem__(self, device_id: str) -> Device:
        index = self._index[device_id]
        device = self._made.get(index)
        if device is None:
            model = self.models[self._model[index]]
            device = Device(
                device_id=device_id,
                model=model,
                version=model.versions[-1] if self._upgraded[index] else model.versions[0],
                group=REGIONS[self._region[index]],
                wake_phase=self._wake_phase[index],
                never_online=bool(self._never_online[index]),
                behaviour_seed=self._seed[index],
            )
            self._made[index] = device
        return device

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def model_key(self, device_id: str) -> tuple[str, str, str] | None:
        """(deviceType, model, manufacturerName) of a device, None for an unknown ID."""
        index = self._index.get(device_id)
        return None if index is None else self._keys[self._model[index]]

    def model_keys(self, device_ids: Iterable[str]) -> set[tuple[str, str, str] | None]:
        """The model keys of these devices (None among them: an unknown ID); the create path."""
        index, kinds, keys = self._index, self._model, self._keys
        return {
            None if (i := index.get(device_id)) is None else keys[kinds[i]]
            for device_id in device_ids
        }

    def rows(self) -> Iterator[tuple[str, str, str, str, str, str]]:
        """Each device as created (FLEET_CSV_COLUMNS), without making Device objects."""
        models, upgraded, region = self.models, self._upgraded, self._region
        for index, (device_id, model_index) in enumerate(zip(self.ids, self._model, strict=True)):
            model = models[model_index]
            yield (
                device_id,
                model.device_type,
                model.model,
                model.manufacturer,
                model.versions[-1] if upgraded[index] else model.versions[0],
                REGIONS[region[index]],
            )


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
    devices: Devices
    packages: dict[str, Package]
    groups: dict[str, Group]  # by name


def _hex24(rng: random.Random) -> str:
    return f"{rng.getrandbits(96):024x}"


def group_id(rng: random.Random) -> str:
    """A devGroupId: a UUID, as the platform's (platform-api.md §1, IDs)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


# What a device costs the simulator, measured with bench/simulator_scale.py (1 000 000 devices
# of one model, then every device in a task whose subtasks were looked at): its columns
# (deviceId string, index entry, group membership, six array slots) at rest, and its Device
# object and SubtaskLife once a task of it has been observed. The largest fleet a simulator
# accepts is the memory available at start divided by their sum (`max_devices`).
BYTES_AT_REST = 240
BYTES_IN_A_TASK = 850
# the share of the available memory the devices may take: the rest is for the interpreter, the
# server, replies being written and the allocator's slack (a 10⁶-device run measured 1.10 –
# 1.23 GB against the 1.09 GB of the two constants above)
MEMORY_SHARE = 0.75


class FleetTooLarge(ValueError):
    """More devices than this machine's available memory can hold (`max_devices`)."""


def available_memory() -> int | None:
    """Bytes the kernel could give this process now (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def max_devices(available: int | None = None) -> int | None:
    """The most devices that fit in `MEMORY_SHARE` of `available` bytes (default:
    `available_memory()`) with every device in an observed task; None when the memory cannot
    be known."""
    if available is None:
        available = available_memory()
    if available is None:
        return None
    return int(available * MEMORY_SHARE) // (BYTES_AT_REST + BYTES_IN_A_TASK)


def model_named(name: str) -> DeviceModel:
    """The device model of that name (`WM-200`, ...). Raises KeyError for another name."""
    for model in MODELS:
        if model.model == name:
            return model
    raise KeyError(name)


def generate_fleet(
    device_count: int,
    seed: int,
    app_id: str = "demo-app",
    *,
    failure_probability: float | None = None,
    never_online_share: float = NEVER_ONLINE_SHARE,
    already_upgraded_share: float = ALREADY_UPGRADED_SHARE,
    models: tuple[str, ...] | None = None,
) -> Fleet:
    """Build a deterministic fleet of `device_count` devices across `models` (names; None:
    every model) and every region. Packages exist for every model, whatever `models` says.

    `failure_probability` replaces every model's own upgrade failure rate (benchmarks and
    tests that need a known failure share set it, with the other two shares at 0).
    Raises FleetTooLarge when `device_count` is over `max_devices()`.
    """
    cap = max_devices()
    if cap is not None and device_count > cap:
        each = BYTES_AT_REST + BYTES_IN_A_TASK
        raise FleetTooLarge(
            f"{device_count} devices need about {device_count * each >> 20} MB ({each} bytes "
            f"a device); {MEMORY_SHARE:.0%} of this machine's available memory holds "
            f"{cap * each >> 20} MB of devices, room for {cap}"
        )
    rng = random.Random(seed)
    every_model = MODELS
    if failure_probability is not None:
        every_model = tuple(
            dataclasses.replace(m, failure_probability=failure_probability) for m in MODELS
        )
    packages: dict[str, Package] = {}
    for model in every_model:
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
    chosen = every_model
    if models is not None:
        chosen = tuple(m for name in models for m in every_model if m.model == name)
        if len(chosen) != len(models) or not chosen:
            raise KeyError(f"unknown model among {models}")

    devices = Devices(chosen)
    groups: dict[str, Group] = {
        region: Group(group_id(rng), region, f"meters in the {region}", app_id, 0)
        for region in REGIONS
    }
    members = [groups[region].device_ids for region in REGIONS]
    # the loop below draws exactly what the one before the compact fleet drew, in the same
    # order, so a seed gives the same fleet; the deviceId is uuid.UUID(int=..., version=4)
    # spelled out (five times faster)
    randrange, getrandbits, draw = rng.randrange, rng.getrandbits, rng.random
    model_count, region_count = len(chosen), len(REGIONS)
    wake = [m.wake_interval for m in chosen]
    add = devices.add
    for _ in range(device_count):
        kind = randrange(model_count)
        bits = getrandbits(128) & UUID_CLEAR | UUID_V4
        hexed = f"{bits:032x}"
        device_id = f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"
        upgraded = draw() < already_upgraded_share
        region = randrange(region_count)
        wake_phase = draw() * wake[kind]
        never_online = draw() < never_online_share
        add(device_id, kind, upgraded, region, wake_phase, never_online, getrandbits(32))
        members[region].append(device_id)
    return Fleet(devices=devices, packages=packages, groups=groups)


# uuid.UUID(version=4): variant bits 10 (RFC 4122) and version nibble 4
UUID_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
UUID_V4 = (0x8000 << 48) | (4 << 76)


FLEET_CSV_COLUMNS = (
    "deviceId",
    "deviceType",
    "model",
    "manufacturerName",
    "firmwareVersion",
    "group",
)


def fleet_rows(fleet: Fleet) -> Iterable[tuple[str, ...]]:
    """Each device as created, in fleet order (FLEET_CSV_COLUMNS)."""
    return fleet.devices.rows()


def write_fleet_csv(fleet: Fleet, path: Path) -> None:
    """Stream the fleet to `path` as CSV, a buffer of rows at a time (nothing is built whole).
    Raises OSError when it cannot be written."""
    with path.open("w", newline="", encoding="utf-8", buffering=1 << 20) as handle:
        writer = csv.writer(handle)
        writer.writerow(FLEET_CSV_COLUMNS)
        writer.writerows(fleet_rows(fleet))
