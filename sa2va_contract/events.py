"""The typed messages between a worker and the supervisor: events up (worker to
supervisor, and on to every view), control messages down.

Plain dataclasses: they pickle over a worker's pipe, serialise to one JSON line of
`events.jsonl` (nested payloads keep the flat JSON shape run folders have always had),
and import nothing heavy, so both sides can use them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sa2va_contract.gpus import GpuInfo, GpuSnapshot

PHASES = ("loading_model", "caching_masks", "training", "evaluating", "saving")


@dataclass
class Event:
    experiment: str
    time: float = field(default_factory=time.time, kw_only=True)
    type: ClassVar[str] = "event"
    #: A newer event of the same type and experiment makes this one obsolete on screen.
    supersedes: ClassVar[bool] = False
    #: Written to the run's events.jsonl; samples of the moment are only shown.
    persist: ClassVar[bool] = True

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "Event":
        """The event from its `to_dict()` form, less the type."""
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str, allow_nan=False)


@dataclass
class Started(Event):
    pid: int
    gpu: int | None
    batch_size: int | None
    attempt: int = 1
    resumed_from: str | None = None
    #: The machine (a Ray node's `sa2va/host` label, else its host name) it runs on.
    host: str | None = None
    type: ClassVar[str] = "started"


@dataclass
class Queued(Event):
    """The experiment waits for room: in the supervisor's line (at `position`), or, once
    launched on a cluster, for the cluster to place it (a slot to free, a node to start)."""

    #: Its place in the supervisor's line (1: next); None: the cluster's to place.
    position: int | None = None
    #: What it asked the cluster for, e.g. {"CPU": 1.0, "GPU": 1.0}.
    resources: dict[str, float] = field(default_factory=dict)
    #: Where it may go, in words ("" for anywhere).
    where: str = ""
    type: ClassVar[str] = "queued"


@dataclass
class Phase(Event):
    phase: str
    done: int | None = None
    total: int | None = None
    type: ClassVar[str] = "phase"
    supersedes: ClassVar[bool] = True


@dataclass
class Progress(Event):
    timesteps: int
    total: int
    #: Timesteps per second as the source itself measured them (SB3's `time/fps`);
    #: None: the reader estimates the rate from when reports arrive.
    rate: float | None = None
    type: ClassVar[str] = "progress"
    supersedes: ClassVar[bool] = True


@dataclass
class Metrics(Event):
    step: int
    values: dict[str, float]
    type: ClassVar[str] = "metrics"


@dataclass
class Checkpoint(Event):
    path: str
    step: int
    type: ClassVar[str] = "checkpoint"


@dataclass
class Failed(Event):
    kind: str
    message: str
    step: int | None = None
    batch_size: int | None = None
    gpu: int | None = None
    exit_code: int | None = None
    log_tail: list[str] = field(default_factory=list)
    type: ClassVar[str] = "failed"


@dataclass
class Finished(Event):
    summary: dict[str, Any] = field(default_factory=dict)
    type: ClassVar[str] = "finished"


@dataclass
class Paused(Event):
    step: int | None = None
    type: ClassVar[str] = "paused"


@dataclass
class Resumed(Event):
    type: ClassVar[str] = "resumed"


@dataclass
class Stopped(Event):
    """The worker saved and exited because it was asked to (stop, quit, lost supervisor)."""

    step: int | None = None
    reason: str = "stop"
    type: ClassVar[str] = "stopped"


@dataclass
class Notice(Event):
    """One line the experiment wants the user to read, e.g. which checkpoint a resume
    skipped and why; it changes no state."""

    message: str
    type: ClassVar[str] = "notice"


@dataclass(frozen=True)
class Change:
    old: Any
    new: Any


@dataclass(frozen=True)
class RestartChanges:
    """What a new attempt does differently from the last one."""

    #: The checkpoint it resumes from; None: from the start.
    resume_from: str | None = None
    batch_size: Change | None = None
    #: GPU indices; None stands for the CPU.
    gpu: Change | None = None

    def changed(self) -> list[tuple[str, Change]]:
        """The settings that change, by name, in a fixed order."""
        return [(name, change) for name, change in (("batch_size", self.batch_size), ("gpu", self.gpu))
                if change is not None]

    def to_json(self) -> dict[str, Any]:
        """{"resume_from": ..., "batch_size": [old, new], ...}, the unchanged left out."""
        return {"resume_from": self.resume_from, **{name: [c.old, c.new] for name, c in self.changed()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RestartChanges":
        def change(name: str) -> Change | None:
            pair = data.get(name)
            return Change(*pair) if isinstance(pair, (list, tuple)) and len(pair) == 2 else None

        return cls(resume_from=data.get("resume_from"), batch_size=change("batch_size"), gpu=change("gpu"))


@dataclass
class Restarting(Event):
    """Recorded by the supervisor: why, and what it changed."""

    reason: str
    attempt: int
    changes: RestartChanges = field(default_factory=RestartChanges)
    type: ClassVar[str] = "restarting"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "experiment": self.experiment, "time": self.time, "reason": self.reason,
                "attempt": self.attempt, "changes": self.changes.to_json()}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "Restarting":
        return cls(**{**fields, "changes": RestartChanges.from_json(fields.get("changes") or {})})


@dataclass
class GpuSample(Event):
    """The supervisor's once-a-second look at the GPUs (`experiment` is empty)."""

    available: bool
    message: str = ""
    gpus: list[GpuInfo] = field(default_factory=list)
    type: ClassVar[str] = "gpu_sample"
    supersedes: ClassVar[bool] = True
    persist: ClassVar[bool] = False

    @classmethod
    def of(cls, snapshot: GpuSnapshot) -> "GpuSample":
        return cls("", available=snapshot.available, message=snapshot.message, gpus=list(snapshot.gpus))

    @property
    def snapshot(self) -> GpuSnapshot:
        return GpuSnapshot(self.available, self.message, list(self.gpus))

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> "GpuSample":
        return cls(**{**fields, "gpus": [GpuInfo.from_dict(g) for g in fields.get("gpus", [])]})


