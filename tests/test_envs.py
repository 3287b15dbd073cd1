"""The two environments: both checkers, honest observations, rewards that add up to
the final Dice gain. Real dataset, real embedded model, real OpenCV operations."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from experiments.backends import make_cached_segmenter
from experiments.datasets import load_split
from experiments.envs import (
    POSTPROCESS_ENV_ID,
    PROMPT_ENV_ID,
    build_postprocess_table,
    build_prompt_table,
    effective_operations,
)
from experiments.metrics import dice
from sa2va_contract.config import ALL_OPS, MORPHOLOGY_OPS
from sa2va_contract.config import load_config

from conftest import QUICK_CONFIG

N_SAMPLES = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = load_config(QUICK_CONFIG, [f"backend.cache_dir={tmp_path_factory.mktemp('cache')}"])
    segmenter = make_cached_segmenter(config)
    samples = load_split(config.dataset, "train")[:N_SAMPLES]
    return config, segmenter, samples


def _tables(config, segmenter, samples):
    backend = config.backend
    return (build_prompt_table(samples, segmenter, backend.prompts, backend.default_prompt),
            build_postprocess_table(samples, segmenter, backend.prompts, backend.default_prompt))


def _make(env_id, table, config):
    if env_id == PROMPT_ENV_ID:
        return gym.make(env_id, table=table, max_steps=config.prompt_rl.max_steps)
    return gym.make(env_id, table=table, operations=config.postprocess_rl.operations,
                    max_steps=config.postprocess_rl.max_steps)


@pytest.mark.parametrize("env_id", [PROMPT_ENV_ID, POSTPROCESS_ENV_ID])
def test_both_environment_checkers_pass(setup, env_id):
    config, segmenter, samples = setup
    prompt_table, post_table = _tables(config, segmenter, samples)
    env = _make(env_id, prompt_table if env_id == PROMPT_ENV_ID else post_table, config)
    with warnings.catch_warnings():
        # A checker's warning is a finding: fail on it.
        warnings.simplefilter("error")
        gym_check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped, warn=True)


def _rollout(env, seed: int, actions: np.ndarray):
    """Observations, rewards and sample ids of episodes driven by a fixed action list."""
    observations, rewards, ids = [], [], []
    obs, info = env.reset(seed=seed)
    observations.append(obs)
    ids.append(info["sample_id"])
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(int(action))
        observations.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            obs, info = env.reset()
            observations.append(obs)
            ids.append(info["sample_id"])
    return np.array(observations), np.array(rewards), ids


@pytest.mark.parametrize("env_id", [PROMPT_ENV_ID, POSTPROCESS_ENV_ID])
def test_observations_do_not_change_when_only_the_labels_change(setup, env_id):
    config, segmenter, samples = setup
    rng = np.random.default_rng(1)
    relabelled = [s.with_mask(rng.random(s.mask.shape) > 0.8) for s in samples]
    runs = []
    for dataset in (samples, relabelled):
        prompt_table, post_table = _tables(config, segmenter, dataset)
        env = _make(env_id, prompt_table if env_id == PROMPT_ENV_ID else post_table, config)
        actions = np.random.default_rng(2).integers(0, env.action_space.n, 300)
        runs.append(_rollout(env, seed=3, actions=actions))
    (obs_a, rewards_a, ids_a), (obs_b, rewards_b, ids_b) = runs
    assert ids_a == ids_b and len(set(ids_a)) > 1
    np.testing.assert_array_equal(obs_a, obs_b)
    # The labels did change what the episodes are worth: the test has teeth.
    assert not np.allclose(rewards_a, rewards_b)


def test_prompt_episode_return_is_the_final_dice_gain(setup):
    config, segmenter, samples = setup
    prompt_table, _ = _tables(config, segmenter, samples)
    env = gym.make(PROMPT_ENV_ID, table=prompt_table, max_steps=3).unwrapped
    rng = np.random.default_rng(0)
    lengths = set()
    for episode in range(40):
        env.reset(seed=episode)
        total, done, steps = 0.0, False, 0
        while not done:
            _, reward, done, _, info = env.step(int(rng.integers(prompt_table.n_prompts)))
            total += reward
            steps += 1
        lengths.add(steps)
        scores = prompt_table.dice[env.sample]
        expected = scores[env.answer()] - scores[prompt_table.default_prompt]
        assert total == pytest.approx(expected) == pytest.approx(info["dice_gain"])
        # The answer is the last choice's mask, scored against the labels.
        answer_mask = segmenter.predict(samples[env.sample], prompt_table.templates[env.answer()]).mask
        assert dice(answer_mask, samples[env.sample].mask) == pytest.approx(scores[env.answer()])
    assert max(lengths) == 3 and min(lengths) < 3  # choosing the prompt in use ends an episode


def test_postprocess_episode_return_is_the_final_dice_gain(setup):
    config, segmenter, samples = setup
    _, post_table = _tables(config, segmenter, samples)
    env = gym.make(POSTPROCESS_ENV_ID, table=post_table, operations=list(ALL_OPS), max_steps=3).unwrapped
    rng = np.random.default_rng(0)
    for episode in range(60):  # enough to pass through memoised states as well
        env.reset(seed=episode % 7)
        total, done = 0.0, False
        while not done:
            _, reward, done, _, info = env.step(int(rng.integers(env.action_space.n)))
            total += reward
        start = dice(post_table.start_masks[env.sample], samples[env.sample].mask)
        final = dice(env.answer(), samples[env.sample].mask)
        assert total == pytest.approx(final - start) == pytest.approx(info["dice_gain"])
    assert post_table.memo.hits > 0


def test_threshold_actions_only_where_the_backend_gives_probabilities():
    assert effective_operations(ALL_OPS, gives_probabilities=False) == list(MORPHOLOGY_OPS)
    assert effective_operations(ALL_OPS, gives_probabilities=True) == list(ALL_OPS)
    with pytest.raises(ValueError, match="unknown"):
        effective_operations(["dilate", "smooth"], True)


def test_a_policy_is_scored_on_the_mask_it_ends_on_not_the_best_it_saw(setup):
    """A scripted policy picks each image's best prompt, then its worst: the answer
    run_episodes reports (and the evaluation scores) is the worst."""
    from experiments.envs import PromptSelectEnv
    from experiments.ppo_common import run_episodes

    config, segmenter, samples = setup
    prompt_table, _ = _tables(config, segmenter, samples)
    best, worst = prompt_table.dice.argmax(axis=1), prompt_table.dice.argmin(axis=1)
    width = prompt_table.context.shape[1]

    class BestThenWorst:
        """Knows each image by its context features, and how often it has acted on it."""

        def __init__(self):
            self.acted = np.zeros(len(samples), int)

        def predict(self, obs, deterministic=False):
            assert deterministic
            actions = []
            for row in obs:
                i = int(np.flatnonzero((prompt_table.context == row[:width]).all(axis=1))[0])
                actions.append(best[i] if self.acted[i] == 0 else worst[i])
                self.acted[i] += 1
            return np.array(actions), None

    outcomes = run_episodes(BestThenWorst(), [PromptSelectEnv(prompt_table, max_steps=2) for _ in samples])
    assert any(outcome.answer != best[i] for i, outcome in enumerate(outcomes))  # the test has teeth
    for i, outcome in enumerate(outcomes):
        # Choosing the prompt already in use ends an episode: only then is the best kept.
        kept_best = best[i] == prompt_table.default_prompt
        assert outcome.actions[0] == best[i]
        assert outcome.answer == (best[i] if kept_best else worst[i])
