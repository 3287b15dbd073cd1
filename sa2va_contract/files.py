"""The two ways this project touches files that others read at the same time.

Atomic writes: a reader (a restart, `status` from another terminal, the evaluation)
sees the old file or the new one, never half of one, even if the writer dies or the
disk fills mid-write. The data goes to a temporary file beside the target (a hidden
name, so listings skip it), is flushed (and, for what cannot be recomputed, synced
to disk), then renamed over the target; on any failure the temporary file is removed.

Log tails: logs grow to gigabytes, so their end is read from the end.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

#: Lines of its log a failed worker's report carries.
LOG_TAIL_LINES = 20
LOG_TAIL_BYTES = 64 * 1024

# Files made through mkstemp are private (0600); ours are as readable as any file the
# user creates. The mask is read once, here, because reading it means setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_writer(path: Path, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write `path` through; it replaces `path` when the block ends
    without an exception. `durable=False` skips the sync to disk, for files that can
    be recomputed (the mask cache writes thousands)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    with atomic_writer(path, durable) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def read_tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> tuple[bytes, int]:
    """The last `max_bytes` of a file and the offset they start at; (b"", 0) when it
    cannot be read."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(start)
            return f.read(size - start), start
    except OSError:
        return b"", 0


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = LOG_TAIL_BYTES) -> list[str]:
    """The last lines of a log, whatever bytes it holds."""
    data, _ = read_tail(path, max_bytes)
    return list(deque(data.decode("utf-8", errors="replace").splitlines(), maxlen=lines))
