"""What an experiment sees of the process it runs in: where to write, how to report,
and the cooperative control points where it may be paused or stopped.

Every experiment is a function `run(ctx: WorkerContext) -> dict` (the summary),
registered by kind in `sa2va_contract.kinds` as a "module:function" string. It
honours `ctx.resume_from`, reads its batch size from `ctx.experiment` (an attempt at
another batch size gets a config with it applied), calls `ctx.step_point(step)`
between steps, and on `StopRequested` saves a checkpoint and re-raises. The same
function runs inside a supervisor's worker process (`experiments.worker`) or alone
from the command line (`python -m experiments.run_one`); only the sink and the
control differ.

A worker must import nothing heavy before it has set `CUDA_VISIBLE_DEVICES`, so this
module imports torch only where it raises an injected out-of-memory error.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from sa2va_contract import events
from sa2va_contract.config import Config, ExperimentConfig
from sa2va_contract.files import LOG_TAIL_LINES, disk_full_message, read_log_tail
from sa2va_contract.kinds import kind_of, resolve_entry
from sa2va_contract.recovery import DISK_FULL, OOM, classify_exception
from sa2va_contract.worker import load_function

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """Raised at a control point when the experiment must save and exit."""

    def __init__(self, reason: str = "stop") -> None:
        super().__init__(reason)
        self.reason = reason


class ClearError(Exception):
    """A failure whose message says all the user needs (which file, why): reported in
    one line, without a traceback or the log's tail."""


class EventSink(Protocol):
    def emit(self, event: events.Event) -> None: ...


class ListSink:
    """Keeps events in memory: for tests and for runs without a supervisor."""

    def __init__(self, echo: Callable[[events.Event], None] | None = None) -> None:
        self.events: list[events.Event] = []
        self._echo = echo

    def emit(self, event: events.Event) -> None:
        self.events.append(event)
        if self._echo:
            self._echo(event)

    def of_type(self, cls: type[events.Event]) -> list[events.Event]:
        return [e for e in self.events if isinstance(e, cls)]


