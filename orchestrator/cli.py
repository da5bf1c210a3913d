"""The `rollout` command line.

Exit codes (docs/exit-codes.md): 0 done; 1 the run failed or stopped on a platform refusal, or
targets remain in no task; 2 bad input (plan, fleet file, options) — nothing was sent; 3 the
journal is locked or does not match the plan; 4 halted at a gate; 5 targets found in two tasks
of the package; 75 a step (`--step`) went as far as it can now, the rest needs time; 130
interrupted (Ctrl-C), in-flight state recorded.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from . import __version__
from .errors import (
    DuplicatesFound,
    InputError,
    JournalError,
    PlatformCallError,
    RunAborted,
    RunHalted,
    RunWaiting,
)

if TYPE_CHECKING:  # a command imports what it needs when it runs: `--help` starts fast
    from rich.console import Console

    from .display import RunDisplay
    from .loaded_plan import LoadedPlan
    from .northbound.hoststate import AppState
    from .northbound.ledger import BudgetView

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_JOURNAL = 3
EXIT_HALTED = 4
EXIT_DUPLICATES = 5
EXIT_WAITING = 75  # sysexits' EX_TEMPFAIL: "try again later"
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: stdout's reader went away (`rollout report PLAN | head`)

P = ParamSpec("P")
R = TypeVar("R")


# The orchestrator's errors, each with how it is shown and its exit code (first match wins);
# the last two catch what the journal or the operating system refused anywhere else.
ERROR_EXITS: tuple[tuple[type[BaseException], str, int], ...] = (
    (InputError, "[red]error:[/]", EXIT_BAD_INPUT),
    (JournalError, "[red]journal:[/]", EXIT_JOURNAL),
    (RunWaiting, "[cyan]waiting:[/]", EXIT_WAITING),
    (RunHalted, "[yellow]halted at a gate:[/]", EXIT_HALTED),
    (DuplicatesFound, "[red]duplicates:[/]", EXIT_DUPLICATES),
    (RunAborted, "[red]run stopped:[/]", EXIT_FAILED),
    (PlatformCallError, "[red]platform:[/]", EXIT_FAILED),
    (sqlite3.Error, "[red]journal:[/]", EXIT_JOURNAL),
    (OSError, "[red]system:[/]", EXIT_FAILED),
)
# northbound.hoststate.ENV_VAR, spelled out so `--help` imports nothing (a test pins it)
STATE_ENV_VAR = "ROLLOUT_STATE_DIR"


def _one_line(exc: BaseException) -> str:
    """The error's text on one line; an OS error as `reason: file`, without `[Errno N]`."""
    if isinstance(exc, OSError) and exc.strerror:
        where = " → ".join(str(name) for name in (exc.filename, exc.filename2) if name)
        text = f"{exc.strerror}: {where}" if where else exc.strerror
    else:
        text = str(exc)
    return " ".join(text.split())


def err() -> Console:
    """stderr: logs, the live display, one-line errors (orchestrator.logs)."""
    from .logs import stderr_console

    return stderr_console()


def out() -> Console:
    """stdout: human results (status, plan, the closing summary); never wrapped in a file."""
    from .logs import stdout_console

    console = stdout_console()
    # rich ends the process itself (exit 1) on a closed pipe; `exits_cleanly` decides instead
    console.on_broken_pipe = _broken_pipe  # type: ignore[method-assign]
    return console


def _broken_pipe() -> None:
    raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def _say(label: str, message: str) -> None:
    """One line on stderr: a styled label, then the message as plain text."""
    from rich.text import Text

    line = Text.from_markup(label + " ")
    line.append(message)
    err().print(line, highlight=False, soft_wrap=True)


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll: POLLERR on its write end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def exits_cleanly(command: Callable[P, R]) -> Callable[P, R]:
    """Map the orchestrator's errors to one line on stderr and a documented exit code."""

    @wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            result = command(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe is found here, not at the interpreter's exit
            return result
        except BrokenPipeError:
            if not _stdout_closed():
                _say("[red]system:[/]", "Broken pipe")
                sys.exit(EXIT_FAILED)
            # the reader of stdout went away (`rollout report PLAN | head`): end quietly as a
            # process killed by SIGPIPE would, the rest of the output unwritten
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_PIPE_CLOSED)
        except KeyboardInterrupt:
            _say(
                "[yellow]interrupted:[/]",
                "in-flight state is in the journal; `rollout resume PLAN` finishes the run "
                "(`rollout run PLAN` if it had not started)",
            )
            sys.exit(EXIT_INTERRUPTED)
        except tuple(cls for cls, _, _ in ERROR_EXITS) as exc:
            label, code = next((lbl, c) for cls, lbl, c in ERROR_EXITS if isinstance(exc, cls))
            _say(label, _one_line(exc))
            sys.exit(code)
        except ModuleNotFoundError as exc:
            # a dependency the installed version lacks (the code was updated, not reinstalled):
            # said with click alone, as the missing module may be the console's own
            click.echo(
                f"installation: the Python package {exc.name!r} is missing; reinstall: "
                "pip install -e .  (in the project folder, with its virtual environment active)",
                err=True,
            )
            sys.exit(EXIT_FAILED)

    return wrapper


def _load(plan: Path) -> LoadedPlan:
    """The plan without the start-time check: reading commands and `resume` must work once a
    custom start has passed (the submitter moves it forward on the platform's clock)."""
    from .loaded_plan import load_plan

    return load_plan(plan)


