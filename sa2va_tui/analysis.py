"""What the numbers of a training run mean, in plain words: the metrics worth showing,
the hints a value calls for, and the trend of the episode reward.

Shared by the Textual app and the report, so that a hint reads the same everywhere. It
imports nothing of any UI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

#: Below this, the value function explains little of the returns yet.
LOW_EXPLAINED_VARIANCE = 0.1
#: Above this, one PPO update moved the policy far from the one that collected the data.
HIGH_APPROX_KL = 0.02
#: Above this, most of a PPO update was cut off by the clip range.
HIGH_CLIP_FRACTION = 0.3
#: A trend needs at least this many reward readings.
MIN_TREND_POINTS = 6
#: How far (in standard errors) the recent half must sit from the earlier half to count.
TREND_SIGNIFICANCE = 2.0

TRENDS = ("rising", "flat", "falling")

KL_ADVICE = "a lower learning rate or clip range steadies them"
CLIP_ADVICE = "fewer epochs per update or a lower learning rate clip less"
FALLING_ADVICE = "look at the last checkpoints and approx_kl: the policy may be collapsing"


@dataclass(frozen=True)
class MetricRow:
    """One metric as the app's table and the report show it."""

    key: str
    label: str
    #: A format spec for the value.
    spec: str = ".4g"

    def format(self, metrics: Mapping[str, float]) -> str:
        value = metrics.get(self.key)
        return "-" if value is None else format(value, self.spec)


#: The stable-baselines3 PPO metrics, in the order a researcher reads them.
PPO_METRICS = (
    MetricRow("rollout/ep_rew_mean", "ep_rew_mean"),
    MetricRow("rollout/ep_len_mean", "ep_len_mean", ".3g"),
    MetricRow("train/approx_kl", "approx_kl", ".3g"),
    MetricRow("train/clip_fraction", "clip_fraction", ".3g"),
    MetricRow("train/entropy_loss", "entropy_loss", ".3g"),
    MetricRow("train/explained_variance", "explained_variance", ".3g"),
    MetricRow("train/value_loss", "value_loss", ".3g"),
    MetricRow("time/fps", "fps", ".0f"),
    MetricRow("time/iterations", "iterations", ".0f"),
)

#: The reward network's own figures (step 1: predicting Dice; step 2: fine-tuning).
REWARD_NET_METRICS = (
    MetricRow("reward/train_loss", "reward loss", ".3g"),
    MetricRow("reward/val_mae", "val MAE", ".3g"),
    MetricRow("reward/spearman", "Spearman", ".3f"),
    MetricRow("finetune/reward", "finetune reward", ".3g"),
)


@dataclass(frozen=True)
class Hint:
    """A plain-language remark on one metric."""

    key: str
    #: "note" for something to know, "warn" for something to look at.
    level: str
    text: str
    #: What a researcher usually does about it; empty when nothing needs doing.
    advice: str = ""


def reward_trend(rewards: Sequence[float]) -> str | None:
    """"rising", "flat" or "falling": whether the later half of the readings averages
    clearly (beyond their noise) above or below the earlier half; None with too few."""
    values = [v for v in rewards if math.isfinite(v)]
    if len(values) < MIN_TREND_POINTS:
        return None
    half = len(values) // 2
    early, late = values[:half], values[-half:]
    diff = _mean(late) - _mean(early)
    spread = math.sqrt((_variance(early) + _variance(late)) / half)
    if spread == 0.0:
        return "flat" if diff == 0.0 else ("rising" if diff > 0 else "falling")
    score = diff / spread
    if score > TREND_SIGNIFICANCE:
        return "rising"
    if score < -TREND_SIGNIFICANCE:
        return "falling"
    return "flat"


def hints(metrics: Mapping[str, float], rewards: Sequence[float] = ()) -> list[Hint]:
    """The remarks the latest metrics (and the reward history, oldest first) call for."""
    found: list[Hint] = []
    ev = metrics.get("train/explained_variance")
    if ev is not None and ev < LOW_EXPLAINED_VARIANCE:
        found.append(Hint("train/explained_variance", "note",
                          f"value function still learning (explained variance {ev:.2g} < {LOW_EXPLAINED_VARIANCE:g})"))
    kl = metrics.get("train/approx_kl")
    if kl is not None and kl > HIGH_APPROX_KL:
        found.append(Hint("train/approx_kl", "warn", f"large policy updates (approx_kl {kl:.3g} > {HIGH_APPROX_KL:g})",
                          KL_ADVICE))
    clip = metrics.get("train/clip_fraction")
    if clip is not None and clip > HIGH_CLIP_FRACTION:
        found.append(Hint("train/clip_fraction", "warn",
                          f"most updates clipped (clip_fraction {clip:.3f} > {HIGH_CLIP_FRACTION:g})",
                          CLIP_ADVICE))
    trend = reward_trend(rewards)
    if trend is not None:
        falling = trend == "falling"
        found.append(Hint("rollout/ep_rew_mean", "warn" if falling else "note", f"reward {trend}",
                          FALLING_ADVICE if falling else ""))
    return found


def legend() -> list[str]:
    """Each rule in one sentence, for a help screen or a report's footnote."""
    return [
        f"explained variance below {LOW_EXPLAINED_VARIANCE:g}: the value function is still learning",
        f"approx_kl above {HIGH_APPROX_KL:g}: large policy updates; {KL_ADVICE}",
        f"clip_fraction above {HIGH_CLIP_FRACTION:g}: most of an update was clipped; {CLIP_ADVICE}",
        f"reward rising, flat or falling: the later half of the last readings (at least {MIN_TREND_POINTS}) against "
        f"the earlier half, beyond {TREND_SIGNIFICANCE:g} standard errors",
    ]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _variance(values: Sequence[float]) -> float:
    mean = _mean(values)
    return sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)
