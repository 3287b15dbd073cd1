"""The bottom panel's view of one experiment's log file: its end, then whatever is
appended to it (through rotation and truncation), read on a thread worker."""

from __future__ import annotations

import time
from pathlib import Path

from textual import on, work
from textual.message import Message
from textual.widgets import Log
from textual.worker import get_current_worker

from sa2va_contract.files import LOG_TAIL_BYTES
from sa2va_tui.logtail import FileFollower, LineSplitter

#: How often a caught-up log is looked at again.
LOG_POLL_S = 0.5


class LogView(Log):
    class Lines(Message):
        """New lines of the followed file; `reset` when they replace what is shown."""

        def __init__(self, path: Path, lines: list[str], reset: bool) -> None:
            super().__init__()
            self.path, self.lines, self.reset = path, lines, reset

    def __init__(self, **kwargs) -> None:
        super().__init__(max_lines=5000, **kwargs)
        self._path: Path | None = None

    def follow(self, path: Path | None) -> None:
        """Show `path` from near its end on (None: nothing to show)."""
        self.clear()
        self._path = path
        if path is None:
            self.stop()
        else:
            self._follow(path)

    def stop(self) -> None:
        self._path = None
        self.workers.cancel_group(self, "follow")

    @work(thread=True, exclusive=True, exit_on_error=False, group="follow")
    def _follow(self, path: Path) -> None:
        worker = get_current_worker()
        follower, lines = FileFollower(path, from_end=LOG_TAIL_BYTES), LineSplitter()
        try:
            while not worker.is_cancelled:
                try:
                    data = follower.read()
                except OSError:
                    data = b""
                if follower.restarted:
                    lines.reset()
                if data or follower.restarted:
                    self.post_message(self.Lines(path, lines.feed(data), reset=follower.restarted))
                if follower.caught_up:
                    time.sleep(LOG_POLL_S)
        finally:
            follower.close()

    @on(Lines)
    def _lines(self, message: Lines) -> None:
        message.stop()
        if message.path != self._path:
            return  # from a file no longer followed
        if message.reset:
            self.clear()
        self.write_lines(message.lines)