def _load_following(plan: Path) -> LoadedPlan:
    """`watch`, `report --refresh`: the plan without its fleet (`load_following`)."""
    from .loaded_plan import load_following

    return load_following(plan)


def _journal_of(plan: Path, journal: Path | None) -> tuple[Path, str]:
    """The journal and the plan's name, from the plan file alone (its fleet is not read)."""
    from .journal import default_journal_path
    from .plan import read_plan

    name = read_plan(plan).name
    return (journal or default_journal_path(name, plan.parent)), name


def _start_logging() -> None:
    """structlog on the shared console, for the commands that talk to a platform."""
    from .logs import configure_logging

    settings = click.get_current_context().obj or {}
    configure_logging(settings.get("log_format", "console"), settings.get("log_level", "info"))


plan_argument = click.argument("plan", type=click.Path(path_type=Path))
journal_option = click.option(
    "--journal",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Journal file (default: .rollout/<plan name>.journal.sqlite beside the plan file).",
)


def _rate_limit(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, float]:
    calls, sep, seconds = value.partition("/")
    try:
        parsed = (int(calls), float(seconds))
    except ValueError:
        parsed = (0, 0.0)
    if not sep or parsed[0] < 1 or parsed[1] <= 0:
        raise click.BadParameter("expected CALLS/SECONDS with CALLS >= 1, e.g. 100/60")
    return parsed


class _OneLineUsageError(click.UsageError):
    """A click usage error shown as one line naming what is wrong and where to read more
    (house rule: bad input is one line, exit 2) — not click's Usage/Try/Error block."""

    def show(self, file: Any = None) -> None:
        where = self.ctx.command_path if self.ctx is not None else "rollout"
        _say("[red]error:[/]", f"{where}: {self.format_message()} (see {where} --help)")


class OneLineUsage(click.Group):
    """The `rollout` group: every usage error of it or of its commands (unknown command or
    option, missing argument, invalid value) is one line on stderr, exit 2."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _one_line_usage(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line_usage(exc) from None


def _one_line_usage(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, (_OneLineUsageError, click.exceptions.NoArgsIsHelpError)):
        return exc  # `rollout` alone asks for the help page
    return _OneLineUsageError(exc.format_message(), exc.ctx)


@click.group(cls=OneLineUsage, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rollout")
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    show_default=True,
    help="Logs on stderr: human-readable, or JSON lines for pipelines.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=STATE_ENV_VAR,
    help="Where this host keeps each app's shared token and call ledger "
    f"(default: ${STATE_ENV_VAR}, else the user's state directory; docs/host-state.md).",
)
@click.pass_context
def main(ctx: click.Context, log_format: str, log_level: str, state_dir: Path | None) -> None:
    """Exactly-once firmware rollouts for NB-IoT fleets through the platform's northbound API."""
    ctx.obj = {"log_format": log_format, "log_level": log_level, "state_dir": state_dir}


