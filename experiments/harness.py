"""What an experiment sees of the process it runs in: where to write, how to report,
and the cooperative control points where it may be paused or stopped.

Every experiment is a function `run(ctx: WorkerContext) -> dict` (the summary),
registered by kind in `EXPERIMENT_ENTRY_POINTS` as a "module:function" string. It
honours `ctx.resume_from` and `ctx.batch_size_override`, calls `ctx.step_point(step)`
between steps, and on `StopRequested` saves a checkpoint and re-raises. The same
function runs inside a supervisor's worker process (`worker_main`) or alone from the
command line (`python -m experiments.run_one`); only the sink and the control differ.

The worker process side lives here too: it must import nothing heavy before it has
set `CUDA_VISIBLE_DEVICES`, so this module imports torch only where it raises an OOM.
"""

from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Protocol

from sa2va_tui.config import Config, ExperimentConfig
from sa2va_tui.events import (
    Checkpoint,
    Event,
    Failed,
    Finished,
    Metrics,
    Paused,
    Phase,
    Progress,
    Resumed,
    Started,
    Stopped,
)

log = logging.getLogger(__name__)

#: Experiment kind -> "module:function" of its `run(ctx) -> dict`. Any "module:function"
#: string is accepted where a kind's entry is expected, so tests can run a workload of
#: their own through the same path.
EXPERIMENT_ENTRY_POINTS: dict[str, str] = {
    "prompt_rl": "experiments.prompt_rl:run",
    "postprocess_rl": "experiments.postprocess_rl:run",
    "reward_net": "experiments.reward_net:run",
}

#: Stop reason when the worker finds its supervisor gone.
SUPERVISOR_LOST = "supervisor lost"
#: How long an orphaned worker may take to reach a step point and save before it is
#: ended hard: an orphan must never keep a GPU.
ORPHAN_GRACE_S = 30.0
#: How often the watchdog looks at the parent process.
WATCHDOG_INTERVAL_S = 0.5
#: Lines of its log a failed worker's report carries.
LOG_TAIL_LINES = 20


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
    #: Batch size forced by the supervisor (OOM recovery); None keeps the config's.
    batch_size_override: int | None = None
    _last_step: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.exp_dir.mkdir(parents=True, exist_ok=True)

    @property
    def batch_size(self) -> int:
        """The batch size this attempt uses: the supervisor's override, else the config's."""
        return self.batch_size_override or configured_batch_size(self.experiment)

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
        self.control_point()
        faults = self.experiment.faults
        if faults.oom_at_step is not None and step >= faults.oom_at_step and self._fault_armed():
            raise_injected_oom(step)

    def control_point(self) -> None:
        """Blocks while paused and raises StopRequested when asked to stop: also called
        during long phases before training (caching masks), so that pause and stop
        work there too."""
        if self.control.paused and not self.control.stopping:
            self.emit(Paused(self.name, step=self._last_step))
            self.control.wait_while_paused()
            if not self.control.stopping:
                self.emit(Resumed(self.name))
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


def is_out_of_memory(error: BaseException) -> bool:
    """PyTorch's OOM in all its forms: the typed errors, and the allocator's message
    wrapped in a RuntimeError by older code paths; Python's own MemoryError too."""
    if isinstance(error, MemoryError):
        return True
    # An error can only be torch's if torch is loaded; asking must not load it.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text.lower() or "DefaultCPUAllocator: can't allocate memory" in text
    )


def _is_finite_number(value: Any) -> bool:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


def configured_batch_size(experiment: ExperimentConfig) -> int:
    """The batch size that OOM recovery halves: PPO's minibatch for the RL experiments,
    the fine-tuning batch (where the segmenter's activations live) for the reward net."""
    if experiment.kind == "reward_net":
        return experiment.finetune.batch_size
    return experiment.ppo.batch_size


