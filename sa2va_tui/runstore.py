"""The run folder: everything one launch produced, readable from any terminal.

    logs/<run-id>/            run id = <YYYYmmdd-HHMMSS>-<run.name>, never reused
        config.yaml           the resolved config the run started with
        run.json              every experiment's state (replaced atomically)
        events.jsonl          one JSON line per event, appended
        gpus.jsonl            a GPU sample every few seconds (the report's GPU history)
        <experiment>/         train.log, metrics, checkpoints, ... of one experiment

`status`, `resume`, `report` and `evaluate` read only this folder, so they work while
the run goes on and after it ended, from a terminal other than the one that launched it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from sa2va_tui.config import Config, ConfigError, dump_config, load_config
from sa2va_tui.events import Event, GpuSample, event_from_dict
from sa2va_tui.runstate import ExperimentState

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
GPUS_FILE = "gpus.jsonl"
LOG_FILE = "train.log"


class RunStoreError(Exception):
    """A run folder that cannot be read; `str()` is the one line to show."""


def atomic_write_text(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one, even if the writer
    dies mid-write: write a temporary file beside it, flush it to disk, rename over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        path = self.path / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_path(self, name: str) -> Path:
        return self.exp_dir(name) / LOG_FILE

    def append_event(self, event: Event) -> None:
        if not event.persist:
            return
        if self._events is None:
            self._events = open(self.path / EVENTS_FILE, "a", encoding="utf-8", buffering=1)
        self._events.write(event.to_json() + "\n")

    def append_gpu_sample(self, sample: GpuSample) -> None:
        """Keep one GPU sample: events.jsonl does not (they come every second), but the
        report needs the GPUs' recent history from the folder alone."""
        with open(self.path / GPUS_FILE, "a", encoding="utf-8") as f:
            f.write(sample.to_json() + "\n")

    def write_state(self, states: dict[str, ExperimentState], finish_time: float | None, active: bool = True) -> None:
        atomic_write_text(self.path / RUN_FILE, json.dumps({
            "run_id": self.run_id,
            "created_at": self.created_at,
            "updated_at": time.time(),
            "supervisor_pid": os.getpid(),
            "host": socket.gethostname(),
            "active": active,
            "finish_time": finish_time,
            "experiments": {name: s.to_dict() for name, s in states.items()},
        }, indent=1, default=str, allow_nan=False))

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


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

    @property
    def supervised(self) -> bool:
        """Whether a supervisor is still running this run (as far as this machine can tell)."""
        if not self.active:
            return False
        if self.host != socket.gethostname():
            return True
        return pid_alive(self.supervisor_pid)


def load_run(run_dir: Path) -> RunSnapshot:
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunStoreError(f"{run_dir}: not a run folder (no {RUN_FILE})") from None
    except (OSError, ValueError) as err:
        raise RunStoreError(f"{path}: unreadable ({err})") from None
    return RunSnapshot(
        path=run_dir,
        run_id=data.get("run_id", run_dir.name),
        created_at=float(data.get("created_at", 0.0)),
        updated_at=float(data.get("updated_at", 0.0)),
        supervisor_pid=data.get("supervisor_pid"),
        host=data.get("host", ""),
        active=bool(data.get("active", False)),
        finish_time=data.get("finish_time"),
        experiments={name: ExperimentState.from_dict(s) for name, s in data.get("experiments", {}).items()},
    )


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
                yield event_from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue


def list_runs(logs_dir: Path) -> list[Path]:
    """Run folders under `logs_dir`, oldest first."""
    runs = []
    for path in Path(logs_dir).glob(f"*/{RUN_FILE}"):
        try:
            runs.append((load_run(path.parent).created_at, path.parent.name, path.parent))
        except RunStoreError:
            continue
    return [path for _, _, path in sorted(runs)]


def find_run(ref: str | None, logs_dir: Path) -> Path:
    """A run by folder path, by run id under `logs_dir`, or the latest when `ref` is None."""
    if ref is None:
        runs = list_runs(logs_dir)
        if not runs:
            raise RunStoreError(f"{logs_dir}: no runs yet")
        return runs[-1]
    for candidate in (Path(ref), Path(logs_dir) / ref):
        if (candidate / RUN_FILE).is_file():
            return candidate
    raise RunStoreError(f"{ref}: no such run (looked for a run folder there and under {logs_dir})")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "run"
