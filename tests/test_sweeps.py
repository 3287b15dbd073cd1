"""`--sweep KEY=V1,V2,...` and `--seeds N`: the variants a grid makes, their names
and values, checked by the schema before anything starts."""

from __future__ import annotations

import pytest

from conftest import QUICK_CONFIG, run_cli
from sa2va_contract.config import ConfigError, load_config
from sa2va_contract.variants import apply_sweeps, command_variants, parse_sweep, with_variants


def test_values_are_read_as_yaml_and_split_at_top_level_commas():
    assert parse_sweep("prompt_rl.ppo.net_arch=[64, 64],[128,128]") == (
        ["prompt_rl", "ppo", "net_arch"], [("[64, 64]", [64, 64]), ("[128,128]", [128, 128])])
    with pytest.raises(ConfigError, match="at least two values"):
        parse_sweep("prompt_rl.seed=3")
    with pytest.raises(ConfigError, match="names an experiment and one of its settings"):
        parse_sweep("seed=1,2")


def test_a_grid_replaces_the_experiment_by_one_variant_per_combination():
    config = load_config(QUICK_CONFIG)
    swept, made = apply_sweeps(config, ["prompt_rl.ppo.learning_rate=3e-4,1e-3", "prompt_rl.ppo.n_epochs=2,4"])
    assert sorted(made) == ["prompt_rl-lr1e-3-epochs2", "prompt_rl-lr1e-3-epochs4", "prompt_rl-lr3e-4-epochs2",
                            "prompt_rl-lr3e-4-epochs4"]
    experiments = swept.experiments()
    assert "prompt_rl" not in experiments and {"postprocess_rl", "reward_net"} <= set(experiments)
    point = experiments["prompt_rl-lr3e-4-epochs4"]
    assert (point.kind, point.ppo.learning_rate, point.ppo.n_epochs) == ("prompt_rl", 3e-4, 4)
    assert point.ppo.n_steps == config.prompt_rl.ppo.n_steps  # the rest inherited
    # With seeds, each point gets its own: the issue's own example name.
    seeded = with_variants(swept, command_variants(swept, 3), "--seeds 3")
    assert seeded.experiments()["prompt_rl-lr3e-4-epochs2-seed2"].seed == 2


def test_a_sweep_of_a_config_variant_keeps_its_changes():
    config = load_config(QUICK_CONFIG, ["variants={fast: {base: prompt_rl, total_timesteps: 128}}"])
    swept, made = apply_sweeps(config, ["fast.reward_scale=1,2"])
    assert sorted(made) == ["fast-rscale1", "fast-rscale2"] and "fast" not in swept.experiments()
    assert [swept.experiments()[n].total_timesteps for n in sorted(made)] == [128, 128]
    assert "prompt_rl" in swept.experiments()


def test_a_bad_sweep_is_one_line_before_anything_starts(tmp_path):
    cases = {"dataset.limit=4,8": "dataset is not an enabled experiment",
             "prompt_rl.ppo.learning_rate=-1,1e-3": "variants.prompt_rl-lr-1.ppo.learning_rate: must be > 0",
             "prompt_rl.nothing=1,2": "variants.prompt_rl-nothing1.nothing: unknown key"}
    for sweep, message in cases.items():
        result = run_cli("launch", "--headless", "-c", str(QUICK_CONFIG), "--sweep", sweep,
                         "--set", f"run.logs_dir={tmp_path}")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: --sweep {sweep}") and message in result.stderr
    assert not list(tmp_path.iterdir())  # no run folder made


def test_check_prints_the_variants_it_would_run():
    result = run_cli("check", "-c", str(QUICK_CONFIG), "--sweep", "prompt_rl.ppo.learning_rate=3e-4,1e-3",
                     "--seeds", "2")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok    variant ")]
    assert lines == [
        "ok    variant prompt_rl-lr3e-4: ppo.learning_rate=3e-4",
        "ok    variant prompt_rl-lr1e-3: ppo.learning_rate=1e-3",
        "ok    variant postprocess_rl-seed1: seed=1",
        "ok    variant reward_net-seed1: seed=1",
        "ok    variant prompt_rl-lr3e-4-seed1: ppo.learning_rate=3e-4, seed=1",
        "ok    variant prompt_rl-lr1e-3-seed1: ppo.learning_rate=1e-3, seed=1",
    ]
