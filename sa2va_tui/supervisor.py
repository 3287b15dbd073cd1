"""The engine between the CLI and the experiments: one worker per attempt of each
experiment, their events, their control, GPU placement and recovery.

It knows nothing of any UI: a Textual app and the headless printer both `subscribe()`.
It imports no torch, stable-baselines3 or transformers, and no engine code: workers
are started by entry-point name through a placement backend (`placement.local` by
default), which keeps the mechanics of processes; this class keeps the policy: state,
the run store, recovery (`sa2va_contract.recovery`) and deadlines.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sa2va_contract import events
from sa2va_contract.config import Config, ExperimentConfig
from sa2va_contract.events import Change, Event, GpuSample, RestartChanges
from sa2va_contract.files import read_log_tail
from sa2va_contract.gpus import GpuSnapshot
from sa2va_contract.kinds import kind_of, resolve_entry
from sa2va_contract.recovery import (
    OOM,
    RestartPlan,
    automatic_restart_batch,
    batch_size_problem,
    choose_device,
    classify_exit,
    plan_restart,
)
from sa2va_contract.worker import WorkerSpec
from sa2va_tui.gpus import GpuSampler
from sa2va_tui.placement import Exit, LaunchError, PlacementBackend, WorkerHandle
from sa2va_tui.runstate import EventHub, ExperimentState
from sa2va_tui.runstore import RunStore, load_run, load_run_config

log = logging.getLogger(__name__)

#: run.json is rewritten at most this often while only progress changes.
STATE_WRITE_INTERVAL_S = 0.5
#: How long the drain thread waits when nothing arrives (deadlines, run.json).
TICK_S = 0.25
#: A GPU sample is kept in the run folder at most this often (the report's history).
GPU_RECORD_INTERVAL_S = 10.0


class SupervisorError(Exception):
    """A request that cannot be carried out; `str()` is the one line to show."""


@dataclass
class _Owed:
    """A new attempt the supervisor owes an experiment once its current one is gone:
    why, and either the plan a person confirmed or the batch size recovery chose."""

    reason: str
    batch_size: int | None = None
    plan: RestartPlan | None = None


@dataclass(eq=False)
class _Attempt:
    """One attempt of one experiment: the backend's handle and what the policy tracks."""

    handle: WorkerHandle
    batch_size: int
    #: The terminal event (Finished, Stopped, Failed) it sent, if any.
    outcome: Event | None = None
    #: After a stop request: the grace it was given, and when it runs out.
    grace_s: float | None = None
    kill_at: float | None = None
    killed_by_us: bool = False

    @property
    def name(self) -> str:
        return self.handle.spec.name


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
        backend: PlacementBackend | None = None,
        entry_points: dict[str, str] | None = None,
        nvml: Any = None,
        gpu_interval: float = 1.0,
        stop_grace_s: float = 30.0,
        gpu_record_interval: float = GPU_RECORD_INTERVAL_S,
        prior: dict[str, ExperimentState] | None = None,
    ) -> None:
        super().__init__(prior)
        if backend is None:
            from sa2va_tui.placement.local import LocalBackend

            backend = LocalBackend(nvml)
        self.config = config
        self.store = store
        self._backend = backend
        self._experiments = config.experiments()
        self._entry_points = entry_points
        self._gpu_interval = gpu_interval
        self._stop_grace_s = stop_grace_s
        self._gpu_record_interval = gpu_record_interval
        self._gpu_recorded_at: float | None = None
        self._attempts: dict[str, _Attempt] = {}
        self._owed: dict[str, _Owed] = {}
        self._outbox: list[Event] = []
        self._drain = threading.Thread(target=self._drain_loop, name="supervisor-drain", daemon=True)
        self._sampler: GpuSampler | None = None
        self._started = False
        self._closing = False
        self._finished = False
        self._dirty = False
        self._last_write = 0.0
        self.gpus = GpuSnapshot(available=False, message="not read yet")

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
        self._sampler = GpuSampler(self._backend.read_gpus, self._worker_pids, self._on_gpus, self._gpu_interval)
        self._sampler.start()
        with self._lock:
            for name in names:
                state = self._book.states[name]
                if state.state == "finished":
                    continue
                self._launch(name, _Owed("resume") if state.attempts else None)

    def pause(self, name: str) -> None:
        """The worker blocks at its next step point (within a second)."""
        with self._lock:
            self._backend.send(self._live(name).handle, events.Pause())

    def resume(self, name: str) -> None:
        with self._lock:
            self._backend.send(self._live(name).handle, events.Resume())

    def stop(self, name: str) -> None:
        """The worker saves a checkpoint and exits; killed if it has not within the grace."""
        with self._lock:
            self._owed.pop(name, None)
            self._ask_stop(self._live(name), "stop", self._stop_grace_s)

    def restart_plan(self, name: str) -> RestartPlan:
        """What `restart(name)` would do now: the plan the restart dialog shows."""
        with self._lock:
            self._known(name)
            return self._plan(name, "manual")

    def restart(self, name: str, batch_size: int | None = None, plan: RestartPlan | None = None) -> None:
        """Stop (if running) and start a new process that resumes from the last
        checkpoint, its timestep count carried on; at `batch_size` when given (after an
        out-of-memory failure that had no automatic restart left), or as `plan` (from
        `restart_plan`) says."""
        with self._lock:
            self._known(name)
            if self._closing:
                raise SupervisorError("shutting down")
            if self._book.states[name].state == "finished":
                raise SupervisorError(f"{name} has finished; nothing to restart")
            wanted = plan.batch_size if plan is not None else batch_size
            if wanted is not None:
                problem = batch_size_problem(self._experiments[name], wanted)
                if problem:
                    raise SupervisorError(problem)
            if name in self._owed:
                return  # a restart is already on its way (after an out-of-memory failure)
            owed = _Owed("manual", batch_size=batch_size, plan=plan)
            attempt = self._attempts.get(name)
            if attempt is None:
                self._launch(name, owed)
            else:
                self._owed[name] = owed
                self._book.mark_restarting(name)
                self._dirty = True
                self._ask_stop(attempt, "restart", self._stop_grace_s)

    @property
    def done(self) -> bool:
        """No worker runs and none is owed: every experiment has ended, for now."""
        with self._lock:
            return self._started and not self._attempts and not self._owed

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Stop every worker gracefully (each saves a checkpoint), kill those still
        running after `grace_s`, and close the run folder. Safe to call twice."""
        with self._lock:
            if self._finished:
                return
            self._closing = True
            self._owed.clear()
            for attempt in self._attempts.values():
                self._ask_stop(attempt, "shutdown", grace_s)
        if self._started:
            with self._changed:
                # The drain thread kills at the deadline; give it a moment past that.
                self._changed.wait_for(lambda: not self._attempts, grace_s + 5.0)
        if self._sampler is not None:
            self._sampler.stop()
        with self._lock:
            self._finished = True
            self._backend.wake()
        if self._drain.is_alive():
            self._drain.join(timeout=5.0)
        with self._lock:
            self._write_state(force=True, active=False)
            self.store.close()
            self._backend.close()
        atexit.unregister(self.shutdown)

    # --- launching -----------------------------------------------------------------

    def _launch(self, name: str, owed: _Owed | None) -> None:
        """Start one attempt: the first (`owed` None) or one owed. Lock held."""
        experiment = self._experiments[name]
        state = self._book.states[name]
        if owed is None:
            batch = state.batch_size or kind_of(experiment).batch_size(experiment)
            gpu, resume_from = self._place(experiment), None
        else:
            plan = owed.plan or self._plan(name, owed.reason, owed.batch_size)
            batch, gpu, resume_from = plan.batch_size, plan.gpu, plan.resume_from
        if experiment.device == "cuda" and gpu is None:
            self._dispatch(events.Failed(name, kind="error", message=f"device is cuda but {self.gpus.message}"))
            return
        attempt = state.attempts + 1
        if owed is not None:
            changes = RestartChanges(
                resume_from=resume_from,
                batch_size=Change(state.batch_size, batch) if state.batch_size and batch != state.batch_size else None,
                gpu=Change(state.gpu, gpu) if state.gpu != gpu else None,
            )
            self._dispatch(events.Restarting(name, reason=owed.reason, attempt=attempt, changes=changes))
        configured = kind_of(experiment).batch_size(experiment)
        spec = WorkerSpec(
            name=name,
            entry=resolve_entry(experiment.kind, self._entry_points),
            config=self.config,
            exp_dir=self.store.exp_dir(name),
            log_path=self.store.log_path(name),
            gpu=gpu,
            supervisor_pid=os.getpid(),
            attempt=attempt,
            resume_from=Path(resume_from) if resume_from else None,
            batch_size_override=batch if batch != configured else None,
        )
        try:
            handle = self._backend.launch(spec)
        except LaunchError as err:
            self._dispatch(events.Failed(name, kind="error", message=str(err)))
            return
        self._attempts[name] = _Attempt(handle=handle, batch_size=batch)
        self._book.launched(name, handle.pid)
        self._dirty = True
        self._backend.wake()

    def _plan(self, name: str, reason: str, batch_size: int | None = None) -> RestartPlan:
        state = self._book.states[name]
        snapshot, placed = self._gpu_view()
        return plan_restart(
            self._experiments[name], reason, attempts=state.attempts, last_batch_size=state.batch_size,
            last_gpu=state.gpu, last_failure=state.failure.kind if state.failure and state.state == "failed" else None,
            checkpoint=state.last_checkpoint, checkpoint_step=state.checkpoint_step, recovery=self.config.recovery,
            gpus=snapshot, placed=placed, batch_size=batch_size,
        )

    def _place(self, experiment: ExperimentConfig) -> int | None:
        snapshot, placed = self._gpu_view()
        return choose_device(experiment, snapshot, placed)

    def _gpu_view(self) -> tuple[GpuSnapshot, Counter[int]]:
        """The GPUs now, and how many of our workers each holds that NVML does not list
        yet (just started: the memory they are about to take still shows as free)."""
        self.gpus = self._backend.read_gpus(self._worker_pids())
        seen = {p.pid for g in self.gpus.gpus for p in g.processes}
        placed = Counter(a.handle.spec.gpu for a in self._attempts.values()
                         if a.handle.spec.gpu is not None and a.handle.pid not in seen)
        return self.gpus, placed

    def _worker_pids(self) -> dict[int, str]:
        with self._lock:
            return {a.handle.pid: name for name, a in self._attempts.items() if a.handle.pid}

    # --- control helpers -------------------------------------------------------------

    def _known(self, name: str) -> None:
        if name not in self._book.states:
            raise SupervisorError(f"unknown experiment {name!r} (this run has: {', '.join(self._book.states)})")

    def _live(self, name: str) -> _Attempt:
        with self._lock:
            self._known(name)
            attempt = self._attempts.get(name)
            if attempt is None:
                raise SupervisorError(f"{name} is not running ({self._book.states[name].state})")
            return attempt

    def _ask_stop(self, attempt: _Attempt, reason: str, grace_s: float) -> None:
        self._backend.send(attempt.handle, events.Stop(reason))
        kill_at = time.monotonic() + grace_s
        if attempt.kill_at is None or kill_at < attempt.kill_at:
            attempt.grace_s, attempt.kill_at = grace_s, kill_at
        self._backend.wake()

    # --- events ----------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        """Apply, record and queue one event for the subscribers. Lock held or taken."""
        with self._lock:
            self._book.apply(event)
            if isinstance(event, (events.Failed, events.Finished, events.Stopped)) and event.experiment in self._owed:
                # This end is the first half of a restart already decided.
                self._book.mark_restarting(event.experiment)
            self.store.append_event(event)
            self._outbox.append(event)
            self._dirty = True
            self._changed.notify_all()
        if threading.current_thread() is not self._drain:
            self._backend.wake()

    def _on_worker_event(self, attempt: _Attempt, event: Event) -> None:
        with self._lock:
            if isinstance(event, (events.Failed, events.Finished, events.Stopped)):
                attempt.outcome = event
                if isinstance(event, events.Failed) and event.kind == OOM:
                    self._owe_oom_restart(attempt, event)
            self._dispatch(event)

    def _owe_oom_restart(self, attempt: _Attempt, failure: events.Failed) -> None:
        if self._closing:
            return
        state = self._book.states[attempt.name]
        batch, why_not = automatic_restart_batch(self._experiments[attempt.name], failure.batch_size or attempt.batch_size,
                                                 state.oom_restarts, self.config.recovery)
        if batch is None:
            log.warning("%s: %s", attempt.name, why_not)
            return
        self._owed[attempt.name] = _Owed("oom", batch_size=batch)

    def _on_gpus(self, snapshot: GpuSnapshot) -> None:
        sample = GpuSample.of(snapshot)
        with self._lock:
            self.gpus = snapshot
            now = time.monotonic()
            if self._gpu_recorded_at is None or now - self._gpu_recorded_at >= self._gpu_record_interval:
                self.store.append_gpu_sample(sample)
                self._gpu_recorded_at = now
        self._dispatch(sample)

    # --- the drain thread ------------------------------------------------------------

    def _drain_loop(self) -> None:
        while True:
            with self._lock:
                if self._finished:
                    self._deliver_outbox()
                    return
                attempts = list(self._attempts.values())
            by_handle = {id(a.handle): a for a in attempts}
            for handle, arrival in self._backend.wait([a.handle for a in attempts], timeout=TICK_S):
                attempt = by_handle[id(handle)]
                if isinstance(arrival, Exit):
                    self._on_exit(attempt, arrival)
                else:
                    self._on_worker_event(attempt, arrival)
            self._enforce_deadlines()
            with self._lock:
                self._write_state()
            self._deliver_outbox()

    def _enforce_deadlines(self) -> None:
        """Kill the workers that were asked to stop and did not within their grace."""
        with self._lock:
            overdue = [a for a in self._attempts.values()
                       if a.kill_at is not None and time.monotonic() > a.kill_at and not a.killed_by_us]
            for attempt in overdue:
                log.warning("%s did not stop in time; killing pid %s", attempt.name, attempt.handle.pid)
                attempt.killed_by_us = True
                self._backend.kill(attempt.handle)

    def _on_exit(self, attempt: _Attempt, exit: Exit) -> None:
        with self._lock:
            name = attempt.name
            if self._attempts.get(name) is attempt:
                del self._attempts[name]
            if attempt.outcome is None:
                self._dispatch(self._unreported_end(attempt, exit.exit_code))
            owed = self._owed.pop(name, None)
            if owed is not None and not self._closing:
                self._launch(name, owed)
            self._changed.notify_all()

    def _unreported_end(self, attempt: _Attempt, exit_code: int | None) -> events.Failed:
        kind, message = classify_exit(exit_code, attempt.killed_by_us, attempt.grace_s)
        state = self._book.states.get(attempt.name)
        spec = attempt.handle.spec
        return events.Failed(attempt.name, kind=kind, message=message, exit_code=exit_code,
                             step=state.timesteps if state else None, batch_size=attempt.batch_size, gpu=spec.gpu,
                             log_tail=read_log_tail(spec.log_path))

    def _deliver_outbox(self) -> None:
        with self._lock:
            pending, self._outbox = self._outbox, []
        self._deliver(pending)

    def _write_state(self, force: bool = False, active: bool = True) -> None:
        now = time.monotonic()
        if force or (self._dirty and now - self._last_write >= STATE_WRITE_INTERVAL_S):
            self.store.write_state(self._book.states, self._book.finish_time(), active=active)
            self._dirty = False
            self._last_write = now
