"""The run folder (its layout: `sa2va_contract.layout`): the supervisor writes it,
and `status`, `resume`, `report`, `evaluate` and `runs` read only it, so they work
while the run goes on and after it ended, from a terminal other than the one that
launched it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from sa2va_contract.config import Config, ConfigError, dump_config, load_config
from sa2va_contract.events import Event, GpuSample
from sa2va_contract.files import atomic_write_text, naming_disk_full
from sa2va_contract.layout import (
    CONFIG_FILE,
    EVENTS_FILE,
    GPUS_FILE,
    LOG_FILE,
    RUN_FILE,
    SUPERVISOR_LOG,
    TENSORBOARD_DIR,
    TFEVENTS_GLOB,
    OutsideError,
    experiment_dir,
    is_run_id,
)
from sa2va_tui.run_shapes import ShapeError, checked_event, checked_run_file
from sa2va_tui.runstate import ExperimentState
from sa2va_tui.text import format_bytes

#: run.json's counts of the run's mask work (`StateBook.mask_counts`).
MASK_COUNT_KEYS = ("model_calls", "distinct_pairs", "cache_hits")
#: Entries shown per folder in the file tree; the rest are counted.
TREE_ENTRIES = 12


class RunStoreError(Exception):
    """A run folder that cannot be read; `str()` is the one line to show."""


class UnreadableRun(RunStoreError):
    """A run.json that is there but cannot be read, or is not of the shape written."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: unreadable ({reason})")


def pid_alive(pid: int | None) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): os.kill's answer stands
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class RunStore:
    """Writes one run folder. Only the supervisor's thread that owns it writes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.created_at = time.time()
        self._events: IO[str] | None = None

    @classmethod
    def create(cls, config: Config, logs_dir: Path | None = None) -> "RunStore":
        """A new folder under `logs_dir` (default: the config's run.logs_dir), with the config in it."""
        root = Path(logs_dir or config.run.logs_dir)
        root.mkdir(parents=True, exist_ok=True)
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(config.run.name)}"
        for n in range(1, 1000):
            path = root / (base if n == 1 else f"{base}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            store = cls(path)
            atomic_write_text(path / CONFIG_FILE, dump_config(config))
            return store
        raise RunStoreError(f"{root}: no free run id for {base}")

    @classmethod
    def open(cls, path: Path) -> "RunStore":
        """An existing run folder, to continue it (`resume`)."""
        snapshot = load_run(path)
        store = cls(snapshot.path)
        store.created_at = snapshot.created_at
        return store

    @property
    def run_id(self) -> str:
        return self.path.name

    def exp_dir(self, name: str) -> Path:
        try:
            path = experiment_dir(self.path, name)
        except OutsideError as err:
            raise RunStoreError(str(err)) from None
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, name: str) -> Path:
        return self.exp_dir(name) / LOG_FILE

    def append_event(self, event: Event) -> None:
        """One line of events.jsonl; no room for it is a `DiskFull` naming the file."""
        if not event.persist:
            return
        with naming_disk_full(self.path / EVENTS_FILE):
            if self._events is None:
                self._events = open_for_append(self.path / EVENTS_FILE, buffering=1)
            self._events.write(event.to_json() + "\n")

    def append_gpu_sample(self, sample: GpuSample) -> None:
        """Keep one GPU sample: events.jsonl does not (they come every second), but the
        report needs the GPUs' recent history from the folder alone."""
        with naming_disk_full(self.path / GPUS_FILE), open_for_append(self.path / GPUS_FILE) as f:
            f.write(sample.to_json() + "\n")

    def write_state(self, states: dict[str, ExperimentState], finish_time: float | None, active: bool = True,
                    extra: dict[str, Any] | None = None) -> None:
        """run.json; `extra` adds top-level keys (the mask stage and the run's counts)."""
        atomic_write_text(self.path / RUN_FILE, json.dumps({
            **(extra or {}),
            "run_id": self.run_id,
            "created_at": self.created_at,
            "updated_at": time.time(),
            "supervisor_pid": os.getpid(),
            "host": socket.gethostname(),
            "active": active,
            "finish_time": finish_time,
            "experiments": {name: self._on_disk(s.to_dict()) for name, s in states.items()},
        }, indent=1, default=str, allow_nan=False))

    def _on_disk(self, state: dict[str, Any]) -> dict[str, Any]:
        """A state as run.json keeps it: its checkpoint relative to the run folder, so
        that the folder may be resumed from any working directory, or moved."""
        path = state.get("last_checkpoint")
        if path:
            try:
                state["last_checkpoint"] = str(Path(path).resolve().relative_to(self.path.resolve()))
            except ValueError:
                pass  # outside the run folder (given by hand to `run_one`): kept as given
        return state

    def close(self) -> None:
        if self._events is not None:
            events, self._events = self._events, None
            try:
                events.close()
            except OSError:
                pass  # its last line met a full disk: what was written stays, the supervisor said why

    def problem_log(self) -> logging.Handler:
        """A handler that keeps the tool's warnings and errors in the run folder
        (`supervisor.log`), whatever the terminal shows of them."""
        return _ProblemLog(self.path / SUPERVISOR_LOG)


