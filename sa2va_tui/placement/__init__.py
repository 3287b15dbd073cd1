"""Where and how worker processes run: the mechanics behind the supervisor's policy.

A backend launches one process per attempt of an experiment, carries its events up
and control messages down, tells how it exited, kills it, and reads the GPUs it can
place on. `LocalBackend` runs processes on this machine. The supervisor keeps all
the policy: state, run store, recovery, deadlines.
"""

from sa2va_tui.placement.base import Arrival, Exit, LaunchError, PlacementBackend, WorkerHandle

__all__ = ["Arrival", "Exit", "LaunchError", "PlacementBackend", "WorkerHandle"]
