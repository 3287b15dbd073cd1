"""One table, one set of images: every way of getting a mask scored side by side.

Rows, all computed on the same samples of one split (val by default):
    baseline         the default prompt, no post-processing
    prompt_policy    the prompt agent's final choice
    postprocess      the post-processing agent on the default prompt's mask
    combined         the prompt agent's choice, then the post-processing agent on its mask
    finetuned        the reward-guided fine-tuned segmenter with the default prompt
    reward_rerank    per image, the candidate (prompt x post-processing) mask that the
                     reward network scores highest, no labels used
    oracle_prompt    the best candidate prompt per image, chosen with the labels: an
                     upper bound, not a method (kind "upper_bound")
Each policy plays one deterministic episode per image and is scored on the mask it
ends on, never on the best mask it passed through. Every row keeps its per-sample
values and the sample ids they belong to, and `EvaluationTable.add` refuses a row
computed on other images. `sa2va-tui evaluate RUN` runs it and prints the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from experiments.metrics import row_from_masks
from sa2va_contract.config import Config
from sa2va_contract.evaluation import ROW_LABELS, EvaluationTable, baseline_label
from sa2va_contract.layout import BEST_MODEL, EVALUATION_FILE, FINAL_MODEL

ProgressCallback = Callable[[int, int], None]


# --- evaluating a run ------------------------------------------------------------------


def find_policy(run_dir: Path, experiment: str) -> Path | None:
    """The experiment's best model (by val score during training), else its final one."""
    for name in (BEST_MODEL, FINAL_MODEL):
        path = Path(run_dir) / experiment / name
        if path.is_file():
            return path
    return None


def evaluate_run(config: Config, run_dir: Path, split: str = "val",
                 on_progress: ProgressCallback | None = None) -> EvaluationTable:
    """Score the run's policies on `split`, save `<run_dir>/evaluation.json`."""
    import torch
    from stable_baselines3 import PPO

    from experiments import postprocess_rl, prompt_rl
    from experiments.backends import make_cached_segmenter
    from experiments.datasets import load_split
    from experiments.envs import build_postprocess_table, build_prompt_table

    torch.set_num_threads(1)
    run_dir = Path(run_dir)
    progress = on_progress or (lambda done, total: None)
    segmenter = make_cached_segmenter(config, "cpu")
    samples = load_split(config.dataset, split)
    ids = [s.id for s in samples]
    truths = [s.mask for s in samples]
    backend = config.backend
    k = len(backend.prompts)
    # Progress: every candidate mask fetched and described (2 k per sample), then one
    # unit per sample for each policy row and for the reward network's two rows.
    total = 2 * k * len(samples) + 5 * len(samples)
    prompts_table = build_prompt_table(samples, segmenter, backend.prompts, backend.default_prompt,
                                       on_progress=lambda fetched, _pairs: progress(fetched, total))
    done = 2 * k * len(samples)

    def masks_of(prompt_indices: Sequence[int]) -> list[np.ndarray]:
        return [segmenter.predict(s, backend.prompts[int(i)]).mask for s, i in zip(samples, prompt_indices)]

    table = EvaluationTable(split, ids)
    default = np.full(len(samples), backend.default_prompt)
    table.add(row_from_masks("baseline", baseline_label(backend.prompts[backend.default_prompt]), "baseline", ids,
                             masks_of(default), truths))

    prompt_path = find_policy(run_dir, "prompt_rl")
    chosen = None
    if prompt_path is None:
        table.missing["prompt_policy"] = "no prompt_rl model in the run folder"
    else:
        chosen = prompt_rl.choose_prompts(PPO.load(prompt_path, device="cpu"), prompts_table, config.prompt_rl)
        table.add(row_from_masks("prompt_policy", ROW_LABELS["prompt_policy"], "policy", ids, masks_of(chosen), truths,
                                 source=str(prompt_path)))
    done += len(samples)
    progress(done, total)

    post_path = find_policy(run_dir, "postprocess_rl")
    if post_path is None:
        table.missing["postprocess_policy"] = "no postprocess_rl model in the run folder"
    else:
        post_model = PPO.load(post_path, device="cpu")
        cfg = config.postprocess_rl
        starts = {"postprocess_policy": default}
        if chosen is not None:
            starts["combined"] = chosen
        for name, start in starts.items():
            post_table = build_postprocess_table(samples, segmenter, backend.prompts, start, cfg.min_component_area)
            edited = [o.answer for o in postprocess_rl.edit_masks(post_model, post_table, cfg)]
            source = str(post_path) if name != "combined" else f"{prompt_path} + {post_path}"
            table.add(row_from_masks(name, ROW_LABELS[name], "policy", ids, edited, truths, source=source))
            done += len(samples)
            progress(done, total)
    if chosen is None:
        table.missing["combined"] = "needs both policies"

    from experiments.reward.rows import evaluation_rows as reward_net_rows

    rows, missing = reward_net_rows(config, run_dir, samples, segmenter)
    for row in rows:
        table.add(row)
    table.missing.update(missing)
    done += 2 * len(samples)
    progress(done, total)

    oracle = prompts_table.dice.argmax(axis=1)
    table.add(row_from_masks("oracle_prompt", ROW_LABELS["oracle_prompt"], "upper_bound", ids, masks_of(oracle),
                             truths, note="uses the labels; not a method"))
    progress(total, total)
    table.save(run_dir / EVALUATION_FILE)
    return table
