"""The run's mask stage: every distinct (image, prompt) pair the run's experiments
read, computed once, by a pool of segmenter replicas, into the shared mask cache.

`run(ctx)` is a worker entry point like an experiment's: the supervisor starts it in a
worker process of its own (named `events.MASK_STAGE`) beside the experiments, which
wait for their own pairs (`await_pairs`) rather than compute them. The pairs come from
`experiments.mask_needs`, the one place that says what each experiment reads.

Order: the experiment with the fewest pairs still to compute goes first, then the
next fewest, so the first experiment is unblocked as soon as possible. Pairs already
in the cache are not computed (a warm cache ends the stage at once, with no model
call). Each replica takes a batch, computes it and writes every entry to a temporary
name and renames it; pause and stop are obeyed between batches, so a stop leaves no
half-written file and costs at most one batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from experiments.harness import StopRequested, WorkerContext
from experiments.mask_needs import Pairs, Splits, all_pairs, pairs_of
from sa2va_contract import events
from sa2va_contract.worker import usable_cores

log = logging.getLogger(__name__)

#: The stage's entry point, as the supervisor names it.
ENTRY = "experiments.mask_stage:run"
#: How often the stage reports progress and looks at its control flags.
TICK_S = 0.1
#: How often a waiting experiment looks at its control flags, and at its pairs on disk.
POLL_S = 0.25
LOOK_S = 3.0
#: How often the stage reports its model calls so far (each report is recorded).
WORK_REPORT_S = 5.0
#: How often a waiting experiment reports how many of its pairs are in.
WAIT_REPORT_S = 2.0
#: How much nicer than the rest of the run the stage's replica threads are on a CPU
#: (see `ReplicaPool`).
CPU_REPLICA_NICENESS = 10


@dataclass
class StageContext(WorkerContext):
    """The stage's worker context: the experiments it computes pairs for, and the
    backend's batch size as its own (what `Started` shows)."""

    needs_of: tuple[str, ...] = ()
    #: Sa2VA: the GPU of each replica (numbered as NVML does; see `WorkerSpec`).
    replica_gpus: tuple[int, ...] = ()

    @property
    def batch_size(self) -> int:
        return self.config.backend.batch_size


def stage_context(config, **kwargs) -> StageContext:
    """A context for the stage, its device that of the backend (the embedded model runs
    on the CPU, Sa2VA on the GPU the stage was given)."""
    from sa2va_contract.config import ExperimentBase

    device = "cpu" if config.backend.kind == "embedded" else "auto"
    return StageContext(name=events.MASK_STAGE, config=config, experiment=ExperimentBase(device=device), **kwargs)


@dataclass
class Plan:
    """What the stage computes, in order, and for whom."""

    #: The experiments, in the order their pairs are computed.
    order: list[str]
    #: Distinct pairs the experiments read, cached or not.
    distinct_pairs: int
    #: Pairs to compute, in order (index into the pairs of `sources`).
    todo_images: list = field(default_factory=list)
    todo_prompts: list[str] = field(default_factory=list)
    todo_keys: list[str] = field(default_factory=list)
    #: Per experiment: its keys still to compute.
    waiting: dict[str, set[str]] = field(default_factory=dict)
    #: Per experiment: its distinct pairs.
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def cached(self) -> int:
        return self.distinct_pairs - len(self.todo_keys)


def plan(cache, needs: dict[str, Pairs]) -> Plan:
    """The union of `needs` (pairs by experiment), less what the cache holds, in the
    order that unblocks an experiment soonest: fewest pairs left to compute first."""
    distinct: dict[str, tuple[Any, str]] = {}
    keys_of: dict[str, list[str]] = {}
    for name, pairs in needs.items():
        keys = []
        for image, prompt in zip(pairs.images, pairs.prompts):
            key = cache._key(image, prompt)
            keys.append(key)
            distinct.setdefault(key, (image, prompt))
        keys_of[name] = list(dict.fromkeys(keys))
    missing = {key for key, (image, prompt) in distinct.items() if not cache.on_disk(image, prompt)}
    result = Plan(order=[], distinct_pairs=len(distinct))
    left = {name: [k for k in keys if k in missing] for name, keys in keys_of.items()}
    result.waiting = {name: set(keys) for name, keys in left.items()}
    result.sizes = {name: len(keys) for name, keys in keys_of.items()}
    scheduled: set[str] = set()
    while left:
        name = min(left, key=lambda n: (len([k for k in left[n] if k not in scheduled]), list(needs).index(n)))
        result.order.append(name)
        for key in left.pop(name):
            if key not in scheduled:
                scheduled.add(key)
                image, prompt = distinct[key]
                result.todo_images.append(image)
                result.todo_prompts.append(prompt)
                result.todo_keys.append(key)
    return result


