"""PPO training speed of both experiments with masks cached, against the same PPO
settings on a trivial environment with the same spaces, measured in one run; and
the model calls the mask cache saved.

    python -m benchmarks ppo
    python -m benchmarks.ppo_speed [-c configs/default.yaml] [-s KEY=VALUE] [--timesteps 8192]

The tables are built first, as the experiments' caching phase builds them (for
post-processing, with every first operation's state). Each training is then timed
alone (no evaluation or checkpoint in it), after one untimed rollout-and-update that
pays for first-call allocations. The trivial
environment returns constant observations, so its rate is what PPO itself costs
here: the ratio says how much of the time the real environments add.

"Model calls without cache" counts the model outputs the training episodes used
(the default prompt's mask at every reset, one per new prompt choice): what
environments calling the model at each step would have asked of it. "With cache" is
what filling an empty in-memory cache for the train split asked of the model: every
distinct (image, prompt) once; training itself then asks nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np
from rich.console import Console
from rich.table import Table


class TrivialEnv(gym.Env):
    """The spaces of a real environment, none of its work: constant observations,
    zero reward, episodes of `max_steps` steps."""

    metadata = {"render_modes": []}

    def __init__(self, observation_space: gym.spaces.Box, action_space: gym.spaces.Discrete, max_steps: int) -> None:
        self.observation_space = observation_space
        self.action_space = action_space
        self.max_steps = max_steps
        self._obs = np.zeros(observation_space.shape, observation_space.dtype)
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._steps = 0
        return self._obs.copy(), {}

    def step(self, action):
        self._steps += 1
        return self._obs.copy(), 0.0, self._steps >= self.max_steps, False, {}


@dataclass
class SpeedResult:
    steps: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.steps / self.seconds


def time_ppo(make_env: Callable[[], gym.Env], ppo_config, timesteps: int, seed: int = 0) -> tuple[SpeedResult, list]:
    """Steps per second of `learn(timesteps)` with the experiment's PPO settings;
    also the environments, for their counters."""
    from experiments.ppo_common import make_vec_env
    from experiments.ppo_model import build_ppo

    env = make_vec_env(make_env, ppo_config.n_envs)
    model = build_ppo(ppo_config, env, seed, "cpu")
    rollout = ppo_config.n_steps * ppo_config.n_envs
    model.learn(rollout)  # warm-up, untimed
    start = time.perf_counter()
    model.learn(timesteps, reset_num_timesteps=False)
    seconds = time.perf_counter() - start
    envs = [e.unwrapped for e in env.envs]
    env.close()
    return SpeedResult(model.num_timesteps - rollout, seconds), envs


def main(argv: list[str] | None = None) -> None:
    import torch

    from experiments import postprocess_rl, prompt_rl
    from experiments.backends import CachedSegmenter, cache_dir_for, make_segmenter
    from experiments.datasets import load_split
    from experiments.envs import build_postprocess_table, build_prompt_table, prefill_first_operations
    from experiments.postprocess import OpSettings
    from sa2va_contract.config import load_config

    parser = argparse.ArgumentParser(prog="python -m benchmarks ppo")
    parser.add_argument("--config", "-c", default="configs/default.yaml")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--timesteps", type=int, default=8192, help="timed timesteps per training")
    parser.add_argument("--repeats", type=int, default=2, help="trainings of each kind, best kept")
    args = parser.parse_args(argv if argv is not None else [])
    torch.set_num_threads(1)
    config = load_config(args.config, args.overrides)
    backend = config.backend
    # The model behind the run's disk cache, so that a second benchmark run is quick.
    model = CachedSegmenter(make_segmenter(config, "cpu"), cache_dir_for(config))
    train_samples = load_split(config.dataset, "train")

    def cold_cache() -> CachedSegmenter:
        # An empty cache in memory: it passes every distinct (image, prompt) on once,
        # which is what a run on an empty cache asks of the model.
        return CachedSegmenter(model, None)

    prompt_cache, post_cache = cold_cache(), cold_cache()
    prompt_table = build_prompt_table(train_samples, prompt_cache, backend.prompts, backend.default_prompt)
    post_table = build_postprocess_table(train_samples, post_cache, backend.prompts, backend.default_prompt,
                                         config.postprocess_rl.min_component_area)
    prefill_first_operations(post_table, config.postprocess_rl.operations, OpSettings.of(config.postprocess_rl))
    experiments = {
        "prompt_rl": (config.prompt_rl, prompt_cache, lambda: prompt_rl.make_env(prompt_table, config.prompt_rl)),
        "postprocess_rl": (config.postprocess_rl, post_cache,
                           lambda: postprocess_rl.make_env(post_table, config.postprocess_rl)),
    }
    table = Table(title=f"PPO training, CPU, 1 torch thread, {len(train_samples)} train images, best of "
                        f"{args.repeats} trainings of {args.timesteps:,} timed timesteps each")
    for column in ("experiment", "n_envs", "steps/s, cached masks", "steps/s, trivial env", "ratio",
                   "model calls without cache", "model calls with cache"):
        table.add_column(column, justify="left" if column == "experiment" else "right")
    for name, (cfg, cache, make_env) in experiments.items():
        probe = make_env().unwrapped
        reals, trivials, used = [], [], 0
        # Alternated and the best of each kept: load from other processes on a shared
        # machine slows one run or another, never speeds one up.
        for _ in range(args.repeats):
            real, envs = time_ppo(make_env, cfg.ppo, args.timesteps, cfg.seed)
            trivial, _ = time_ppo(lambda: TrivialEnv(probe.observation_space, probe.action_space, cfg.max_steps),
                                  cfg.ppo, args.timesteps, cfg.seed)
            reals.append(real.rate)
            trivials.append(trivial.rate)
            used = sum(e.masks_used for e in envs)
        table.add_row(name, str(cfg.ppo.n_envs), f"{max(reals):,.0f}", f"{max(trivials):,.0f}",
                      f"{max(reals) / max(trivials):.2f}", f"{used:,}", f"{cache.model_calls:,}")
    Console(width=130).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
