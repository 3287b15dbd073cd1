"""Headless mode: the supervisor (or a log watcher) without the Textual app, for `nohup`
and CI. One line per notable event; progress as rich bars on a terminal, and as a line
per tenth of the way elsewhere, so that a log file stays short.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from sa2va_contract import events
from sa2va_tui.runstate import EventHub
from sa2va_tui.text import describe, mask_counts_text, progress_detail, stage_detail


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

    def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.GpuSample):
            if event.message != self._gpu_message:
                self._gpu_message = event.message
                self.line("gpus", escape(event.message) + ("" if event.available else "; running on the CPU"), "dim")
            return
        if isinstance(event, events.Phase):
            if self._phases.get(event.experiment) == event.phase:
                return  # the phase's own progress: shown by the bar
            self._phases[event.experiment] = event.phase
        if isinstance(event, (events.Progress, events.Finished)):
            self._show_progress(event.experiment)
        if event.experiment == events.MASK_STAGE and self._stage_line(event):
            return
        found = describe(event)
        if found:
            self.line(event.experiment, *found)

    def _stage_line(self, event: events.Event) -> bool:
        """The mask stage's own lines; False for an event it shares with experiments."""
        if isinstance(event, events.PairsReady):
            self.line(event.experiment, f"pairs ready for {escape(event.ready_for)} ({event.pairs})", "green")
            return True
        if isinstance(event, events.MaskWork):
            if event.devices and event.model_calls == 0 and event.distinct_pairs:
                self.line(event.experiment, f"{event.distinct_pairs} distinct pairs, {event.cache_hits} cached; "
                                            f"computing the rest on {escape(', '.join(event.devices))}", "dim")
            return True
        return False

    def _show_progress(self, name: str) -> None:
        state = self.source.stage() if name == events.MASK_STAGE else self.source.states().get(name)
        if state is None:
            return
        detail = stage_detail(state) if name == events.MASK_STAGE else progress_detail(state)
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
        stage = self.source.stage()
        if stage is not None:
            self.line(stage.name, f"{stage.state}: {stage_detail(stage, now)}",
                      {"finished": "green", "failed": "bold red"}.get(stage.state, "yellow"))
        for name, state in self.source.states().items():
            style = {"finished": "green", "failed": "bold red"}.get(state.state, "yellow")
            self.line(name, f"{state.state}: {progress_detail(state, now)}", style)
        counts = self.source.mask_counts()
        if counts.get("distinct_pairs") is not None or counts.get("model_calls"):
            self.line("masks", mask_counts_text(counts), "dim")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_headless(source: EventHub, console: Console | None = None, grace_s: float = 10.0,
                 start: Callable[[], None] | None = None) -> int:
    """Show `source` until it is done; `start` (if given) starts it once this listens, so
    that no event is missed. Ctrl+C (or SIGTERM) stops every experiment gracefully
    within `grace_s`, a second Ctrl+C at once. Returns the exit code: 0, 1 when an
    experiment failed for good, 130 when interrupted."""
    console = console or Console()
    printer = HeadlessPrinter(source, console)
    unsubscribe = source.subscribe(printer.on_event)
    if start is not None:
        try:
            start()
        except BaseException:
            unsubscribe()
            raise
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
