"""The signal policy of every command that runs something until it is told to stop
(`launch`, `resume`, headless or in the app, and `tensorboard`).

SIGINT, SIGTERM and SIGHUP each ask for one graceful stop, however often they come:
GNU `timeout` signals the command and then its whole process group (two SIGTERMs),
and a closing terminal may send SIGHUP after Ctrl+C. Only a second SIGINT at least
`FORCE_AFTER_S` after the first forces the stop at once: a person pressing Ctrl+C
again, not a tool repeating itself. A signal the command was started with ignored
(`nohup` ignores SIGHUP; a script's background job SIGINT) stays ignored.

The handlers only take note (and may hand the stop to a thread): a stop runs outside
the handler, never interrupting the main thread inside a lock; the main thread looks
at `StopRequests.stop` and `.force`.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Callable

#: A second SIGINT at least this long after the first forces the stop; sooner it is
#: the same request repeated.
FORCE_AFTER_S = 1.0
#: The signals that ask for a graceful stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequests:
    """What the stop signals have asked so far; a context manager that installs the
    handlers (in the main thread only: elsewhere it only holds the two flags)."""

    def __init__(self, on_signal: Callable[[], None] | None = None) -> None:
        """`on_signal` is called (on the main thread, from the handler: it must not
        block or take a lock another thread may hold) after every signal taken note of."""
        #: Set by the first stop signal.
        self.stop = threading.Event()
        #: Set by a second SIGINT `FORCE_AFTER_S` after the first.
        self.force = threading.Event()
        #: The first stop signal's name ("SIGTERM"), None before one came.
        self.signal_name: str | None = None
        self._on_signal = on_signal
        self._first_sigint_at: float | None = None
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        """The shell's code for the signal that stopped the command (130 after Ctrl+C)."""
        return 128 + int(signal.Signals[self.signal_name]) if self.signal_name else 0

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                previous = signal.getsignal(number)
                if previous is not signal.SIG_IGN:
                    self._previous[number] = previous
                    signal.signal(number, self._take_note)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _take_note(self, number: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if number == signal.SIGINT:
            if self._first_sigint_at is None:
                self._first_sigint_at = now
            elif now - self._first_sigint_at >= FORCE_AFTER_S:
                self.force.set()
        if not self.stop.is_set():
            self.signal_name = signal.Signals(number).name
            self.stop.set()
        if self._on_signal is not None:
            self._on_signal()
