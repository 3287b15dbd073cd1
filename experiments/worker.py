"""The worker process: one attempt of one experiment, spawned by the supervisor.

`worker_main` sets the GPU the process may use before anything imports torch, sends
everything the process prints to the experiment's log (never to the terminal the
UI draws on), reports the experiment's events up its pipe and obeys the control
messages that come down it. The pipe is also the lifeline: when the supervisor dies,
its end closes, and the worker saves and exits; a watchdog ends it anyway if it
cannot, so that no orphan keeps a GPU.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from sa2va_contract import events
from sa2va_contract.worker import WorkerSpec

from experiments.harness import Control, WorkerContext, run_experiment

log = logging.getLogger(__name__)

#: Stop reason when the worker finds its supervisor gone.
SUPERVISOR_LOST = "supervisor lost"
#: How long an orphaned worker may take to reach a step point and save before it is
#: ended hard: an orphan must never keep a GPU.
ORPHAN_GRACE_S = 30.0
#: How often the watchdog looks at the parent process.
WATCHDOG_INTERVAL_S = 0.5
#: How long a stop may wait for the experiment's next control point before training
#: has begun (imports, the model, the splits): then nothing is saved, so the process
#: simply ends, and a quit never waits for a model to finish loading.
UNSTARTED_STOP_GRACE_S = 0.5
#: Phases in which a stop saves a checkpoint first, never cut short.
SAVING_PHASES = ("training", "evaluating", "saving")


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
        self._pending: dict[str, events.Event] = {}
        self._last_sent: dict[str, float] = {}
        self._lost = False

    def emit(self, event: events.Event) -> None:
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

    def _send(self, event: events.Event) -> None:
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


class EarlyStop(threading.Thread):
    """Ends the process soon after a stop that arrives before training began, where
    there is no checkpoint to save, so quit and stop never wait for a model to load or
    for a dataset to be generated. A stop during training goes the usual way: the
    experiment saves at its next step point."""

    def __init__(self, ctx: WorkerContext, sink: PipeSink) -> None:
        super().__init__(name="early-stop", daemon=True)
        self._ctx, self._sink = ctx, sink

    def run(self) -> None:
        control = self._ctx.control
        while not control.stopping:
            time.sleep(0.05)
        deadline = time.monotonic() + UNSTARTED_STOP_GRACE_S
        while time.monotonic() < deadline:
            time.sleep(0.05)
        if self._ctx.training_started or self._ctx.current_phase in SAVING_PHASES:
            return  # it saves at its next step point, however long that takes
        from sa2va_contract.files import WRITE_LOCK

        WRITE_LOCK.acquire(timeout=5.0)  # never leave a memoised file half-written
        log.info("stopped before training began (%s): nothing to save", control.stop_reason)
        # No step: the experiment's count stays where its last checkpoint left it.
        self._sink.emit(events.Stopped(self._ctx.name, step=None, reason=control.stop_reason))
        self._sink.flush()
        logging.shutdown()
        os._exit(0)


def read_control(conn: Connection, control: Control, lifeline: Lifeline) -> None:
    """The control channel: `events.Pause`, `Resume`, `Stop`. End of file means the
    supervisor's end closed, i.e. the supervisor died."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            lifeline.lost()
            return
        if isinstance(message, events.Pause):
            control.pause()
        elif isinstance(message, events.Resume):
            control.resume()
        elif isinstance(message, events.Stop):
            control.stop(message.reason)
        elif isinstance(message, events.MasksDone):
            control.masks_done.set()
        else:
            log.warning("unknown control message %r", message)


def redirect_output(log_path: Path) -> None:
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
    os.environ["CUDA_VISIBLE_DEVICES"] = spec.visible_gpus
    # Ctrl+C in the terminal reaches the whole process group; the supervisor answers it
    # by stopping us gracefully, so the signal itself must not break a step in half.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    redirect_output(spec.log_path)

    control = Control()
    signal.signal(signal.SIGTERM, lambda *_: control.stop("terminated"))
    # A closing terminal hangs up its whole process group: save and stop, as on SIGTERM
    # (under nohup it stays ignored).
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda *_: control.stop("hung up"))
    lifeline = Lifeline(control)
    sink = PipeSink(conn, on_lost=lifeline.lost)
    threading.Thread(target=read_control, args=(conn, control, lifeline), name="control", daemon=True).start()
    Watchdog(spec.supervisor_pid, lifeline, sink).start()

    log.info("attempt %d of %s: pid %d, gpu %s, batch size override %s, resume from %s",
             spec.attempt, spec.name, os.getpid(), spec.gpu, spec.batch_size_override, spec.resume_from)
    if spec.name == events.MASK_STAGE:
        from experiments.mask_stage import stage_context

        ctx: WorkerContext = stage_context(spec.config, exp_dir=spec.exp_dir, sink=sink, control=control,
                                           gpu=spec.gpu, needs_of=spec.needs_of, replica_gpus=spec.replica_gpus)
        EarlyStop(ctx, sink).start()
    else:
        try:
            experiment = spec.config.experiments()[spec.name]
        except KeyError:
            sink.emit(events.Failed(spec.name, kind="error",
                                    message=f"{spec.name!r} is not an enabled experiment of the config"))
            sys.exit(1)
        ctx = WorkerContext(
            name=spec.name, config=spec.config, experiment=experiment, exp_dir=spec.exp_dir, sink=sink,
            control=control, gpu=spec.gpu, resume_from=spec.resume_from, batch_size_override=spec.batch_size_override,
            wait_for_masks=spec.wait_for_masks,
        )
        EarlyStop(ctx, sink).start()
    sink.emit(events.Started(spec.name, pid=os.getpid(), gpu=spec.gpu, batch_size=ctx.batch_size,
                             attempt=spec.attempt, resumed_from=str(spec.resume_from) if spec.resume_from else None,
                             host=socket.gethostname()))
    outcome = run_experiment(ctx, spec.entry, spec.log_path)
    sink.emit(outcome)
    sink.flush()
    if isinstance(outcome, events.Stopped):
        # By now the experiment has closed all it writes (checkpoints are written whole
        # and synced before Stopped is sent; the logger's outputs are closed), so
        # nothing is lost by skipping the interpreter's slow teardown of torch: a quit
        # ends this process at once, in training as before it.
        logging.shutdown()
        os._exit(0)
    sys.exit(1 if isinstance(outcome, events.Failed) else 0)