class ReplicaPool:
    """Segmenter replicas, one thread each, taking batches from one line in order.
    Torch runs its kernels without the interpreter lock, so on a CPU N replicas of one
    thread each use N cores (see `benchmarks run`, which measures both layouts).

    On a CPU the replica threads run at `niceness` (`CPU_REPLICA_NICENESS`): an
    experiment that is training is what the run waits for, so it goes first, and the
    stage takes the cores it leaves. The stage's own thread keeps its priority, so a
    pause or stop is heard at once. On the default run this cut the cold run from 187 s
    to 168 s (one run each, `benchmarks run`'s cold run): reward_net's training no
    longer shared the cores with pairs only prompt_rl waits for."""

    def __init__(self, cache, replicas: Sequence, plan: Plan, batch_size: int, control, niceness: int = 0) -> None:
        self.cache, self.replicas, self.plan, self.control = cache, list(replicas), plan, control
        self.batch_size = batch_size
        self.niceness = niceness
        self._next = 0
        self._lock = threading.Lock()
        self.done_keys: list[str] = []
        self.error: BaseException | None = None
        self.fastest_per_pair: float | None = None
        self._threads = [threading.Thread(target=self._work, args=(r,), name=f"replica-{i}", daemon=True)
                         for i, r in enumerate(self.replicas)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def _take(self) -> tuple[int, int] | None:
        with self._lock:
            if self._next >= len(self.plan.todo_keys) or self.error is not None:
                return None
            start = self._next
            self._next = min(len(self.plan.todo_keys), start + self.batch_size)
            return start, self._next

    def _work(self, replica) -> None:
        if self.niceness:
            try:  # this thread only: Linux takes a thread's id for PRIO_PROCESS
                thread = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + self.niceness))
            except (OSError, AttributeError):
                log.info("mask stage: could not lower the replicas' priority; they share the cores evenly")
        try:
            while not self.control.stopping:
                if self.control.paused:
                    time.sleep(TICK_S)
                    continue
                span = self._take()
                if span is None:
                    return
                start, end = span
                began = time.perf_counter()
                self.cache.fill(self.plan.todo_images[start:end], self.plan.todo_prompts[start:end], replica)
                per_pair = (time.perf_counter() - began) / (end - start)
                with self._lock:
                    self.done_keys.extend(self.plan.todo_keys[start:end])
                    if self.fastest_per_pair is None or per_pair < self.fastest_per_pair:
                        self.fastest_per_pair = per_pair
        except BaseException as err:  # noqa: BLE001 - raised again by the stage's own thread
            with self._lock:
                self.error = err


def replicas_for(config, ctx: WorkerContext, most: int) -> tuple[list, list[str]]:
    """At most `most` segmenter replicas for the stage, and the devices they run on, in
    words. The embedded model: one replica of one torch thread per core. Sa2VA: one on
    each GPU of `ctx.replica_gpus` (the supervisor gave as many to a GPU as fit in its
    memory), each loaded on its own device; without a layout (the stage run alone),
    one on the worker's GPU."""
    from collections import Counter

    from experiments.backends import make_segmenter

    if config.backend.kind == "embedded":
        import torch

        torch.set_num_threads(1)
        cores = min(most, usable_cores())
        return [make_segmenter(config, "cpu") for _ in range(cores)], [f"cpu ×{cores}"]
    layout = tuple(getattr(ctx, "replica_gpus", ()))[:most]
    if not layout:
        return [make_segmenter(config, ctx.device)], [f"gpu {ctx.gpu}" if ctx.gpu is not None else ctx.device]
    from experiments.backends.sa2va import load_sa2va

    # The worker sees its GPUs renumbered from 0, in the order CUDA_VISIBLE_DEVICES lists them.
    local = {gpu: i for i, gpu in enumerate(dict.fromkeys(layout))}
    replicas = [load_sa2va(config.backend, local[gpu]) for gpu in layout]
    return replicas, [f"gpu {gpu} ×{n}" if n > 1 else f"gpu {gpu}" for gpu, n in Counter(layout).items()]