#: The name the run's mask stage goes by in events, run.json and the views.
MASK_STAGE = "mask_stage"


@dataclass
class MaskWork(Event):
    """What a worker's reads of the mask cache cost: (image, prompt) pairs the model
    was asked for, and pairs found in the cache instead, since the attempt began. The
    mask stage adds `distinct_pairs`, the union of the pairs the run needs, and the
    devices its replicas ran on."""

    model_calls: int
    cache_hits: int
    distinct_pairs: int | None = None
    devices: list[str] = field(default_factory=list)
    type: ClassVar[str] = "mask_work"


@dataclass
class PairsReady(Event):
    """From the mask stage: every pair `ready_for` reads is in the cache."""

    ready_for: str
    pairs: int
    type: ClassVar[str] = "pairs_ready"


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (Started, Queued, Phase, Progress, Metrics, Checkpoint, Failed, Finished, Paused, Resumed, Stopped,
                Notice, Restarting, GpuSample, MaskWork, PairsReady)
}


def event_from_dict(data: dict[str, Any]) -> Event:
    data = dict(data)
    return EVENT_TYPES[data.pop("type")].from_fields(data)


# --- control: supervisor to worker ---------------------------------------------------


@dataclass(frozen=True)
class Pause:
    """Block at the next step point until resumed."""


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Stop:
    """Save a checkpoint and exit; `reason` ends up in the Stopped event."""

    reason: str = "stop"


@dataclass(frozen=True)
class MasksDone:
    """The run's mask stage has computed every pair this experiment reads, or has ended
    (done, stopped or failed): stop waiting for it, and compute whatever is still
    missing from the cache yourself."""


ControlMessage = Pause | Resume | Stop | MasksDone
