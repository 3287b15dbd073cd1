"""`Sa2VA/PostProcess-v0`: edit the segmenter's mask with a sequence of operations.

An episode is one image. It starts from the segmenter's mask for the default prompt
(or for a prompt policy's choice, when the two policies are combined). Each action
applies one of the configured operations (`experiments.postprocess`) or STOP; the
episode ends at STOP or after `max_steps` operations. The answer is the mask the
episode ends with.

Reward per operation: `reward_scale * (Dice(new mask) - Dice(previous mask)) -
step_penalty`; STOP is free. With no penalty the return of an episode is
`reward_scale` times its final Dice gain over the starting mask.

Observation (inference-time information only, see `features`): image and target
features, the spread of the backend's probability map, the starting mask and the
current mask described, the current threshold, the step, the last action and how
often each operation was applied.
"""

from __future__ import annotations

from typing import Callable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from experiments.envs.features import MASK_FEATURES
from experiments.envs.episode import OBS_BOUND, clip_observation, episode_sample
from experiments.envs.tables import PostprocessTable
from experiments.postprocess import MaskEditor, OpSettings
from sa2va_contract.config import ALL_OPS, STOP, THRESHOLD_OPS


def effective_operations(operations: Sequence[str], gives_probabilities: bool) -> list[str]:
    """The configured operations, less the threshold moves where the backend gives no
    probabilities (they could never change a binary mask: dead actions)."""
    unknown = [op for op in operations if op not in ALL_OPS]
    if unknown:
        raise ValueError(f"unknown operations {unknown}; known: {', '.join(ALL_OPS)}")
    return [op for op in operations if gives_probabilities or op not in THRESHOLD_OPS]


def describe_and_score(table: PostprocessTable, sample: int, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """The mask's features (observation) and its Dice against the labels (reward only).
    Dice is counted here rather than with `metrics.dice`, whose stack-wise form costs
    ten times more on one mask; the convention is the same (both empty: 1.0)."""
    truth = table.truths[sample]
    both = np.count_nonzero(mask) + np.count_nonzero(truth)
    score = 2.0 * np.count_nonzero(mask & truth) / both if both else 1.0
    return table.describers[sample].describe(mask), float(score)


def prefill_first_operations(table: PostprocessTable, operations: Sequence[str], settings: OpSettings,
                             on_progress: Callable[[int, int], None] | None = None) -> None:
    """Put every sample's state after each first operation in the table's memo: part of
    the caching phase, so that the first step of an episode is a lookup. (Deeper
    states are 10 times as many per level; they fill the memo as episodes reach them.)"""
    ops = effective_operations(operations, table.gives_probabilities)
    for i in range(len(table)):
        for op in ops:
            editor = MaskEditor(table.start_masks[i], table.probs[i], settings)
            mask = editor.apply(op)
            features, score = describe_and_score(table, i, mask)
            table.memo.put((i, (op,)), mask, editor.threshold, editor.applied, features, score)
        if on_progress:
            on_progress(i + 1, len(table))


class PostProcessEnv(gym.Env):
    """Operations run for real on each step (they cost tens of microseconds on the
    embedded model's masks); the model's masks themselves come from the table."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        table: PostprocessTable,
        operations: Sequence[str],
        settings: OpSettings = OpSettings(),
        max_steps: int = 3,
        reward_scale: float = 1.0,
        step_penalty: float = 0.0,
    ):
        if len(table) == 0:
            raise ValueError("PostProcessEnv needs at least one sample")
        self.table = table
        self.operations = effective_operations(operations, table.gives_probabilities)
        self.actions = [*self.operations, STOP]
        self.settings = settings
        self.max_steps = max_steps
        self.reward_scale = reward_scale
        self.step_penalty = step_penalty
        n_actions = len(self.actions)
        self.action_space = spaces.Discrete(n_actions)
        self._history_size = 1 + (max_steps + 1) + (n_actions + 1) + len(self.operations)
        size = table.context.shape[1] + 2 * MASK_FEATURES + self._history_size
        self.observation_space = spaces.Box(-OBS_BOUND, OBS_BOUND, (size,), np.float32)
        self._history = np.zeros(self._history_size, np.float32)
        self.sample = 0
        self.steps = 0
        self.editor: MaskEditor | None = None
        self._path: tuple[str, ...] = ()  # operations of this episode so far: the memo's key
        self._features = np.zeros(MASK_FEATURES, np.float32)
        self._dice = 0.0
        #: Model outputs the episodes used (the starting mask, once per reset): the
        #: model calls an environment without the cache would make.
        self.masks_used = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.sample = episode_sample(self.np_random, len(self.table), options)
        t = self.table
        self.editor = MaskEditor(t.start_masks[self.sample], t.probs[self.sample], self.settings)
        self.steps = 0
        self._path = ()
        self.masks_used += 1
        self._features = t.start_features[self.sample]
        self._dice = float(t.start_dice[self.sample])
        self._history[:] = 0.0
        self._history[1] = 1.0  # step 0
        self._history[1 + self.max_steps + 1 + len(self.actions)] = 1.0  # no action yet
        self._set_threshold()
        return self._observation(), {"sample_id": t.ids[self.sample]}

    def step(self, action):
        assert self.editor is not None, "call reset() first"
        choice = int(action)
        op = self.actions[choice]
        if op == STOP:
            reward = 0.0
            terminated = True
        else:
            score = self._apply(op)
            reward = self.reward_scale * (score - self._dice) - self.step_penalty
            self._dice = score
            terminated = self.steps + 1 >= self.max_steps
        steps_at = 1
        self._history[steps_at + self.steps] = 0.0
        self.steps += 1
        self._history[steps_at + min(self.steps, self.max_steps)] = 1.0
        last = steps_at + self.max_steps + 1
        self._history[last : last + len(self.actions) + 1] = 0.0
        self._history[last + choice] = 1.0
        if op != STOP:
            self._history[last + len(self.actions) + 1 + choice] += 1.0 / self.max_steps
        self._set_threshold()
        info = {}
        if terminated:
            info = {"ops": list(self.editor.applied), "dice_gain": self._dice - float(self.table.start_dice[self.sample])}
        return self._observation(), float(reward), terminated, False, info

    def _apply(self, op: str) -> float:
        """Move the editor on by `op`, from the memo where this sample already went
        the same way; returns the new mask's Dice (for the reward only)."""
        editor = self.editor
        assert editor is not None
        self._path = (*self._path, op)
        key = (self.sample, self._path)
        memo = self.table.memo
        state = memo.get(key)
        if state is not None:
            editor.mask, editor.threshold, editor.applied = state.mask, state.threshold, list(state.applied)
            self._features = state.features
            return state.dice
        mask = editor.apply(op)
        self._features, score = describe_and_score(self.table, self.sample, mask)
        memo.put(key, mask, editor.threshold, editor.applied, self._features, score)
        return score

    def _set_threshold(self) -> None:
        # Where the threshold stands: it moves the mask only through threshold ops.
        assert self.editor is not None
        self._history[0] = self.editor.threshold

    def _observation(self) -> np.ndarray:
        t = self.table
        obs = np.concatenate([t.context[self.sample], t.start_features[self.sample], self._features, self._history])
        return clip_observation(obs)

    def answer(self) -> np.ndarray:
        """The mask the episode ends with."""
        assert self.editor is not None, "call reset() first"
        return self.editor.mask
