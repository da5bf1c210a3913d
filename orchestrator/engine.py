"""A rollout end to end: plan → journal → platform session → waves of submission and gates
→ monitor → journal.

`execute` is what `rollout run` and `rollout resume` call, `watch` what `rollout watch`
calls; tests call them directly too.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import SecretStr

from .errors import JournalError, JournalMismatch, RunAborted, RunHalted
from .gates import Verdict, evaluate
from .journal import (
    ABORTED,
    COMPLETED,
    INTERRUPTED,
    RUNNING,
    Journal,
    default_journal_path,
)
from .monitor import Monitor, Sleep
from .northbound import ClientConfig, NorthboundClient, TLSConfig
from .plan import PLATFORM_TIME_FORMAT, LoadedPlan, PlatformSection, WaveSection
from .planner import plan_chunks
from .session import RunSession
from .simulator import DEFAULT_SECRET, SimulatorConfig, SimulatorServer
from .submitter import Progress, ProgressHook, Submitter, resolve_package

log = structlog.get_logger("orchestrator.engine")

HALTED = "halted"
SUBMITTED_ALL = "submitted"


@dataclass(frozen=True)
class RunOptions:
    journal: Path | None = None
    new_run: bool = False
    resume_only: bool = False
    follow: bool | None = None  # None: the plan's monitor.follow


@dataclass(frozen=True)
class RunResult:
    run_id: int
    journal: Path
    counts: dict[str, int]


def journal_path(loaded: LoadedPlan, override: Path | None) -> Path:
    return override if override is not None else default_journal_path(loaded.plan.name)


def _client_config(
    platform: PlatformSection, base_url: str, secret: str, tls: TLSConfig
) -> ClientConfig:
    return ClientConfig(
        base_url=base_url,
        app_id=platform.app_id,
        secret=SecretStr(secret),
        tls=tls,
        rate_limit=platform.rate,
        pacing_margin=platform.pacing_margin,
        connect_timeout=platform.connect_timeout,
        total_timeout=platform.request_timeout,
    )


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
            tls = TLSConfig(ca_file=server.cert_file)
            config = _client_config(platform, server.url, DEFAULT_SECRET, tls)
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
    config = _client_config(platform, platform.url, loaded.secret(), tls)
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


def _wave_policy(loaded: LoadedPlan, section: WaveSection | None) -> dict[str, Any]:
    policy = loaded.plan.policy.wire()
    if section is not None and section.window is not None:
        start, end = section.window.next_window(datetime.now(UTC))
        policy.update(
            executeType="custom",
            startTime=start.strftime(PLATFORM_TIME_FORMAT),
            endTime=end.strftime(PLATFORM_TIME_FORMAT),
        )
    return policy


def start_run(journal: Journal, loaded: LoadedPlan) -> int:
    """A new run in the journal: the plan's fingerprints, its waves and every chunk."""
    return journal.create_run(
        plan_name=loaded.plan.name,
        plan_path=str(loaded.path),
        plan_sha=loaded.plan_sha,
        fleet_sha=loaded.fleet.sha256,
        fleet_kind=loaded.fleet.kind,
        target_count=len(loaded.fleet.members),
        operation=loaded.plan.operation.value,
        chunks=plan_chunks(loaded.fleet, loaded.waves),
        waves=loaded.waves,
    )


