"""Config loading: every error class is one line naming file and key, exit 2, no traceback."""

from pathlib import Path

import pytest

from sa2va_contract.config import ConfigError, load_config

from conftest import QUICK_CONFIG, ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_empty_file_means_all_defaults(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.model_dump() == load_config(None).model_dump()
    assert list(config.experiments()) == ["prompt_rl", "postprocess_rl", "reward_net"]
    assert len(config.backend.prompts) == 11


def test_shipped_configs_are_valid():
    for name in ("default.yaml", "quick.yaml", "sa2va.yaml"):
        load_config(ROOT / "configs" / name)
    assert load_config(QUICK_CONFIG).dataset.limit is not None


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("prompt_rl:\n  ppo:\n    n_steps: 0\n", ["x.yaml: prompt_rl.ppo.n_steps: must be > 0"]),
        ("prompt_rl:\n  total_timesteps: -5\n", ["prompt_rl.total_timesteps: must be > 0"]),
        ("prompt_rl:\n  colour: blue\n", ["prompt_rl.colour: unknown key"]),
        ("reward_net:\n  reward:\n    epochs: ten\n", ["reward_net.reward.epochs", "valid integer", "'ten'"]),
        ("dataset:\n  kind: folder\n", ["dataset.root: a folder dataset needs root"]),
        ("backend:\n  kind: sa2va\n", ["backend.model_path: the sa2va backend needs model_path"]),
        ("postprocess_rl:\n  operations: [dilate, smooth]\n", ["postprocess_rl.operations.1: unknown operation 'smooth'"]),
        ("variants:\n  seed2: {base: prompt_rl, seed: x}\n", ["variants.seed2.seed"]),
        ("variants:\n  a b: {base: prompt_rl}\n", ["variants.'a b': not a plain name: letters, digits"]),
        ("dataset:\n  expressions: some\n", ["dataset.expressions: must be one of"]),
        ("prompt_rl: [1, 2\n", ["x.yaml: invalid YAML at line"]),
        ("- a\n- b\n", ["x.yaml: the top level must be a mapping"]),
    ],
)
def test_config_errors_are_one_line_exit_2(tmp_path, cli, text, fragments):
    path = write(tmp_path, text)
    result = cli("check", "-c", str(path))
    assert_one_line_error(result, str(path), *fragments)


def test_missing_config_file(tmp_path, cli):
    missing = tmp_path / "nope.yaml"
    result = cli("check", "-c", str(missing))
    assert_one_line_error(result, f"{missing}: no such config file")


def test_overrides_are_parsed_as_yaml_and_validated():
    config = load_config(
        QUICK_CONFIG,
        ["prompt_rl.total_timesteps=2000", "prompt_rl.ppo.net_arch=[32, 32]", "dataset.limit=null", "run.name=x=y"],
    )
    assert config.prompt_rl.total_timesteps == 2000
    assert config.prompt_rl.ppo.net_arch == [32, 32]
    assert config.dataset.limit is None
    assert config.run.name == "x=y"  # only the first '=' separates key from value


def test_override_errors_name_the_override(tmp_path, cli):
    result = cli("check", "-c", str(QUICK_CONFIG), "--set", "prompt_rl.ppo.n_steps=-3")
    assert_one_line_error(result, "--set prompt_rl.ppo.n_steps=-3: prompt_rl.ppo.n_steps: must be > 0")
    result = cli("check", "--set", "prompt_rl.nothing=1")
    assert_one_line_error(result, "prompt_rl.nothing: unknown key")
    result = cli("check", "--set", "no-equals-sign")
    assert_one_line_error(result, "--set no-equals-sign: expected KEY.PATH=VALUE")


def test_override_values_are_never_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    code = f"__import__('pathlib').Path('{marker}').touch()"
    config = load_config(None, [f"run.name={code}"])
    assert config.run.name == code
    assert not marker.exists()


def test_batch_size_must_divide_the_rollout():
    with pytest.raises(ConfigError, match="batch_size: 48 must divide n_steps \\* n_envs = 128"):
        load_config(QUICK_CONFIG, ["prompt_rl.ppo.batch_size=48"])


def test_variants_run_more_experiments_of_one_kind():
    config = load_config(QUICK_CONFIG, ["variants={prompt_rl_seed2: {base: prompt_rl, seed: 2, ppo: {n_epochs: 3}}}"])
    experiments = config.experiments()
    assert list(experiments) == ["prompt_rl", "postprocess_rl", "reward_net", "prompt_rl_seed2"]
    variant = experiments["prompt_rl_seed2"]
    assert variant.kind == "prompt_rl" and variant.seed == 2 and variant.ppo.n_epochs == 3
    # Everything not named is inherited from the base section.
    assert variant.ppo.n_steps == config.prompt_rl.ppo.n_steps == 32


def test_check_reports_what_it_found(cli):
    result = cli("check", "-c", str(QUICK_CONFIG))
    assert result.returncode == 0, result.stderr
    assert "dataset: built-in" in result.stdout
    assert "experiments: prompt_rl, postprocess_rl, reward_net" in result.stdout
    assert "config is ready" in result.stdout


def test_check_refuses_a_reward_network_that_leaves_fine_tuning_no_image(cli):
    result = cli("check", "-c", str(QUICK_CONFIG), "--set", "dataset.limit=8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("reward_net.reward.samples: 12 leaves no train image for fine-tuning (the train split has 8"
            in result.stderr)


def test_check_lists_every_problem_of_a_broken_folder_dataset(tmp_path, cli):
    root = tmp_path / "data"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "masks").mkdir(parents=True)
    (root / "train" / "images" / "a.png").write_bytes(b"not a png")
    (root / "train" / "masks" / "a.png").write_bytes(b"")
    config = write(tmp_path, f"dataset:\n  kind: folder\n  root: {root}\n")
    result = cli("check", "-c", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{root}/val/images: missing folder" in result.stderr
    assert "a.png: unreadable or empty image file" in result.stderr
