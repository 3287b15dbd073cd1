"""Headless mode: the supervisor (or a log watcher) without the Textual app, for `nohup`
and CI. One line per notable event; progress as rich bars on a terminal, and as a line
per tenth of the way elsewhere, so that a log file stays short.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from sa2va_tui.events import (
    Checkpoint,
    Event,
    Failed,
    Finished,
    GpuSample,
    Paused,
    Phase,
    Restarting,
    Resumed,
    Started,
    Stopped,
)
from sa2va_tui.events import Progress as ProgressEvent
from sa2va_tui.runstate import EventHub, ExperimentState

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


def progress_detail(state: ExperimentState, now: float | None = None) -> str:
    """timesteps/total, percent, ETA and latest episode reward, as far as known."""
    parts = [f"{state.timesteps}/{state.total or '?'}"]
    if state.fraction is not None:
        parts.append(f"{state.fraction:4.0%}")
    if not state.terminal:
        parts.append(f"ETA {format_duration(state.eta_at(now or time.time()))}")
    if state.episode_reward is not None:
        parts.append(f"reward {state.episode_reward:.4g}")
    return "  ".join(parts)


def describe(event: Event) -> tuple[str, str] | None:
    """The line (rich markup) and style for a notable event; None for the others."""
    if isinstance(event, Started):
        where = "CPU" if event.gpu is None else f"GPU {event.gpu}"
        resumed = f", resumed from {escape(event.resumed_from)}" if event.resumed_from else ""
        return f"started (attempt {event.attempt}) pid {event.pid} on {where}, batch size {event.batch_size}{resumed}", ""
    if isinstance(event, Phase):
        return f"phase: {event.phase.replace('_', ' ')}", "dim"
    if isinstance(event, Checkpoint):
        return f"checkpoint at step {event.step}: {escape(event.path)}", "dim"
    if isinstance(event, Paused):
        return f"paused at step {event.step}", "yellow"
    if isinstance(event, Resumed):
        return "resumed", "yellow"
    if isinstance(event, Restarting):
        changes = [f"{key.replace('_', ' ')} {old} -> {new}" for key, value in event.changes.items()
                   if isinstance(value, list) for old, new in [value]]
        origin = event.changes.get("resume_from")
        changes.append(f"from {escape(origin)}" if origin else "from the start")
        return f"restarting ({event.reason}), attempt {event.attempt}: {', '.join(changes)}", "yellow"
    if isinstance(event, Failed):
        code = f", exit code {event.exit_code}" if event.exit_code is not None else ""
        at = f" at step {event.step}" if event.step is not None else ""
        tail = "".join(f"\n    {escape(line)}" for line in event.log_tail[-TAIL_SHOWN:]) if event.kind != "oom" else ""
        return f"FAILED ({event.kind}){at}{code}: {escape(event.message)}{tail}", "bold red"
    if isinstance(event, Finished):
        scalars = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.summary.items()
                   if isinstance(v, (int, float, str)) and not isinstance(v, bool)][:6]
        return escape(f"finished {' '.join(scalars)}".rstrip()), "green"
    if isinstance(event, Stopped):
        return f"stopped at step {event.step} ({event.reason})", "yellow"
    return None


class HeadlessPrinter:
    """Prints a source's events; use as a context manager around the run."""

    def __init__(self, source: EventHub, console: Console) -> None:
        self.source = source
        self.console = console
        self._bars = Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                              console=console) if console.is_terminal else None
        self._tasks: dict[str, TaskID] = {}
        self._tenths: dict[str, int] = {}
        self._phases: dict[str, str] = {}
        self._gpu_message: str | None = None

    def __enter__(self) -> "HeadlessPrinter":
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def line(self, who: str, text: str, style: str = "") -> None:
        stamp = time.strftime("%H:%M:%S")
        body = f"[{style}]{text}[/]" if style else text
        self.console.print(f"{stamp} [bold]{escape(who)}[/] {body}", highlight=False, soft_wrap=True)

    def on_event(self, event: Event) -> None:
        if isinstance(event, GpuSample):
            if event.message != self._gpu_message:
                self._gpu_message = event.message
                self.line("gpus", escape(event.message) + ("" if event.available else "; running on the CPU"), "dim")
            return
        if isinstance(event, Phase):
            if self._phases.get(event.experiment) == event.phase:
                return  # the phase's own progress: shown by the bar
            self._phases[event.experiment] = event.phase
        if isinstance(event, (ProgressEvent, Finished)):
            self._show_progress(event.experiment)
        found = describe(event)
        if found:
            self.line(event.experiment, *found)

    def _show_progress(self, name: str) -> None:
        state = self.source.states().get(name)
        if state is None:
            return
        detail = progress_detail(state)
        if self._bars is not None:
            if name not in self._tasks:
                self._tasks[name] = self._bars.add_task(name, total=None, detail="")
            self._bars.update(self._tasks[name], completed=state.timesteps, total=state.total or None, detail=detail)
            return
        tenth = int(state.fraction * 10) if state.fraction is not None else 0
        if tenth > self._tenths.get(name, 0):
            self._tenths[name] = tenth
            self.line(name, detail, "cyan")

    def summary(self) -> None:
        now = time.time()
        for name, state in self.source.states().items():
            style = {"finished": "green", "failed": "bold red"}.get(state.state, "yellow")
            self.line(name, f"{state.state}: {progress_detail(state, now)}", style)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_headless(source: EventHub, console: Console | None = None, grace_s: float = 10.0) -> int:
    """Show `source` until it is done. Ctrl+C (or SIGTERM) stops every experiment
    gracefully within `grace_s`, a second Ctrl+C at once. Returns the exit code: 0, 1
    when an experiment failed for good, 130 when interrupted."""
    console = console or Console()
    printer = HeadlessPrinter(source, console)
    unsubscribe = source.subscribe(printer.on_event)
    # A `kill` of a nohup'd run deserves the same graceful stop as Ctrl+C.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
    code = 0
    try:
        with printer:
            try:
                while not source.wait(timeout=0.5):
                    pass
            except KeyboardInterrupt:
                code = 130
                printer.line("sa2va-tui", f"interrupted: stopping every experiment (at most {grace_s:g} s; "
                                          "Ctrl+C again to stop at once)", "yellow")
                try:
                    source.shutdown(grace_s)
                except KeyboardInterrupt:
                    source.shutdown(0.0)
            source.shutdown(grace_s)
        printer.summary()
    finally:
        unsubscribe()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if code == 0 and any(s.state == "failed" for s in source.states().values()):
        code = 1
    return code
