"""One table, one set of images: every way of getting a mask scored side by side.

Train learns, val chooses, test reports. Rows, all computed on the same samples of
the reported split (test by default; val, with a warning, for a dataset without one):

    baseline            the default prompt, no post-processing
    own_expression      the dataset's own expression for each image (where it gives
                        per-image ones)
    best_fixed_prompt   the prompt with the best mean Dice on train
    supervised_chooser  a regression per prompt on the prompt policy's first
                        observation, fitted to train labels (see `baselines`)
    prompt_policy       the prompt agent's final choice
    postprocess_policy  the post-processing agent on the default prompt's mask
    combined            the prompt agent's choice, then the post-processing agent
    finetuned           the reward-guided fine-tuned segmenter, default prompt
    reward_rerank       per image, the candidate (prompt x post-processing) mask the
                        reward network scores highest, no labels used
    oracle_prompt       the best candidate prompt per image, chosen with the labels:
                        an upper bound, not a method (kind "upper_bound")

Experiments that differ in their seed only (`launch --seeds N`) fold into one row:
its values are the seeds' mean per sample, each seed's own values are kept, and its
interval combines a paired bootstrap over images with the spread over seeds
(`intervals`). Any other variant gets rows of its own (`prompt_policy@<variant>`).
Each policy plays one deterministic episode per image and is scored on the mask it
ends on, never on the best mask it passed through. `sa2va-tui evaluate RUN` runs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from experiments.metrics import row_from_masks
from sa2va_contract.config import Config
from sa2va_contract.evaluation import (
    BARS,
    GROUP_MARK,
    PARTS,
    EvaluationRow,
    EvaluationTable,
    SeedRun,
    row_label,
)
from sa2va_contract.layout import BEST_MODEL, EVALUATION_FILE, FINAL_MODEL
from sa2va_contract.variants import seed_groups

ProgressCallback = Callable[[int, int], None]

log = logging.getLogger(__name__)


def find_policy(run_dir: Path, experiment: str) -> Path | None:
    """The experiment's best model (by val score during training), else its final one."""
    for name in (BEST_MODEL, FINAL_MODEL):
        path = Path(run_dir) / experiment / name
        if path.is_file():
            return path
    return None


@dataclass
class _Fold:
    """The seeds of one row as they are scored."""

    name: str
    kind: str
    runs: list[SeedRun] = field(default_factory=list)


class _Evaluation:
    """The state of one evaluation: the samples, their candidate masks, the table."""

    def __init__(self, config: Config, run_dir: Path, split: str, warning: str, progress: ProgressCallback) -> None:
        from experiments.backends import make_cached_segmenter
        from experiments.datasets import run_split

        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        self.segmenter = make_cached_segmenter(config, "cpu")
        self.samples = run_split(config, split)
        self.train = run_split(config, "train")
        self.val = run_split(config, "val")
        self.ids = [s.id for s in self.samples]
        self.truths = [s.mask for s in self.samples]
        self.experiments = config.experiments()
        members = sum(len(m) for m in seed_groups(self.experiments).values())
        k = len(config.backend.prompts)
        self.total = 2 * k * (len(self.train) + len(self.val) + len(self.samples)) + (members + 3) * len(self.samples)
        self.done = 0
        conditions = [s.condition for s in self.samples]
        self.table = EvaluationTable(split, self.ids, chosen_on="val", warning=warning,
                                     conditions=conditions if all(c is not None for c in conditions) else None)

    def advance(self, units: int) -> None:
        self.done = min(self.total, self.done + units)
        self.progress(self.done, self.total)

    def prompt_table(self, samples):
        from experiments.envs import build_prompt_table

        backend, start = self.config.backend, self.done
        table = build_prompt_table(samples, self.segmenter, backend.prompts, backend.default_prompt,
                                   on_progress=lambda fetched, _all: self.progress(start + fetched, self.total))
        self.done = start + 2 * len(backend.prompts) * len(samples)
        return table

    def masks_of(self, prompt_indices: Sequence[int]) -> list[np.ndarray]:
        prompts = self.config.backend.prompts
        return [self.segmenter.predict(s, prompts[int(i)]).mask for s, i in zip(self.samples, prompt_indices)]

    def row(self, name: str, kind: str, masks: Sequence[np.ndarray], label_args: dict[str, str] | None = None,
            **extra) -> EvaluationRow:
        row = row_from_masks(name, row_label(name, **(label_args or {})), kind, self.ids, masks, self.truths, **extra)
        row.label_args = dict(label_args or {})
        return row


