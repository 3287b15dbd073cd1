"""The interval of a mean Dice difference, against examples worked by hand."""

import math

import numpy as np
import pytest

from experiments.intervals import delta_interval, t975


def test_one_seed_two_images_the_bootstrap_by_hand():
    """Differences 0 and 1: a resample of two images has mean 0 (both draws the first,
    p = 1/4), 0.5 (p = 1/2) or 1 (p = 1/4). Its 2.5 % point is 0 and its 97.5 % point
    is 1, so the interval is [0, 1] around the mean 0.5; it touches 0: within noise."""
    interval = delta_interval([[0.0, 1.0]])
    assert (interval.mean, interval.low, interval.high) == (0.5, 0.0, 1.0)
    assert interval.seeds == 1 and interval.images == 2 and interval.within_noise


def test_three_seeds_that_agree_on_every_image_give_the_seed_spread_alone():
    """Each seed gains the same on all five images (0.1, 0.2, 0.3): averaged over seeds
    every image gains 0.2, so resampling images changes nothing. The seed means have
    standard deviation 0.1; with Student's t at 2 degrees of freedom (4.303) the half
    width is 4.303 * 0.1 / sqrt(3) = 0.24843: [-0.04843, 0.44843], within noise."""
    interval = delta_interval([[0.1] * 5, [0.2] * 5, [0.3] * 5])
    assert interval.mean == pytest.approx(0.2)
    assert interval.low == pytest.approx(0.2 - 0.248434, abs=1e-6)
    assert interval.high == pytest.approx(0.2 + 0.248434, abs=1e-6)
    assert interval.within_noise


def test_images_and_seeds_combine_in_quadrature():
    """Seeds [0, 1] and [1, 2]: per image over seeds 0.5 and 1.5, whose bootstrap has
    its 2.5 % and 97.5 % points at 0.5 and 1.5, 0.5 either side of the mean 1.0. The seed
    means 0.5 and 1.5 have standard deviation sqrt(0.5); t at 1 degree of freedom is
    12.706, so the seed half width is 12.706 * sqrt(0.5) / sqrt(2) = 6.353. Together:
    sqrt(0.5**2 + 6.353**2) = 6.37264 either side."""
    interval = delta_interval([[0.0, 1.0], [1.0, 2.0]])
    half = math.hypot(0.5, 12.706 * math.sqrt(0.5) / math.sqrt(2))
    assert interval.mean == 1.0
    assert interval.low == pytest.approx(1.0 - half) and interval.high == pytest.approx(1.0 + half)


def test_a_clear_gain_excludes_zero_and_the_same_seed_gives_the_same_interval():
    rng = np.random.default_rng(1)
    gains = rng.normal(0.05, 0.02, (3, 200))
    first, again = delta_interval(gains), delta_interval(gains)
    assert first == again
    assert 0 < first.low < first.mean < first.high and not first.within_noise


def test_bad_shapes_and_t_table():
    with pytest.raises(ValueError):
        delta_interval([])
    assert t975(2) == 4.303 and t975(1000) == 1.96
    with pytest.raises(ValueError):
        t975(0)
