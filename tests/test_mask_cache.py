"""The mask cache in front of the real embedded model."""

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from experiments.backends.cache import ENTRY_SUFFIX, CachedSegmenter
from experiments.backends.embedded import load_embedded
from experiments.datasets import load_split
from sa2va_contract.config import BUILTIN_PROMPTS, DatasetConfig

TEMPLATES = BUILTIN_PROMPTS[:3]


@pytest.fixture(scope="module")
def samples():
    return load_split(DatasetConfig(limit=6), "val")


@pytest.fixture(scope="module")
def model():
    return load_embedded()


def test_second_pass_makes_zero_model_calls(tmp_path, samples, model):
    progress = []
    first = CachedSegmenter(model, tmp_path)
    first.warm(samples, TEMPLATES, batch_size=4, on_progress=lambda done, total: progress.append((done, total)))
    assert first.model_calls == len(samples) * len(TEMPLATES)
    assert progress[0] == (0, 18) and progress[-1] == (18, 18)
    # In memory: asking again costs nothing.
    again = first.predict(samples[0], TEMPLATES[0])
    assert first.model_calls == 18
    # A new process (a second run, another experiment) finds it on disk.
    second = CachedSegmenter(model, tmp_path)
    second.warm(samples, TEMPLATES)
    assert second.model_calls == 0 and second.disk_hits == 18
    from_disk = second.predict(samples[0], TEMPLATES[0])
    np.testing.assert_array_equal(from_disk.mask, again.mask)
    np.testing.assert_array_equal(from_disk.prob, again.prob)


def test_hit_and_miss_return_the_same_answer(tmp_path, samples, model):
    cached = CachedSegmenter(model, None)
    miss = cached.predict(samples[1], TEMPLATES[1])
    hit = cached.predict(samples[1], TEMPLATES[1])
    assert cached.model_calls == 1
    np.testing.assert_array_equal(miss.mask, hit.mask)
    np.testing.assert_array_equal(miss.prob, hit.prob)
    raw = model.segment([samples[1].image], [TEMPLATES[1].replace("{target}", samples[1].target)])[0]
    np.testing.assert_array_equal(miss.mask, raw.mask)
    assert np.abs(miss.prob - raw.prob).max() <= 0.5 / 255 + 1e-6  # 8 bits per probability on disk


def test_the_key_is_the_image_not_only_its_id(tmp_path, samples, model):
    cached = CachedSegmenter(model, tmp_path)
    original = samples[2]
    cached.predict(original, TEMPLATES[0])
    altered = type(original)(original.id, 255 - original.image, original.mask, original.expression, original.target)
    cached.predict(altered, TEMPLATES[0])
    assert cached.model_calls == 2


def _fill(cache_dir: str, limit: int) -> int:
    from experiments.backends.cache import CachedSegmenter
    from experiments.backends.embedded import load_embedded
    from experiments.datasets import load_split
    from sa2va_contract.config import BUILTIN_PROMPTS, DatasetConfig

    cached = CachedSegmenter(load_embedded(), Path(cache_dir))
    cached.warm(load_split(DatasetConfig(limit=limit), "val"), BUILTIN_PROMPTS[:3], batch_size=2)
    return cached.model_calls


def test_two_processes_filling_at_once_leave_no_torn_file(tmp_path, samples, model):
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        calls = pool.starmap(_fill, [(str(tmp_path), 6), (str(tmp_path), 6)])
    assert sum(calls) >= 18
    files = sorted(tmp_path.rglob(f"*{ENTRY_SUFFIX}"))
    assert len(files) == 18
    assert not list(tmp_path.rglob(".*.tmp"))
    reader = CachedSegmenter(model, tmp_path)
    reader.warm(samples, TEMPLATES)
    assert reader.model_calls == 0 and reader.disk_hits == 18


def test_a_freed_image_s_address_never_serves_its_mask_to_a_new_image(samples, model):
    """Images freed and new ones made in their place (Python reuses the addresses):
    each new image gets its own mask, never the one memoised for the freed image."""
    cached = CachedSegmenter(model, None)
    prompt = "the vessels"
    shape = samples[0].image.shape
    freed_ids, reused = set(), 0
    for i in range(20):
        # The first allocation after the last image was freed: it takes that address.
        image = np.empty(shape, np.uint8)
        np.copyto(image, samples[i % len(samples)].image)
        image //= 1 + i // len(samples)
        reused += id(image) in freed_ids
        got = cached.segment([image], [prompt])[0]
        expected = model.segment([image], [prompt])[0]
        np.testing.assert_array_equal(got.mask, expected.mask)
        freed_ids.add(id(image))
        del got, expected
        del image  # last, so that its address is the next one handed out
    assert reused > 0, "no address was reused: the test did not exercise the memo"
    assert cached.model_calls == 20
    assert len(cached._image_keys) == 0  # entries go with their images
