"""The report's facts as JSON, with its sentences in the report's language."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sa2va_contract.evaluation import EvaluationTable, breakdown
from sa2va_tui.report.conclusions import combined_strategy, conclusions, warning_sentence
from sa2va_tui.report.facts import ReportData
from sa2va_tui.report.i18n import Translator
from sa2va_tui.report.phrases import hint_text, indicator_text, problem_text


def render_json(data: ReportData, lang: str = "en", curves: dict[str, Path] | None = None) -> str:
    """The report's facts as JSON, with its sentences (hints, problems, indicators) in
    the language."""
    tr = Translator(lang)
    experiments = {}
    for name, exp in data.experiments.items():
        experiments[name] = {
            **exp.state.to_dict(),
            "shown_state": exp.shown_state,
            "pid": exp.pid,
            "description": tr.description(exp.state.kind),
            "hints": [{"key": h.key, "level": h.level, "text": hint_text(h, exp, tr)} for h in exp.hints],
            "reward_trend": exp.trend,
            "remaining_timesteps": exp.remaining_timesteps,
            "remaining_s": exp.remaining_s,
            "finish_at": exp.finish_at,
            "log": exp.log,
            "tensorboard": exp.tensorboard,
            "tensorboard_records": exp.tensorboard_records,
            "checkpoint_exists": exp.checkpoint_exists,
            "series": {key: [list(p) for p in points] for key, points in exp.series.items()},
        }
    out = {
        "lang": lang,
        "run_id": data.run_id,
        "run_dir": data.run_dir,
        "created_at": data.created_at,
        "updated_at": data.updated_at,
        "generated_at": data.generated_at,
        "live": data.live,
        "supervisor_pid": data.supervisor_pid,
        "experiments": experiments,
        "gpus": {"available": data.gpu_available, "message": data.gpu_message, "sampled_at": data.gpu_sampled_at,
                 "gpus": [dataclasses.asdict(g) for g in data.gpus]},
        "finish_at": data.finish_at,
        "model_calls": data.mask_counts.get("model_calls"),
        "distinct_pairs": data.mask_counts.get("distinct_pairs"),
        "cache_hits": data.mask_counts.get("cache_hits"),
        "mask_stage": data.mask_stage.to_dict() if data.mask_stage is not None else None,
        "problems": [{**dataclasses.asdict(p), "restart": _restart_json(p), "text": problem_text(p, tr)}
                     for p in data.problems],
        "indicators": [{**dataclasses.asdict(i), "text": indicator_text(i, tr)} for i in data.indicators],
        "evaluation": _evaluation_json(data.evaluation, tr),
        "conclusions": conclusions(data.evaluation, tr, f"sa2va-tui evaluate {data.run_ref}"),
        "combined_strategy": combined_strategy(data.evaluation, tr, f"sa2va-tui evaluate {data.run_ref}"),
        "files": data.files,
        "curves": curves or {},
    }
    return json.dumps(out, indent=1, default=str, ensure_ascii=False)


def _evaluation_json(table: EvaluationTable | None, tr: Translator) -> dict[str, Any] | None:
    """The table's summary (its per-sample values stay in evaluation.json)."""
    if table is None:
        return None
    summary = table.to_dict()
    for row, source in zip(summary["rows"], table.rows):
        row["label"] = tr.row_label(source)
        del row["values"], row["sample_ids"]
        for seed in row["seeds"]:
            del seed["values"]
    del summary["sample_ids"], summary["conditions"]
    summary["warning_text"] = warning_sentence(table, tr)
    by = "condition" if table.conditions is not None else "difficulty"
    summary["breakdown"] = {"by": by, "groups": [dataclasses.asdict(group) for group in breakdown(table, by)]}
    return summary


def _restart_json(problem) -> dict[str, Any] | None:
    """The restart that answered a problem, in the form of its events.jsonl line."""
    if problem.restart is None:
        return None
    event = problem.restart
    return {"reason": event.reason, "attempt": event.attempt, "changes": event.changes.to_json(), "time": event.time}
