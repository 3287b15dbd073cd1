"""Workers as Ray actors: one actor per attempt, on a private local Ray instance or on a
cluster, behind the same seam as processes on this machine.

Each attempt's actor (`ray_actor.AttemptActor`) asks for the CPUs and GPUs its
experiment's config names (`num_cpus`, `num_gpus`; fractions share a GPU), on the node
its `host` pins, and after an out-of-memory failure preferably not on the node where it
happened. Its events come up through one streaming generator (`run()`), gathered for a
fiftieth of a second (progress, which supersedes itself, for up to a tenth); control goes
down as method calls that run on a thread of their own while it works. One `ray.wait`
over every stream (and over the GPU samplers' streams) serves them all, on the
supervisor's drain thread.

How an attempt ends: a terminal event (Finished, Stopped, Failed), after which its actor
is killed at once (an actor holds its GPU until it exits); or an `ActorDiedError` (a
SIGKILL, a crash, its node lost, a kill by us), a Ray memory-monitor kill, or a stream
that ended without a terminal event, each of which this backend reports as a `Failed`
event of its own (Ray gives no exit code), except a kill the supervisor asked for,
which it explains itself. A request no node can ever satisfy is refused at launch, in
one line, instead of pending for ever; a launched attempt is `queued` until it starts.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sa2va_contract import events
from sa2va_contract.cluster import ShipPlan
from sa2va_contract.config import RayConfig
from sa2va_contract.files import read_log_tail
from sa2va_contract.gpus import GpuSnapshot
from sa2va_contract.shipping import FileChunk, FolderReceiver, seed_files
from sa2va_contract.worker import WorkerSpec
from sa2va_tui.placement.base import Arrival, Exit, LaunchError
from sa2va_tui.placement.ray_gpus import NodeGpus
from sa2va_tui.placement.ray_placement import Node, infeasible, nodes_of, resource_request, where_to
from sa2va_tui.placement.ray_session import RaySession

log = logging.getLogger(__name__)

#: How long one `ray.wait` blocks before `wake()` is looked at.
WAKE_SLICE_S = 0.05
#: How often the nodes are read again (placement, GPU samplers, queued attempts).
NODES_EVERY_S = 5.0
#: ship: where a node's attempts write when `ray.scratch_dir` is unset.
DEFAULT_SCRATCH = Path("/tmp/sa2va-scratch")
TERMINAL = (events.Finished, events.Stopped, events.Failed)


@dataclass(eq=False)
class RayWorker:
    """One attempt's actor, as the backend knows it."""

    spec: WorkerSpec
    actor: Any
    stream: Any
    request: dict[str, float]
    receiver: FolderReceiver | None = None
    node_id: str | None = None
    host: str | None = None
    worker_pid: int | None = None
    started: bool = False
    ended: bool = False
    killed_by_us: bool = False

    @property
    def pid(self) -> int | None:
        return self.worker_pid


