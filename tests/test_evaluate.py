"""The evaluation table: every row on the same test images, the label-free baselines,
seeds folded into one row with an interval, policies scored on the mask they end on,
saved as JSON and printable."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from rich.console import Console

from experiments.baselines import SupervisedChooser
from experiments.datasets import load_split
from experiments.envs import build_postprocess_table, build_prompt_table
from experiments.evaluate import evaluate_run, find_policy
from experiments.harness import WorkerContext
from experiments.metrics import row_from_masks
from sa2va_contract.config import load_config
from sa2va_contract.evaluation import EvaluationTable, breakdown
from experiments.postprocess import OpSettings
from experiments.reward.network import load_reward_net
from experiments.reward.rows import rerank
from sa2va_contract.layout import BEST_REWARD_NET, EVALUATION_FILE
from sa2va_contract.variants import command_variants, with_variants
from sa2va_tui.text import breakdown_table, evaluation_table as format_table

from conftest import QUICK_CONFIG

ROWS = ["baseline", "own_expression", "best_fixed_prompt", "supervised_chooser", "prompt_policy",
        "postprocess_policy", "finetuned", "reward_rerank", "combined", "oracle_prompt"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two seeds of each experiment, trained for real (small), on the dataset with
    per-image expressions, evaluated on test."""
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [f"backend.cache_dir={tmp_path_factory.mktemp('cache')}", "dataset.expressions=per_image"]
    for kind in ("prompt_rl", "postprocess_rl"):
        overrides += [f"{kind}.total_timesteps=128", f"{kind}.eval_every=64", f"{kind}.checkpoint_every=128"]
    overrides += ["reward_net.reward.samples=8", "reward_net.reward.epochs=2", "reward_net.finetune.steps=4"]
    config = load_config(QUICK_CONFIG, overrides)
    config = with_variants(config, command_variants(config, 2), "--seeds 2")
    for name, experiment in config.experiments().items():
        ctx = WorkerContext(name, config, experiment, run_dir / name)
        importlib.import_module(f"experiments.{experiment.kind}").run(ctx)
    progress = []
    table = evaluate_run(config, run_dir, on_progress=lambda done, total: progress.append((done, total)))
    return config, run_dir, table, progress


def test_every_row_is_computed_on_the_same_test_images(evaluated):
    config, _, table, _ = evaluated
    test_ids = [s.id for s in load_split(config.dataset, "test")]
    assert table.split == "test" and table.chosen_on == "val" and table.warning == ""
    assert [row.name for row in table.rows] == ROWS
    assert table.sample_ids == test_ids
    for row in table.rows:
        assert row.sample_ids == test_ids
        assert all(len(values) == len(test_ids) for values in row.values.values())
        for run in row.seeds:
            assert all(len(values) == len(test_ids) for values in run.values.values())
    assert table.missing == {}


def test_seeds_fold_into_one_row_with_each_seed_kept(evaluated):
    _, _, table, _ = evaluated
    for name, members in (("prompt_policy", ["prompt_rl", "prompt_rl-seed1"]),
                          ("postprocess_policy", ["postprocess_rl", "postprocess_rl-seed1"]),
                          ("finetuned", ["reward_net", "reward_net-seed1"]),
                          ("combined", ["prompt_rl + postprocess_rl", "prompt_rl-seed1 + postprocess_rl-seed1"])):
        row = table.row(name)
        assert [run.experiment for run in row.seeds] == members and [run.seed for run in row.seeds] == [0, 1]
        # The row's values are the seeds' mean, sample by sample.
        np.testing.assert_allclose(row.values["dice"], np.mean([run.values["dice"] for run in row.seeds], axis=0))
        assert row.interval is not None and row.interval.seeds == 2
        assert row.interval.low <= row.interval.mean <= row.interval.high
        assert row.interval.mean == pytest.approx(table.delta(row, "dice"))
        parts = {"prompt_policy", "postprocess_policy"} if name == "combined" else set()
        assert set(row.versus) == {"supervised_chooser", "own_expression"} | parts
    for name in ("own_expression", "best_fixed_prompt", "supervised_chooser", "oracle_prompt"):
        assert table.row(name).seeds == [] and table.row(name).interval.seeds == 1
    assert table.row("baseline").interval is None


def test_the_baselines_are_what_they_say(evaluated):
    config, _, table, _ = evaluated
    samples = load_split(config.dataset, "test")
    assert table.row("own_expression").kind == "baseline"
    # Per-image expressions name the condition: they differ from the default prompt.
    assert any(s.expression != f"the {s.target}" for s in samples)
    best = table.row("best_fixed_prompt")
    assert best.label_args["prompt"] in config.backend.prompts
    assert best.label == f"best fixed prompt, chosen on train: {best.label_args['prompt']!r}"
    assert "chosen on val" in table.row("supervised_chooser").note
    oracle = table.row("oracle_prompt")
    assert oracle.kind == "upper_bound"
    for name in ("baseline", "best_fixed_prompt", "supervised_chooser", "prompt_policy"):
        assert np.all(np.array(oracle.values["dice"]) >= np.array(table.row(name).values["dice"]) - 1e-12)


