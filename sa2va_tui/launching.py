"""When and where each attempt of an experiment starts.

Experiments wait in line until a device has room: at most `run.max_parallel` at once;
on the CPU one worker per core; on a GPU, as much free memory as the experiment needs
(its `gpu_memory_gb`, else the peak its first attempt reached, else a GPU of its own).
The recovery policy plans each attempt (batch size, checkpoint); this module finds its
device and starts it through the placement backend. A worker that ends frees its
place, and the first in line that fits starts; an automatic restart goes to the head
of the line rather than over-filling a device.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from sa2va_contract import events
from sa2va_contract.config import Config, ExperimentConfig
from sa2va_contract.events import Event
from sa2va_contract.files import read_log_tail, weights_bytes
from sa2va_contract.gpus import GpuInfo, GpuSnapshot, choose_gpu
from sa2va_contract.events import MASK_STAGE
from sa2va_contract.kinds import MASK_STAGE_ENTRY, kind_of, resolve_entry
from sa2va_contract.recovery import START, RestartPlan, classify_exit, plan_restart
from sa2va_contract.worker import WorkerSpec, usable_cores
from sa2va_tui.gpus import GpuWatch
from sa2va_tui.placement import LaunchError, PlacementBackend, WorkerHandle
from sa2va_tui.runstate import StateBook
from sa2va_tui.runstore import RunStore

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass
class Owed:
    """A new attempt owed to an experiment: why, and either the plan a person confirmed
    or the batch size recovery chose."""

    reason: str
    batch_size: int | None = None
    plan: RestartPlan | None = None


@dataclass(eq=False)
class Attempt:
    """One attempt of one experiment: the backend's handle and what the policy tracks."""

    handle: WorkerHandle
    batch_size: int
    #: GPU memory (bytes) it was given room for; None: a GPU of its own (or the CPU).
    memory_need: int | None = None
    #: The terminal event (Finished, Stopped, Failed) it sent, if any.
    outcome: Event | None = None
    #: After a stop request: the grace it was given, and when it runs out.
    grace_s: float | None = None
    kill_at: float | None = None
    killed_by_us: bool = False

    @property
    def name(self) -> str:
        return self.handle.spec.name

    @property
    def gpus(self) -> tuple[int, ...]:
        spec = self.handle.spec
        return () if spec.gpu is None else (spec.gpu, *spec.extra_gpus)

    def stop_by(self, grace_s: float) -> None:
        """Asked to stop: the earliest deadline of all requests holds."""
        kill_at = time.monotonic() + grace_s
        if self.kill_at is None or kill_at < self.kill_at:
            self.grace_s, self.kill_at = grace_s, kill_at

    @property
    def overdue(self) -> bool:
        """Asked to stop, not stopped within its grace, not killed yet."""
        return self.kill_at is not None and time.monotonic() > self.kill_at and not self.killed_by_us

    def unreported_failure(self, exit_code: int | None, step: int) -> events.Failed:
        """The failure of an attempt that ended without saying how."""
        kind, message = classify_exit(exit_code, self.killed_by_us, self.grace_s)
        spec = self.handle.spec
        return events.Failed(self.name, kind=kind, message=message, exit_code=exit_code, step=step,
                             batch_size=self.batch_size, gpu=spec.gpu, log_tail=read_log_tail(spec.log_path))


# --- room ------------------------------------------------------------------------------


class NoDevice(Exception):
    """The experiment can never run here; `str()` says why in one line."""


@dataclass(frozen=True)
class Occupant:
    """A worker of ours as room is counted: the GPUs it holds (none: the CPU), what it
    was given room for, and whether NVML lists it yet (until it does, its memory still
    shows as free)."""

    gpus: tuple[int, ...]
    memory_need: int | None
    listed: bool = True
    #: Waiting for the mask stage's pairs: it uses no core yet, so on the CPU it holds
    #: no slot (the experiment that trains longest need not wait behind one that waits).
    idle: bool = False


def wants_gpu(experiment: ExperimentConfig, gpus: GpuSnapshot) -> bool:
    return experiment.device == "cuda" or (experiment.device == "auto" and gpus.available and bool(gpus.gpus))


