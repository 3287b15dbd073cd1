"""How the tool says things in plain text: durations, clocks, sizes, one line per
notable event, an experiment's progress, the evaluation table. The app, the headless
printer, `status`, `runs` and the report all speak through here."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from rich.markup import escape

from sa2va_contract import events
from sa2va_contract.evaluation import METRIC_NAMES, METRIC_TITLES, EvaluationTable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from sa2va_tui.runstate import ExperimentState

#: Log lines of a failed worker shown under its failure.
TAIL_SHOWN = 8


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_clock(timestamp: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp)) if timestamp else "?"


def format_time(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GiB"


def device_name(gpu: int | None) -> str:
    return "CPU" if gpu is None else f"GPU {gpu}"


def describe_request(resources: dict[str, float]) -> str:
    """"GPU 1, CPU 2": what a worker asked a cluster for (zeros left out)."""
    shown = [f"{key} {resources[key]:g}" for key in ("GPU", "CPU") if resources.get(key)]
    return ", ".join(shown) or "nothing"


def place_name(gpu: int | None, host: str | None) -> str:
    """"GPU 0" or "CPU"; with the host in front when it is another machine ("node-a GPU 0")."""
    device = device_name(gpu)
    return f"{host} {device}" if host and host != socket.gethostname() else device


def progress_detail(state: "ExperimentState", now: float | None = None) -> str:
    """timesteps/total, percent, ETA and latest episode reward, as far as known."""
    parts = [f"{state.timesteps}/{state.total or '?'}"]
    if state.fraction is not None:
        parts.append(f"{state.fraction:4.0%}")
    if not state.terminal:
        parts.append(f"ETA {format_duration(state.eta_at(now or time.time()))}")
    if state.episode_reward is not None:
        parts.append(f"reward {state.episode_reward:.4g}")
    return "  ".join(parts)


def describe(event: events.Event) -> tuple[str, str] | None:
    """The line (rich markup) and style for a notable event; None for the others."""
    if isinstance(event, events.Queued):
        if event.position is not None:
            return f"queued: #{event.position} in line, waiting for a device with room", "dim"
        where = f", {escape(event.where)}" if event.where else ""
        return f"queued: waiting for the cluster to place it ({describe_request(event.resources)}{where})", "dim"
    if isinstance(event, events.Started):
        where = place_name(event.gpu, event.host)
        resumed = f", resumed from {escape(event.resumed_from)}" if event.resumed_from else ""
        return f"started (attempt {event.attempt}) pid {event.pid} on {where}, batch size {event.batch_size}{resumed}", ""
    if isinstance(event, events.Phase):
        return f"phase: {event.phase.replace('_', ' ')}", "dim"
    if isinstance(event, events.Checkpoint):
        return f"checkpoint at step {event.step}: {escape(event.path)}", "dim"
    if isinstance(event, events.Paused):
        return f"paused at step {event.step}", "yellow"
    if isinstance(event, events.Resumed):
        return "resumed", "yellow"
    if isinstance(event, events.Restarting):
        changes = [f"{key.replace('_', ' ')} {change.old} -> {change.new}" for key, change in event.changes.changed()]
        origin = event.changes.resume_from
        changes.append(f"from {escape(origin)}" if origin else "from the start")
        return f"restarting ({event.reason}), attempt {event.attempt}: {', '.join(changes)}", "yellow"
    if isinstance(event, events.Failed):
        code = f", exit code {event.exit_code}" if event.exit_code is not None else ""
        at = f" at step {event.step}" if event.step is not None else ""
        tail = "".join(f"\n    {escape(line)}" for line in event.log_tail[-TAIL_SHOWN:]) if event.kind != "oom" else ""
        return f"FAILED ({event.kind}){at}{code}: {escape(event.message)}{tail}", "bold red"
    if isinstance(event, events.Finished):
        scalars = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.summary.items()
                   if isinstance(v, (int, float, str)) and not isinstance(v, bool)][:6]
        return escape(f"finished {' '.join(scalars)}".rstrip()), "green"
    if isinstance(event, events.Stopped):
        return f"stopped at step {event.step} ({event.reason})", "yellow"
    return None


def evaluation_table(table: EvaluationTable) -> "Table":
    """A rich Table: mean ± std of each metric, and Dice's difference from the baseline."""
    from rich.table import Table

    out = Table(title=f"Evaluation on {table.split} ({len(table.sample_ids)} images, every row on the same images)")
    out.add_column("row")
    for metric in METRIC_NAMES:
        out.add_column(METRIC_TITLES[metric], justify="right")
    out.add_column("Δ Dice", justify="right")
    out.add_column("Δ IoU", justify="right")
    for row in table.rows:
        cells = [f"{row.mean(m):.4f} ± {row.std(m):.3f}" for m in METRIC_NAMES]
        if row.name == table.baseline:
            deltas = ["", ""]
        else:
            deltas = [f"{table.delta(row, m):+.4f}" for m in ("dice", "iou")]
        label = f"[dim]{row.label}[/dim]" if row.kind == "upper_bound" else row.label
        out.add_row(label, *cells, *deltas)
    if table.missing:
        out.caption = "not evaluated: " + "; ".join(f"{k} ({v})" for k, v in table.missing.items())
    return out


def output_console() -> "Console":
    """A rich console for a command's table: the terminal's width on a terminal, whole
    lines when piped (for grep and files, not the 80 columns rich would assume)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=240)
