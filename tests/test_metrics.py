"""Metrics against hand-computed values, including every empty-mask case."""

import numpy as np
import pytest

from experiments.metrics import all_metrics, dice, iou, precision, recall, set_iou


def masks(*rows: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


PRED = masks("##..", "##..", "....")  # 4 pixels
TRUTH = masks(".##.", ".##.", ".##.")  # 6 pixels, overlap 2


def test_hand_computed_values():
    assert dice(PRED, TRUTH) == pytest.approx(2 * 2 / (4 + 6))
    assert iou(PRED, TRUTH) == pytest.approx(2 / 8)
    assert recall(PRED, TRUTH) == pytest.approx(2 / 6)
    assert precision(PRED, TRUTH) == pytest.approx(2 / 4)


def test_empty_cases():
    empty = np.zeros((3, 4), bool)
    for metric in (dice, iou, recall, precision):
        assert metric(empty, empty) == 1.0  # nothing to find and nothing found
    assert dice(empty, TRUTH) == 0.0 and iou(empty, TRUTH) == 0.0
    assert recall(empty, TRUTH) == 0.0 and precision(empty, TRUTH) == 0.0
    assert dice(PRED, empty) == 0.0 and precision(PRED, empty) == 0.0 and recall(PRED, empty) == 0.0


def test_vectorised_over_a_stack_matches_one_by_one():
    rng = np.random.default_rng(0)
    preds = rng.random((7, 16, 16)) > 0.6
    truths = rng.random((7, 16, 16)) > 0.5
    preds[3] = False
    truths[3] = False
    stacked = all_metrics(preds, truths)
    for name, fn in (("dice", dice), ("iou", iou), ("recall", recall), ("precision", precision)):
        assert stacked[name].shape == (7,)
        np.testing.assert_allclose(stacked[name], [fn(p, t) for p, t in zip(preds, truths)])
    assert stacked["dice"][3] == 1.0


def test_dice_and_iou_are_related():
    rng = np.random.default_rng(1)
    preds, truths = rng.random((20, 8, 8)) > 0.5, rng.random((20, 8, 8)) > 0.5
    d, j = dice(preds, truths), iou(preds, truths)
    np.testing.assert_allclose(d, 2 * j / (1 + j))


def test_ciou_pools_pixels_giou_averages_masks():
    big_pred = np.zeros((10, 10), bool)
    big_pred[:, :5] = True  # 50 px
    big_truth = np.zeros((10, 10), bool)
    big_truth[:, :4] = True  # 40 px, all inside: IoU 0.8
    small_pred = np.zeros((10, 10), bool)
    small_pred[0, 0] = True
    small_truth = np.zeros((10, 10), bool)
    small_truth[9, 9] = True  # IoU 0
    result = set_iou([big_pred, small_pred], [big_truth, small_truth])
    assert result.ciou == pytest.approx(40 / (50 + 2))
    assert result.giou == pytest.approx((0.8 + 0.0) / 2)
    empty = np.zeros((2, 2), bool)
    assert set_iou([empty], [empty]).ciou == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((2, 2), bool), np.zeros((3, 3), bool))
