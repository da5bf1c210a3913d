"""What `rollout plan` says a plan will do, offline: the package, the fleet, the policy in
words with its UTC times, the waves and their gates, the calls it will spend (submission, and
an estimate for monitoring), the secret checked — and what the journal knows, when a run
exists.

Sources of the call counts: one login, one package look-up (platform-api.md §3.1), one create
per chunk of ≤ 256 targets (§3.4), the census before the first create and after the last
(§3.7: 100 tasks a page; docs/resume-and-reconciliation.md); monitoring reads a page of 100
tasks per poll (cursor past finished pages) and every subtask of each finished task once, 100
a page (§3.6; bench/monitor_calls.py's bound), plus a gate's version check of running tasks'
successes (docs/monitoring-and-reports.md).
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .groups import ResolvedGroup
    from .loaded_plan import LoadedPlan
    from .plan import GateSection, PolicySection, WaveSection

TASK_PAGE = 100
BACKOFF = 1.5  # monitor.py
UTC_FORMAT = "%Y-%m-%d %H:%M UTC"
WINDOW_PREVIEW = 3  # the next occurrences `rollout plan` shows per wave window


def policy_words(policy: PolicySection) -> str:
    """The plan's policy as a sentence, custom windows in UTC."""
    if policy.execute_type == "now":
        when = "tasks start at once (executeType now)"
    elif policy.execute_type == "device_online":
        when = "each device upgrades when it next comes online (executeType device_online)"
    else:
        start, end = policy.start_utc, policy.end_utc
        assert start is not None and end is not None
        when = (
            f"devices upgrade between {start.strftime(UTC_FORMAT)} and "
            f"{end.strftime(UTC_FORMAT)} (executeType custom; given in {policy.timezone})"
        )
    retry = (
        f"the platform retries a failed device up to {policy.retry} times"
        if policy.retry
        else "no retries by the platform"
    )
    return f"{when}; {retry}"


def gate_words(gate: GateSection) -> str:
    parts = []
    if gate.min_finished:
        parts.append(f"passes once {gate.min_finished:.0%} of its devices finished")
    else:
        parts.append("passes at once")
    if gate.max_failed is not None:
        sample = f", judged from {gate.min_sample} finished" if gate.min_sample else ""
        parts.append(f"fails above {gate.max_failed:.0%} failed{sample}")
    if gate.soak:
        from .observe import duration_words

        parts.append(f"then soaks {duration_words(gate.soak)}")
    if gate.approval:
        parts.append("then waits for `rollout approve`")
    return "; ".join(parts)


def wave_words(section: WaveSection | None, now: datetime) -> str:
    if section is None:
        return ""
    words = [f"selection {section.selection}"]
    if section.stratify_by:
        words[0] += f" by {section.stratify_by}"
    if section.window is not None:
        w = section.window
        start, end = w.next_window(now)
        words.append(
            f"window {w.start}–{w.end} {w.timezone} daily (next: {start.strftime(UTC_FORMAT)} "
            f"to {end.strftime('%H:%M')} UTC)"
        )
    return ", ".join(words)


def polls_per_hour(first: float, most: float) -> int:
    """Monitor polls in the first hour of a wait: `first` seconds apart, ×1.5 up to `most`."""
    elapsed, polls, interval = 0.0, 0, first
    while True:
        elapsed += interval
        if elapsed > 3600:
            return polls
        polls += 1
        interval = min(most, interval * BACKOFF)


def _subtask_pages(devices: int, chunk: int = 256, page: int = 100) -> int:
    """Subtask pages to read a wave of `devices` cut into chunks of `chunk`: Σ ⌈nᵢ/page⌉."""
    full, rest = divmod(devices, chunk)
    return full * math.ceil(chunk / page) + math.ceil(rest / page)


