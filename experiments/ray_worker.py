"""One attempt of one experiment inside a Ray actor: the same harness as a worker
process (`run_experiment` on a `WorkerContext`), with its events gathered into batches
for a streaming generator instead of sent down a pipe, and its control given by
method calls instead of read from the pipe.

The actor is `sa2va_tui.placement.ray_actor.AttemptActor`, a thin shell that imports
this module by name in the actor's process and tells it where Ray placed it; nothing
here imports Ray. No lifeline is needed: Ray ends an actor whose driver died (without
letting it save: the periodic checkpoints bound what is lost).

With `ray.storage: ship` the attempt writes into node-local scratch, and the batches
carry its file changes (`sa2va_contract.shipping`) ahead of the events that name them;
the paths in its events are those of the run folder, as with shared storage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from sa2va_contract import events
from sa2va_contract.cluster import Placement, ShipPlan
from sa2va_contract.shipping import FileChunk, FolderShipper, plant_seed
from sa2va_contract.worker import WorkerSpec

from experiments.harness import Control, WorkerContext, run_experiment
from experiments.worker import redirect_output

log = logging.getLogger(__name__)

#: The longest progress waits to go up (it supersedes itself: the latest is enough).
BATCH_S = 0.1
#: How long other events gather before they go up: a checkpoint and its metrics go together.
GATHER_S = 0.02
#: How often an attempt's folder is looked at for changes to ship (and at every checkpoint).
SHIP_INTERVAL_S = 1.0
TERMINAL = (events.Finished, events.Stopped, events.Failed)


class BatchSink:
    """Events kept for the next batch. Progress and phase supersede themselves: past the
    first of its type, only the latest is kept, and it goes before any other event that
    follows it, as `PipeSink` sends them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[events.Event] = []
        self._latest: dict[str, events.Event] = {}
        self._types_seen: set[str] = set()
        #: Set when an event that must not wait for the next batch arrives.
        self.news = threading.Event()

    def emit(self, event: events.Event) -> None:
        with self._lock:
            # The first of a type is kept whatever follows (where a resumed attempt starts).
            if event.supersedes and event.type in self._types_seen:
                self._latest[event.type] = event
                return
            self._types_seen.add(event.type)
            self._queue += self._latest.values()
            self._latest.clear()
            self._queue.append(event)
            self.news.set()

    def drain(self) -> list[events.Event]:
        with self._lock:
            batch = self._queue + list(self._latest.values())
            self._queue, self._latest = [], {}
            self.news.clear()
            return batch