def find_room(experiment: ExperimentConfig, memory_need: int | None, occupants: Iterable[Occupant], gpus: GpuSnapshot,
              max_parallel: int | None, cores: int, every_gpu: bool = False) -> tuple[bool, tuple[int, ...]]:
    """(whether there is room now, the GPUs it gets: none for the CPU). `every_gpu`: it
    holds every GPU whole (a model split over all of them). Raises NoDevice when the
    experiment can never run here."""
    occupants = list(occupants)
    if gpus.assigned_by:  # a cluster scheduler (Ray) places it and queues it itself
        return max_parallel is None or len(occupants) < max_parallel, ()
    if experiment.device == "cuda" and not (gpus.available and gpus.gpus):
        raise NoDevice(f"device is cuda but {gpus.message}")
    if experiment.gpu is not None and gpus.available and experiment.gpu not in {g.index for g in gpus.gpus}:
        raise NoDevice(f"gpu: GPU {experiment.gpu} asked for, but only {sorted(g.index for g in gpus.gpus)} exist")
    if max_parallel is not None and len(occupants) >= max_parallel:
        return False, ()
    if not wants_gpu(experiment, gpus):
        return sum(not o.gpus and not o.idle for o in occupants) < cores, ()
    if every_gpu:
        free = not any(o.gpus for o in occupants)
        return free, tuple(g.index for g in gpus.gpus) if free else ()
    fitting = [g for g in gpus.gpus if (experiment.gpu is None or g.index == experiment.gpu)
               and _fits(g, memory_need, [o for o in occupants if g.index in o.gpus])]
    if not fitting:
        return False, ()
    placed = Counter(g for o in occupants if not o.listed for g in o.gpus)
    return True, (choose_gpu(GpuSnapshot(True, gpus.message, fitting), None, placed),)


def _fits(gpu: GpuInfo, memory_need: int | None, ours: list[Occupant]) -> bool:
    if memory_need is None or any(o.memory_need is None for o in ours):
        return not ours  # a GPU of its own, or one that another of ours holds whole
    free = gpu.memory_free
    if free is None:
        return not ours
    arriving = sum(o.memory_need or 0 for o in ours if not o.listed)
    return free - arriving >= memory_need


# --- the line and the launch -----------------------------------------------------------


@dataclass
class Waiting:
    name: str
    owed: Owed | None
    since: float = field(default_factory=time.time)
    #: Whether its wait was recorded (a Queued event): only once it has to wait.
    announced: bool = False


