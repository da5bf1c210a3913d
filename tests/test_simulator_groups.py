"""The simulator's device-group APIs (platform-api.md §4), as the vendor SDK calls them over
HTTP: create, list, query one, modify, delete, members, add and remove members."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from .conftest import UPGRADE, RawPlatform
from .simhelpers import devices_of, newest_package

GROUPS = "/iocm/app/devgroup/v1.3.0/devGroups"
MEMBERS = "/iocm/app/dm/v1.2.0/devices/ids"
ADD = "/iocm/app/dm/v1.1.0/devices/addDevGroupTagToDevices"
REMOVE = "/iocm/app/dm/v1.1.0/devices/deleteDevGroupTagFromDevices"
FW = f"{UPGRADE}/operations/firmwareUpgrade"


async def _create(raw: RawPlatform, **body: Any) -> dict[str, Any]:
    status, group, _ = await raw.call("POST", GROUPS, json=body)
    assert status == 200 and "error_code" not in group, group
    return dict(group)


async def _members(raw: RawPlatform, group_id: str) -> list[str]:
    _, body, _ = await raw.call("GET", MEMBERS, params={"devGroupId": group_id, "pageSize": 100})
    return list(body["deviceIds"])


async def _group_task(raw: RawPlatform, name: str) -> tuple[int, Any]:
    pkg = newest_package(raw.server)
    status, body, _ = await raw.call(
        "POST",
        FW,
        json={
            "fileId": pkg.file_id,
            "targets": {
                "deviceGroups": [name],
                "deviceType": pkg.device_type,
                "model": pkg.model,
                "manufacturerName": pkg.manufacturer,
            },
        },
    )
    return status, body


async def test_group_ids_are_uuids(raw: RawPlatform) -> None:
    """Every devGroupId — generated regions and created groups — is a UUID."""
    await raw.login()
    created = await _create(raw, name="canary1")
    _, listed, _ = await raw.call("GET", GROUPS, params={"pageSize": 100})
    ids = [group["id"] for group in listed["list"]]
    assert created["id"] in ids and len(ids) == 6
    assert all(str(uuid.UUID(group_id)) == group_id for group_id in ids)


@pytest.mark.parametrize(
    "name", ["north-1", "Nörth", "meters_a", "two words", "", "x" * 51, 7, None]
)
async def test_group_name_must_be_1_to_50_ascii_letters_and_digits(
    raw: RawPlatform, name: object
) -> None:
    """A name outside 1–50 ASCII letters and digits is refused with 400/50400."""
    await raw.login()
    status, body, _ = await raw.call("POST", GROUPS, json={"name": name})
    assert (status, body["error_code"]) == (400, "50400")


async def test_group_name_of_50_letters_and_digits_is_accepted(raw: RawPlatform) -> None:
    """A 50-character alphanumeric name is within the rule."""
    await raw.login()
    assert (await _create(raw, name="A1" * 25))["name"] == "A1" * 25


async def test_query_one_group(raw: RawPlatform) -> None:
    """GET devGroups/{id} answers the group as created, with its creator; unknown → 404/100603."""
    await raw.login()
    members = devices_of(raw.server, count=3)
    created = await _create(raw, name="canary2", description="first", deviceIds=members)
    status, group, _ = await raw.call("GET", f"{GROUPS}/{created['id']}")
    assert status == 200
    assert group == {**created, "creator": "demo-app"}
    assert group["curDevNum"] == 3 and group["deviceIds"] == members
    status, body, _ = await raw.call("GET", f"{GROUPS}/{uuid.uuid4()}")
    assert (status, body["error_code"]) == (404, "100603")


async def test_modify_group_renames_and_keeps_members(raw: RawPlatform) -> None:
    """PUT renames a group (its members stay; tasks then use the new name), changes its
    description and maxDevNum."""
    await raw.login()
    members = devices_of(raw.server, count=4)
    created = await _create(raw, name="before", deviceIds=members)
    status, body, _ = await raw.call(
        "PUT", f"{GROUPS}/{created['id']}", json={"name": "after", "description": "renamed"}
    )
    assert status == 200
    assert (body["id"], body["name"], body["description"]) == (created["id"], "after", "renamed")
    assert await _members(raw, created["id"]) == members
    status, _ = await _group_task(raw, "before")
    assert status == 404
    status, task = await _group_task(raw, "after")
    assert status == 200
    truth = (await raw.admin("/_sim/tasks"))["tasks"]
    assert truth[-1]["operationId"] == task["operationId"] and truth[-1]["devices"] == members


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"name": "north"}, 200, "100602"),  # another group's name: HTTP 200, as the platform
        ({"name": "bad name"}, 400, "50400"),
        ({"maxDevNum": -1}, 400, "50400"),
        ({"description": "x" * 1025}, 400, "50400"),
        ({"maxDevNum": 2}, 400, "100609"),  # fewer than its 3 members
    ],
)
async def test_modify_group_errors(
    raw: RawPlatform, change: dict[str, Any], status: int, code: str
) -> None:
    """A modify that breaks a rule answers its code and changes nothing."""
    await raw.login()
    created = await _create(raw, name="target", deviceIds=devices_of(raw.server, count=3))
    got, body, _ = await raw.call("PUT", f"{GROUPS}/{created['id']}", json=change)
    assert (got, body["error_code"]) == (status, code)
    _, after, _ = await raw.call("GET", f"{GROUPS}/{created['id']}")
    assert after == {**created, "creator": "demo-app"}


async def test_modify_unknown_group_is_100603(raw: RawPlatform) -> None:
    """Modifying a group that does not exist answers 404/100603."""
    await raw.login()
    status, body, _ = await raw.call("PUT", f"{GROUPS}/{uuid.uuid4()}", json={"name": "x1"})
    assert (status, body["error_code"]) == (404, "100603")


async def test_delete_group(raw: RawPlatform) -> None:
    """DELETE answers 204 with no body; the group is gone (query 100603, a task on its name
    123002) and its name can be used again; deleting again is 100603."""
    await raw.login()
    created = await _create(raw, name="gone", deviceIds=devices_of(raw.server, count=2))
    async with raw.session.delete(
        raw.url + f"{GROUPS}/{created['id']}",
        params={"accessAppId": "demo-app"},
        headers=raw.headers(),
    ) as reply:
        assert reply.status == 204 and await reply.read() == b""
    status, body, _ = await raw.call("GET", f"{GROUPS}/{created['id']}")
    assert (status, body["error_code"]) == (404, "100603")
    status, body = await _group_task(raw, "gone")
    assert (status, body["error_code"]) == (404, "123002")
    assert (await _create(raw, name="gone"))["id"] != created["id"]
    status, body, _ = await raw.call("DELETE", f"{GROUPS}/{created['id']}")
    assert (status, body["error_code"]) == (404, "100603")


async def test_remove_members(raw: RawPlatform) -> None:
    """deleteDevGroupTagFromDevices answers 204 and takes the devices out of the group only."""
    await raw.login()
    members = devices_of(raw.server, count=5)
    created = await _create(raw, name="shrink", deviceIds=members)
    other = await _create(raw, name="keep", deviceIds=members[:2])
    async with raw.session.post(
        raw.url + REMOVE,
        json={"devGroupId": created["id"], "deviceIds": members[:2]},
        headers=raw.headers(),
    ) as reply:
        assert reply.status == 204
        assert reply.content_type != "text/plain"
    assert await _members(raw, created["id"]) == members[2:]
    assert await _members(raw, other["id"]) == members[:2]  # a device may be in several groups
    _, group, _ = await raw.call("GET", f"{GROUPS}/{created['id']}")
    assert group["curDevNum"] == 3


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"deviceIds": []}, 400, "50400"),  # no devGroupId
        ({"devGroupId": "00000000-0000-4000-8000-000000000000", "deviceIds": []}, 404, "100603"),
        ({"devGroupId": "GROUP", "deviceIds": ["no-such-device"]}, 400, "50400"),
        ({"devGroupId": "GROUP"}, 400, "50400"),
    ],
)
async def test_remove_members_errors(
    raw: RawPlatform, body: dict[str, Any], status: int, code: str
) -> None:
    """Removing members answers 50400 for a bad body or device, 100603 for no such group."""
    await raw.login()
    created = await _create(raw, name="errs", deviceIds=devices_of(raw.server, count=2))
    body = {k: created["id"] if v == "GROUP" else v for k, v in body.items()}
    got, reply, _ = await raw.call("POST", REMOVE, json=body)
    assert (got, reply["error_code"]) == (status, code)
    assert len(await _members(raw, created["id"])) == 2


async def test_group_device_limit(raw: RawPlatform) -> None:
    """maxDevNum bounds a group: a create with more devices is 100609, adding past it 100601."""
    await raw.login()
    devices = devices_of(raw.server, count=4)
    status, body, _ = await raw.call(
        "POST", GROUPS, json={"name": "small", "maxDevNum": 2, "deviceIds": devices[:3]}
    )
    assert (status, body["error_code"]) == (400, "100609")
    created = await _create(raw, name="small", maxDevNum=2, deviceIds=devices[:2])
    status, body, _ = await raw.call(
        "POST", ADD, json={"devGroupId": created["id"], "deviceIds": devices[2:3]}
    )
    assert (status, body["error_code"]) == (400, "100601")
    status, body, _ = await raw.call(
        "POST", ADD, json={"devGroupId": created["id"], "deviceIds": devices[:1]}
    )
    assert status == 200  # already a member: nothing added, the limit is not passed
    assert await _members(raw, created["id"]) == devices[:2]
