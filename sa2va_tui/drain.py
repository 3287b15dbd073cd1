"""What keeps the supervisor's event thread alive whatever its subscribers and the run
folder do: a subscriber that raises (anything, `SystemExit` included: rich raises it
when the terminal's pipe closes) is dropped, and a write to the run folder that fails
(a full disk) becomes the one line that cuts the run short, instead of the death of
the thread that reaps the workers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

from sa2va_contract.events import Event
from sa2va_contract.files import disk_full_message
from sa2va_tui.runstate import Subscriber

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
