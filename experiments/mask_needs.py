"""Which (image, prompt) pairs each experiment of a run reads from the segmenter.

One function per kind, used by the mask stage (which computes the union once) and by
the experiments themselves (which read exactly these pairs through the cache), so the
two can never disagree. Nothing here calls a model; loading the splits is the only
cost (the built-in dataset is generated, a folder dataset read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from experiments.datasets import Sample, render_prompt, reported_split, run_split
from sa2va_contract.config import Config, ExperimentConfig


@dataclass(frozen=True)
class Pairs:
    """(sample, rendered prompt) pairs, in the order an experiment reads them."""

    samples: list[Sample]
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def images(self) -> list:
        return [s.image for s in self.samples]


def every_prompt(samples: Sequence[Sample], templates: Sequence[str]) -> Pairs:
    """Every candidate prompt of every sample, sample by sample."""
    return Pairs([s for s in samples for _ in templates], [render_prompt(t, s) for s in samples for t in templates])


def one_prompt(samples: Sequence[Sample], template: str) -> Pairs:
    return Pairs(list(samples), [render_prompt(template, s) for s in samples])


class Splits:
    """Splits loaded once, however many experiments ask for them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._loaded: dict[str, list[Sample]] = {}

    def __call__(self, split: str) -> list[Sample]:
        if split not in self._loaded:
            self._loaded[split] = run_split(self.config, split)
        return self._loaded[split]


def reward_image_sets(config: Config, experiment, splits: Callable[[str], list[Sample]] | None = None,
                      with_report: bool = True) -> dict[str, list[Sample]]:
    """The reward-network experiment's images, one job each, disjoint: `reward` (the
    reward network learns on them), `choice` (its best epoch is chosen on them),
    `finetune` (fine-tuning draws from them, labels unread) and `report` (the
    before/after figure; left out without `with_report`: the mask stage needs no
    test images, which take time to load)."""
    splits = splits or Splits(config)
    split, _ = reported_split(config.dataset)
    train = splits("train")
    wanted, tuned = experiment.reward.samples, experiment.finetune.samples
    reward, finetune = train[:wanted], train[wanted:wanted + tuned]
    if not finetune:
        raise ValueError(f"reward_net.reward.samples: {wanted} leaves no train image for fine-tuning "
                         f"(the train split has {len(train)}; fine-tuning must not use the reward network's images)")
    held = max(2, len(reward) // 4)
    if split == "val":
        # Val reports, so it cannot choose too: hold out part of the reward images.
        if len(reward) <= held:
            raise ValueError(f"reward_net.reward.samples: {wanted} is too few to hold {held} out for choosing the epoch")
        reward, choice = reward[:-held], reward[-held:]
    else:
        choice = splits("val")[: max(8, held)]
    sets = {"reward": list(reward), "choice": list(choice), "finetune": list(finetune)}
    return {**sets, "report": splits(split)} if with_report else sets


def reward_net_samples(image_sets: dict[str, list[Sample]]) -> list[Sample]:
    """The images whose candidate masks the reward network reads (the report images go
    through the trainable model, never the cache)."""
    return image_sets["reward"] + image_sets["choice"] + image_sets["finetune"]


def prompt_rl_pairs(config: Config, experiment, splits) -> dict[str, Pairs]:
    """Every candidate mask of train and val (the prompt table of each split)."""
    return {split: every_prompt(splits(split), config.backend.prompts) for split in ("train", "val")}


def postprocess_rl_pairs(config: Config, experiment, splits) -> dict[str, Pairs]:
    """The default prompt's mask of every train and val sample (each episode's start)."""
    template = config.backend.prompts[config.backend.default_prompt]
    return {split: one_prompt(splits(split), template) for split in ("train", "val")}


def reward_net_pairs(config: Config, experiment, splits) -> dict[str, Pairs]:
    """Every candidate mask of the reward, choice and fine-tuning images."""
    sets = reward_image_sets(config, experiment, splits, with_report=False)
    return {"candidates": every_prompt(reward_net_samples(sets), config.backend.prompts)}


#: Per kind: (config, its experiment's config, splits) -> the pairs it reads, by part.
NEEDS: dict[str, Callable[[Config, ExperimentConfig, Callable[[str], list[Sample]]], dict[str, Pairs]]] = {
    "prompt_rl": prompt_rl_pairs,
    "postprocess_rl": postprocess_rl_pairs,
    "reward_net": reward_net_pairs,
}


def pairs_of(config: Config, name: str, splits: Callable[[str], list[Sample]] | None = None) -> dict[str, Pairs]:
    """The pairs the experiment `name` of `config` reads, by part (a split, or a job)."""
    experiment = config.experiments()[name]
    return NEEDS[experiment.kind](config, experiment, splits or Splits(config))


def all_pairs(parts: dict[str, Pairs]) -> Pairs:
    """The parts of one experiment joined, in order."""
    return Pairs([s for p in parts.values() for s in p.samples], [q for p in parts.values() for q in p.prompts])


#: Seconds one Sa2VA mask takes on one GPU, when `check --deep` has not measured it:
#: a round figure for a 4B checkpoint in bf16 (the README says so); the deep check
#: measures the real one on the configured checkpoint.
SA2VA_SECONDS_PER_PAIR = 1.0


def distinct_pair_count(config: Config, names: Sequence[str] | None = None) -> int:
    """Distinct (sample, prompt) pairs the experiments `names` (default: every enabled
    one) read: what the mask stage computes on a cold cache."""
    splits = Splits(config)
    seen: set[tuple[str, str]] = set()
    for name in names or list(config.experiments()):
        pairs = all_pairs(pairs_of(config, name, splits))
        seen.update((s.id, p) for s, p in zip(pairs.samples, pairs.prompts))
    return len(seen)


def fill_estimate(config: Config, seconds_per_pair: float, replicas: int, gpus: int, measured: bool) -> str:
    """The mask stage's fill time on a cold cache, in one line: its distinct pairs over
    `replicas` segmenter replicas (on `gpus` GPUs)."""
    pairs = distinct_pair_count(config)
    if not replicas:
        return f"mask stage: {pairs:,} distinct pairs, but no GPU to compute them on"
    seconds = pairs * seconds_per_pair / replicas
    source = "measured by check --deep" if measured else "an assumed figure; check --deep measures it"
    return (f"mask stage: {pairs:,} distinct pairs for {', '.join(config.experiments())}, about {_duration(seconds)} "
            f"on {replicas} GPU replica{'s' if replicas > 1 else ''} over {gpus} GPU{'s' if gpus != 1 else ''} "
            f"({seconds_per_pair:.2f} s per pair, {source}; pairs already cached are not redone)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
