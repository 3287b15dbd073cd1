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


# --- the mask-decoder path that reward-guided fine-tuning trains -------------------------

import torch  # noqa: E402

from experiments.backends.sa2va import Sa2VAMaskDecoder  # noqa: E402
from sa2va_standin import StandInSa2VAModel  # noqa: E402


def decoder_of(model=None):
    return Sa2VAMaskDecoder(Sa2VASegmenter(model or StandInSa2VAModel(), tokenizer=None, fingerprint="standin"))


def images(n=2, size=(24, 20)):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(n)]


def test_decoder_logits_agree_with_predict_forward_and_carry_gradients():
    trainable = decoder_of()
    pics, prompts = images(), ["the vessels", "the thin vessels"]
    logits = trainable.mask_logits(pics, prompts)
    assert logits.shape == (2, 24, 20) and logits.requires_grad
    for logit, prediction in zip(logits, trainable.segment(pics, prompts)):
        np.testing.assert_array_equal((torch.sigmoid(logit) > 0.5).numpy(), prediction.mask)
    logits.sum().backward()
    assert all(p.grad is not None for p in trainable.trainable_parameters())


def test_only_the_projection_and_mask_decoder_train():
    model = StandInSa2VAModel()
    trainable = decoder_of(model)
    trainable_ids = {id(p) for p in trainable.trainable_parameters()}
    expected = {id(p) for p in [*model.text_hidden_fcs.parameters(),
                                *model.grounding_encoder.sam2_model.sam_mask_decoder.parameters()]}
    assert trainable_ids == expected
    frozen = [p for p in model.parameters() if id(p) not in trainable_ids]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_no_seg_token_gives_constant_background_logits():
    logits = decoder_of().mask_logits(images(1), ["nothing to see"])
    assert torch.all(logits == Sa2VAMaskDecoder.NO_MASK_LOGIT) and not logits.requires_grad


def test_a_training_step_changes_the_decoder_and_save_load_round_trips(tmp_path):
    trainable = decoder_of()
    before = {k: v.clone() for k, v in trainable.state_dict().items()}
    fingerprint = trainable.fingerprint
    optimiser = torch.optim.SGD(trainable.trainable_parameters(), lr=1.0)
    trainable.mask_logits(images(), ["the vessels"] * 2).mean().backward()
    optimiser.step()
    assert any(not torch.equal(before[k], v) for k, v in trainable.state_dict().items())
    assert trainable.fingerprint != fingerprint
    trainable.save(tmp_path / "decoder.pt")
    fresh = decoder_of()
    fresh.load(tmp_path / "decoder.pt")
    for key, value in trainable.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert fresh.fingerprint == trainable.fingerprint
