"""Segmentation backends behind one interface, chosen by `backend.kind`."""

from __future__ import annotations

from pathlib import Path

from sa2va_contract.config import Config
from sa2va_contract.layout import cache_dir_for

from experiments.backends.base import Prediction, Segmenter, TrainableSegmenter
from experiments.backends.cache import CachedSegmenter, LazySegmenter

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
    return load_sa2va(backend)


def make_cached_segmenter(config: Config, device: str = "cpu") -> CachedSegmenter:
    """The configured model behind the shared mask cache: what experiments use. Sa2VA
    loads on its first cache miss (its fingerprint needs no weights); the embedded
    model's fingerprint is a hash of its weights, which load in milliseconds."""
    if config.backend.kind == "sa2va":
        from experiments.backends.sa2va import Sa2VASegmenter, checkpoint_fingerprint, checkpoint_folder

        lazy = LazySegmenter(checkpoint_fingerprint(checkpoint_folder(str(config.backend.model_path))),
                             Sa2VASegmenter.gives_probabilities, lambda: make_segmenter(config, device))
        return CachedSegmenter(lazy, cache_dir_for(config))
    return CachedSegmenter(make_segmenter(config, device), cache_dir_for(config))


def make_trainable(config: Config, device: str = "cpu", finetuned: Path | None = None, base: Segmenter | None = None):
    """The configured model in its trainable form (a Segmenter too), optionally with
    weights a fine-tuning run saved: the whole network for the embedded model, the
    mask-decoder path for Sa2VA.

    `base` is the segmenter the worker already holds (cached or not). Sa2VA wraps its
    loaded model instead of loading a second copy (two copies of a 26B model do not
    fit); the wrapper trains float32 copies of its weights and never writes the model,
    so `base` keeps answering for the starting weights. The embedded model is tuned
    whole and in place, so it is loaded afresh (0.38 M parameters)."""
    if config.backend.kind == "embedded":
        from experiments.backends.embedded import load_embedded

        return load_embedded(finetuned or config.backend.weights, device=device, batch_size=config.backend.batch_size)
    from experiments.backends.sa2va_trainable import Sa2VAMaskDecoder

    if isinstance(base, CachedSegmenter):
        base = base.segmenter
    if isinstance(base, LazySegmenter):
        base = base.resolve()
    # Every fine-tuning image's frozen inputs stay in the memo: a smaller one would
    # re-run the whole predict_forward (generation included) for most steps.
    trainable = Sa2VAMaskDecoder(base if base is not None else make_segmenter(config, device),
                                 memo_size=config.reward_net.finetune.samples)
    if finetuned is not None:
        trainable.load(finetuned)
    return trainable
