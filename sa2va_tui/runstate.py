"""What is known about each experiment of a run, folded from its events.

One fold for every source: the supervisor's workers, log files tailed by `watch`, and
`run.json` read back by `status` from another terminal all give the same
`ExperimentState`, so every view shows the same thing the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sa2va_contract import events
from sa2va_contract.events import Event

log = logging.getLogger(__name__)

STATES = ("pending", "queued", "running", "stalled", "paused", "restarting", "failed", "finished", "stopped")
TERMINAL_STATES = ("failed", "finished", "stopped")
#: The metric that `status` and the UI show as "episode reward".
EPISODE_REWARD = "rollout/ep_rew_mean"


@dataclass
class FailureRecord:
    """How an experiment's last attempt failed."""

    kind: str
    message: str
    step: int | None = None
    exit_code: int | None = None
    log_tail: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, event: events.Failed) -> "FailureRecord":
        return cls(event.kind, event.message, event.step, event.exit_code, list(event.log_tail))


@dataclass
class ExperimentState:
    name: str
    kind: str = ""
    state: str = "pending"
    phase: str | None = None
    phase_done: int | None = None
    phase_total: int | None = None
    timesteps: int = 0
    #: 0 when unknown (a log tailed without --total).
    total: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_step: int | None = None
    pid: int | None = None
    gpu: int | None = None
    #: The machine its worker runs on (None before any started, or in a run folder of an older version).
    host: str | None = None
    batch_size: int | None = None
    attempts: int = 0
    oom_restarts: int = 0
    #: Automatic restarts after a crash (`recovery.retry_errors`).
    error_restarts: int = 0
    #: Since when it waits in line for room on a device, and its place in line (1:
    #: next); None while it does not wait.
    queued_at: float | None = None
    queue_position: int | None = None
    #: Seconds it waited in line, all attempts together (the wait in progress aside).
    queued_s: float = 0.0
    #: The most GPU memory (bytes) a worker of it was seen holding.
    gpu_memory_peak: int | None = None
    last_checkpoint: str | None = None
    checkpoint_step: int | None = None
    #: Timesteps per second, smoothed.
    rate: float | None = None
    #: Seconds to finish at `rate`, as of `updated_at`.
    eta_s: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    failure: FailureRecord | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    updated_at: float = field(default_factory=time.time)
    #: Mask-cache reads, all attempts together: pairs the model computed, pairs found
    #: cached (`events.MaskWork`); the attempt in progress's own share beside them.
    model_calls: int = 0
    cache_hits: int = 0
    attempt_model_calls: int = 0
    attempt_cache_hits: int = 0
    #: The mask stage only: the run's distinct pairs, its devices, and the experiments
    #: whose pairs are all in the cache, in the order they became ready.
    distinct_pairs: int | None = None
    devices: list[str] = field(default_factory=list)
    pairs_ready: list[str] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.timesteps / self.total) if self.total else None

    @property
    def episode_reward(self) -> float | None:
        return self.metrics.get(EPISODE_REWARD)

    def waited_s(self, now: float) -> float:
        """Seconds it waited in line, the wait in progress included."""
        return self.queued_s + (max(0.0, now - self.queued_at) if self.queued_at is not None else 0.0)

    def eta_at(self, now: float) -> float | None:
        """Seconds left as seen at `now` (the estimate ages while nobody updates it)."""
        if self.state == "finished":
            return 0.0
        if self.eta_s is None or self.terminal:
            return None
        if self.state == "paused":
            return self.eta_s
        return max(0.0, self.eta_s - (now - self.updated_at))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentState":
        # A run folder written by an older or newer version may have other keys.
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        failure = fields.get("failure")
        if isinstance(failure, dict):
            fields["failure"] = FailureRecord(**{k: v for k, v in failure.items()
                                                 if k in {f.name for f in dataclasses.fields(FailureRecord)}})
        return cls(**fields)


class RateEstimator:
    """Timesteps per second as an exponential moving average whose weight grows with
    the time each sample covers, so a burst of reports and a quiet spell count the same
    per second of training."""

    def __init__(self, tau_s: float = 15.0) -> None:
        self._tau = tau_s
        self._last: tuple[float, int] | None = None
        self.rate: float | None = None

    def update(self, timesteps: int, now: float) -> float | None:
        last, self._last = self._last, (now, timesteps)
        if last is None or timesteps < last[1]:
            # First sample, or a resume from an earlier checkpoint: a new baseline.
            return self.rate
        dt = now - last[0]
        if dt <= 0:
            self._last = last
            return self.rate
        sample = (timesteps - last[1]) / dt
        weight = 1.0 - math.exp(-dt / self._tau)
        self.rate = sample if self.rate is None else self.rate + weight * (sample - self.rate)
        return self.rate

    def restart_clock(self) -> None:
        """After a pause or a new process: the gap was not training time."""
        self._last = None