def _state_dir() -> Path | None:
    value = (click.get_current_context().obj or {}).get("state_dir")
    return value if isinstance(value, Path) else None


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8743, show_default=True, type=int)
@click.option(
    "--tls/--no-tls",
    default=True,
    show_default=True,
    help="TLS with a self-signed certificate made at start, or plain HTTP.",
)
@click.option(
    "--cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Serve this certificate (PEM) instead of a self-signed one; needs --key.",
)
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--client-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify client certificates against this CA (they stay optional).",
)
@click.option("--app-id", default="demo-app", show_default=True)
@click.option("--secret", default="demo-secret", show_default=True)
@click.option("--devices", default=2000, show_default=True, type=click.IntRange(0))
@click.option("--seed", default=1, show_default=True, type=int)
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Choice(["WM-200", "WM-310", "GM-10", "TR-1"]),
    help="Only devices of this model (repeat for several; default: all four). "
    "--devices 1000000 --model WM-200 is a million meters of one model.",
)
@click.option(
    "--write-fleet",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the fleet as CSV (deviceId,deviceType,model,manufacturerName,"
    "firmwareVersion,group) and go on serving.",
)
@click.option(
    "--rate-limit",
    default="100/60",
    show_default=True,
    callback=_rate_limit,
    help="Flow control: at most CALLS calls per app in any SECONDS window.",
)
@click.option(
    "--speed",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Simulated seconds per real second (device behaviour only).",
)
@click.option("--token-ttl", default=3600.0, show_default=True, type=click.FloatRange(min=1))
@click.option(
    "--failure-rate",
    type=click.FloatRange(0, 1),
    default=None,
    help="Every model fails upgrades at this rate (and no device is offline or "
    "already upgraded), for a known failure share.",
)
@click.option("--latency-ms", default=0.0, type=click.FloatRange(min=0), help="Added latency.")
@click.option("--jitter-ms", default=0.0, type=click.FloatRange(min=0), help="± jitter.")
@click.option(
    "--create-refuse-rate",
    default=0.0,
    type=click.FloatRange(0, 1),
    help="Share of creates refused with HTTP 500 before anything is committed.",
)
@click.option(
    "--create-ambiguous-rate",
    default=0.0,
    type=click.FloatRange(0, 1),
    help="Share of creates that commit, then fail (500, dropped, or delayed reply).",
)
@click.option("--ambiguous-kinds", default="500,drop,delay", show_default=True)
@click.option(
    "--ambiguous-delay",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a delayed reply is held.",
)
@click.option(
    "--storm-share",
    default=0.0,
    type=click.FloatRange(0, 1),
    help="Another client spends this share of the app's budget.",
)
@click.option("--fault-seed", default=0, type=int)
@click.option(
    "--list-lag",
    default=0.0,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="A task stays out of the task list for this many real seconds after its commit.",
)
@click.option(
    "--late-commit",
    default=0.0,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Valid creates commit this many real seconds after they arrive, client or not.",
)
@click.option(
    "--clock-offset",
    default=0.0,
    type=float,
    metavar="SECONDS",
    help="The platform's clock runs this far ahead of simulated time (negative: behind).",
)
@click.option(
    "--omit-extend-para",
    is_flag=True,
    help="Task replies carry no extendPara key.",
)
@click.option(
    "--reject-next-creates",
    default=0,
    type=click.IntRange(min=0),
    metavar="N",
    help="Refuse the next N valid creates before commit (status: --reject-status).",
)
@click.option(
    "--reject-status",
    default=400,
    show_default=True,
    type=click.IntRange(400, 599),
    help="HTTP status of those refusals: 400 with a platform error body, else a gateway reply.",
)
@click.option(
    "--rollback-rate",
    default=0.0,
    type=click.FloatRange(0, 1),
    help="Share of upgrades reported as succeeded whose device rolled back (the subtask "
    "reports the old version).",
)
@click.option(
    "--detail-padding",
    default=0,
    type=click.IntRange(0),
    metavar="CHARS",
    help="Each failed subtask's detailInfo names its device and carries CHARS more characters "
    "(failure texts long and each one different).",
)
@click.option(
    "--outage",
    default=0.0,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="From the first call on, a gateway answers every platform call with --outage-status "
    "for this many real seconds (nothing is counted or done).",
)
@click.option(
    "--outage-status",
    default=503,
    show_default=True,
    type=click.Choice(["502", "503", "504"]),
)
@click.option(
    "--state",
    "state_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Keep the platform's state in FILE: loaded on start (when it exists), saved within "
    "half a second of each change and on shutdown — a restarted simulator goes on where it "
    "stopped (tasks, groups, tokens, clock, counters) and never repeats an operationId.",
)
@click.option(
    "--throttle-next-calls",
    default=0,
    type=click.IntRange(min=0),
    metavar="N",
    help="Refuse the next N calls with 1010009, as if another client had filled the window.",
)
@click.option(
    "--revoke-next-tokens",
    default=0,
    type=click.IntRange(min=0),
    metavar="N",
    help="Revoke the app's token before each of the next N authenticated calls (1010005).",
)
@click.option(
    "--only-api",
    default="",
    metavar="API",
    help="The two knobs above act only on calls of this API (login, refreshToken, "
    "createTask, listTasks, ...).",
)
@exits_cleanly
def simulator(
    host: str,
    port: int,
    tls: bool,
    cert: Path | None,
    key: Path | None,
    client_ca: Path | None,
    app_id: str,
    secret: str,
    devices: int,
    seed: int,
    models: tuple[str, ...],
    write_fleet: Path | None,
    rate_limit: tuple[int, float],
    speed: float,
    token_ttl: float,
    latency_ms: float,
    jitter_ms: float,
    create_refuse_rate: float,
    create_ambiguous_rate: float,
    ambiguous_kinds: str,
    ambiguous_delay: float,
    storm_share: float,
    fault_seed: int,
    list_lag: float,
    late_commit: float,
    clock_offset: float,
    omit_extend_para: bool,
    reject_next_creates: int,
    reject_status: int,
    rollback_rate: float,
    detail_padding: int,
    outage: float,
    outage_status: str,
    state_file: Path | None,
    throttle_next_calls: int,
    revoke_next_tokens: int,
    only_api: str,
    failure_rate: float | None,
) -> None:
    """Serve the simulated platform (the northbound API of platform-api.md) on loopback.

    Admin endpoints, not part of the platform and without token: GET /_sim/stats,
    GET /_sim/tasks, GET /_sim/arrivals, GET|POST /_sim/faults, GET|POST /_sim/clock.
    """
    if (cert is None) != (key is None):
        raise click.UsageError("--cert and --key go together")
    kinds = [kind.strip() for kind in ambiguous_kinds.split(",") if kind.strip()]
    if not kinds or any(kind not in ("500", "drop", "delay") for kind in kinds):
        raise click.BadParameter("a comma list of 500, drop, delay", param_hint="--ambiguous-kinds")
    if not abs(clock_offset) < 1e9:  # also refuses nan and inf
        raise click.BadParameter("a finite number of seconds", param_hint="--clock-offset")
    import signal

    import anyio

    from .simulator import FaultConfig, SimulatorConfig, SimulatorServer, write_fleet_csv
    from .simulator.fleet import FleetTooLarge
    from .simulator.state import StateError

    _start_logging()
    stderr = err()
    config = SimulatorConfig(
        host=host,
        port=port,
        tls=tls,
        cert_file=cert,
        key_file=key,
        client_ca=client_ca,
        app_id=app_id,
        secret=secret,
        devices=devices,
        seed=seed,
        models=models or None,
        rate_limit=rate_limit,
        token_ttl=token_ttl,
        speed=speed,
        failure_rate=failure_rate,
        faults=FaultConfig(
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            create_refuse_rate=create_refuse_rate,
            create_ambiguous_rate=create_ambiguous_rate,
            ambiguous_kinds=kinds,
            ambiguous_delay_s=ambiguous_delay,
            storm_share=storm_share,
            seed=fault_seed,
            list_lag_s=list_lag,
            late_commit_s=late_commit,
            clock_offset_s=clock_offset,
            omit_extend_para=omit_extend_para,
            reject_next_creates=reject_next_creates,
            reject_status=reject_status,
            rollback_rate=rollback_rate,
            detail_padding=detail_padding,
            outage_s=outage,
            outage_status=int(outage_status),
            throttle_next_calls=throttle_next_calls,
            revoke_next_tokens=revoke_next_tokens,
            only_api=only_api,
        ),
        state_file=state_file,
    )

    async def serve() -> None:
        try:
            server = SimulatorServer(config)
        except StateError as exc:
            raise InputError(str(state_file), "--state", str(exc)) from None
        except FleetTooLarge as exc:
            raise InputError("rollout simulator", "--devices", str(exc)) from None
        try:
            await server.start()
        except OSError as exc:
            if state_file is not None and exc.filename is not None:
                raise InputError(
                    str(state_file), "--state", f"cannot write it: {_one_line(exc)}"
                ) from None
            raise InputError(f"--host {host} --port {port}", "", _listen_fault(exc)) from None
        try:
            if write_fleet is not None:
                try:
                    write_fleet_csv(server.fleet, write_fleet)
                except OSError as exc:
                    raise InputError(
                        str(write_fleet), "--write-fleet", f"cannot write it: {_one_line(exc)}"
                    ) from None
            stderr.print(
                f"[bold]Simulated platform[/] at {server.url}  "
                f"(app_id {app_id}, {devices} devices, rate limit "
                f"{rate_limit[0]}/{rate_limit[1]:g}s, speed ×{speed:g})"
            )
            if server.cert_file is not None:
                stderr.print(f"TLS certificate (use as ca_file): {server.cert_file}")
            if write_fleet is not None:
                stderr.print(f"Fleet written to {write_fleet}")
            if state_file is not None:
                again = "restored from" if server.restored else "kept in"
                stderr.print(f"State {again} {state_file}")
            stderr.print("Ctrl-C to stop.")
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
        finally:
            await server.close()
        stderr.print("Simulator stopped.")

    anyio.run(serve)


def _listen_fault(exc: OSError) -> str:
    import errno

    if exc.errno == errno.EADDRINUSE:
        return "the port is in use (another simulator?): pick another --port, or 0 for any free one"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "not allowed to listen there (ports under 1024 need privileges): pick another --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "not an address of this machine: use 127.0.0.1"
    return f"cannot listen there: {_one_line(exc)}"


@main.command("plan")
@plan_argument
@click.option("--json", "as_json", is_flag=True, help="Print the preview as JSON on stdout.")
@click.option(
    "--offline",
    is_flag=True,
    help="Make no call at all: a group fleet's members are then not read, nor its groups "
    "checked for shared devices (a new run still checks them before any create).",
)
@exits_cleanly
def plan_command(plan: Path, as_json: bool, offline: bool) -> None:
    """Check PLAN offline and preview it: package, fleet, policy, waves and gates, calls,
    ETA, the secret. Nothing is created; for a group fleet, the groups' members are then read
    from the platform (the calls are shown; `--offline`: no call)."""
    import json
    from datetime import UTC, datetime

    from .journal import default_journal_path, has_run
    from .loaded_plan import load_plan
    from .planner import chunk_count
    from .preview import add_groups, preview, rows
    from .status import read_status

    loaded = load_plan(plan, check_start=True)
    data = preview(loaded, chunk_count(loaded.waves), datetime.now(UTC))
    if loaded.fleet.kind == "groups" and not offline:
        # the offline checks passed; learning the groups' members takes calls (shown)
        import anyio

        from .engine import preview_groups

        _start_logging()
        if not loaded.plan.platform.is_simulator:
            loaded.secret()
        groups, spent = anyio.run(preview_groups, loaded, _state_dir())
        add_groups(data, loaded, groups, spent)
    path = default_journal_path(loaded.plan.name, loaded.base_dir)  # not the engine: offline
    known = read_status(path, loaded.plan.name) if has_run(path, loaded.plan.name) else None
    if as_json:
        if known is not None:
            data["journal"] = {k: known[k] for k in ("run_id", "status", "targets_in_tasks_by")}
        click.echo(json.dumps(data, indent=2))
        return
    from rich.table import Table

    sent = "group members read, nothing created" if "group_members" in data else "nothing sent"
    table = Table(title=f"plan {loaded.plan.name}: checked, {sent}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for what, value in rows(data, known):
        table.add_row(what, value)
    out().print(table)


def _drive(
    plan: Path,
    journal: Path | None,
    new_run: bool,
    resume_only: bool,
    follow: bool | None,
    unknown_tasks: str,
    ignore_census: bool,
    step: bool,
    metrics: tuple[int | None, str],
) -> None:
    from .census import UnknownTasks
    from .display import RunDisplay
    from .engine import RunOptions, execute, journal_path
    from .journal import has_run, unfinished_pass
    from .plan import check_times
    from .status import read_status

    _start_logging()
    loaded = _load(plan)
    path = journal_path(loaded, journal)
    if resume_only and not path.exists():  # nothing to resume: and no empty journal left behind
        raise JournalError(f"{path}: no run of plan {loaded.plan.name!r} to resume")
    if not resume_only and (new_run or not has_run(path, loaded.plan.name)):
        check_times(loaded.plan, str(loaded.path))  # a first run refuses a passed start
    display = RunDisplay(err(), len(loaded.fleet.members))
    if (resume_only or (step and not new_run)) and unfinished_pass(
        path, loaded.plan.name
    ) is not None:
        # resuming (or stepping on) means finishing what was under way: here a retry pass —
        # one submitted without following is judged by the plan's last gate
        from .passes import RetryOptions, retry

        again = RetryOptions(
            journal=journal,
            follow=follow,
            unknown_tasks=UnknownTasks(unknown_tasks),
            state_dir=_state_dir(),
            step=step,
        )
        with _metrics(path, loaded.plan.name, *metrics):
            done = _interruptible(lambda: retry(loaded, again, display), display)
        _show_status(read_status(done.journal, loaded.plan.name))
        return
    options = RunOptions(
        journal=journal,
        new_run=new_run,
        resume_only=resume_only,
        follow=follow,
        unknown_tasks=UnknownTasks(unknown_tasks),
        ignore_census=ignore_census,
        state_dir=_state_dir(),
        step=step,
    )

    with _metrics(path, loaded.plan.name, *metrics):
        result = _interruptible(lambda: execute(loaded, options, display), display)
    if result.already_completed:
        _say(
            "[green]done:[/]",
            f"run {result.run_id} of {loaded.plan.name} is already completed; nothing was "
            "sent, no call made (--new-run starts another)",
        )
    _show_status(read_status(result.journal, loaded.plan.name))


@contextmanager
def _metrics(path: Path, plan_name: str, port: int | None, host: str) -> Iterator[None]:
    """Serve the run's metrics (from its journal) while the block runs, when asked."""
    if port is None:
        yield
        return
    from .metrics import serve

    try:
        server = serve(path, plan_name, port, host)
    except OSError as exc:
        raise InputError(
            "--metrics-port", "", f"cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    _say("[dim]metrics:[/]", f"http://{host}:{server.server_port}/metrics")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def _interruptible(work: Callable[[], Awaitable[R]], display: RunDisplay | None = None) -> R:
    """Run `work`; Ctrl-C or SIGTERM cancels it cleanly (the engine records what was in
    flight) and ends the command with exit code 130."""
    import asyncio
    import signal

    import anyio

    signals_seen: list[int] = []

    async def main_task() -> R | None:
        scope = anyio.CancelScope()
        loop = asyncio.get_running_loop()

        def on_signal(number: int) -> None:
            from .notify import interrupt_drains

            signals_seen.append(number)
            scope.cancel()
            interrupt_drains()  # the run's end waiting on webhooks stops waiting

        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, on_signal, number)
        try:
            with scope:
                return await work()
            return None  # cancelled by a signal
        finally:
            for number in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(number)

    try:
        outcome = anyio.run(main_task)
    finally:
        if display is not None:
            display.stop()
    if outcome is None:  # cancelled by a signal before the work got to its end
        raise KeyboardInterrupt
    return outcome  # a signal after the run's end (its webhooks' drain) leaves its result


def _show_status(status: dict[str, Any]) -> None:
    """The closing summary on stdout: a table for people, one JSON object with
    `--log-format json` (logs stay on stderr in both modes)."""
    if (click.get_current_context().obj or {}).get("log_format") == "json":
        keys = (
            "plan",
            "run_id",
            "status",
            "stop_reason",
            "targets",
            "targets_in_tasks",
            "targets_quarantined",
            "devices_succeeded",
            "devices_failed",
            "devices_failed_unread",
            "devices_already_current",
            "calls",
        )
        import json

        click.echo(json.dumps({"summary": "run"} | {key: status[key] for key in keys}))
    else:
        _print_status(status)


follow_option = click.option(
    "--follow/--no-follow",
    default=None,
    help="Watch the tasks to their end after submitting (default: the plan's monitor.follow).",
)
UNKNOWN_TASKS_CHOICES = ("stop", "skip", "send")  # census.UnknownTasks (a test pins it)
unknown_tasks_option = click.option(
    "--unknown-tasks",
    type=click.Choice(UNKNOWN_TASKS_CHOICES),
    default="stop",
    show_default=True,
    help="Targets already in a task whose package the platform does not report: stop and "
    "ask, skip them (count them as in that task), or send them anyway.",
)
metrics_port_option = click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics of the run at http://HOST:PORT/metrics while it goes.",
)
metrics_host_option = click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics endpoint listens on (0.0.0.0: every interface).",
)
step_option = click.option(
    "--step",
    is_flag=True,
    help="For schedulers (systemd timer, CronJob): go as far as possible now — census, "
    "submit what may be submitted, one monitor poll, judge the gates — then exit 75 when the "
    "rest needs time (tasks running, a soak, an approval) instead of sleeping. Call again.",
)
ignore_census_option = click.option(
    "--ignore-census",
    is_flag=True,
    help="DANGER: send targets even when the platform already holds them in a task of this "
    "package (each becomes a duplicate; the closing census reports them, exit 5).",
)


