"""Where the event source's thread hands over to the UI.

A source may deliver thousands of progress and metric events a second; the screen
needs a few pictures a second. So the subscriber (`Inbox.__call__`, on the source's
thread) does almost nothing: events that supersede each other only mark the view dirty
(the UI reads the latest states itself on its timer), the reward history gets one
number, and only the rare events a person must see one by one (a failure, a restart, a
checkpoint...) cross into the UI as a typed `Message` each.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from typing import Callable

from textual.message import Message

from sa2va_contract.events import Event, GpuSample, Metrics, Phase, Progress
from sa2va_tui.runstate import EPISODE_REWARD

#: Episode-reward readings kept per experiment, for the sparkline and the trend.
HISTORY = 120


class SourceEvent(Message):
    """One event worth a line in the event log."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class Inbox:
    """The source's subscriber. Thread-safe; every method but `__call__` is for the UI."""

    def __init__(self, post: Callable[[Message], object], history: int = HISTORY) -> None:
        self._post = post
        self._lock = threading.Lock()
        self._dirty = True
        self._rewards: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=history))
        self._phases: dict[str, str] = {}
        self._gpus: GpuSample | None = None
        #: Events seen, for the benchmark's throughput figure.
        self.received = 0

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.received += 1
            self._dirty = True
            if isinstance(event, Progress):
                return
            if isinstance(event, Metrics):
                reward = event.values.get(EPISODE_REWARD)
                if reward is not None:
                    self._rewards[event.experiment].append(reward)
                return
            if isinstance(event, GpuSample):
                self._gpus = event
                return
            if isinstance(event, Phase):
                # A phase's own progress supersedes; only entering a phase is news.
                if self._phases.get(event.experiment) == event.phase:
                    return
                self._phases[event.experiment] = event.phase
        self._post(SourceEvent(event))

    def take_dirty(self) -> bool:
        """Whether anything arrived since the last call."""
        with self._lock:
            dirty, self._dirty = self._dirty, False
            return dirty

    def rewards(self, name: str) -> tuple[float, ...]:
        with self._lock:
            return tuple(self._rewards.get(name, ()))

    def gpus(self) -> GpuSample | None:
        with self._lock:
            return self._gpus