def run(ctx: WorkerContext) -> dict[str, Any]:
    from experiments.backends import make_cached_segmenter

    config = ctx.config
    names = list(getattr(ctx, "needs_of", ()) or config.experiments())  # alone: every enabled one
    ctx.phase("loading_model")
    splits = Splits(config)
    needs = {}
    for name in names:
        try:
            needs[name] = all_pairs(pairs_of(config, name, splits))
        except ValueError as err:  # the experiment fails on it in its own worker, in its own words
            log.warning("no pairs for %s: %s", name, err)
    cache = make_cached_segmenter(config, "cpu") if config.backend.kind == "embedded" else None
    if cache is None:
        cache = make_cached_segmenter(config, ctx.device)  # lazy: loads only if a pair is missing
    work = plan(cache, needs)
    log.info("mask stage: %d distinct pairs for %s, %d cached, %d to compute, order %s", work.distinct_pairs,
             ", ".join(names), work.cached, len(work.todo_keys), work.order)
    total = len(work.todo_keys)
    ctx.phase("caching_masks", 0, total)
    if total:
        ctx.progress(0, total)
    ready = _Readiness(ctx, work)
    ready.announce()
    devices: list[str] = []
    fastest, replica_count = None, 0
    if total:
        # No more replicas than there are batches for: each costs a model load.
        replicas, devices = replicas_for(config, ctx, max(1, -(-total // config.backend.batch_size)))
        replica_count = len(replicas)
        niceness = CPU_REPLICA_NICENESS if config.backend.kind == "embedded" else 0
        pool = ReplicaPool(cache, replicas, work, config.backend.batch_size, ctx.control, niceness)
        pool.start()
        ctx.emit(events.MaskWork(ctx.name, model_calls=0, cache_hits=work.cached,
                                 distinct_pairs=work.distinct_pairs, devices=devices))
        told = time.monotonic()
        try:
            while pool.alive:
                ctx.control_point()
                time.sleep(TICK_S)
                ready.update(pool.done_keys)
                if time.monotonic() - told >= WORK_REPORT_S:  # run.json's counts keep up
                    told = time.monotonic()
                    ctx.emit(events.MaskWork(ctx.name, model_calls=cache.model_calls, cache_hits=work.cached,
                                             distinct_pairs=work.distinct_pairs, devices=devices))
        except StopRequested:
            pool.join()  # each replica ends its batch: every file it began is whole
            ready.update(pool.done_keys)
            ctx.emit(events.MaskWork(ctx.name, model_calls=cache.model_calls, cache_hits=work.cached,
                                     distinct_pairs=work.distinct_pairs, devices=devices))
            raise
        pool.join()
        if pool.error is not None:
            raise pool.error
        ready.update(pool.done_keys)
        fastest = pool.fastest_per_pair
    ctx.phase("caching_masks", total, total)
    if total:
        ctx.progress(total, total)
    ctx.emit(events.MaskWork(ctx.name, model_calls=cache.model_calls, cache_hits=work.cached,
                             distinct_pairs=work.distinct_pairs, devices=devices))
    return {"model_calls": cache.model_calls, "distinct_pairs": work.distinct_pairs, "cache_hits": work.cached,
            "order": work.order, "devices": devices, "replicas": replica_count, "pairs_by_experiment": work.sizes,
            **({"fastest_s_per_pair": fastest} if fastest is not None else {})}


class _Readiness:
    """Progress, and a `PairsReady` event for each experiment once its pairs are in."""

    def __init__(self, ctx: WorkerContext, work: Plan) -> None:
        self.ctx, self.work = ctx, work
        self._seen = 0
        self._told: set[str] = set()
        self._last = 0.0

    def announce(self) -> None:
        for name in self.work.order:
            if not self.work.waiting[name] and name not in self._told:
                self._told.add(name)
                self.ctx.emit(events.PairsReady(self.ctx.name, ready_for=name, pairs=self.work.sizes[name]))

    def update(self, done_keys: list[str]) -> None:
        fresh = done_keys[self._seen:]
        self._seen += len(fresh)
        if fresh:
            for waiting in self.work.waiting.values():
                waiting.difference_update(fresh)
            self.announce()
        self.ctx.progress(self._seen, len(self.work.todo_keys))


# --- an experiment's side ------------------------------------------------------------


def await_pairs(ctx: WorkerContext, cache, pairs: Pairs | None = None,
                splits: Callable[[str], list] | None = None) -> None:
    """Wait until every pair the experiment `ctx.name` reads (`pairs`, by default as
    `mask_needs` says from `splits`) is in the cache, or the run's mask stage has
    ended (what is missing then, it computes itself). Returns at once when no stage
    fills the cache for it, or when its pairs are cached already. Pause and stop are
    obeyed while it waits."""
    if not ctx.wait_for_masks:
        return
    if pairs is None:
        pairs = all_pairs(pairs_of(ctx.config, ctx.name, splits))
    images, prompts = pairs.images, pairs.prompts
    todo = cache.missing(images, prompts)
    distinct = len(todo)
    told, looked = -1.0, time.monotonic()
    done = ctx.control.masks_done
    while todo and not done.is_set():
        ctx.control_point()
        if time.monotonic() - told >= WAIT_REPORT_S:  # each report is recorded: not one per poll
            told = time.monotonic()
            ctx.phase("caching_masks", distinct - len(todo), distinct)
        done.wait(POLL_S)
        # The supervisor says when they are in (`MasksDone`); looking on disk now and
        # then only keeps the count and covers a message missed in a restart (looking
        # at every pair each poll was 11,440 file lookups, four times a second, for a
        # waiting prompt_rl on the default run).
        if done.is_set() or time.monotonic() - looked >= LOOK_S:
            looked = time.monotonic()
            todo = [i for i in todo if not cache.on_disk(images[i], prompts[i])]
    if todo:
        log.info("the mask stage ended with %d of my pairs missing: computing them here", len(todo))


def report_mask_work(ctx: WorkerContext, cache) -> None:
    """Tell the supervisor what this attempt's mask reads cost (run.json's counts)."""
    ctx.emit(events.MaskWork(ctx.name, model_calls=cache.model_calls, cache_hits=cache.cache_hits))
