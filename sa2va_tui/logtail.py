"""A second event source: experiments started elsewhere, seen through their log files.

stable-baselines3 prints its metrics as tables on stdout:

    -----------------------------------------
    | rollout/                |             |
    |    ep_len_mean          | 22.4        |
    |    ep_rew_mean          | 5.07        |
    | time/                   |             |
    |    total_timesteps      | 2048        |
    -----------------------------------------

`LogWatcher` follows such log files (`tail -F`: through rotation and truncation) and
turns each table into the same Metrics and Progress events a worker of ours sends, so
`sa2va-tui watch` shows them like the experiments it runs. Anything else in the file,
progress bars, prints, undecodable bytes, is skipped.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from pathlib import Path
from typing import BinaryIO

from sa2va_contract.events import Event, Failed, Finished, Metrics, Progress
from sa2va_tui.runstate import EventHub

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# Not anchored at the start: a progress bar redrawn without a newline may precede a
# table's first line, and a table row is the last two cells of its line.
_DASHES = re.compile(r"-{9,}$")
_ROW = re.compile(r"\| (?P<key>[^|]*?) *\| (?P<value>[^|]*?) *\|$")
#: SB3 indents a key under its section ("rollout/") by three spaces.
_INDENT = "   "
TIMESTEPS_KEY = "time/total_timesteps"
FPS_KEY = "time/fps"
#: A followed log silent this long (seconds) shows as stalled, not running.
STALLED_AFTER_S = 300.0


class Sb3TableParser:
    """Line by line, the key/value tables of SB3's stdout logger; everything else is
    ignored. A table is complete at its closing dashes, or, should that line be lost,
    at the opening dashes of the next."""

    def __init__(self) -> None:
        self._section = ""
        self._values: dict[str, float] = {}

    def feed(self, line: str) -> dict[str, float] | None:
        """One line; returns a table's numeric values when this line completes one."""
        line = _ANSI.sub("", line).strip()
        if _DASHES.search(line):
            table, self._values, self._section = self._values, {}, ""
            return table or None
        row = _ROW.search(line)
        if row is None:
            return None
        key, value = row.group("key"), row.group("value")
        if not value and key.endswith("/"):
            self._section = key
        elif key.startswith(_INDENT):
            self._add(self._section + key.strip(), value)
        else:
            self._section = ""
            self._add(key, value)
        return None

    def _add(self, key: str, value: str) -> None:
        try:
            number = float(value)
        except ValueError:
            return  # text values (a device name, a truncated "...")
        if math.isfinite(number):
            self._values[key] = number


class FileFollower:
    """Follows one file as `tail -F` does: through rotation (the file renamed and a new
    one created: the old one is read to its end first) and truncation in place
    (copytruncate: it starts over). `from_end` starts that many bytes before the end
    instead of at the start. The file need not exist yet."""

    #: Bytes read per call at most, so one huge file cannot stall other work.
    CHUNK = 1024 * 1024

    def __init__(self, path: Path, from_end: int | None = None) -> None:
        self.path = Path(path)
        self._from_end = from_end
        self._file: BinaryIO | None = None
        self._inode: int | None = None
        #: Whether the last read returned everything there was.
        self.caught_up = False
        #: Set when what follows replaces what was read before (truncation, a new file).
        self.restarted = False
        #: When the file last changed (its modification time), None before it exists.
        self.modified: float | None = None

    def read(self) -> bytes:
        self.restarted = False
        data = self._read()
        self.caught_up = len(data) < self.CHUNK
        return data

    def _read(self) -> bytes:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            stat = None
        if stat is not None:
            self.modified = stat.st_mtime
        if self._file is None:
            if stat is None:
                return b""
            self._open(tail=True)
        assert self._file is not None
        if stat is not None and stat.st_ino == self._inode and stat.st_size < self._file.tell():
            self._file.seek(0)
            self.restarted = True
        data = self._file.read(self.CHUNK)
        if not data and stat is not None and stat.st_ino != self._inode:
            # Rotated, and the old file is read to its end: on to the new one.
            self._file.close()
            self._open(tail=False)
            data = self._file.read(self.CHUNK)
        return data

    def _open(self, tail: bool) -> None:
        self._file = open(self.path, "rb")
        self._inode = os.fstat(self._file.fileno()).st_ino
        self.restarted = True
        if tail and self._from_end is not None:
            size = self._file.seek(0, os.SEEK_END)
            self._file.seek(max(0, size - self._from_end))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LineSplitter:
    """Bytes in, whole lines out; a bare carriage return ends a line too (progress bars
    redraw with one), and an endless "line" is dropped rather than kept in memory."""

    MAX_LINE = 64 * 1024

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        lines = _LINE_BREAK.split(self._buffer + data)
        self._buffer = lines.pop()
        if len(self._buffer) > self.MAX_LINE:
            self._buffer = b""
        return [raw.decode("utf-8", errors="replace") for raw in lines]

    def reset(self) -> None:
        self._buffer = b""