class StateBook:
    """Experiment states by name, updated by `apply(event)`. Not thread-safe: its owner
    (the supervisor, a log watcher) serialises access."""

    def __init__(self, states: dict[str, ExperimentState] | None = None) -> None:
        self.states: dict[str, ExperimentState] = dict(states or {})
        self._rates: dict[str, RateEstimator] = {}
        #: The run's mask stage (`events.MASK_STAGE`), kept apart from the experiments.
        self.stage: ExperimentState | None = None

    def state_of(self, name: str) -> ExperimentState:
        """The state of an experiment, or of the mask stage, made on first use."""
        if name == events.MASK_STAGE:
            if self.stage is None:
                self.stage = ExperimentState(name=name, kind=events.MASK_STAGE)
            return self.stage
        return self.add(name)

    def mask_counts(self) -> dict[str, int | None]:
        """The run's `model_calls`, `distinct_pairs` and `cache_hits` (run.json's keys):
        every worker's together; distinct pairs as the mask stage counted them (None
        without a stage). Cache hits: pairs the stage found cached, and pairs each
        experiment read from the cache rather than the model."""
        workers = [*self.states.values(), *([self.stage] if self.stage else [])]
        return {"model_calls": sum(s.model_calls for s in workers),
                "distinct_pairs": self.stage.distinct_pairs if self.stage else None,
                "cache_hits": sum(s.cache_hits for s in workers)}

    def run_figures(self) -> dict[str, Any]:
        """run.json's top-level keys beside the experiments: the mask stage and the
        run's counts of mask work (`model_calls`, `distinct_pairs`, `cache_hits`)."""
        return {**self.mask_counts(), **({"mask_stage": self.stage.to_dict()} if self.stage is not None else {})}

    def add(self, name: str, kind: str = "") -> ExperimentState:
        state = self.states.get(name)
        if state is None:
            state = self.states[name] = ExperimentState(name=name, kind=kind)
        return state

    def apply(self, event: Event) -> ExperimentState | None:
        if not event.experiment:
            return None
        s = self.state_of(event.experiment)
        rate = self._rates.setdefault(event.experiment, RateEstimator())
        now = event.time
        if isinstance(event, events.Queued):
            s.state, s.queue_position, s.pid = "queued", event.position, None
            s.queued_at = s.queued_at or now
        elif isinstance(event, events.Started):
            s.state, s.pid, s.gpu, s.batch_size, s.attempts = "running", event.pid, event.gpu, event.batch_size, event.attempt
            s.host = event.host
            self.dequeued(event.experiment, now)  # a cluster's wait ends here
            s.started_at = s.started_at or now
            s.ended_at = None
            s.attempt_model_calls = s.attempt_cache_hits = 0
            rate.restart_clock()
        elif isinstance(event, events.Phase):
            s.phase, s.phase_done, s.phase_total = event.phase, event.done, event.total
        elif isinstance(event, events.Progress):
            s.timesteps, s.total = event.timesteps, event.total
            estimated = rate.update(event.timesteps, now)
            # A log read in one burst arrives all at once: its own rate is the true one.
            s.rate = event.rate if event.rate else estimated
            if s.state in ("pending", "stalled"):
                s.state = "running"
            s.eta_s = (max(0, s.total - s.timesteps) / s.rate) if s.rate and s.total else None
        elif isinstance(event, events.Metrics):
            s.metrics.update(event.values)
            s.metrics_step = event.step
        elif isinstance(event, events.Checkpoint):
            s.last_checkpoint, s.checkpoint_step = event.path, event.step
        elif isinstance(event, events.Paused):
            s.state = "paused"
            # Where it stands: an experiment reports progress at its own pace (PPO twice
            # a second), so the last Progress may lie behind the step it paused at.
            s.timesteps = event.step if event.step is not None else s.timesteps
        elif isinstance(event, events.Resumed):
            s.state = "running"
            rate.restart_clock()
        elif isinstance(event, events.Restarting):
            s.state, s.attempts = "restarting", event.attempt
            s.oom_restarts += event.reason == "oom"
            s.error_restarts += event.reason == "error"
            if event.changes.batch_size is not None:
                s.batch_size = event.changes.batch_size.new
            if event.changes.gpu is not None:
                s.gpu = event.changes.gpu.new
        elif isinstance(event, events.MaskWork):
            # Each report is the attempt's total so far: earlier attempts' stay counted.
            s.model_calls += event.model_calls - s.attempt_model_calls
            s.cache_hits += event.cache_hits - s.attempt_cache_hits
            s.attempt_model_calls, s.attempt_cache_hits = event.model_calls, event.cache_hits
            if event.distinct_pairs is not None:
                s.distinct_pairs = event.distinct_pairs
            if event.devices:
                s.devices = list(event.devices)
        elif isinstance(event, events.PairsReady):
            if event.ready_for not in s.pairs_ready:
                s.pairs_ready.append(event.ready_for)
        elif isinstance(event, (events.Failed, events.Finished, events.Stopped)):
            self._end(s, event, now)
        s.updated_at = now
        return s

    @staticmethod
    def _end(s: ExperimentState, event: Event, now: float) -> None:
        s.pid, s.ended_at = None, now
        if isinstance(event, events.Failed):
            s.state, s.eta_s = "failed", None
            s.failure = FailureRecord.of(event)
        elif isinstance(event, events.Finished):
            s.state, s.eta_s, s.summary = "finished", 0.0, event.summary
            # Its last phase (evaluating) is over: left in place it reads as still going.
            s.phase, s.phase_done, s.phase_total = None, None, None
        else:
            s.state, s.eta_s = "stopped", None
            # The step it saved its checkpoint at and will resume from (see Paused).
            s.timesteps = event.step if event.step is not None else s.timesteps

    def mark_restarting(self, name: str) -> None:
        """A new attempt has been decided; the current one is on its way out."""
        self.states[name].state = "restarting"

    def dequeued(self, name: str, now: float) -> None:
        """`name` leaves the line (to start, or because it was stopped)."""
        state = self.state_of(name)
        if state.queued_at is not None:
            state.queued_s += max(0.0, now - state.queued_at)
            state.queued_at = None
        state.queue_position = None
        if state.state == "queued":
            state.state = "pending"

    def line_order(self, names: list[str]) -> None:
        """The places in line of the experiments waiting, first to last."""
        for position, name in enumerate(names, start=1):
            self.states[name].queue_position = position

    def stalled(self, name: str) -> None:
        """A watched log has been silent too long; its next report makes it running again."""
        state = self.state_of(name)
        if state.state == "running":
            state.state, state.eta_s = "stalled", None

    def gpu_memory_seen(self, name: str, used: int) -> None:
        state = self.states.get(name)
        if state is not None and (state.gpu_memory_peak is None or used > state.gpu_memory_peak):
            state.gpu_memory_peak = used

    def launched(self, name: str, pid: int | None) -> None:
        """A worker process for `name` exists (its Started event follows)."""
        self.states[name].pid = pid

    def finish_time(self, now: float | None = None) -> float | None:
        """When the whole run should be done (experiments run side by side): None while
        any unfinished experiment has no estimate."""
        now = time.time() if now is None else now
        etas = [s.eta_at(now) for s in self.states.values() if s.state not in ("finished", "failed", "stopped")]
        if any(eta is None for eta in etas):
            return None
        return now + max(etas, default=0.0)

    @property
    def all_done(self) -> bool:
        return all(s.terminal for s in self.states.values())


