"""The `rollout` command line.

Exit codes (docs/exit-codes.md): 0 done; 1 the run failed or stopped on a platform refusal;
2 bad input (plan, fleet file, options) — nothing was sent; 3 the journal is locked or does not
match the plan; 130 interrupted (Ctrl-C), in-flight state recorded.
"""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import click
from rich.console import Console

from . import __version__
from .logs import configure_logging
from .simulator import FaultConfig, SimulatorConfig, SimulatorServer, write_fleet_csv

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_JOURNAL = 3
EXIT_INTERRUPTED = 130

stderr = Console(stderr=True)


def _rate_limit(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, float]:
    calls, sep, seconds = value.partition("/")
    try:
        parsed = (int(calls), float(seconds))
    except ValueError:
        parsed = (0, 0.0)
    if not sep or parsed[0] < 1 or parsed[1] <= 0:
        raise click.BadParameter("expected CALLS/SECONDS with CALLS >= 1, e.g. 100/60")
    return parsed


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
def main(log_format: str, log_level: str) -> None:
    """Exactly-once firmware rollouts for NB-IoT fleets through the platform's northbound API."""
    configure_logging(log_format, log_level)


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
) -> None:
    """Serve the simulated platform (the northbound API of platform-api.md) on loopback.

    Admin endpoints, not part of the platform and without token: GET /_sim/stats,
    GET /_sim/tasks, GET|POST /_sim/faults, GET|POST /_sim/clock.
    """
    if (cert is None) != (key is None):
        raise click.UsageError("--cert and --key go together")
    kinds = [kind.strip() for kind in ambiguous_kinds.split(",") if kind.strip()]
    if not kinds or any(kind not in ("500", "drop", "delay") for kind in kinds):
        raise click.BadParameter("a comma list of 500, drop, delay", param_hint="--ambiguous-kinds")
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
        rate_limit=rate_limit,
        token_ttl=token_ttl,
        speed=speed,
        faults=FaultConfig(
            latency_ms=latency_ms,
            jitter_ms=jitter_ms,
            create_refuse_rate=create_refuse_rate,
            create_ambiguous_rate=create_ambiguous_rate,
            ambiguous_kinds=kinds,
            ambiguous_delay_s=ambiguous_delay,
            storm_share=storm_share,
            seed=fault_seed,
        ),
    )

    async def serve() -> None:
        async with SimulatorServer(config) as server:
            if write_fleet is not None:
                write_fleet_csv(server.fleet, write_fleet)
            stderr.print(
                f"[bold]Simulated platform[/] at {server.url}  "
                f"(app_id {app_id}, {devices} devices, rate limit "
                f"{rate_limit[0]}/{rate_limit[1]:g}s, speed ×{speed:g})"
            )
            if server.cert_file is not None:
                stderr.print(f"TLS certificate (use as ca_file): {server.cert_file}")
            if write_fleet is not None:
                stderr.print(f"Fleet written to {write_fleet}")
            stderr.print("Ctrl-C to stop.")
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
        stderr.print("Simulator stopped.")

    anyio.run(serve)
