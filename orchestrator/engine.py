"""A rollout end to end: plan → journal → platform session → submitter → journal.

`execute` is what `rollout run` and `rollout resume` call; tests call it directly too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydantic import SecretStr

from .errors import JournalError, JournalMismatch, RunAborted
from .journal import ABORTED, COMPLETED, INTERRUPTED, RUNNING, Journal, default_journal_path
from .northbound import ClientConfig, NorthboundClient, TLSConfig
from .plan import LoadedPlan
from .planner import plan_chunks
from .simulator import DEFAULT_SECRET, SimulatorConfig, SimulatorServer
from .submitter import ProgressHook, Submitter, resolve_package

log = structlog.get_logger("orchestrator.engine")


@dataclass(frozen=True)
class RunOptions:
    journal: Path | None = None
    new_run: bool = False
    resume_only: bool = False


@dataclass(frozen=True)
class RunResult:
    run_id: int
    journal: Path
    counts: dict[str, int]


def journal_path(loaded: LoadedPlan, override: Path | None) -> Path:
    return override if override is not None else default_journal_path(loaded.plan.name)


@asynccontextmanager
async def platform_client(loaded: LoadedPlan) -> AsyncIterator[NorthboundClient]:
    """A client for the plan's platform; with `url = "simulator"`, an embedded one."""
    platform = loaded.plan.platform
    if platform.is_simulator:
        sim = platform.simulator
        server = SimulatorServer(
            SimulatorConfig(
                port=0,
                tls=True,
                app_id=platform.app_id,
                devices=sim.devices,
                seed=sim.seed,
                speed=sim.speed,
                rate_limit=platform.rate,
            )
        )
        async with server:
            log.info("embedded simulator started", url=server.url, devices=sim.devices)
            config = ClientConfig(
                base_url=server.url,
                app_id=platform.app_id,
                secret=SecretStr(DEFAULT_SECRET),
                tls=TLSConfig(ca_file=server.cert_file),
                rate_limit=platform.rate,
                connect_timeout=platform.connect_timeout,
                total_timeout=platform.request_timeout,
            )
            async with NorthboundClient(config) as client:
                yield client
        return
    base = loaded.base_dir
    tls = TLSConfig(
        ca_file=base / platform.ca_file if platform.ca_file else None,
        client_cert=base / platform.client_cert if platform.client_cert else None,
        client_key=base / platform.client_key if platform.client_key else None,
        insecure=platform.insecure,
    )
    config = ClientConfig(
        base_url=platform.url,
        app_id=platform.app_id,
        secret=SecretStr(loaded.secret()),
        tls=tls,
        rate_limit=platform.rate,
        connect_timeout=platform.connect_timeout,
        total_timeout=platform.request_timeout,
    )
    async with NorthboundClient(config) as client:
        yield client


def _check_same_inputs(
    loaded: LoadedPlan, run_id: int, plan_sha: str, fleet_sha: str, path: Path
) -> None:
    changed = []
    if plan_sha != loaded.plan_sha:
        changed.append(f"the plan file {loaded.path}")
    if fleet_sha != loaded.fleet.sha256:
        changed.append(f"the fleet ({loaded.fleet.source})")
    if changed:
        raise JournalMismatch(
            f"{path}: {' and '.join(changed)} changed since run {run_id} started; "
            "restore it to finish that run, or pass --new-run to start another"
        )


async def execute(
    loaded: LoadedPlan, options: RunOptions, progress: ProgressHook | None = None
) -> RunResult:
    if not loaded.plan.platform.is_simulator:
        loaded.secret()  # an unset secret is bad input: fail before a journal or a call exists
    path = journal_path(loaded, options.journal)
    journal = Journal.open(path)
    try:
        existing = journal.latest_run(loaded.plan.name)
        if options.resume_only and existing is None:
            raise JournalError(f"{path}: no run of plan {loaded.plan.name!r} to resume")
        continuing = existing is not None and not options.new_run
        if existing is not None and continuing:
            _check_same_inputs(loaded, existing.run_id, existing.plan_sha, existing.fleet_sha, path)
        async with platform_client(loaded) as client:
            package = await resolve_package(loaded, client)
            if existing is not None and continuing:
                run_id = existing.run_id
                if existing.file_id not in (None, package.file_id):
                    raise JournalMismatch(
                        f"{path}: run {run_id} targets package "
                        f"{existing.file_id}, the plan now {package.file_id}"
                    )
            else:
                run_id = journal.create_run(
                    plan_name=loaded.plan.name,
                    plan_path=str(loaded.path),
                    plan_sha=loaded.plan_sha,
                    fleet_sha=loaded.fleet.sha256,
                    fleet_kind=loaded.fleet.kind,
                    target_count=len(loaded.fleet.members),
                    operation=loaded.plan.operation.value,
                    chunks=plan_chunks(loaded.fleet),
                )
            journal.set_file_id(run_id, package.file_id)
            journal.set_status(run_id, RUNNING)
            submitter = Submitter(loaded, journal, client, run_id, package, progress)
            try:
                await submitter.run()
            except RunAborted as exc:
                journal.set_status(run_id, ABORTED, str(exc))
                raise
            except BaseException:
                journal.set_status(run_id, INTERRUPTED, "interrupted; in-flight state recorded")
                raise
            journal.set_status(run_id, COMPLETED)
            return RunResult(run_id, path, journal.counts(run_id))
    finally:
        journal.close()