class Launcher:
    """The line of experiments waiting for room, and the start of each attempt. Its
    owner (the supervisor) holds its lock around every call."""

    def __init__(self, config: Config, store: RunStore, backend: PlacementBackend, book: StateBook, gpus: GpuWatch,
                 attempts: dict[str, Attempt], dispatch: Callable[[Event], None],
                 entry_points: dict[str, str] | None = None, cores: int | None = None,
                 masks_pending: Callable[[], bool] = lambda: False) -> None:
        """`masks_pending`: whether the run's mask stage is still filling the cache (an
        attempt started then waits for its pairs rather than computing them)."""
        self.config = config
        self._masks_pending = masks_pending
        self.experiments = config.experiments()
        self._store, self._backend, self._book, self._gpus = store, backend, book, gpus
        self._attempts, self._dispatch, self._entry_points = attempts, dispatch, entry_points
        self._cores = cores or usable_cores()  # one CPU worker each
        self.line: list[Waiting] = []

    def request(self, name: str, owed: Owed | None = None, first: bool = False) -> None:
        """Put an attempt of `name` in line (at its head for an automatic restart)."""
        self.withdraw(name)
        waiting = Waiting(name, owed)
        self.line.insert(0, waiting) if first else self.line.append(waiting)

    def withdraw(self, name: str) -> bool:
        """Take `name` out of the line (its wait ends now); whether it was in it."""
        before = len(self.line)
        self.line = [w for w in self.line if w.name != name]
        if len(self.line) == before:
            return False
        self._book.dequeued(name, time.time())
        self._book.line_order([w.name for w in self.line])
        return True

    def position(self, name: str) -> int | None:
        """1 for the first in line; None when not waiting."""
        return next((i + 1 for i, w in enumerate(self.line) if w.name == name), None)

    def schedule(self) -> None:
        """Start every waiting attempt that has room now, in order of the line; record
        the wait of those that must wait."""
        if not self.line:
            return
        snapshot, occupants = self._view()
        for waiting in list(self.line):
            experiment = self.experiments[waiting.name]
            planned = waiting.owed.plan if waiting.owed else None
            if planned is not None and planned.gpu is not None:
                experiment = experiment.model_copy(update={"gpu": planned.gpu})  # the device the dialog showed
            try:
                room, held = find_room(experiment, self._need(waiting.name), occupants, snapshot,
                                       self.config.run.max_parallel, self._cores, self._every_gpu)
            except NoDevice as err:
                self.withdraw(waiting.name)
                self._dispatch(events.Failed(waiting.name, kind="startup", message=str(err)))
                continue
            if room:
                self.withdraw(waiting.name)
                if self._launch(waiting, held):
                    occupants.append(Occupant(held, self._need(waiting.name), listed=False,
                                              idle=self._waits_for_pairs(waiting.name)))
        for waiting in self.line:
            if not waiting.announced:
                waiting.announced = True
                self._dispatch(events.Queued(waiting.name, position=self.position(waiting.name) or 1,
                                             time=waiting.since))
        self._book.line_order([w.name for w in self.line])

    def plan(self, name: str, reason: str, gpu: int | None, batch_size: int | None = None) -> RestartPlan:
        """The recovery policy's plan for the next attempt of `name`, on `gpu` (None: the CPU)."""
        state = self._book.states[name]
        failed = state.failure.kind if state.failure and state.state == "failed" else None
        return plan_restart(self.experiments[name], reason, attempts=state.attempts, last_batch_size=state.batch_size,
                            last_gpu=state.gpu, last_failure=failed, checkpoint=state.last_checkpoint,
                            checkpoint_step=state.checkpoint_step, recovery=self.config.recovery, gpu=gpu,
                            batch_size=batch_size, placed_by=self._gpus.snapshot.assigned_by)

    def plan_now(self, name: str, reason: str) -> RestartPlan:
        """The plan for an attempt of `name` on the device it would find room on now
        (the freest that fits, the line and `run.max_parallel` aside)."""
        snapshot, occupants = self._view()
        try:
            held = find_room(self.experiments[name], self._need(name), occupants, snapshot, None, self._cores,
                             self._every_gpu)[1]
        except NoDevice:
            held = ()
        return self.plan(name, reason, held[0] if held else None)

    def occupants(self) -> list[tuple[int | None, str, int | None]]:
        """(pid, experiment, GPU) of every worker of ours."""
        return [(a.handle.pid, name, a.handle.spec.gpu) for name, a in self._attempts.items()]

    def _view(self) -> tuple[GpuSnapshot, list[Occupant]]:
        snapshot, _ = self._gpus.view(self.occupants())
        listed = {p.pid for g in snapshot.gpus for p in g.processes}
        return snapshot, [Occupant(a.gpus, a.memory_need, a.handle.pid in listed, idle=self._waits_for_pairs(name))
                          for name, a in self._attempts.items()]

    def _waits_for_pairs(self, name: str) -> bool:
        """Whether the attempt of `name` is waiting for the mask stage to compute its pairs."""
        attempt, stage = self._attempts.get(name), self._book.stage
        return (attempt is not None and attempt.handle.spec.wait_for_masks and self._masks_pending()
                and (stage is None or name not in stage.pairs_ready))

    def _need(self, name: str) -> int | None:
        """GPU memory (bytes) an attempt of `name` needs room for; None: unknown."""
        configured = self.experiments[name].gpu_memory_gb
        if configured is not None:
            return int(configured * GIB)
        return self._book.states[name].gpu_memory_peak

    @property
    def _every_gpu(self) -> bool:
        """A Sa2VA checkpoint laid out over several GPUs holds every GPU its worker sees."""
        return self.config.backend.kind == "sa2va" and self.config.backend.device_map == "split"

    def _launch(self, waiting: Waiting, held: tuple[int, ...]) -> bool:
        name, owed = waiting.name, waiting.owed
        experiment = self.experiments[name]
        gpu = held[0] if held else None
        plan = (owed.plan if owed else None) or self.plan(name, owed.reason if owed else START, gpu,
                                                          owed.batch_size if owed else None)
        if owed is not None:
            self._dispatch(events.Restarting(name, reason=plan.reason, attempt=plan.attempt, changes=plan.changes))
        try:
            handle = self._backend.launch(worker_spec(name, experiment, plan, self.config, self._store,
                                                      resolve_entry(experiment.kind, self._entry_points),
                                                      extra_gpus=held[1:] if plan.gpu == gpu else (),
                                                      wait_for_masks=self._masks_pending()))
        except LaunchError as err:
            self._dispatch(events.Failed(name, kind="error", message=str(err)))
            return False
        self._attempts[name] = Attempt(handle=handle, batch_size=plan.batch_size, memory_need=self._need(name))
        self._book.launched(name, handle.pid)
        return True


def worker_spec(name: str, experiment: ExperimentConfig, plan: RestartPlan, config: Config, store: RunStore,
                entry: str, extra_gpus: tuple[int, ...] = (), wait_for_masks: bool = False) -> WorkerSpec:
    """What the worker of an attempt carried out as `plan` needs (on `extra_gpus` too)."""
    configured = kind_of(experiment).batch_size(experiment)
    return WorkerSpec(
        name=name, entry=entry, config=config, exp_dir=store.exp_dir(name), log_path=store.log_path(name),
        gpu=plan.gpu, supervisor_pid=os.getpid(), attempt=plan.attempt,
        resume_from=Path(plan.resume_from) if plan.resume_from else None,
        batch_size_override=plan.batch_size if plan.batch_size != configured else None, extra_gpus=extra_gpus,
        wait_for_masks=wait_for_masks,
    )


