"""How much the prompt and post-processing experiments can gain, and whether a policy
that sees no labels can learn to take some of it.

Headroom is measured with the labels (oracles, upper bounds): the best candidate
prompt per image, and the best sequence of up to `max_steps` post-processing
operations on the default prompt's mask. Learnability is measured without them, as
an agent would have to act: simple least-squares models on global image features
(and, for post-processing, statistics of the current mask) are fitted on the train
split and pick a prompt, or an operation sequence, per val image.

    python -m experiments.headroom [-c CONFIG] [--train-images N]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from experiments.backends.base import Prediction, Segmenter
from experiments.baselines import RidgeChooser
from experiments.datasets.base import Sample, render_prompt
from experiments.datasets import load_split
from experiments.datasets.builtin import KINDS
from experiments.metrics import dice
from experiments.postprocess import MaskEditor, OpSettings
from sa2va_contract.config import STOP, THRESHOLD_OPS
from sa2va_contract.config import Config, ConfigError, load_config

# --- observations (never computed from labels) ---------------------------------------

IMAGE_FEATURES = ("mean", "std", "p2", "p98", "illumination_range", "dark_share", "bright_share", "noise",
                  "fine_energy", "mid_energy", "coarse_energy", "sharpness", "speckle_share")
MASK_FEATURES = ("area", "components", "small_share", "below_threshold", "above_threshold", "holes", "boundary",
                 "mean_prob")


def image_features(image: np.ndarray) -> np.ndarray:
    """Global intensity, contrast, illumination, noise and scale statistics of an image."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    blur1 = cv2.GaussianBlur(gray, (0, 0), 1.0)
    blur3 = cv2.GaussianBlur(gray, (0, 0), 3.0)
    blur8 = cv2.GaussianBlur(gray, (0, 0), 8.0)
    blocks = cv2.resize(blur8, (4, 4), interpolation=cv2.INTER_AREA)
    median = np.median(gray)
    residual = np.abs(gray - cv2.medianBlur(image, 3).mean(axis=2) / 255.0)
    fine, mid, coarse = (gray - blur1).std(), (blur1 - blur3).std(), (blur3 - blur8).std()
    return np.array([
        gray.mean(), gray.std(), np.percentile(gray, 2), np.percentile(gray, 98),
        blocks.max() - blocks.min(), np.mean(blur8 < 0.6 * median), np.mean(blur8 > 0.8),
        np.median(residual), fine, mid, coarse, fine / (mid + 1e-6), np.mean(residual > 0.12),
    ], dtype=np.float64)