@main.command()
@plan_argument
@journal_option
@click.option(
    "--new-run",
    is_flag=True,
    help="Start a new run even if the journal has one (targets the platform already holds "
    "in a task of this package are adopted, not sent again).",
)
@follow_option
@unknown_tasks_option
@ignore_census_option
@step_option
@metrics_port_option
@metrics_host_option
@exits_cleanly
def run(
    plan: Path,
    journal: Path | None,
    new_run: bool,
    follow: bool | None,
    unknown_tasks: str,
    ignore_census: bool,
    step: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run PLAN: submit one upgrade task per chunk, exactly once, wave by wave; watch them."""
    metrics = (metrics_port, metrics_host)
    _drive(plan, journal, new_run, False, follow, unknown_tasks, ignore_census, step, metrics)


@main.command()
@plan_argument
@journal_option
@follow_option
@unknown_tasks_option
@ignore_census_option
@step_option
@metrics_port_option
@metrics_host_option
@exits_cleanly
def resume(
    plan: Path,
    journal: Path | None,
    follow: bool | None,
    unknown_tasks: str,
    ignore_census: bool,
    step: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Finish the journal's run of PLAN: census, settle in-flight chunks, then go on."""
    metrics = (metrics_port, metrics_host)
    _drive(plan, journal, False, True, follow, unknown_tasks, ignore_census, step, metrics)


RETRY_CHOICE_NAMES = ("fail", "timeout", "stop", "never-started")  # passes.RETRY_CHOICES (pinned)


def _retry_states(_ctx: click.Context, _param: click.Parameter, value: str) -> frozenset[str]:
    from .passes import RETRY_CHOICES

    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in RETRY_CHOICES]
    if not names or unknown:
        raise click.BadParameter(
            f"a comma list of {', '.join(RETRY_CHOICES)}"
            + (f" (not {', '.join(unknown)})" if unknown else "")
        )
    return frozenset(value for name in names for value in RETRY_CHOICES[name])


