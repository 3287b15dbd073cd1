"""The Sa2VA segmenter and its loader, against a stand-in that keeps the released code's
contract (tests/sa2va_standin.py), and the checks that come before any weight is read."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.backends.sa2va import (
    BackendError,
    Sa2VASegmenter,
    check_sa2va_environment,
    checkpoint_fingerprint,
    checkpoint_folder,
    load_sa2va,
)
from experiments.backends.sa2va_families import FAMILIES, LOADER_ENV
from sa2va_standin import LOADS, StandInProcessor, StandInSa2VA, StandInTokenizer, write_checkpoint
from sa2va_contract.config import BackendConfig


def images(n=2, size=(24, 20), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(n)]


class Recording(StandInSa2VA):
    """The stand-in, keeping what predict_forward was called with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def predict_forward(self, image=None, text=None, tokenizer=None, processor=None, **kwargs):
        self.calls.append((image.size, image.mode, text, tokenizer, processor))
        return super().predict_forward(image=image, text=text, tokenizer=tokenizer, processor=processor, **kwargs)


def test_prompt_template_and_masks_at_the_image_size():
    model, tokenizer = Recording(), StandInTokenizer()
    segmenter = Sa2VASegmenter(model, tokenizer=tokenizer, fingerprint="standin")
    (prediction,) = segmenter.segment(images(1, (20, 30)), ["the blood vessels."])
    assert model.calls == [((30, 20), "RGB", "<image>Please segment the blood vessels.", tokenizer, None)]
    assert prediction.mask.shape == (20, 30) and prediction.mask.dtype == bool
    assert 0 < prediction.mask.sum() < 600
    assert prediction.prob is None and not segmenter.gives_probabilities


def test_qwen_checkpoints_get_their_processor_and_fail_without_it():
    processor = StandInProcessor()
    model = Recording(flavour="qwen")
    with pytest.raises(AssertionError):  # what the released Qwen code does without one
        Sa2VASegmenter(model, tokenizer=processor.tokenizer, fingerprint="q").segment(images(1), ["the vessels"])
    segmenter = Sa2VASegmenter(model, tokenizer=processor.tokenizer, fingerprint="q", processor=processor,
                               family=FAMILIES["qwen3_vl"])
    (prediction,) = segmenter.segment(images(1), ["the vessels"])
    assert model.calls[-1][4] is processor and model.calls[-1][3] is None
    assert prediction.mask.shape == (24, 20)


def test_no_seg_token_is_an_empty_mask_and_is_counted():
    model = StandInSa2VA(silent_on=("nothing",))
    raw = model.predict_forward(image=Image.fromarray(images(1)[0]),
                                text="<image>Please segment nothing here.", tokenizer=StandInTokenizer())
    assert raw["prediction_masks"] == []  # the contract: an empty list, not an empty mask
    segmenter = Sa2VASegmenter(model, tokenizer=StandInTokenizer(), fingerprint="standin")
    predictions = segmenter.segment(images(3), ["nothing here", "the vessels", "nothing again."])
    assert [bool(p.mask.any()) for p in predictions] == [False, True, False]
    assert segmenter.empty_predictions == 2


def test_segmenting_builds_no_autograd_graph():
    model = StandInSa2VA()
    seen = []
    model.text_hidden_fcs.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    Sa2VASegmenter(model, tokenizer=StandInTokenizer(), fingerprint="s").segment(images(1), ["the vessels"])
    assert seen == [False] and any(p.requires_grad for p in model.parameters())


def test_clear_error_for_a_missing_checkpoint(tmp_path):
    with pytest.raises(BackendError, match="no such checkpoint folder"):
        checkpoint_folder(str(tmp_path / "missing"))
    with pytest.raises(BackendError, match="no config.json"):
        checkpoint_folder(str(tmp_path))


def backend(path, **extra):
    return BackendConfig(kind="sa2va", model_path=str(path), **extra)


