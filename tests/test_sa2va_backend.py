"""The Sa2VA backend against a stand-in that keeps `predict_forward`'s exact contract."""

import json

import numpy as np
import pytest
from PIL import Image

from experiments.backends.sa2va import (
    BackendError,
    Sa2VASegmenter,
    check_sa2va_environment,
    checkpoint_fingerprint,
    load_sa2va,
)


class StandInSa2VA:
    """Answers like Sa2VA's remote code: a dict with the generated text and a list of
    (1, H, W) boolean masks at the model's own resolution, empty without [SEG]."""

    def __init__(self, model_size=(64, 48), silent_on=("nothing",)):
        self.model_size = model_size
        self.silent_on = silent_on
        self.calls = []

    def predict_forward(self, image, text, tokenizer):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        self.calls.append((image.size, text, tokenizer))
        if any(word in text for word in self.silent_on):
            return {"prediction": "I cannot find it.", "prediction_masks": []}
        h, w = self.model_size
        mask = np.zeros((1, h, w), dtype=bool)
        mask[0, : h // 2, : w // 2] = True  # top-left quarter
        return {"prediction": "Sure, [SEG].", "prediction_masks": [mask]}


def test_prompt_template_and_resizing_to_the_image():
    model = StandInSa2VA()
    segmenter = Sa2VASegmenter(model, tokenizer="tok", fingerprint="standin")
    image = np.zeros((20, 30, 3), np.uint8)
    (prediction,) = segmenter.segment([image], ["the blood vessels"])
    assert model.calls == [((30, 20), "<image>Please segment the blood vessels.", "tok")]
    assert prediction.mask.shape == (20, 30) and prediction.mask.dtype == bool
    assert prediction.prob is None and not segmenter.gives_probabilities
    expected = np.zeros((20, 30), bool)
    expected[:10, :15] = True
    np.testing.assert_array_equal(prediction.mask, expected)


def test_no_seg_token_is_an_empty_mask_and_is_counted():
    segmenter = Sa2VASegmenter(StandInSa2VA(), tokenizer=None, fingerprint="standin")
    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    predictions = segmenter.segment(images, ["nothing here", "the vessels", "nothing again."])
    assert [int(p.mask.sum()) for p in predictions] == [0, 16, 0]
    assert segmenter.empty_predictions == 2


def test_clear_error_for_a_missing_checkpoint(tmp_path):
    with pytest.raises(BackendError, match="no such checkpoint folder"):
        check_sa2va_environment(str(tmp_path / "missing"), "4.49.0", cuda_available=True)
    with pytest.raises(BackendError, match="no config.json"):
        check_sa2va_environment(str(tmp_path), "4.49.0", cuda_available=True)


def checkpoint(tmp_path, architecture):
    (tmp_path / "config.json").write_text(json.dumps({"llm_config": {"architectures": [architecture]}}))
    return tmp_path


def test_clear_error_without_a_cuda_gpu(tmp_path):
    path = checkpoint(tmp_path, "Qwen2ForCausalLM")
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        check_sa2va_environment(str(path), "4.49.0", cuda_available=False)
    # This machine really has no GPU: loading goes no further than that check.
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        load_sa2va(str(path), trust_remote_code=False, dtype="bfloat16", device_map=None)


def test_clear_error_for_internlm2_with_new_transformers(tmp_path):
    path = checkpoint(tmp_path, "InternLM2ForCausalLM")
    with pytest.raises(BackendError, match="InternLM2-based and needs transformers<=4.49"):
        check_sa2va_environment(str(path), "4.50.1", cuda_available=True)
    assert check_sa2va_environment(str(path), "4.49.0", cuda_available=True) == path
    qwen = checkpoint(tmp_path / "q" if (tmp_path / "q").mkdir() is None else tmp_path, "Qwen2ForCausalLM")
    assert check_sa2va_environment(str(qwen), "4.57.0", cuda_available=True) == qwen


def test_fingerprint_follows_the_weights(tmp_path):
    path = checkpoint(tmp_path, "Qwen2ForCausalLM")
    (path / "model.safetensors").write_bytes(b"1234")
    first = checkpoint_fingerprint(path)
    assert first == checkpoint_fingerprint(path)
    (path / "model.safetensors").write_bytes(b"12345")
    assert checkpoint_fingerprint(path) != first