def evaluate_run(config: Config, run_dir: Path, split: str | None = None,
                 on_progress: ProgressCallback | None = None) -> EvaluationTable:
    """Score the run's baselines and every experiment's models on the reported split
    (`split`, else test where the dataset has one), save `<run_dir>/evaluation.json`."""
    import torch

    from experiments.datasets import reported_split

    torch.set_num_threads(1)
    split, warning = reported_split(config.dataset, split)
    ev = _Evaluation(config, run_dir, split, warning, on_progress or (lambda done, total: None))
    train_table, val_table = ev.prompt_table(ev.train), ev.prompt_table(ev.val)
    report_table = ev.prompt_table(ev.samples)
    _baselines(ev, train_table, val_table, report_table)
    folds = _methods(ev, report_table)
    for fold in folds:
        _add_fold(ev.table, fold)
    oracle = report_table.dice.argmax(axis=1)
    ev.table.add(ev.row("oracle_prompt", "upper_bound", ev.masks_of(oracle), note="uses the labels; not a method"))
    _intervals(ev.table)
    ev.progress(ev.total, ev.total)
    ev.table.save(ev.run_dir / EVALUATION_FILE)
    return ev.table


def _baselines(ev: _Evaluation, train_table, val_table, report_table) -> None:
    """The label-free rows: default prompt, own expression, best fixed prompt, supervised chooser."""
    from experiments.baselines import SupervisedChooser, best_fixed_prompt
    from experiments.datasets import render_prompt

    backend = ev.config.backend
    default = backend.prompts[backend.default_prompt]
    ev.table.add(ev.row("baseline", "baseline", ev.masks_of(np.full(len(ev.samples), backend.default_prompt)),
                        label_args={"prompt": default}))
    if any(s.expression != render_prompt(default, s) for s in ev.samples):
        predictions = ev.segmenter.segment([s.image for s in ev.samples], [s.expression for s in ev.samples])
        ev.table.add(ev.row("own_expression", "baseline", [p.mask for p in predictions]))
    else:
        ev.table.missing["own_expression"] = "the dataset gives every image the default prompt as its expression"
    fixed = best_fixed_prompt(train_table)
    ev.table.add(ev.row("best_fixed_prompt", "baseline", ev.masks_of(np.full(len(ev.samples), fixed)),
                        label_args={"prompt": backend.prompts[fixed]}))
    chooser = SupervisedChooser(train_table, val_table)
    ev.table.add(ev.row("supervised_chooser", "baseline", ev.masks_of(chooser.choose(report_table)),
                        note=f"ridge penalty {chooser.penalty:g}, chosen on val"))
    ev.advance(3 * len(ev.samples))