def entry_point(kind_or_entry: str, entry_points: dict[str, str] | None = None) -> str:
    """The "module:function" string for an experiment kind (or such a string itself)."""
    table = EXPERIMENT_ENTRY_POINTS if entry_points is None else entry_points
    entry = table.get(kind_or_entry, kind_or_entry)
    module, _, function = entry.partition(":")
    if not module or not function:
        raise ValueError(f"no entry point for {kind_or_entry!r}: expected a kind or 'module:function'")
    return entry


def load_entry(entry: str) -> Callable[[WorkerContext], dict]:
    module, _, function = entry_point(entry).partition(":")
    return getattr(importlib.import_module(module), function)


def run_experiment(ctx: WorkerContext, entry: str, log_path: Path | None = None) -> Event:
    """Run one experiment to its end and say how it ended: Finished, Stopped or Failed.

    An out-of-memory error leaves the experiment's last checkpoint as it was (nothing
    here writes one) so that a restart with a smaller batch can resume from it."""
    try:
        summary = load_entry(entry)(ctx)
    except StopRequested as stop:
        log.info("stopped at step %d: %s", ctx.last_step, stop.reason)
        return Stopped(ctx.name, step=ctx.last_step, reason=stop.reason)
    except Exception as err:  # noqa: BLE001 - every failure is reported, none escapes
        message = f"{type(err).__name__}: {err}".strip()
        log.error("failed at step %d", ctx.last_step, exc_info=err)
        if is_out_of_memory(err):
            return Failed(ctx.name, kind="oom", message=message, step=ctx.last_step, batch_size=ctx.batch_size,
                          gpu=ctx.gpu)
        tail = read_log_tail(log_path) if log_path else traceback.format_exception(err)[-LOG_TAIL_LINES:]
        return Failed(ctx.name, kind="error", message=message, step=ctx.last_step, batch_size=ctx.batch_size,
                      gpu=ctx.gpu, log_tail=[line.rstrip("\n") for line in tail])
    log.info("finished")
    return Finished(ctx.name, summary=dict(summary or {}))


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> list[str]:
    """The last lines of a log, read from its end (logs grow to gigabytes), any bytes."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read()
    except OSError:
        return []
    return list(deque(data.decode("utf-8", errors="replace").splitlines(), maxlen=lines))


# --- the worker process ------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, picklable for the spawn start method."""

    name: str
    entry: str
    config: Config
    exp_dir: Path
    log_path: Path
    gpu: int | None
    supervisor_pid: int
    attempt: int = 1
    resume_from: Path | None = None
    batch_size_override: int | None = None


class PipeSink:
    """Sends events to the supervisor over the worker's end of its pipe.

    Progress and phase events supersede each other; an experiment may report them every
    step, so they are coalesced to one per `min_interval` per type, and the latest is
    always sent before any other event (and by `flush()` from the watchdog), so the
    supervisor never sees a stale count for long. A broken pipe means the supervisor is
    gone: `on_lost` is called and further events are dropped."""

    def __init__(self, conn: Connection, on_lost: Callable[[], None], min_interval: float = 0.1) -> None:
        self._conn = conn
        self._on_lost = on_lost
        self._min_interval = min_interval
        self._lock = threading.Lock()
        self._pending: dict[str, Event] = {}
        self._last_sent: dict[str, float] = {}
        self._lost = False

    def emit(self, event: Event) -> None:
        with self._lock:
            if not event.supersedes:
                self._flush_pending()
                self._send(event)
                return
            self._pending[event.type] = event
            if time.monotonic() - self._last_sent.get(event.type, 0.0) >= self._min_interval:
                self._flush_pending()

    def flush(self) -> None:
        with self._lock:
            self._flush_pending()

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for event in pending.values():
            self._last_sent[event.type] = time.monotonic()
            self._send(event)

    def _send(self, event: Event) -> None:
        if self._lost:
            return
        try:
            self._conn.send(event)
        except (OSError, EOFError):
            self._lost = True
            self._on_lost()


