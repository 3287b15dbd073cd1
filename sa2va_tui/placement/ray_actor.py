"""What runs on the Ray cluster: the actor of one attempt, the GPU sampler of one node,
and the two tasks of the shared-folder check.

These are thin shells. The attempt's actor imports the engine's runner
(`experiments.ray_worker`) by name in its own process, as a worker process imports
`experiments.worker`, so this package never imports the engine. Actors are never
named and never detached: each dies with the driver that made it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import ray

from sa2va_contract.cluster import Placement, ShipPlan
from sa2va_contract.worker import WorkerSpec, load_function
from sa2va_tui.placement.ray_placement import HOST_LABEL

#: The engine's side of an attempt's actor.
RUNNER = "experiments.ray_worker:AttemptRunner"
#: Batches a stream may run ahead of the driver's reading (each is at most one file piece).
STREAM_AHEAD = 16


def node_host() -> str:
    """The host this process's node goes by."""
    return ray.get_runtime_context().get_node_labels().get(HOST_LABEL) or socket.gethostname()


def _gpu_ids() -> tuple[int, ...]:
    ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    return tuple(int(i) for i in ids if str(i).isdigit())


@ray.remote(concurrency_groups={"control": 1}, max_restarts=0, max_task_retries=0)
class AttemptActor:
    """One attempt of one experiment. `run()` streams its batches (the first item says
    where it runs); `control()` runs on a thread of its own, while `run()` works."""

    def __init__(self, spec: WorkerSpec, ship: ShipPlan | None = None) -> None:
        self.node_id = ray.get_runtime_context().get_node_id()
        placement = Placement(node_id=self.node_id, host=node_host(), gpu_ids=_gpu_ids())
        self._runner = load_function(RUNNER)(spec, placement, ship)

    @ray.method(_generator_backpressure_num_objects=STREAM_AHEAD)
    def run(self) -> Iterator[Any]:
        yield [{"node_id": self.node_id, "pid": os.getpid()}]
        yield from self._runner.stream()

    @ray.method(concurrency_group="control")
    def control(self, message: Any) -> None:
        self._runner.handle(message)


@ray.remote(num_cpus=0, num_gpus=0, max_restarts=0)
class GpuSamplerActor:
    """One per GPU node: its NVML reading every `period_s` seconds, as a stream. It asks
    for no GPU, so it sees all of them (NVML ignores CUDA_VISIBLE_DEVICES anyway)."""

    def stream(self, nvml: Any, period_s: float) -> Iterator[Any]:
        from sa2va_tui.gpus import Nvml

        reader = Nvml(nvml)
        while True:
            yield reader.read()
            time.sleep(period_s)


@ray.remote(num_cpus=0, max_retries=0)
def write_marker(folder: str, token: str) -> str:
    """Round one of the shared-folder check: this node's marker in the folder."""
    node_id = ray.get_runtime_context().get_node_id()
    marker = Path(folder) / token / node_id
    marker.parent.mkdir(parents=True, exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"{node_host()} {os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
    return node_id


@ray.remote(num_cpus=0, max_retries=0)
def read_markers(folder: str, token: str) -> tuple[str, list[str]]:
    """Round two: the markers this node sees there."""
    try:
        seen = sorted(os.listdir(Path(folder) / token))
    except FileNotFoundError:
        seen = []
    return ray.get_runtime_context().get_node_id(), seen
