"""The evaluation table's schema: what `sa2va-tui evaluate` writes to a run folder's
`evaluation.json` and what the report, `runs` and the app read back.

Every row is one way of getting a mask, scored per sample with every metric, and
every row of a table is computed on the same samples: `EvaluationTable.add` refuses
a row computed on other images. A row of a method trained with several seeds holds
each seed's values and, as its own, their mean per sample. The engine computes each
row's 95 % interval of its Dice difference from the baseline (and from the bars a
method must clear) and stores the numbers here; this module only reads them. Plain
Python, so that the UI process can read a table without numpy's help.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from sa2va_contract.files import atomic_write_text
from sa2va_contract.layout import EVALUATION_FILE

METRIC_NAMES = ("dice", "iou", "recall", "precision")
METRIC_TITLES = {"dice": "Dice", "iou": "IoU", "recall": "Recall", "precision": "Precision"}
#: baseline: what a method must beat (label-free at inference); policy: a learned
#: chooser or editor; model: a changed segmenter; upper_bound: uses the labels, not a method.
ROW_KINDS = ("baseline", "policy", "model", "upper_bound")
#: The label of every row the tool computes, by row name. `{prompt}` is filled from the
#: row's `label_args`: the baseline names the default prompt, the best fixed prompt its own.
ROW_LABELS = {
    "baseline": "baseline: default prompt {prompt}",
    "own_expression": "the image's own expression (from the dataset)",
    "best_fixed_prompt": "best fixed prompt, chosen on train: {prompt}",
    "supervised_chooser": "supervised chooser: a regression per prompt on the policy's first observation, "
                          "fitted to train labels",
    "prompt_policy": "prompt policy",
    "postprocess_policy": "post-processing policy on the default prompt's mask",
    "combined": "prompt policy, then post-processing policy",
    "finetuned": "reward-guided fine-tuned model, default prompt",
    "reward_rerank": "reward-network reranking (prompts x post-processing, no labels)",
    "oracle_prompt": "oracle prompt (chosen with labels: upper bound)",
}
BASELINE = "baseline"
#: The bars a method must clear, against which the engine also measures each method.
BARS = ("supervised_chooser", "own_expression")
#: A combination's parts, against which the engine also measures it: does combining add?
PARTS = {"combined": ("prompt_policy", "postprocess_policy")}
#: Why a table's figures may flatter the methods, by the key its `warning` holds.
WARNINGS = {
    "no_test_split": "the dataset has no test split: these figures are on val, the split that chose the checkpoints, "
                     "hyperparameters and the reward network's epoch, so they are optimistic",
    "val_reports": "reported on val, the split that chose the checkpoints, hyperparameters and the reward network's "
                   "epoch: the figures are optimistic",
    "train_reports": "reported on train, the split the methods learned on: the figures say nothing of new images",
}
#: What `breakdown` groups samples by.
BREAKDOWNS = ("condition", "difficulty")
#: A row made from a variant experiment is named `<row>@<experiment group>`.
GROUP_MARK = "@"


def row_label(name: str, **args: str) -> str:
    """The English label of a row by its name (`prompt_policy@lr_high` gives the
    prompt policy's label and the group)."""
    base, _, group = name.partition(GROUP_MARK)
    label = ROW_LABELS.get(base, base).format(**{"prompt": "", **{k: repr(v) for k, v in args.items()}})
    return f"{label} ({group})" if group else label


def row_base(name: str) -> str:
    """The row's name less its experiment group: what it is, whatever variant made it."""
    return name.partition(GROUP_MARK)[0]


@dataclass(frozen=True)
class Interval:
    """A mean difference of Dice and its interval (the engine's paired bootstrap over
    images combined with the spread over seeds)."""

    mean: float
    low: float
    high: float
    level: float = 0.95
    seeds: int = 1
    images: int = 0

    @property
    def within_noise(self) -> bool:
        """The interval covers 0: the data cannot tell the difference from none."""
        return self.low <= 0.0 <= self.high

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "level": self.level, "seeds": self.seeds,
                "images": self.images, "within_noise": self.within_noise}

    @classmethod
    def from_dict(cls, data: dict) -> "Interval":
        return cls(float(data["mean"]), float(data["low"]), float(data["high"]), float(data.get("level", 0.95)),
                   int(data.get("seeds", 1)), int(data.get("images", 0)))


