"""What an experiment sees of the process it runs in: where to write, how to report,
and the cooperative control points where it may be paused or stopped.

Every experiment is a function `run(ctx: WorkerContext) -> dict` (the summary). The
same function runs inside a supervisor's worker process or alone from the command
line (`python -m experiments.run_one`), only the sink and the control differ.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from sa2va_tui.config import Config, ExperimentConfig
from sa2va_tui.events import Checkpoint, Event, Metrics, Paused, Phase, Progress, Resumed


class StopRequested(Exception):
    """Raised at a control point when the experiment must save and exit."""

    def __init__(self, reason: str = "stop") -> None:
        super().__init__(reason)
        self.reason = reason


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


class ListSink:
    """Keeps events in memory: for tests and for runs without a supervisor."""

    def __init__(self, echo: Callable[[Event], None] | None = None) -> None:
        self.events: list[Event] = []
        self._echo = echo

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if self._echo:
            self._echo(event)

    def of_type(self, cls: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, cls)]


class Control:
    """Pause and stop flags, set from outside (the supervisor's control channel, a
    watchdog, a signal handler), obeyed by the experiment at `ctx.step_point()`."""

    def __init__(self) -> None:
        self._paused = threading.Event()
        self._stop = threading.Event()
        self.stop_reason = "stop"

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def stop(self, reason: str = "stop") -> None:
        self.stop_reason = reason
        self._stop.set()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait_while_paused(self, poll: float = 0.1) -> None:
        while self._paused.is_set() and not self._stop.is_set():
            time.sleep(poll)


@dataclass
class WorkerContext:
    name: str
    config: Config
    experiment: ExperimentConfig
    exp_dir: Path
    sink: EventSink = field(default_factory=ListSink)
    control: Control = field(default_factory=Control)
    #: Index of the GPU this worker may use (after CUDA_VISIBLE_DEVICES it is cuda:0); None: CPU.
    gpu: int | None = None
    #: Checkpoint to resume from, when restarting.
    resume_from: Path | None = None
    #: Batch size forced by the supervisor (OOM recovery); None keeps the config's.
    batch_size_override: int | None = None
    _last_step: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.exp_dir.mkdir(parents=True, exist_ok=True)

    @property
    def device(self) -> str:
        wanted = self.experiment.device
        if wanted == "auto":
            return "cuda" if self.gpu is not None else "cpu"
        return wanted

    # --- reporting ---------------------------------------------------------------

    def emit(self, event: Event) -> None:
        self.sink.emit(event)

    def phase(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        self.emit(Phase(self.name, phase=phase, done=done, total=total))

    def progress(self, timesteps: int, total: int) -> None:
        self.emit(Progress(self.name, timesteps=int(timesteps), total=int(total)))

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        clean = {k: float(v) for k, v in values.items() if _is_finite_number(v)}
        if clean:
            self.emit(Metrics(self.name, step=int(step), values=clean))

    def checkpoint_saved(self, path: Path, step: int) -> None:
        self.emit(Checkpoint(self.name, path=str(path), step=int(step)))

    # --- control -----------------------------------------------------------------

    def step_point(self, step: int) -> None:
        """Call between training steps: blocks while paused, raises StopRequested when
        asked to stop, and raises an injected out-of-memory error where configured."""
        self._last_step = step
        if self.control.paused and not self.control.stopping:
            self.emit(Paused(self.name, step=step))
            self.control.wait_while_paused()
            if not self.control.stopping:
                self.emit(Resumed(self.name))
        if self.control.stopping:
            raise StopRequested(self.control.stop_reason)
        faults = self.experiment.faults
        if faults.oom_at_step is not None and step >= faults.oom_at_step and self._fault_armed():
            raise_injected_oom(step)

    @property
    def last_step(self) -> int:
        return self._last_step

    def _fault_armed(self) -> bool:
        batch = self.batch_size_override
        return batch is None or batch >= self.experiment.faults.oom_min_batch_size


def raise_injected_oom(step: int) -> None:
    """A real torch.OutOfMemoryError, as CUDA raises it, on any machine."""
    import torch

    raise torch.OutOfMemoryError(
        f"CUDA out of memory (injected by faults.oom_at_step at step {step}). Tried to allocate 2.00 GiB"
    )


def is_out_of_memory(error: BaseException) -> bool:
    """PyTorch's OOM in all its forms: the typed errors, and the allocator's message
    wrapped in a RuntimeError by older code paths."""
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    text = str(error)
    return isinstance(error, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "DefaultCPUAllocator: can't allocate memory" in text
    ) or isinstance(error, MemoryError)


def _is_finite_number(value: Any) -> bool:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))
