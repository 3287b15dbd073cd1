"""The interface between the supervisor and a placement backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Union

from sa2va_contract.events import ControlMessage, Event
from sa2va_contract.gpus import GpuSnapshot
from sa2va_contract.worker import WorkerSpec


class LaunchError(Exception):
    """A worker could not be started; `str()` is the one line to show."""


class WorkerHandle(Protocol):
    """One attempt's process, as the backend that launched it knows it."""

    spec: WorkerSpec

    @property
    def pid(self) -> int | None: ...


@dataclass(frozen=True)
class Exit:
    """A worker's process has ended; its pipe is closed and it sends nothing more."""

    exit_code: int | None


#: What `wait` brings: an event the worker sent, or its exit (always after its events).
Arrival = tuple[WorkerHandle, Union[Event, Exit]]


class PlacementBackend(Protocol):
    def launch(self, spec: WorkerSpec) -> WorkerHandle:
        """Start one attempt; raises LaunchError when it cannot."""
        ...

    def wait(self, workers: list[WorkerHandle], timeout: float) -> list[Arrival]:
        """What arrived from `workers` within `timeout` (less when `wake` is called)."""
        ...

    def send(self, worker: WorkerHandle, message: ControlMessage) -> bool:
        """Pass a control message on; False when the worker can no longer hear it."""
        ...

    def kill(self, worker: WorkerHandle) -> None:
        """End the worker at once (no checkpoint); its Exit arrives through `wait`."""
        ...

    def wake(self) -> None:
        """Make a `wait` in progress return early (callable from any thread)."""
        ...

    def read_gpus(self, workers: dict[int, str]) -> GpuSnapshot:
        """The GPUs workers can be placed on, with our worker pids named."""
        ...

    def close(self) -> None:
        """Release what the backend holds; every worker has exited by then."""
        ...