class AttemptRunner:
    """The attempt: `stream()` runs it and yields its batches (lists of events, file
    chunks first); `handle(message)` obeys a control message from another thread."""

    def __init__(self, spec: WorkerSpec, placement: Placement, ship: ShipPlan | None = None) -> None:
        # Before anything imports torch: Ray has set CUDA_VISIBLE_DEVICES to the GPUs it
        # gave; number them as nvidia-smi and NVML do. An actor without GPUs has it unset
        # (it would see every GPU of its node): it gets none. (Set here rather than in a
        # runtime environment, which would keep Ray from using a worker it started ahead.)
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        if not placement.gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.spec = spec
        self.placement = placement
        self.control = Control()
        self.sink = BatchSink()
        self._ship = ship
        self._exp_dir = spec.exp_dir
        self._shipper: FolderShipper | None = None
        if ship is not None:
            self._exp_dir = ship.scratch_dir
            shutil.rmtree(self._exp_dir, ignore_errors=True)
            self._exp_dir.mkdir(parents=True)
            plant_seed(self._exp_dir, ship.seed)
            self._shipper = FolderShipper(self._exp_dir)
            self._shipper.mark_sent()
        self.log_path = self._local(spec.log_path)
        redirect_output(self.log_path)

    def _local(self, path: Path) -> Path:
        """A path of the run folder as this node writes it."""
        return self._exp_dir / Path(path).relative_to(self.spec.exp_dir) if self._ship else Path(path)

    def handle(self, message: events.ControlMessage) -> None:
        if isinstance(message, events.Pause):
            self.control.pause()
        elif isinstance(message, events.Resume):
            self.control.resume()
        elif isinstance(message, events.Stop):
            self.control.stop(message.reason)
        else:
            log.warning("unknown control message %r", message)

    def stream(self) -> Iterator[list[Any]]:
        spec, gpu = self.spec, (self.placement.gpu_ids[0] if self.placement.gpu_ids else None)
        log.info("attempt %d of %s: pid %d on %s (node %s), GPUs %s, batch size override %s, resume from %s, "
                 "code from %s", spec.attempt, spec.name, os.getpid(), self.placement.host, self.placement.node_id[:12],
                 list(self.placement.gpu_ids) or "none", spec.batch_size_override, spec.resume_from,
                 Path(__file__).resolve().parent)
        config = spec.config
        if self._ship is not None and self._ship.mask_cache is not None and config.backend.cache_dir is None:
            config = config.model_copy(deep=True)
            config.backend.cache_dir = self._ship.mask_cache
        experiment = config.experiments().get(spec.name)
        if experiment is None:
            yield [events.Failed(spec.name, kind="error",
                                 message=f"{spec.name!r} is not an enabled experiment of the config")]
            return
        ctx = WorkerContext(name=spec.name, config=config, experiment=experiment, exp_dir=self._exp_dir,
                            sink=self.sink, control=self.control, gpu=gpu, batch_size_override=spec.batch_size_override,
                            resume_from=self._local(spec.resume_from) if spec.resume_from else None)
        yield [events.Started(spec.name, pid=os.getpid(), gpu=gpu, batch_size=ctx.batch_size, attempt=spec.attempt,
                              resumed_from=str(spec.resume_from) if spec.resume_from else None,
                              host=self.placement.host)]
        outcome: list[events.Event] = []
        worker = threading.Thread(target=self._run, args=(ctx, outcome), name="experiment", daemon=True)
        worker.start()
        shipped_at = time.monotonic()
        while worker.is_alive():
            if self.sink.news.wait(BATCH_S):
                time.sleep(GATHER_S)
            batch: list[Any] = self.sink.drain()
            due = time.monotonic() - shipped_at >= SHIP_INTERVAL_S
            if self._shipper is not None and (due or any(isinstance(e, events.Checkpoint) for e in batch)):
                yield from self._ship_changes()
                shipped_at = time.monotonic()
            if batch:
                yield [self._in_run_folder(e) for e in batch]
        ending = self.sink.drain() + (outcome or [events.Failed(spec.name, kind="error", message="the experiment "
                                                                 "thread ended without an outcome")])
        if self._shipper is not None:
            yield from self._ship_changes()
            shutil.rmtree(self._exp_dir, ignore_errors=True)
        yield [self._in_run_folder(e) for e in ending]

    def _run(self, ctx: WorkerContext, outcome: list[events.Event]) -> None:
        try:
            outcome.append(run_experiment(ctx, self.spec.entry, self.log_path))
        except BaseException as err:  # noqa: BLE001 - SystemExit and the like: still one report
            log.exception("the experiment ended abnormally")
            outcome.append(events.Failed(self.spec.name, kind="error", message=f"{type(err).__name__}: {err}",
                                         step=ctx.last_step, batch_size=ctx.batch_size, gpu=ctx.gpu))
        finally:
            self.sink.news.set()  # the stream ends now, not at the next batch

    def _ship_changes(self) -> Iterator[list[FileChunk]]:
        """The folder's changes, one piece per batch (a piece may be megabytes)."""
        assert self._shipper is not None
        small: list[FileChunk] = []
        for chunk in self._shipper.changes():
            if len(chunk.data) < 64 * 1024:
                small.append(chunk)
            else:
                yield [chunk]
        if small:
            yield small

    def _in_run_folder(self, event: events.Event) -> events.Event:
        """The event with its paths into scratch turned into paths of the run folder."""
        if self._ship is None:
            return event
        local, shared = str(self._exp_dir), str(self.spec.exp_dir)

        def mapped(value: Any) -> Any:
            if isinstance(value, str):
                inside = value == local or value.startswith(local + os.sep)
                return shared + value[len(local):] if inside else value
            if isinstance(value, dict):
                return {k: mapped(v) for k, v in value.items()}
            if isinstance(value, list):
                return [mapped(v) for v in value]
            return value

        changes = {f.name: mapped(getattr(event, f.name)) for f in dataclasses.fields(event)
                   if f.name not in ("experiment", "time")}
        return dataclasses.replace(event, **changes)
