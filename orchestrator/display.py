"""The live display of a run: on the one stderr console the logs use (orchestrator.logs), so
log lines scroll above it and never into it.

    ─ submitting ─ targets in tasks ━━━━━━━━━━━━━━━━━━━━━━━━ 1792/6098 97 creates/min 0:18 ETA 0:44
    wave     targets  in a task  finished  upgraded  failed  gate     waiting for
    canary       256        256       251       240      11  passed
    quarter     1461       1461      1003       958      45  waiting  1003 of 1461 finished …
    rest        4381         75         0         0       0  pending
    monitoring: 1254 of 1792 devices in tasks finished · last poll 14:02:11

Shown only when stderr is a terminal; a pipeline reads the log lines alone.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bar
from rich.table import Table
from rich.text import Text

from .observe import Observer, RunView

if TYPE_CHECKING:
    from .submitter import Progress

GATE_STYLES = {
    "passed": "green",
    "failed": "bold red",
    "awaiting-approval": "yellow",
    "soaking": "cyan",
    "waiting": "cyan",
}


class RunDisplay(Observer):
    """Submission progress and, per wave, where its devices and its gate stand."""

    def __init__(self, console: Console, total_targets: int) -> None:
        self.console = console
        self.enabled = console.is_terminal
        self.total = total_targets
        self.bar = Bar(
            TextColumn("[bold]targets in tasks"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.bar.add_task("submit", total=total_targets, rate="")
        self.done = 0
        self.latest: RunView | None = None
        self.live: Live | None = None

    # ---- the observer ----------------------------------------------------------------------
    def progress(self, progress: Progress) -> None:
        elapsed = time.monotonic() - progress.started
        # a rate needs a few seconds of creates: one create in 0.1 s is not "600 a minute"
        rate = (
            f"{progress.creates / elapsed * 60:.0f} creates/min"
            if elapsed >= RATE_AFTER_S
            else "rate: measuring"
        )
        self.done, self.total = progress.done_targets, progress.total_targets
        self.bar.update(
            self.task, total=progress.total_targets, completed=progress.done_targets, rate=rate
        )
        self._show()

    def view(self, view: RunView) -> None:
        self.latest = view
        self.done = max(self.done, sum(w.in_tasks for w in view.waves))
        self._show()

    # ---- drawing ---------------------------------------------------------------------------
    def _show(self) -> None:
        if not self.enabled:
            return
        if self.live is None:
            self.live = Live(
                self.render(),
                console=self.console,
                refresh_per_second=4,
                redirect_stdout=False,
                redirect_stderr=True,
            )
            self.live.start()
        else:
            self.live.update(self.render())

    def stop(self) -> None:
        """Leave the last frame on screen (the closing summary follows on stdout)."""
        if self.live is not None:
            self.live.update(self.render(), refresh=True)
            self.live.stop()
            self.live = None

    def render(self) -> RenderableType:
        parts: list[RenderableType] = []
        if self.done < self.total:
            parts.append(self.bar)
        else:
            parts.append(Text(f"all {self.total} targets are in tasks (or quarantined)"))
        view = self.latest
        if view is not None and view.waves:
            parts.append(wave_table(view))
            parts.append(_monitor_line(view))
        return Group(*parts)


RATE_AFTER_S = 5.0  # seconds of creates before the bar shows a rate


def wave_table(view: RunView) -> Table:
    """Per wave: devices in a task, finished, upgraded, failed (already current when the
    journal tells it), the gate's state and what it waits for."""
    current = any(w.already_current is not None for w in view.waves)
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("wave")
    for column in ("targets", "in a task", "finished", "upgraded", "failed"):
        table.add_column(column, justify="right")
    if current:
        table.add_column("already current", justify="right")
    table.add_column("gate")
    table.add_column("waiting for", overflow="fold")
    for w in view.waves:
        cells: list[Any] = [w.name, w.targets, w.in_tasks, w.finished, w.upgraded, w.failed]
        if current:
            cells.append("" if w.already_current is None else w.already_current)
        gate = w.gate + (" (approved)" if w.approved else "")
        style = GATE_STYLES.get(w.gate, "")
        row = [str(c) for c in cells] + [f"[{style}]{gate}[/]" if style else gate, w.waiting_for]
        table.add_row(*row)
    return table


def _monitor_line(view: RunView) -> Text:
    in_tasks = view.devices
    stamp = datetime.fromtimestamp(view.at).strftime("%H:%M:%S")
    return Text(
        f"monitoring: {view.finished} of {in_tasks} devices in tasks finished · last look {stamp}",
        style="dim",
    )
