"""What an attempt on a cluster is told beyond its `WorkerSpec`: where the scheduler
placed it, and, when the run folder is not shared with its node, how its files travel
(`sa2va_contract.shipping`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Placement:
    """Where Ray put an attempt: its node, the host that node goes by, the GPUs given."""

    node_id: str
    host: str
    gpu_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ShipPlan:
    """`ray.storage: ship`: the node-local folder the attempt writes in, and its seed
    (the experiment folder it resumes with: `shipping.seed_files`)."""

    scratch_dir: Path
    seed: list[tuple[str, bytes]] = field(default_factory=list)
    #: Where the node keeps segmenter outputs when the config leaves `backend.cache_dir` unset.
    mask_cache: Path | None = None
