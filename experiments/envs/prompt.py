"""`Sa2VA/PromptSelect-v0`: choose which candidate prompt to send to the segmenter.

An episode is one image. The episode starts from the default prompt's mask; each
action names a candidate prompt and the current mask becomes that prompt's mask.
Choosing the prompt already in use keeps its mask and ends the episode (the agent's
way of saying "this one"); otherwise the episode ends after `max_steps` choices.
The answer is the mask of the last choice.

Reward per step: `reward_scale * (Dice(new mask) - Dice(previous mask)) - step_penalty`,
the first step measured against the default prompt's mask; keeping the current
prompt changes nothing and costs nothing. With no penalty the return of an episode
is `reward_scale` times its final Dice gain over the default prompt.

Observation (all inference-time information, see `features`): image and target
features, the default prompt's mask described, the current mask described (against
the default one), the step, the last action and which prompts were tried.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from experiments.envs.episode import OBS_BOUND, clip_observation, episode_sample
from experiments.envs.features import MASK_FEATURES
from experiments.envs.tables import PromptTable


class PromptSelectEnv(gym.Env):
    """Table-driven: every candidate mask was fetched and described beforehand."""

    metadata = {"render_modes": []}

    def __init__(self, table: PromptTable, max_steps: int = 3, reward_scale: float = 1.0, step_penalty: float = 0.0):
        if len(table) == 0:
            raise ValueError("PromptSelectEnv needs at least one sample")
        self.table = table
        self.max_steps = max_steps
        self.reward_scale = reward_scale
        self.step_penalty = step_penalty
        k = table.n_prompts
        self.action_space = spaces.Discrete(k)
        size = table.context.shape[1] + 2 * MASK_FEATURES + (max_steps + 1) + (k + 1) + k
        self.observation_space = spaces.Box(-OBS_BOUND, OBS_BOUND, (size,), np.float32)
        self._history = np.zeros((max_steps + 1) + (k + 1) + k, np.float32)
        self.sample = 0
        self.prompt = table.default_prompt
        self.steps = 0
        #: Model outputs the episodes used (the default prompt's mask at each reset, one
        #: per new choice): the model calls an environment without the cache would make.
        self.masks_used = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.sample = episode_sample(self.np_random, len(self.table), options)
        self.prompt = self.table.default_prompt
        self.steps = 0
        self.masks_used += 1
        self._history[:] = 0.0
        self._history[0] = 1.0  # step 0
        self._history[self.max_steps + 1 + self.table.n_prompts] = 1.0  # no action yet
        return self._observation(), {"sample_id": self.table.ids[self.sample]}

    def step(self, action):
        choice = int(action)
        k = self.table.n_prompts
        scores = self.table.dice[self.sample]
        if choice == self.prompt:
            reward = 0.0
            terminated = True
        else:
            reward = self.reward_scale * float(scores[choice] - scores[self.prompt]) - self.step_penalty
            self.prompt = choice
            self.masks_used += 1
            terminated = self.steps + 1 >= self.max_steps
        # History: step one-hot, last action one-hot, prompts tried so far.
        self._history[self.steps] = 0.0
        self.steps += 1
        self._history[min(self.steps, self.max_steps)] = 1.0
        last = self.max_steps + 1
        self._history[last : last + k + 1] = 0.0
        self._history[last + choice] = 1.0
        self._history[last + k + 1 + choice] = 1.0
        info = {}
        if terminated:
            info = {"prompt": self.prompt, "dice_gain": float(scores[self.prompt] - scores[self.table.default_prompt])}
        return self._observation(), reward, terminated, False, info

    def _observation(self) -> np.ndarray:
        features = self.table.mask_features[self.sample]
        obs = np.concatenate([
            self.table.context[self.sample],
            features[self.table.default_prompt],
            features[self.prompt],
            self._history,
        ])
        return clip_observation(obs)

    def answer(self) -> int:
        """The candidate prompt the episode ends on (its mask is the answer)."""
        return self.prompt
