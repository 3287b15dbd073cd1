"""Segmentation backends behind one interface, chosen by `backend.kind`."""

from __future__ import annotations

from pathlib import Path

from sa2va_contract.config import Config
from sa2va_contract.layout import MASK_CACHE_DIR

from experiments.backends.base import Prediction, Segmenter, TrainableSegmenter
from experiments.backends.cache import CachedSegmenter

__all__ = ["CachedSegmenter", "Prediction", "Segmenter", "TrainableSegmenter", "make_segmenter", "make_cached_segmenter",
           "make_trainable", "cache_dir_for"]


def make_segmenter(config: Config, device: str = "cpu") -> Segmenter:
    """The configured model, uncached."""
    backend = config.backend
    if backend.kind == "embedded":
        from experiments.backends.embedded import load_embedded

        return load_embedded(backend.weights, device=device, batch_size=backend.batch_size)
    from experiments.backends.sa2va import load_sa2va

    assert backend.model_path is not None  # the config validator guarantees it
    return load_sa2va(backend.model_path, backend.trust_remote_code, backend.dtype, backend.device_map)


def cache_dir_for(config: Config) -> Path:
    return config.backend.cache_dir or (config.run.logs_dir / MASK_CACHE_DIR)


def make_cached_segmenter(config: Config, device: str = "cpu") -> CachedSegmenter:
    """The configured model behind the shared mask cache: what experiments use."""
    return CachedSegmenter(make_segmenter(config, device), cache_dir_for(config))


def make_trainable(config: Config, device: str = "cpu", finetuned: Path | None = None):
    """The configured model in its trainable form (a Segmenter too), optionally with
    weights a fine-tuning run saved: the whole network for the embedded model, the
    mask-decoder path for Sa2VA."""
    if config.backend.kind == "embedded":
        from experiments.backends.embedded import load_embedded

        return load_embedded(finetuned or config.backend.weights, device=device, batch_size=config.backend.batch_size)
    from experiments.backends.sa2va import Sa2VAMaskDecoder

    trainable = Sa2VAMaskDecoder(make_segmenter(config, device))
    if finetuned is not None:
        trainable.load(finetuned)
    return trainable
