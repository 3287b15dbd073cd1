"""The GPUs of every node of a Ray cluster: one sampler actor per GPU node streams its
NVML readings, and the latest of each node make one snapshot, GPUs grouped by host.

A node whose GPUs NVML cannot read (no driver there, or GPUs Ray was only told of)
still has its GPUs listed, from Ray's count, with every value N/A, and the snapshot's
message says so. The processes NVML lists are named by the experiment of ours that
runs as that pid on that host.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

from sa2va_contract.gpus import GpuInfo, GpuProcess, GpuSnapshot
from sa2va_tui.placement.ray_placement import NODE_ID_LABEL, Node

log = logging.getLogger(__name__)

#: Who gives workers their GPUs on this backend (`GpuSnapshot.assigned_by`).
SCHEDULER = "Ray"


class NodeGpus:
    """The samplers, their streams (waited on with the attempts' streams), their readings."""

    def __init__(self, ray: Any, sampler_cls: Any, nvml: Any, period_s: float = 1.0) -> None:
        self._ray = ray
        self._sampler_cls = sampler_cls
        self._nvml = nvml
        self._period_s = period_s
        #: node id -> (actor, stream)
        self._samplers: dict[str, tuple[Any, Any]] = {}
        self._latest: dict[str, GpuSnapshot] = {}
        # The drain thread takes readings, the supervisor's sampler thread asks for them.
        self._lock = threading.RLock()

    def sync(self, nodes: list[Node]) -> None:
        """A sampler on every alive GPU node; none left on a node that is gone."""
        alive = {n.node_id for n in nodes if n.alive and n.gpus}
        with self._lock:
            for node_id in set(self._samplers) - alive:
                self._drop(node_id)
            for node_id in alive - set(self._samplers):
                actor = self._sampler_cls.options(label_selector={NODE_ID_LABEL: node_id}).remote()
                self._samplers[node_id] = (actor, actor.stream.remote(self._nvml, self._period_s))

    def streams(self) -> dict[int, tuple[str, Any]]:
        """id(stream) -> (node id, stream)."""
        with self._lock:
            return {id(stream): (node_id, stream) for node_id, (_, stream) in self._samplers.items()}

    def take(self, node_id: str, stream: Any) -> None:
        """The next reading of a stream `ray.wait` found ready."""
        try:
            reading = self._ray.get(next(stream))
        except StopIteration:
            reading = None
        except self._ray.exceptions.RayError as err:
            log.warning("the GPU sampler of node %s ended: %s", node_id[:12], " / ".join(str(err).splitlines()[1:3]))
            reading = None
        with self._lock:
            if reading is None:
                self._drop(node_id)
            elif node_id in self._samplers:
                self._latest[node_id] = reading

    def _drop(self, node_id: str) -> None:
        actor, _ = self._samplers.pop(node_id, (None, None))
        self._latest.pop(node_id, None)
        if actor is not None:
            self._ray.kill(actor)

    def snapshot(self, nodes: list[Node], ours: dict[tuple[str, int], str]) -> GpuSnapshot:
        """Every GPU of every alive node; `ours` names our attempts by (host, pid)."""
        gpus: list[GpuInfo] = []
        unread: list[str] = []
        gpu_nodes = [n for n in nodes if n.alive and n.gpus]
        with self._lock:
            latest = dict(self._latest)
        for node in gpu_nodes:
            reading = latest.get(node.node_id)
            if reading is not None and reading.available:
                gpus += [_named(gpu, node.host, ours) for gpu in reading.gpus]
                continue
            gpus += [GpuInfo(index=i, host=node.host) for i in range(node.gpus)]
            unread.append(f"{node.host} ({reading.message})" if reading is not None else f"{node.host} (not read yet)")
        if not gpu_nodes:
            return GpuSnapshot(False, "no GPU on any node of the Ray cluster", assigned_by=SCHEDULER)
        message = f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} on {len(gpu_nodes)} node{'s' if len(gpu_nodes) != 1 else ''}"
        if unread:
            message += "; values unknown on " + ", ".join(unread)
        return GpuSnapshot(True, message, gpus, assigned_by=SCHEDULER)

    def close(self) -> None:
        with self._lock:
            for node_id in list(self._samplers):
                self._drop(node_id)


def _named(gpu: GpuInfo, host: str, ours: dict[tuple[str, int], str]) -> GpuInfo:
    processes = [GpuProcess(p.pid, p.used_memory, ours.get((host, p.pid))) for p in gpu.processes]
    return replace(gpu, host=host, processes=processes)
