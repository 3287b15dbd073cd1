"""How sure a mean Dice difference is: a paired bootstrap over images, combined with
the spread over seeds.

Every row of a table is scored on the same images, so a method and its reference are
compared image by image: the differences of one image are paired. Two things make a
mean difference uncertain: which images happened to be in the split (the bootstrap
resamples them, the same resample for every seed) and which seed training happened
to start from (the spread of the seeds' means, through Student's t for few seeds).
They are independent, so their half-widths add in quadrature:

    low  = mean - sqrt(image_below**2 + seed_half**2)
    high = mean + sqrt(image_above**2 + seed_half**2)

where image_below / image_above are the distances from the mean to the bootstrap's
2.5 % and 97.5 % points of the per-image differences averaged over seeds, and
seed_half = t(0.975, S - 1) * sd(seed means) / sqrt(S) (0 for one seed).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from sa2va_contract.evaluation import Interval

LEVEL = 0.95
#: Student's t at 0.975 for 1..30 degrees of freedom; past 30 the normal's 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
#: Bootstrap resamples: the 2.5 % point then rests on 100 of them.
DRAWS = 4000


def t975(degrees_of_freedom: int) -> float:
    if degrees_of_freedom < 1:
        raise ValueError("Student's t needs at least one degree of freedom")
    return _T975[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T975) else 1.96


def delta_interval(deltas: Sequence[Sequence[float]], draws: int = DRAWS, seed: int = 0) -> Interval:
    """The mean of per-image differences and its 95 % interval.

    `deltas` holds one sequence per seed, each with one difference (method minus
    reference) per image, the images in the same order for every seed. `seed` fixes
    the bootstrap's resamples, so a table is the same each time it is computed.
    """
    d = np.asarray(deltas, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError("deltas: one sequence of per-image differences per seed, at least one of each")
    seeds, images = d.shape
    mean = float(d.mean())
    per_image = d.mean(axis=0)
    rng = np.random.default_rng(seed)
    resampled = per_image[rng.integers(0, images, size=(draws, images))].mean(axis=1)
    lower, upper = np.percentile(resampled, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    image_below, image_above = max(0.0, mean - float(lower)), max(0.0, float(upper) - mean)
    seed_half = 0.0
    if seeds > 1:
        seed_half = t975(seeds - 1) * float(d.mean(axis=1).std(ddof=1)) / math.sqrt(seeds)
    return Interval(mean=mean, low=mean - math.hypot(image_below, seed_half),
                    high=mean + math.hypot(image_above, seed_half), level=LEVEL, seeds=seeds, images=images)
