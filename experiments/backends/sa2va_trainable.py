"""Sa2VA's trainable form: the path from the [SEG] token's hidden state to mask logits,
with gradients, on the structure of the released code.

`predict_forward` cannot be trained through: its SAM2 decoding (`language_embd_inference`)
runs `propagate_in_video` under `@torch.inference_mode()`, and it consumes its state
(tracking starts, frame 0 is stored), so decoding that state again fails in
`track_step`. Upstream training goes through `inject_language_embd` instead. So per
decode:

1. `predict_forward` runs once, unchanged, without gradients; spies keep the [SEG]
   hidden state it hands `text_hidden_fcs`, the grounding pixels it hands
   `get_sam2_embeddings`, and the SAM2 image features that state computed (frozen).
2. A fresh state from those pixels, given the frozen features, so that the image
   encoder does not run again; `text_hidden_fcs` on the [SEG] state;
   `inject_language_embd` gives the mask decoder's low-res logits (256 x 256) with
   gradients; they are upsampled as predict_forward's are: to SAM2's input size
   (propagate_in_video's output, 1024 x 1024), then to the image's size.

The trained tensors are float32 master copies of `text_hidden_fcs` and the mask decoder
(bf16 has about 8 significant bits: Adam steps of 1e-5 would mostly round away), passed
to the model with `torch.func.functional_call` for the trainable forward only, which runs
under bf16 autocast. The loaded model itself is never written to, so the segmenter that
shares it (and the mask cache keyed by its fingerprint) keeps giving the starting model's
masks. Parameters that can never receive a gradient on this path are left out (see
`never_gets_gradient`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.backends.base import Prediction
from experiments.backends.sa2va import BackendError, Sa2VASegmenter
from sa2va_contract.files import atomic_writer

FORMAT = "sa2va-mask-decoder-v2"
DECODER = "grounding_encoder.sam2_model.sam_mask_decoder."
PROJECTION = "text_hidden_fcs."


def never_gets_gradient(decoder_name: str, multimask: bool) -> bool:
    """Mask-decoder parameters that no loss on the mask logits can reach here:
    the IoU head only picks the best of the multimask outputs (argmax); the object-score
    head only feeds a hard `> 0` and the object pointer; conv_s0/conv_s1 project the
    image features, which are frozen and reused; with multimask output the first mask
    token's hypernetwork makes the single-mask output, which is sliced away."""
    heads = ("iou_prediction_head.", "pred_obj_score_head.", "conv_s0.", "conv_s1.")
    return decoder_name.startswith(heads) or (multimask and decoder_name.startswith("output_hypernetworks_mlps.0."))


@dataclass
class FrozenInputs:
    """What one predict_forward call gives the trainable path; none of it trains."""

    seg_states: torch.Tensor  # (n_seg, llm_hidden): the inputs of text_hidden_fcs
    g_pixel_values: torch.Tensor | None
    cached_features: dict