def mask_features(mask: np.ndarray, prob: np.ndarray | None, settings: OpSettings) -> np.ndarray:
    """Statistics of a predicted mask (and its probabilities) that hint at which
    operation would help: fragments, specks, holes, pixels close to the threshold."""
    m = mask.astype(np.uint8)
    area = max(1, int(m.sum()))
    n, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    small = np.sum(stats[1:, cv2.CC_STAT_AREA] < settings.min_component_area) if n > 1 else 0
    filled = cv2.morphologyEx(m, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    boundary = m.sum() - cv2.erode(m, np.ones((3, 3), np.uint8)).sum()
    if prob is None:
        below = above = 0.0
        mean_prob = 1.0
    else:
        t, step = settings.threshold, settings.threshold_step
        below = np.sum((prob > t - step) & (prob <= t)) / area
        above = np.sum((prob > t) & (prob <= t + step)) / area
        mean_prob = float(prob[mask].mean()) if mask.any() else 0.0
    return np.array([
        m.mean(), np.log1p(n - 1), small / max(1, n - 1), below, above, (filled.sum() - m.sum()) / area,
        boundary / area, mean_prob,
    ], dtype=np.float64)


def target_onehot(sample: Sample) -> np.ndarray:
    """The kind asked for is part of the query, not of the answer."""
    return np.array([sample.target == k for k in KINDS], dtype=np.float64)


# --- prompt choice ---------------------------------------------------------------------


@dataclass
class PromptTable:
    """Dice of every candidate prompt on every sample, and the default prompt's predictions."""

    samples: list[Sample]
    prompts: list[str]
    default: int
    dice: np.ndarray  # (N, K)
    default_predictions: list[Prediction]


def prompt_table(segmenter: Segmenter, samples: list[Sample], prompts: Sequence[str], default: int) -> PromptTable:
    images = [s.image for s in samples]
    truth = np.stack([s.mask for s in samples])
    scores = np.zeros((len(samples), len(prompts)))
    kept: list[Prediction] = []
    for k, template in enumerate(prompts):
        predictions = segmenter.segment(images, [render_prompt(template, s) for s in samples])
        scores[:, k] = dice(np.stack([p.mask for p in predictions]), truth)
        if k == default:
            kept = predictions
    return PromptTable(samples, list(prompts), default, scores, kept)


# --- post-processing -------------------------------------------------------------------


def usable_operations(config: Config, segmenter: Segmenter) -> list[str]:
    """The configured operations less STOP (the oracle stops by choosing a shorter
    sequence) and less thresholding where the backend gives no probabilities."""
    ops = [op for op in config.postprocess_rl.operations if op != STOP]
    if not segmenter.gives_probabilities:
        ops = [op for op in ops if op not in THRESHOLD_OPS]
    return ops


def sequence_dice(prediction: Prediction, truth: np.ndarray, ops: Sequence[str], settings: OpSettings,
                  max_steps: int) -> dict[tuple[str, ...], float]:
    """Dice after every sequence of at most max_steps operations (the empty one too),
    walking the tree of sequences so that each prefix is applied once."""
    root = MaskEditor(prediction.mask.astype(bool), prediction.prob, settings)
    scores = {(): float(dice(root.mask, truth))}
    frontier = [((), root)]
    for _ in range(max_steps):
        grown = []
        for seq, editor in frontier:
            for op in ops:
                child = copy.copy(editor)
                child.applied = list(editor.applied)
                child.apply(op)
                scores[seq + (op,)] = float(dice(child.mask, truth))
                grown.append((seq + (op,), child))
        frontier = grown
    return scores


# --- the measurements ------------------------------------------------------------------


def measure_headroom(config: Config, segmenter: Segmenter, split: str = "val", table: PromptTable | None = None) -> dict:
    """The oracle figures on one split: default prompt, best prompt per image, and the
    best post-processing sequence on the default prompt's mask."""
    samples = load_split(config.dataset, split) if table is None else table.samples
    prompts = config.backend.prompts
    default = config.backend.default_prompt
    table = table or prompt_table(segmenter, samples, prompts, default)
    best = table.dice.argmax(axis=1)
    shares = np.bincount(best, minlength=len(prompts)) / len(samples)
    settings, ops = OpSettings.of(config.postprocess_rl), usable_operations(config, segmenter)
    max_steps = config.postprocess_rl.max_steps
    post, chosen = [], Counter()
    for sample, prediction in zip(samples, table.default_predictions):
        scores = sequence_dice(prediction, sample.mask, ops, settings, max_steps)
        seq = max(scores, key=lambda s: (scores[s], -len(s)))
        post.append(scores[seq])
        chosen[" > ".join(seq) or "(none)"] += 1
    default_dice = float(table.dice[:, default].mean())
    return {
        "split": split,
        "images": len(samples),
        "default_prompt": prompts[default],
        "default_dice": default_dice,
        "prompt_dice": {p: float(d) for p, d in zip(prompts, table.dice.mean(axis=0))},
        "oracle_prompt_dice": float(table.dice.max(axis=1).mean()),
        "prompt_gain": float(table.dice.max(axis=1).mean() - default_dice),
        "best_prompt_share": {p: float(s) for p, s in zip(prompts, shares)},
        "max_best_share": float(shares.max()),
        "postprocess_operations": ops,
        "max_steps": max_steps,
        "oracle_postprocess_dice": float(np.mean(post)),
        "postprocess_gain": float(np.mean(post) - default_dice),
        "best_sequences": chosen.most_common(8),
    }


def condition_headroom(table: PromptTable) -> list[dict]:
    """Per condition of the built-in dataset: its images, the default prompt's Dice,
    the oracle prompt's, the gain and its share of the whole oracle gain, and the
    prompt best on average there. Empty for a dataset that names no condition."""
    conditions = [s.condition for s in table.samples]
    if any(c is None for c in conditions):
        return []
    default, oracle = table.dice[:, table.default], table.dice.max(axis=1)
    total = float((oracle - default).sum())
    out = []
    for name in dict.fromkeys(conditions):
        rows = np.array([c == name for c in conditions])
        gain = oracle[rows] - default[rows]
        out.append({"condition": name, "images": int(rows.sum()), "default_dice": float(default[rows].mean()),
                    "oracle_dice": float(oracle[rows].mean()), "gain": float(gain.mean()),
                    "share": float(gain.sum() / total) if total > 0 else 0.0,
                    "best_prompt": table.prompts[int(table.dice[rows].mean(axis=0).argmax())]})
    return out


def measure_learnability(config: Config, segmenter, measured: PromptTable, train_images: int = 400) -> dict:
    """Choosers fitted on the train split, picking per image of the measured split: a
    prompt, by the evaluation's supervised chooser (the prompt policy's first
    observation, its penalty chosen on val), and a post-processing sequence of at most
    two operations from image features and the default mask's statistics."""
    from experiments.baselines import SupervisedChooser
    from experiments.envs import build_prompt_table

    train_config = config.model_copy(deep=True)
    train_config.dataset.limit = train_images
    train_samples = load_split(train_config.dataset, "train")
    train = prompt_table(segmenter, train_samples, measured.prompts, measured.default)

    def described(samples):
        return build_prompt_table(samples, segmenter, measured.prompts, measured.default)

    chooser = SupervisedChooser(described(train_samples), described(load_split(config.dataset, "val")))
    picked = chooser.choose(described(measured.samples))
    prompt_dice = float(measured.dice[np.arange(len(picked)), picked].mean())
    default_dice = float(measured.dice[:, measured.default].mean())
    val = measured

    def observe(table: PromptTable) -> np.ndarray:
        return np.stack([np.concatenate([image_features(s.image), target_onehot(s)]) for s in table.samples])

    x_train, x_val = observe(train), observe(val)

    settings = OpSettings.of(config.postprocess_rl)
    ops = usable_operations(config, segmenter)
    sequences = [()] + [seq for n in (1, 2) for seq in itertools.product(ops, repeat=n)]

    def post(table: PromptTable, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats, scores = [], []
        for sample, pred, xi in zip(table.samples, table.default_predictions, x):
            table_scores = sequence_dice(pred, sample.mask, ops, settings, 2)
            scores.append([table_scores[s] for s in sequences])
            feats.append(np.concatenate([xi, mask_features(pred.mask, pred.prob, settings)]))
        return np.array(feats), np.array(scores)

    f_train, s_train = post(train, x_train)
    f_val, s_val = post(val, x_val)
    chosen = RidgeChooser().fit(f_train, s_train - s_train[:, :1]).choose(f_val)
    post_dice = float(s_val[np.arange(len(chosen)), chosen].mean())
    return {
        "train_images": len(train.samples),
        "chooser_penalty": chooser.penalty,
        "features": list(IMAGE_FEATURES) + [f"target={k}" for k in KINDS],
        "chosen_prompt_dice": prompt_dice,
        "chosen_prompt_oracle_share": (prompt_dice - default_dice) / max(1e-12, float(
            measured.dice.max(axis=1).mean()) - default_dice),
        "chosen_prompt_gain": prompt_dice - default_dice,
        "chosen_prompt_share": {p: float(s) for p, s in zip(val.prompts, np.bincount(picked, minlength=len(val.prompts)) / len(picked))},
        "chosen_postprocess_dice": post_dice,
        "chosen_postprocess_gain": post_dice - default_dice,
    }


def _print_report(head: dict, conditions: list[dict], learn: dict | None) -> None:
    print(f"{head['split']} split, {head['images']} images; default prompt {head['default_prompt']!r}")
    print(f"  mean Dice, default prompt                   {head['default_dice']:.4f}")
    print(f"  mean Dice, best prompt per image (oracle)   {head['oracle_prompt_dice']:.4f}   "
          f"gain {head['prompt_gain']:+.4f}")
    print(f"  mean Dice, default + best <= {head['max_steps']} ops (oracle)   {head['oracle_postprocess_dice']:.4f}   "
          f"gain {head['postprocess_gain']:+.4f}")
    print("  per prompt: mean Dice, share of images where it is the best")
    for prompt, d in head["prompt_dice"].items():
        print(f"    {prompt:<45} {d:.4f}  {head['best_prompt_share'][prompt]:6.1%}")
    print(f"  largest best-prompt share {head['max_best_share']:.1%}")
    print("  most frequent best post-processing sequences:")
    for seq, count in head["best_sequences"]:
        print(f"    {count:4d}  {seq}")
    if conditions:
        print("  per condition: images, mean Dice of the default and the oracle prompt, the gain, its share of "
              "the whole oracle gain, the prompt best on average there")
        for c in conditions:
            print(f"    {c['condition']:<12} {c['images']:4d}  {c['default_dice']:.4f}  {c['oracle_dice']:.4f}  "
                  f"{c['gain']:+.4f}  {c['share']:6.1%}  {c['best_prompt']}")
        largest = max(conditions, key=lambda c: c["share"])
        print(f"  largest condition share {largest['share']:.1%} ({largest['condition']})")
    if learn is None:
        return
    print(f"learnability: choosers fitted on {learn['train_images']} train images, no labels of this split")
    print(f"  supervised chooser (the evaluation's bar)    {learn['chosen_prompt_dice']:.4f}   "
          f"gain {learn['chosen_prompt_gain']:+.4f}  ({learn['chosen_prompt_oracle_share']:.0%} of the oracle's; "
          f"penalty {learn['chooser_penalty']:g}, chosen on val)")
    print(f"  <= 2 ops chosen from image + mask features  {learn['chosen_postprocess_dice']:.4f}   "
          f"gain {learn['chosen_postprocess_gain']:+.4f}")


def print_headroom(config, split: str = "val", train_images: int = 400) -> None:
    """Measure and print everything: the `headroom` command."""
    import torch

    from experiments.backends import make_cached_segmenter

    torch.set_num_threads(min(2, torch.get_num_threads()))
    # Through the mask cache: a run, its evaluation and this command share the masks.
    segmenter = make_cached_segmenter(config)
    samples = load_split(config.dataset, split)
    table = prompt_table(segmenter, samples, config.backend.prompts, config.backend.default_prompt)
    head = measure_headroom(config, segmenter, split, table=table)
    learn = measure_learnability(config, segmenter, table, train_images) if train_images else None
    _print_report(head, condition_headroom(table), learn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.headroom", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", type=Path, default=None, help="config file (default: all defaults)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--train-images", type=int, default=400, help="train images for the learnability check (0: skip)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print_headroom(config, args.split, args.train_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
