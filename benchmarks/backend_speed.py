"""Segmentation costs: the embedded model per image, Dice on a large mask, and a cached
mask lookup against a model call."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


def _best_of(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls: the least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    import torch

    from experiments.backends.cache import CachedSegmenter
    from experiments.backends.embedded import load_embedded
    from experiments.datasets import load_split, render_prompt
    from experiments.metrics import dice
    from sa2va_contract.config import BUILTIN_PROMPTS, DatasetConfig

    torch.set_num_threads(1)
    model = load_embedded()
    samples = load_split(DatasetConfig(limit=32), "val")
    images = [s.image for s in samples]
    prompts = [render_prompt(BUILTIN_PROMPTS[0], s) for s in samples]
    model.segment(images[:2], prompts[:2])  # warm-up: first call allocates

    batch1 = _best_of(lambda: model.segment(images[:1], prompts[:1]), 20)
    batch32 = _best_of(lambda: model.segment(images, prompts), 5) / len(images)

    rng = np.random.default_rng(0)
    big_pred, big_truth = rng.random((512, 512)) > 0.5, rng.random((512, 512)) > 0.5
    dice_s = _best_of(lambda: dice(big_pred, big_truth), 200)

    with tempfile.TemporaryDirectory() as folder:
        cached = CachedSegmenter(model, Path(folder))
        cached.predict(samples[0], BUILTIN_PROMPTS[0])
        lookup = _best_of(lambda: cached.predict(samples[0], BUILTIN_PROMPTS[0]), 200)
        disk = _best_of(lambda: CachedSegmenter(model, Path(folder)).predict(samples[0], BUILTIN_PROMPTS[0]), 20)
    call = batch1

    table = Table(title=f"Backend costs (CPU, 1 torch thread, {samples[0].image.shape[1]}x{samples[0].image.shape[0]} images)")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_row("embedded model, batch 1", f"{batch1 * 1e3:.2f} ms/image")
    table.add_row("embedded model, batch 32", f"{batch32 * 1e3:.2f} ms/image")
    table.add_row("Dice on 512x512", f"{dice_s * 1e6:.0f} µs")
    table.add_row("cached mask, in memory", f"{lookup * 1e6:.0f} µs")
    table.add_row("cached mask, from disk (new cache object)", f"{disk * 1e6:.0f} µs")
    table.add_row("model call / in-memory lookup", f"{call / lookup:.0f}x")
    table.add_row("model call / disk lookup", f"{call / disk:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