class _DecodePath(nn.Module):
    """The two trained modules under the names they have in the checkpoint, so that
    functional_call's keys are the checkpoint's own."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.text_hidden_fcs = model.text_hidden_fcs
        self.grounding_encoder = model.grounding_encoder

    def forward(self, state: dict, seg_state: torch.Tensor) -> torch.Tensor:
        embedding = self.text_hidden_fcs(seg_state)
        return self.grounding_encoder.inject_language_embd(state, [embedding])


class Sa2VAMaskDecoder:
    """The trainable Sa2VA (a Segmenter too), sharing the segmenter's loaded model."""

    gives_probabilities = False
    #: Its memo of frozen inputs is not guarded by a lock (and on a GPU there is no
    #: second core to gain).
    threads_at_once = False
    NO_MASK_LOGIT = -20.0

    def __init__(self, segmenter: Sa2VASegmenter, memo_size: int = 8) -> None:
        model = segmenter.model
        self.segmenter = segmenter
        self.grounding = model.grounding_encoder
        self.sam = self.grounding.sam2_model
        self._path = _DecodePath(model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        multimask = bool(self.sam._use_multimask(is_init_cond_frame=True, point_inputs=None))
        named = [(PROJECTION + n, p) for n, p in model.text_hidden_fcs.named_parameters()]
        named += [(DECODER + n, p) for n, p in self.sam.sam_mask_decoder.named_parameters()
                  if not never_gets_gradient(n, multimask)]
        self.masters: dict[str, nn.Parameter] = {
            name: nn.Parameter(p.detach().to(torch.float32).clone()) for name, p in named
        }
        self._model_dtype = next(self.sam.sam_mask_decoder.parameters()).dtype
        self._memo: OrderedDict[tuple[str, str], FrozenInputs] = OrderedDict()
        self._memo_size = memo_size
        #: Images decoded with no [SEG] token: no mask to train.
        self.empty_predictions = 0

    # --- Segmenter ------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """The checkpoint's, extended by the trained weights: a fine-tuned decoder never
        shares cached masks with the one it started from."""
        digest = hashlib.blake2b(digest_size=8)
        for name, tensor in self.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        return f"{self.segmenter.fingerprint}-decoder-{digest.hexdigest()}"

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[Prediction]:
        """Masks from the trained weights, thresholded as predict_forward thresholds."""
        with torch.no_grad():
            logits = self.mask_logits(images, prompts)
        return [Prediction(mask=(torch.sigmoid(l) > 0.5).cpu().numpy()) for l in logits]

    # --- TrainableSegmenter ---------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.masters.values())

    def trainable_names(self) -> list[str]:
        return list(self.masters)

    def mask_logits(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> torch.Tensor:
        """(N, H, W) foreground logits of the first [SEG] mask; a constant background
        without gradient where the model emits no [SEG]."""
        out = []
        for image, prompt in zip(images, prompts):
            frozen = self.frozen_inputs(image, prompt)
            if len(frozen.seg_states) == 0:
                self.empty_predictions += 1
                out.append(torch.full(image.shape[:2], self.NO_MASK_LOGIT, device=self.device()))
            else:
                out.append(self.decode(frozen, image.shape[:2]))
        return torch.stack(out)

    def decode(self, frozen: FrozenInputs, size: tuple[int, int]) -> torch.Tensor:
        """One decode on a fresh SAM2 state, with gradients to the master weights."""
        state = self.grounding.get_sam2_embeddings(frozen.g_pixel_values)
        state["cached_features"] = dict(frozen.cached_features)
        with self._autocast():
            low_res = torch.func.functional_call(self._path, dict(self.masters), (state, frozen.seg_states[:1]))
        square = (self.sam.image_size, self.sam.image_size)
        logits = F.interpolate(low_res[:1, :1].float(), size=square, mode="bilinear", align_corners=False)
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)[0, 0]

    def _autocast(self):
        if self._model_dtype != torch.bfloat16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device().type, dtype=torch.bfloat16)

    def device(self) -> torch.device:
        return next(iter(self.masters.values())).device

    # --- the frozen inputs ----------------------------------------------------------

    def frozen_inputs(self, image: np.ndarray, prompt: str) -> FrozenInputs:
        """The inputs of the decode for (image, prompt), from a small memo or from one
        predict_forward call: frozen, so the same on every call."""
        key = (hashlib.blake2b(np.ascontiguousarray(image).tobytes() + repr(image.shape).encode(),
                               digest_size=12).hexdigest(), prompt)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        frozen = self._record(image, prompt)
        self._memo[key] = frozen
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return frozen

    def _record(self, image: np.ndarray, prompt: str) -> FrozenInputs:
        seen: dict[str, Any] = {}

        def keep_seg_states(_module, args, _output) -> None:
            seen.setdefault("seg", args[0].detach())  # None returned: the output stays

        def spy(images, *args, **kwargs):
            state = original(images, *args, **kwargs)
            seen.setdefault("state", state)
            seen.setdefault("pixels", images)
            return state

        original = self.grounding.get_sam2_embeddings
        hook = self._path.text_hidden_fcs.register_forward_hook(keep_seg_states)
        self.grounding.get_sam2_embeddings = spy
        try:
            self.segmenter.predict_forward(image, prompt)
        finally:
            hook.remove()
            del self.grounding.get_sam2_embeddings  # the instance attribute; the method shows again
        seg = seen.get("seg")
        if seg is None or len(seg) == 0 or "state" not in seen:
            return FrozenInputs(torch.zeros(0), None, {})
        return FrozenInputs(seg, seen["pixels"], dict(seen["state"]["cached_features"]))

    # --- weights ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The float32 masters under their checkpoint names."""
        return {name: p.detach() for name, p in self.masters.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.masters):
            missing, extra = sorted(set(self.masters) - set(state)), sorted(set(state) - set(self.masters))
            raise BackendError(f"mask-decoder weights do not fit this checkpoint (missing {missing[:3]}, unknown {extra[:3]})")
        with torch.no_grad():
            for name, value in state.items():
                self.masters[name].copy_(value.to(torch.float32))

    def save(self, path: Path) -> None:
        """Only the trained part: the rest is the unchanged checkpoint."""
        state = {k: v.cpu() for k, v in self.state_dict().items()}
        with atomic_writer(Path(path)) as handle:
            torch.save({"format": FORMAT, "base": self.segmenter.fingerprint, "state": state}, handle)

    def load(self, path: Path) -> None:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise BackendError(f"{path}: not a Sa2VA mask-decoder file of this version ({FORMAT})")
        self.load_state_dict(blob["state"])


def predict_forward_logits(segmenter: Sa2VASegmenter, image: np.ndarray, prompt: str) -> torch.Tensor | None:
    """predict_forward's own logits for its first mask (N=1, H, W), before the
    threshold: what `language_embd_inference` returned, resized to the image as
    predict_forward resizes it. None without [SEG]."""
    grounding = segmenter.model.grounding_encoder
    original = grounding.language_embd_inference
    outputs: list[torch.Tensor] = []

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        outputs.append(result.detach().clone())
        return result

    grounding.language_embd_inference = spy
    try:
        segmenter.predict_forward(image, prompt)
    finally:
        del grounding.language_embd_inference
    if not outputs:
        return None
    h, w = image.shape[:2]
    return F.interpolate(outputs[0].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