class _ProblemLog(logging.FileHandler):
    """`supervisor.log`, opened at its first line; a line the disk has no room for is
    lost silently (the run's fault says so once), never a traceback on the terminal."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=True)
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class StateWriter:
    """run.json rewritten when something changed, at most every `interval` seconds
    unless forced (progress arrives many times a second)."""

    def __init__(self, store: RunStore, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._last = 0.0
        #: Set by the owner whenever a state changed.
        self.dirty = False

    def write(self, states: dict[str, ExperimentState], finish_time: Callable[[], float | None], force: bool = False,
              active: bool = True, extra: Callable[[], dict[str, Any]] | None = None) -> None:
        now = time.monotonic()
        if force or (self.dirty and now - self._last >= self._interval):
            self._store.write_state(states, finish_time(), active=active, extra=extra() if extra else None)
            self.dirty = False
            self._last = now


@dataclass
class RunSnapshot:
    """A run as its folder tells it."""

    path: Path
    run_id: str
    created_at: float
    updated_at: float
    supervisor_pid: int | None
    host: str
    active: bool
    finish_time: float | None
    experiments: dict[str, ExperimentState]
    #: The run's mask stage, if it had one.
    mask_stage: ExperimentState | None = None
    #: run.json's `model_calls`, `distinct_pairs` and `cache_hits` (None: not recorded).
    mask_counts: dict[str, int | None] = field(default_factory=dict)

    @property
    def supervised(self) -> bool:
        """Whether a supervisor is still running this run (as far as this machine can tell)."""
        if not self.active:
            return False
        if self.host != socket.gethostname():
            return True
        return pid_alive(self.supervisor_pid)


def load_run(run_dir: Path) -> RunSnapshot:
    """The run as its run.json tells it; a file that cannot be read, or of another shape
    than the one written (null, a list, a string where a number belongs), is a
    RunStoreError naming the file and what is wrong."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunStoreError(f"{run_dir}: not a run folder (no {RUN_FILE})") from None
    except (OSError, ValueError) as err:
        raise UnreadableRun(path, str(err)) from None
    try:
        data = checked_run_file(raw)
    except ShapeError as err:
        raise UnreadableRun(path, str(err)) from None
    return RunSnapshot(
        path=run_dir,
        run_id=data.get("run_id", run_dir.name),
        created_at=data.get("created_at", 0.0),
        updated_at=data.get("updated_at", 0.0),
        supervisor_pid=data.get("supervisor_pid"),
        host=data.get("host", ""),
        active=data.get("active", False),
        finish_time=data.get("finish_time"),
        experiments={name: _checkpoint_from_run_dir(state, run_dir)
                     for name, state in data.get("experiments", {}).items()},
        mask_stage=data.get("mask_stage"),
        mask_counts={key: data[key] for key in MASK_COUNT_KEYS if key in data},
    )


def _checkpoint_from_run_dir(state: ExperimentState, run_dir: Path) -> ExperimentState:
    """The recorded checkpoint as a path from here: run.json keeps it relative to the run
    folder (older run folders, relative to where they were launched, or absolute)."""
    path = state.last_checkpoint
    if path and not Path(path).is_absolute():
        from_run_dir = run_dir / path
        # An older folder's path from where it was launched stands while it still leads somewhere.
        if from_run_dir.exists() or not Path(path).exists():
            state.last_checkpoint = str(from_run_dir)
    return state


def load_run_config(run_dir: Path) -> Config:
    """The config a run started with (`resume` continues with exactly that)."""
    try:
        return load_config(Path(run_dir) / CONFIG_FILE)
    except ConfigError as err:
        raise RunStoreError(str(err)) from None


def read_events(run_dir: Path) -> Iterator[Event]:
    """The run's events in order; a line torn by a crash mid-write is skipped."""
    return _read_event_lines(Path(run_dir) / EVENTS_FILE)


def read_gpu_samples(run_dir: Path) -> list[GpuSample]:
    """The GPU samples a run kept, oldest first."""
    return [e for e in _read_event_lines(Path(run_dir) / GPUS_FILE) if isinstance(e, GpuSample)]


