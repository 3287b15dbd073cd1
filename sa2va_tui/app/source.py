"""What the app looks at and what it may ask of it.

The app sees every event source through an `EventHub` (states and a stream of events).
Only the experiments a supervisor of ours runs can be paused, stopped or restarted:
`AppSource.control` is None for `watch`, and the app shows those keys as unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from sa2va_tui.logtail import LogWatcher
    from sa2va_tui.runstate import EventHub
    from sa2va_tui.supervisor import Supervisor


@dataclass(frozen=True)
class RestartPlan:
    """What a restart will change, for the confirmation to show before it happens."""

    batch_size: int | None
    previous_batch_size: int | None
    #: The GPU index the new process will get; None: the CPU.
    gpu: int | None
    #: The experiment's last attempt ended in CUDA out-of-memory: the batch is halved.
    after_oom: bool
    #: The checkpoint step it resumes from; None: from the start.
    resume_step: int | None


class Controller(Protocol):
    """Control of experiments whose workers are ours. Calls may block briefly (a
    restart spawns a process): the app makes them off its event loop."""

    def pause(self, name: str) -> None: ...

    def resume(self, name: str) -> None: ...

    def stop(self, name: str) -> None: ...

    def restart_plan(self, name: str) -> RestartPlan: ...

    def restart(self, name: str, plan: RestartPlan) -> None: ...


class SupervisorControl:
    """`Controller` over a `Supervisor`, with its own placement and batch-size policy
    for the restart preview (the same functions it uses when it restarts by itself)."""

    def __init__(self, supervisor: "Supervisor") -> None:
        self._supervisor = supervisor

    def pause(self, name: str) -> None:
        self._supervisor.pause(name)

    def resume(self, name: str) -> None:
        self._supervisor.resume(name)

    def stop(self, name: str) -> None:
        self._supervisor.stop(name)

    def restart_plan(self, name: str) -> RestartPlan:
        from sa2va_tui.gpus import choose_gpu
        from sa2va_tui.supervisor import next_batch_size

        config = self._supervisor.config
        experiment = config.experiments()[name]
        state = self._supervisor.states()[name]
        after_oom = state.state == "failed" and (state.failure or {}).get("kind") == "oom"
        batch = state.batch_size
        if after_oom and batch:
            # No smaller size left above the floor: the same batch, shown as such.
            batch = next_batch_size(experiment, batch, config.recovery.min_batch_size) or batch
        gpu = None if experiment.device == "cpu" else choose_gpu(self._supervisor.gpus, experiment.gpu)
        return RestartPlan(batch_size=batch, previous_batch_size=state.batch_size, gpu=gpu, after_oom=after_oom,
                           resume_step=state.checkpoint_step if state.last_checkpoint else None)

    def restart(self, name: str, plan: RestartPlan) -> None:
        if plan.batch_size != plan.previous_batch_size:
            self._supervisor.restart(name, batch_size=plan.batch_size)
        else:
            self._supervisor.restart(name)


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
