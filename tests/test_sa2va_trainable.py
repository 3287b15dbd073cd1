"""Sa2VA's trainable path (experiments/backends/sa2va_trainable.py) against the stand-in
that behaves like the released code."""

import numpy as np
import pytest
import torch

from experiments.backends import sa2va_trainable
from experiments.backends.sa2va import BackendError, Sa2VASegmenter
from experiments.backends.sa2va_trainable import Sa2VAMaskDecoder, predict_forward_logits
from sa2va_standin import StandInSa2VA, StandInTokenizer

PROMPTS = ["the vessels", "the thin vessels", "the faint vessels"]


def images(n=3, size=(40, 56), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(n)]


def trainable(dtype=torch.bfloat16, **kwargs):
    model = StandInSa2VA(dtype=dtype, **kwargs).eval()
    return Sa2VAMaskDecoder(Sa2VASegmenter(model, StandInTokenizer(), fingerprint="standin"))


def test_logits_equal_predict_forwards_and_any_number_of_times():
    decoder = trainable(torch.float32)
    pics = images()
    for _ in range(3):  # each decode on a fresh state: no consumed-state AssertionError
        logits = decoder.mask_logits(pics, PROMPTS)
        assert logits.shape == (3, 40, 56) and logits.requires_grad
        for logit, image, prompt in zip(logits, pics, PROMPTS):
            reference = predict_forward_logits(decoder.segmenter, image, prompt)[0]
            assert float((logit.detach() - reference).abs().max()) <= 1e-3
        logits.mean().backward()  # every pass trains
    for prediction, image, prompt in zip(decoder.segment(pics, PROMPTS), pics, PROMPTS):
        assert np.array_equal(prediction.mask, decoder.segmenter.segment([image], [prompt])[0].mask)


def test_bf16_logits_follow_predict_forward():
    decoder = trainable(torch.bfloat16)
    for image, prompt in zip(images(), PROMPTS):
        logits = decoder.mask_logits([image], [prompt])[0].detach()
        reference = predict_forward_logits(decoder.segmenter, image, prompt)[0]
        assert float(((logits > 0) == (reference > 0)).float().mean()) >= 0.99
        assert float((logits - reference).abs().max()) <= 0.1


def test_the_image_encoder_runs_once_per_image_and_prompt():
    decoder = trainable()
    encoder = decoder.sam.image_encoder
    runs = []
    encoder.register_forward_hook(lambda *_: runs.append(1))
    model = decoder.segmenter.model
    pics = images(2)
    decoder.mask_logits(pics, PROMPTS[:2])
    decoder.mask_logits(pics, PROMPTS[:2])
    # One predict_forward per pair computes the features; the decodes reuse them.
    assert len(runs) == 2 and model.generate_calls == 2


def test_every_fine_tuning_image_is_recorded_once_across_steps(tmp_path):
    from experiments.backends import make_trainable
    from sa2va_contract.config import load_config

    config = load_config(None, ["backend.kind=sa2va", f"backend.model_path={tmp_path}", "reward_net.finetune.samples=12"])
    segmenter = Sa2VASegmenter(StandInSa2VA(dtype=torch.float32).eval(), StandInTokenizer(), fingerprint="standin")
    decoder = make_trainable(config, base=segmenter)
    pics = images(12)
    for _ in range(3):  # three epochs of two-image steps over the fine-tuning set
        for start in range(0, 12, 2):
            decoder.mask_logits(pics[start:start + 2], PROMPTS[:2])
    # More images than the memo's old 8: each predict_forward (generation included) ran once.
    assert segmenter.model.generate_calls == 12


def test_a_backward_reaches_text_hidden_fcs_and_the_mask_decoder():
    decoder = trainable()
    decoder.mask_logits(images(), PROMPTS).sigmoid().mean().backward()
    grads = {name: p.grad for name, p in decoder.masters.items()}
    assert all(g is not None for g in grads.values())
    assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith("text_hidden_fcs."))
    decoder_part = [n for n in grads if n.startswith(sa2va_trainable.DECODER + "transformer.")]
    assert decoder_part and all(grads[n].abs().sum() > 0 for n in decoder_part)
    model = decoder.segmenter.model
    assert not any(p.requires_grad for p in model.parameters())  # only the masters train


