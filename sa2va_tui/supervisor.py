"""The engine between the CLI and the experiments: one worker process per experiment,
their events, their control, GPU placement and out-of-memory recovery.

It knows nothing of any UI: a Textual app and the headless printer both `subscribe()`.
It imports no torch, stable-baselines3 or transformers: workers are spawned by module
path (`experiments.harness.worker_main`), which imports them only in the worker.

Each worker has its own duplex pipe: events one way, control the other. (One shared
multiprocessing.Queue would be simpler, but a worker SIGKILLed while holding the
queue's write lock would silence every other worker.) The pipe closing is also how
each side learns that the other died.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait as wait_for_connections
from pathlib import Path
from typing import Any

from experiments.harness import WorkerSpec, configured_batch_size, entry_point, read_log_tail, worker_main
from sa2va_tui.config import Config, ExperimentConfig
from sa2va_tui.events import Event, Failed, Finished, Restarting, Stopped
from sa2va_tui.gpus import GpuSampler, GpuSnapshot, Nvml, choose_gpu
from sa2va_tui.runstate import EventHub, ExperimentState
from sa2va_tui.runstore import RunStore, load_run, load_run_config

log = logging.getLogger(__name__)

PPO_KINDS = ("prompt_rl", "postprocess_rl")
#: run.json is rewritten at most this often while only progress changes.
STATE_WRITE_INTERVAL_S = 0.5
#: How long the drain thread sleeps when nothing arrives (deadlines, exits, run.json).
TICK_S = 0.25
#: A GPU sample is kept in the run folder at most this often (the report's history).
GPU_RECORD_INTERVAL_S = 10.0


class SupervisorError(Exception):
    """A request that cannot be carried out; `str()` is the one line to show."""


def next_batch_size(experiment: ExperimentConfig, current: int, floor: int) -> int | None:
    """The batch size after an out-of-memory failure: half of `current` or the largest
    size below that PPO can use (one that divides n_steps * n_envs), never below
    `floor`; None when there is none left to try."""
    half = current // 2
    if experiment.kind not in PPO_KINDS:
        return half if half >= floor else None
    rollout = experiment.ppo.n_steps * experiment.ppo.n_envs
    return next((b for b in range(half, floor - 1, -1) if rollout % b == 0), None)


def check_batch_size(experiment: ExperimentConfig, batch_size: int) -> None:
    """Raise SupervisorError unless the experiment can run at `batch_size`."""
    if batch_size < 1:
        raise SupervisorError(f"batch size {batch_size}: must be at least 1")
    if experiment.kind in PPO_KINDS:
        rollout = experiment.ppo.n_steps * experiment.ppo.n_envs
        if rollout % batch_size:
            raise SupervisorError(f"batch size {batch_size}: must divide n_steps * n_envs = {rollout}")


@dataclass
class _Relaunch:
    """A new attempt the supervisor owes an experiment once its current process is gone."""

    reason: str  # "oom", "manual", "resume"
    batch_size: int | None = None


@dataclass
class _Worker:
    """One attempt of one experiment: its process and the supervisor's end of its pipe."""

    spec: WorkerSpec
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection
    #: The batch size this attempt runs with.
    batch_size: int
    #: The terminal event (Finished, Stopped, Failed) it sent, if any.
    outcome: Event | None = None
    #: After a stop request: the grace it was given, and when it runs out.
    grace_s: float | None = None
    kill_at: float | None = None
    killed_by_us: bool = False
    closed: bool = False

    def send(self, *message: Any) -> bool:
        try:
            self.conn.send(message)
            return True
        except (OSError, EOFError):
            return False


