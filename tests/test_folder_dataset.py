"""The folder dataset checks every pair first and reports every problem at once."""

import json

import cv2
import numpy as np
import pytest

from experiments.datasets import load_split
from experiments.datasets.folder import DatasetError, folder_split
from sa2va_contract.config import DatasetConfig


def put(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def make_split(root, split, stems, size=(20, 30)):
    for stem in stems:
        image = np.full((*size, 3), 90, np.uint8)
        image[5:10, 5:15] = (200, 100, 50)
        mask = np.zeros(size, np.uint8)
        mask[5:10, 5:15] = 255
        put(root / split / "images" / f"{stem}.png", image)
        put(root / split / "masks" / f"{stem}.png", mask)


def test_a_good_folder_loads_in_rgb_with_binary_masks(tmp_path):
    make_split(tmp_path, "train", ["a", "b", "c"])
    samples = load_split(DatasetConfig(kind="folder", root=tmp_path, expression="the box", target="box"), "train")
    assert [s.id for s in samples] == ["train/a", "train/b", "train/c"]
    sample = samples[0]
    assert sample.image.shape == (20, 30, 3) and sample.image.dtype == np.uint8
    assert tuple(sample.image[7, 7]) == (50, 100, 200)  # written as BGR by OpenCV, read back as RGB
    assert sample.mask.dtype == bool and sample.mask.sum() == 50
    assert sample.expression == "the box" and sample.target == "box"


def test_limit_caps_the_split(tmp_path):
    make_split(tmp_path, "val", ["a", "b", "c"])
    config = DatasetConfig(kind="folder", root=tmp_path, limit=2)
    assert len(load_split(config, "val")) == 2


def test_broken_folder_reports_every_problem_in_one_list(tmp_path):
    make_split(tmp_path, "train", ["good", "mismatch", "unreadable"])
    # a missing mask: an image whose mask is gone
    put(tmp_path / "train" / "images" / "orphan.png", np.zeros((20, 30, 3), np.uint8))
    # a mask without an image
    put(tmp_path / "train" / "masks" / "lonely.png", np.zeros((20, 30), np.uint8))
    # a size mismatch
    put(tmp_path / "train" / "masks" / "mismatch.png", np.zeros((10, 30), np.uint8))
    # an unreadable file
    (tmp_path / "train" / "images" / "unreadable.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError) as err:
        folder_split(tmp_path, "train", "x", "x")
    problems = err.value.problems
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "orphan.png: no mask" in text
    assert "lonely.png: mask without an image" in text
    assert "mismatch.png: mask is 30x10 but its image is 30x20" in text
    assert "unreadable.png: unreadable or empty image file" in text


def test_manifest_gives_per_sample_expressions(tmp_path):
    make_split(tmp_path, "train", ["a", "b"])
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_text("stem,expression,target\na,the left box,box\n")
    samples = folder_split(tmp_path, "train", "default words", "thing", manifest=csv_manifest)
    assert [(s.expression, s.target) for s in samples] == [("the left box", "box"), ("default words", "thing")]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"stem": "b", "expression": "the other box"}) + "\n")
    samples = folder_split(tmp_path, "train", "default words", "thing", manifest=jsonl)
    assert samples[1].expression == "the other box"


def test_sixteen_bit_and_grey_images_become_rgb_uint8(tmp_path):
    image = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100)
    put(tmp_path / "train" / "images" / "deep.tif", image)
    put(tmp_path / "train" / "masks" / "deep.png", np.ones((20, 30), np.uint8))
    (sample,) = folder_split(tmp_path, "train", "x", "x")
    assert sample.image.dtype == np.uint8 and sample.image.shape == (20, 30, 3)
    assert sample.image.max() == 255 and sample.image.min() == 0


def test_without_a_test_split_val_reports_with_a_warning(tmp_path):
    from experiments.datasets import has_split, reported_split

    make_split(tmp_path, "train", ["a", "b"])
    make_split(tmp_path, "val", ["c"])
    config = DatasetConfig(kind="folder", root=tmp_path)
    assert not has_split(config, "test")
    assert reported_split(config) == ("val", "no_test_split")
    make_split(tmp_path, "test", ["d"])
    assert reported_split(config) == ("test", "")
    assert reported_split(config, "val") == ("val", "val_reports")
    assert reported_split(DatasetConfig(), None) == ("test", "")
