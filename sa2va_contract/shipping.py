"""An experiment's folder kept in step across machines (`ray.storage: ship`): an attempt
writes into node-local scratch, and its file changes travel with its events to the
run folder on the supervisor's machine.

`FolderShipper` (on the worker's node) tells what changed since it last looked, as
`FileChunk`s: the bytes appended to a file that grew in place (logs, progress.csv,
TensorBoard event files), or the whole file when it was replaced (an atomic rename
gives it a new inode), shrank, or changed within what was already sent. Pieces are at
most `CHUNK_BYTES`, read one at a time, so a checkpoint of gigabytes never sits whole
in memory or in one object. `FolderReceiver` (on the supervisor's machine) applies
them: appended bytes in place, so a reader sees a log grow as it would locally; a whole
file into a hidden temporary file renamed over the old one at its last piece, so a
reader sees the old file or the new one, never a part. `seed_files` and `plant_seed`
carry the other way what a resuming attempt needs: its folder, with only the
checkpoint it resumes from. Hidden files (temporary files of atomic writes) are
never sent: they arrive under their final name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from sa2va_contract.layout import CHECKPOINT_DIR

#: The largest piece of a file that travels in one object.
CHUNK_BYTES = 4 * 2**20
#: Bytes kept of a file's start and of the end last sent, to tell an append from a rewrite.
WINDOW = 4096


@dataclass(frozen=True)
class FileChunk:
    """One change to one file of an experiment folder."""

    #: Relative to the experiment folder, with "/" between parts.
    path: str
    #: Where `data` goes in the file (in the new file, for a whole one).
    offset: int
    data: bytes
    #: A piece of a new version of the whole file; the first has offset 0.
    whole: bool = False
    #: The whole file's last piece: it replaces the old file now.
    last: bool = True
    #: The file is gone.
    deleted: bool = False


@dataclass
class _Sent:
    inode: int
    size: int
    mtime_ns: int
    head: bytes
    tail: bytes


def _visible_files(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder) / name


class FolderShipper:
    """The changes to the files under `root` since the last call of `changes()`."""

    def __init__(self, root: Path, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.root = Path(root)
        self._chunk_bytes = chunk_bytes
        self._sent: dict[str, _Sent] = {}

    def mark_sent(self) -> None:
        """Everything there now is known on the other side (a planted seed)."""
        for path in _visible_files(self.root):
            try:
                st = path.stat()
                with open(path, "rb") as f:
                    head = f.read(WINDOW)
                    f.seek(max(0, st.st_size - WINDOW))
                    tail = f.read(WINDOW)
            except OSError:
                continue
            self._sent[path.relative_to(self.root).as_posix()] = _Sent(st.st_ino, st.st_size, st.st_mtime_ns, head, tail)

    def changes(self) -> Iterator[FileChunk]:
        """Pieces of what changed, each read as it is asked for."""
        present: set[str] = set()
        for path in _visible_files(self.root):
            rel = path.relative_to(self.root).as_posix()
            present.add(rel)
            try:
                st = path.stat()
            except OSError:
                continue  # removed since it was listed
            sent = self._sent.get(rel)
            if sent is not None and (st.st_ino, st.st_size, st.st_mtime_ns) == (sent.inode, sent.size, sent.mtime_ns):
                continue
            yield from self._ship(path, rel, st, sent)
        for rel in sorted(set(self._sent) - present):
            del self._sent[rel]
            yield FileChunk(rel, 0, b"", deleted=True)

    def _ship(self, path: Path, rel: str, st: os.stat_result, sent: _Sent | None) -> Iterator[FileChunk]:
        try:
            f = open(path, "rb")
        except OSError:
            return
        with f:
            appended = sent is not None and st.st_ino == sent.inode and st.st_size >= sent.size and _same_prefix(f, sent)
            offset, head, tail = (sent.size, sent.head, sent.tail) if appended and sent else (0, b"", b"")
            f.seek(offset)
            piece = f.read(self._chunk_bytes)
            while piece or not appended:
                following = f.read(self._chunk_bytes) if piece else b""
                yield FileChunk(rel, offset, piece, whole=not appended, last=not following)
                head = head if len(head) >= WINDOW else (head + piece)[:WINDOW]
                tail = (tail + piece)[-WINDOW:]
                offset += len(piece)
                if not following:
                    break
                piece = following
        # What the other side holds now: `offset` bytes (more than stat said if it grew meanwhile).
        self._sent[rel] = _Sent(st.st_ino, offset, st.st_mtime_ns, head, tail)


def _same_prefix(f, sent: _Sent) -> bool:
    """The bytes sent still open the file and end where the last piece ended: it grew by appends."""
    f.seek(0)
    if f.read(len(sent.head)) != sent.head:
        return False
    f.seek(sent.size - len(sent.tail))
    return f.read(len(sent.tail)) == sent.tail


class FolderReceiver:
    """Applies `FileChunk`s under `root` (an experiment's folder in the run folder)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        #: Whole files still arriving: their temporary files, open.
        self._incoming: dict[str, tuple[Path, BinaryIO]] = {}

    def apply(self, chunk: FileChunk) -> None:
        target = self.root / chunk.path
        if chunk.deleted:
            target.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        if chunk.whole:
            self._apply_whole(target, chunk)
            return
        mode = "r+b" if target.exists() else "wb"
        with open(target, mode) as f:
            f.truncate(chunk.offset)  # what lies past it was sent before and is sent again
            f.seek(chunk.offset)
            f.write(chunk.data)

    def _apply_whole(self, target: Path, chunk: FileChunk) -> None:
        if chunk.offset == 0:
            self._abandon(chunk.path)
            tmp = target.with_name(f".{target.name}.shipped.tmp")
            self._incoming[chunk.path] = (tmp, open(tmp, "wb"))
        incoming = self._incoming.get(chunk.path)
        if incoming is None:
            return  # its first piece was lost with an earlier attempt
        tmp, f = incoming
        f.write(chunk.data)
        if chunk.last:
            f.close()
            del self._incoming[chunk.path]
            os.replace(tmp, target)

    def _abandon(self, rel: str) -> None:
        incoming = self._incoming.pop(rel, None)
        if incoming is not None:
            tmp, f = incoming
            f.close()
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Drop whole files that never got their last piece (their attempt died)."""
        for rel in list(self._incoming):
            self._abandon(rel)


def seed_files(exp_dir: Path, resume_from: Path | None) -> list[tuple[str, bytes]]:
    """What a resuming attempt on another node needs of its folder: every file of it but
    the checkpoints other than the one it resumes from."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return []
    keep = Path(resume_from).resolve() if resume_from else None
    found = []
    for path in _visible_files(exp_dir):
        rel = path.relative_to(exp_dir)
        if rel.parts[0] == CHECKPOINT_DIR and path.resolve() != keep:
            continue
        try:
            found.append((rel.as_posix(), path.read_bytes()))
        except OSError:
            continue
    return found


def plant_seed(root: Path, files: list[tuple[str, bytes]]) -> None:
    """The seed's files under `root`, as they were in the run folder."""
    for rel, data in files:
        target = Path(root) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