def test_changing_only_the_labels_changes_no_answer(evaluated):
    """Every policy and chooser answers the same whatever the reported split's masks."""
    config, run_dir, _, _ = evaluated
    from stable_baselines3 import PPO

    from experiments import postprocess_rl, prompt_rl
    from experiments.backends import make_cached_segmenter

    segmenter = make_cached_segmenter(config)
    backend = config.backend
    samples = load_split(config.dataset, "test")
    relabelled = [s.with_mask(np.roll(~s.mask, 7, axis=1)) for s in samples]
    tables = [build_prompt_table(group, segmenter, backend.prompts, backend.default_prompt)
              for group in (samples, relabelled)]
    assert not np.allclose(tables[0].dice, tables[1].dice)
    policy = PPO.load(find_policy(run_dir, "prompt_rl"), device="cpu")
    choices = [prompt_rl.choose_prompts(policy, table, config.prompt_rl) for table in tables]
    np.testing.assert_array_equal(*choices)
    train, val = (build_prompt_table(load_split(config.dataset, split), segmenter, backend.prompts,
                                     backend.default_prompt) for split in ("train", "val"))
    chooser = SupervisedChooser(train, val)
    np.testing.assert_array_equal(chooser.choose(tables[0]), chooser.choose(tables[1]))
    editor = PPO.load(find_policy(run_dir, "postprocess_rl"), device="cpu")
    edited = [[o.answer for o in postprocess_rl.edit_masks(editor, build_postprocess_table(
        group, segmenter, backend.prompts, choices[0]), config.postprocess_rl)] for group in (samples, relabelled)]
    for a, b in zip(*edited):
        np.testing.assert_array_equal(a, b)
    net = load_reward_net(run_dir / "reward_net" / BEST_REWARD_NET)
    reranked = [rerank(net, group, segmenter, backend.prompts, backend.prompts[backend.default_prompt],
                       OpSettings.of(config.postprocess_rl), config.reward_net.reward.input_size)
                for group in (samples, relabelled)]
    for a, b in zip(*reranked):
        np.testing.assert_array_equal(a, b)


def test_deltas_are_differences_from_the_baseline_on_the_same_images(evaluated):
    _, _, table, _ = evaluated
    base = table.row("baseline")
    assert table.delta(base, "dice") == 0.0
    for row in table.rows:
        assert table.delta(row, "dice") == pytest.approx(row.mean("dice") - base.mean("dice"))


def test_the_gain_breaks_down_by_condition_and_by_difficulty(evaluated):
    config, _, table, _ = evaluated
    samples = load_split(config.dataset, "test")
    assert table.conditions == [s.condition for s in samples]
    for by in ("condition", "difficulty"):
        groups = breakdown(table, by)
        assert sum(g.samples for g in groups) == len(samples)
        for row in table.rows[1:]:
            # The groups' gains, weighted by their sizes, make up the row's whole gain.
            whole = sum(g.deltas[row.name] * g.samples for g in groups) / len(samples)
            assert whole == pytest.approx(table.delta(row, "dice"))
    assert {g.name for g in breakdown(table, "condition")} == set(table.conditions)
    console = Console(width=400, record=True)
    console.print(breakdown_table(table, "condition"))
    assert "Δ Dice by condition" in console.export_text()


def test_the_table_is_saved_as_json_and_printable(evaluated):
    _, run_dir, table, progress = evaluated
    saved = EvaluationTable.load(run_dir / EVALUATION_FILE)
    assert saved.to_dict() == table.to_dict()
    data = saved.to_dict()["rows"][4]
    assert set(data["summary"]["dice"]) == {"mean", "std", "delta"}
    assert data["interval"]["within_noise"] == (data["interval"]["low"] <= 0 <= data["interval"]["high"])
    assert [seed["experiment"] for seed in data["seeds"]] == ["prompt_rl", "prompt_rl-seed1"]
    console = Console(width=300, record=True)
    console.print(format_table(table))
    text = console.export_text()
    for label in ("baseline", "own expression", "best fixed prompt", "supervised chooser", "prompt policy",
                  "post-processing policy", "fine-tuned", "reranking", "upper bound", "Δ Dice", "val chose",
                  "test reports"):
        assert label in text
    assert progress[-1][0] == progress[-1][1]


def test_a_later_row_must_be_on_the_same_images(evaluated):
    config, _, evaluated_table, _ = evaluated
    table = EvaluationTable.from_dict(evaluated_table.to_dict())  # the fixture's table stays as it was
    samples = load_split(config.dataset, "test")
    empty = [np.zeros_like(s.mask) for s in samples]
    ids = [s.id for s in samples]
    table.add(row_from_masks("finetuned", "fine-tuned model", "model", ids, empty, [s.mask for s in samples]))
    assert table.row("finetuned").mean("dice") < table.row("baseline").mean("dice")
    with pytest.raises(ValueError, match="other samples"):
        table.add(row_from_masks("reranked", "reranked", "model", ids[:-1], empty[:-1], [s.mask for s in samples][:-1]))


def test_fixed_expressions_give_no_own_expression_row_and_val_is_flagged(tmp_path):
    """With one expression per kind the own expression is the default prompt; and a
    table reported on val says that val chose too."""
    config = load_config(QUICK_CONFIG, [f"backend.cache_dir={tmp_path / 'cache'}", "dataset.limit=8",
                                        "reward_net.reward.samples=4"])
    table = evaluate_run(config, tmp_path / "run", "val")
    assert not table.has("own_expression") and "own_expression" in table.missing
    assert table.split == "val" and table.warning == "val_reports"
    assert {"prompt_rl", "postprocess_rl", "finetuned (reward_net)", "combined"} <= set(table.missing)
    assert [row.name for row in table.rows] == ["baseline", "best_fixed_prompt", "supervised_chooser",
                                                "oracle_prompt"]
