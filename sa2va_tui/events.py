"""The typed events that cross from a worker to the supervisor and on to the UI.

Plain dataclasses: they pickle over a multiprocessing queue, serialise to one JSON
line of `events.jsonl`, and import nothing heavy, so both sides can use them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

PHASES = ("loading_model", "caching_masks", "training", "evaluating", "saving")
FAILURE_KINDS = ("oom", "error", "killed")


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

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str, allow_nan=False)


@dataclass
class Started(Event):
    pid: int
    gpu: int | None
    batch_size: int | None
    attempt: int = 1
    resumed_from: str | None = None
    type: ClassVar[str] = "started"


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
class Restarting(Event):
    """Recorded by the supervisor: why, and what it changed."""

    reason: str
    attempt: int
    changes: dict[str, Any] = field(default_factory=dict)
    type: ClassVar[str] = "restarting"


@dataclass
class GpuSample(Event):
    """The supervisor's once-a-second look at the GPUs (`experiment` is empty): whether
    NVML answered, and per GPU a `sa2va_tui.gpus.GpuInfo` as a dict."""

    available: bool
    message: str = ""
    gpus: list[dict[str, Any]] = field(default_factory=list)
    type: ClassVar[str] = "gpu_sample"
    supersedes: ClassVar[bool] = True
    persist: ClassVar[bool] = False


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls
    for cls in (Started, Phase, Progress, Metrics, Checkpoint, Failed, Finished, Paused, Resumed, Stopped, Restarting,
                GpuSample)
}


def event_from_dict(data: dict[str, Any]) -> Event:
    data = dict(data)
    cls = EVENT_TYPES[data.pop("type")]
    return cls(**data)
