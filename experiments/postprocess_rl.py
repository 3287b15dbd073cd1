"""Experiment 2: a PPO agent learns a sequence of mask operations that improves the
segmenter's mask for the default prompt.

`run(ctx)` is the worker entry point (`python -m experiments.run_one postprocess_rl
...` runs it alone). Phases: loading_model, caching_masks (the default prompt's masks
of the train and val splits through the mask cache, and described), training,
evaluating.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from stable_baselines3 import PPO

from experiments.envs import (
    POSTPROCESS_ENV_ID,
    PostProcessEnv,
    PostprocessTable,
    build_postprocess_table,
    prefill_first_operations,
)
from experiments.harness import WorkerContext
from experiments.mask_stage import await_pairs, report_mask_work
from experiments.intervals import delta_interval
from experiments.postprocess import OpSettings
from experiments.ppo_common import EpisodeOutcome, PhaseReporter, run_episodes, run_ppo_experiment
from sa2va_contract.config import PostprocessRLConfig


def env_kwargs(table: PostprocessTable, cfg: PostprocessRLConfig) -> dict:
    return {"table": table, "operations": cfg.operations, "settings": OpSettings.of(cfg), "max_steps": cfg.max_steps,
            "reward_scale": cfg.reward_scale, "step_penalty": cfg.step_penalty}


def make_env(table: PostprocessTable, cfg: PostprocessRLConfig):
    import gymnasium as gym

    return gym.make(POSTPROCESS_ENV_ID, disable_env_checker=True, **env_kwargs(table, cfg))


def edit_masks(model: PPO, table: PostprocessTable, cfg: PostprocessRLConfig) -> list[EpisodeOutcome]:
    """Each sample's deterministic episode; `answer` is the mask it ends with."""
    return run_episodes(model, [PostProcessEnv(**env_kwargs(table, cfg)) for _ in range(len(table))])


def score(model: PPO, table: PostprocessTable, cfg: PostprocessRLConfig) -> dict[str, float]:
    """Mean val Dice of the edited masks, of the starting masks, and the gain with its
    interval (a paired bootstrap over the images)."""
    outcomes = edit_masks(model, table, cfg)
    gains = np.array([o.info["dice_gain"] for o in outcomes])
    baseline = float(table.start_dice.mean())
    interval = delta_interval([gains])
    return {"dice_gain": float(gains.mean()), "mean_dice": baseline + float(gains.mean()), "baseline_dice": baseline,
            "dice_gain_low": interval.low, "dice_gain_high": interval.high,
            "mean_ops": float(np.mean([len(o.info["ops"]) for o in outcomes]))}


def build_tables(ctx: WorkerContext, segmenter, splits: dict[str, Sequence]) -> dict[str, PostprocessTable]:
    """The "caching_masks" phase: the default prompt's mask of every sample, and, for
    the train split, the states after each first operation. Progress counts each
    sample three times (mask fetched, described, first operations applied)."""
    backend = ctx.config.backend
    cfg: PostprocessRLConfig = ctx.experiment
    total = sum(3 * len(samples) for samples in splits.values())
    await_pairs(ctx, segmenter, splits=splits.__getitem__)
    report = PhaseReporter(ctx, "caching_masks")
    tables, offset = {}, 0
    for split, samples in splits.items():
        table = build_postprocess_table(samples, segmenter, backend.prompts, backend.default_prompt,
                                        cfg.min_component_area, on_progress=report.part(offset, total))
        offset += 2 * len(samples)
        if split == "train":
            prefill_first_operations(table, cfg.operations, OpSettings.of(cfg), on_progress=report.part(offset, total))
        offset += len(samples)
        tables[split] = table
    report(total, total)
    report_mask_work(ctx, segmenter)
    return tables


def run(ctx: WorkerContext) -> dict:
    cfg: PostprocessRLConfig = ctx.experiment
    summary, final, tables = run_ppo_experiment(ctx, build_tables, lambda table: make_env(table, cfg),
                                                lambda model, table: score(model, table, cfg))
    operations = PostProcessEnv(**env_kwargs(tables["val"], cfg)).actions
    return {**summary, "operations": operations, "mean_ops": final["mean_ops"]}
