"""Everything an episode needs, computed once per split in the "caching masks" phase.

Model outputs come from the `CachedSegmenter`, so a run calls the model at most once
per distinct (image, prompt). A candidate mask is described the first time an episode
looks at it (`MaskFeatures`) and remembered, so that a prompt-choice step is a table
lookup and a post-processing step costs one mask operation and one mask description.

Ground truth is kept beside the features, used by the environments for the reward
only: the feature functions never receive it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from experiments.backends.cache import CachedSegmenter
from experiments.datasets.base import Sample, render_prompt
from experiments.mask_needs import every_prompt, one_prompt
from experiments.envs.features import (
    MASK_FEATURES,
    MaskDescriber,
    grey,
    image_features,
    prob_features,
    target_features,
)
from experiments.metrics import dice

ProgressCallback = Callable[[int, int], None]
#: Describers `MaskFeatures` keeps (each holds an image's grey levels and default mask).
DESCRIBERS_KEPT = 64


def _context(sample: Sample) -> np.ndarray:
    return np.concatenate([image_features(sample.image), target_features(sample.target)])


class MaskFeatures:
    """The description of every candidate mask of a split, (N, K, MASK_FEATURES),
    each computed the first time it is read and then kept: `features[i][k]` or
    `features[i, k]`. Episodes look at a fraction of the candidate masks (the default
    prompt's and those the policy tries), so most are never described; the masks
    themselves come from the segmenter's in-memory cache. `describe_all` computes
    every one up front instead; the values are the same either way."""

    def __init__(self, samples: Sequence[Sample], segmenter: CachedSegmenter, templates: Sequence[str],
                 default_prompt: int, min_component_area: int = 12) -> None:
        self.samples, self.segmenter, self.templates = list(samples), segmenter, list(templates)
        self.default_prompt, self.min_component_area = default_prompt, min_component_area
        self.shape = (len(self.samples), len(self.templates), MASK_FEATURES)
        self._values = np.zeros(self.shape, np.float32)
        self._described = np.zeros(self.shape[:2], bool)
        #: Describers of the samples read last: the episodes of several environments
        #: interleave, and building one (grey image, default mask decoded) costs about
        #: as much as a description.
        self._describers: OrderedDict[int, MaskDescriber] = OrderedDict()

    def __getitem__(self, index):
        if isinstance(index, tuple):
            sample, prompt = index
            return self._read(int(sample), int(prompt))
        return _SampleFeatures(self, int(index))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        self.describe_all()
        return self._values.astype(dtype) if dtype is not None else self._values.copy()

    @property
    def described(self) -> int:
        """How many masks were described so far."""
        return int(self._described.sum())

    def describe_all(self) -> None:
        for sample in range(self.shape[0]):
            for prompt in range(self.shape[1]):
                self._read(sample, prompt)

    def _read(self, sample: int, prompt: int) -> np.ndarray:
        if not self._described[sample, prompt]:
            self._values[sample, prompt] = self._describer_of(sample).describe(self._prediction(sample, prompt).mask)
            self._described[sample, prompt] = True
        return self._values[sample, prompt]

    def _describer_of(self, sample: int) -> MaskDescriber:
        describer = self._describers.get(sample)
        if describer is None:
            default = self._prediction(sample, self.default_prompt)
            describer = MaskDescriber(grey(self.samples[sample].image), default.prob, default.mask,
                                      self.min_component_area)
            self._describers[sample] = describer
            if len(self._describers) > DESCRIBERS_KEPT:
                self._describers.popitem(last=False)
        else:
            self._describers.move_to_end(sample)
        return describer

    def _prediction(self, sample: int, prompt: int):
        return self.segmenter.predict(self.samples[sample], self.templates[prompt])


class _SampleFeatures:
    """One sample's row of `MaskFeatures`: `row[k]` describes on first read."""

    def __init__(self, table: MaskFeatures, sample: int) -> None:
        self.table, self.sample = table, sample

    def __getitem__(self, prompt: int) -> np.ndarray:
        return self.table[self.sample, prompt]

    def __len__(self) -> int:
        return self.table.shape[1]


@dataclass(frozen=True)
class PromptTable:
    """Per sample: image context, the description of every candidate prompt's mask
    (against the default prompt's mask, on first read), and, for rewards only, each
    mask's Dice."""

    ids: list[str]
    templates: list[str]
    default_prompt: int
    context: np.ndarray  # (N, C) float32
    mask_features: MaskFeatures  # (N, K, F) float32, described on first read
    dice: np.ndarray  # (N, K) float64, against the labels: reward and evaluation only

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_prompts(self) -> int:
        return len(self.templates)


def build_prompt_table(
    samples: Sequence[Sample],
    segmenter: CachedSegmenter,
    templates: Sequence[str],
    default_prompt: int,
    min_component_area: int = 12,
    on_progress: ProgressCallback | None = None,
    describe_all: bool = False,
) -> PromptTable:
    """Every candidate mask of every sample through the cache and scored; described
    when an episode first looks at it, or all now with `describe_all`. Progress counts
    (sample, prompt) pairs twice: once fetched, once scored."""
    wanted = every_prompt(samples, templates)  # the pairs `mask_needs` says this table reads
    pairs = len(wanted)
    segmenter.segment(wanted.images, wanted.prompts,
                      on_progress=(lambda done, _t: on_progress(done, 2 * pairs)) if on_progress else None)
    context, scores = [], []
    for i, sample in enumerate(samples):
        context.append(_context(sample))
        scores.append([dice(segmenter.predict(sample, t).mask, sample.mask) for t in templates])
        if on_progress:
            on_progress(pairs + (i + 1) * len(templates), 2 * pairs)
    features = MaskFeatures(samples, segmenter, templates, default_prompt, min_component_area)
    if describe_all:
        features.describe_all()
    k = len(templates)
    return PromptTable(
        ids=[s.id for s in samples],
        templates=list(templates),
        default_prompt=default_prompt,
        context=np.asarray(context, np.float32),
        mask_features=features,
        dice=np.asarray(scores, np.float64).reshape(len(samples), k),
    )


@dataclass(frozen=True)
class PostprocessTable:
    """Per sample: image context (with the probability map's spread), the starting
    mask and probabilities from the segmenter, a describer bound to the image, and
    the labels (reward and evaluation only)."""

    ids: list[str]
    start_prompts: np.ndarray  # (N,) int: which candidate prompt gave the starting mask
    context: np.ndarray  # (N, C) float32
    start_masks: list[np.ndarray]
    probs: list[np.ndarray | None]
    describers: list[MaskDescriber]
    start_features: np.ndarray  # (N, F) float32
    truths: list[np.ndarray]  # labels: reward and evaluation only
    start_dice: np.ndarray  # (N,) float64
    gives_probabilities: bool
    #: States episodes reached, shared by every environment on this table.
    memo: EditMemo = field(default_factory=lambda: EditMemo())

    def __len__(self) -> int:
        return len(self.ids)


def build_postprocess_table(
    samples: Sequence[Sample],
    segmenter: CachedSegmenter,
    templates: Sequence[str],
    start_prompts: Sequence[int] | int,
    min_component_area: int = 12,
    on_progress: ProgressCallback | None = None,
) -> PostprocessTable:
    """The starting mask of each sample: the prompt `start_prompts` names (one index
    for all, the default prompt in training, or one per sample, a prompt policy's
    choices when the two policies are combined)."""
    n = len(samples)
    chosen = np.full(n, start_prompts, np.int64) if np.isscalar(start_prompts) else np.asarray(start_prompts, np.int64)
    if chosen.shape != (n,):
        raise ValueError(f"{chosen.size} start prompts for {n} samples")
    if np.isscalar(start_prompts):
        wanted = one_prompt(samples, templates[int(start_prompts)])  # the pairs `mask_needs` names
        prompts = wanted.prompts
    else:
        prompts = [render_prompt(templates[int(k)], s) for s, k in zip(samples, chosen)]
    predictions = segmenter.segment(
        [s.image for s in samples], prompts, on_progress=(lambda done, _t: on_progress(done, 2 * n)) if on_progress else None
    )
    context, describers, start_features, start_dice = [], [], [], []
    for i, (sample, prediction) in enumerate(zip(samples, predictions)):
        describer = MaskDescriber(grey(sample.image), prediction.prob, prediction.mask, min_component_area)
        describers.append(describer)
        context.append(np.concatenate([_context(sample), prob_features(prediction.prob)]))
        start_features.append(describer.describe(prediction.mask))
        start_dice.append(dice(prediction.mask, sample.mask))
        if on_progress:
            on_progress(n + i + 1, 2 * n)
    return PostprocessTable(
        ids=[s.id for s in samples],
        start_prompts=chosen,
        context=np.asarray(context, np.float32),
        start_masks=[p.mask for p in predictions],
        probs=[p.prob for p in predictions],
        describers=describers,
        start_features=np.asarray(start_features, np.float32),
        truths=[s.mask for s in samples],
        start_dice=np.asarray(start_dice, np.float64),
        gives_probabilities=segmenter.gives_probabilities,
    )


@dataclass(frozen=True)
class EditState:
    """Where a post-processing episode stands after some operations: the editor's
    state, the mask described, and its Dice (reward only). Mask kept as packed bits."""

    bits: np.ndarray
    shape: tuple[int, int]
    threshold: float
    applied: tuple[str, ...]
    features: np.ndarray
    dice: float

    @property
    def mask(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=self.shape[0] * self.shape[1]).reshape(self.shape).view(bool)


class EditMemo:
    """The states post-processing episodes reached, by (sample, operations so far).

    Operations are deterministic, so a state seen once need not be computed again;
    episodes revisit the same few states of each image more and more as the policy
    settles. Least recently used states go first once `budget_bytes` of masks are held.
    """

    def __init__(self, budget_bytes: int = 64 * 2**20) -> None:
        self.budget = budget_bytes
        self.held = 0
        self._states: OrderedDict[tuple, EditState] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> EditState | None:
        state = self._states.get(key)
        if state is None:
            self.misses += 1
            return None
        self._states.move_to_end(key)
        self.hits += 1
        return state

    def put(self, key: tuple, mask: np.ndarray, threshold: float, applied: Sequence[str], features: np.ndarray,
            score: float) -> None:
        state = EditState(np.packbits(mask, axis=None), mask.shape, threshold, tuple(applied), features, score)
        self._states[key] = state
        self.held += state.bits.nbytes + state.features.nbytes
        while self.held > self.budget and self._states:
            _, old = self._states.popitem(last=False)
            self.held -= old.bits.nbytes + old.features.nbytes
