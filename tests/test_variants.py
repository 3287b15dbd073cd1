"""Seed variants made by `launch --seeds`, and how the evaluation folds them."""

import pytest

from sa2va_contract.config import ConfigError, load_config
from sa2va_contract.layout import is_plain_name
from sa2va_contract.variants import command_variants, seed_groups, seed_variant_name, with_variants

from conftest import QUICK_CONFIG


def test_seeds_make_variants_named_after_the_experiment_and_its_seed():
    config = load_config(QUICK_CONFIG, ["prompt_rl.seed=5", "variants={lr_low: {base: prompt_rl, ppo: {learning_rate: 0.0001}}}"])
    made = command_variants(config, 3)
    assert set(made) == {"prompt_rl-seed6", "prompt_rl-seed7", "postprocess_rl-seed1", "postprocess_rl-seed2",
                         "reward_net-seed1", "reward_net-seed2", "lr_low-seed6", "lr_low-seed7"}
    assert all(is_plain_name(name) for name in made)
    assert made["lr_low-seed7"] == {"base": "prompt_rl", "ppo": {"learning_rate": 0.0001}, "seed": 7}
    seeded = with_variants(config, made, "--seeds 3")
    experiments = seeded.experiments()
    assert experiments["lr_low-seed7"].ppo.learning_rate == 0.0001 and experiments["lr_low-seed7"].seed == 7
    assert seed_groups(experiments) == {
        "prompt_rl": ["prompt_rl", "prompt_rl-seed6", "prompt_rl-seed7"],
        "postprocess_rl": ["postprocess_rl", "postprocess_rl-seed1", "postprocess_rl-seed2"],
        "reward_net": ["reward_net", "reward_net-seed1", "reward_net-seed2"],
        "lr_low": ["lr_low", "lr_low-seed6", "lr_low-seed7"],
    }
    assert command_variants(config, 1) == {} and seed_variant_name("x", 2) == "x-seed2"


def test_variants_that_differ_in_more_than_the_seed_stay_apart():
    config = load_config(QUICK_CONFIG, ["variants={prompt_rl_seed2: {base: prompt_rl, seed: 2}, "
                                        "other: {base: prompt_rl, seed: 3, max_steps: 2}}"])
    groups = seed_groups(config.experiments())
    assert groups["prompt_rl"] == ["prompt_rl", "prompt_rl_seed2"] and groups["other"] == ["other"]


def test_names_are_plain_and_taken_names_are_refused():
    with pytest.raises(ConfigError, match="letters, digits"):
        load_config(QUICK_CONFIG, ["variants={'a b': {base: prompt_rl}}"])
    config = load_config(QUICK_CONFIG, ["variants={prompt_rl-seed1: {base: prompt_rl, seed: 1}}"])
    with pytest.raises(ConfigError, match="already has a variant named prompt_rl-seed1"):
        with_variants(config, command_variants(config, 2), "--seeds 2")


def test_launch_seeds_runs_each_seed_as_its_own_experiment(real_run, tmp_path):
    """`launch --seeds 2 --only prompt_rl`: the experiment and its seed variant, each its
    own worker and folder, written into the run's config.yaml."""
    from typer.testing import CliRunner

    from sa2va_tui.cli import app
    from sa2va_tui.runstore import load_run, load_run_config

    args = ["launch", "--headless", "--seeds", "2", "--only", "prompt_rl", "-c", str(QUICK_CONFIG)]
    for setting in real_run:
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "logs").iterdir()
    snapshot = load_run(run_dir)
    assert {name: s.state for name, s in snapshot.experiments.items() if s.state != "pending"} == {
        "prompt_rl": "finished", "prompt_rl-seed1": "finished"}
    config = load_run_config(run_dir)
    assert config.variants["prompt_rl-seed1"] == {"base": "prompt_rl", "seed": 1}
    assert config.experiments()["prompt_rl-seed1"].seed == 1
    assert (run_dir / "prompt_rl-seed1" / "best_model.zip").is_file()
