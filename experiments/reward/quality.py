"""The reward network's training set (every candidate mask and perturbed copies, with
their true Dice) and the statistics its quality is judged by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from experiments.datasets import Sample, render_prompt
from experiments.metrics import dice
from experiments.reward.network import consensus_map, images_to_tensor, resize_maps


PERTURBATIONS = ("erode", "dilate", "shift", "holes", "blobs", "partial")


def perturb(mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong mask: the kinds of error a segmenter makes."""
    h, w = mask.shape
    m = mask.astype(np.uint8)
    if kind in ("erode", "dilate"):
        size = int(rng.integers(2, 6)) * 2 - 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        return (cv2.erode(m, kernel) if kind == "erode" else cv2.dilate(m, kernel)).astype(bool)
    if kind == "shift":
        dy, dx = rng.integers(-h // 10, h // 10 + 1), rng.integers(-w // 10, w // 10 + 1)
        return np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
    if kind in ("holes", "blobs"):
        out = m.copy()
        for _ in range(int(rng.integers(2, 7))):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            if kind == "holes" and mask.any():
                ys, xs = np.nonzero(mask)
                pick = int(rng.integers(0, len(xs)))
                centre = (int(xs[pick]), int(ys[pick]))
            axes = (int(rng.integers(2, max(3, w // 8))), int(rng.integers(2, max(3, h // 8))))
            cv2.ellipse(out, centre, axes, float(rng.uniform(0, 180)), 0, 360, 0 if kind == "holes" else 1, -1)
        return out.astype(bool)
    if kind == "partial":
        if not mask.any():
            return mask.copy()
        # Cut along a random direction at a quantile of the mask's own extent, so the
        # cut always falls through the object and drops 20-70 % of it.
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        along = xx * np.cos(angle) + yy * np.sin(angle)
        cut = np.quantile(along[mask], rng.uniform(0.3, 0.8))
        return mask & (along < cut)
    raise ValueError(f"unknown perturbation {kind!r}")


@dataclass
class QualitySet:
    """(image, mask, true Dice) triples; `groups` names the image of each mask and
    `candidate` marks masks straight from a candidate prompt (for pick-the-best)."""

    images: torch.Tensor  # (n_images, 3, S, S) float
    consensus: torch.Tensor  # (n_images, 1, S, S) float
    queries: list[str]  # (n_images,) what is to be segmented in each image
    masks: torch.Tensor  # (n_pairs, 1, S, S) float
    labels: torch.Tensor  # (n_pairs,)
    image_index: torch.Tensor  # (n_pairs,) long
    candidate: np.ndarray  # (n_pairs,) bool

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, rows: torch.Tensor | slice, device: str) -> tuple:
        """The network's inputs for some pairs: images, masks, consensus, queries."""
        index = self.image_index[rows]
        return (self.images[index].to(device), self.masks[rows].to(device), self.consensus[index].to(device),
                [self.queries[int(i)] for i in index])


def build_quality_set(
    samples: Sequence[Sample],
    candidates: dict[str, list[np.ndarray]],
    query_template: str,
    perturbations_per_mask: int,
    size: int,
    seed: int,
) -> QualitySet:
    rng = np.random.default_rng(seed)
    masks, labels, index, candidate = [], [], [], []
    for i, sample in enumerate(samples):
        for mask in candidates[sample.id]:
            variants = [(mask, True)] + [
                (perturb(mask, PERTURBATIONS[rng.integers(len(PERTURBATIONS))], rng), False)
                for _ in range(perturbations_per_mask)
            ]
            for variant, is_candidate in variants:
                masks.append(variant)
                labels.append(float(dice(variant, sample.mask)))
                index.append(i)
                candidate.append(is_candidate)
    images = resize_maps(images_to_tensor([s.image for s in samples]), size)
    consensus = resize_maps(torch.stack([consensus_map(candidates[s.id]) for s in samples]), size)
    mask_tensor = resize_maps(torch.from_numpy(np.stack(masks)).float().unsqueeze(1), size)
    queries = [render_prompt(query_template, s) for s in samples]
    return QualitySet(images, consensus, queries, mask_tensor, torch.tensor(labels), torch.tensor(index),
                      np.array(candidate))


# --- statistics ----------------------------------------------------------------------


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks, ties sharing the mean of their positions."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(a)), _ranks(np.asarray(b)))


def pick_best_accuracy(predicted: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> float:
    """How often the mask ranked first by the network is (one of) the truly best."""
    hits = []
    for group in np.unique(groups):
        members = groups == group
        if members.sum() < 2:
            continue
        best = truth[members].max()
        hits.append(truth[members][int(np.argmax(predicted[members]))] >= best - 1e-9)
    return float(np.mean(hits)) if hits else 0.0
