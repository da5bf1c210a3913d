"""The HTML report: one self-contained page (inline CSS and SVG, no script, no external asset),
summary first, readable on a phone."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # report.py hands its data here to be drawn
    from .report import ReportData

HTML_FULL_DEVICE_TABLE = 20_000
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
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _legend(keys: list[str]) -> str:
    items = "".join(
        f'<span><i style="background:{COLOURS[k]}"></i>{_e(k.replace("_", " "))}</span>'
        for k in keys
    )
    return f'<div class="legend">{items}</div>'


def progress_chart(progress: list[dict[str, Any]], total: int) -> str:
    if len(progress) < 2 or total == 0:
        return '<p class="note">Not enough monitor samples for a progress chart yet.</p>'
    width, height, pad = 640, 240, 36
    t0, t1 = progress[0]["t"], progress[-1]["t"]
    span = max(t1 - t0, 1e-6)

    def point(sample: dict[str, Any], key: str) -> str:
        x = pad + (sample["t"] - t0) / span * (width - 2 * pad)
        y = height - pad - sample[key] / total * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    lines = []
    for key in ("submitted", "finished", "upgraded", "failed"):
        source = "succeeded" if key == "upgraded" else key
        pts = " ".join(point({**s, key: s[source]}, key) for s in progress)
        lines.append(
            f'<polyline class="series-{key}" fill="none" stroke="{COLOURS[key]}" '
            f'stroke-width="2" points="{pts}"/>'
        )
    minutes = span / 60
    axes = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        f'stroke="#888"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" '
        f'stroke="#888"/><text x="{pad}" y="{height - 10}" font-size="11">0</text>'
        f'<text x="{width - pad}" y="{height - 10}" font-size="11" text-anchor="end">'
        f"{minutes:.1f} min</text>"
        f'<text x="{pad - 4}" y="{pad + 4}" font-size="11" text-anchor="end">{total}</text>'
        f'<text x="{pad - 4}" y="{height - pad}" font-size="11" text-anchor="end">0</text>'
    )
    return (
        f'<svg id="chart-progress" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="devices over time">{axes}{"".join(lines)}</svg>'
        + _legend(["submitted", "finished", "upgraded", "failed"])
    )


def waves_chart(waves: list[dict[str, Any]]) -> str:
    keys = ["upgraded", "failed", "already_current", "in_progress", "quarantined", "not_submitted"]
    row_h, label_w, width = 28, 110, 640
    bars = []
    for index, wave in enumerate(waves):
        y = index * row_h + 4
        x = float(label_w)
        total = max(wave["targets"], 1)
        bars.append(f'<text x="0" y="{y + 15}" font-size="12">{_e(wave["wave"])}</text>')
        for key in keys:
            w = wave[key] / total * (width - label_w - 60)
            if w > 0:
                bars.append(
                    f'<rect class="bar-{key}" x="{x:.1f}" y="{y}" width="{w:.1f}" '
                    f'height="20" fill="{COLOURS[key]}"><title>{_e(key)}: '
                    f"{wave[key]}</title></rect>"
                )
            x += w
        bars.append(f'<text x="{x + 6:.1f}" y="{y + 15}" font-size="11">{wave["targets"]}</text>')
    height = len(waves) * row_h + 8
    return (
        f'<svg id="chart-waves" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="outcome per wave">{"".join(bars)}</svg>' + _legend(keys)
    )


def reasons_chart(reasons: list[tuple[str, int]]) -> str:
    if not reasons:
        return '<p class="note">No device failed.</p>'
    top = reasons[:10]
    most = max(n for _, n in top)
    row_h, width, label_w = 26, 640, 300
    bars = []
    for index, (reason, count) in enumerate(top):
        y = index * row_h + 4
        w = count / most * (width - label_w - 50)
        short = reason if len(reason) <= 48 else reason[:45] + "…"
        bars.append(
            f'<text x="0" y="{y + 14}" font-size="11">{_e(short)}</text>'
            f'<rect class="bar-reason" x="{label_w}" y="{y}" width="{w:.1f}" height="18" '
            f'fill="{COLOURS["failed"]}"><title>{_e(reason)}</title></rect>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 14}" font-size="11">{count}</text>'
        )
    return (
        f'<svg id="chart-reasons" viewBox="0 0 {width} {len(top) * row_h + 8}" '
        f'role="img" aria-label="failure reasons">{"".join(bars)}</svg>'
    )


def _table(columns: list[str], rows: list[list[Any]], table_id: str) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return (
        f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _device_table(data: ReportData) -> str:
    note = ""
    if data.totals["devices"] > HTML_FULL_DEVICE_TABLE:
        shown = [d for d in data.devices() if not d.upgraded]
        note = (
            f'<p class="note">{data.totals["devices"]} devices: only the {len(shown)} not '
            "upgraded are listed here; the CSV and JSON reports have every row.</p>"
        )
    else:
        shown = list(data.devices())
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
        "task_finished",
        "in task by",
        "outcome",
        "passes",
    ]
    rows = [
        [
            d.device_id,
            d.wave,
            d.chunk,
            d.operation_id,
            d.task_status,
            d.subtask_status,
            "yes" if d.upgraded else "no",
            d.detail,
            d.version,
            d.task_finished,
            d.in_task_by,
            d.outcome,
            d.pass_outcomes,
        ]
        for d in shown
    ]
    return note + _table(columns, rows, "devices")


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


def render(data: ReportData) -> str:
    run, totals = data.run, data.totals
    share = totals["upgraded"] / totals["devices"] if totals["devices"] else 0.0
    cards = [
        ("devices", totals["devices"]),
        ("upgraded", f"{totals['upgraded']} ({share:.1%})"),
        ("failed", totals["failed"]),
        ("already current", totals["already_current"]),
        ("in progress", totals["in_progress"]),
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
    tasks_rows = [
        [
            t["operation_id"],
            t["chunk"],
            t["wave"],
            t["status"],
            t["total"],
            t["succeeded"],
            t["failed"],
            t["in_progress"],
            t["created"],
            t["finished"],
        ]
        for t in data.tasks
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Rollout report — {_e(run["plan"])}</title><style>{STYLE}</style></head>
<body><main>
<h1>Rollout {_e(run["plan"])}</h1>
<p class="sub">run {run["run_id"]} · <b class="status-{_e(run["status"])}">{_e(run["status"])}</b>
{stop} · {_e(run["operation"])} package {_e(run["file_id"])} (version
{_e(run["package_version"])}) · started {_e(run["created_at"])} · updated
{_e(run["updated_at"])}</p>
<section class="cards" id="summary">{card_html}</section>
<h2>Progress over time</h2><div class="panel">{progress_chart(data.progress, run["targets"])}</div>
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
        )
    }
{_passes(data)}
<h2>Failure reasons</h2><div class="panel">{reasons_chart(data.failure_reasons)}</div>
<h2>Quarantined devices</h2>
{
        _table(
            ["device", "chunk", "error code", "reason"],
            [[q["device_id"], q["chunk"], q["error_code"], q["reason"]] for q in data.quarantined],
            "quarantined",
        )
        if data.quarantined
        else '<p class="note">None.</p>'
    }
<h2>Devices in two tasks of this package</h2>
{
        _table(
            ["target", "operationIds (oldest first)"],
            [[d["target"], ", ".join(d["operation_ids"])] for d in data.duplicates[:1000]],
            "duplicates",
        )
        if data.duplicates
        else '<p class="note">None (closing census).</p>'
    }
<h2>Call budget spent</h2>
{_table(["API", "calls"], [[k, v] for k, v in data.calls.items()], "calls")}
<h2>Tasks</h2>
{
        _table(
            [
                "operationId",
                "chunk",
                "wave",
                "status",
                "devices",
                "succeeded",
                "failed",
                "in progress",
                "created",
                "finished",
            ],
            tasks_rows,
            "tasks",
        )
    }
<h2>Devices</h2>
{_device_table(data)}
<p class="note">Generated by fleet-orchestrator from the journal alone.</p>
</main></body></html>
"""
