"""The engine between the CLI and the experiments: one worker per attempt of each
experiment, their events, their control, the queue, GPU placement and recovery.

It knows nothing of any UI: a Textual app and the headless printer both `subscribe()`.
It imports no torch, stable-baselines3 or transformers, and no engine code: workers
are started by entry-point name through a placement backend (`placement.local`, or
`placement.ray_backend` for `run.backend: ray`), which keeps the mechanics of
processes; the supervisor keeps the policy:
state, the run store, recovery (`sa2va_contract.recovery`), the line of experiments
waiting for room (`launching`) and deadlines.
"""

from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path
from typing import Any, Callable

from sa2va_contract import events
from sa2va_contract.config import Config, ExperimentConfig
from sa2va_contract.events import Event
from sa2va_contract.gpus import GpuSnapshot
from sa2va_contract.recovery import RestartPlan, batch_size_problem
from sa2va_tui.drain import EventDrain, call_subscribers, write_problem
from sa2va_tui.gpus import GpuSampler, GpuWatch
from sa2va_tui.launching import Attempt, Launcher, Owed, launch_mask_stage
from sa2va_tui.placement import PlacementBackend, backend_for
from sa2va_tui.runstate import EventHub, ExperimentState
from sa2va_tui.runstore import RunStore, StateWriter, load_run, load_run_config

log = logging.getLogger(__name__)

#: run.json is rewritten at most this often while only progress changes.
STATE_WRITE_INTERVAL_S = 0.5
#: A GPU sample is kept in the run folder at most this often (the report's history).
GPU_RECORD_INTERVAL_S = 10.0


class SupervisorError(Exception):
    """A request that cannot be carried out; `str()` is the one line to show."""