class Control:
    """Pause and stop flags, set from outside (the supervisor's control channel, a
    watchdog, a signal handler), obeyed by the experiment at `ctx.step_point()`."""

    def __init__(self) -> None:
        self._paused = threading.Event()
        self._stop = threading.Event()
        self.stop_reason = "stop"
        #: Set when the run's mask stage has this experiment's pairs in, or has ended
        #: (`events.MasksDone`).
        self.masks_done = threading.Event()

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def stop(self, reason: str = "stop") -> None:
        # The first reason is the true one: a user's stop stays a stop when the
        # supervisor then exits.
        if not self._stop.is_set():
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
    #: Batch size forced by the supervisor (OOM recovery), applied to `experiment`;
    #: None keeps the config's.
    batch_size_override: int | None = None
    #: Whether the run's mask stage is filling the cache for this attempt: it waits for
    #: its pairs (see `experiments.mask_stage.await_pairs`) instead of computing them.
    wait_for_masks: bool = False
    _last_step: int = field(default=0, init=False)
    #: Whether a training step was reached: a failure before it is a start-up failure.
    training_started: bool = field(default=False, init=False)
    #: The phase it last reported (None before the first).
    current_phase: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        if self.batch_size_override:
            self.experiment = kind_of(self.experiment).with_batch_size(self.experiment, self.batch_size_override)

    @property
    def batch_size(self) -> int:
        """The batch size this attempt uses (the one an out-of-memory restart halves)."""
        return kind_of(self.experiment).batch_size(self.experiment)

    @property
    def device(self) -> str:
        wanted = self.experiment.device
        if wanted == "auto":
            return "cuda" if self.gpu is not None else "cpu"
        return wanted

    # --- reporting ---------------------------------------------------------------

    def emit(self, event: events.Event) -> None:
        self.sink.emit(event)

    def phase(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        self.current_phase = phase
        self.emit(events.Phase(self.name, phase=phase, done=done, total=total))

    def progress(self, timesteps: int, total: int) -> None:
        self.emit(events.Progress(self.name, timesteps=int(timesteps), total=int(total)))

    def metrics(self, step: int, values: dict[str, Any]) -> None:
        clean = {k: float(v) for k, v in values.items() if _is_finite_number(v)}
        if clean:
            self.emit(events.Metrics(self.name, step=int(step), values=clean))

    def notice(self, message: str) -> None:
        """One line for the user: in the log, and as an event every view shows."""
        log.warning("%s", message)
        self.emit(events.Notice(self.name, message=message))

    def checkpoint_saved(self, path: Path, step: int) -> None:
        self.emit(events.Checkpoint(self.name, path=str(path), step=int(step)))

    # --- control -----------------------------------------------------------------

    def step_point(self, step: int) -> None:
        """Call between training steps: blocks while paused, raises StopRequested when
        asked to stop, and raises an injected out-of-memory error where configured."""
        self._last_step = step
        self.training_started = True
        self.control_point()
        faults = self.experiment.faults
        if faults.oom_at_step is not None and step >= faults.oom_at_step and self._fault_armed():
            raise_injected_oom(step)

    def control_point(self) -> None:
        """Blocks while paused and raises StopRequested when asked to stop: also called
        during long phases before training (caching masks), so that pause and stop
        work there too."""
        if self.control.paused and not self.control.stopping:
            self.emit(events.Paused(self.name, step=self._last_step))
            self.control.wait_while_paused()
            if not self.control.stopping:
                self.emit(events.Resumed(self.name))
        if self.control.stopping:
            raise StopRequested(self.control.stop_reason)

    @property
    def last_step(self) -> int:
        return self._last_step

    def _fault_armed(self) -> bool:
        return self.batch_size >= self.experiment.faults.oom_min_batch_size


def raise_injected_oom(step: int) -> None:
    """A real torch.OutOfMemoryError, as CUDA raises it, on any machine."""
    import torch

    raise torch.OutOfMemoryError(
        f"CUDA out of memory (injected by faults.oom_at_step at step {step}). Tried to allocate 2.00 GiB"
    )


def _is_finite_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def load_entry(entry: str) -> Callable[[WorkerContext], dict]:
    return load_function(resolve_entry(entry))


def run_experiment(ctx: WorkerContext, entry: str, log_path: Path | None = None) -> events.Event:
    """Run one experiment to its end and say how it ended: Finished, Stopped or Failed.

    An out-of-memory error leaves the experiment's last checkpoint as it was (nothing
    here writes one) so that a restart with a smaller batch can resume from it."""
    try:
        summary = load_entry(entry)(ctx)
    except StopRequested as stop:
        log.info("stopped at step %d: %s", ctx.last_step, stop.reason)
        return events.Stopped(ctx.name, step=ctx.last_step, reason=stop.reason)
    except Exception as err:  # noqa: BLE001 - every failure is reported, none escapes
        kind = classify_exception(err, ctx.training_started)
        clear = isinstance(err, ClearError)
        # No room says all in one line, whatever library wrapped it on the way.
        if kind == DISK_FULL:
            message = disk_full_message(err, ctx.exp_dir)
        else:
            message = str(err) if clear else f"{type(err).__name__}: {err}".strip()
        log.error("failed at step %d%s", ctx.last_step, f": {message}" if clear else "",
                  exc_info=None if clear else err)
        tail: list[str] = []
        if kind not in (OOM, DISK_FULL) and not clear:  # these say all in their message
            tail = read_log_tail(log_path) if log_path else traceback.format_exception(err)[-LOG_TAIL_LINES:]
        return events.Failed(ctx.name, kind=kind, message=message, step=ctx.last_step, batch_size=ctx.batch_size,
                             gpu=ctx.gpu, log_tail=[line.rstrip("\n") for line in tail])
    log.info("finished")
    return events.Finished(ctx.name, summary=dict(summary or {}))
