"""The supervisor's event thread (`EventDrain`), and what keeps it alive whatever
its subscribers and the run folder do: a subscriber that raises (anything, `SystemExit` included: rich raises it
when the terminal's pipe closes) is dropped, and a write to the run folder that fails
(a full disk) becomes the one line that cuts the run short, instead of the death of
the thread that reaps the workers.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from sa2va_contract import events
from sa2va_contract.events import Event
from sa2va_contract.files import disk_full_message
from sa2va_contract.gpus import GpuSnapshot
from sa2va_contract.recovery import automatic_restart
from sa2va_tui.launching import Attempt, Owed
from sa2va_tui.placement import Exit
from sa2va_tui.runstate import Subscriber

#: How long the drain thread waits when nothing arrives (deadlines, the line, run.json).
TICK_S = 0.25

log = logging.getLogger(__name__)


def call_subscribers(subscribers: Sequence[Subscriber], pending: Iterable[Event]) -> list[Subscriber]:
    """Hand every event to every subscriber, in order; return those that raised, each
    told to the log once and given no further event."""
    broken: list[Subscriber] = []
    for event in pending:
        for callback in subscribers:
            if callback in broken:
                continue
            try:
                callback(event)
            except BaseException as err:  # noqa: BLE001 - a view, however broken, must not stop the run
                broken.append(callback)
                log.error("a subscriber failed on %s and gets no more events: %r (%s)", event.type, callback,
                          f"{type(err).__name__}: {err}", exc_info=not isinstance(err, SystemExit))
    return broken


def write_problem(error: OSError, folder: Path) -> tuple[str, str]:
    """The one line for a write to the run folder that failed (`disk full: PATH`, or
    the file and the system's word), and the stop reason the workers are given."""
    full = disk_full_message(error, folder)
    if full is not None:
        return full, "disk full"
    return f"{error.filename or folder}: {error.strerror or error}", "run folder not writable"


class EventDrain:
    """The supervisor's drain thread: the one thread that receives the workers' events
    and exits, applies them through the supervisor, kills what overstays its stop, starts
    what waits when room frees, and writes the run folder, round after round. Whatever a
    round raises is a fault of the run, never the end of the thread that reaps the
    workers; a shutdown that finds the thread gone does its rounds itself (`reap_here`).
    Lock: the supervisor's, held where its state is read or changed."""

    def __init__(self, supervisor: Any) -> None:  # a Supervisor: typed loosely, as drain.py must not import it
        self.sv = supervisor
        self.thread = threading.Thread(target=self.run, name="supervisor-drain", daemon=True)

    def run(self) -> None:
        sv = self.sv
        try:
            while not self._round():
                pass
        finally:
            with sv._changed:
                sv._changed.notify_all()  # a waiter sees `done` (the loop's end) at once

    def _round(self) -> bool:
        """One round of the drain; whatever it raises is a fault of the run, never the
        end of the thread that reaps the workers. True when the supervisor finished."""
        sv = self.sv
        try:
            return self._once()
        except BaseException as err:  # noqa: BLE001 - SystemExit too: nothing may end this thread
            log.error("the supervisor's event thread failed", exc_info=err)
            sv._cut_short(f"the supervisor failed: {type(err).__name__}: {err}".strip(), "supervisor failed")
            sv._backend.wake()
            threading.Event().wait(TICK_S)  # never a busy loop over a fault that repeats
            return False

    def reap_here(self, timeout: float) -> None:
        """The drain's work on this thread, until every worker has been reaped (or
        `timeout`): for a shutdown that finds the drain thread gone."""
        sv = self.sv
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with sv._lock:
                if not sv._live_attempts():
                    return
            self._round()

    def _once(self) -> bool:
        sv = self.sv
        with sv._lock:
            if sv._finished:
                sv._deliver_outbox()
                return True
            attempts = sv._live_attempts()
        by_handle = {id(a.handle): a for a in attempts}
        for handle, arrival in sv._backend.wait([a.handle for a in attempts], timeout=TICK_S):
            attempt = by_handle[id(handle)]
            if isinstance(arrival, Exit):
                self._on_exit(attempt, arrival)
            else:
                self._on_worker_event(attempt, arrival)
        with sv._lock:
            self._enforce_deadlines()
            if not sv._closing:
                sv._launcher.schedule()
            sv._write_state()
        sv._deliver_outbox()
        return False

    def _enforce_deadlines(self) -> None:
        """Kill the workers that were asked to stop and did not within their grace."""
        sv = self.sv
        for attempt in [a for a in sv._live_attempts() if a.overdue]:
            log.warning("%s did not stop in time; killing pid %s", attempt.name, attempt.handle.pid)
            attempt.killed_by_us = True
            sv._backend.kill(attempt.handle)

    def _on_exit(self, attempt: Attempt, exit: Exit) -> None:
        sv = self.sv
        with sv._lock:
            if attempt.name == events.MASK_STAGE:
                if attempt.outcome is None:
                    sv._dispatch(attempt.unreported_failure(exit.exit_code, sv._book.stage.timesteps))
                if sv._stage is attempt:
                    sv._end_stage()
                sv._changed.notify_all()
                return
            name = attempt.name
            if sv._attempts.get(name) is attempt:
                del sv._attempts[name]
            if attempt.outcome is None:
                failure = attempt.unreported_failure(exit.exit_code, sv._book.states[name].timesteps)
                self._owe_restart(attempt, failure)
                sv._dispatch(failure)
            owed = sv._owed.pop(name, None)
            if owed is not None and not sv._closing:
                # Its place in line is at the head: it held a device until now.
                sv._launcher.request(name, owed, first=owed.reason in ("oom", "error"))
                sv._launcher.schedule()
            sv._changed.notify_all()

    def _on_worker_event(self, attempt: Attempt, event: Event) -> None:
        sv = self.sv
        with sv._lock:
            if attempt is sv._stage or event.experiment == events.MASK_STAGE:
                if isinstance(event, (events.Failed, events.Finished, events.Stopped)):
                    attempt.outcome = event
                sv._dispatch(event)
                return
            if isinstance(event, (events.Failed, events.Finished, events.Stopped)):
                attempt.outcome = event
                if isinstance(event, events.Failed):
                    self._owe_restart(attempt, event)
            sv._dispatch(event)

    def _owe_restart(self, attempt: Attempt, failure: events.Failed) -> None:
        """Whether recovery restarts this failure by itself, and at which batch size."""
        sv = self.sv
        if sv._closing:
            return
        state = sv._book.states[attempt.name]
        restart, why_not = automatic_restart(sv._experiments[attempt.name], failure.kind,
                                             failure.batch_size or attempt.batch_size, state.oom_restarts,
                                             state.error_restarts, sv.config.recovery, attempt.killed_by_us)
        if restart is None:
            log.warning("%s: %s", attempt.name, why_not)
            return
        sv._owed[attempt.name] = Owed(restart.reason, batch_size=restart.batch_size)

    def on_gpus(self, snapshot: GpuSnapshot) -> None:
        """A reading from the GPU sampler's thread: kept in the run folder, each
        experiment's memory folded into its state, and dispatched."""
        sv = self.sv
        with sv._lock:
            try:
                sample = sv._gpus.record(snapshot)
            except OSError as err:
                sv._cut_short(*write_problem(err, sv.store.path))
                sample = events.GpuSample.of(snapshot)
            for process in (p for g in snapshot.gpus for p in g.processes):
                if process.experiment and process.used_memory:
                    sv._book.gpu_memory_seen(process.experiment, process.used_memory)
        sv._dispatch(sample)