def test_parameters_that_never_get_a_gradient_are_left_out(monkeypatch):
    kept = set(trainable().trainable_names())
    monkeypatch.setattr(sa2va_trainable, "never_gets_gradient", lambda name, multimask: False)
    everything = trainable()
    left_out = set(everything.trainable_names()) - kept
    heads = ("iou_prediction_head.", "pred_obj_score_head.", "conv_s0.", "conv_s1.", "output_hypernetworks_mlps.0.")
    assert left_out and all(n.removeprefix(sa2va_trainable.DECODER).startswith(heads) for n in left_out)
    for pics in (images(seed=1), images(seed=2)):
        everything.mask_logits(pics, PROMPTS).sigmoid().mean().backward()
    for name in left_out:  # the rule is real: none, or only zeros, ever arrive
        grad = everything.masters[name].grad
        assert grad is None or not grad.any(), name


def test_masters_are_float32_and_small_adam_steps_move_them():
    decoder = trainable(torch.bfloat16)
    model = decoder.segmenter.model
    assert model.text_hidden_fcs[0].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in decoder.trainable_parameters())
    start = {k: v.clone() for k, v in decoder.state_dict().items()}
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    optimiser = torch.optim.Adam(decoder.trainable_parameters(), lr=1e-5)
    for _ in range(3):
        optimiser.zero_grad()
        decoder.mask_logits(images(2), PROMPTS[:2]).sigmoid().mean().backward()
        optimiser.step()
    moved = sum(int((v != start[k]).sum()) for k, v in decoder.state_dict().items())
    total = sum(v.numel() for v in start.values())
    assert moved > total // 2
    # The same steps taken on the bf16 weights themselves would mostly round away.
    name = "text_hidden_fcs.0.weight"
    stepped = (start[name].bfloat16().float() + (decoder.state_dict()[name] - start[name])).bfloat16()
    assert float((stepped == start[name].bfloat16()).float().mean()) > 0.9
    # The shared model is never written: its segmenter still gives the starting masks.
    assert all(torch.equal(v, model_before[k]) for k, v in model.state_dict().items())


def test_no_seg_token_gives_constant_background_logits():
    decoder = trainable(silent_on=("nothing",))
    logits = decoder.mask_logits(images(1), ["nothing to see"])
    assert torch.all(logits == Sa2VAMaskDecoder.NO_MASK_LOGIT) and not logits.requires_grad
    assert not decoder.segment(images(1), ["nothing to see"])[0].mask.any() and decoder.empty_predictions == 2


def test_fingerprint_save_and_load_round_trip(tmp_path):
    decoder = trainable()
    fingerprint = decoder.fingerprint
    optimiser = torch.optim.SGD(decoder.trainable_parameters(), lr=1.0)
    decoder.mask_logits(images(2), PROMPTS[:2]).mean().backward()
    optimiser.step()
    assert decoder.fingerprint != fingerprint and decoder.fingerprint.startswith("standin-decoder-")
    decoder.save(tmp_path / "decoder.pt")
    fresh = trainable()
    fresh.load(tmp_path / "decoder.pt")
    assert fresh.fingerprint == decoder.fingerprint
    for image, prompt in zip(images(2), PROMPTS):
        assert np.array_equal(fresh.segment([image], [prompt])[0].mask, decoder.segment([image], [prompt])[0].mask)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(BackendError, match="not a Sa2VA mask-decoder file"):
        fresh.load(tmp_path / "other.pt")
    with pytest.raises(BackendError, match="do not fit this checkpoint"):
        fresh.load_state_dict({"text_hidden_fcs.0.weight": torch.zeros(1)})