@dataclass
class SeedRun:
    """One seed of a row: the experiment folder(s) its models came from and its values."""

    experiment: str
    seed: int | None
    values: dict[str, list[float]]
    source: str | None = None

    def mean(self, metric: str) -> float:
        return statistics.fmean(self.values[metric])


@dataclass
class EvaluationRow:
    """One way of getting a mask, scored per sample with every metric."""

    name: str
    label: str
    kind: str
    sample_ids: list[str]
    #: metric -> one value per sample, in `sample_ids` order (over seeds: their mean).
    values: dict[str, list[float]]
    #: The model file (or files) the masks came from, where any.
    source: str | None = None
    note: str = ""
    #: What the label names (the prompt of a fixed-prompt row), for its translations.
    label_args: dict[str, str] = field(default_factory=dict)
    #: Each seed of a method, with its own values; empty for rows that no training made.
    seeds: list[SeedRun] = field(default_factory=list)
    #: Dice against the table's baseline, with its interval (None for the baseline).
    interval: Interval | None = None
    #: Dice against each bar a method must clear (`BARS`) and, for a combination, each
    #: of its parts (`PARTS`), with its interval.
    versus: dict[str, Interval] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ROW_KINDS:
            raise ValueError(f"row kind {self.kind!r} is not one of {', '.join(ROW_KINDS)}")
        for metric in METRIC_NAMES:
            if len(self.values.get(metric, ())) != len(self.sample_ids):
                raise ValueError(f"row {self.name}: {metric} needs one value per sample")
        for run in self.seeds:
            if any(len(run.values.get(metric, ())) != len(self.sample_ids) for metric in METRIC_NAMES):
                raise ValueError(f"row {self.name}: seed {run.experiment} needs one value per sample")

    def mean(self, metric: str) -> float:
        return statistics.fmean(self.values[metric])

    def std(self, metric: str) -> float:
        """The spread over samples (population standard deviation)."""
        return statistics.pstdev(self.values[metric])

    @property
    def is_method(self) -> bool:
        """Something trained by an experiment (not a baseline, not the upper bound)."""
        return self.kind in ("policy", "model")


