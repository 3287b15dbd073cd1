"""`headroom`: the oracle figures per condition and the supervised chooser, on real
masks of the embedded model."""

import re

import numpy as np
import pytest

from experiments.backends import make_cached_segmenter
from experiments.datasets import load_split
from experiments.headroom import condition_headroom, print_headroom, prompt_table
from sa2va_contract.config import load_config

from conftest import QUICK_CONFIG


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return load_config(QUICK_CONFIG, [f"backend.cache_dir={tmp_path_factory.mktemp('cache')}"])


def test_the_per_condition_gains_make_up_the_whole_oracle_gain(config):
    segmenter = make_cached_segmenter(config)
    samples = load_split(config.dataset, "test")
    table = prompt_table(segmenter, samples, config.backend.prompts, config.backend.default_prompt)
    rows = condition_headroom(table)
    assert {r["condition"] for r in rows} == {s.condition for s in samples}
    assert sum(r["images"] for r in rows) == len(samples)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    whole = table.dice.max(axis=1).mean() - table.dice[:, table.default].mean()
    assert sum(r["gain"] * r["images"] for r in rows) / len(samples) == pytest.approx(whole)
    assert all(r["oracle_dice"] >= r["default_dice"] for r in rows)


def test_the_command_prints_the_condition_table_and_the_chooser(config, capsys):
    print_headroom(config, "test", train_images=24)
    out = capsys.readouterr().out
    assert out.startswith("test split, 24 images")
    assert "per condition:" in out and re.search(r"largest condition share \d+\.\d% \(\w+\)", out)
    found = re.search(r"supervised chooser \(the evaluation's bar\)\s+(\d\.\d{4})", out)
    assert found and 0.0 <= float(found.group(1)) <= 1.0


def test_a_dataset_without_conditions_has_no_condition_table(config):
    segmenter = make_cached_segmenter(config)
    samples = [s.with_mask(s.mask) for s in load_split(config.dataset, "val")[:4]]
    plain = [type(s)(s.id, s.image, s.mask, s.expression, s.target) for s in samples]
    assert condition_headroom(prompt_table(segmenter, plain, config.backend.prompts, 0)) == []
    assert np.isfinite(prompt_table(segmenter, samples, config.backend.prompts, 0).dice).all()