class Supervisor(EventHub):
    """Runs the experiments of one run folder.

    Thread model: public methods may be called from any thread; one drain thread
    receives the workers' events, applies them, writes the run folder and calls the
    subscribers, in order, on itself; a sampler thread reads the GPUs once a second."""

    def __init__(
        self,
        config: Config,
        store: RunStore,
        *,
        entry_points: dict[str, str] | None = None,
        nvml: Any = None,
        gpu_interval: float = 1.0,
        stop_grace_s: float = 30.0,
        gpu_record_interval: float = GPU_RECORD_INTERVAL_S,
        prior: dict[str, ExperimentState] | None = None,
    ) -> None:
        super().__init__(prior)
        self.config = config
        self.store = store
        self._experiments = config.experiments()
        self._entry_points = entry_points
        self._nvml = Nvml(nvml)
        self._gpu_interval = gpu_interval
        self._stop_grace_s = stop_grace_s
        self._gpu_record_interval = gpu_record_interval
        self._gpu_recorded_at: float | None = None
        self._mp = multiprocessing.get_context("spawn")
        self._workers: dict[str, _Worker] = {}
        self._relaunch: dict[str, _Relaunch] = {}
        self._outbox: list[Event] = []
        self._wake_r, self._wake_w = self._mp.Pipe(duplex=False)
        self._drain = threading.Thread(target=self._drain_loop, name="supervisor-drain", daemon=True)
        self._sampler: GpuSampler | None = None
        self._started = False
        self._closing = False
        self._finished = False
        self._dirty = False
        self._last_write = 0.0
        self.gpus = GpuSnapshot(available=False, message="not read yet")
        # Multiprocessing hands sys.stderr's descriptor to the resource tracker it starts
        # with the first spawned worker; a front end started after this (Textual's stderr
        # has fileno() -1) would make that fail. Start the tracker while stderr is real.
        resource_tracker.ensure_running()

    @classmethod
    def for_run(cls, run_dir: Path, **kwargs: Any) -> "Supervisor":
        """A supervisor that continues an earlier run folder from its checkpoints."""
        snapshot = load_run(run_dir)
        if snapshot.supervised:
            raise SupervisorError(f"{snapshot.run_id} is still supervised by pid {snapshot.supervisor_pid}")
        return cls(load_run_config(run_dir), RunStore.open(run_dir), prior=snapshot.experiments, **kwargs)

    # --- public API ------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return self.store.path

    def start(self, names: list[str] | None = None) -> None:
        """Start the named experiments (default: every enabled one, or for a resumed
        run every unfinished one, each from its last checkpoint)."""
        with self._lock:
            if self._started:
                raise SupervisorError("this supervisor has already started")
            if names is None:
                names = list(self._book.states) if self._book.states else list(self._experiments)
            unknown = [n for n in names if n not in self._experiments]
            if unknown:
                raise SupervisorError(f"unknown experiment {unknown[0]!r} (enabled: {', '.join(self._experiments)})")
            self._started = True
            for name in names:
                self._book.add(name, self._experiments[name].kind)
            self._write_state(force=True)
        atexit.register(self.shutdown)
        self._drain.start()
        self._sampler = GpuSampler(self._nvml, self._worker_pids, self._on_gpus, self._gpu_interval)
        self._sampler.start()
        with self._lock:
            for name in names:
                state = self._book.states[name]
                if state.state == "finished":
                    continue
                self._launch(name, _Relaunch("resume") if state.attempts else None)

    def pause(self, name: str) -> None:
        """The worker blocks at its next step point (within a second)."""
        with self._lock:
            self._live(name).send("pause")

    def resume(self, name: str) -> None:
        with self._lock:
            self._live(name).send("resume")

    def stop(self, name: str) -> None:
        """The worker saves a checkpoint and exits; killed if it has not within the grace."""
        with self._lock:
            self._relaunch.pop(name, None)
            self._ask_stop(self._live(name), "stop", self._stop_grace_s)

    def restart(self, name: str, batch_size: int | None = None) -> None:
        """Stop (if running) and start a new process that resumes from the last
        checkpoint, its timestep count carried on; with `batch_size`, at that size
        (after an out-of-memory failure that had no automatic restart left)."""
        with self._lock:
            self._known(name)
            if self._closing:
                raise SupervisorError("shutting down")
            if self._book.states[name].state == "finished":
                raise SupervisorError(f"{name} has finished; nothing to restart")
            if batch_size is not None:
                check_batch_size(self._experiments[name], batch_size)
            if name in self._relaunch:
                return  # a restart is already on its way (after an out-of-memory failure)
            self._relaunch[name] = _Relaunch("manual", batch_size=batch_size)
            worker = self._workers.get(name)
            if worker is None:
                self._launch(name, self._relaunch.pop(name))
            else:
                self._book.states[name].state = "restarting"
                self._dirty = True
                self._ask_stop(worker, "restart", self._stop_grace_s)

    @property
    def done(self) -> bool:
        """No worker runs and none is owed: every experiment has ended, for now."""
        with self._lock:
            return self._started and not self._workers and not self._relaunch

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop every worker gracefully (each saves a checkpoint), kill those still
        running after `grace_s`, and close the run folder. Safe to call twice."""
        with self._lock:
            if self._finished:
                return
            self._closing = True
            self._relaunch.clear()
            for worker in self._workers.values():
                self._ask_stop(worker, "shutdown", grace_s)
        if self._started:
            with self._changed:
                # The drain thread kills at the deadline; give it a moment past that.
                self._changed.wait_for(lambda: not self._workers, grace_s + 5.0)
        if self._sampler is not None:
            self._sampler.stop()
        with self._lock:
            self._finished = True
            self._wake()
        if self._drain.is_alive():
            self._drain.join(timeout=5.0)
        with self._lock:
            self._write_state(force=True, active=False)
            self.store.close()
            self._wake_r.close()
            self._wake_w.close()
        self._nvml.shutdown()
        atexit.unregister(self.shutdown)

    # --- launching -----------------------------------------------------------------

    def _launch(self, name: str, relaunch: _Relaunch | None) -> None:
        """Start one attempt. Called with the lock held."""
        experiment = self._experiments[name]
        state = self._book.states[name]
        configured = configured_batch_size(experiment)
        batch = (relaunch.batch_size if relaunch and relaunch.batch_size else None) or state.batch_size or configured
        gpu = self._place(experiment)
        if experiment.device == "cuda" and gpu is None:
            self._dispatch(Failed(name, kind="error", message=f"device is cuda but {self.gpus.message}"))
            return
        resume_from = Path(state.last_checkpoint) if relaunch and state.last_checkpoint else None
        attempt = state.attempts + 1
        if relaunch:
            changes: dict[str, Any] = {"resume_from": str(resume_from) if resume_from else None}
            if state.batch_size and batch != state.batch_size:
                changes["batch_size"] = [state.batch_size, batch]
            if state.gpu != gpu:
                changes["gpu"] = [state.gpu, gpu]
            self._dispatch(Restarting(name, reason=relaunch.reason, attempt=attempt, changes=changes))
        spec = WorkerSpec(
            name=name,
            entry=entry_point(experiment.kind, self._entry_points),
            config=self.config,
            exp_dir=self.store.exp_dir(name),
            log_path=self.store.log_path(name),
            gpu=gpu,
            supervisor_pid=os.getpid(),
            attempt=attempt,
            resume_from=resume_from,
            batch_size_override=batch if batch != configured else None,
        )
        ours, theirs = self._mp.Pipe(duplex=True)
        process = self._mp.Process(target=worker_main, args=(spec, theirs), name=f"sa2va-{name}")
        try:
            process.start()
        except (OSError, ValueError, TypeError) as err:  # no fork left, no fd left, an unpicklable config
            ours.close()
            self._dispatch(Failed(name, kind="error", message=f"could not start a worker process: {err}"))
            return
        finally:
            # Only the worker may hold its end: then its death reads as end-of-file here.
            theirs.close()
        self._workers[name] = _Worker(spec=spec, process=process, conn=ours, batch_size=batch)
        state.pid = process.pid
        self._dirty = True
        self._wake()

    def _place(self, experiment: ExperimentConfig) -> int | None:
        if experiment.device == "cpu":
            return None
        self.gpus = self._nvml.read(self._worker_pids())
        seen = {p.pid for g in self.gpus.gpus for p in g.processes}
        placed = Counter(w.spec.gpu for w in self._workers.values()
                         if w.spec.gpu is not None and w.process.pid not in seen)
        return choose_gpu(self.gpus, experiment.gpu, placed)

    def _worker_pids(self) -> dict[int, str]:
        with self._lock:
            return {w.process.pid: name for name, w in self._workers.items() if w.process.pid}

    # --- control helpers -------------------------------------------------------------

    def _known(self, name: str) -> None:
        if name not in self._book.states:
            raise SupervisorError(f"unknown experiment {name!r} (this run has: {', '.join(self._book.states)})")

    def _live(self, name: str) -> _Worker:
        with self._lock:
            self._known(name)
            worker = self._workers.get(name)
            if worker is None:
                raise SupervisorError(f"{name} is not running ({self._book.states[name].state})")
            return worker

    def _ask_stop(self, worker: _Worker, reason: str, grace_s: float) -> None:
        worker.send("stop", reason)
        kill_at = time.monotonic() + grace_s
        if worker.kill_at is None or kill_at < worker.kill_at:
            worker.grace_s, worker.kill_at = grace_s, kill_at
        self._wake()

    # --- events ----------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        """Apply, record and queue one event for the subscribers. Lock held or taken."""
        with self._lock:
            self._book.apply(event)
            if isinstance(event, (Failed, Finished, Stopped)) and event.experiment in self._relaunch:
                # This end is the first half of a restart already decided.
                self._book.states[event.experiment].state = "restarting"
            self.store.append_event(event)
            self._outbox.append(event)
            self._dirty = True
            self._changed.notify_all()
        if threading.current_thread() is not self._drain:
            self._wake()

    def _on_worker_event(self, worker: _Worker, event: Event) -> None:
        name = worker.spec.name
        with self._lock:
            if isinstance(event, (Failed, Finished, Stopped)):
                worker.outcome = event
                if isinstance(event, Failed) and event.kind == "oom":
                    self._plan_oom_restart(name, event)
            self._dispatch(event)

    def _plan_oom_restart(self, name: str, failure: Failed) -> None:
        state = self._book.states[name]
        recovery = self.config.recovery
        if self._closing or state.oom_restarts >= recovery.max_oom_restarts:
            log.warning("%s: out of memory, no automatic restart left", name)
            return
        current = failure.batch_size or self._workers[name].batch_size
        smaller = next_batch_size(self._experiments[name], current, recovery.min_batch_size)
        if smaller is None:
            log.warning("%s: out of memory at batch size %d, the floor is %d", name, current, recovery.min_batch_size)
            return
        self._relaunch[name] = _Relaunch("oom", batch_size=smaller)

    def _on_gpus(self, snapshot: GpuSnapshot) -> None:
        sample = snapshot.to_event()
        with self._lock:
            self.gpus = snapshot
            now = time.monotonic()
            if self._gpu_recorded_at is None or now - self._gpu_recorded_at >= self._gpu_record_interval:
                self.store.append_gpu_sample(sample)
                self._gpu_recorded_at = now
        self._dispatch(sample)

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"")
        except OSError:
            pass

    # --- the drain thread ------------------------------------------------------------

    def _drain_loop(self) -> None:
        while True:
            with self._lock:
                if self._finished:
                    self._deliver_outbox()
                    return
                by_conn = {w.conn: w for w in self._workers.values()}
            for conn in wait_for_connections([*by_conn, self._wake_r], timeout=TICK_S):
                if conn is self._wake_r:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                else:
                    self._receive(by_conn[conn])
            self._check_processes()
            with self._lock:
                self._write_state()
            self._deliver_outbox()

    def _receive(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                self._on_worker_event(worker, worker.conn.recv())
        except (EOFError, OSError):
            self._on_exit(worker)

    def _check_processes(self) -> None:
        """Exits the pipe did not reveal (a child of the worker may hold its end), and
        stop deadlines that passed."""
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            if not worker.process.is_alive():
                self._receive(worker)
                self._on_exit(worker)
            elif worker.kill_at is not None and time.monotonic() > worker.kill_at and not worker.killed_by_us:
                log.warning("%s did not stop in time; killing pid %s", worker.spec.name, worker.process.pid)
                worker.killed_by_us = True
                worker.process.kill()

    def _on_exit(self, worker: _Worker) -> None:
        with self._lock:
            if worker.closed:
                return
            worker.closed = True
            worker.process.join(timeout=5.0)
            if worker.process.exitcode is None:
                worker.process.kill()
                worker.process.join(timeout=5.0)
            worker.conn.close()
            name = worker.spec.name
            if self._workers.get(name) is worker:
                del self._workers[name]
            if worker.outcome is None:
                self._dispatch(self._unreported_end(worker))
            relaunch = self._relaunch.pop(name, None)
            if relaunch is not None and not self._closing:
                self._launch(name, relaunch)
            self._changed.notify_all()

    def _unreported_end(self, worker: _Worker) -> Failed:
        """A worker that died without saying how: a signal, a crash in native code, a
        kill by us after a stop it did not obey."""
        code = worker.process.exitcode
        if worker.killed_by_us:
            kind, message = "killed", f"did not stop within {worker.grace_s:g} s and was killed"
        elif code is not None and code < 0:
            kind, message = "killed", f"killed by {_signal_name(-code)}"
        else:
            kind, message = "error", f"exited with code {code} without a report"
        state = self._book.states.get(worker.spec.name)
        return Failed(worker.spec.name, kind=kind, message=message, exit_code=code,
                      step=state.timesteps if state else None, batch_size=worker.batch_size,
                      gpu=worker.spec.gpu, log_tail=read_log_tail(worker.spec.log_path))

    def _deliver_outbox(self) -> None:
        with self._lock:
            events, self._outbox = self._outbox, []
        self._deliver(events)

    def _write_state(self, force: bool = False, active: bool = True) -> None:
        now = time.monotonic()
        if force or (self._dirty and now - self._last_write >= STATE_WRITE_INTERVAL_S):
            self.store.write_state(self._book.states, self._book.finish_time(), active=active)
            self._dirty = False
            self._last_write = now


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
