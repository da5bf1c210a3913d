"""The HTML report: one self-contained page (inline CSS and SVG, no script, no external asset),
summary first, readable on a phone, and bounded whatever the fleet's size: the per-device list
appears whole only up to `ReportData.listed` devices; above that the page lists the failed,
quarantined and already-current devices up to that many each, says how many more there are,
and leaves the full list to the CSV, JSON and JSON Lines reports. At 10^6 devices (3 907 tasks)
the page is ~1.4 MB with the default limit (`bench/report_scale.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from html import escape
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from .report_model import DeviceRow, ReportData, clip

HTML_TASK_ROWS = 5_000  # tasks listed on the page (10^6 devices in 256-device tasks: 3 907)
CHART_POINTS = 500  # progress samples drawn at most (evenly spread, the last always)
TEXT_CHARS = 300  # a reason or a detail on the page: cut here with "…" (whole in CSV/JSON/JSONL)
REASON_ROWS = 50  # failure reasons drawn at most (all of them in the JSON report)
MORE = "see the CSV, JSON or JSON Lines report"
COLOURS = {
    "upgraded": "#2e7d32",
    "failed": "#c62828",
    "already_current": "#00838f",
    "in_progress": "#f9a825",
    "quarantined": "#6a1b9a",
    "not_submitted": "#9e9e9e",
    "submitted": "#90a4ae",
    "finished": "#1565c0",
}
STYLE = """
*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;
margin:0;color:#1d2327;background:#f6f7f9}main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.1em;margin:1.6em 0 .5em}
.sub{color:#555;margin:0 0 12px}.cards{display:grid;grid-template-columns:repeat(auto-fit,
minmax(140px,1fr));gap:10px}.card{background:#fff;border-radius:8px;padding:10px 12px;
box-shadow:0 1px 2px rgba(0,0,0,.08)}.card b{display:block;font-size:1.5em}
.card span{color:#555;font-size:.85em}.panel{background:#fff;border-radius:8px;padding:12px;
box-shadow:0 1px 2px rgba(0,0,0,.08);margin-bottom:12px}svg{width:100%;height:auto;
display:block}.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;
font-size:.85em}th,td{padding:4px 8px;border-bottom:1px solid #e3e5e8;text-align:left;
white-space:nowrap}th{background:#eef0f3;position:sticky;top:0}.legend span{display:inline-block;
margin-right:12px;font-size:.85em}.legend i{display:inline-block;width:10px;height:10px;
margin-right:4px;border-radius:2px}.status-completed{color:#2e7d32}.status-halted,
.status-aborted{color:#c62828}.note{color:#555;font-size:.85em}
.chart{max-width:640px}.chart text{font-family:system-ui,sans-serif}
.hbar{display:flex;height:18px;border-radius:3px;overflow:hidden;background:#eef0f3;
min-width:60px}.hbar div{height:100%}.outcomes th,.outcomes td,.reasons td{white-space:normal}
.reasons td.reason{width:60%;word-break:break-word}.reasons td.bar{width:30%}
.sim{background:#fff3cd;border-radius:6px;padding:6px 10px;font-size:.85em}
td.wrap{white-space:normal;min-width:16em;word-break:break-word}
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _when(value: str, zone: ZoneInfo) -> str:
    """A platform time (`20261128T211233Z`) or an ISO time, in the plan's time zone."""
    if not value:
        return ""
    try:
        if len(value) == 16 and value.endswith("Z") and value[8] == "T":
            moment = datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


def _zone(run: dict[str, Any]) -> ZoneInfo:
    return ZoneInfo(run.get("time_zone") or "UTC")


def _legend(keys: list[str]) -> str:
    items = "".join(
        f'<span><i style="background:{COLOURS[k]}"></i>{_e(k.replace("_", " "))}</span>'
        for k in keys
    )
    return f'<div class="legend">{items}</div>'


def progress_chart(
    progress: list[dict[str, Any]],
    total: int,
    wave_starts: list[dict[str, Any]] | None = None,
    zone: ZoneInfo | None = None,
) -> str:
    """Devices over real time: submitted (a shaded band under the others, so it shows even
    where finished catches up with it), finished, upgraded, failed; a dashed marker where each
    wave's first create left. Sized for a 390 px phone (12-unit text in a 400-unit box)."""
    if len(progress) < 2 or total == 0:
        return '<p class="note">Not enough monitor samples for a progress chart yet.</p>'
    zone = zone or ZoneInfo("UTC")
    if len(progress) > CHART_POINTS:
        step = (len(progress) - 1) / (CHART_POINTS - 1)
        progress = [progress[round(i * step)] for i in range(CHART_POINTS)]
    starts = wave_starts or []
    width, height, left, right, top, bottom = 400, 240, 48, 14, 30, 36
    t0 = float(min([progress[0]["t"], *(w["t"] for w in starts)]))
    t1 = float(progress[-1]["t"])
    span = max(t1 - t0, 1e-6)

    def x(t: float) -> float:
        return left + (t - t0) / span * (width - left - right)

    def y(value: float) -> float:
        return height - bottom - value / total * (height - top - bottom)

    marks = []
    base = f"{x(progress[0]['t']):.1f},{y(0):.1f}"
    submitted = " ".join(f"{x(s['t']):.1f},{y(s['submitted']):.1f}" for s in progress)
    marks.append(
        f'<polygon fill="{COLOURS["submitted"]}" fill-opacity=".25" stroke="none" '
        f'points="{base} {submitted} {x(progress[-1]["t"]):.1f},{y(0):.1f}"/>'
        f'<polyline class="series-submitted" fill="none" stroke="{COLOURS["submitted"]}" '
        f'stroke-width="5" stroke-linejoin="round" points="{submitted}"/>'
    )
    for key, source, dash in (
        ("finished", "finished", ""),
        ("upgraded", "succeeded", ""),
        ("failed", "failed", ""),
    ):
        pts = " ".join(f"{x(s['t']):.1f},{y(s[source]):.1f}" for s in progress)
        marks.append(
            f'<polyline class="series-{key}" fill="none" stroke="{COLOURS[key]}" '
            f'stroke-width="2"{dash} points="{pts}"/>'
        )
    for index, wave in enumerate(starts):
        wx = x(wave["t"])
        label_y = top - 16 + (index % 2) * 13
        marks.append(
            f'<line class="wave-marker" x1="{wx:.1f}" y1="{top}" x2="{wx:.1f}" '
            f'y2="{height - bottom}" stroke="#555" stroke-dasharray="3 3"/>'
            f'<text x="{wx + 3:.1f}" y="{label_y}" font-size="13" fill="#333">'
            f"{_e(wave['wave'])}</text>"
        )
    start_text = datetime.fromtimestamp(t0, zone).strftime("%H:%M")
    end_text = datetime.fromtimestamp(t1, zone).strftime("%H:%M")
    minutes = span / 60
    axes = (
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
        f'stroke="#888"/><line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" '
        f'stroke="#888"/>'
        f'<text x="{left}" y="{height - 16}" font-size="14">{start_text}</text>'
        f'<text x="{(left + width - right) / 2:.0f}" y="{height - 16}" font-size="14" '
        f'text-anchor="middle">{minutes:.1f} min</text>'
        f'<text x="{width - right}" y="{height - 16}" font-size="14" text-anchor="end">'
        f"{end_text}</text>"
        f'<text x="{left - 4}" y="{top + 4}" font-size="14" text-anchor="end">{total}</text>'
        f'<text x="{left - 4}" y="{height - bottom}" font-size="14" text-anchor="end">0</text>'
    )
    return (
        f'<svg id="chart-progress" class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="devices over time">{axes}{"".join(marks)}</svg>'
        + _legend(["submitted", "finished", "upgraded", "failed"])
        + '<p class="note">Real time (our clock) in the plan\'s time zone; dashed lines: the '
        "first create of each wave.</p>"
    )


def waves_chart(waves: list[dict[str, Any]]) -> str:
    """Outcome per wave as stacked bars of HTML (legible at any width)."""
    keys = ["upgraded", "failed", "already_current", "in_progress", "quarantined", "not_submitted"]
    rows = []
    for wave in waves:
        total = max(wave["targets"], 1)
        parts = "".join(
            f'<div class="bar-{key}" style="width:{wave[key] / total * 100:.2f}%;'
            f'background:{COLOURS[key]}" title="{_e(key.replace("_", " "))}: {wave[key]}"></div>'
            for key in keys
            if wave[key] > 0
        )
        rows.append(
            f'<tr><th>{_e(wave["wave"])}</th><td style="width:100%">'
            f'<div class="hbar">{parts}</div></td><td>{wave["targets"]}</td></tr>'
        )
    return (
        f'<table id="chart-waves" class="outcomes" aria-label="outcome per wave">'
        f"{''.join(rows)}</table>" + _legend(keys)
    )


def reasons_chart(reasons: list[tuple[str, int]], unread: int = 0) -> str:
    """Failure reasons (up to `TEXT_CHARS` characters each) with their device counts and a
    bar; then, when some tasks' subtasks are not read yet, the failures the platform counted
    there whose reason is not known yet (in progress in the summary, as in `rollout status`)."""
    if not reasons and not unread:
        return '<p class="note">No device failed.</p>'
    most = max([n for _, n in reasons] + [unread])
    shown = [(clip(reason, TEXT_CHARS), count, "failed") for reason, count in reasons[:REASON_ROWS]]
    if unread:
        shown.append(("reason not read yet (subtasks not read)", unread, "in_progress"))
    rows = "".join(
        ('<tr class="unread">' if bucket == "in_progress" else "<tr>") + f'<td class="reason">'
        f'{_e(reason)}</td><td>{count}</td><td class="bar">'
        f'<div class="hbar"><div class="bar-reason" style="width:{count / most * 100:.1f}%;'
        f'background:{COLOURS[bucket]}"></div></div></td></tr>'
        for reason, count, bucket in shown
    )
    more = (
        f'<p class="note">{len(reasons) - REASON_ROWS} more reasons in the JSON report.</p>'
        if len(reasons) > REASON_ROWS
        else ""
    )
    if unread:
        more += (
            f'<p class="note" id="reasons-unread">{unread} failures counted by the platform in '
            "tasks whose subtasks are not read yet: their reason is not known yet and they are "
            "counted in progress, not failed (some may prove already current); `rollout watch` "
            "or <code>rollout report --refresh</code> reads them.</p>"
        )
    return (
        f'<table id="chart-reasons" class="reasons" aria-label="failure reasons"><thead><tr>'
        f"<th>reason</th><th>devices</th><th></th></tr></thead><tbody>{rows}</tbody></table>" + more
    )


def _table_parts(
    columns: list[str],
    rows: Iterable[list[Any]],
    table_id: str,
    wrap: frozenset[int] = frozenset(),
) -> Iterator[str]:
    """A table, row by row; the columns in `wrap` (indices) wrap their text instead of
    cutting it."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    cell = ['<td class="wrap">' if i in wrap else "<td>" for i in range(len(columns))]
    yield f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>'
    for row in rows:
        yield "<tr>" + "".join(f"{cell[i]}{_e(v)}</td>" for i, v in enumerate(row)) + "</tr>"
    yield "</tbody></table></div>"


def _table(
    columns: list[str], rows: Iterable[list[Any]], table_id: str, wrap: frozenset[int] = frozenset()
) -> str:
    return "".join(_table_parts(columns, rows, table_id, wrap))


def _more(shown: int, total: int, what: str, list_id: str) -> str:
    """The count beyond a capped list, or nothing when the list is whole."""
    if total <= shown:
        return ""
    return (
        f'<p class="note more" id="{list_id}-more"><b>{total - shown}</b> more {_e(what)} — '
        f"{MORE}.</p>"
    )


def _device_table(data: ReportData, zone: ZoneInfo, platform_time: str) -> Iterator[str]:
    """Every device, when the run has at most `data.listed`; else a note (the lists above
    hold the devices that need a look)."""
    total = data.totals["devices"]
    if total > data.listed:
        yield (
            f'<p class="note" id="devices-elsewhere">{total} devices: the list of every device '
            f"is in the CSV, JSON and JSON Lines reports (<code>rollout report PLAN --format "
            f"csv|json|jsonl</code>); the failed, quarantined and already-current devices are "
            f"listed above, up to {data.listed} each.</p>"
        )
        return
    columns = [
        "device_id",
        "wave",
        "chunk",
        "operation_id",
        "task_status",
        "subtask_status",
        "upgraded",
        "detail",
        "version",
        f"task finished{platform_time}",
        "in task by",
        "outcome",
        "passes",
    ]
    rows = (
        [
            d.device_id,
            d.wave,
            d.chunk,
            d.operation_id,
            d.task_status,
            d.subtask_status,
            "yes" if d.upgraded else "no",
            clip(d.detail, TEXT_CHARS),
            d.version,
            _when(d.task_finished, zone),
            d.in_task_by,
            d.outcome,
            d.pass_outcomes,
        ]
        for d in data.devices()
    )
    yield from _table_parts(columns, rows, "devices", frozenset({7}))


def _device_lists(data: ReportData, zone: ZoneInfo, platform_time: str) -> Iterator[str]:
    """The failed and the already-current devices, up to `data.listed` each, with the count
    beyond — only when the page does not list every device."""
    if data.totals["devices"] <= data.listed:
        return
    failed: list[DeviceRow] = data.lists.get("failed", [])
    yield "<h2>Failed devices</h2>"
    if failed:
        yield from _table_parts(
            [
                "device",
                "wave",
                "chunk",
                "operationId",
                "subtask status",
                "detail",
                "version",
                f"task finished{platform_time}",
                "outcome",
                "passes",
            ],
            (
                [
                    d.device_id,
                    d.wave,
                    d.chunk,
                    d.operation_id,
                    d.subtask_status,
                    clip(d.detail, TEXT_CHARS),
                    d.version,
                    _when(d.task_finished, zone),
                    d.outcome,
                    d.pass_outcomes,
                ]
                for d in failed
            ),
            "failed",
            frozenset({5}),
        )
    else:
        yield '<p class="note">None.</p>'
    yield _more(len(failed), data.totals["failed"], "failed devices", "failed")
    current: list[DeviceRow] = data.lists.get("already_current", [])
    yield "<h2>Already-current devices</h2>"
    if current:
        yield from _table_parts(
            ["device", "wave", "chunk", "operationId", "detail", "version"],
            (
                [
                    d.device_id,
                    d.wave,
                    d.chunk,
                    d.operation_id,
                    clip(d.detail, TEXT_CHARS),
                    d.version,
                ]
                for d in current
            ),
            "already-current",
            frozenset({4}),
        )
    else:
        yield '<p class="note">None.</p>'
    yield _more(
        len(current), data.totals["already_current"], "already-current devices", "already-current"
    )


def _quarantined(data: ReportData) -> Iterator[str]:
    kept: list[DeviceRow] = data.lists.get("quarantined", [])
    if not kept:
        yield '<p class="note">None.</p>'
        return
    yield from _table_parts(
        ["device", "wave", "chunk", "refusal (error code, reason)"],
        ([d.device_id, d.wave, d.chunk, clip(d.detail, TEXT_CHARS)] for d in kept),
        "quarantined",
        frozenset({3}),
    )
    yield _more(len(kept), data.totals["quarantined"], "quarantined devices", "quarantined")


def _simulated_note(run: dict[str, Any]) -> str:
    speed = run.get("simulated_speed")
    if not speed:
        return ""
    return (
        f'<p class="sim" id="simulated">The platform was the embedded simulator, its clock '
        f"running ×{speed:g}: the times it reports (tasks, devices) are <b>simulated time</b>, "
        "marked “sim.” below; the progress chart and the run's start and update are real time."
        "</p>"
    )


def _passes(data: ReportData) -> str:
    if not data.passes:
        return ""
    rows = [
        [
            r["pass"],
            r["states"],
            r["targets"],
            r["upgraded"],
            r["failed"],
            r["already_current"],
            r["in_progress"],
            r["quarantined"],
            r["status"],
            r["gate_reason"],
        ]
        for r in data.passes
    ]
    columns = [
        "pass",
        "retried",
        "devices",
        "upgraded",
        "failed",
        "already current",
        "in progress",
        "quarantined",
        "status",
        "gate",
    ]
    return (
        '<h2>Retry passes</h2><p class="note">Each device is counted once above, by its final '
        "outcome; here by its outcome in each retry pass.</p>" + _table(columns, rows, "passes")
    )


def write_page(data: ReportData, out: TextIO) -> None:
    """Write the page to OUT part by part (a table row at a time): at most `HTML_TASK_ROWS`
    tasks, and devices as `_device_lists` and `_device_table` say."""
    for part in _page(data):
        out.write(part)


def _page(data: ReportData) -> Iterator[str]:
    run, totals = data.run, data.totals
    zone = _zone(run)
    platform_time = " (sim.)" if run.get("simulated_speed") else ""
    share = totals["upgraded"] / totals["devices"] if totals["devices"] else 0.0
    cards = [
        ("devices", totals["devices"]),
        ("upgraded", f"{totals['upgraded']} ({share:.1%})"),
        ("failed", totals["failed"]),
        ("already current", totals["already_current"]),
        ("in progress", totals["in_progress"]),
        *(
            [("of which failed, reason not read yet", totals["failed_unread"])]
            if totals.get("failed_unread")
            else []
        ),
        ("quarantined", totals["quarantined"]),
        ("not submitted", totals["not_submitted"]),
        ("already in a task (census)", totals["in_task_by_census"]),
        ("in two tasks", totals["duplicates"]),
        ("tasks", totals["tasks"]),
        ("API calls", totals["calls"]),
    ]
    card_html = "".join(
        f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in cards
    )
    stop = f" — {_e(run['stop_reason'])}" if run["stop_reason"] else ""
    waves_rows = [
        [
            w["wave"],
            w["targets"],
            w["upgraded"],
            w["failed"],
            w["already_current"],
            w["in_progress"],
            w["quarantined"],
            w["not_submitted"],
            w["gate"] + (" (approved)" if w["approved"] else ""),
            w["gate_reason"],
        ]
        for w in data.waves
    ]
    yield f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Rollout report — {_e(run["plan"])}</title><style>{STYLE}</style></head>
<body><main>
<h1>Rollout {_e(run["plan"])}</h1>
<p class="sub">run {run["run_id"]} · <b class="status-{_e(run["status"])}">{_e(run["status"])}</b>
{stop} · {_e(run["operation"])} package {_e(run["file_id"])} (version
{_e(run["package_version"])}) · started {_e(_when(run["created_at"], zone))} · updated
{_e(_when(run["updated_at"], zone))} · times in {_e(zone.key)}</p>
{_simulated_note(run)}
<section class="cards" id="summary">{card_html}</section>
<h2>Progress over time</h2><div class="panel">{
        progress_chart(data.progress, run["targets"], run.get("wave_starts"), zone)
    }</div>
<h2>Outcome per wave</h2><div class="panel">{waves_chart(data.waves)}</div>
{
        _table(
            [
                "wave",
                "targets",
                "upgraded",
                "failed",
                "already current",
                "in progress",
                "quarantined",
                "not submitted",
                "gate",
                "gate reason",
            ],
            waves_rows,
            "waves",
            frozenset({9}),
        )
    }
{_passes(data)}
<h2>Failure reasons</h2><div class="panel">{
        reasons_chart(data.failure_reasons, totals.get("failed_unread", 0))
    }</div>
"""
    yield from _device_lists(data, zone, platform_time)
    yield "\n<h2>Quarantined devices</h2>\n"
    yield from _quarantined(data)
    duplicates = (
        _table(
            ["target", "operationIds (oldest first)"],
            [[d["target"], ", ".join(d["operation_ids"])] for d in data.duplicates[:1000]],
            "duplicates",
        )
        + _more(min(len(data.duplicates), 1000), len(data.duplicates), "targets", "duplicates")
        if data.duplicates
        else '<p class="note">None (closing census).</p>'
    )
    yield f"""
<h2>Devices in two tasks of this package</h2>
{duplicates}
<h2>Call budget spent</h2>
{_table(["API", "calls"], [[k, v] for k, v in data.calls.items()], "calls")}
<h2>Tasks</h2>
"""
    tasks_rows = (
        [
            t["operation_id"],
            t["chunk"],
            t["wave"],
            t["status"],
            t["total"],
            t["upgraded"],
            t["failed"],
            t["already_current"],
            t["in_progress"],
            _when(t["created"], zone),
            _when(t["finished"], zone),
        ]
        for t in data.tasks[:HTML_TASK_ROWS]
    )
    yield from _table_parts(
        [
            "operationId",
            "chunk",
            "wave",
            "status",
            "devices",
            "upgraded",
            "failed",
            "already current",
            "in progress",
            f"created{platform_time}",
            f"finished{platform_time}",
        ],
        tasks_rows,
        "tasks",
    )
    yield _more(min(len(data.tasks), HTML_TASK_ROWS), len(data.tasks), "tasks", "tasks")
    yield "\n<h2>Devices</h2>\n"
    yield from _device_table(data, zone, platform_time)
    yield """
<p class="note">Generated by fleet-orchestrator from the journal alone.</p>
</main></body></html>
"""
