"""Helpers of the supervisor tests: a small real config, a recording subscriber, a
supervisor run to its end."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from conftest import QUICK_CONFIG
from sa2va_contract.config import EXPERIMENT_KINDS, Config, load_config
from sa2va_contract.events import Event, Progress
from sa2va_tui.runstore import RunStore, read_events
from sa2va_tui.supervisor import Supervisor

HERE = Path(__file__).resolve().parent


def make_config(real_run: list[str], *overrides: str, experiments=("prompt_rl",)) -> Config:
    """configs/quick.yaml, small, with only `experiments` enabled."""
    settings = [*real_run, "run.name=test"]
    settings += [f"{kind}.enabled=false" for kind in EXPERIMENT_KINDS if kind not in experiments]
    return load_config(QUICK_CONFIG, settings + list(overrides))


class Recorder:
    """A subscriber that keeps every event and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, match: Callable[[Event], bool], timeout: float = 90.0) -> Event:
        with self._cond:
            found: list[Event] = []

            def seen() -> bool:
                found[:] = [e for e in self.events if match(e)]
                return bool(found)

            assert self._cond.wait_for(seen, timeout), f"no such event within {timeout} s; got {self.types()}"
            return found[0]

    def of(self, cls: type[Event], name: str | None = None) -> list:
        with self._cond:
            return [e for e in self.events if isinstance(e, cls) and (name is None or e.experiment == name)]

    def after(self, first: Event, cls: type[Event]) -> list:
        """Events of `cls` that came after `first`."""
        with self._cond:
            return [e for e in self.events[self.events.index(first) + 1:] if isinstance(e, cls)]

    def before(self, last: Event, cls: type[Event], name: str) -> list:
        """Events of `cls` for `name` that came before `last`."""
        with self._cond:
            return [e for e in self.events[:self.events.index(last)] if isinstance(e, cls) and e.experiment == name]

    def types(self) -> list[str]:
        return [e.type for e in self.events]


def run_to_end(config: Config, timeout: float, **kwargs) -> tuple[Supervisor, Recorder]:
    """Start every experiment and wait until each has ended (failing after `timeout`)."""
    supervisor, rec = supervise(config, **kwargs)
    supervisor.start()
    try:
        assert supervisor.wait(timeout)
    finally:
        supervisor.shutdown()
    return supervisor, rec


def supervise(config: Config, entry_points=None, **kwargs) -> tuple[Supervisor, Recorder]:
    supervisor = Supervisor(config, RunStore.create(config), entry_points=entry_points, **kwargs)
    recorder = Recorder()
    supervisor.subscribe(recorder)
    return supervisor, recorder


def log_of(supervisor: Supervisor, name: str) -> str:
    return (supervisor.run_dir / name / "train.log").read_text(errors="replace")


# --- policy ----------------------------------------------------------------------------


def wait_for_steps(logs: Path, experiments: int, alive: Callable[[], bool], timeout: float = 90) -> None:
    """Until `experiments` experiments of the run under `logs` have made training steps
    (so that each has steps a graceful stop must save), read from its events.jsonl."""
    deadline = time.monotonic() + timeout
    while len({e.experiment for run_dir in logs.glob("*") for e in read_events(run_dir)
                if isinstance(e, Progress) and e.timesteps > 0}) < experiments:
        assert alive() and time.monotonic() < deadline, "no training steps"
        time.sleep(0.1)