def preview(loaded: LoadedPlan, chunks: int, now: datetime) -> dict[str, Any]:
    """The plan's preview as data (`rollout plan --json`)."""
    p = loaded.plan
    calls_per_window, window = p.platform.rate
    pages = max(1, math.ceil(chunks / TASK_PAGE))
    census_calls = 2 * pages  # before the first create and after the last
    calls = chunks + 2 + census_calls  # + a login and the package look-up
    # the pacer spreads calls at CALLS per window (+ margin); a round trip per slot is extra
    spacing = (window + (p.platform.pacing_margin or 0.0)) / calls_per_window
    firmware = p.firmware
    package = (
        {"file_id": firmware.file_id}
        if firmware.file_id
        else {
            "version": firmware.version,
            "device_type": firmware.device_type,
            "model": firmware.model,
            "manufacturer": firmware.manufacturer,
        }
    )
    if p.platform.is_simulator:
        secret = "embedded simulator: no secret needed"
    else:
        name = p.platform.secret_env
        secret = f"${name} is set" if os.environ.get(name or "") else f"${name} is NOT set"
    from .notify import url_problem

    hooks = [  # checked as `run` checks them (exit 2 there)
        f"${n.url_env} "
        + (url_problem(os.environ.get(n.url_env, "")) or "is set").replace(
            "is not set", "is NOT set"
        )
        for n in p.notify
    ]
    monitor = p.monitor
    per_hour = polls_per_hour(monitor.poll_interval, monitor.max_poll_interval) * pages
    # every subtask of each finished task is read once, 100 a page (⌈n/100⌉ a task: 3 for
    # 256; bench/monitor_calls.py's bound); a gate may read a running task's successes
    # once more to check versions before it passes (monitor.learn_successes)
    reads = {w.index: _subtask_pages(len(w.members)) for w in loaded.waves}
    gated = [w.index for w in loaded.waves][:-1]  # the last wave's gate judges nothing
    subtask_calls = sum(reads.values()) if loaded.fleet.kind == "devices" else None
    gate_calls = sum(reads[i] for i in gated) if subtask_calls else 0
    waves = []
    for wave in loaded.waves:
        section = p.waves[wave.index] if p.waves else None
        last = wave.index == len(loaded.waves) - 1
        waves.append(
            {
                "name": wave.name,
                "targets": len(wave.members),
                "how": wave_words(section, now),
                "gate": "" if section is None or last else gate_words(section.gate),
            }
        )
    data: dict[str, Any] = {
        "plan": p.name,
        "operation": p.operation.value,
        "package": package,
        "platform": p.platform.url,
        "fleet_source": loaded.fleet.source,
        "targets": len(loaded.fleet.members),
        "target_kind": loaded.fleet.kind,
        # devices the fleet file says already run the target version (fleet.version_column)
        "left_out_already_current": len(loaded.already_current),
        "chunks": chunks,
        "calls": calls,
        "census_calls": census_calls,
        "monitor_calls_per_hour": per_hour,
        # None for a group fleet: its devices are known once its tasks are seen
        "subtask_calls": subtask_calls,
        "gate_version_calls_max": gate_calls,
        "rate_limit": p.platform.rate_limit,
        "eta_seconds": round(max(calls - 1, 0) * spacing, 1),
        "policy": p.policy.wire(),
        "policy_text": policy_words(p.policy),
        "waves": waves,
        "secret": secret,
        "webhooks": hooks,
    }
    windows = next_windows(loaded, now)
    if windows:
        data["windows"] = windows
    return data


def next_windows(loaded: LoadedPlan, now: datetime) -> dict[str, list[dict[str, Any]]]:
    """Each wave window's next occurrences in UTC, with the nights DST makes too short."""
    shown: dict[str, list[dict[str, Any]]] = {}
    for section in loaded.plan.waves:
        if section.window is None:
            continue
        shown[section.name] = [
            {
                "night": occurrence.night.isoformat(),
                "start": occurrence.start.isoformat().replace("+00:00", "Z"),
                "end": occurrence.end.isoformat().replace("+00:00", "Z"),
                "minutes": round(occurrence.minutes, 1),
                "skipped": not occurrence.usable,
            }
            for occurrence in section.window.occurrences(now, WINDOW_PREVIEW)
        ]
    return shown