class Lifeline:
    """Whether the supervisor is still there. Its loss, however noticed (the pipe's end
    of file, a broken pipe, this process re-parented), asks the experiment to save and
    stop, and starts the clock after which the process ends anyway."""

    def __init__(self, control: Control) -> None:
        self._control = control
        self._lost_at: float | None = None

    def lost(self) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
            log.warning("supervisor lost: saving and stopping")
        self._control.stop(SUPERVISOR_LOST)

    @property
    def orphaned_for(self) -> float:
        return 0.0 if self._lost_at is None else time.monotonic() - self._lost_at


class Watchdog(threading.Thread):
    """Twice a second: notices a dead supervisor by this process being re-parented;
    ends the process if the experiment has not stopped `ORPHAN_GRACE_S` after the loss;
    delivers coalesced events that would otherwise wait for the next one."""

    def __init__(self, supervisor_pid: int, lifeline: Lifeline, sink: PipeSink) -> None:
        super().__init__(name="watchdog", daemon=True)
        self._supervisor_pid = supervisor_pid
        self._lifeline = lifeline
        self._sink = sink

    def run(self) -> None:
        while True:
            if os.getppid() != self._supervisor_pid:
                self._lifeline.lost()
            if self._lifeline.orphaned_for > ORPHAN_GRACE_S:
                log.error("the experiment did not stop %.0f s after its supervisor was lost; exiting", ORPHAN_GRACE_S)
                logging.shutdown()
                os._exit(3)
            self._sink.flush()
            time.sleep(WATCHDOG_INTERVAL_S)


def read_control(conn: Connection, control: Control, lifeline: Lifeline) -> None:
    """The control channel: ("pause",), ("resume",), ("stop", reason). End of file means
    the supervisor's end closed, i.e. the supervisor died."""
    while True:
        try:
            command, *args = conn.recv()
        except (EOFError, OSError):
            lifeline.lost()
            return
        if command == "pause":
            control.pause()
        elif command == "resume":
            control.resume()
        elif command == "stop":
            control.stop(*args)
        else:
            log.warning("unknown control command %r", command)


def _redirect_output(log_path: Path) -> None:
    """Everything this process writes, Python or C, goes to the experiment's log, never
    to the terminal the supervisor's UI draws on."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faulthandler.enable(sys.stderr)


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry of a spawned worker process: one attempt of one experiment."""
    # Before anything imports torch: the GPU this process may use, numbered as
    # nvidia-smi and NVML number them; an empty list hides every GPU.
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = "" if spec.gpu is None else str(spec.gpu)
    # Ctrl+C in the terminal reaches the whole process group; the supervisor answers it
    # by stopping us gracefully, so the signal itself must not break a step in half.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _redirect_output(spec.log_path)

    control = Control()
    signal.signal(signal.SIGTERM, lambda *_: control.stop("terminated"))
    lifeline = Lifeline(control)
    sink = PipeSink(conn, on_lost=lifeline.lost)
    threading.Thread(target=read_control, args=(conn, control, lifeline), name="control", daemon=True).start()
    Watchdog(spec.supervisor_pid, lifeline, sink).start()

    log.info("attempt %d of %s: pid %d, gpu %s, batch size override %s, resume from %s",
             spec.attempt, spec.name, os.getpid(), spec.gpu, spec.batch_size_override, spec.resume_from)
    try:
        experiment = spec.config.experiments()[spec.name]
    except KeyError:
        sink.emit(Failed(spec.name, kind="error", message=f"{spec.name!r} is not an enabled experiment of the config"))
        sys.exit(1)
    ctx = WorkerContext(
        name=spec.name, config=spec.config, experiment=experiment, exp_dir=spec.exp_dir, sink=sink,
        control=control, gpu=spec.gpu, resume_from=spec.resume_from, batch_size_override=spec.batch_size_override,
    )
    sink.emit(Started(spec.name, pid=os.getpid(), gpu=spec.gpu, batch_size=ctx.batch_size, attempt=spec.attempt,
                      resumed_from=str(spec.resume_from) if spec.resume_from else None))
    outcome = run_experiment(ctx, spec.entry, spec.log_path)
    sink.emit(outcome)
    sink.flush()
    sys.exit(1 if isinstance(outcome, Failed) else 0)
