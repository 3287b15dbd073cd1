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

    from sa2va_contract.evaluation import BreakdownGroup, Interval
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
        return escape(finished_text(event.summary)), "green"
    if isinstance(event, events.Stopped):
        return f"stopped at step {event.step} ({event.reason})", "yellow"
    if isinstance(event, events.Notice):
        return escape(event.message), "yellow"
    return None


def interval_text(interval: "Interval | None") -> str:
    """`+0.0412 [+0.0301, +0.0519]`, and `within noise` where the interval covers 0."""
    if interval is None:
        return ""
    text = f"{interval.mean:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]"
    return text + " within noise" if interval.within_noise else text


def warning_text(table: EvaluationTable) -> str:
    """The table's warning in words ("" for none)."""
    from sa2va_contract.evaluation import WARNINGS

    return WARNINGS.get(table.warning, table.warning)


def splits_text(table: EvaluationTable) -> str:
    """Which split chose and which reports, in one clause."""
    return f"{table.chosen_on} chose, {table.split} reports"


def _gain_text(gain: float, bounds) -> str:
    """`+0.0412 [+0.0301, +0.0519]`, `within noise` where the interval covers 0."""
    if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2):
        return f"{gain:+.4f}"
    low, high = bounds
    return f"{gain:+.4f} [{low:+.4f}, {high:+.4f}]" + (" within noise" if low <= 0 <= high else "")


#: Summary keys a finished line words itself rather than lists.
_WORDED = {"val_baseline_dice", "val_policy_dice", "val_dice_gain", "val_dice_gain_interval", "finetune"}


def finished_text(summary: dict) -> str:
    """A finished experiment in one line. Its figures say which split they are on:
    val's chose the checkpoint (so they flatter it; `evaluate` reports on test), the
    fine-tuning's are on the reported split."""
    parts = ["finished"]
    if "val_dice_gain" in summary:
        parts.append(f"val Dice {summary.get('val_baseline_dice', float('nan')):.4f} -> "
                     f"{summary.get('val_policy_dice', float('nan')):.4f} "
                     f"({_gain_text(summary['val_dice_gain'], summary.get('val_dice_gain_interval'))}; val chose this "
                     "checkpoint, so it flatters: `sa2va-tui evaluate` reports on test);")
    tuning = summary.get("finetune")
    if isinstance(tuning, dict) and "dice_after" in tuning:
        gain = _gain_text(tuning["dice_after"] - tuning["dice_before"], tuning.get("dice_gain_interval"))
        parts.append(f"fine-tuned model on {tuning.get('split', '?')}: Dice {tuning['dice_before']:.4f} -> "
                     f"{tuning['dice_after']:.4f} ({gain});")
    scalars = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
               if k not in _WORDED and isinstance(v, (int, float, str)) and not isinstance(v, bool)][:4]
    return " ".join(parts + scalars).rstrip(";")


def evaluation_table(table: EvaluationTable) -> "Table":
    """A rich Table: mean ± std of each metric, Dice's difference from the baseline
    with its 95 % interval, and the seeds a row folds."""
    from rich.table import Table

    title = (f"Evaluation on {table.split} ({len(table.sample_ids)} images, every row on the same images; "
             f"{splits_text(table)})")
    out = Table(title=title)
    out.add_column("row")
    for metric in METRIC_NAMES:
        out.add_column(METRIC_TITLES[metric], justify="right")
    out.add_column("Δ Dice [95 % interval]", justify="right")
    out.add_column("Δ IoU", justify="right")
    out.add_column("seeds", justify="right")
    for row in table.rows:
        cells = [f"{row.mean(m):.4f} ± {row.std(m):.3f}" for m in METRIC_NAMES]
        if row.name == table.baseline:
            deltas = ["", ""]
        else:
            deltas = [escape(interval_text(row.interval)), f"{table.delta(row, 'iou'):+.4f}"]
        label = f"[dim]{escape(row.label)}[/dim]" if row.kind == "upper_bound" else escape(row.label)
        out.add_row(label, *cells, *deltas, str(len(row.seeds)) if row.seeds else "")
    captions = []
    if table.warning:
        captions.append(f"warning: {warning_text(table)}")
    if table.missing:
        captions.append("not evaluated: " + "; ".join(f"{k} ({v})" for k, v in table.missing.items()))
    if captions:
        out.caption = escape("\n".join(captions))
    return out