@main.command("retry")
@plan_argument
@journal_option
@click.option(
    "--states",
    default=",".join(RETRY_CHOICE_NAMES),
    show_default=True,
    callback=_retry_states,
    help="Which devices get another task, by how their subtask ended in their latest pass: "
    "fail (failed after starting, or succeeded reporting another version), timeout (never "
    "came online in time), stop (stopped), never-started (timed out, or stopped before "
    "starting).",
)
@follow_option
@unknown_tasks_option
@step_option
@exits_cleanly
def retry_command(
    plan: Path,
    journal: Path | None,
    states: frozenset[str],
    follow: bool | None,
    unknown_tasks: str,
    step: bool,
) -> None:
    """A retry pass: new tasks for the devices of PLAN's finished run whose latest outcome is
    one of --states — exactly once per pass, journaled, judged by the plan's last gate. An
    unfinished pass is finished first."""
    from .census import UnknownTasks
    from .display import RunDisplay
    from .passes import RetryOptions, retry
    from .status import read_status

    _start_logging()
    loaded = _load(plan)
    options = RetryOptions(
        journal=journal,
        states=states,
        follow=follow,
        unknown_tasks=UnknownTasks(unknown_tasks),
        state_dir=_state_dir(),
        step=step,
    )
    display = RunDisplay(err(), len(loaded.fleet.members))
    result = _interruptible(lambda: retry(loaded, options, display), display)
    if result.pass_no is None:
        click.echo(
            f"nothing to retry: no device of run {result.run_id} ended as asked "
            f"({', '.join(sorted(states))})"
        )
        return
    click.echo(f"retry pass {result.pass_no} of run {result.run_id}: {result.targets} devices")
    _show_status(read_status(result.journal, loaded.plan.name))


