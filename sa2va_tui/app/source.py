"""What the app looks at and what it may ask of it.

The app sees every event source through an `EventHub` (states and a stream of events).
Only the experiments a supervisor of ours runs can be paused, stopped or restarted:
`AppSource.control` is None for `watch`, and the app shows those keys as unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from sa2va_contract.recovery import RestartPlan

if TYPE_CHECKING:
    from sa2va_tui.logtail import LogWatcher
    from sa2va_tui.runstate import EventHub
    from sa2va_tui.supervisor import Supervisor


class Controller(Protocol):
    """Control of experiments whose workers are ours. Calls may block briefly (a
    restart spawns a process): the app makes them off its event loop."""

    def pause(self, name: str) -> None: ...

    def resume(self, name: str) -> None: ...

    def stop(self, name: str) -> None: ...

    def restart_plan(self, name: str) -> RestartPlan: ...

    def restart(self, name: str, plan: RestartPlan) -> None: ...


class SupervisorControl:
    """`Controller` over a `Supervisor`: the restart dialog shows the supervisor's own
    plan, and confirming it carries out exactly that plan."""

    def __init__(self, supervisor: "Supervisor") -> None:
        self._supervisor = supervisor

    def pause(self, name: str) -> None:
        self._supervisor.pause(name)

    def resume(self, name: str) -> None:
        self._supervisor.resume(name)

    def stop(self, name: str) -> None:
        self._supervisor.stop(name)

    def restart_plan(self, name: str) -> RestartPlan:
        return self._supervisor.restart_plan(name)

    def restart(self, name: str, plan: RestartPlan) -> None:
        self._supervisor.restart(name, plan=plan)


@dataclass
class AppSource:
    """An event source as the app needs it."""

    hub: "EventHub"
    #: What the title bar names: the run, or the logs watched.
    title: str
    #: The log file of an experiment, for the log view.
    log_path: Callable[[str], Path | None]
    control: Controller | None = None
    #: Starts the source; the app calls it once it listens, so that no event is missed.
    start: Callable[[], None] | None = None
    #: Seconds each worker gets to save and stop when the app quits.
    stop_grace_s: float = 30.0
    #: Whether the source reads the GPUs (the log watcher does not).
    samples_gpus: bool = True

    @classmethod
    def of_supervisor(cls, supervisor: "Supervisor", names: list[str] | None = None) -> "AppSource":
        """The app over a supervisor not started yet; it starts `names` (default: all)."""
        return cls(hub=supervisor, title=f"run {supervisor.store.run_id}", log_path=supervisor.store.log_path,
                   control=SupervisorControl(supervisor), start=lambda: supervisor.start(names))

    @classmethod
    def of_watcher(cls, watcher: "LogWatcher") -> "AppSource":
        paths = {tail.name: tail.path for tail in watcher.tails}
        count = len(paths)
        return cls(hub=watcher, title=f"watching {count} log{'s' if count != 1 else ''}", log_path=paths.get,
                   start=watcher.start, stop_grace_s=0.0, samples_gpus=False)
