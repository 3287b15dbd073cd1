"""Segmenter outputs kept in memory and on disk.

Outputs are deterministic per (backend fingerprint, image, prompt), so a second run,
or a second experiment on the same data, need not call the model at all. An entry is
keyed by the image's content, not only its id, so two datasets that reuse ids never
share masks. On disk a mask is packed bits and a probability map 8 bits per pixel;
the same decoded form is returned on a hit and on a miss, so results never depend on
what happened to be cached. Files are written to a temporary name and renamed, so
several worker processes can fill one cache at once and none ever reads a torn file.
A file damaged anyway (a full disk, a copy cut short, bytes that are no mask) is
treated as missing: deleted, computed again, and counted in `damaged`. An entry is a
small fixed header and the raw bytes (`_ENTRY_HEADER`), read with one system call and
no parsing, since a run reads tens of thousands of entries (an `.npz` file cost more
to open than its mask). Nothing in it is unpickled or interpreted as code.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import weakref
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from experiments.backends.base import Prediction, Segmenter
from experiments.datasets.base import Sample, render_prompt
from sa2va_contract.files import WRITE_LOCK, atomic_writer

ProgressCallback = Callable[[int, int], None]

#: An entry's file: this header (magic, format version, whether a probability map
#: follows, height, width), the mask in packed bits, then the map, 8 bits a pixel.
_ENTRY_HEADER = struct.Struct("<4sBBII")
_ENTRY_MAGIC, _ENTRY_VERSION = b"S2VM", 1
#: Cache files' suffix; entries of the old `.npz` form are not read (computed again).
ENTRY_SUFFIX = ".mask"

log = logging.getLogger(__name__)


class DamagedEntry(ValueError):
    """A cache file that holds no mask of the shape it claims."""


class LazySegmenter:
    """A segmenter loaded on its first use: a worker whose masks are all cached never
    loads the model (on Sa2VA: no GPU copy, no minute of loading). Its fingerprint and
    whether it gives probabilities are known without loading it."""

    def __init__(self, fingerprint: str, gives_probabilities: bool, load: Callable[[], Segmenter]) -> None:
        self.fingerprint = fingerprint
        self.gives_probabilities = gives_probabilities
        self._load = load
        self._loaded: Segmenter | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def resolve(self) -> Segmenter:
        """The model itself, loaded now if it was not yet."""
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[Prediction]:
        return self.resolve().segment(images, prompts)

    def __getattr__(self, name: str):
        # What else a caller reads of the model (the trainable wrapper its weights).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)


def _encode(prediction: Prediction) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    shape = prediction.mask.shape
    bits = np.packbits(prediction.mask.astype(bool), axis=None)
    prob = None if prediction.prob is None else np.round(np.clip(prediction.prob, 0, 1) * 255).astype(np.uint8)
    return bits, prob, shape


def _decode(bits: np.ndarray, prob: np.ndarray | None, shape: tuple[int, int]) -> Prediction:
    mask = np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)
    return Prediction(mask=mask, prob=None if prob is None else prob.astype(np.float32) / 255.0)


class CachedSegmenter:
    """A Segmenter in front of another, counting the calls it could not save."""

    def __init__(self, segmenter: Segmenter, cache_dir: Path | None) -> None:
        self.segmenter = segmenter
        self.fingerprint = segmenter.fingerprint
        self.gives_probabilities = segmenter.gives_probabilities
        self.folder = None if cache_dir is None else Path(cache_dir) / _safe(segmenter.fingerprint)
        self._memory: dict[str, tuple[np.ndarray, np.ndarray | None, tuple[int, int]]] = {}
        #: id(image) -> (a weak reference to that image, its key); see `_image_key`.
        self._image_keys: dict[int, tuple[weakref.ref, str]] = {}
        #: (image, prompt) pairs the model was actually asked for.
        self.model_calls = 0
        self.disk_hits = 0
        #: Cache files found unreadable, deleted and computed again.
        self.damaged = 0

    # --- keys --------------------------------------------------------------------

    def _image_key(self, image: np.ndarray) -> str:
        # Hashing is cheap next to a model call, but RL steps look the same image up
        # thousands of times, so the key is memoised by id(). An id is reused once its
        # image is freed: the memo holds a weak reference and trusts an entry only
        # while it still points at this very image, and the entry goes with the image.
        memo = self._image_keys.get(id(image))
        if memo is not None and memo[0]() is image:
            return memo[1]
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=12)
        digest.update(repr(image.shape).encode())
        key = digest.hexdigest()
        try:
            ref = weakref.ref(image, self._forget(id(image)))
        except TypeError:  # an object without weak references (not an ndarray): no memo
            return key
        self._image_keys[id(image)] = (ref, key)
        return key

    def _forget(self, address: int):
        owner = weakref.ref(self)  # the callback must not keep the cache alive

        def forget(dead: weakref.ref) -> None:
            cache = owner()
            if cache is not None and cache._image_keys.get(address, (None,))[0] is dead:
                del cache._image_keys[address]

        return forget

    def _key(self, image: np.ndarray, prompt: str) -> str:
        prompt_digest = hashlib.blake2b(prompt.encode(), digest_size=8).hexdigest()
        return f"{self._image_key(image)}-{prompt_digest}"

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}{ENTRY_SUFFIX}"

    # --- lookups -----------------------------------------------------------------

    def _load(self, key: str):
        entry = self._memory.get(key)
        if entry is not None or self.folder is None:
            return entry
        path = self._path(key)
        try:
            entry = _read_entry(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            self._discard(path, err)
            return None
        self.disk_hits += 1
        self._memory[key] = entry
        return entry

    def _discard(self, path: Path, error: BaseException) -> None:
        """A damaged file goes, so that the entry computed again can take its place."""
        self.damaged += 1
        log.warning("mask cache: %s is damaged (%s); computing it again", path, error)
        try:
            path.unlink()
        except FileNotFoundError:
            pass  # another worker got there first

    def _store(self, key: str, entry) -> None:
        self._memory[key] = entry
        if self.folder is not None:
            self._write(key, entry)

    def _write(self, key: str, entry) -> None:
        bits, prob, (height, width) = entry
        header = _ENTRY_HEADER.pack(_ENTRY_MAGIC, _ENTRY_VERSION, prob is not None, height, width)
        # Not synced to disk: an entry lost to a crash is computed again.
        with WRITE_LOCK, atomic_writer(self._path(key), durable=False) as handle:
            handle.write(header + bits.tobytes() + (b"" if prob is None else prob.tobytes()))

    def segment(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        batch_size: int = 32,
        on_progress: ProgressCallback | None = None,
    ) -> list[Prediction]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        keys = [self._key(image, prompt) for image, prompt in zip(images, prompts)]
        entries = [self._load(key) for key in keys]
        missing: dict[str, int] = {}
        for i, (key, entry) in enumerate(zip(keys, entries)):
            if entry is None and key not in missing:
                missing[key] = i
        todo = list(missing.values())
        done = len(keys) - len(todo)
        if on_progress:
            on_progress(done, len(keys))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            predictions = self.segmenter.segment([images[i] for i in chunk], [prompts[i] for i in chunk])
            self.model_calls += len(chunk)
            for i, prediction in zip(chunk, predictions):
                self._store(keys[i], _encode(prediction))
            done += len(chunk)
            if on_progress:
                on_progress(min(done, len(keys)), len(keys))
        return [_decode(*self._memory[key]) for key in keys]

    def predict(self, sample: Sample, template: str) -> Prediction:
        """The backend's answer for one sample and one candidate prompt template."""
        return self.segment([sample.image], [render_prompt(template, sample)])[0]

    def warm(
        self,
        samples: Sequence[Sample],
        templates: Sequence[str],
        batch_size: int = 32,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        """Fill the cache for every (sample, template) pair, reporting progress."""
        images = [s.image for s in samples for _ in templates]
        prompts = [render_prompt(t, s) for s in samples for t in templates]
        self.segment(images, prompts, batch_size=batch_size, on_progress=on_progress)


    # --- the mask stage's side ------------------------------------------------------

    @property
    def cache_hits(self) -> int:
        """Pairs read from the disk cache instead of the model."""
        return self.disk_hits

    def on_disk(self, image: np.ndarray, prompt: str) -> bool:
        """Whether the pair's entry is in the cache, in memory or on disk (not read)."""
        key = self._key(image, prompt)
        return key in self._memory or (self.folder is not None and self._path(key).is_file())

    def missing(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[int]:
        """Indices of the first occurrence of each distinct pair not in the cache."""
        seen: set[str] = set()
        todo = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            key = self._key(image, prompt)
            if key in seen:
                continue
            seen.add(key)
            if key not in self._memory and (self.folder is None or not self._path(key).is_file()):
                todo.append(i)
        return todo

    def fill(self, images: Sequence[np.ndarray], prompts: Sequence[str],
             segmenter: Segmenter | None = None) -> int:
        """Compute the given pairs with `segmenter` (default: this cache's) and write
        them to disk only, not to memory (the stage holds none of the run's masks).
        Returns the pairs computed."""
        if self.folder is None:
            raise ValueError("a cache without a folder cannot be filled for other processes")
        predictions = (segmenter or self.segmenter).segment(list(images), list(prompts))
        for image, prompt, prediction in zip(images, prompts, predictions):
            self._write(self._key(image, prompt), _encode(prediction))
        with WRITE_LOCK:
            self.model_calls += len(predictions)
        return len(predictions)


def _read_entry(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """One cache file, checked to hold what `_write` writes: the header, then a mask of
    the size it says in packed bits, and a probability map of that size if it says so."""
    data = path.read_bytes()
    if len(data) < _ENTRY_HEADER.size:
        raise DamagedEntry(f"{len(data)} bytes: shorter than an entry's header")
    magic, version, has_prob, height, width = _ENTRY_HEADER.unpack_from(data)
    if magic != _ENTRY_MAGIC or version != _ENTRY_VERSION or has_prob > 1:
        raise DamagedEntry("no mask-cache entry (its header is not one)")
    packed = -(-height * width // 8)
    expected = _ENTRY_HEADER.size + packed + (height * width if has_prob else 0)
    if len(data) != expected:
        raise DamagedEntry(f"{len(data)} bytes for a {height}x{width} mask (an entry of that size has {expected})")
    bits = np.frombuffer(data, np.uint8, packed, _ENTRY_HEADER.size)
    prob = np.frombuffer(data, np.uint8, height * width, _ENTRY_HEADER.size + packed).reshape(height, width) \
        if has_prob else None
    return bits, prob, (height, width)


def _safe(fingerprint: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in fingerprint)[:80]
