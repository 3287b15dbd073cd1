"""Retrain the embedded segmentation network on the built-in dataset, reproducibly.

The network learns from train images, each prompted with the expression that names
the condition it was drawn under ("the faint vessels"), whatever the dataset's
`expressions` setting; a share of them is prompted with the plain expression ("the
vessels") instead, as annotators do not always say what makes an image hard. That
is what makes the prompt matter: the plain prompt is a compromise over all
conditions, a prompt that names the image's condition is better.

Fixed seeds, deterministic algorithms, a fixed number of steps and a fixed thread
count make two runs on one machine write the same weights. It fits in 15 minutes
on two CPU cores.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from experiments.backends.embedded import EmbeddedSegmenter, FiLMUNet, save_weights, to_batch, weights_hash
from experiments.datasets.base import render_prompt
from experiments.datasets.builtin import PLAIN_TEMPLATE, generate
from experiments.metrics import dice
from sa2va_contract.config import Config


@dataclass(frozen=True)
class TrainSettings:
    """What a training run does; stored with the weights."""

    steps: int = 1600
    batch_size: int = 16
    #: Distinct training images (train split indices 0..pool_size-1), seen under the
    #: eight flips and rotations of the square.
    pool_size: int = 3000
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    #: Share of training prompts replaced by the plain expression.
    plain_rate: float = 0.15
    seed: int = 0
    #: One thread: on two cores shared with other work, two threads contend and run
    #: several times slower, and a fixed count keeps float sums, hence weights, the same.
    threads: int = 1


def train_embedded(config: Config, out: Path, minutes_budget: float | None = None, progress: bool = True,
                   settings: TrainSettings = TrainSettings()) -> dict:
    """Train from scratch and write the weights to `out` atomically; returns a summary.

    `minutes_budget` stops training early when the wall clock runs out (the summary
    says so); a run that stops early is no longer reproducible, since where it stops
    depends on the machine's speed.
    """
    started = time.perf_counter()
    with _deterministic(settings.seed, settings.threads):
        pool = _Pool(config, settings)
        net = FiLMUNet().to(memory_format=torch.channels_last)
        optimiser = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _lr_factor(step, settings))
        rng = np.random.default_rng(settings.seed)
        losses: list[float] = []
        stopped_early = False
        with _progress_bar(progress) as bar:
            task = bar.add_task("training", total=settings.steps, loss=float("nan"))
            net.train()
            for step in range(settings.steps):
                if minutes_budget is not None and time.perf_counter() - started > minutes_budget * 60:
                    stopped_early = True
                    break
                images, masks, prompts = pool.batch(rng, settings.batch_size)
                batch, _ = to_batch(images, "cpu")
                logits = net(batch, prompts)
                loss = _loss(logits, torch.from_numpy(masks))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(loss.item())
                bar.update(task, advance=1, loss=float(np.mean(losses[-50:])))
        net.eval()
        size = save_weights(net, out, meta={"settings": asdict(settings), "steps_done": len(losses)})
        evaluation = _evaluate(net, config)
    return {
        "weights": str(out),
        "size_bytes": size,
        "fingerprint": weights_hash(net.state_dict()),
        "parameters": sum(p.numel() for p in net.parameters()),
        "steps": len(losses),
        "images_seen": len(losses) * settings.batch_size,
        "stopped_early": stopped_early,
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "minutes": (time.perf_counter() - started) / 60,
        **evaluation,
    }


class _Pool:
    """The training images in memory, and batches drawn from them with augmentation."""

    def __init__(self, config: Config, settings: TrainSettings) -> None:
        size, seed = config.dataset.image_size, config.dataset.seed
        drawn = [generate(seed, "train", i, size) for i in range(settings.pool_size)]
        samples = [sample for sample, _ in drawn]
        self.images = np.stack([s.image for s in samples])
        self.masks = np.stack([s.mask for s in samples])
        self.expressions = [render_prompt(condition.template, s) for s, condition in drawn]
        self.plain = [render_prompt(PLAIN_TEMPLATE, s) for s in samples]
        self.plain_rate = settings.plain_rate
        self._order: list[int] = []

    def batch(self, rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
        images, masks, prompts = [], [], []
        for _ in range(n):
            if not self._order:
                self._order = list(rng.permutation(len(self.images)))
            i = self._order.pop()
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            image, mask = np.rot90(self.images[i], k), np.rot90(self.masks[i], k)
            if flip:
                image, mask = image[:, ::-1], mask[:, ::-1]
            images.append(np.ascontiguousarray(image))
            masks.append(mask)
            prompts.append(self.plain[i] if rng.random() < self.plain_rate else self.expressions[i])
        return images, np.stack(masks).astype(np.float32), prompts


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy plus soft Dice per image: the Dice term keeps thin,
    sparse targets from being drowned by the background."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((1, 2))
    soft_dice = (2 * inter + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
    return bce + (1 - soft_dice).mean()


def _lr_factor(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    done = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + np.cos(np.pi * min(1.0, done)))


def _evaluate(net: FiLMUNet, config: Config) -> dict:
    """Val Dice with the plain prompt and with the prompt naming each image's condition."""
    drawn = [generate(config.dataset.seed, "val", i, config.dataset.image_size) for i in range(config.dataset.sizes.val)]
    samples = [sample for sample, _ in drawn]
    segmenter = EmbeddedSegmenter(net)
    images = [s.image for s in samples]
    truth = np.stack([s.mask for s in samples])
    plain = segmenter.segment(images, [render_prompt(PLAIN_TEMPLATE, s) for s in samples])
    described = segmenter.segment(images, [render_prompt(condition.template, s) for s, condition in drawn])
    return {
        "val_images": len(samples),
        "val_dice_plain": float(dice(np.stack([p.mask for p in plain]), truth).mean()),
        "val_dice_condition": float(dice(np.stack([p.mask for p in described]), truth).mean()),
    }


@contextmanager
def _deterministic(seed: int, threads: int):
    """Seeds, deterministic kernels and a fixed thread count, restored afterwards."""
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
