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
computed on other images.

    python -m experiments.evaluate RUN_DIR [-c CONFIG] [--split val]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from experiments.metrics import METRIC_NAMES, all_metrics
from sa2va_tui.config import Config

EVALUATION_FILE = "evaluation.json"
ROW_KINDS = ("baseline", "policy", "model", "upper_bound")
_TITLES = {"dice": "Dice", "iou": "IoU", "recall": "Recall", "precision": "Precision"}

ProgressCallback = Callable[[int, int], None]


@dataclass
class EvaluationRow:
    """One way of getting a mask, scored per sample with every metric."""

    name: str
    label: str
    kind: str
    sample_ids: list[str]
    #: metric -> one value per sample, in `sample_ids` order.
    values: dict[str, list[float]]
    #: The model file (or files) the masks came from, where any.
    source: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ROW_KINDS:
            raise ValueError(f"row kind {self.kind!r} is not one of {', '.join(ROW_KINDS)}")
        for metric in METRIC_NAMES:
            if len(self.values.get(metric, ())) != len(self.sample_ids):
                raise ValueError(f"row {self.name}: {metric} needs one value per sample")

    def mean(self, metric: str) -> float:
        return float(np.mean(self.values[metric]))

    def std(self, metric: str) -> float:
        return float(np.std(self.values[metric]))


def row_from_masks(name: str, label: str, kind: str, sample_ids: Sequence[str], masks: Sequence[np.ndarray],
                   truths: Sequence[np.ndarray], source: str | None = None, note: str = "") -> EvaluationRow:
    """A row from the final mask of each sample and its label."""
    if not (len(sample_ids) == len(masks) == len(truths)):
        raise ValueError(f"{len(sample_ids)} ids, {len(masks)} masks, {len(truths)} labels")
    per_sample = [all_metrics(mask, truth) for mask, truth in zip(masks, truths)]
    values = {metric: [float(m[metric]) for m in per_sample] for metric in METRIC_NAMES}
    return EvaluationRow(name, label, kind, list(sample_ids), values, source, note)


@dataclass
class EvaluationTable:
    split: str
    sample_ids: list[str]
    rows: list[EvaluationRow] = field(default_factory=list)
    baseline: str = "baseline"
    created: float = field(default_factory=time.time)
    #: What could not be evaluated and why (a policy not trained yet, ...).
    missing: dict[str, str] = field(default_factory=dict)

    def add(self, row: EvaluationRow) -> None:
        """Add (or replace) a row; it must be computed on this table's samples."""
        if row.sample_ids != self.sample_ids:
            raise ValueError(f"row {row.name} is computed on other samples than the table's {len(self.sample_ids)}")
        self.rows = [r for r in self.rows if r.name != row.name] + [row]

    def row(self, name: str) -> EvaluationRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def delta(self, row: EvaluationRow, metric: str) -> float:
        """Mean difference from the baseline, sample by sample."""
        base = self.row(self.baseline).values[metric]
        return float(np.mean(np.subtract(row.values[metric], base)))

    # --- JSON ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        rows = []
        for row in self.rows:
            summary = {
                metric: {"mean": row.mean(metric), "std": row.std(metric),
                         "delta": self.delta(row, metric)}
                for metric in METRIC_NAMES
            }
            rows.append({"name": row.name, "label": row.label, "kind": row.kind, "source": row.source,
                         "note": row.note, "n": len(row.sample_ids), "summary": summary,
                         "sample_ids": row.sample_ids, "values": row.values})
        return {"split": self.split, "baseline": self.baseline, "created": self.created,
                "sample_ids": self.sample_ids, "missing": self.missing, "rows": rows}

    @classmethod
    def from_dict(cls, data: dict) -> "EvaluationTable":
        table = cls(data["split"], list(data["sample_ids"]), baseline=data.get("baseline", "baseline"),
                    created=data.get("created", 0.0), missing=dict(data.get("missing", {})))
        for row in data["rows"]:
            table.add(EvaluationRow(row["name"], row["label"], row["kind"], list(row["sample_ids"]),
                                    {k: list(v) for k, v in row["values"].items()}, row.get("source"),
                                    row.get("note", "")))
        return table

    def save(self, path: Path) -> None:
        """Atomically: `status` and `report` may read it from another terminal."""
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "EvaluationTable":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# --- evaluating a run ------------------------------------------------------------------


