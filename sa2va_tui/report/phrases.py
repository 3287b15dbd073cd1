"""The report's sentences, in its language: hints, problems and how they were
resolved, the facts behind each indicator. The Markdown and the JSON report say the
same things with the same words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sa2va_tui.analysis import (
    HIGH_APPROX_KL,
    HIGH_CLIP_FRACTION,
    LOW_EXPLAINED_VARIANCE,
    PPO_METRICS,
    REWARD_NET_METRICS,
    Hint,
    MetricRow,
)
from sa2va_tui.report.facts import ExperimentReport, Problem
from sa2va_tui.report.i18n import Translator
from sa2va_tui.report.indicators import Indicator
from sa2va_tui.runstate import EPISODE_REWARD, ExperimentState
from sa2va_tui.text import device_name

#: What the reward network reports on top of `analysis.REWARD_NET_METRICS`: the
#: segmenter's Dice before and after its fine-tuning, on the reported split.
REWARD_NET_EXTRA = ("finetune/dice_before", "finetune/dice_after")


def code(text: Any) -> str:
    """An identifier, path, command or message as Markdown code, on one line."""
    return "`" + " ".join(str(text).replace("`", "'").split()) + "`"


def progress_text(state: ExperimentState) -> str:
    text = f"{state.timesteps}/{state.total or '?'}"
    return text + (f" ({state.fraction:.0%})" if state.fraction is not None else "")


def number(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def metric_rows(state: ExperimentState) -> tuple[MetricRow, ...]:
    """The metrics to show for an experiment of this kind (the app's own lists)."""
    if state.kind == "reward_net":
        return REWARD_NET_METRICS + tuple(MetricRow(key, key, ".4f") for key in REWARD_NET_EXTRA)
    return PPO_METRICS


#: The threshold each hint of `analysis` compares with, for its translation.


_HINT_LIMITS = {
    "train/explained_variance": LOW_EXPLAINED_VARIANCE,
    "train/approx_kl": HIGH_APPROX_KL,
    "train/clip_fraction": HIGH_CLIP_FRACTION,
}


def hint_text(hint: Hint, exp: ExperimentReport, tr: Translator) -> str:
    """The hint in the report's language: analysis' own words in English, a translation
    of the same remark (same value, same threshold) otherwise."""
    if tr.lang == "en":
        return hint.text
    if hint.key == EPISODE_REWARD and exp.trend is not None:
        return tr("hint.trend", trend=tr.trend(exp.trend))
    value = exp.state.metrics.get(hint.key)
    translated = tr.optional(f"hint.{hint.key}", value=value, limit=_HINT_LIMITS.get(hint.key))
    return translated if translated is not None and value is not None else f"{code(hint.key)}: {hint.text}"


def problem_text(p: Problem, tr: Translator) -> str:
    """What happened, what was changed, and how it ended."""
    if p.kind == "interrupted":
        return tr("problem.interrupted", step=p.step)
    if p.kind == "restart":
        what = tr("problem.restart")
    else:
        what = tr("problem.failed", kind=tr.failure_kind(p.kind), step=number(p.step, "d"),
                  batch=p.batch_size or "-", gpu=device_name(p.gpu))
        if p.exit_code is not None:
            what += tr("problem.exit_code", code=p.exit_code)
        if p.message:
            what = tr.item(what, code(p.message))
    if p.restart is None:
        resolution = tr("problem.unresolved")
    else:
        changes = p.restart.changes
        done = [tr("problem.changed", what=tr.optional(f"change.{key}") or code(key),
                   old=_change_value(key, change.old), new=_change_value(key, change.new))
                for key, change in changes.changed()]
        origin = changes.resume_from
        done.append(tr("problem.from_checkpoint", path=code(Path(origin).name)) if origin
                    else tr("problem.from_start"))
        resolution = tr("problem.restarted", reason=tr.restart_reason(p.restart.reason),
                        attempt=p.restart.attempt, changes=tr.join(done))
    outcome = tr("problem.outcome", state=tr.state(p.outcome))
    return tr("problem.sentence", what=what, resolution=resolution, outcome=outcome)


def _change_value(key: str, value: Any) -> str:
    return device_name(value) if key == "gpu" else str(value)


def indicator_text(ind: Indicator, tr: Translator) -> str:
    """The facts behind one indicator, in words."""
    f = ind.facts
    if ind.name == "reward_rising":
        parts = [tr("ind.trend", name=code(name), trend=tr.trend(trend)) if trend else
                 tr("ind.too_few", name=code(name), n=f["readings"][name]) for name, trend in f["trends"].items()]
        return tr.join(parts) if parts else tr("ind.no_rewards")
    if ind.name == "no_crash":
        parts = [tr("ind.crashed", names=tr.names(code(n) for n in f["crashes"]))] if f["crashes"] else []
        if f["failed"]:
            parts.append(tr("ind.failed", names=tr.names(code(n) for n in f["failed"])))
        if f["oom"]:
            parts.append(tr("ind.oom", n=len(f["oom"]), restarted=f["oom_restarted"]))
        return tr.join(parts) if parts else tr("ind.no_failure")
    if ind.name == "checkpoints_saved":
        parts = [tr("ind.checkpoint" if c["exists"] else "ind.no_checkpoint", name=code(name), step=c["step"])
                 for name, c in f["checkpoints"].items()]
        return tr.join(parts) if parts else tr("ind.nothing_trained")
    if ind.name == "tensorboard_written":
        parts = [tr("ind.records", name=code(name), n=max(0, n - 1)) for name, n in f["records"].items()]
        return tr.join(parts) if parts else tr("ind.nothing_trained")
    if ind.name == "gpu_steady":
        if "std" in f:
            return tr.join(tr("ind.gpu_std", gpu=gpu, std=std, limit=f["limit"]) for gpu, std in f["std"].items())
        return tr(f"ind.gpu_{f['reason']}", message=code(f.get("message", "")))
    raise ValueError(f"unknown indicator {ind.name}")
