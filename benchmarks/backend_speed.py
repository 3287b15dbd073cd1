"""Segmentation costs: the embedded model per image over a grid of batch sizes and torch
threads (the fastest is the shipped default), Dice on a large mask, and a cached mask
lookup against a model call."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
#: Images each grid cell segments (in batches of its size), so every cell does the same work.
GRID_IMAGES = 32
#: Cells within this share of the fastest are counted as tied with it: on a shared
#: machine repeated runs of the grid differ by about that much.
TIE = 0.10
#: Rounds over the whole grid; each cell keeps its fastest round. Interleaving the
#: cells spreads other load on the machine evenly over them, so their ratios hold.
GRID_ROUNDS = 3


def _best_of(fn, repeats: int, clock=time.perf_counter) -> float:
    """Seconds of the fastest of `repeats` calls: the least disturbed by other load."""
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def thread_counts() -> tuple[int, ...]:
    cores = os.cpu_count() or 1
    return tuple(sorted({1, 2, cores} & set(range(1, min(cores, 4) + 1))))


def measure_grid(model, images, prompts, clock) -> dict[tuple[int, int], float]:
    """(batch size, threads) -> seconds per image on `clock`, the best of `GRID_ROUNDS`.

    On `time.process_time`, the CPU time of all of the process's threads: what a pool
    of workers filling every core pays per image, waits on a shared machine not
    counted (its wall time depends mostly on what else runs)."""
    import torch

    best: dict[tuple[int, int], float] = {}
    previous_threads, previous_batch = torch.get_num_threads(), model.batch_size
    try:
        for _ in range(GRID_ROUNDS):
            for threads in thread_counts():
                torch.set_num_threads(threads)
                for batch in BATCH_SIZES:
                    model.batch_size = batch
                    seconds = _best_of(lambda: model.segment(images, prompts), 1, clock) / len(images)
                    best[batch, threads] = min(best.get((batch, threads), float("inf")), seconds)
    finally:
        torch.set_num_threads(previous_threads)
        model.batch_size = previous_batch
    return best


def unfused_seconds(model, images, prompts, clock) -> float:
    """Per image, the same batches through the training form of the network (batch
    norm as its own pass), for the gain of the folded inference form."""
    import torch

    from experiments.backends.embedded import to_batch

    def run() -> None:
        with torch.inference_mode():
            for start in range(0, len(images), model.batch_size):
                batch, (h, w) = to_batch(images[start:start + model.batch_size], model.device)
                torch.sigmoid(model.net(batch, prompts[start:start + model.batch_size])[:, :h, :w]).numpy()

    return _best_of(run, GRID_ROUNDS, clock) / len(images)


class UnfoldedForm:
    """The embedded segmenter's trainable form as it was: the module's own forward,
    batch norm a pass of its own."""

    def __init__(self, model) -> None:
        self.model = model

    def mask_logits(self, images, prompts):
        from experiments.backends.embedded import to_batch

        batch, (h, w) = to_batch(images, self.model.device)
        return self.model.net.eval()(batch, list(prompts))[:, :h, :w]


def disk_read_seconds(model, folder: Path, images, prompts) -> float:
    """Per entry, reading distinct pairs from a cache folder into a new cache object
    (nothing in its memory), the fastest of a few rounds; the object's making untimed."""
    from experiments.backends.cache import CachedSegmenter

    CachedSegmenter(model, folder).segment(images, prompts)  # written once
    best = float("inf")
    for _ in range(5):
        fresh = CachedSegmenter(model, folder)
        start = time.perf_counter()
        fresh.segment(images, prompts)
        best = min(best, time.perf_counter() - start)
        assert fresh.model_calls == 0
    return best / len(images)


#: The fine-tuning step's forms, as `finetune_step_seconds` names them: (folded
#: network, batch in parts, threads for the parts).
STEP_FORMS = {
    "whole batch, 1 thread": (True, False, 1),
    "in parts, 1 thread": (True, True, 1),
    "in parts, 2 threads (as runs do)": (True, True, 2),
    "whole batch, batch norm unfolded": (False, False, 1),
}