def _read_event_lines(path: Path) -> Iterator[Event]:
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            try:
                yield checked_event(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # torn by a crash mid-write, or not an event of this version's shape


@dataclass(frozen=True)
class RunEntry:
    """A run folder under a logs folder, readable or not."""

    path: Path
    #: When it was started: its run.json's word, else the time its run id names.
    created_at: float
    snapshot: RunSnapshot | None
    #: Why its run.json cannot be read, None when it can.
    problem: UnreadableRun | None = None


def scan_runs(logs_dir: Path) -> list[RunEntry]:
    """Every folder under `logs_dir` with a run.json, oldest first; one that cannot be
    read is listed with its problem rather than left out."""
    entries = []
    for path in Path(logs_dir).glob(f"*/{RUN_FILE}"):
        run_dir = path.parent
        try:
            snapshot = load_run(run_dir)
        except UnreadableRun as err:
            entries.append(RunEntry(run_dir, _started_by_name(run_dir), None, err))
            continue
        except RunStoreError:
            continue  # removed since it was listed
        entries.append(RunEntry(run_dir, snapshot.created_at, snapshot))
    return sorted(entries, key=lambda entry: (entry.created_at, entry.path.name))


def _started_by_name(run_dir: Path) -> float:
    """The start time a run id (`YYYYmmdd-HHMMSS-<name>`, local time) names, else the
    folder's modification time."""
    try:
        return time.mktime(time.strptime(run_dir.name[:15], "%Y%m%d-%H%M%S"))
    except ValueError:
        try:
            return run_dir.stat().st_mtime
        except OSError:
            return 0.0


def list_runs(logs_dir: Path) -> list[Path]:
    """The readable run folders under `logs_dir`, oldest first."""
    return [entry.path for entry in scan_runs(logs_dir) if entry.problem is None]


def find_run(ref: str | None, logs_dir: Path) -> Path:
    """A run by folder path, by run id under `logs_dir`, or the latest when `ref` is None
    (when that one cannot be read, a RunStoreError says so: never an older one instead)."""
    if ref is None:
        runs = scan_runs(logs_dir)
        if not runs:
            raise RunStoreError(f"{logs_dir}: no runs yet")
        if runs[-1].problem is not None:
            problem = runs[-1].problem
            raise RunStoreError(f"the latest run is unreadable: {problem.path}: {problem.reason}")
        return runs[-1].path
    # A run id is one folder name: "../x" is looked for as a path only.
    candidates = [Path(ref), *([Path(logs_dir) / ref] if is_run_id(ref) else [])]
    for candidate in candidates:
        if (candidate / RUN_FILE).is_file():
            return candidate
    raise RunStoreError(f"{ref}: no such run (looked for a run folder there and under {logs_dir})")


def open_for_append(path: Path, buffering: int = -1) -> IO[str]:
    """A JSON-lines file opened to append to. A line torn by a crash mid-write is ended
    first, so that the next line is not glued onto it (and lost with it)."""
    try:
        with open(path, "rb") as f:
            torn = f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n"
    except FileNotFoundError:
        torn = False
    out = open(path, "a", encoding="utf-8", buffering=buffering)
    if torn:
        out.write("\n")
        out.flush()
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "run"


# --- what the folder holds ----------------------------------------------------------


def tensorboard_dir(exp_dir: Path) -> Path | None:
    """Where an experiment's TensorBoard event files are: its `tensorboard/` folder, or
    the experiment folder itself for a layout of its own; None when it wrote none."""
    for candidate in (exp_dir / TENSORBOARD_DIR, exp_dir):
        if candidate.is_dir() and next(candidate.rglob(TFEVENTS_GLOB), None) is not None:
            return candidate
    return None


def tensorboard_records(exp_dir: Path) -> int:
    """Records in an experiment's TensorBoard event files (each file starts with one)."""
    return sum(count_event_records(p) for p in exp_dir.rglob(TFEVENTS_GLOB))


def count_event_records(path: Path) -> int:
    """How many records a TensorBoard event file holds (TFRecord framing: a length, its
    CRC, the data, the data's CRC). The first is the file's version, so a file with
    curves in it has more than one. A record cut short by a writer still at work is
    not counted."""
    count = 0
    try:
        with open(path, "rb") as f:
            while True:
                header = f.read(12)
                if len(header) < 12:
                    return count
                (length,) = struct.unpack("<Q", header[:8])
                f.seek(length + 4, os.SEEK_CUR)
                if f.tell() > os.fstat(f.fileno()).st_size:
                    return count
                count += 1
    except OSError:
        return count


def file_tree(root: Path) -> list[str]:
    """The run folder as tree lines (name and size), long folders cut to their first
    and last entries."""
    lines = [f"{root.name}/"]

    def walk(folder: Path, prefix: str) -> None:
        try:
            entries = sorted(folder.iterdir(), key=lambda p: (not p.is_dir(), p.name))
        except OSError:
            return
        entries = [p for p in entries if not p.name.startswith(".")]  # temporary files of atomic writes
        shown: list[Path | int] = list(entries)
        if len(entries) > TREE_ENTRIES:
            head = TREE_ENTRIES - 3
            shown = [*entries[:head], len(entries) - head - 2, *entries[-2:]]
        for i, entry in enumerate(shown):
            last = i == len(shown) - 1
            branch = "└── " if last else "├── "
            if isinstance(entry, int):
                lines.append(f"{prefix}{branch}… (+{entry})")
            elif entry.is_dir():
                lines.append(f"{prefix}{branch}{entry.name}/")
                walk(entry, prefix + ("    " if last else "│   "))
            else:
                lines.append(f"{prefix}{branch}{entry.name}  {format_bytes(_size(entry))}")

    walk(root, "")
    return lines


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None  # removed between listing and looking (a checkpoint rotated away)
