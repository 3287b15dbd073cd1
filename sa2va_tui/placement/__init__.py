"""Where and how worker processes run: the mechanics behind the supervisor's policy.

A backend launches one process per attempt of an experiment, carries its events up
and control messages down, tells how it exited, kills it, and reads the GPUs it can
place on. `LocalBackend` runs processes on this machine; `RayBackend` runs Ray actors
on a cluster (or on a private Ray instance), and is the only module that imports Ray.
The supervisor keeps all the policy: state, run store, recovery, deadlines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sa2va_tui.placement.base import Arrival, Exit, LaunchError, PlacementBackend, WorkerHandle

if TYPE_CHECKING:
    from sa2va_contract.config import Config
    from sa2va_tui.runstore import RunStore

__all__ = ["Arrival", "Exit", "LaunchError", "PlacementBackend", "WorkerHandle", "backend_for"]


def backend_for(config: "Config", store: "RunStore", nvml: Any = None) -> PlacementBackend:
    """The backend `run.backend` names: processes here, or actors on Ray (imported only
    then). `nvml` stands in for pynvml (tests); raises LaunchError when Ray cannot start."""
    if config.run.backend == "ray":
        from sa2va_tui.placement.ray_backend import RayBackend

        return RayBackend(config.ray, store.path, nvml)
    from sa2va_tui.placement.local import LocalBackend

    return LocalBackend(nvml)
