"""The real Sa2VA model through `transformers`.

Sa2VA's remote code exposes `predict_forward(image=PIL.Image, text=..., tokenizer=...)`
returning `{"prediction": str, "prediction_masks": [bool array (1, H, W), ...]}`. The
list is empty when the model emits no `[SEG]` token: that is an empty mask, counted
so the report can tell how often it happened. Masks come back thresholded, so this
backend gives no probabilities. It has no CPU path and no batched inference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from experiments.backends.base import Prediction

PROMPT_TEMPLATE = "<image>Please segment {expression}."
#: InternLM2's remote code breaks with newer transformers.
INTERNLM2_MAX_TRANSFORMERS = (4, 49)

log = logging.getLogger(__name__)


class BackendError(Exception):
    """The backend cannot start; the message is one line naming what to fix."""


class Sa2VASegmenter:
    """Wraps a loaded Sa2VA model (or anything keeping its exact contract)."""

    gives_probabilities = False

    def __init__(self, model: Any, tokenizer: Any, fingerprint: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        #: Calls where the model produced no [SEG] token and so no mask.
        self.empty_predictions = 0

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[Prediction]:
        from PIL import Image

        out = []
        for image, prompt in zip(images, prompts):
            text = PROMPT_TEMPLATE.format(expression=prompt.strip().rstrip("."))
            result = self.model.predict_forward(image=Image.fromarray(image), text=text, tokenizer=self.tokenizer)
            out.append(Prediction(mask=self._first_mask(result.get("prediction_masks") or [], image.shape[:2])))
        return out

    def _first_mask(self, masks: list, size: tuple[int, int]) -> np.ndarray:
        if len(masks) == 0:
            self.empty_predictions += 1
            return np.zeros(size, dtype=bool)
        mask = np.asarray(masks[0])
        if mask.ndim == 3:  # (frames, H, W): one image is one frame
            mask = mask[0]
        mask = mask.astype(bool)
        if mask.shape != size:
            mask = cv2.resize(mask.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
        return mask


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def is_internlm2_checkpoint(path: Path) -> bool:
    """InternLM2-based Sa2VA checkpoints (the 8B and 26B ones) name it in config.json."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        text = config.read_text(encoding="utf-8")
    except OSError:
        return False
    return "internlm2" in text.lower()


def check_sa2va_environment(model_path: str, transformers_version: str | None, cuda_available: bool) -> Path:
    """Every reason the real model cannot load here, found before any weight is read."""
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise BackendError(f"backend.model_path: {model_path}: no such checkpoint folder (nothing is downloaded at run time)")
    if not (path / "config.json").is_file():
        raise BackendError(f"backend.model_path: {path}: not a transformers checkpoint (no config.json)")
    if not cuda_available:
        raise BackendError("backend.kind: sa2va needs a CUDA GPU (Sa2VA has no CPU path) and none is visible")
    if transformers_version is None:
        raise BackendError("backend.kind: sa2va needs transformers: pip install -e '.[sa2va]'")
    if is_internlm2_checkpoint(path) and _version_tuple(transformers_version)[:2] > INTERNLM2_MAX_TRANSFORMERS:
        raise BackendError(
            f"backend.model_path: {path} is InternLM2-based and needs transformers<=4.49; "
            f"this environment has {transformers_version} (pip install 'transformers<=4.49')"
        )
    return path


def checkpoint_fingerprint(path: Path) -> str:
    """Changes when the weights change, without hashing gigabytes: names, sizes and
    modification times of the checkpoint's files."""
    digest = hashlib.blake2b(digest_size=10)
    for file in sorted(path.iterdir()):
        if file.is_file():
            stat = file.stat()
            digest.update(json.dumps([file.name, stat.st_size, int(stat.st_mtime)]).encode())
    return f"sa2va-{path.name}-{digest.hexdigest()}"


def load_sa2va(model_path: str, trust_remote_code: bool, dtype: str, device_map: str | None) -> Sa2VASegmenter:
    import torch

    try:
        import transformers
    except ImportError:
        transformers = None
    path = check_sa2va_environment(
        model_path, getattr(transformers, "__version__", None), torch.cuda.is_available()
    )
    if trust_remote_code:
        warnings.warn(f"running the model code shipped in {path} (backend.trust_remote_code: true)", stacklevel=2)
        log.warning("trust_remote_code: running the model code shipped in %s", path)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    model = transformers.AutoModel.from_pretrained(
        str(path),
        torch_dtype=torch_dtype,
        low_cpu_mem_usage=True,
        trust_remote_code=trust_remote_code,
        device_map=device_map,
    ).eval()
    if device_map is None:
        model = model.cuda()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, use_fast=False)
    return Sa2VASegmenter(model, tokenizer, checkpoint_fingerprint(path))


