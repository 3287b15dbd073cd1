"""The built-in procedural dataset: deterministic, split-disjoint, well-formed."""

import hashlib

import numpy as np
import pytest

from experiments.datasets.base import SPLITS, Sample
from experiments.datasets.builtin import CONDITIONS, KINDS, builtin_split, generate
from sa2va_contract.config import BUILTIN_PROMPTS, DatasetConfig


def _digest(sample: Sample) -> str:
    return hashlib.sha1(sample.image.tobytes() + np.packbits(sample.mask).tobytes()).hexdigest()


def test_same_samples_on_every_call():
    config = DatasetConfig(limit=12)
    first, second = builtin_split(config, "val"), builtin_split(config, "val")
    assert [s.id for s in first] == [s.id for s in second]
    assert [_digest(s) for s in first] == [_digest(s) for s in second]
    assert [s.expression for s in first] == [s.expression for s in second]


def test_a_sample_does_not_depend_on_limit_or_split_size():
    few = builtin_split(DatasetConfig(limit=5), "val")
    many = builtin_split(DatasetConfig(limit=30, sizes={"train": 10, "val": 300, "test": 10}), "val")
    assert len(few) == 5 and len(many) == 30
    assert [_digest(s) for s in few] == [_digest(s) for s in many[:5]]


def test_split_sizes_and_limit():
    config = DatasetConfig(sizes={"train": 7, "val": 5, "test": 3})
    assert [len(builtin_split(config, split)) for split in SPLITS] == [7, 5, 3]
    assert len(builtin_split(config.model_copy(update={"limit": 4}), "train")) == 4
    with pytest.raises(ValueError, match="unknown split"):
        builtin_split(config, "dev")


def test_splits_are_disjoint_and_seed_matters():
    config = DatasetConfig(limit=40)
    ids = {split: {s.id for s in builtin_split(config, split)} for split in SPLITS}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    digests = {split: {_digest(s) for s in builtin_split(config, split)} for split in SPLITS}
    assert all(len(d) == 40 for d in digests.values())
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    other_seed = {_digest(s) for s in builtin_split(DatasetConfig(limit=40, seed=1), "val")}
    assert not other_seed & digests["val"]