def _methods(ev: _Evaluation, report_table) -> list[_Fold]:
    """One fold per row that experiments give, each with one run per seed."""
    from experiments import postprocess_rl, prompt_rl
    from experiments.checkpoints import DamagedFile
    from experiments.envs import build_postprocess_table
    from experiments.ppo_model import load_policy
    from experiments.reward.rows import evaluation_rows as reward_net_rows

    backend = ev.config.backend
    folds: dict[str, _Fold] = {}
    chosen_by: dict[str, list[tuple[str, int, np.ndarray, Path]]] = {}  # group -> prompt choices per seed
    post_by: dict[str, list[tuple[str, int, object, Path]]] = {}  # group -> post-processing models per seed

    def fold(row: str, group: str, kind: str) -> _Fold:
        name = row if group == ev.experiments[group].kind else f"{row}{GROUP_MARK}{group}"
        return folds.setdefault(name, _Fold(name, kind))

    def post_masks(model, cfg, starts) -> list[np.ndarray]:
        table = build_postprocess_table(ev.samples, ev.segmenter, backend.prompts, starts, cfg.min_component_area)
        return [outcome.answer for outcome in postprocess_rl.edit_masks(model, table, cfg)]

    def policy(member: str, exp):
        """The member's best (else final) model, loaded without unpickling; None, with
        the reason recorded, when there is none that loads."""
        if find_policy(ev.run_dir, member) is None:
            ev.table.missing[f"{member}"] = f"no {exp.kind} model in {ev.run_dir / member}"
            return None, None
        if exp.kind == "prompt_rl":
            env = prompt_rl.make_env(report_table, exp)
        else:
            env = postprocess_rl.make_env(build_postprocess_table(ev.samples, ev.segmenter, backend.prompts,
                                                                  backend.default_prompt, exp.min_component_area), exp)
        try:
            return load_policy(ev.run_dir / member, env, exp.ppo, exp.seed, log.warning)
        except DamagedFile as err:
            ev.table.missing[f"{member}"] = str(err)
            return None, None

    for group, members in seed_groups(ev.experiments).items():
        for member in members:
            exp = ev.experiments[member]
            if exp.kind == "reward_net":
                rows, missing = reward_net_rows(ev.config, ev.run_dir / member, ev.samples, ev.segmenter, exp)
                for row in rows:
                    fold(row.name, group, row.kind).runs.append(SeedRun(member, exp.seed, row.values, row.source))
                for row, why in missing.items():
                    ev.table.missing[f"{row} ({member})"] = why
            else:
                path, model = policy(member, exp)
                if model is not None and exp.kind == "prompt_rl":
                    chosen = prompt_rl.choose_prompts(model, report_table, exp)
                    chosen_by.setdefault(group, []).append((member, exp.seed, chosen, path))
                    row = ev.row("prompt_policy", "policy", ev.masks_of(chosen))
                    fold("prompt_policy", group, "policy").runs.append(SeedRun(member, exp.seed, row.values, str(path)))
                elif model is not None:
                    post_by.setdefault(group, []).append((member, exp.seed, model, path))
                    row = ev.row("postprocess_policy", "policy",
                                 post_masks(model, exp, backend.default_prompt))
                    fold("postprocess_policy", group, "policy").runs.append(
                        SeedRun(member, exp.seed, row.values, str(path)))
            ev.advance(len(ev.samples))
    _combined(ev, chosen_by, post_by, folds, post_masks)
    return list(folds.values())


def _combined(ev: _Evaluation, chosen_by: dict, post_by: dict, folds: dict[str, _Fold], post_masks) -> None:
    """The prompt policy's choice, then the post-processing policy on its mask: the
    base experiments' seeds paired in order (seed i of one with seed i of the other)."""
    if "prompt_rl" not in chosen_by or "postprocess_rl" not in post_by:
        ev.table.missing["combined"] = "needs both a prompt_rl and a postprocess_rl model"
        return
    combined = folds.setdefault("combined", _Fold("combined", "policy"))
    for (p_name, p_seed, chosen, p_path), (q_name, _q_seed, model, q_path) in zip(chosen_by["prompt_rl"],
                                                                                  post_by["postprocess_rl"]):
        row = ev.row("combined", "policy", post_masks(model, ev.experiments[q_name], chosen))
        combined.runs.append(SeedRun(f"{p_name} + {q_name}", p_seed, row.values, f"{p_path} + {q_path}"))
    ev.advance(len(ev.samples))


def _add_fold(table: EvaluationTable, fold: _Fold) -> None:
    """One row from the seeds of a method: per sample, the mean over seeds."""
    if not fold.runs:
        return
    metrics = fold.runs[0].values
    values = {metric: [float(v) for v in np.mean([run.values[metric] for run in fold.runs], axis=0)]
              for metric in metrics}
    sources = "; ".join(run.source for run in fold.runs if run.source)
    table.add(EvaluationRow(fold.name, row_label(fold.name), fold.kind, list(table.sample_ids), values,
                            source=sources or None, seeds=fold.runs))


def _intervals(table: EvaluationTable) -> None:
    """Each row's Dice difference from the baseline with its interval, and each
    method's from every bar it must clear."""
    from experiments.intervals import delta_interval

    def per_seed(row: EvaluationRow) -> np.ndarray:
        runs = row.seeds or [SeedRun(row.name, None, row.values)]
        return np.array([run.values["dice"] for run in runs])

    def against(row: EvaluationRow, other: EvaluationRow) -> np.ndarray:
        # Seeds that were paired (a combination's seed i and its part's seed i) stay paired.
        mine, theirs = per_seed(row), per_seed(other)
        return mine - (theirs if theirs.shape == mine.shape else theirs.mean(axis=0))

    base = table.row(table.baseline)
    for row in table.rows:
        if row.name == table.baseline:
            continue
        row.interval = delta_interval(against(row, base))
        if row.is_method:
            others = [*BARS, *PARTS.get(row.name, ())]
            row.versus = {other: delta_interval(against(row, table.row(other))) for other in others if table.has(other)}