def finetune_step_seconds(samples) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds of one fine-tuning step of the default config (its batch size,
    a reward network of the default width, Adam) in each of `STEP_FORMS`, each the
    fastest of interleaved rounds. The parts are those of `experiments.reward.parted`."""
    import torch

    from experiments.backends.embedded import load_embedded
    from experiments.datasets import render_prompt
    from experiments.reward.network import RewardNet, consensus_map
    from experiments.reward.parted import CPU_PARTS, BatchParts
    from experiments.reward_net import finetune_loss
    from sa2va_contract.config import RewardNetConfig

    cfg = RewardNetConfig()
    batch = samples[: cfg.finetune.batch_size]
    template = "the {target}"
    reward_net = RewardNet(width=cfg.reward.width).eval()
    for parameter in reward_net.parameters():
        parameter.requires_grad_(False)
    consensus = {s.id: consensus_map([s.mask]) for s in batch}  # any map costs the same
    steps, closers = {}, []
    for name, (folded, in_parts, threads) in STEP_FORMS.items():
        model = load_embedded()
        form = model if folded else UnfoldedForm(model)
        with torch.no_grad():
            anchors = {s.id: torch.sigmoid(model.mask_logits([s.image], [render_prompt(template, s)]))[0] for s in batch}
        optimiser = torch.optim.Adam(model.trainable_parameters(), lr=cfg.finetune.learning_rate)
        parts = BatchParts(model.trainable_parameters(), CPU_PARTS if in_parts else 1, threads)
        closers.append(parts.close)

        def step(form=form, anchors=anchors, optimiser=optimiser, parts=parts) -> None:
            def batch_loss(part: slice):
                return finetune_loss(form, reward_net, batch[part], template, consensus, anchors, cfg.reward.input_size,
                                     cfg.finetune.anchor_weight, "cpu")

            optimiser.zero_grad(set_to_none=True)
            parts.gradients(batch_loss, len(batch))
            optimiser.step()

        step()  # warm-up
        steps[name] = step
    best = {name: (float("inf"), float("inf")) for name in steps}
    try:
        for _ in range(GRID_ROUNDS):
            for name, step in steps.items():
                wall, cpu = time.perf_counter(), time.process_time()
                step()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    finally:
        for close in closers:
            close()
    return best


def main() -> None:
    import torch

    from experiments.backends.cache import CachedSegmenter
    from experiments.backends.embedded import CPU_THREADS, load_embedded
    from experiments.datasets import load_split, render_prompt
    from experiments.metrics import dice
    from sa2va_contract.config import BUILTIN_PROMPTS, BackendConfig, DatasetConfig

    default_batch = BackendConfig().batch_size
    torch.set_num_threads(CPU_THREADS)
    model = load_embedded(batch_size=default_batch)
    samples = load_split(DatasetConfig(limit=GRID_IMAGES), "val")
    images = [s.image for s in samples]
    prompts = [render_prompt(BUILTIN_PROMPTS[0], s) for s in samples]
    model.segment(images[:2], prompts[:2])  # warm-up: first call allocates

    load_before = os.getloadavg()[0]
    wall = measure_grid(model, images, prompts, time.perf_counter)
    per_core = measure_grid(model, images, prompts, time.process_time)
    fastest = min(per_core, key=per_core.get)
    batch1 = per_core[1, CPU_THREADS]
    default = per_core[default_batch, CPU_THREADS]
    unfused = unfused_seconds(model, images, prompts, time.process_time)
    step_forms = finetune_step_seconds(load_split(DatasetConfig(limit=GRID_IMAGES), "train"))

    rng = np.random.default_rng(0)
    big_pred, big_truth = rng.random((512, 512)) > 0.5, rng.random((512, 512)) > 0.5
    dice_s = _best_of(lambda: dice(big_pred, big_truth), 200)

    with tempfile.TemporaryDirectory() as folder:
        cached = CachedSegmenter(model, Path(folder))
        cached.predict(samples[0], BUILTIN_PROMPTS[0])
        lookup = _best_of(lambda: cached.predict(samples[0], BUILTIN_PROMPTS[0]), 200)
        disk = disk_read_seconds(model, Path(folder), images, prompts)
    call = default

    size = f"{samples[0].image.shape[1]}x{samples[0].image.shape[0]}"
    grid_table = Table(title=f"Embedded model per image ({size}, {GRID_IMAGES} images per cell, best of {GRID_ROUNDS} "
                             f"interleaved rounds; load {load_before:.1f} to {os.getloadavg()[0]:.1f} on "
                             f"{os.cpu_count()} cores). CPU ms: all threads' CPU time, the cost a pool filling "
                             "every core pays; wall ms: what one process waits, other load included")
    grid_table.add_column("batch")
    for threads in thread_counts():
        grid_table.add_column(f"{threads} thread{'s' if threads > 1 else ''}: CPU ms/image", justify="right")
        grid_table.add_column("vs fastest", justify="right")
        grid_table.add_column("wall ms/image", justify="right")
    for batch in BATCH_SIZES:
        cells = []
        for threads in thread_counts():
            mark = " *" if (batch, threads) == fastest else ""
            cells += [f"{per_core[batch, threads] * 1e3:.2f}{mark}", f"{per_core[batch, threads] / per_core[fastest]:.2f}x",
                      f"{wall[batch, threads] * 1e3:.2f}"]
        grid_table.add_row(str(batch), *cells)
    Console().print(grid_table)
    shipped = (default_batch, CPU_THREADS)
    if shipped == fastest:
        verdict = "the shipped default"
    elif per_core[shipped] <= per_core[fastest] * (1 + TIE):
        verdict = (f"tied with the shipped default (batch {default_batch}, {CPU_THREADS} thread: "
                   f"{per_core[shipped] / per_core[fastest]:.2f}x, within {TIE:.0%})")
    else:
        verdict = (f"NOT the shipped default (batch {default_batch}, {CPU_THREADS} thread: "
                   f"{per_core[shipped] / per_core[fastest]:.2f}x): change it")
    Console().print(f"fewest CPU ms per image: batch {fastest[0]}, {fastest[1]} thread(s), {verdict}")

    table = Table(title=f"Backend costs (CPU, {CPU_THREADS} torch thread, {size} images; model rows in CPU time)")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_row("embedded model, batch 1", f"{batch1 * 1e3:.2f} ms/image")
    table.add_row(f"embedded model, batch {default_batch} (default)", f"{default * 1e3:.2f} ms/image")
    table.add_row(f"  batch norm unfolded, batch {default_batch}", f"{unfused * 1e3:.2f} ms/image "
                                                                  f"({unfused / default:.2f}x)")
    whole_wall = step_forms["whole batch, 1 thread"][0]
    for name, (wall, cpu) in step_forms.items():
        table.add_row(f"fine-tuning step (batch 16): {name}",
                      f"{wall * 1e3:.0f} ms wall ({whole_wall / wall:.2f}x), {cpu * 1e3:.0f} ms CPU")
    table.add_row("Dice on 512x512", f"{dice_s * 1e6:.0f} µs")
    table.add_row("cached mask, in memory", f"{lookup * 1e6:.0f} µs")
    table.add_row(f"cached mask, from disk ({len(images)} distinct entries)", f"{disk * 1e6:.0f} µs")
    table.add_row("model call / in-memory lookup", f"{call / lookup:.0f}x")
    table.add_row("model call / disk lookup", f"{call / disk:.1f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
