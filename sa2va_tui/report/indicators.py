"""The signs of success of a run, each checked from what the run recorded: pass,
fail, or unknown when there is nothing to check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from sa2va_tui.report.facts import ReportData

#: A GPU whose utilisation varies more than this (standard deviation, in points)
#: while our experiments run on it is not used steadily.
GPU_STEADY_STD = 20.0


@dataclass
class Indicator:
    """A sign of success, checked from the data: pass, fail, or unknown."""

    name: str
    status: str
    #: What the check saw, for the sentence that tells it.
    facts: dict[str, Any] = field(default_factory=dict)


def check_indicators(data: ReportData) -> list[Indicator]:
    """The signs of success, each checked from what the run recorded."""
    return [_reward_rising(data), _no_crash(data), _checkpoints_saved(data), _tensorboard_written(data),
            _gpu_steady(data)]


def _status(ok: Iterable[bool]) -> str:
    """pass when every check holds, fail when one does not, unknown with none to make."""
    ok = list(ok)
    if not ok:
        return "unknown"
    return "pass" if all(ok) else "fail"


def _reward_rising(data: ReportData) -> Indicator:
    """By `analysis.reward_trend`, for every experiment that has an episode reward."""
    trends = {name: exp.trend for name, exp in data.experiments.items() if exp.rewards}
    readings = {name: len(data.experiments[name].rewards) for name in trends}
    judged = [t for t in trends.values() if t is not None]
    return Indicator("reward_rising", _status(t == "rising" for t in judged),
                     {"trends": trends, "readings": readings})


def _no_crash(data: ReportData) -> Indicator:
    crashes = [p.experiment for p in data.problems if p.kind in ("error", "killed")]
    failed = [name for name, exp in data.experiments.items() if exp.state.state == "failed"]
    ooms = [p for p in data.problems if p.kind == "oom"]
    return Indicator("no_crash", "fail" if crashes or failed else "pass",
                     {"crashes": crashes, "failed": failed, "oom": [p.experiment for p in ooms],
                      "oom_restarted": sum(p.restart is not None for p in ooms)})


def _checkpoints_saved(data: ReportData) -> Indicator:
    """Every experiment that trained has a last checkpoint, and the file is there."""
    trained = {name: exp for name, exp in data.experiments.items() if exp.state.timesteps > 0}
    checkpoints = {name: {"step": exp.state.checkpoint_step, "exists": exp.checkpoint_exists}
                   for name, exp in trained.items()}
    return Indicator("checkpoints_saved", _status(c["exists"] for c in checkpoints.values()),
                     {"checkpoints": checkpoints})


def _tensorboard_written(data: ReportData) -> Indicator:
    """Every experiment that trained wrote TensorBoard records beyond the file header."""
    records = {name: exp.tensorboard_records for name, exp in data.experiments.items() if exp.state.timesteps > 0}
    return Indicator("tensorboard_written", _status(n > 1 for n in records.values()), {"records": records})


def _gpu_steady(data: ReportData) -> Indicator:
    """Utilisation varied little on every GPU while our experiments ran on it."""
    if data.gpu_available is None:
        return Indicator("gpu_steady", "unknown", {"reason": "no_samples"})
    if not data.gpu_available:
        return Indicator("gpu_steady", "unknown", {"reason": "no_gpu", "message": data.gpu_message})
    spread = {g.label: g.util_std for g in data.gpus if g.util_std is not None}
    if not spread:
        return Indicator("gpu_steady", "unknown", {"reason": "too_few"})
    return Indicator("gpu_steady", _status(s <= GPU_STEADY_STD for s in spread.values()),
                     {"std": spread, "limit": GPU_STEADY_STD})
