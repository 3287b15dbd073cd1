"""What both environments do the same way at the start of an episode and to an
observation."""

from __future__ import annotations

import numpy as np

#: Observations are clipped to this; features are built to lie in about [0, 1].
OBS_BOUND = 10.0


def episode_sample(rng: np.random.Generator, n_samples: int, options: dict | None) -> int:
    """The sample an episode is on: `options["sample"]` when given (evaluation plays
    sample i in env i), else a random one from the environment's own generator."""
    if options and "sample" in options:
        return int(options["sample"])
    return int(rng.integers(n_samples))


def clip_observation(obs: np.ndarray) -> np.ndarray:
    return np.clip(obs, -OBS_BOUND, OBS_BOUND, out=obs)