@pytest.mark.parametrize("size", [64, 128])
def test_shapes_types_ids_and_expressions(size):
    samples = builtin_split(DatasetConfig(limit=20, image_size=size), "test")
    for i, sample in enumerate(samples):
        assert sample.id == f"builtin-test-{i:05d}"
        assert sample.image.shape == (size, size, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (size, size) and sample.mask.dtype == bool
        assert sample.target in KINDS
        assert sample.target in sample.expression
        assert sample.mask.any()
        # Ground truth is a part of the image, never all of it.
        assert sample.mask.mean() < 0.6


def test_every_kind_and_condition_occurs_with_nonempty_masks():
    drawn = [generate(0, "val", i, 128, "per_image") for i in range(240)]
    assert {s.target for s, _ in drawn} == set(KINDS)
    assert {c.name for _, c in drawn} == {c.name for c in CONDITIONS}
    assert all(s.mask.sum() >= 8 for s, _ in drawn)
    for sample, condition in drawn:
        assert sample.target in condition.kinds and sample.condition == condition.name
        assert sample.expression == condition.template.replace("{target}", sample.target)


def test_by_default_every_image_of_a_kind_has_one_expression():
    """As a researcher's own data: the query names the kind, never the condition; the
    images are the same whichever expressions the dataset gives."""
    fixed = builtin_split(DatasetConfig(limit=60), "val")
    described = builtin_split(DatasetConfig(limit=60, expressions="per_image"), "val")
    assert {s.expression for s in fixed} == {f"the {kind}" for kind in KINDS}
    assert all(s.expression == f"the {s.target}" for s in fixed)
    assert len({s.expression for s in described}) > len(KINDS)
    assert [_digest(s) for s in fixed] == [_digest(s) for s in described]
    assert [s.condition for s in fixed] == [s.condition for s in described]


def test_images_have_texture_and_vary():
    samples = builtin_split(DatasetConfig(limit=30), "val")
    # Noise and clutter: no flat images; the conditions spread brightness and contrast.
    assert min(s.image.std() for s in samples) > 3
    means = [s.image.mean() for s in samples]
    assert max(means) - min(means) > 30


def test_candidate_prompts_are_the_condition_expressions():
    """The embedded model learned these expressions; the default prompt is the plain one."""
    assert BUILTIN_PROMPTS == [c.template for c in CONDITIONS]
    assert BUILTIN_PROMPTS[0] == "the {target}"


# --- the memo that a run's workers share ------------------------------------------------


def _fields(sample: Sample) -> tuple:
    return sample.id, _digest(sample), sample.expression, sample.target, sample.condition


def test_a_memoised_split_reads_back_as_generated_and_is_generated_once(tmp_path):
    from experiments.datasets import memo

    config = DatasetConfig(limit=6, expressions="per_image")
    generated = builtin_split(config, "val")
    first = builtin_split(config, "val", memo_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and "per_image-val-0-6" in files[0].name
    assert [_fields(s) for s in first] == [_fields(s) for s in generated]
    calls = []
    again = memo.memoised(files[0], 6, lambda: calls.append(1) or generated)
    assert not calls, "a split on disk is read, not generated"
    assert [_fields(s) for s in again] == [_fields(s) for s in generated]
    assert all(s.image.dtype == np.uint8 and s.mask.dtype == bool for s in again)
    # Another seed, size, count or expressions setting is another file.
    builtin_split(DatasetConfig(limit=6, expressions="fixed"), "val", memo_dir=tmp_path)
    builtin_split(DatasetConfig(limit=5, expressions="per_image"), "val", memo_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_a_damaged_memo_is_generated_again(tmp_path):
    config = DatasetConfig(limit=4)
    builtin_split(config, "test", memo_dir=tmp_path)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:300])  # cut short, as by a full disk
    samples = builtin_split(config, "test", memo_dir=tmp_path)
    assert [_fields(s) for s in samples] == [_fields(s) for s in builtin_split(config, "test")]
    assert builtin_split(config, "test", memo_dir=tmp_path)[0].id == samples[0].id  # written whole again


def test_workers_asking_at_once_generate_a_split_once(tmp_path):
    import threading
    import time

    from experiments.datasets import memo

    samples = builtin_split(DatasetConfig(limit=3), "train")
    calls, results = [], []

    def generate():
        calls.append(1)
        time.sleep(0.3)  # the others ask while this one draws
        return samples

    def ask():
        results.append(memo.memoised(tmp_path / "split.npz", 3, generate))

    askers = [threading.Thread(target=ask) for _ in range(3)]
    for thread in askers:
        thread.start()
    for thread in askers:
        thread.join()
    assert len(calls) == 1
    assert all([_fields(s) for s in got] == [_fields(s) for s in samples] for got in results)


def test_a_split_is_shared_out_in_parts_and_a_part_left_by_its_holder_is_drawn_again(tmp_path, monkeypatch):
    """While another process holds part 0 (generating it), an asker draws the parts
    nobody holds; when the holder goes without writing, the asker draws part 0 itself."""
    import fcntl
    import os
    import threading

    from experiments.datasets import memo

    monkeypatch.setattr(memo, "PART", 2)
    config = DatasetConfig(limit=5)
    paths = [memo.part_path(tmp_path, config.seed, config.image_size, config.expressions, "val", a, b)
             for a, b in ((0, 2), (2, 4), (4, 5))]
    held = os.open(paths[0].with_name(paths[0].name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(held, fcntl.LOCK_EX)
    got = []
    asker = threading.Thread(target=lambda: got.append(builtin_split(config, "val", memo_dir=tmp_path)))
    asker.start()
    try:
        for _ in range(200):
            if paths[1].is_file() and paths[2].is_file():
                break
            asker.join(0.05)
        assert paths[1].is_file() and paths[2].is_file() and not paths[0].is_file()
        assert asker.is_alive(), "it waits for the part another holds"
    finally:
        os.close(held)  # the holder goes, as a killed worker's lock does
    asker.join(30)
    assert [_fields(s) for s in got[0]] == [_fields(s) for s in builtin_split(config, "val")]
    assert paths[0].is_file()