class LogTail:
    """One training log followed from its start, its SB3 tables turned into events."""

    def __init__(self, path: Path, name: str, total: int | None = None) -> None:
        self.path = Path(path)
        self.name = name
        self.total = total or 0
        self._follower = FileFollower(self.path)
        self._lines = LineSplitter()
        self._parser = Sb3TableParser()
        self._tables = 0
        #: The last timesteps its tables reported.
        self.timesteps = 0
        #: Why it can no longer be read (it became a folder, lost its permission, an I/O
        #: error); from then on it is not read again.
        self.broken: OSError | None = None

    @property
    def caught_up(self) -> bool:
        """Whether the last poll read everything there was (all of a broken log was)."""
        return self.broken is not None or self._follower.caught_up

    @property
    def modified(self) -> float | None:
        return self._follower.modified

    @property
    def at_total(self) -> bool:
        """Its tables reached the total timesteps it was given."""
        return bool(self.total) and self.timesteps >= self.total

    def poll(self) -> list[Event]:
        """Events from what was written since the last poll, up to `FileFollower.CHUNK` bytes
        of it. A log that cannot be read fails, as an experiment does, once: the others
        are read on."""
        if self.broken is not None:
            return []
        try:
            data = self._follower.read()
        except OSError as err:
            self.broken = err
            self._follower.close()
            return [Failed(self.name, kind="error", message=f"{self.path}: cannot be read ({err.strerror or err})")]
        if self._follower.restarted:
            self._lines.reset()
        events: list[Event] = []
        for line in self._lines.feed(data) if data else []:
            table = self._parser.feed(line)
            if table:
                events += self._table_events(table)
        return events

    def _table_events(self, table: dict[str, float]) -> list[Event]:
        self._tables += 1
        timesteps = table.get(TIMESTEPS_KEY)
        step = int(timesteps) if timesteps is not None else self._tables
        events: list[Event] = [Metrics(self.name, step=step, values=table)]
        if timesteps is not None:
            self.timesteps = step
            events.append(Progress(self.name, timesteps=step, total=self.total, rate=table.get(FPS_KEY)))
        return events

    def close(self) -> None:
        self._follower.close()


def experiment_names(paths: list[Path]) -> list[str]:
    """A short name per log: its stem, or parent/stem where stems repeat."""
    stems = [p.stem for p in paths]
    return [p.stem if stems.count(p.stem) == 1 else f"{p.parent.name}/{p.stem}" for p in paths]


class LogWatcher(EventHub):
    """The event source for `watch`: polls its logs a few times a second on one thread.
    With `follow=False` it reads what is there and is done."""

    def __init__(self, paths: list[Path], total: int | None = None, follow: bool = True,
                 interval: float = 0.25, stalled_after: float = STALLED_AFTER_S) -> None:
        super().__init__()
        self._stalled_after = stalled_after
        paths = [Path(p) for p in paths]
        self.tails = [LogTail(p, n, total) for p, n in zip(paths, experiment_names(paths))]
        self.follow = follow
        self._interval = interval
        self._stopped = threading.Event()
        self._read_once = False
        self._thread = threading.Thread(target=self._run, name="log-watcher", daemon=True)
        with self._lock:
            for tail in self.tails:
                self._book.add(tail.name).state = "running" if follow else "finished"

    def start(self) -> None:
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._read_once and not self.follow

    def shutdown(self, grace_s: float = 0.0) -> None:
        del grace_s  # nothing of ours to stop gracefully
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        for tail in self.tails:
            tail.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            events = [event for tail in self.tails for event in tail.poll()]
            caught_up = all(tail.caught_up for tail in self.tails)
            with self._lock:
                for event in events:
                    self._book.apply(event)
                events += self._judge(time.time())
                self._read_once = self._read_once or caught_up
                self._changed.notify_all()
            self._deliver(events)
            if caught_up and (not self.follow or self._stopped.wait(self._interval)):
                return

    def _judge(self, now: float) -> list[Event]:
        """A log read to its end at its total has finished (when it was last written);
        one silent for `stalled_after` seconds has stalled. Lock held."""
        ended: list[Event] = []
        for tail in self.tails:
            state = self._book.states[tail.name]
            if not tail.caught_up or state.terminal or tail.modified is None:
                continue
            if tail.at_total:
                ended.append(Finished(tail.name, time=tail.modified))
                self._book.apply(ended[-1])
            elif self.follow and now - tail.modified > self._stalled_after:
                self._book.stalled(tail.name)
        return ended
