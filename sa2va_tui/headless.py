"""Headless mode: the supervisor (or a log watcher) without the Textual app, for `nohup`
and CI. One line per notable event; progress as rich bars on a terminal, and as a line
per tenth of the way elsewhere, so that a log file stays short.

An output that closes (`| head`, a terminal hung up) only silences the printer: the
run goes on, and the run folder records it all. Stop signals follow
`sa2va_tui.signals`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from sa2va_contract import events
from sa2va_tui.runstate import EventHub
from sa2va_tui.signals import FORCE_AFTER_S, StopRequests
from sa2va_tui.text import describe, mask_counts_text, progress_detail, stage_detail

#: How often the main thread looks at the stop signals while it waits.
SIGNAL_POLL_S = 0.2


class QuietConsole(Console):
    """A console that falls silent when its reader goes away, where rich's own would
    raise SystemExit on whatever thread printed: the run must go on without it."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        silence_stdout(self.file)


def silence_stdout(file: object) -> None:
    """Point standard output (file descriptor 1) at /dev/null when `file` writes to it,
    so that nothing written later (a line, the interpreter's last flush) meets the
    closed pipe again."""
    try:
        if getattr(file, "fileno", lambda: -1)() == 1:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
    except (OSError, ValueError):
        pass  # no standard output at all: nothing to silence


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
        self._print(f"{stamp} [bold]{escape(who)}[/] {body}")

    def _print(self, markup: str) -> None:
        if self.console.quiet:
            return
        try:
            self.console.print(markup, highlight=False, soft_wrap=True)
        except (OSError, SystemExit):
            self.fall_silent()  # EIO from a terminal that hung up; rich's own SystemExit on EPIPE

    def fall_silent(self) -> None:
        """Print nothing more (the output has closed); the run is not affected."""
        self.console.quiet = True
        if self._bars is not None:
            try:
                self._bars.stop()
            except (OSError, SystemExit):
                pass
        silence_stdout(self.console.file)

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
            try:
                self._bars.update(self._tasks[name], completed=state.timesteps, total=state.total or None,
                                  detail=detail)
            except (OSError, SystemExit):
                self.fall_silent()
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


class PrinterLog(logging.Handler):
    """The tool's own warnings (a worker killed, a subscriber dropped) as the
    printer's lines, not as raw `logging` output on stderr."""

    def __init__(self, printer: HeadlessPrinter) -> None:
        super().__init__(logging.WARNING)
        self._printer = printer

    def emit(self, record: logging.LogRecord) -> None:
        style = "bold red" if record.levelno >= logging.ERROR else "yellow"
        self._printer.line("sa2va-tui", escape(record.getMessage()), style)


def run_headless(source: EventHub, console: Console | None = None, grace_s: float = 10.0,
                 start: Callable[[], None] | None = None) -> int:
    """Show `source` until it is done; `start` (if given) starts it once this listens, so
    that no event is missed. SIGINT, SIGTERM or SIGHUP stop every experiment gracefully
    within `grace_s`; a second Ctrl+C, a second or more after the first, at once.
    Returns the exit code: 0, 1 when an experiment failed for good or the source cut
    the run short (a full disk), 128 + the signal's number when stopped by one."""
    console = console or QuietConsole()
    printer = HeadlessPrinter(source, console)
    unsubscribe = source.subscribe(printer.on_event)
    tool_log = logging.getLogger("sa2va_tui")
    to_printer = PrinterLog(printer)
    tool_log.addHandler(to_printer)
    code = 0
    try:
        with StopRequests() as requests:
            if start is not None:
                start()
            with printer:
                while not source.wait(timeout=SIGNAL_POLL_S) and not requests.stop.is_set():
                    pass
                if requests.stop.is_set():
                    code = requests.exit_code
                    printer.line("sa2va-tui", f"interrupted: stopping every experiment ({requests.signal_name}; "
                                              f"at most {grace_s:g} s; Ctrl+C again, {FORCE_AFTER_S:g} s or more "
                                              "later, to stop at once)", "yellow")
                    _stop_every_experiment(source, grace_s, requests, printer)
                else:
                    source.shutdown(grace_s)
            printer.summary()  # a fault of the source's own was told as it happened, by the tool's log
    finally:
        unsubscribe()
        tool_log.removeHandler(to_printer)
    if code == 0 and (getattr(source, "fault", None) or any(s.state == "failed" for s in source.states().values())):
        code = 1
    return code


def _stop_every_experiment(source: EventHub, grace_s: float, requests: StopRequests,
                           printer: HeadlessPrinter) -> None:
    """The graceful stop, on a thread of its own so that this one still hears a
    forcing Ctrl+C (and then stops every worker at once)."""
    stopper = threading.Thread(target=source.shutdown, args=(grace_s,), name="graceful-stop", daemon=True)
    stopper.start()
    forced = False
    while stopper.is_alive():
        stopper.join(SIGNAL_POLL_S)
        if requests.force.is_set() and not forced:
            forced = True
            printer.line("sa2va-tui", "Ctrl+C again: stopping every experiment at once", "yellow")
            source.shutdown(0.0)
