"""The two ways this project touches files that others read at the same time.

Atomic writes: a reader (a restart, `status` from another terminal, the evaluation)
sees the old file or the new one, never half of one, even if the writer dies or the
disk fills mid-write. The data goes to a temporary file beside the target (a hidden
name, so listings skip it), is flushed (and, for what cannot be recomputed, synced
to disk), then renamed over the target; on any failure the temporary file is removed.

A write that fails for want of room (a full disk, a quota, a file-size limit) is a
`DiskFull` naming the file, whoever wrapped the error on the way (torch.save does).

Log tails: logs grow to gigabytes, so their end is read from the end.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
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


#: No room: a full file system, a full quota, a file-size limit (RLIMIT_FSIZE). The
#: three end a write alike, so they are told to the user alike.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFull(OSError):
    """A write that found no room; `str()` is the one line to show: `disk full: PATH`."""

    def __init__(self, path: Path | str, error_number: int = errno.ENOSPC) -> None:
        super().__init__(error_number, os.strerror(error_number), str(path))

    def __str__(self) -> str:
        return f"disk full: {self.filename}"


def disk_full_cause(error: BaseException | None) -> OSError | None:
    """The out-of-room OSError behind `error`, itself or one it was raised from or
    during (torch.save reports one as "enforce fail at inline_container.cc"), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_full_message(error: BaseException, fallback: Path | str) -> str | None:
    """`disk full: PATH` for an error that `disk_full_cause` finds, PATH the file it was
    writing where known (else `fallback`); None for any other error."""
    cause = disk_full_cause(error)
    if cause is None:
        return None
    return str(cause) if isinstance(cause, DiskFull) else f"disk full: {cause.filename or fallback}"


@contextmanager
def naming_disk_full(path: Path | str) -> Iterator[None]:
    """Writes to `path` in this block that find no room raise `DiskFull(path)` (a write
    to an open file says no file name of its own)."""
    try:
        yield
    except DiskFull:
        raise
    except BaseException as err:
        cause = disk_full_cause(err)
        if cause is None:
            raise
        raise DiskFull(path, cause.errno or errno.ENOSPC) from err


#: Held while a file that a worker memoises (a mask, a dataset split) is being written:
#: a worker that must end at once (a stop while it loads) takes it first, so that no
#: temporary file is left behind.
WRITE_LOCK = threading.Lock()


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
        with naming_disk_full(path):
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


def weights_bytes(checkpoint: Path) -> int:
    """Size of a checkpoint folder's weight files: what the model takes on a GPU in bf16
    (the supervisor sizes the mask stage's replicas by it, `check` the fit)."""
    return sum(f.stat().st_size for f in Path(checkpoint).iterdir()
               if f.is_file() and f.suffix in (".safetensors", ".bin"))
