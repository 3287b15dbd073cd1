"""What the supervisor hands a worker process, and the function a spawned worker
starts in.

The supervisor never imports the engine: it spawns `start_worker` with the worker's
entry point as a "module:function" string, and only the new process imports it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sa2va_contract.config import Config


def usable_cores() -> int:
    """Cores this process may run on (its affinity): the run's CPU slots, the embedded
    stage's replicas, the threads a batch's parts get."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


#: The engine's side of a worker process: `worker_main(spec, connection)`.
WORKER_MAIN = "experiments.worker:worker_main"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, picklable for the spawn start method."""

    name: str
    #: "module:function" of the experiment's `run(ctx)`.
    entry: str
    config: Config
    exp_dir: Path
    log_path: Path
    gpu: int | None
    supervisor_pid: int
    attempt: int = 1
    resume_from: Path | None = None
    #: The batch size this attempt runs at when it differs from the config's (after an
    #: out-of-memory failure); the worker applies it to its experiment's config.
    batch_size_override: int | None = None
    #: Further GPUs the worker holds besides `gpu` (a model split over several).
    extra_gpus: tuple[int, ...] = ()
    #: Whether the run's mask stage fills the cache for this attempt (it then waits for
    #: its pairs instead of computing them, until the stage ends).
    wait_for_masks: bool = False
    #: The mask stage's worker only: the experiments whose pairs it computes.
    needs_of: tuple[str, ...] = ()
    #: The mask stage's worker on GPUs only: the GPU of each segmenter replica, numbered
    #: as `gpu` is (a GPU named twice holds two replicas).
    replica_gpus: tuple[int, ...] = ()

    @property
    def visible_gpus(self) -> str:
        """CUDA_VISIBLE_DEVICES for the worker: its GPUs, or none."""
        return "" if self.gpu is None else ",".join(str(g) for g in (self.gpu, *self.extra_gpus))


def load_function(entry: str) -> Any:
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


def start_worker(main: str, *args: Any) -> None:
    """A spawned process's target: import `main` ("module:function") and call it."""
    load_function(main)(*args)