def find_policy(run_dir: Path, experiment: str) -> Path | None:
    """The experiment's best model (by val score during training), else its final one."""
    from experiments.ppo_common import BEST_MODEL, FINAL_MODEL

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
    table.add(row_from_masks("baseline", f"baseline: default prompt {backend.prompts[backend.default_prompt]!r}",
                             "baseline", ids, masks_of(default), truths))

    prompt_path = find_policy(run_dir, "prompt_rl")
    chosen = None
    if prompt_path is None:
        table.missing["prompt_policy"] = "no prompt_rl model in the run folder"
    else:
        chosen = prompt_rl.choose_prompts(PPO.load(prompt_path, device="cpu"), prompts_table, config.prompt_rl)
        table.add(row_from_masks("prompt_policy", "prompt policy", "policy", ids, masks_of(chosen), truths,
                                 source=str(prompt_path)))
    done += len(samples)
    progress(done, total)

    post_path = find_policy(run_dir, "postprocess_rl")
    if post_path is None:
        table.missing["postprocess_policy"] = "no postprocess_rl model in the run folder"
    else:
        post_model = PPO.load(post_path, device="cpu")
        cfg = config.postprocess_rl
        starts = {"postprocess_policy": (default, "post-processing policy on the default prompt's mask")}
        if chosen is not None:
            starts["combined"] = (chosen, "prompt policy, then post-processing policy")
        for name, (start, label) in starts.items():
            post_table = build_postprocess_table(samples, segmenter, backend.prompts, start, cfg.min_component_area)
            edited = [o.answer for o in postprocess_rl.edit_masks(post_model, post_table, cfg)]
            source = str(post_path) if name != "combined" else f"{prompt_path} + {post_path}"
            table.add(row_from_masks(name, label, "policy", ids, edited, truths, source=source))
            done += len(samples)
            progress(done, total)
    if chosen is None:
        table.missing["combined"] = "needs both policies"

    from experiments.reward_net import evaluation_rows as reward_net_rows

    rows, missing = reward_net_rows(config, run_dir, samples, segmenter)
    for row in rows:
        table.add(row)
    table.missing.update(missing)
    done += 2 * len(samples)
    progress(done, total)

    oracle = prompts_table.dice.argmax(axis=1)
    table.add(row_from_masks("oracle_prompt", "oracle prompt (chosen with labels: upper bound)", "upper_bound", ids,
                             masks_of(oracle), truths, note="uses the labels; not a method"))
    progress(total, total)
    table.save(run_dir / EVALUATION_FILE)
    return table


# --- printing --------------------------------------------------------------------------


def format_table(table: EvaluationTable):
    """A rich Table: mean ± std of each metric, and Dice's difference from the baseline."""
    from rich.table import Table

    out = Table(title=f"Evaluation on {table.split} ({len(table.sample_ids)} images, every row on the same images)")
    out.add_column("row")
    for metric in METRIC_NAMES:
        out.add_column(_TITLES[metric], justify="right")
    out.add_column("Δ Dice", justify="right")
    out.add_column("Δ IoU", justify="right")
    for row in table.rows:
        cells = [f"{row.mean(m):.4f} ± {row.std(m):.3f}" for m in METRIC_NAMES]
        if row.name == table.baseline:
            deltas = ["", ""]
        else:
            deltas = [f"{table.delta(row, m):+.4f}" for m in ("dice", "iou")]
        label = f"[dim]{row.label}[/dim]" if row.kind == "upper_bound" else row.label
        out.add_row(label, *cells, *deltas)
    if table.missing:
        out.caption = "not evaluated: " + "; ".join(f"{k} ({v})" for k, v in table.missing.items())
    return out


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from sa2va_tui.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("-c", "--config", type=Path, help="the run's config (default: RUN_DIR/config.yaml)")
    parser.add_argument("--split", default="val")
    args = parser.parse_args(argv)
    config_path = args.config or args.run_dir / "config.yaml"
    try:
        config = load_config(config_path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Console().print(format_table(evaluate_run(config, args.run_dir, args.split)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
