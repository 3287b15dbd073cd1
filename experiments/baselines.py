"""The label-free baselines every evaluation table holds beside the methods.

    own expression      each image segmented with the dataset's own referring
                        expression for it (where the dataset gives per-image ones)
    best fixed prompt   the one candidate prompt with the highest mean Dice on train
    supervised chooser  per prompt, a ridge regression of its Dice gain over the
                        default prompt on the prompt policy's first observation,
                        fitted to train labels (its penalty chosen on val); per image
                        the prompt with the highest predicted gain: what a learner
                        with the policy's eyes and every train label gets, the bar an
                        RL method must clear

Labels are read only to fit on train and to choose the penalty on val; at inference
each baseline sees what the policy sees, or less.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from experiments.envs.prompt import PromptSelectEnv
from experiments.envs.tables import PromptTable

#: Ridge penalties the supervised chooser tries; val picks one.
PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0)


class RidgeChooser:
    """Least-squares on standardised features (and their squares): one regression of
    the gain per option; the chosen option is the one with the highest predicted gain."""

    def __init__(self, penalty: float = 1.0) -> None:
        self.penalty = penalty

    def fit(self, features: np.ndarray, gains: np.ndarray) -> "RidgeChooser":
        self.mu, self.sd = features.mean(0), features.std(0) + 1e-9
        x = self._design(features)
        eye = np.eye(x.shape[1])
        eye[0, 0] = 0.0  # the intercept is not penalised
        self.coef = np.linalg.solve(x.T @ x + self.penalty * eye, x.T @ gains)
        return self

    def choose(self, features: np.ndarray) -> np.ndarray:
        return (self._design(features) @ self.coef).argmax(axis=1)

    def _design(self, features: np.ndarray) -> np.ndarray:
        z = (features - self.mu) / self.sd
        return np.hstack([np.ones((len(z), 1)), z, z**2])


def first_observations(table: PromptTable) -> np.ndarray:
    """The prompt policy's observation at the start of each sample's episode: the
    very vector the policy acts on first (image and target context, the default
    prompt's mask described, an empty history)."""
    env = PromptSelectEnv(table)
    return np.stack([env.reset(options={"sample": i})[0] for i in range(len(table))]).astype(np.float64)


def best_fixed_prompt(train: PromptTable) -> int:
    """The candidate prompt with the highest mean Dice on train."""
    return int(train.dice.mean(axis=0).argmax())


class SupervisedChooser:
    """Fitted on train, its penalty chosen on val; `choose` picks a prompt per sample."""

    def __init__(self, train: PromptTable, val: PromptTable, penalties: Sequence[float] = PENALTIES) -> None:
        x_train = first_observations(train)
        gains = train.dice - train.dice[:, [train.default_prompt]]
        x_val = first_observations(val)
        rows = np.arange(len(val))
        scored = []
        for penalty in penalties:
            model = RidgeChooser(penalty).fit(x_train, gains)
            scored.append((float(val.dice[rows, model.choose(x_val)].mean()), penalty, model))
        # A tie goes to the larger penalty: the simpler model.
        self.val_dice, self.penalty, self.model = max(scored, key=lambda item: item[:2])

    def choose(self, table: PromptTable) -> np.ndarray:
        return self.model.choose(first_observations(table))
