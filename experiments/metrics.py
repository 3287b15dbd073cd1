"""Mask quality metrics: Dice, IoU, Recall, Precision per mask, cIoU and gIoU over a set.

Every function takes boolean masks of shape (H, W) or a stack (N, H, W) and is
vectorised over the stack. Empty cases follow the convention of the referring
segmentation literature: when prediction and truth are both empty the mask is
perfect (1.0); when only one is empty the overlap metrics are 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sa2va_contract.evaluation import METRIC_NAMES, EvaluationRow


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, truth {truth.shape}")
    axes = (-2, -1)
    tp = np.count_nonzero(pred & truth, axis=axes)
    n_pred = np.count_nonzero(pred, axis=axes)
    n_truth = np.count_nonzero(truth, axis=axes)
    return tp, n_pred, n_truth


def _ratio(num: np.ndarray, den: np.ndarray, both_empty: np.ndarray) -> np.ndarray | float:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    out = np.where(both_empty, 1.0, out)
    return float(out) if out.ndim == 0 else out


def dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray | float:
    tp, n_pred, n_truth = _counts(pred, truth)
    return _ratio(2 * tp, n_pred + n_truth, (n_pred == 0) & (n_truth == 0))


def iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray | float:
    tp, n_pred, n_truth = _counts(pred, truth)
    return _ratio(tp, n_pred + n_truth - tp, (n_pred == 0) & (n_truth == 0))


def recall(pred: np.ndarray, truth: np.ndarray) -> np.ndarray | float:
    """Share of the truth that the prediction covers; a prediction of an empty truth is
    perfect only when it is empty too."""
    tp, n_pred, n_truth = _counts(pred, truth)
    return _ratio(tp, n_truth, (n_pred == 0) & (n_truth == 0))


def precision(pred: np.ndarray, truth: np.ndarray) -> np.ndarray | float:
    tp, n_pred, n_truth = _counts(pred, truth)
    return _ratio(tp, n_pred, (n_pred == 0) & (n_truth == 0))


def all_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray | float]:
    """The four per-mask metrics from one pass over the pixels."""
    tp, n_pred, n_truth = _counts(pred, truth)
    both_empty = (n_pred == 0) & (n_truth == 0)
    return {
        "dice": _ratio(2 * tp, n_pred + n_truth, both_empty),
        "iou": _ratio(tp, n_pred + n_truth - tp, both_empty),
        "recall": _ratio(tp, n_truth, both_empty),
        "precision": _ratio(tp, n_pred, both_empty),
    }


@dataclass(frozen=True)
class SetIoU:
    """Sa2VA's evaluation figures over a set: cIoU pools intersections and unions over all
    masks (large objects weigh more); gIoU is the mean of per-mask IoU."""

    ciou: float
    giou: float


def set_iou(preds: list[np.ndarray] | np.ndarray, truths: list[np.ndarray] | np.ndarray) -> SetIoU:
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} ground-truth masks")
    if len(preds) == 0:
        raise ValueError("cIoU and gIoU need at least one mask")
    inter = union = 0
    per_mask = []
    for pred, truth in zip(preds, truths):
        tp, n_pred, n_truth = _counts(pred, truth)
        inter += int(tp)
        union += int(n_pred + n_truth - tp)
        per_mask.append(iou(pred, truth))
    ciou = 1.0 if union == 0 else inter / union
    return SetIoU(ciou=float(ciou), giou=float(np.mean(per_mask)))


def row_from_masks(name: str, label: str, kind: str, sample_ids: Sequence[str], masks: Sequence[np.ndarray],
                   truths: Sequence[np.ndarray], source: str | None = None, note: str = "") -> EvaluationRow:
    """An evaluation row from the final mask of each sample and its label."""
    if not (len(sample_ids) == len(masks) == len(truths)):
        raise ValueError(f"{len(sample_ids)} ids, {len(masks)} masks, {len(truths)} labels")
    per_sample = [all_metrics(mask, truth) for mask, truth in zip(masks, truths)]
    values = {metric: [float(m[metric]) for m in per_sample] for metric in METRIC_NAMES}
    return EvaluationRow(name, label, kind, list(sample_ids), values, source, note)