class Sa2VAMaskDecoder:
    """Sa2VA's trainable form: the mask-decoder path, with gradients.

    What fine-tuning reaches: `text_hidden_fcs` (the projection of the [SEG] token's
    hidden state into SAM2's prompt space) and SAM2's mask decoder. What it does not:
    the vision encoder, the language model (no LoRA), and SAM2's image encoder, which
    stay frozen. Sa2VA's own `predict_forward` runs unchanged (its preprocessing, its
    generation); spies record the [SEG] hidden states it projects and the SAM2 image
    embeddings it computes, and the decoder path is then run again with gradients on
    those. An answer without a [SEG] token has no mask to train: its logits are a
    constant "background" with no gradient.
    """

    gives_probabilities = False
    NO_MASK_LOGIT = -20.0

    def __init__(self, segmenter: Sa2VASegmenter) -> None:
        model = segmenter.model
        self.segmenter = segmenter
        self.projection = model.text_hidden_fcs
        self.grounding = model.grounding_encoder
        self.decoder = model.grounding_encoder.sam2_model.sam_mask_decoder
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in self.trainable_parameters():
            parameter.requires_grad_(True)

    @property
    def fingerprint(self) -> str:
        """The checkpoint's, extended by the decoder's weights: a fine-tuned decoder never
        shares cached masks with the one it started from."""
        digest = hashlib.blake2b(digest_size=8)
        for tensor in self.state_dict().values():
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return f"{self.segmenter.fingerprint}-decoder-{digest.hexdigest()}"

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[Prediction]:
        return self.segmenter.segment(images, prompts)

    def trainable_parameters(self) -> list:
        return [*self.projection.parameters(), *self.decoder.parameters()]

    def state_dict(self) -> dict:
        return {
            **{f"text_hidden_fcs.{k}": v for k, v in self.projection.state_dict().items()},
            **{f"sam_mask_decoder.{k}": v for k, v in self.decoder.state_dict().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.projection.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("text_hidden_fcs.")})
        self.decoder.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("sam_mask_decoder.")})

    def save(self, path: Path) -> None:
        """Only the trainable part: the rest is the unchanged checkpoint."""
        import os
        import tempfile

        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save({"format": "sa2va-mask-decoder", "base": self.segmenter.fingerprint, "state": state}, handle)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self, path: Path) -> None:
        import torch

        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != "sa2va-mask-decoder":
            raise BackendError(f"{path}: not a Sa2VA mask-decoder file")
        self.load_state_dict(blob["state"])

    def _record(self, image: np.ndarray, prompt: str) -> dict:
        """Run predict_forward once without gradients, keeping what the decoder path
        takes as input."""
        import torch
        from PIL import Image

        seen: dict = {}

        def keep_seg_states(_module, args, _output) -> None:
            # Returning anything but None from a forward hook would replace the output.
            seen.setdefault("seg", args[0].detach())

        hook = self.projection.register_forward_hook(keep_seg_states)
        original = self.grounding.get_sam2_embeddings

        def spy(*args, **kwargs):
            states = original(*args, **kwargs)
            seen.setdefault("sam", states)
            return states

        self.grounding.get_sam2_embeddings = spy
        try:
            with torch.no_grad():
                text = PROMPT_TEMPLATE.format(expression=prompt.strip().rstrip("."))
                self.segmenter.model.predict_forward(image=Image.fromarray(image), text=text,
                                                     tokenizer=self.segmenter.tokenizer)
        finally:
            hook.remove()
            del self.grounding.get_sam2_embeddings  # the instance attribute; the method shows again
        return seen

    def mask_logits(self, images: Sequence[np.ndarray], prompts: Sequence[str]):
        import torch
        import torch.nn.functional as F

        out = []
        for image, prompt in zip(images, prompts):
            h, w = image.shape[:2]
            seen = self._record(image, prompt)
            if "seg" not in seen or len(seen["seg"]) == 0:
                out.append(torch.full((h, w), self.NO_MASK_LOGIT, device=self.decoder_device()))
                continue
            projected = self.projection(seen["seg"])[:1]  # the first [SEG]: the mask predict_forward returns first
            low_res = self.grounding.language_embd_inference(seen["sam"], [projected])
            out.append(F.interpolate(low_res.float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0])
        return torch.stack(out)

    def decoder_device(self):
        return next(self.decoder.parameters()).device