@main.command()
@plan_argument
@journal_option
@metrics_port_option
@metrics_host_option
@exits_cleanly
def watch(plan: Path, journal: Path | None, metrics_port: int | None, metrics_host: str) -> None:
    """Follow PLAN's submitted tasks to their end (statuses, failure details); submit nothing."""
    from .display import RunDisplay
    from .engine import journal_path
    from .engine import watch as watch_run
    from .status import read_status

    _start_logging()
    loaded = _load_following(plan)  # the fleet file is not read: the journal has the tasks
    path = journal_path(loaded, journal)
    targets = read_status(path, loaded.plan.name)["targets"] if path.exists() else 0
    display = RunDisplay(err(), targets)
    with _metrics(path, loaded.plan.name, metrics_port, metrics_host):
        state_dir = _state_dir()
        result = _interruptible(
            lambda: watch_run(loaded, journal, observer=display, state_dir=state_dir), display
        )
    _show_status(read_status(result.journal, loaded.plan.name))


@main.command()
@plan_argument
@journal_option
@click.option("--wave", help="The wave to approve (default: the first not yet passed).")
@click.option(
    "--by",
    default=lambda: os.environ.get("USER", "operator"),
    show_default="$USER",
    help="Who approves (kept in the journal).",
)
@exits_cleanly
def approve(plan: Path, journal: Path | None, wave: str | None, by: str) -> None:
    """Approve the gate of a wave that waits for a decision (failed, or passed and awaiting
    approval): it passes when the run resumes — a failed gate only while its failure share
    is no worse than the one approved."""
    from .journal import approve_wave

    path, name = _journal_of(plan, journal)
    approval = approve_wave(path, name, wave, by, source=str(plan))
    if approval.state == "failed":
        what = f"its failed gate ({approval.reason}); it halts again once {approval.rule()}"
    else:
        what = f"its gate, passed and awaiting approval ({approval.reason})"
    click.echo(f"approved wave {approval.wave!r} by {by}: {what}. `rollout resume` goes on.")