class Rollout:
    """One run being driven: waves in order, each submitted, then gated."""

    def __init__(
        self, session: RunSession, progress: ProgressHook | None, sleep: Sleep | None = None
    ) -> None:
        self.session = session
        self.hook = progress
        self.progress = Progress(total_targets=len(session.loaded.fleet.members))
        self.monitor = Monitor(session, **({"sleep": sleep} if sleep is not None else {}))

    async def drive(self, follow: bool) -> None:
        rows = {row.wave: row for row in self.session.journal.waves(self.session.run_id)}
        last = len(self.session.loaded.waves) - 1
        for wave in self.session.loaded.waves:
            section = self.session.plan.waves[wave.index] if self.session.plan.waves else None
            if rows[wave.index].gate_state == "passed":
                continue
            log.info("wave", wave=wave.name, targets=len(wave.members))
            await Submitter(
                self.session,
                self.hook,
                wave=wave.index,
                policy=_wave_policy(self.session.loaded, section),
                shared_progress=self.progress,
            ).run()
            self.session.journal.add_calls(
                self.session.run_id, self.session.client.take_call_counts()
            )
            if section is not None and wave.index < last:
                await self._gate(wave.index, wave.name, section)
            elif wave.index == last:
                self.session.journal.set_gate(
                    self.session.run_id, wave.index, "none", "the last wave has no gate"
                )
        if follow:
            await self.monitor.follow(first_wait=self.session.plan.monitor.poll_interval)

    async def _gate(self, wave: int, name: str, section: WaveSection) -> None:
        gate = section.gate
        interval = self.session.plan.monitor.poll_interval
        seen = self.session.journal.wave_counts(self.session.run_id, wave)
        if seen.tasks == 0 or seen.final_tasks < seen.tasks:
            await self.monitor.sleep(interval)  # tasks created a moment ago cannot be done
        while True:
            await self.monitor.poll()
            counts = self.session.journal.wave_counts(self.session.run_id, wave)
            verdict, reason = evaluate(gate, counts)
            row = next(r for r in self.session.journal.waves(self.session.run_id) if r.wave == wave)
            approved = self.session.journal.approved(self.session.run_id, wave)
            if verdict is Verdict.FAIL:
                if approved:
                    self.session.journal.set_gate(
                        self.session.run_id,
                        wave,
                        "passed",
                        f"failed gate overridden by approval: {reason}",
                    )
                    return
                self.session.journal.set_gate(self.session.run_id, wave, "failed", reason)
                raise RunHalted(
                    f"wave {name!r} failed its gate: {reason}. Nothing more was submitted. "
                    f"To go on anyway: rollout approve PLAN --wave {name}, then rollout resume"
                )
            if verdict is Verdict.WAIT:
                self.session.journal.set_gate(self.session.run_id, wave, "waiting", reason)
                await self.monitor.sleep(interval)
                interval = min(self.session.plan.monitor.max_poll_interval, interval * 1.5)
                continue
            if gate.soak > 0:
                soak_until = row.soak_until or time.time() + gate.soak
                if time.time() < soak_until:
                    self.session.journal.set_gate(
                        self.session.run_id, wave, "soaking", reason, soak_until
                    )
                    await self.monitor.sleep(min(interval, max(0.0, soak_until - time.time())))
                    continue
            if gate.approval and not approved:
                self.session.journal.set_gate(
                    self.session.run_id, wave, "awaiting-approval", reason
                )
                raise RunHalted(
                    f"wave {name!r} passed its gate ({reason}) and waits for approval: "
                    f"rollout approve PLAN --wave {name}, then rollout resume"
                )
            self.session.journal.set_gate(self.session.run_id, wave, "passed", reason)
            log.info("gate passed", wave=name, reason=reason)
            return


async def execute(
    loaded: LoadedPlan,
    options: RunOptions,
    progress: ProgressHook | None = None,
    *,
    sleep: Sleep | None = None,
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
                run_id = start_run(journal, loaded)
            journal.set_package(run_id, package.file_id, package.version)
            journal.set_status(run_id, RUNNING)
            rollout = Rollout(RunSession(loaded, journal, client, run_id, package), progress, sleep)
            follow = loaded.plan.monitor.follow if options.follow is None else options.follow
            try:
                await rollout.drive(follow)
            except RunAborted as exc:
                journal.set_status(run_id, ABORTED, str(exc))
                raise
            except RunHalted as exc:
                journal.set_status(run_id, HALTED, str(exc))
                raise
            except BaseException:
                journal.set_status(run_id, INTERRUPTED, "interrupted; in-flight state recorded")
                raise
            finally:
                journal.add_calls(run_id, client.take_call_counts())
            journal.set_status(run_id, COMPLETED if follow else SUBMITTED_ALL)
            return RunResult(run_id, path, journal.counts(run_id))
    finally:
        journal.close()


@asynccontextmanager
async def _existing_run(
    loaded: LoadedPlan, journal_file: Path | None, sleep: Sleep | None = None
) -> AsyncIterator[tuple[Journal, int, Rollout]]:
    """The journal's latest run of the plan, with a platform session, for monitoring only."""
    path = journal_path(loaded, journal_file)
    if not path.exists():
        raise JournalError(f"{path}: no journal here (has this plan been run?)")
    journal = Journal.open(path)
    try:
        existing = journal.latest_run(loaded.plan.name)
        if existing is None:
            raise JournalError(f"{path}: no run of plan {loaded.plan.name!r}")
        async with platform_client(loaded) as client:
            package = await resolve_package(loaded, client)
            rollout = Rollout(
                RunSession(loaded, journal, client, existing.run_id, package), None, sleep
            )
            try:
                yield journal, existing.run_id, rollout
            finally:
                journal.add_calls(existing.run_id, client.take_call_counts())
    finally:
        journal.close()


async def watch(
    loaded: LoadedPlan, journal_file: Path | None, *, sleep: Sleep | None = None
) -> RunResult:
    """Follow the journal's run to the end without submitting anything."""
    async with _existing_run(loaded, journal_file, sleep) as (journal, run_id, rollout):
        await rollout.monitor.follow()
        return RunResult(run_id, journal.path, journal.counts(run_id))


async def refresh(loaded: LoadedPlan, journal_file: Path | None) -> None:
    """One monitor poll, so a report shows the platform's latest word (costs calls)."""
    async with _existing_run(loaded, journal_file) as (_, _, rollout):
        await rollout.monitor.poll()
