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
