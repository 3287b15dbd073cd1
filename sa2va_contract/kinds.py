"""The registry of experiment kinds: what the supervisor, the recovery policy, the
evaluation and the views need to know about each kind, in one table.

Adding a kind means a config class in `config`, a `run(ctx)` in the engine and an
entry here; nothing else names the kinds one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sa2va_contract.config import EXPERIMENT_KINDS, ExperimentConfig


@dataclass(frozen=True)
class ExperimentKind:
    name: str
    display_name: str
    #: "module:function" of its `run(ctx) -> summary`, imported only in the worker.
    entry_point: str
    #: The batch size an out-of-memory restart halves, read from the experiment's config.
    batch_size: Callable[[ExperimentConfig], int]
    #: The experiment's config running at another batch size (what a restart applies).
    with_batch_size: Callable[[ExperimentConfig, int], ExperimentConfig]
    #: The number a batch size must divide (PPO's rollout, n_steps * n_envs), if any.
    rollout: Callable[[ExperimentConfig], int | None]
    #: The rows of the evaluation table that its trained models make possible.
    evaluation_rows: tuple[str, ...]


def _ppo_batch(experiment) -> int:
    return experiment.ppo.batch_size


def _ppo_with_batch(experiment, batch_size: int):
    return experiment.model_copy(update={"ppo": experiment.ppo.model_copy(update={"batch_size": batch_size})})


def _ppo_rollout(experiment) -> int:
    return experiment.ppo.n_steps * experiment.ppo.n_envs


def _reward_net_batch(experiment) -> int:
    # The fine-tuning batch: where the segmenter's activations, the memory, live.
    return experiment.finetune.batch_size


def _reward_net_with_batch(experiment, batch_size: int):
    # The reward network's own batch never grows past its configured size either.
    return experiment.model_copy(update={
        "finetune": experiment.finetune.model_copy(update={"batch_size": batch_size}),
        "reward": experiment.reward.model_copy(update={"batch_size": min(experiment.reward.batch_size, batch_size)}),
    })


KINDS: dict[str, ExperimentKind] = {kind.name: kind for kind in (
    ExperimentKind("prompt_rl", "prompt choice (PPO)", "experiments.prompt_rl:run", _ppo_batch, _ppo_with_batch,
                   _ppo_rollout, ("prompt_policy", "combined")),
    ExperimentKind("postprocess_rl", "mask post-processing (PPO)", "experiments.postprocess_rl:run", _ppo_batch,
                   _ppo_with_batch, _ppo_rollout, ("postprocess_policy", "combined")),
    ExperimentKind("reward_net", "reward network and fine-tuning", "experiments.reward_net:run", _reward_net_batch,
                   _reward_net_with_batch, lambda experiment: None, ("finetuned", "reward_rerank")),
)}
assert tuple(KINDS) == EXPERIMENT_KINDS, "every kind of the config schema has one entry here"


#: "module:function" of the run's mask stage (`events.MASK_STAGE`): the worker that
#: computes every distinct (image, prompt) pair of the run once, before and beside the
#: experiments. Not an experiment kind: it trains nothing and has no rows.
MASK_STAGE_ENTRY = "experiments.mask_stage:run"


def kind_of(experiment: ExperimentConfig) -> ExperimentKind:
    return KINDS[experiment.kind]


def resolve_entry(kind_or_entry: str, entry_points: dict[str, str] | None = None) -> str:
    """The "module:function" for an experiment kind, or such a string itself (tests run
    workloads of their own through the same path); `entry_points` replaces the table."""
    table = {name: kind.entry_point for name, kind in KINDS.items()} if entry_points is None else entry_points
    entry = table.get(kind_or_entry, kind_or_entry)
    module, _, function = entry.partition(":")
    if not module or not function:
        raise ValueError(f"no entry point for {kind_or_entry!r}: expected a kind or 'module:function'")
    return entry