def seeds_table(table: EvaluationTable) -> "Table | None":
    """Each seed of the folded rows: its Dice and its difference from the baseline."""
    from rich.table import Table

    rows = [(row, run) for row in table.rows for run in row.seeds]
    if not rows:
        return None
    base = table.row(table.baseline).values["dice"]
    out = Table(title=f"Per seed, on {table.split}")
    for column in ("row", "experiment", "seed", "Dice", "Δ Dice"):
        out.add_column(column, justify="right" if column in ("seed", "Dice", "Δ Dice") else "left")
    for row, run in rows:
        delta = sum(a - b for a, b in zip(run.values["dice"], base)) / len(base)
        out.add_row(escape(row.name), escape(run.experiment), str(run.seed), f"{run.mean('dice'):.4f}", f"{delta:+.4f}")
    return out


def group_title(group: "BreakdownGroup", by: str) -> str:
    if by == "difficulty" and group.bounds is not None:
        return f"{group.name}: baseline Dice {group.bounds[0]:.2f}-{group.bounds[1]:.2f}"
    return group.name


def breakdown_table(table: EvaluationTable, by: str) -> "Table | None":
    """Each row's Dice gain by condition (or by quarter of the baseline's Dice), and
    the share of its whole gain each group holds."""
    from rich.table import Table

    from sa2va_contract.evaluation import breakdown

    groups = breakdown(table, by)
    if not groups:
        return None
    rows = [row for row in table.rows if row.name != table.baseline]
    out = Table(title=f"Δ Dice by {by} on {table.split} (share of the row's whole gain)")
    out.add_column(by)
    out.add_column("images", justify="right")
    out.add_column("baseline", justify="right")
    for row in rows:
        out.add_column(escape(row.name), justify="right")
    for group in groups:
        cells = []
        for row in rows:
            share = group.shares[row.name]
            cells.append(f"{group.deltas[row.name]:+.3f}" + (f" ({share:.0%})" if share is not None else ""))
        out.add_row(escape(group_title(group, by)), str(group.samples), f"{group.baseline_dice:.3f}", *cells)
    return out


def output_console() -> "Console":
    """A rich console for a command's table: the terminal's width on a terminal, whole
    lines when piped (for grep and files, not the 80 columns rich would assume)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=240)


def markdown_table(table: "Table") -> str:
    """A rich Table as plain Markdown: its title, a pipe table of its cells (markup
    taken out), its caption."""
    from rich.text import Text

    def plain(cell: object) -> str:
        text = Text.from_markup(cell) if isinstance(cell, str) else cell
        return str(text.plain if isinstance(text, Text) else text).replace("|", "\\|").replace("\n", " ")

    headers = [plain(column.header) for column in table.columns]
    columns = [[plain(cell) for cell in column.cells] for column in table.columns]
    lines = [f"**{plain(table.title)}**", ""] if table.title else []
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in zip(*columns)]
    if table.caption:
        lines += ["", plain(table.caption)]
    return "\n".join(lines) + "\n"


def print_table(console: "Console", table: "Table") -> None:
    """On a terminal, the table drawn; piped, plain Markdown at full width (a file or a
    grep gets whole rows, not cells wrapped at 80 columns)."""
    if console.is_terminal:
        console.print(table)
    else:
        console.file.write(markdown_table(table) + "\n")


# --- the mask stage -----------------------------------------------------------------


def stage_detail(state, now: float | None = None) -> str:
    """The mask stage in one line: pairs done of those to compute, rate, ETA, devices."""
    parts = [f"{state.timesteps}/{state.total} pairs"]
    if state.fraction is not None:
        parts.append(f"{state.fraction:4.0%}")
    if state.rate:
        parts.append(f"{state.rate:.0f} pairs/s")
    if not state.terminal and state.total:
        parts.append(f"ETA {format_duration(state.eta_at(now or time.time()))}")
    if state.devices:
        parts.append("on " + ", ".join(state.devices))
    return "  ".join(parts)


def mask_counts_text(counts: dict) -> str:
    """run.json's counts in words."""
    distinct = counts.get("distinct_pairs")
    return (f"model calls {counts.get('model_calls', 0)}, distinct pairs {distinct if distinct is not None else '?'}, "
            f"cache hits {counts.get('cache_hits', 0)}")