IN_TASK_BY = {
    "created": "created by this run",
    "reconciled": "found after an ambiguous create",
    "census": "already in a task (census)",
    "second-claim": "second claim on a task (anomaly)",
    "census-unconfirmed": "in a task of unknown package (--unknown-tasks skip)",
}


NARROW_COLUMNS = 120  # a status narrower than this prints the gates' reasons below the table


def _print_status(status: dict[str, Any]) -> None:
    from datetime import UTC, datetime

    from rich.table import Table

    console = out()
    table = Table(title=f"{status['plan']} — run {status['run_id']}: {status['status']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("targets", str(status["targets"]))
    table.add_row("in upgrade tasks", str(status["targets_in_tasks"]))
    for how, count in sorted(status["targets_in_tasks_by"].items()):
        table.add_row(f"  {IN_TASK_BY.get(how, how)}", str(count))
    table.add_row("quarantined", str(status["targets_quarantined"]))
    table.add_row("remaining", str(status["targets_remaining"]))
    table.add_row("devices upgraded", str(status["devices_succeeded"]))
    table.add_row("  version verified", str(status["devices_version_verified"]))
    table.add_row("devices failed", str(status["devices_failed"]))
    if status.get("devices_failed_unread"):
        table.add_row("  failed, reason not read yet", str(status["devices_failed_unread"]))
    current, left_out = (
        status["devices_already_current"],
        status["devices_left_out_already_current"],
    )
    table.add_row(
        "devices already current",
        f"{current} ({left_out} left out by the fleet file)" if left_out else str(current),
    )
    table.add_row("tasks final / observed", f"{status['tasks_final']} / {status['tasks_observed']}")
    for state, values in sorted(status["chunks"].items()):
        table.add_row(f"chunks {state}", str(values["chunks"]))
    for outcome, count in sorted(status["attempts"].items()):
        table.add_row(f"create attempts {outcome}", str(count))
    if status["duplicates"]:
        table.add_row("[red]targets in two tasks[/]", str(status["duplicates"]))
    if status["anomalies"]:
        table.add_row("[red]anomalies (journal)[/]", str(status["anomalies"]))
    if status["stop_reason"]:
        table.add_row("stop reason", str(status["stop_reason"]))
    updated = datetime.fromtimestamp(status["updated_at"], UTC).isoformat(timespec="seconds")
    table.add_row("updated", updated)
    console.print(table)
    if len(status["waves"]) > 1 or (status["waves"] and status["waves"][0]["name"] != "all"):
        waves = Table(title="waves")
        # a narrow terminal squeezes a reason to a word a line: then the reasons follow the
        # table, one line each
        narrow = console.width < NARROW_COLUMNS
        columns = ("wave", "targets", "in tasks", "upgraded", "failed", "current", "gate")
        for column in (*columns, *(() if narrow else ("reason",))):
            waves.add_column(column)
        reasons = []
        groups = status["target_kind"] == "groups"
        for w in status["waves"]:
            gate = w["gate"] + (" (approved)" if w["approved"] else "")
            in_tasks = (
                f"{w['in_tasks']} groups, {w['devices']} devices" if groups else w["in_tasks"]
            )
            waves.add_row(
                w["name"],
                str(w["targets"]),
                str(in_tasks),
                str(w["succeeded"]),
                str(w["failed"]),
                str(w["already_current"]),
                gate,
                *(() if narrow else (w["gate_reason"] or "",)),
            )
            if narrow and w["gate_reason"]:
                reasons.append(f"{w['name']}: {w['gate_reason']}")
        console.print(waves)
        for reason in reasons:
            console.print(reason, highlight=False, markup=False)
    if status.get("passes"):
        passes = Table(title="retry passes")
        for column in ("pass", "retried", "devices", "upgraded", "failed", "current", "status"):
            passes.add_column(column)
        for r in status["passes"]:
            passes.add_row(
                str(r["pass"]),
                ", ".join(r["states"]),
                str(r["targets"]),
                str(r["succeeded"]),
                str(r["failed"]),
                str(r["already_current"]),
                f"{r['pass_status']} (gate {r['gate']})",
            )
        console.print(passes)
    lines = []
    if status["calls"]:
        lines.append("calls spent: " + ", ".join(f"{k} {v}" for k, v in status["calls"].items()))
    for row in status["quarantined"][:20]:
        lines.append(f"  quarantined {row['target']}: {row['error_code']} {row['reason']}")
    for row in status["duplicate_examples"]:
        lines.append(f"  in two tasks {row['target']}: {', '.join(row['operation_ids'])}")
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@main.command()
@plan_argument
@journal_option
@click.option("--json", "as_json", is_flag=True, help="The same as --format json.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "prometheus"]),
    default="table",
    show_default=True,
    help="prometheus: the run's metrics as a textfile for node_exporter.",
)
@exits_cleanly
def status(plan: Path, journal: Path | None, as_json: bool, fmt: str) -> None:
    """Show the state of PLAN's latest run, from the journal alone."""
    path, name = _journal_of(plan, journal)
    if fmt == "prometheus":
        from .metrics import textfile
        from .status import read_status

        read_status(path, name)  # no journal, no run: exit 3 as for a table, not empty text
        click.echo(textfile(path, name), nl=False)
        return
    from .status import read_status

    result = read_status(path, name)
    if as_json or fmt == "json":
        import json

        click.echo(json.dumps(result, indent=2))
    else:
        _print_status(result)


REPORT_FORMATS = ("csv", "html", "json", "jsonl")  # report.WRITERS (a test pins it)
HTML_LIST_LIMIT = 1_000  # report_model.DEFAULT_LISTED (a test pins it; not imported: startup)


@main.command()
@plan_argument
@journal_option
@click.option(
    "--format", "fmt", type=click.Choice(REPORT_FORMATS), default="html", show_default=True
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here (default: stdout).",
)
@click.option(
    "--refresh",
    "refresh_first",
    is_flag=True,
    help="Poll the platform once before reporting (spends calls); by default the "
    "report comes from the journal alone.",
)
@click.option(
    "--html-list-limit",
    "listed",
    type=click.IntRange(min=0),
    default=HTML_LIST_LIMIT,
    show_default=True,
    help="HTML: list every device up to this many; above, list the failed, quarantined and "
    "already-current devices up to this many each, with the count beyond (the full list is "
    "in CSV, JSON and JSON Lines).",
)
@exits_cleanly
def report(
    plan: Path,
    journal: Path | None,
    fmt: str,
    output: Path | None,
    refresh_first: bool,
    listed: int,
) -> None:
    """Report PLAN's run: one row per device, per-task and per-wave summaries, quarantined
    devices, failure reasons and the calls spent — as CSV, JSON, JSON Lines (one device a
    line) or a self-contained HTML page of bounded size."""
    from .report import WRITERS, collect

    if refresh_first:
        import anyio

        from .engine import refresh

        _start_logging()
        anyio.run(refresh, _load_following(plan), journal, _state_dir())
    path, name = _journal_of(plan, journal)
    data = collect(path, name, listed, reasons=fmt in ("html", "json"))  # only they show them
    if output is None:
        WRITERS[fmt](data, sys.stdout)
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)  # a missing folder is created
        with output.open("w", encoding="utf-8", newline="") as handle:
            WRITERS[fmt](data, handle)
    except OSError as exc:
        raise InputError(
            str(output), "--output", f"cannot write the report there: {_one_line(exc)}"
        ) from None
    err().print(f"{fmt} report written to {output}", highlight=False)


