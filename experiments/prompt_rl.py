"""Experiment 1: a PPO agent learns which candidate prompt to send to the segmenter.

`run(ctx)` is the worker entry point (`python -m experiments.run_one prompt_rl ...`
runs it alone). Phases: loading_model, caching_masks (every candidate mask of the
train and val splits through the mask cache, and described), training, evaluating.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from stable_baselines3 import PPO

from experiments.envs import PROMPT_ENV_ID, PromptSelectEnv, PromptTable, build_prompt_table
from experiments.harness import WorkerContext
from experiments.mask_stage import await_pairs, report_mask_work
from experiments.intervals import delta_interval
from experiments.ppo_common import PhaseReporter, run_episodes, run_ppo_experiment
from sa2va_contract.config import PromptRLConfig


def make_env(table: PromptTable, cfg: PromptRLConfig):
    import gymnasium as gym

    return gym.make(PROMPT_ENV_ID, table=table, max_steps=cfg.max_steps, reward_scale=cfg.reward_scale,
                    step_penalty=cfg.step_penalty, disable_env_checker=True)


def choose_prompts(model: PPO, table: PromptTable, cfg: PromptRLConfig) -> np.ndarray:
    """The prompt each sample's deterministic episode ends on."""
    envs = [PromptSelectEnv(table, cfg.max_steps, cfg.reward_scale, cfg.step_penalty) for _ in range(len(table))]
    return np.array([outcome.answer for outcome in run_episodes(model, envs)], np.int64)


def score(model: PPO, table: PromptTable, cfg: PromptRLConfig) -> dict[str, float]:
    """Mean val Dice of the policy's final prompt, of the default prompt, and the gain
    with its interval (a paired bootstrap over the images)."""
    chosen = choose_prompts(model, table, cfg)
    rows = np.arange(len(table))
    gains = table.dice[rows, chosen] - table.dice[:, table.default_prompt]
    policy = float(table.dice[rows, chosen].mean())
    baseline = float(table.dice[:, table.default_prompt].mean())
    interval = delta_interval([gains])
    return {"dice_gain": policy - baseline, "mean_dice": policy, "baseline_dice": baseline,
            "dice_gain_low": interval.low, "dice_gain_high": interval.high,
            "default_share": float(np.mean(chosen == table.default_prompt))}


def build_tables(ctx: WorkerContext, segmenter, splits: dict[str, Sequence]) -> dict[str, PromptTable]:
    """The "caching_masks" phase: one table per split, progress over all of them."""
    backend = ctx.config.backend
    k = len(backend.prompts)
    total = sum(2 * k * len(samples) for samples in splits.values())
    await_pairs(ctx, segmenter, splits=splits.__getitem__)
    report = PhaseReporter(ctx, "caching_masks")
    tables, offset = {}, 0
    for split, samples in splits.items():
        tables[split] = build_prompt_table(samples, segmenter, backend.prompts, backend.default_prompt,
                                           on_progress=report.part(offset, total))
        offset += 2 * k * len(samples)
    report_mask_work(ctx, segmenter)
    return tables


def run(ctx: WorkerContext) -> dict:
    cfg: PromptRLConfig = ctx.experiment
    summary, _, _ = run_ppo_experiment(ctx, build_tables, lambda table: make_env(table, cfg),
                                       lambda model, table: score(model, table, cfg))
    return summary
