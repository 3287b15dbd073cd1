"""The evaluation table's schema: what `sa2va-tui evaluate` writes to a run folder's
`evaluation.json` and what the report, `runs` and the app read back.

Every row is one way of getting a mask, scored per sample with every metric, and
every row of a table is computed on the same samples: `EvaluationTable.add` refuses
a row computed on other images. Plain Python, so that the UI process can read a
table without numpy's help.
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
#: baseline: what a method must beat; policy: a learned chooser or editor; model: a
#: changed segmenter; upper_bound: uses the labels, not a method.
ROW_KINDS = ("baseline", "policy", "model", "upper_bound")
#: The name of every row the tool computes, with its label; the baseline's label
#: names the default prompt, so it is made where the prompt is known.
ROW_LABELS = {
    "prompt_policy": "prompt policy",
    "postprocess_policy": "post-processing policy on the default prompt's mask",
    "combined": "prompt policy, then post-processing policy",
    "finetuned": "reward-guided fine-tuned model, default prompt",
    "reward_rerank": "reward-network reranking (prompts x post-processing, no labels)",
    "oracle_prompt": "oracle prompt (chosen with labels: upper bound)",
}
BASELINE = "baseline"


def baseline_label(default_prompt: str) -> str:
    return f"baseline: default prompt {default_prompt!r}"


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
        return statistics.fmean(self.values[metric])

    def std(self, metric: str) -> float:
        """The spread over samples (population standard deviation)."""
        return statistics.pstdev(self.values[metric])


@dataclass
class EvaluationTable:
    split: str
    sample_ids: list[str]
    rows: list[EvaluationRow] = field(default_factory=list)
    baseline: str = BASELINE
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
        return statistics.fmean(a - b for a, b in zip(row.values[metric], base))

    def headline(self) -> tuple[str, float, float] | None:
        """The best result: the method (not the upper bound) with the highest mean
        Dice, with its difference from the baseline: (row name, Dice, delta)."""
        methods = [row for row in self.rows if row.kind != "upper_bound"]
        if not methods:
            return None
        best = max(methods, key=lambda row: row.mean("dice"))
        return best.name, best.mean("dice"), self.delta(best, "dice")

    # --- JSON ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        rows = []
        for row in self.rows:
            summary = {metric: {"mean": row.mean(metric), "std": row.std(metric), "delta": self.delta(row, metric)}
                       for metric in METRIC_NAMES}
            rows.append({"name": row.name, "label": row.label, "kind": row.kind, "source": row.source,
                         "note": row.note, "n": len(row.sample_ids), "summary": summary,
                         "sample_ids": row.sample_ids, "values": row.values})
        return {"split": self.split, "baseline": self.baseline, "created": self.created,
                "sample_ids": self.sample_ids, "missing": self.missing, "rows": rows}

    @classmethod
    def from_dict(cls, data: dict) -> "EvaluationTable":
        table = cls(data["split"], list(data["sample_ids"]), baseline=data.get("baseline", BASELINE),
                    created=data.get("created", 0.0), missing=dict(data.get("missing", {})))
        for row in data["rows"]:
            table.add(EvaluationRow(row["name"], row["label"], row["kind"], list(row["sample_ids"]),
                                    {k: list(v) for k, v in row["values"].items()}, row.get("source"),
                                    row.get("note", "")))
        return table

    def save(self, path: Path) -> None:
        """Atomically: `status` and `report` may read it from another terminal."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> "EvaluationTable":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def load_evaluation(run_dir: Path) -> EvaluationTable | None:
    """The run's evaluation table, None if it has not been evaluated or the file is
    damaged or from an incompatible version (a reader goes on without it)."""
    path = Path(run_dir) / EVALUATION_FILE
    if not path.is_file():
        return None
    try:
        return EvaluationTable.load(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