PRIORITY_NAMES = {0: "login", 1: "submit", 2: "monitor"}


@main.command()
@click.argument("plan", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the budget as JSON on stdout.")
@exits_cleanly
def budget(plan: Path | None, as_json: bool) -> None:
    """Which processes of this host share an app's call budget now, and how many calls each
    made in the last window — PLAN's app, or every app with state on this host."""
    import json

    from .northbound.hoststate import AppState, known_apps, state_root
    from .northbound.ledger import read_budget

    root = state_root(_state_dir())
    if plan is not None:
        loaded = _load(plan)
        platform = loaded.plan.platform
        if platform.is_simulator:
            err().print(
                "the embedded simulator's budget belongs to one process: nothing shared",
                highlight=False,
            )
            apps: list[AppState] = []
        else:
            apps = [AppState.locate(root, platform.url, platform.app_id)]
    else:
        apps = list(known_apps(root))
    views: list[tuple[AppState, BudgetView | None]] = []
    for app in apps:
        try:
            views.append((app, read_budget(app.ledger_file)))
        except sqlite3.Error as exc:
            raise JournalError(
                f"{app.ledger_file}: the pacing ledger cannot be read ({exc})"
            ) from None
    if as_json:
        rows = [
            {
                "base_url": app.base_url,
                "app_id": app.app_id,
                "directory": str(app.directory),
                "budget": v.as_dict() if v else None,
            }
            for app, v in views
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    if not any(view for _, view in views):
        click.echo(f"no process of this host has used an app's budget lately (state: {root})")
        return
    for app, view in views:
        if view is not None:
            _print_budget(app, view)


def _print_budget(app: AppState, view: BudgetView) -> None:
    from rich.table import Table
    from rich.text import Text

    title = (
        f"app {app.app_id} at {app.base_url}: {view.calls} calls / {view.seconds:g} s, "
        f"{view.taken} slots taken now"
    )
    if view.share < 1:
        title += f", this host grants itself {view.share:.0%} (throttled lately)"
    if view.paused_for > 0:
        title += f", paused {view.paused_for:.1f} s"
    out().print(Text(title, style="italic"), soft_wrap=True)  # one line, never wrapped
    table = Table()
    for column in ("process", "pid", "state", f"calls in the last {view.seconds:g} s", "throttled"):
        table.add_column(column)
    for owner in view.owners:
        state = owner.state
        if owner.waiting_priority is not None:
            state += f" ({PRIORITY_NAMES.get(owner.waiting_priority, owner.waiting_priority)})"
        table.add_row(
            owner.label,
            str(owner.pid),
            state,
            str(owner.calls_last_window),
            str(owner.throttled_last_window),
        )
    out().print(table)
