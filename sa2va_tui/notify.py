"""`run.on_event`: a command of the researcher's run when an experiment finishes, fails
for good or is restarted after running out of memory (a chat hook, `notify-send`, a
mail script).

The command line is split like a shell would (`shlex`) but run without one, and
nothing of the run is put into it: the run, the experiment, the event and the state
arrive as environment variables, so no experiment name can inject anything. Its
output goes to the run folder's `notifications.log`, never onto the screen.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import threading
from pathlib import Path
from typing import Callable

from sa2va_contract import events
from sa2va_tui.runstate import ExperimentState

log = logging.getLogger(__name__)

NOTIFICATIONS_LOG = "notifications.log"
FINISHED, FAILED, OOM_RESTART = "finished", "failed", "oom_restart"


def notification_of(event: events.Event, state: ExperimentState | None) -> str | None:
    """Which notification an event is, if any: a failure only when no restart follows
    (the state, folded after recovery decided, says so). The mask stage is no
    experiment: it notifies of nothing."""
    if event.experiment == events.MASK_STAGE:
        return None
    if isinstance(event, events.Finished):
        return FINISHED
    if isinstance(event, events.Failed) and state is not None and state.state == "failed":
        return FAILED
    if isinstance(event, events.Restarting) and event.reason == "oom":
        return OOM_RESTART
    return None


class Notifier:
    """A subscriber of a supervisor that runs the command for each notification."""

    def __init__(self, command: str, run_id: str, run_dir: Path,
                 states: Callable[[], dict[str, ExperimentState]]) -> None:
        self._argv = shlex.split(command)
        self._run_id = run_id
        self._log = Path(run_dir) / NOTIFICATIONS_LOG
        self._states = states
        self._failed_to_start = False

    def __call__(self, event: events.Event) -> None:
        if not event.experiment:
            return
        state = self._states().get(event.experiment)
        which = notification_of(event, state)
        if which is not None:
            self.notify(event.experiment, which, state.state if state else "")

    def notify(self, experiment: str, which: str, state: str) -> subprocess.Popen | None:
        env = {**os.environ, "SA2VA_RUN": self._run_id, "SA2VA_EXPERIMENT": experiment, "SA2VA_EVENT": which,
               "SA2VA_STATE": state}
        try:
            with open(self._log, "ab") as out:
                process = subprocess.Popen(self._argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            if not self._failed_to_start:  # once: a broken command would say so every event
                self._failed_to_start = True
                log.warning("run.on_event: %s: %s", self._argv[0], err.strerror or err)
            return None
        # Reaped on a thread of its own: a slow hook never holds up the run.
        threading.Thread(target=process.wait, name="notification", daemon=True).start()
        return process