Subscriber = Callable[[Event], None]


class EventHub:
    """What every event source (the supervisor, the log watcher) offers a view: the
    experiments' states and a fan-out of events to subscribers."""

    def __init__(self, prior: dict[str, ExperimentState] | None = None) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._book = StateBook(prior)
        self._subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(event)` for every event from now on, on the source's own
        thread (keep it short); returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def states(self) -> dict[str, ExperimentState]:
        """A copy of every experiment's state."""
        with self._lock:
            return {name: ExperimentState.from_dict(s.to_dict()) for name, s in self._book.states.items()}

    def finish_time(self) -> float | None:
        with self._lock:
            return self._book.finish_time()

    def stage(self) -> ExperimentState | None:
        """A copy of the mask stage's state; None when the run has none."""
        with self._lock:
            stage = self._book.stage
            return None if stage is None else ExperimentState.from_dict(stage.to_dict())

    def mask_counts(self) -> dict[str, int | None]:
        with self._lock:
            return self._book.mask_counts()

    @property
    def done(self) -> bool:
        """Nothing more will happen unless asked."""
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `done`; False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self.done, timeout)

    def shutdown(self, grace_s: float = 10.0) -> None:
        """End the source; what it started gets `grace_s` to stop gracefully."""
        raise NotImplementedError

    def _deliver(self, events: list[Event]) -> None:
        """Call the subscribers, without the lock held, so that they may call back."""
        with self._lock:
            subscribers = list(self._subscribers)
        for event in events:
            for callback in subscribers:
                try:
                    callback(event)
                except BaseException:  # noqa: BLE001 - a broken view (even a SystemExit from a closed pipe) must not stop the source
                    log.exception("subscriber %r failed on %s", callback, event.type)
