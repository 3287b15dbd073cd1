"""What NVML tells about the GPUs, as typed values, and where a new worker goes.

Every field NVML could not read is None (shown as N/A), never an error. The values
travel in `GpuSample` events, land in the run folder's `gpus.jsonl`, and are read back
by the report and the app's GPU panel.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GpuProcess:
    pid: int
    #: Bytes; None where NVML does not say (e.g. Windows WDDM, containers).
    used_memory: int | None
    #: The experiment of ours running in this process, if any.
    experiment: str | None = None


@dataclass
class GpuInfo:
    index: int
    name: str | None = None
    #: Percent of the last sample period a kernel ran.
    utilization: int | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    processes: list[GpuProcess] = field(default_factory=list)
    #: The node it is in, on a cluster; None: the supervisor's own machine.
    host: str | None = None

    @property
    def memory_free(self) -> int | None:
        if self.memory_used is None or self.memory_total is None:
            return None
        return self.memory_total - self.memory_used

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GpuInfo":
        fields = dict(data)
        fields["processes"] = [GpuProcess(**p) for p in fields.get("processes", [])]
        return cls(**fields)


@dataclass
class GpuSnapshot:
    available: bool
    message: str = ""
    gpus: list[GpuInfo] = field(default_factory=list)
    #: Who gives workers their GPUs: None, the supervisor (by `choose_gpu`); or the name of
    #: a cluster scheduler ("Ray") that assigns them itself.
    assigned_by: str | None = None


def choose_gpu(snapshot: GpuSnapshot, pinned: int | None = None, placed: Counter[int] | None = None) -> int | None:
    """The GPU for a new worker: the pinned one, else the most free memory, then the
    lowest utilisation; None (the CPU) when there is no GPU.

    `placed` counts workers just started on each GPU that NVML does not list yet: the
    memory they are about to take still shows as free, so a GPU with fewer of them wins
    first, and several experiments launched together spread out."""
    if not snapshot.available or not snapshot.gpus:
        return None
    if pinned is not None:
        return pinned
    placed = placed or Counter()

    def key(gpu: GpuInfo) -> tuple:
        free = gpu.memory_free
        util = gpu.utilization
        return (placed[gpu.index], free is None, -(free or 0), util is None, util or 0, gpu.index)

    return min(snapshot.gpus, key=key).index