class Supervisor(EventHub):
    """Runs the experiments of one run folder.

    Thread model: public methods may be called from any thread; one drain thread
    receives the workers' events, applies them, writes the run folder, starts what
    waits in line when room frees, and calls the subscribers, in order, on itself; a
    sampler thread reads the GPUs once a second."""

    def __init__(self, config: Config, store: RunStore, *, backend: PlacementBackend | None = None,
                 entry_points: dict[str, str] | None = None, nvml: Any = None, gpu_interval: float = 1.0,
                 stop_grace_s: float = 30.0, gpu_record_interval: float = GPU_RECORD_INTERVAL_S,
                 prior: dict[str, ExperimentState] | None = None, cores: int | None = None) -> None:
        """`backend` runs the workers (default: the config's `run.backend`, whose GPUs
        `nvml` reads); `entry_points` replaces the kinds' entry points (tests); `prior`
        is the state of a run being resumed; `cores` the CPU workers at once (default:
        this process's cores)."""
        super().__init__(prior)
        backend = backend or backend_for(config, store, nvml)
        self.config = config
        self.store = store
        self._backend = backend
        self._experiments = config.experiments()
        self._gpu_interval = gpu_interval
        self._stop_grace_s = stop_grace_s
        self._entry_points = entry_points
        self._gpus = GpuWatch(backend.read_gpus, store.append_gpu_sample, gpu_record_interval)
        self._attempts: dict[str, Attempt] = {}
        self._owed: dict[str, Owed] = {}
        #: The run's mask stage while its worker runs (kept apart from the experiments:
        #: it takes no place in line and no core of theirs).
        self._stage: Attempt | None = None
        self._launcher = Launcher(config, store, backend, self._book, self._gpus, self._attempts, self._dispatch,
                                  entry_points, cores, masks_pending=lambda: self._stage is not None)
        self._outbox: list[Event] = []
        self._drain = EventDrain(self)
        self._sampler: GpuSampler | None = None
        self._started = self._closing = self._finished = False
        #: The one line that cut the run short from the supervisor's side (a full disk).
        self._fault: str | None = None
        self._state_writer = StateWriter(store, STATE_WRITE_INTERVAL_S)

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

    @property
    def gpus(self) -> GpuSnapshot:
        """The latest reading of the GPUs."""
        return self._gpus.snapshot

    def start(self, names: list[str] | None = None) -> None:
        """Start the named experiments (default: every enabled one, or for a resumed
        run every unfinished one, each from its last checkpoint), as room allows."""
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
            pending = [name for name in names if self._book.states[name].state != "finished"]
            self._start_stage(pending)
            for name in pending:
                state = self._book.states[name]
                self._launcher.request(name, Owed("resume") if state.attempts else None)
            self._launcher.schedule()
            self._write_state(force=True)
        atexit.register(self.shutdown)
        self._drain.thread.start()
        pids = lambda: {pid: name for pid, name, _ in self._launcher.occupants() if pid}  # noqa: E731
        self._sampler = GpuSampler(self._backend.read_gpus, pids, self._drain.on_gpus, self._gpu_interval)
        self._sampler.start()

    def _start_stage(self, names: list[str]) -> None:
        if not names or self._entry_points is not None:
            return  # workloads of a test's own read no masks
        self._stage = launch_mask_stage(self.config, self.store, self._backend, self._gpus.snapshot, names)
        if self._stage is not None:
            self._book.state_of(events.MASK_STAGE).pid = self._stage.handle.pid

    def _end_stage(self) -> None:
        """The stage is over, however it ended: experiments waiting for their pairs
        compute what is still missing themselves."""
        self._stage = None
        for attempt in self._attempts.values():
            self._backend.send(attempt.handle, events.MasksDone())

    def pause(self, name: str) -> None:
        """The worker blocks at its next step point (within a second)."""
        with self._lock:
            self._backend.send(self._live(name).handle, events.Pause())

    def resume(self, name: str) -> None:
        with self._lock:
            self._backend.send(self._live(name).handle, events.Resume())

    def stop(self, name: str) -> None:
        """The worker saves a checkpoint and exits (killed if it has not within the
        grace); an experiment waiting in line leaves it and never starts."""
        with self._lock:
            self._known(name)
            if name == events.MASK_STAGE:
                self._ask_stop(self._live(name), "stop", self._stop_grace_s)
                return
            self._owed.pop(name, None)
            if self._launcher.withdraw(name):
                self._dispatch(events.Stopped(name, step=self._book.states[name].timesteps,
                                              reason="removed from the line"))
                return
            self._ask_stop(self._live(name), "stop", self._stop_grace_s)

    def restart_plan(self, name: str) -> RestartPlan:
        """What `restart(name)` would do now: the plan the restart dialog shows."""
        with self._lock:
            self._known(name)
            return self._launcher.plan_now(name, "manual")

    def restart(self, name: str, batch_size: int | None = None, plan: RestartPlan | None = None) -> None:
        """Stop (if running) and start a new process that resumes from the last
        checkpoint, its timestep count carried on; at `batch_size` when given (after an
        out-of-memory failure that had no automatic restart left), or as `plan` (from
        `restart_plan`) says. It waits in line when no device has room."""
        with self._lock:
            self._known(name)
            refusal = restart_refusal(name, self._book.states[name], self._experiments[name], self._closing,
                                      plan.batch_size if plan is not None else batch_size)
            if refusal:
                raise SupervisorError(refusal)
            if name in self._owed or self._launcher.position(name) is not None:
                return  # a new attempt is already on its way
            owed = Owed("manual", batch_size=batch_size, plan=plan)
            attempt = self._attempts.get(name)
            if attempt is None:
                self._launcher.request(name, owed)
                self._launcher.schedule()
            else:
                self._owed[name] = owed
                self._book.mark_restarting(name)
                self._state_writer.dirty = True
                self._ask_stop(attempt, "restart", self._stop_grace_s)

    def position(self, name: str) -> int | None:
        """An experiment's place in line (1: next), None when it does not wait."""
        with self._lock:
            return self._launcher.position(name)

    @property
    def done(self) -> bool:
        """No worker runs, none waits and none is owed: every experiment has ended, for now.
        Also true when the drain thread is gone (nothing more can happen by itself):
        `shutdown` then reaps the workers on the caller's thread."""
        with self._lock:
            if self._started and not self._finished and not self._drain.thread.is_alive():
                return True
            return (self._started and not self._attempts and self._stage is None and not self._owed
                    and not self._launcher.line)

    @property
    def fault(self) -> str | None:
        """Why the supervisor cut the run short by itself, in one line (`disk full:
        PATH`); None when it did not."""
        with self._lock:
            return self._fault

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop every worker gracefully (each saves a checkpoint), kill those still
        running after `grace_s`, and close the run folder. Safe to call twice."""
        with self._lock:
            if self._finished:
                return
            self._close_down("shutdown", grace_s)
        if self._started and self._drain.thread.is_alive():
            with self._changed:
                # The drain thread kills at the deadline; give it a moment past that.
                self._changed.wait_for(lambda: not self._live_attempts(), grace_s + 5.0)
        elif self._started:
            self._drain.reap_here(grace_s + 5.0)
        if self._sampler is not None:
            self._sampler.stop()
        with self._lock:
            if self._finished:
                return  # a concurrent call (a forced stop) closed it meanwhile
            self._finished = True
            self._backend.wake()
        if self._drain.thread.is_alive() and threading.current_thread() is not self._drain.thread:
            self._drain.thread.join(timeout=5.0)
        with self._lock:
            self._write_state(force=True, active=False)
            self.store.close()
            self._backend.close()
        atexit.unregister(self.shutdown)

    def _close_down(self, reason: str, grace_s: float) -> None:
        """Nothing new starts; what waits leaves the line; every worker is asked to save
        and stop within `grace_s` (a second call only shortens the grace). Lock held."""
        self._closing = True
        self._owed.clear()
        for waiting in list(self._launcher.line):
            self._launcher.withdraw(waiting.name)
            self._dispatch(events.Stopped(waiting.name, step=self._book.states[waiting.name].timesteps,
                                          reason=reason))
        for attempt in self._live_attempts():
            self._ask_stop(attempt, reason, grace_s)

    def _cut_short(self, problem: str, reason: str) -> None:
        """A fault of the supervisor's own (the run folder cannot be written): said once,
        in one line; every worker saves if it can and stops (for `reason`); the rest
        is the caller's `shutdown`."""
        with self._lock:
            if self._fault is not None:
                return
            self._fault = problem
            log.error("%s: stopping every experiment", problem)
            if not self._finished:
                self._close_down(reason, self._stop_grace_s)
            self._changed.notify_all()

    # --- helpers -------------------------------------------------------------------

    def _live_attempts(self) -> list[Attempt]:
        """Every worker that runs: the experiments' and the mask stage's. Lock held."""
        return [*self._attempts.values(), *([self._stage] if self._stage else [])]

    def _known(self, name: str) -> None:
        if name == events.MASK_STAGE and self._book.stage is not None:
            return
        if name not in self._book.states:
            raise SupervisorError(f"unknown experiment {name!r} (this run has: {', '.join(self._book.states)})")

    def _live(self, name: str) -> Attempt:
        with self._lock:
            self._known(name)
            if name == events.MASK_STAGE:
                if self._stage is None:
                    raise SupervisorError(f"the mask stage is not running ({self._book.stage.state})")
                return self._stage
            attempt = self._attempts.get(name)
            if attempt is None:
                raise SupervisorError(f"{name} is not running ({self._book.states[name].state})")
            return attempt

    def _ask_stop(self, attempt: Attempt, reason: str, grace_s: float) -> None:
        self._backend.send(attempt.handle, events.Stop(reason))
        attempt.stop_by(grace_s)
        self._backend.wake()

    # --- events ----------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        """Apply, record and queue one event for the subscribers. Lock held or taken."""
        with self._lock:
            self._book.apply(event)
            if isinstance(event, events.PairsReady) and event.ready_for in self._attempts:
                # Told at once, it need not look for its pairs on disk over and over.
                self._backend.send(self._attempts[event.ready_for].handle, events.MasksDone())
            if isinstance(event, (events.Failed, events.Finished, events.Stopped)) and event.experiment in self._owed:
                # This end is the first half of a restart already decided.
                self._book.mark_restarting(event.experiment)
            self._record(self.store.append_event, event)
            self._outbox.append(event)
            self._state_writer.dirty = True
            self._changed.notify_all()
        if threading.current_thread() is not self._drain.thread:
            self._backend.wake()

    def _deliver_outbox(self) -> None:
        with self._lock:
            pending, self._outbox = self._outbox, []
        self._deliver(pending)

    def _write_state(self, force: bool = False, active: bool = True) -> None:
        self._record(self._state_writer.write, self._book.states, self._book.finish_time, force=force,
                     active=active, extra=self._book.run_figures)

    def _record(self, write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """A write to the run folder; one that fails cuts the run short (its file as
        it was before: run.json is written whole or not at all)."""
        try:
            write(*args, **kwargs)
        except OSError as err:
            self._cut_short(*write_problem(err, self.store.path))

    def _deliver(self, pending: list[Event]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        broken = call_subscribers(subscribers, pending)
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s not in broken]


def restart_refusal(name: str, state: ExperimentState, experiment: ExperimentConfig, closing: bool,
                    batch_size: int | None) -> str | None:
    """Why an experiment cannot be restarted now (at `batch_size`), or None."""
    if closing:
        return "shutting down"
    if state.state == "finished":
        return f"{name} has finished; nothing to restart"
    return batch_size_problem(experiment, batch_size) if batch_size is not None else None
