"""One exception tree for the whole orchestrator.

    OrchestratorError
    ├── InputError                  bad plan, fleet file or option — exit 2, nothing sent
    ├── JournalError                the journal is locked, damaged or belongs to another plan
    │   └── JournalMismatch         the plan or fleet changed under an existing run
    ├── RunAborted                  the engine stopped a run on purpose (reason in the journal)
    │   └── CensusUndecided         targets held by tasks whose package is unknown: ask first
    ├── DuplicatesFound             the closing census found targets in two tasks — exit 5
    ├── RunHalted                   a wave gate failed or waits for approval — exit 4
    ├── RunWaiting                  step mode: the rest needs time (tasks, soak, approval) — 75
    └── PlatformCallError           a call to the platform failed; `.may_have_taken_effect`,
        │                           `.transient` (the platform is down: pause, never count)
        ├── TransportError          no usable HTTP reply
        │   ├── ConnectFailed       refused/unreachable/DNS timeout — not sent; transient
        │   ├── ConnectionLost      reset or dropped after sending — may have taken effect
        │   └── RequestTimedOut     no reply in time — may have taken effect
        ├── CannotConnect           the platform cannot be reached as configured — not sent,
        │   │                       never retried; the message names the fix
        │   ├── HostNotFound        DNS knows no such host name
        │   └── TLSFailed           certificate not trusted/expired/for another host, a TLS
        │                           handshake refused, TLS against plain HTTP or the reverse
        ├── PlatformUnreachable     transient faults outlasted `execution.outage_budget`
        │   └── KeptRefusing        1010005/1010009 on every attempt of a call, as long
        └── PlatformError           an error reply: `.status`, `.code`, `.desc`
            ├── BadRequest          4xx refusals (plan or device level) — certainly not
            │   └── NotFound        404: 123002 device/package, 123009 task
            ├── AuthFailed          401 / 100208: wrong app id or secret
            ├── InvalidToken        403 / 1010005
            ├── Throttled           403 / 1010009 — refused, did not count, did not act
            └── ServerError         5xx — may have taken effect; 502/503/504 transient

aiohttp exceptions are converted in exactly one place, `northbound.client._send`. No
exception text ever contains a secret or a token: messages are built from codes, paths and
the platform's own error_desc.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error the orchestrator raises on purpose."""


class InputError(OrchestratorError):
    """Bad input: names the file, the field and the rule (one line, exit code 2)."""

    def __init__(self, source: str, field: str, rule: str) -> None:
        self.source, self.field, self.rule = source, field, rule
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {rule}")


class JournalError(OrchestratorError):
    """The journal cannot be used for this run."""


class JournalMismatch(JournalError):
    """The plan or fleet differs from what the journal's run was started with."""


class RunAborted(OrchestratorError):
    """The engine stopped the run deliberately; the reason is in the journal."""


class CensusUndecided(RunAborted):
    """Targets not yet sent are held by tasks whose package the platform does not tell:
    sending them may duplicate, skipping them may leave them un-upgraded. The operator
    decides (`--unknown-tasks skip|send`); nothing was created."""


class DuplicatesFound(OrchestratorError):
    """The closing census found targets in two or more tasks of this package (recorded in
    the journal, shown by `status` and the reports). Exit code 5."""


class RunHalted(OrchestratorError):
    """A wave's gate stopped the run: it failed, or it waits for an operator's approval."""


class RunWaiting(OrchestratorError):
    """Step mode (`--step`): the run went as far as it can now; the rest needs time — tasks
    still running, a gate soaking until `until` (epoch seconds), or an operator's approval.
    `waiting_for` is one of "tasks", "soak", "approval". Exit code 75 (EX_TEMPFAIL): call
    again later."""

    def __init__(self, message: str, *, waiting_for: str, until: float | None = None) -> None:
        self.waiting_for, self.until = waiting_for, until
        super().__init__(message)


class PlatformCallError(OrchestratorError):
    """A call to the platform failed.

    `may_have_taken_effect`: a create may have been committed (it must be settled, never
    sent blindly again). `transient`: the platform (or the path to it) is down — the call is
    sent again once it answers, within `execution.outage_budget`, and never counts as one of
    a run of identical failures."""

    may_have_taken_effect: bool = False

    @property
    def transient(self) -> bool:
        return False

    def __init__(self, message: str, *, method: str = "", path: str = "") -> None:
        self.method, self.path = method, path
        super().__init__(f"{method} {path}: {message}" if method else message)


class TransportError(PlatformCallError):
    """No usable HTTP reply arrived."""


class ConnectFailed(TransportError):
    """The connection could not be opened (refused, unreachable, connect or DNS timeout):
    the request never left, and the platform may be back soon."""

    @property
    def transient(self) -> bool:
        return True


class CannotConnect(PlatformCallError):
    """The platform cannot be reached as the plan configures it: waiting will not help. The
    request never left; the message names the fix."""


class HostNotFound(CannotConnect):
    """DNS answered that the host name does not exist (NXDOMAIN)."""


class TLSFailed(CannotConnect):
    """The TLS handshake or the certificate check failed, or one side speaks TLS and the
    other plain HTTP: the request never left."""


class PlatformUnreachable(PlatformCallError):
    """The platform stayed unreachable (transient faults only) for longer than the outage
    budget: the run stops; `rollout resume` goes on once it is back."""


class ConnectionLost(TransportError):
    """The connection broke after the request was sent: it may have taken effect."""

    may_have_taken_effect = True


class RequestTimedOut(TransportError):
    """No reply within the timeout: the request may have taken effect."""

    may_have_taken_effect = True


class KeptRefusing(PlatformUnreachable):
    """The platform refused every attempt of one call with 1010005 or 1010009 (another
    client replacing the app's token or spending its budget) for longer than the outage
    budget: waited out until then, never counted as identical failures; then the run stops
    like an outage and `rollout resume` goes on."""


class PlatformError(PlatformCallError):
    """The platform answered with an error reply."""

    def __init__(
        self, status: int, code: str, desc: str, *, method: str = "", path: str = ""
    ) -> None:
        self.status, self.code, self.desc = status, code, desc
        super().__init__(f"HTTP {status} error_code {code}: {desc}", method=method, path=path)


class BadRequest(PlatformError):
    """The platform refused the request (4xx): nothing happened."""


class NotFound(BadRequest):
    """404: the device, package (123002) or task (123009) does not exist."""


class AuthFailed(PlatformError):
    """401 / 100208: the app id or secret is wrong (or the host is)."""


class InvalidToken(PlatformError):
    """403 / 1010005: the access token is wrong, expired or belongs to another app."""


class Throttled(PlatformError):
    """403 / 1010009: the app exceeded its flow-control limit; the call did not count."""


GATEWAY_STATUSES = frozenset({502, 503, 504})


class ServerError(PlatformError):
    """5xx: the platform failed; a create may nevertheless have been committed. 502/503/504
    (a gateway with no platform behind it, or one too busy) are transient."""

    may_have_taken_effect = True

    @property
    def transient(self) -> bool:
        return self.status in GATEWAY_STATUSES


def platform_error(
    status: int, code: str, desc: str, *, method: str = "", path: str = ""
) -> PlatformError:
    """The one mapping from an error reply to its class."""
    cls: type[PlatformError]
    if code == "1010009":
        cls = Throttled
    elif code == "1010005":
        cls = InvalidToken
    elif code == "100208" or status == 401:
        cls = AuthFailed
    elif status >= 500:
        cls = ServerError
    elif status == 404:
        cls = NotFound
    else:
        cls = BadRequest
    return cls(status, code, desc, method=method, path=path)
