"""Mask post-processing operations (OpenCV), the action set of the post-processing agent.

Morphology acts on binary masks. Where the backend gives probabilities the mask is
`prob > threshold` and the threshold itself can move; an editor keeps the threshold
and the morphology applied so far so that moving the threshold re-derives the mask
and re-applies the same morphology, whatever the order of the actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from sa2va_contract.config import MORPHOLOGY_OPS, STOP, THRESHOLD_OPS



@dataclass(frozen=True)
class OpSettings:
    kernel_size: int = 3
    min_component_area: int = 12
    bridge_size: int = 7
    threshold: float = 0.5
    threshold_step: float = 0.1

    @classmethod
    def of(cls, config) -> "OpSettings":
        """From a `PostprocessRLConfig` (or anything with the same fields)."""
        return cls(kernel_size=config.kernel_size, min_component_area=config.min_component_area,
                   bridge_size=config.bridge_size, threshold=config.threshold, threshold_step=config.threshold_step)


def _ellipse(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions (4-connected) that do not touch the image border become
    foreground: a flood fill from a zero frame around the image reaches exactly the
    background that touches the border; what it leaves is holes."""
    framed = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(framed, None, (0, 0), 1, flags=4)
    return mask | (framed[1:-1, 1:-1] == 0)


def drop_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    # Labelling and counting costs half of connectedComponentsWithStats on small masks.
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask.copy()
    keep = np.bincount(labels.ravel(), minlength=n) >= min_area
    keep[0] = False
    return keep[labels]


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def bridge_gaps(mask: np.ndarray, size: int) -> np.ndarray:
    """Connectivity repair: a closing with a large kernel, of which only the pieces that
    join two or more separate components are kept, so that gaps in a broken vessel
    are bridged without thickening everything else."""
    m = mask.astype(np.uint8)
    n, labels = cv2.connectedComponents(m, connectivity=8)
    if n <= 2:
        return mask.copy()
    closed = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _ellipse(size)).astype(bool)
    added = closed & ~mask
    n_added, added_labels = cv2.connectedComponents(added.astype(np.uint8), connectivity=8)
    if n_added <= 1:
        return mask.copy()
    # The components each added piece touches (labels in its 8-neighbourhood), for all
    # pieces at once as (piece, component) codes: an RL step applies this op often.
    ys, xs = np.nonzero(added_labels)
    pieces = added_labels[ys, xs].astype(np.int64) * n
    framed = np.pad(labels, 1)
    pairs = np.unique(np.concatenate([pieces + framed[ys + 1 + dy, xs + 1 + dx] for dy, dx in _NEIGHBOURS]))
    pairs = pairs[pairs % n > 0]
    joins = np.bincount(pairs // n, minlength=n_added) >= 2
    joins[0] = False
    return mask | joins[added_labels]


def apply_morphology(mask: np.ndarray, op: str, settings: OpSettings) -> np.ndarray:
    m = mask.astype(np.uint8)
    k = _ellipse(settings.kernel_size)
    if op == "dilate":
        return cv2.dilate(m, k).astype(bool)
    if op == "erode":
        return cv2.erode(m, k).astype(bool)
    if op == "open":
        return cv2.morphologyEx(m, cv2.MORPH_OPEN, k).astype(bool)
    if op == "close":
        return cv2.morphologyEx(m, cv2.MORPH_CLOSE, k).astype(bool)
    if op == "fill_holes":
        return fill_holes(mask.astype(bool))
    if op == "drop_small":
        return drop_small(mask.astype(bool), settings.min_component_area)
    if op == "bridge_gaps":
        return bridge_gaps(mask.astype(bool), settings.bridge_size)
    raise ValueError(f"unknown morphology operation {op!r}; known: {', '.join(MORPHOLOGY_OPS)}")


@dataclass
class MaskEditor:
    """The current mask of a post-processing episode."""

    mask: np.ndarray
    prob: np.ndarray | None
    settings: OpSettings
    threshold: float = field(init=False)
    applied: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.threshold = self.settings.threshold
        self._source = self.mask.astype(bool)

    def apply(self, op: str) -> np.ndarray:
        if op in THRESHOLD_OPS:
            if self.prob is None:
                return self.mask  # binary-only backend: thresholding cannot change anything
            step = self.settings.threshold_step if op == "threshold_up" else -self.settings.threshold_step
            self.threshold = float(np.clip(self.threshold + step, 0.05, 0.95))
            self._source = self.prob > self.threshold
            mask = self._source
            for done in self.applied:
                mask = apply_morphology(mask, done, self.settings)
            self.mask = mask
        else:
            self.applied.append(op)
            self.mask = apply_morphology(self.mask, op, self.settings)
        return self.mask


def apply_sequence(mask: np.ndarray, prob: np.ndarray | None, ops: Sequence[str], settings: OpSettings) -> np.ndarray:
    editor = MaskEditor(mask.astype(bool), prob, settings)
    for op in ops:
        if op == STOP:
            break
        editor.apply(op)
    return editor.mask