@dataclass
class EvaluationTable:
    #: The split that reports.
    split: str
    sample_ids: list[str]
    rows: list[EvaluationRow] = field(default_factory=list)
    baseline: str = BASELINE
    created: float = field(default_factory=time.time)
    #: What could not be evaluated and why (a policy not trained yet, ...).
    missing: dict[str, str] = field(default_factory=dict)
    #: The split that chose checkpoints, hyperparameters and the reward network's epoch.
    chosen_on: str = "val"
    #: Why the figures may flatter the methods (a key of `WARNINGS`), or "".
    warning: str = ""
    #: The dataset's condition of each sample (the built-in dataset), else None.
    conditions: list[str] | None = None

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

    def has(self, name: str) -> bool:
        return any(row.name == name for row in self.rows)

    def delta(self, row: EvaluationRow, metric: str) -> float:
        """Mean difference from the baseline, sample by sample."""
        base = self.row(self.baseline).values[metric]
        return statistics.fmean(a - b for a, b in zip(row.values[metric], base))

    def best(self) -> EvaluationRow | None:
        """The row with the highest mean Dice that is not the upper bound: a method or
        a label-free baseline, whichever the data says."""
        candidates = [row for row in self.rows if row.kind != "upper_bound"]
        return max(candidates, key=lambda row: row.mean("dice")) if candidates else None

    def headline(self) -> tuple[str, float, float] | None:
        """The best result: (row name, Dice, delta from the baseline)."""
        best = self.best()
        return None if best is None else (best.name, best.mean("dice"), self.delta(best, "dice"))

    # --- JSON ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        rows = []
        for row in self.rows:
            summary = {metric: {"mean": row.mean(metric), "std": row.std(metric), "delta": self.delta(row, metric)}
                       for metric in METRIC_NAMES}
            rows.append({
                "name": row.name, "label": row.label, "kind": row.kind, "source": row.source, "note": row.note,
                "label_args": row.label_args, "n": len(row.sample_ids), "summary": summary,
                "interval": row.interval.to_dict() if row.interval else None,
                "versus": {name: interval.to_dict() for name, interval in row.versus.items()},
                "seeds": [{"experiment": run.experiment, "seed": run.seed, "source": run.source,
                           "dice": run.mean("dice"), "delta": statistics.fmean(
                               a - b for a, b in zip(run.values["dice"], self.row(self.baseline).values["dice"])),
                           "values": run.values} for run in row.seeds],
                "sample_ids": row.sample_ids, "values": row.values,
            })
        return {"split": self.split, "chosen_on": self.chosen_on, "warning": self.warning, "baseline": self.baseline,
                "created": self.created, "sample_ids": self.sample_ids, "conditions": self.conditions,
                "missing": self.missing, "rows": rows}

    @classmethod
    def from_dict(cls, data: dict) -> "EvaluationTable":
        conditions = data.get("conditions")
        table = cls(data["split"], list(data["sample_ids"]), baseline=data.get("baseline", BASELINE),
                    created=data.get("created", 0.0), missing=dict(data.get("missing", {})),
                    chosen_on=data.get("chosen_on", "val"), warning=data.get("warning", ""),
                    conditions=list(conditions) if conditions is not None else None)
        for row in data["rows"]:
            interval = row.get("interval")
            table.add(EvaluationRow(
                row["name"], row["label"], row["kind"], list(row["sample_ids"]),
                {k: list(v) for k, v in row["values"].items()}, row.get("source"), row.get("note", ""),
                dict(row.get("label_args", {})),
                [SeedRun(s["experiment"], s.get("seed"), {k: list(v) for k, v in s["values"].items()}, s.get("source"))
                 for s in row.get("seeds", [])],
                Interval.from_dict(interval) if interval else None,
                {name: Interval.from_dict(v) for name, v in row.get("versus", {}).items()},
            ))
        return table

    def save(self, path: Path) -> None:
        """Atomically: `status` and `report` may read it from another terminal."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "EvaluationTable":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# --- where the gain comes from ---------------------------------------------------------


@dataclass(frozen=True)
class BreakdownGroup:
    """The samples of one condition (or one quarter of the baseline's Dice) and what
    each row gains on them."""

    name: str
    samples: int
    baseline_dice: float
    #: row name -> mean Dice difference from the baseline on these samples.
    deltas: dict[str, float]
    #: row name -> this group's share of the row's whole gain (None where the row gains
    #: nothing overall: a share of nothing means nothing).
    shares: dict[str, float | None]
    #: For difficulty groups, the baseline Dice the group spans.
    bounds: tuple[float, float] | None = None


def breakdown(table: EvaluationTable, by: str) -> list[BreakdownGroup]:
    """Each row's gain over the baseline split by the dataset's condition or by
    quarters of the baseline's Dice (`difficulty`, any dataset). Empty for condition
    when the dataset names none."""
    if by not in BREAKDOWNS:
        raise ValueError(f"breakdown by {by!r}: one of {', '.join(BREAKDOWNS)}")
    base = table.row(table.baseline).values["dice"]
    n = len(base)
    if by == "condition":
        if table.conditions is None or n == 0:
            return []
        names = list(dict.fromkeys(table.conditions))
        members = {name: [i for i, c in enumerate(table.conditions) if c == name] for name in names}
        bounds: dict[str, tuple[float, float] | None] = {name: None for name in names}
    else:
        order = sorted(range(n), key=lambda i: base[i])
        quarters = [order[q * n // 4:(q + 1) * n // 4] for q in range(4)]
        members, bounds = {}, {}
        for q, part in enumerate(quarters):
            if part:
                name = f"Q{q + 1}"
                members[name] = part
                bounds[name] = (base[part[0]], base[part[-1]])
    rows = [row for row in table.rows if row.name != table.baseline]
    gains = {row.name: [a - b for a, b in zip(row.values["dice"], base)] for row in rows}
    totals = {name: sum(g) for name, g in gains.items()}
    groups = []
    for name, part in members.items():
        deltas = {row: statistics.fmean(g[i] for i in part) for row, g in gains.items()}
        shares = {row: (sum(g[i] for i in part) / totals[row] if totals[row] > 1e-12 else None)
                  for row, g in gains.items()}
        groups.append(BreakdownGroup(name, len(part), statistics.fmean(base[i] for i in part), deltas, shares,
                                     bounds[name]))
    return groups


def load_evaluation(run_dir: Path) -> EvaluationTable | None:
    """The run's evaluation table, None if it has not been evaluated or the file is
    damaged or from an incompatible version (a reader goes on without it)."""
    path = Path(run_dir) / EVALUATION_FILE
    if not path.is_file():
        return None
    try:
        return EvaluationTable.load(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # AttributeError: JSON of another shape
        return None
