"""The stand-in behaves like Sa2VA's released code where the backend relies on it. Each
behaviour here was first seen in the real code: by reading `sam2.py` and
`modeling_sa2va_*.py`, and by running the real `sam2.py` on a CPU with random weights
(see the README's Sa2VA section for which)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sa2va_standin import IMAGE_SIZE, StandInSa2VA, StandInTokenizer


def grounding_pixels(model, seed=0):
    rng = np.random.default_rng(seed)
    square = torch.from_numpy(rng.integers(0, 255, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)).to(model.torch_dtype)
    return torch.stack([model.grounding_encoder.preprocess_image(square)]).to(model.torch_dtype)


def embedding(model, seed=0):
    torch.manual_seed(seed)
    return torch.randn(1, model.grounding_encoder.hidden_dim, dtype=model.torch_dtype)


def test_the_state_is_mutable_and_consumed_by_inference():
    model = StandInSa2VA()
    sam = model.grounding_encoder
    state = sam.get_sam2_embeddings(grounding_pixels(model))
    assert isinstance(state, dict) and state["cached_features"] == {} and not state["tracking_has_started"]
    logits = sam.language_embd_inference(state, [embedding(model)])
    assert logits.shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)  # low-res upsampled to SAM2's input size
    assert state["tracking_has_started"] and list(state["frames_already_tracked"]) == [0]
    assert 0 in state["cached_features"]  # computed lazily by the first decode, kept in the state
    with pytest.raises(AssertionError) as err:  # track_step's guard, as in the real code
        sam.language_embd_inference(state, [embedding(model)])
    assert err.traceback[-1].name == "track_step"
    with pytest.raises(AssertionError):
        sam.inject_language_embd(state, [embedding(model)])


def test_inference_carries_no_gradient_and_injection_does():
    model = StandInSa2VA(dtype=torch.float32)
    sam = model.grounding_encoder
    pixels, emb = grounding_pixels(model), embedding(model).requires_grad_(True)
    assert not sam.language_embd_inference(sam.get_sam2_embeddings(pixels), [emb]).requires_grad
    fresh = sam.get_sam2_embeddings(pixels)
    low_res = sam.inject_language_embd(fresh, [emb])
    assert low_res.shape == (1, 1, IMAGE_SIZE // 4, IMAGE_SIZE // 4) and low_res.requires_grad
    low_res.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    with pytest.raises(AssertionError):  # an injected state is used up too
        sam.inject_language_embd(fresh, [emb])


def test_injection_upsampled_twice_is_what_inference_returns():
    model = StandInSa2VA(dtype=torch.float32)
    sam = model.grounding_encoder
    pixels, emb = grounding_pixels(model), embedding(model)
    with torch.no_grad():
        inferred = sam.language_embd_inference(sam.get_sam2_embeddings(pixels), [emb])
        injected = sam.inject_language_embd(sam.get_sam2_embeddings(pixels), [emb])
    upsampled = F.interpolate(injected, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    assert torch.equal(upsampled, inferred)


def test_only_the_mask_path_can_carry_gradients():
    """IoU and object-score heads, and the image-feature convs of frozen features, get
    none; with multimask output mask token 0's hypernetwork gets zeros."""
    model = StandInSa2VA(dtype=torch.float32)
    sam, decoder = model.grounding_encoder, model.grounding_encoder.sam2_model.sam_mask_decoder
    state = sam.get_sam2_embeddings(grounding_pixels(model))
    with torch.no_grad():  # the frozen image features, as predict_forward leaves them
        sam.sam2_model._get_image_feature(state, 0)
    fresh = sam.get_sam2_embeddings(state["images"])
    fresh["cached_features"] = dict(state["cached_features"])
    sam.inject_language_embd(fresh, [embedding(model)]).sigmoid().mean().backward()
    grads = {name: p.grad for name, p in decoder.named_parameters()}
    for head in ("iou_prediction_head.", "pred_obj_score_head.", "conv_s0.", "conv_s1."):
        assert all(g is None for n, g in grads.items() if n.startswith(head)), head
    assert all(g is not None and not g.any() for n, g in grads.items() if n.startswith("output_hypernetworks_mlps.0."))
    assert grads["mask_tokens.weight"].abs().sum() > 0 and grads["iou_token.weight"].abs().sum() > 0
    assert grads["output_upscaling.0.weight"].abs().sum() > 0


def test_flavours_of_predict_forward():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    text = "<image>Please segment the vessels."
    with pytest.raises(AssertionError):
        StandInSa2VA(flavour="qwen").predict_forward(image=image, text=text, tokenizer=StandInTokenizer())
    with pytest.raises(AssertionError):
        StandInSa2VA(flavour="internvl").predict_forward(image=image, text=text)  # the first call needs a tokenizer
    old = StandInSa2VA(flavour="internvl_old")
    old.text_hidden_fcs.float()
    masks = old.predict_forward(image=image, text=text, tokenizer=StandInTokenizer())["prediction_masks"]
    assert old.text_hidden_fcs[0].weight.dtype == torch.bfloat16  # the older code casts the model on its first call
    assert len(masks) == 1 and masks[0].shape == (1, 30, 50) and masks[0].dtype == bool
    new = StandInSa2VA(flavour="internvl")
    new.grounding_encoder.float()  # weights other than bf16 meet the bf16 inputs the newer code makes
    with pytest.raises(RuntimeError):
        new.predict_forward(image=image, text=text, tokenizer=StandInTokenizer())
