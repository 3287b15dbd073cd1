"""The evaluation table: every row on the same val images, policies scored on the
mask they end on, saved as JSON and printable."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from rich.console import Console

from experiments.datasets import load_split
from experiments.evaluate import evaluate_run
from experiments.metrics import row_from_masks
from sa2va_contract.evaluation import EvaluationTable
from sa2va_contract.layout import EVALUATION_FILE
from sa2va_tui.text import evaluation_table as format_table
from experiments.harness import WorkerContext
from sa2va_contract.config import load_config

from conftest import QUICK_CONFIG

ROWS = ["baseline", "prompt_policy", "postprocess_policy", "combined", "finetuned", "reward_rerank", "oracle_prompt"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    overrides = [f"backend.cache_dir={tmp_path_factory.mktemp('cache')}"]
    for kind in ("prompt_rl", "postprocess_rl"):
        overrides += [f"{kind}.total_timesteps=128", f"{kind}.eval_every=64", f"{kind}.checkpoint_every=128"]
    overrides += ["reward_net.reward.samples=8", "reward_net.reward.epochs=2", "reward_net.finetune.steps=4"]
    config = load_config(QUICK_CONFIG, overrides)
    for kind in ("prompt_rl", "postprocess_rl", "reward_net"):
        ctx = WorkerContext(kind, config, config.experiments()[kind], run_dir / kind)
        importlib.import_module(f"experiments.{kind}").run(ctx)
    progress = []
    table = evaluate_run(config, run_dir, "val", on_progress=lambda done, total: progress.append((done, total)))
    return config, run_dir, table, progress


def test_every_row_is_computed_on_the_same_val_images(evaluated):
    config, _, table, _ = evaluated
    val_ids = [s.id for s in load_split(config.dataset, "val")]
    assert [row.name for row in table.rows] == ROWS
    assert table.sample_ids == val_ids
    for row in table.rows:
        assert row.sample_ids == val_ids
        assert all(len(values) == len(val_ids) for values in row.values.values())
    assert table.missing == {}


def test_the_oracle_is_an_upper_bound_of_every_prompt_choice(evaluated):
    _, _, table, _ = evaluated
    oracle = table.row("oracle_prompt")
    assert oracle.kind == "upper_bound"
    for name in ("baseline", "prompt_policy"):
        assert np.all(np.array(oracle.values["dice"]) >= np.array(table.row(name).values["dice"]) - 1e-12)


def test_deltas_are_differences_from_the_baseline_on_the_same_images(evaluated):
    _, _, table, _ = evaluated
    base = table.row("baseline")
    assert table.delta(base, "dice") == 0.0
    for row in table.rows:
        assert table.delta(row, "dice") == pytest.approx(row.mean("dice") - base.mean("dice"))


def test_the_table_is_saved_as_json_and_printable(evaluated):
    _, run_dir, table, progress = evaluated
    saved = EvaluationTable.load(run_dir / EVALUATION_FILE)
    assert saved.to_dict() == table.to_dict()
    summary = saved.to_dict()["rows"][1]["summary"]["dice"]
    assert set(summary) == {"mean", "std", "delta"}
    console = Console(width=200, record=True)
    console.print(format_table(table))
    text = console.export_text()
    for label in ("baseline", "prompt policy", "post-processing policy", "fine-tuned", "reranking", "upper bound",
                  "Δ Dice"):
        assert label in text
    assert progress[-1][0] == progress[-1][1]


def test_a_later_row_must_be_on_the_same_images(evaluated):
    config, _, evaluated_table, _ = evaluated
    table = EvaluationTable.from_dict(evaluated_table.to_dict())  # the fixture's table stays as it was
    samples = load_split(config.dataset, "val")
    empty = [np.zeros_like(s.mask) for s in samples]
    ids = [s.id for s in samples]
    table.add(row_from_masks("finetuned", "fine-tuned model", "model", ids, empty, [s.mask for s in samples]))
    assert table.row("finetuned").mean("dice") < table.row("baseline").mean("dice")
    with pytest.raises(ValueError, match="other samples"):
        table.add(row_from_masks("reranked", "reranked", "model", ids[:-1], empty[:-1], [s.mask for s in samples][:-1]))