def add_groups(
    data: dict[str, Any],
    loaded: LoadedPlan,
    groups: dict[str, ResolvedGroup],
    spent: dict[str, int],
) -> None:
    """A group fleet's members as read from the platform, and the calls that took."""
    data["group_members"] = {name: len(group.devices) for name, group in groups.items()}
    data["devices_in_groups"] = len({d for g in groups.values() for d in g.devices})
    for wave, shown in zip(loaded.waves, data["waves"], strict=True):
        shown["devices_in_groups"] = len({d for name in wave.members for d in groups[name].devices})
    data["calls_made_to_resolve_groups"] = spent


def _night_line(night: dict[str, Any]) -> str:
    span = f"{night['start'][:16]} → {night['end'][11:16]}"
    if night["skipped"]:
        return f"{span}  skipped: {night['minutes']:g} real min that night (DST)"
    return f"{span}  {night['minutes']:g} min"


def rows(data: dict[str, Any], journal: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The preview as (what, value) lines for people."""
    package = data["package"]
    if "file_id" in package:
        firmware = f"package {package['file_id']}"
    else:
        firmware = (
            f"{package['version']} for {package['model']} ({package['device_type']}, "
            f"{package['manufacturer']})"
        )
    out = [
        ("firmware" if data["operation"] == "firmware" else "software", firmware),
        ("platform", data["platform"]),
        ("fleet", f"{data['targets']} {data['target_kind']} from {data['fleet_source']}"),
    ]
    if data.get("left_out_already_current"):
        out.append(
            (
                "left out",
                f"{data['left_out_already_current']} devices the fleet file says already run "
                "the version",
            )
        )
    if "group_members" in data:
        members = ", ".join(f"{k} {v}" for k, v in data["group_members"].items())
        out.append(("group members", f"{members} ({data['devices_in_groups']} devices)"))
        spent = ", ".join(f"{k} {v}" for k, v in data["calls_made_to_resolve_groups"].items())
        out.append(("calls made to resolve groups", spent))
    out.append(("policy", data["policy_text"]))
    for w in data["waves"]:
        how = ", ".join(x for x in (w["how"], w["gate"] and f"gate: {w['gate']}") if x)
        devices = f" ({w['devices_in_groups']} devices)" if "devices_in_groups" in w else ""
        out.append(
            (
                f"wave {w['name']}",
                f"{w['targets']} targets{devices}" + (f"; {how}" if how else ""),
            )
        )
    for wave, nights in data.get("windows", {}).items():
        out.append((f"window of {wave} (UTC)", "\n".join(map(_night_line, nights))))
    out += [
        ("chunks", f"{data['chunks']} tasks of ≤ 256 targets"),
        (
            "calls to submit",
            f"{data['calls']}: {data['chunks']} creates, census {data['census_calls']}, "
            "a login, the package look-up",
        ),
        (
            "calls to monitor",
            f"≈ {data['monitor_calls_per_hour']} an hour of waiting for devices, plus "
            + (
                f"{data['subtask_calls']} reading every device's subtask once (⌈n/100⌉ a "
                f"task: 3 for 256 devices) and up to {data['gate_version_calls_max']} more as "
                "gates check the versions of running tasks"
                if data["subtask_calls"] is not None
                else "⌈n/100⌉ a task of n devices reading every subtask once"
            ),
        ),
        ("ETA of submission", f"{data['eta_seconds']:.0f} s at {data['rate_limit']}"),
        ("secret", data["secret"]),
    ]
    out += [("webhook", hook) for hook in data["webhooks"]]
    if journal is not None:
        by = journal["targets_in_tasks_by"]
        out.append(
            (
                "journal",
                f"run {journal['run_id']} {journal['status']}: {journal['targets_in_tasks']} "
                f"targets in tasks ({by.get('census', 0)} found by the census), "
                f"{journal['targets_quarantined']} quarantined",
            )
        )
    return out
