"""The built-in dataset's splits, generated once and kept on disk for every worker.

Generating the default's splits costs about 10 s of one core (train 6.5 s, val and
test 2 s each), and a run has four workers that each need them, all starting at once.
A split is generated in parts of `PART` samples, each part's file written once: a
worker takes every part nobody is generating (a lock it need not wait for) and writes
it (to a temporary name, then renamed), then waits on the locks of the parts others
took and reads them. So the workers that start together share one split out over the
cores instead of waiting for one of them to draw it all.

A part's file is named after everything its samples depend on: the seed, the image
size, the expressions setting, the split, the samples' range, and a digest of the
generator's own source, so a change to the generator can never be answered from an
older file. A file that will not read back as the samples it claims (cut short,
foreign) is generated again. Nothing is unpickled (`allow_pickle=False`).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from experiments.datasets.base import Sample
from sa2va_contract.files import WRITE_LOCK, atomic_write_bytes

log = logging.getLogger(__name__)

#: Arrays of a split's file, one row per sample.
_FIELDS = ("images", "masks", "ids", "expressions", "targets", "conditions")


@lru_cache(maxsize=1)
def generator_digest() -> str:
    """A digest of the generator's source: its files change, the memo's names change."""
    digest = hashlib.blake2b(digest_size=8)
    for name in ("builtin.py", "base.py"):
        digest.update(Path(__file__).with_name(name).read_bytes())
    return digest.hexdigest()


#: Samples in one memo file: a tenth of the default's train split, under a second to draw.
PART = 80


def part_path(folder: Path, seed: int, size: int, expressions: str, split: str, start: int, stop: int) -> Path:
    return Path(folder) / f"builtin-{generator_digest()}-s{seed}-{size}px-{expressions}-{split}-{start}-{stop}.npz"


def memoised_split(folder: Path, seed: int, size: int, expressions: str, split: str, count: int,
                   draw: Callable[[int, int], list[Sample]]) -> list[Sample]:
    """The first `count` samples of `split`, each part read from its file or drawn
    (`draw(start, stop)`) and written there, shared out among whoever asks at once."""
    parts = [(start, min(start + PART, count)) for start in range(0, count, PART)]
    paths = [part_path(folder, seed, size, expressions, split, start, stop) for start, stop in parts]
    for (start, stop), path in zip(parts, paths):
        if not path.is_file():
            memoised(path, stop - start, lambda start=start, stop=stop: draw(start, stop), wait=False)
    samples: list[Sample] = []
    for (start, stop), path in zip(parts, paths):
        samples += memoised(path, stop - start, lambda start=start, stop=stop: draw(start, stop))
    return samples


def memoised(path: Path, count: int, generate: Callable[[], list[Sample]], wait: bool = True) -> list[Sample] | None:
    """The `count` samples in `path`, generated (once, whoever asks at the same time)
    and written there if it holds none. With `wait=False`, None at once if another
    process is generating them."""
    samples = _read(path, count)
    if samples is not None:
        return samples
    with _exclusive(path.with_name(path.name + ".lock"), wait) as held:
        if not held:
            return None
        samples = _read(path, count)  # whoever held the lock before us may have written it
        if samples is None:
            samples = generate()
            try:
                _write(path, samples)
            except OSError as err:  # a memo that cannot be written costs time, never the run
                log.warning("could not keep the generated samples in %s: %s", path, err)
    return samples


@contextmanager
def _exclusive(lock_path: Path, wait: bool = True) -> Iterator[bool]:
    """Holds the lock (True), or with `wait=False` yields False if another holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))  # released by the kernel if this process dies
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _write(path: Path, samples: list[Sample]) -> None:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        images=np.stack([s.image for s in samples]),
        masks=np.stack([np.packbits(s.mask, axis=None) for s in samples]),
        shape=np.array(samples[0].mask.shape if samples else (0, 0)),
        ids=np.array([s.id for s in samples]),
        expressions=np.array([s.expression for s in samples]),
        targets=np.array([s.target for s in samples]),
        conditions=np.array([s.condition or "" for s in samples]),
    )
    with WRITE_LOCK:
        atomic_write_bytes(path, buffer.getvalue(), durable=False)


def _read(path: Path, count: int) -> list[Sample] | None:
    """The samples in `path`; None when it holds none or not the `count` it should (a
    damaged file is removed, to be written again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in (*_FIELDS, "shape")}
        h, w = (int(v) for v in arrays["shape"])
        if any(len(arrays[name]) != count for name in _FIELDS) or arrays["images"].shape[1:3] != (h, w):
            raise ValueError(f"not {count} samples of {h}x{w}")
        masks = np.unpackbits(arrays["masks"], axis=1, count=h * w).reshape(count, h, w).astype(bool)
    except Exception as err:  # noqa: BLE001 - any unreadable memo is generated again
        log.warning("generating the split again: %s is damaged (%s)", path, err)
        path.unlink(missing_ok=True)
        return None
    images = arrays["images"]
    return [Sample(id=str(arrays["ids"][i]), image=images[i], mask=masks[i], expression=str(arrays["expressions"][i]),
                   target=str(arrays["targets"][i]), condition=str(arrays["conditions"][i]) or None)
            for i in range(count)]