class RayBackend:
    """Attempts as Ray actors; GPUs as every GPU node's NVML reports them."""

    def __init__(self, config: RayConfig, run_dir: Path, nvml: Any = None, gpu_period_s: float = 1.0) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.session = RaySession(config, run_dir)
        started = time.perf_counter()
        self.session.start()
        self.ray = self.session.ray
        from sa2va_tui.placement import ray_actor

        self._actors = ray_actor
        self._lock = threading.Lock()
        self._woken = threading.Event()
        self._arrivals: list[Arrival] = []
        self._workers: list[RayWorker] = []
        #: Experiment -> the node of its last out-of-memory failure.
        self._avoid: dict[str, str] = {}
        self._nodes: list[Node] = []
        self._nodes_read_at = 0.0
        self._queued_checked_at = 0.0
        self._gpus = NodeGpus(self.ray, ray_actor.GpuSamplerActor, nvml, gpu_period_s)
        self.nodes(refresh=True)
        #: Seconds `ray.init` and the first look at the cluster took (benchmarks report it).
        self.startup_s = time.perf_counter() - started
        log.info("ray backend ready in %.2f s: %d nodes", self.startup_s, len(self._nodes))

    def nodes(self, refresh: bool = False) -> list[Node]:
        """The cluster's nodes, read again when asked or when the last read is old (a
        GPU sampler then starts on a new GPU node, and goes with a node that left)."""
        if refresh or time.monotonic() - self._nodes_read_at > NODES_EVERY_S:
            self._nodes = nodes_of(self.ray.nodes())
            self._nodes_read_at = time.monotonic()
            self._gpus.sync(self._nodes)
        return self._nodes

    # --- the seam --------------------------------------------------------------------

    def launch(self, spec: WorkerSpec) -> RayWorker:
        experiment = spec.config.experiments()[spec.name]
        nodes = self.nodes(refresh=True)
        request = resource_request(experiment, sum(n.gpus for n in nodes if n.alive))
        where = where_to(experiment, nodes, self._avoid.get(spec.name))
        problem = infeasible(request, where, nodes)
        if problem:
            raise LaunchError(problem)
        # (An actor without GPUs hides them itself: `AttemptRunner` sets CUDA_VISIBLE_DEVICES.)
        options: dict[str, Any] = {"num_cpus": request["CPU"], "num_gpus": request["GPU"], **where.options}
        ship = self._ship_plan(spec) if self.config.storage == "ship" else None
        try:
            actor = self._actors.AttemptActor.options(**options).remote(spec, ship)
            stream = actor.run.remote()
        except (ValueError, TypeError, self.ray.exceptions.RayError) as err:
            raise LaunchError(f"Ray refused the attempt: {str(err).splitlines()[0]}") from None
        worker = RayWorker(spec, actor, stream, request, FolderReceiver(spec.exp_dir) if ship else None)
        with self._lock:
            self._workers.append(worker)
            self._arrivals.append((worker, events.Queued(spec.name, resources=request, where=where.words)))
        return worker

    def _ship_plan(self, spec: WorkerSpec) -> ShipPlan:
        root = self.config.scratch_dir or DEFAULT_SCRATCH
        return ShipPlan(scratch_dir=root / self.run_dir.name / spec.name / f"attempt-{spec.attempt}",
                        seed=seed_files(spec.exp_dir, spec.resume_from) if spec.attempt > 1 else [],
                        mask_cache=root / "mask_cache")

    def wait(self, workers: list[RayWorker], timeout: float) -> list[Arrival]:
        deadline = time.monotonic() + timeout
        arrivals = self._synthetic(workers)
        if arrivals:
            return arrivals
        streams = {id(w.stream): w for w in workers if not w.ended}
        samplers = self._gpus.streams()
        waitables = [w.stream for w in streams.values()] + [stream for _, stream in samplers.values()]
        ready: list[Any] = []
        while not ready:
            left = deadline - time.monotonic()
            if left <= 0 or self._woken.is_set():
                break
            if waitables:
                ready, rest = self.ray.wait(waitables, num_returns=1, timeout=min(WAKE_SLICE_S, left))
                if ready and rest:
                    more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
                    ready += more
            else:
                self._woken.wait(min(WAKE_SLICE_S, left))
        self._woken.clear()
        for item in ready:
            if id(item) in streams:
                arrivals += self._take(streams[id(item)])
            elif id(item) in samplers:
                self._gpus.take(*samplers[id(item)])
        return arrivals + self._check_queued(workers)

    def _synthetic(self, workers: list[RayWorker]) -> list[Arrival]:
        """Events this backend made for `workers` (a launch's Queued), in order."""
        with self._lock:
            asked = set(map(id, workers))
            mine = [a for a in self._arrivals if id(a[0]) in asked]
            self._arrivals = [a for a in self._arrivals if id(a[0]) not in asked]
            return mine

    def _take(self, worker: RayWorker) -> list[Arrival]:
        """The next batch of one ready stream, or how the attempt ended."""
        ray = self.ray
        try:
            batch = ray.get(next(worker.stream))
        except StopIteration:
            return self._lost(worker, "error", "its event stream ended without a report")
        except ray.exceptions.OutOfMemoryError as err:
            return self._lost(worker, "killed", f"killed by Ray's memory monitor (host memory): {_first_line(err)}")
        except ray.exceptions.RayActorError as err:
            if worker.killed_by_us:
                return self._end(worker, Exit(None))
            return self._lost(worker, "killed", _death(err, worker.started))
        except ray.exceptions.RayError as err:
            return self._lost(worker, "error", f"its actor failed: {_first_line(err)}")
        arrivals: list[Arrival] = []
        for item in batch:
            if isinstance(item, dict):
                worker.node_id, worker.worker_pid = item["node_id"], item["pid"]
            elif isinstance(item, FileChunk):
                if worker.receiver is not None:
                    worker.receiver.apply(item)
            else:
                arrivals += self._event(worker, item)
        return arrivals

    def _event(self, worker: RayWorker, event: events.Event) -> list[Arrival]:
        if isinstance(event, events.Started):
            worker.started, worker.host = True, event.host
        if isinstance(event, events.Failed) and event.kind == "oom" and worker.node_id:
            self._avoid[worker.spec.name] = worker.node_id
        if isinstance(event, TERMINAL):
            return [(worker, event), *self._end(worker, Exit(1 if isinstance(event, events.Failed) else 0))]
        return [(worker, event)]

    def _lost(self, worker: RayWorker, kind: str, message: str) -> list[Arrival]:
        """An attempt that ended without saying how: reported here, since Ray gives no exit code."""
        spec = worker.spec
        # With ship too: the run folder's copy of its log is at most a second behind.
        failed = events.Failed(spec.name, kind=kind, message=message, log_tail=read_log_tail(spec.log_path))
        return [(worker, failed), *self._end(worker, Exit(None))]

    def _end(self, worker: RayWorker, exit: Exit) -> list[Arrival]:
        worker.ended = True
        self.ray.kill(worker.actor, no_restart=True)
        if worker.receiver is not None:
            worker.receiver.close()
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
        return [(worker, exit)]

    def _check_queued(self, workers: list[RayWorker]) -> list[Arrival]:
        """A queued attempt that a node's loss made impossible fails instead of waiting for ever."""
        queued = [w for w in workers if not w.started and not w.ended]
        if not queued or time.monotonic() - self._queued_checked_at < NODES_EVERY_S:
            return []
        self._queued_checked_at = time.monotonic()
        nodes = self.nodes(refresh=True)
        arrivals: list[Arrival] = []
        for worker in queued:
            experiment = worker.spec.config.experiments()[worker.spec.name]
            problem = infeasible(worker.request, where_to(experiment, nodes, self._avoid.get(worker.spec.name)), nodes)
            if problem:
                arrivals += self._lost(worker, "error", problem)
        return arrivals

    def send(self, worker: RayWorker, message: events.ControlMessage) -> bool:
        if worker.ended:
            return False
        worker.actor.control.remote(message)
        return True

    def kill(self, worker: RayWorker) -> None:
        worker.killed_by_us = True
        self.ray.kill(worker.actor, no_restart=True)

    def wake(self) -> None:
        self._woken.set()

    def read_gpus(self, workers: dict[int, str]) -> GpuSnapshot:
        """Every GPU node's latest reading; `workers` is not needed: this backend knows
        each attempt's host and pid (a pid alone is ambiguous on a cluster)."""
        with self._lock:
            ours = {(w.host, w.worker_pid): w.spec.name for w in self._workers if w.host and w.worker_pid}
        return self._gpus.snapshot(self.nodes(), ours)

    def close(self) -> None:
        with self._lock:
            left, self._workers = self._workers, []
        for worker in left:
            self.ray.kill(worker.actor, no_restart=True)
        self._gpus.close()
        self.session.close()


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _death(err: BaseException, started: bool) -> str:
    """Why an actor died, from Ray's message (its last informative line)."""
    text = str(err)
    if "actor_init_failed" in text or "__init__" in text and not started:
        return f"its actor could not start: {_first_line(err)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "died" in line or "killed" in line or "exit" in line.lower()),
                  lines[-1] if lines else type(err).__name__)
    return f"the worker died: {reason}"