def test_clear_error_without_a_cuda_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv(LOADER_ENV, raising=False)
    path = write_checkpoint(tmp_path, "internvl3")
    with pytest.raises(BackendError, match=r"needs a CUDA GPU \(Sa2VA has no CPU path\)"):
        check_sa2va_environment(path, FAMILIES["internvl3"], {"transformers": "4.57.1"}, cuda_available=False)
    # This machine really has no GPU: loading goes no further than that check.
    assert not torch.cuda.is_available()
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        load_sa2va(backend(path))


def test_every_missing_requirement_in_one_line(tmp_path):
    path = write_checkpoint(tmp_path, "internvl2_5")
    have = {"transformers": "4.57.1", "peft": None, "timm": "yes", "einops": "yes", "sentencepiece": "yes",
            "torchvision": "yes"}
    with pytest.raises(BackendError) as err:
        check_sa2va_environment(path, FAMILIES["internvl2_5"], have, cuda_available=True)
    line = str(err.value)
    assert "\n" not in line
    assert "InternVL2/2.5-based and needs transformers>=4.49.0,<4.50, not 4.57.1" in line
    assert "imports peft: pip install peft" in line


def test_loader_seam_loads_the_family_it_reads_from_config_json(tmp_path, monkeypatch):
    monkeypatch.setenv(LOADER_ENV, "sa2va_standin:load_standin")
    qwen = load_sa2va(backend(write_checkpoint(tmp_path / "q", "qwen2_5_vl")))
    assert qwen.family.key == "qwen2_5_vl" and isinstance(qwen.processor, StandInProcessor)
    assert qwen.model.flavour == "qwen" and qwen.segment(images(1), ["the vessels"])[0].mask.any()
    internvl = load_sa2va(backend(write_checkpoint(tmp_path / "i", "qwen3_vl"), family="internvl2_5"))
    assert internvl.family.key == "internvl2_5" and internvl.processor is None  # backend.family wins
    assert LOADS[-2:] == [str(tmp_path / "q"), str(tmp_path / "i")]
    monkeypatch.setenv(LOADER_ENV, "no_such_module:load")
    with pytest.raises(BackendError, match=f"{LOADER_ENV}=no_such_module:load: cannot import it"):
        load_sa2va(backend(tmp_path / "q"))


def test_split_layout_is_refused_where_it_cannot_work(tmp_path, monkeypatch):
    from experiments.backends.sa2va import _device_map

    path = write_checkpoint(tmp_path, "internvl2_5")
    with pytest.raises(BackendError, match="split exists upstream for InternVL-based checkpoints only"):
        _device_map(path, FAMILIES["qwen3_vl"], "split", 4)
    with pytest.raises(BackendError, match="split needs at least 2 visible GPUs and this worker sees 1"):
        _device_map(path, FAMILIES["internvl2_5"], "split", 1)
    layout = _device_map(path, FAMILIES["internvl2_5"], "split", 2)
    assert layout["grounding_encoder"] == layout["text_hidden_fcs"] == 0
    assert _device_map(path, FAMILIES["internvl2_5"], None, 2) is None


def test_fingerprint_follows_the_weights(tmp_path):
    path = write_checkpoint(tmp_path)
    first = checkpoint_fingerprint(path)
    assert first == checkpoint_fingerprint(path)
    (path / "model.safetensors").write_bytes(b"other weights")
    assert checkpoint_fingerprint(path) != first
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Sa2VAChatModel"]


def test_with_a_gpu_the_loader_names_what_the_family_lacks(tmp_path, monkeypatch):
    """As on a GPU machine where the [sa2va] extra was not installed (this one has no
    transformers): one line, naming the family's requirements, before any weight is read."""
    monkeypatch.delenv(LOADER_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    path = write_checkpoint(tmp_path, "qwen3_vl")
    with pytest.raises(BackendError) as err:
        load_sa2va(backend(path))
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"backend.model_path: {path} is Qwen3-VL-based and needs transformers")
    assert "imports qwen_vl_utils: pip install qwen-vl-utils" in line
