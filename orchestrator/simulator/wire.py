"""The platform's error vocabulary and reply shapes, as the simulator puts them on the wire.

Every error reply is `{"error_code": "<string>", "error_desc": "..."}` with
`Content-Type: application/json` (platform-api.md §1 and §5 rules 1 and 3). The one exception is
`gateway_reply`: a refusal by something in front of the platform, which has no platform body.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

# code -> (HTTP status, description as the platform words it)
ERRORS: dict[str, tuple[int, str]] = {
    "50252": (500, "Internal server error."),
    "100001": (500, "Internal server error."),
    "50400": (400, "The input is invalid."),
    "100208": (401, "AppId or secret is not right."),
    "102202": (400, "Required Parameter is null or empty."),
    "100601": (400, "The number of devices in the group has reached the limit."),
    "100602": (200, "The device group name has been used."),
    "100603": (404, "The device group is not existed."),
    "100604": (400, "The device group request parameter is invalid."),
    "100609": (400, "Too many devices to add to the device group."),
    "120015": (400, "Bad request error."),
    "123002": (404, "Device or package file not found."),
    "123009": (404, "The requested task does not exist."),
    "123016": (400, "The parameter is error, targetversion not match with device."),
    "123019": (400, "manufacturerName is null."),
    "123020": (400, "deviceType is null"),
    "123021": (400, "model is null."),
    "123022": (400, "deviceGroups and devices cannot be null together"),
    "123023": (400, "deviceGroups and devices cannot be exist together"),
    "123024": (400, "The number of deviceGroups or devices reached upper limit"),
    "123025": (400, "executeType is error or can not to be null."),
    "123026": (400, "startTime or endTime is null or error."),
    "123028": (400, "retryTimes is null or beyond the limit."),
    "123029": (400, "pageNo or pageSize beyond the limit."),
    "123032": (400, "startTime can not be later than the endTime."),
    "123033": (400, "startTime can not be earlier than the now."),
    "123034": (400, "endtime must be greater than 5 minutes."),
    "1010005": (403, "App_key or access_token is invalid."),
    "1010009": (403, "app throttle exceed."),
}


class PlatformReject(Exception):
    """Raised inside the simulator to answer with one of the platform's error replies."""

    def __init__(self, code: str, detail: str | None = None, *, desc: str | None = None) -> None:
        """`detail` is appended to the platform's wording; `desc` replaces it."""
        status, wording = ERRORS[code]
        self.code = code
        self.status = status
        if desc is not None:
            self.desc = desc
        else:
            self.desc = wording if detail is None else f"{wording} {detail}"
        super().__init__(f"{code}: {self.desc}")


def json_reply(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def error_reply(reject: PlatformReject) -> web.Response:
    return json_reply({"error_code": reject.code, "error_desc": reject.desc}, reject.status)


# the wording gateways in the field still use (Python 3.13 renamed 413 "Content Too Large")
GATEWAY_PHRASES = {413: "Request Entity Too Large"}


def gateway_reply(status: int) -> web.Response:
    """An error from a gateway or proxy in front of the platform: HTML, no platform error body."""
    reason = GATEWAY_PHRASES.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
    return web.Response(
        status=status,
        text=f"<html><body>{status} {reason}</body></html>",
        content_type="text/html",
    )