def stage_spec(config: Config, store: RunStore, needs_of: list[str], replica_gpus: tuple[int, ...] = (),
               split_over: tuple[int, ...] = ()) -> WorkerSpec:
    """The worker of the run's mask stage: the pairs of `needs_of`, one segmenter replica
    on each GPU of `replica_gpus`, or one model laid over the GPUs `split_over` (neither:
    the CPU cores, for the embedded model)."""
    visible = tuple(dict.fromkeys(replica_gpus or split_over))
    return WorkerSpec(name=MASK_STAGE, entry=MASK_STAGE_ENTRY, config=config, exp_dir=store.exp_dir(MASK_STAGE),
                      log_path=store.log_path(MASK_STAGE), gpu=visible[0] if visible else None,
                      extra_gpus=visible[1:], supervisor_pid=os.getpid(), needs_of=tuple(needs_of),
                      replica_gpus=tuple(replica_gpus))


#: Beside one Sa2VA replica's weights (bf16, as loaded): a share for activations and
#: the buffers of one generation and one SAM2 decoding, and a fixed margin. An estimate
#: (it was not measured on a GPU here); `backend.replica_memory_gb` replaces it.
REPLICA_SHARE, REPLICA_MARGIN = 0.25, 2 * GIB


def replica_memory_need(config: Config) -> int:
    """Bytes of GPU memory one Sa2VA replica of the mask stage is given room for; 0 when
    the checkpoint folder cannot be read (its worker then says why, in its own words)."""
    if config.backend.replica_memory_gb is not None:
        return int(config.backend.replica_memory_gb * GIB)
    try:
        weights = weights_bytes(Path(str(config.backend.model_path)).expanduser())
    except OSError:
        return 0
    return int(weights * (1 + REPLICA_SHARE) + REPLICA_MARGIN)


def stage_replica_gpus(gpus: GpuSnapshot, need: int, most: int | None = None) -> tuple[int, ...]:
    """The GPU of each Sa2VA replica of the mask stage: as many on each GPU as its free
    memory holds at `need` bytes each, dealt out a GPU at a time (so that `most` spreads
    them over the GPUs), grouped by GPU, freest first. When no GPU has room on paper (or
    none reports its memory), one replica on the freest: as one experiment's model would
    be placed."""
    freest = sorted(gpus.gpus, key=lambda g: -(g.memory_free or 0))
    room = {g.index: int(g.memory_free // need) if g.memory_free is not None and need > 0 else 0 for g in freest}
    dealt: list[int] = []
    while any(room.values()) and (most is None or len(dealt) < most):
        for index in [i for i, left in room.items() if left]:
            if most is not None and len(dealt) >= most:
                break
            dealt.append(index)
            room[index] -= 1
    if not dealt and freest:
        dealt = [freest[0].index]
    order = {g.index: rank for rank, g in enumerate(freest)}
    return tuple(sorted(dealt, key=order.__getitem__))


def mask_stage_gpus(config: Config, gpus: GpuSnapshot) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the GPU of each replica, the GPUs one split model spans) of the run's mask stage:
    on Sa2VA replicas where they fit, or with `device_map: split` one model over every
    GPU (a split model cannot be copied); the embedded model runs on the CPU cores."""
    if config.backend.kind != "sa2va":
        return (), ()
    if config.backend.device_map == "split":
        return (), tuple(g.index for g in gpus.gpus)
    return stage_replica_gpus(gpus, replica_memory_need(config), config.backend.max_replicas), ()


def stage_refusal(config: Config, gpus: GpuSnapshot) -> str | None:
    """Why this run fills the cache per experiment instead of in a mask stage, or None.
    On Ray each node has its own disk: the stage's masks would not reach the others."""
    if config.run.backend == "ray":
        return "the ray backend: each experiment fills the mask cache on its own node"
    if config.backend.kind == "sa2va" and not (gpus.available and gpus.gpus):
        return f"Sa2VA needs a GPU for the mask stage, but {gpus.message or 'none is visible'}"
    return None


def launch_mask_stage(config: Config, store: RunStore, backend: PlacementBackend, gpus: GpuSnapshot,
                      needs_of: list[str]) -> "Attempt | None":
    """The run's mask stage for the pairs of `needs_of`, launched (on Sa2VA with one
    replica on every GPU that has room for one, several where several fit); None when
    this run cannot have one: its experiments then fill the cache themselves, as each
    does alone."""
    if config.backend.kind == "sa2va" and not gpus.gpus:
        gpus = backend.read_gpus({})
    refusal = stage_refusal(config, gpus)
    if refusal:
        log.info("no mask stage: %s", refusal)
        return None
    replicas, split_over = mask_stage_gpus(config, gpus)
    try:
        handle = backend.launch(stage_spec(config, store, needs_of, replicas, split_over))
    except LaunchError as err:
        log.warning("no mask stage: %s", err)
        return None
    return Attempt(handle=handle, batch_size=config.backend.batch_size)
