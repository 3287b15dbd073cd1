"""`sa2va-tui compare`: the experiments of several runs side by side, from their folders
alone, during the runs or after them.

One row per experiment (variants included) of every run given: only the config keys
that differ between the rows of one kind, the best and the final value of the kind's
learning curve with the step of the best, the reported Dice with its interval where
the run was evaluated, wall time, out-of-memory restarts and state.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sa2va_contract.config import EXPERIMENT_KINDS, Config
from sa2va_contract.evaluation import EvaluationTable, Interval, load_evaluation, row_base
from sa2va_contract.kinds import KINDS
from sa2va_tui.report.facts import metric_series, shown_state
from sa2va_tui.runstate import EPISODE_REWARD
from sa2va_tui.runstore import load_run, load_run_config, read_events
from sa2va_tui.text import format_duration, interval_text

#: The learning curve that tells how an experiment of each kind is doing.
CURVES = {"prompt_rl": EPISODE_REWARD, "postprocess_rl": EPISODE_REWARD, "reward_net": "reward/spearman"}
#: Run-level sections that can differ between runs and change what an experiment does.
SHARED_SECTIONS = ("dataset", "backend", "recovery")
#: Keys that name rather than configure.
_NOT_SETTINGS = {"enabled", "kind"}


@dataclass
class CompareRow:
    run_id: str
    name: str
    kind: str
    #: Every setting of the experiment, flattened ("ppo.learning_rate"), with the
    #: run-level sections that shape it ("dataset.limit").
    settings: dict[str, Any]
    curve: str
    best: float | None
    best_step: int | None
    final: float | None
    series: list[tuple[int, float]]
    wall_s: float | None
    oom_restarts: int
    state: str
    #: The evaluation's reported Dice for this experiment: split, mean, interval.
    dice: dict[str, Any] | None = None


@dataclass
class Comparison:
    rows: list[CompareRow]
    #: Per kind, the setting keys whose values differ between its rows.
    differing: dict[str, list[str]] = field(default_factory=dict)


def compare_runs(run_dirs: Sequence[Path], now: float | None = None) -> Comparison:
    """Read every run folder; raises RunStoreError for one that is not a run folder."""
    now = time.time() if now is None else now
    rows: list[CompareRow] = []
    for run_dir in run_dirs:
        rows += _rows_of(Path(run_dir), now)
    differing = {kind: differing_keys([r.settings for r in rows if r.kind == kind])
                 for kind in EXPERIMENT_KINDS if any(r.kind == kind for r in rows)}
    return Comparison(rows, differing)


def _rows_of(run_dir: Path, now: float) -> list[CompareRow]:
    snapshot = load_run(run_dir)
    config = load_run_config(run_dir)
    experiments = config.experiments()
    series = metric_series(read_events(run_dir))
    evaluation = load_evaluation(run_dir)
    rows = []
    for name, state in snapshot.experiments.items():
        experiment = experiments.get(name)
        curve = CURVES.get(state.kind, EPISODE_REWARD)
        points = series.get(name, {}).get(curve, [])
        best = max(points, key=lambda p: p[1]) if points else None
        end = state.ended_at if state.terminal else (now if snapshot.supervised else state.updated_at)
        rows.append(CompareRow(
            run_id=snapshot.run_id, name=name, kind=state.kind,
            settings=experiment_settings(config, experiment.model_dump(mode="json")) if experiment else {},
            curve=curve, best=best[1] if best else None, best_step=best[0] if best else None,
            final=points[-1][1] if points else None, series=points,
            wall_s=(end - state.started_at) if state.started_at and end else None,
            oom_restarts=state.oom_restarts, state=shown_state(state, snapshot.supervised),
            dice=_reported_dice(evaluation, state.kind, name),
        ))
    return rows


def experiment_settings(config: Config, experiment: dict[str, Any]) -> dict[str, Any]:
    """The experiment's settings and the shared sections', flattened to dotted keys."""
    flat = {k: v for k, v in flatten(experiment).items() if k.split(".")[0] not in _NOT_SETTINGS}
    for section in SHARED_SECTIONS:
        flat.update(flatten(getattr(config, section).model_dump(mode="json"), prefix=f"{section}."))
    return flat


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_keys(settings: Sequence[dict[str, Any]]) -> list[str]:
    """The keys whose value is not the same in every one of `settings` (a key some
    lack differs too), in a stable order."""
    keys = sorted({key for one in settings for key in one})
    missing = object()
    return [key for key in keys if len({json.dumps(s.get(key, missing), default=str) for s in settings}) > 1]


def _reported_dice(table: EvaluationTable | None, kind: str, experiment: str) -> dict[str, Any] | None:
    """The experiment's own figures in the run's evaluation: its row (the prompt policy,
    the post-processing policy, the fine-tuned model: the kind's first in the registry),
    the Dice of its own seed there, and the row's Δ Dice with its interval, which the
    seeds folded into the row share."""
    if table is None:
        return None
    wanted = KINDS[kind].evaluation_rows[0]
    for row in table.rows:
        if row_base(row.name) != wanted:
            continue
        own = next((run for run in row.seeds if run.experiment == experiment), None)
        if own is None and not (row.name == wanted and experiment == kind and not row.seeds):
            continue
        base = table.row(table.baseline).values["dice"]
        values = own.values["dice"] if own is not None else row.values["dice"]
        return {"split": table.split, "row": row.name, "mean": statistics.fmean(values),
                "delta": statistics.fmean(a - b for a, b in zip(values, base)),
                "interval": row.interval.to_dict() if row.interval is not None else None, "n": len(row.sample_ids)}
    return None


# --- rendering ----------------------------------------------------------------------


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _dice_text(dice: dict[str, Any] | None) -> str:
    """`0.8289 (+0.0090) on test; row +0.0090 [+0.0002, +0.0179]`."""
    if dice is None:
        return "-"
    text = f"{dice['mean']:.4f} ({dice['delta']:+.4f}) on {dice['split']}"
    if dice.get("interval"):
        text += f"; row {interval_text(Interval.from_dict(dice['interval']))}"
    return text


def table_rows(comparison: Comparison, kind: str) -> tuple[list[str], list[list[str]]]:
    """The header and cells of one kind's table."""
    keys = comparison.differing.get(kind, [])
    rows = [r for r in comparison.rows if r.kind == kind]
    curve = rows[0].curve if rows else EPISODE_REWARD
    headers = ["run", "experiment", *keys, f"best {curve}", "at step", f"final {curve}", "Dice (Δ vs default)",
               "wall", "OOM restarts", "state"]
    cells = [[r.run_id, r.name, *(_value(r.settings.get(k)) for k in keys), _value(r.best), _value(r.best_step),
              _value(r.final), _dice_text(r.dice), format_duration(r.wall_s) if r.wall_s is not None else "-",
              str(r.oom_restarts), r.state] for r in rows]
    return headers, cells


def render_markdown(comparison: Comparison) -> str:
    parts = []
    for kind in comparison.differing:
        headers, cells = table_rows(comparison, kind)
        lines = [f"## {kind}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        if not comparison.differing[kind]:
            lines += ["", "Every setting is the same in these rows."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def render_csv(comparison: Comparison) -> str:
    """One CSV of every row; the settings columns are the union of each kind's differing keys."""
    keys = sorted({k for ks in comparison.differing.values() for k in ks})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run", "experiment", "kind", *keys, "curve", "best", "best_step", "final", "dice", "dice_delta",
                     "dice_split", "wall_s", "oom_restarts", "state"])
    for r in comparison.rows:
        dice = r.dice or {}
        writer.writerow([r.run_id, r.name, r.kind, *(_value(r.settings.get(k)) if k in comparison.differing.get(
            r.kind, []) else "" for k in keys), r.curve, r.best, r.best_step, r.final, dice.get("mean"),
            dice.get("delta"), dice.get("split"), r.wall_s, r.oom_restarts, r.state])
    return out.getvalue()


def render_json(comparison: Comparison) -> str:
    rows = []
    for r in comparison.rows:
        row = asdict(r)
        keys = comparison.differing.get(r.kind, [])
        row["settings"] = {k: r.settings.get(k) for k in keys}
        row["series"] = [list(p) for p in r.series]
        rows.append(row)
    return json.dumps({"differing": comparison.differing, "rows": rows}, indent=1, default=str)


def write_curves(comparison: Comparison, path: Path) -> Path | None:
    """Every row's learning curve overlaid, one panel per kind; None when there is none."""
    from matplotlib.figure import Figure

    kinds = [k for k in comparison.differing if any(r.series for r in comparison.rows if r.kind == k)]
    if not kinds:
        return None
    figure = Figure(figsize=(5.0 * len(kinds), 3.6), layout="constrained")
    for ax, kind in zip(figure.subplots(1, len(kinds), squeeze=False).ravel(), kinds):
        for r in (r for r in comparison.rows if r.kind == kind and r.series):
            ax.plot([p[0] for p in r.series], [p[1] for p in r.series], label=f"{r.run_id}/{r.name}")
        ax.set_title(f"{kind}: {CURVES.get(kind, EPISODE_REWARD)}", fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    figure.savefig(path, dpi=100)
    return path
