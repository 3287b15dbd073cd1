"""The real Sa2VA model through `transformers`.

Sa2VA's remote code exposes `predict_forward(image=PIL.Image, text=..., tokenizer=...)`
(Qwen2.5-VL and Qwen3-VL checkpoints: `processor=` instead) returning
`{"prediction": str, "prediction_masks": [bool array (n_frames, H, W), ...]}` at the
image's size. The list is empty when the model emits no `[SEG]` token: that is an empty
mask, counted so the report can tell how often it happened. Masks come back
thresholded, so this backend gives no probabilities. It has no CPU path (the code
hard-codes `.cuda()`) and no batched inference; only bfloat16 is safe (the older code
casts the whole model to bf16 on its first call, the newer casts its inputs).

The trainable form (the mask-decoder path) is in `sa2va_trainable.py`; the families and
what each needs installed in `sa2va_families.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from experiments.backends.base import Prediction
from experiments.backends.sa2va_families import (
    LOADER_ENV,
    Family,
    FamilyError,
    detect_family,
    installed,
    llm_layer_count,
    loader_override,
    requirement_problems,
    split_device_map,
)

PROMPT_TEMPLATE = "<image>Please segment {expression}."

log = logging.getLogger(__name__)


class BackendError(Exception):
    """The backend cannot start; the message is one line naming what to fix."""


class Sa2VASegmenter:
    """Wraps a loaded Sa2VA model (or anything keeping its exact contract)."""

    gives_probabilities = False

    def __init__(self, model: Any, tokenizer: Any, fingerprint: str, processor: Any = None,
                 family: Family | None = None, gpu: int | None = None) -> None:
        self.model = model
        #: The CUDA device (as this process numbers them) the model was placed on; None:
        #: the process's current one, or a split layout.
        self.gpu = gpu
        self.tokenizer = tokenizer
        #: Qwen families: the AutoProcessor their predict_forward asserts.
        self.processor = processor
        self.family = family
        self.fingerprint = fingerprint
        #: Calls where the model produced no [SEG] token and so no mask.
        self.empty_predictions = 0

    def predict_forward(self, image: np.ndarray, prompt: str) -> dict:
        """One call of the model's own predict_forward, without gradients (its
        generation has none; the [SEG] projection and SAM2 decoding would build graphs)."""
        import torch
        from PIL import Image

        text = PROMPT_TEMPLATE.format(expression=prompt.strip().rstrip("."))
        handles = {"processor": self.processor} if self.processor is not None else {"tokenizer": self.tokenizer}
        # predict_forward puts its token ids on `.cuda()`, the calling thread's current
        # device: a replica on another GPU makes its own current for the call.
        on_device = torch.cuda.device(self.gpu) if self.gpu is not None else contextlib.nullcontext()
        with torch.no_grad(), on_device:
            return self.model.predict_forward(image=Image.fromarray(image), text=text, **handles)

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[Prediction]:
        out = []
        for image, prompt in zip(images, prompts):
            result = self.predict_forward(image, prompt)
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

    def device(self):
        """Where SAM2 and text_hidden_fcs sit (the first GPU of a split layout)."""
        return next(self.model.grounding_encoder.parameters()).device


def checkpoint_folder(model_path: str) -> Path:
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise BackendError(f"backend.model_path: {model_path}: no such checkpoint folder (nothing is downloaded at run time)")
    if not (path / "config.json").is_file():
        raise BackendError(f"backend.model_path: {path}: not a transformers checkpoint (no config.json)")
    return path


def resolve_family(path: Path, override: str | None = None) -> Family:
    try:
        return detect_family(path, override).family
    except FamilyError as err:
        raise BackendError(str(err)) from None


def check_sa2va_environment(path: Path, family: Family, have: dict[str, str | None], cuda_available: bool) -> None:
    """Every reason the real model cannot load here, found before any weight is read."""
    if not cuda_available:
        raise BackendError("backend.kind: sa2va needs a CUDA GPU (Sa2VA has no CPU path) and none is visible")
    problems = requirement_problems(family, path, have)
    if problems:
        raise BackendError("; ".join(problems))


def checkpoint_fingerprint(path: Path) -> str:
    """Changes when the weights change, without hashing gigabytes: names, sizes and
    modification times of the checkpoint's files."""
    digest = hashlib.blake2b(digest_size=10)
    for file in sorted(path.iterdir()):
        if file.is_file():
            stat = file.stat()
            digest.update(json.dumps([file.name, stat.st_size, int(stat.st_mtime)]).encode())
    return f"sa2va-{path.name}-{digest.hexdigest()}"


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    processor: Any = None


def load_sa2va(backend, gpu: int | None = None) -> Sa2VASegmenter:
    """The checkpoint `backend` (a BackendConfig) names, loaded once, in bf16, on the
    worker's GPU, on its GPU `gpu` (numbered as the worker sees them: a replica of the
    mask stage), or split over its GPUs."""
    path = checkpoint_folder(str(backend.model_path))
    family = resolve_family(path, getattr(backend, "family", None))
    custom = loader_override()
    if custom is not None:
        log.warning("%s=%s: loading through it, not transformers", LOADER_ENV, custom)
        import torch

        gpu = gpu if torch.cuda.is_available() else None  # the seam's model stays on the CPU
        loaded = _load_custom(custom, path, family, gpu)
    else:
        loaded = _load_with_transformers(path, family, backend, gpu)
    return Sa2VASegmenter(loaded.model, loaded.tokenizer, checkpoint_fingerprint(path),
                          processor=loaded.processor, family=family, gpu=gpu)


def _load_custom(spec: str, path: Path, family: Family, gpu: int | None = None) -> Loaded:
    """The test seam: `module:function(path, family_key) -> (model, tokenizer, processor)`;
    the model is moved to GPU `gpu` where one is asked for."""
    module, _, function = spec.partition(":")
    try:
        loader = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as err:
        raise BackendError(f"{LOADER_ENV}={spec}: cannot import it ({type(err).__name__}: {err})") from None
    loaded = Loaded(*loader(path, family.key))
    if gpu is not None:
        loaded.model = loaded.model.cuda(gpu)
    return loaded


def _load_with_transformers(path: Path, family: Family, backend, gpu: int | None = None) -> Loaded:
    import torch

    check_sa2va_environment(path, family, installed(family), torch.cuda.is_available())
    import transformers

    device_map = _device_map(path, family, backend.device_map, torch.cuda.device_count())
    if backend.trust_remote_code:
        warnings.warn(f"running the model code shipped in {path} (backend.trust_remote_code: true)", stacklevel=2)
        log.warning("trust_remote_code: running the model code shipped in %s", path)
    try:
        model = transformers.AutoModel.from_pretrained(
            str(path), torch_dtype=torch.bfloat16, low_cpu_mem_usage=True,
            trust_remote_code=backend.trust_remote_code, device_map=device_map,
        ).eval()
        if device_map is None:
            model = model.cuda(gpu)
        if family.needs_processor:
            processor = transformers.AutoProcessor.from_pretrained(str(path), trust_remote_code=backend.trust_remote_code)
            return Loaded(model, getattr(processor, "tokenizer", None), processor)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=backend.trust_remote_code,
                                                               use_fast=False)
        return Loaded(model, tokenizer)
    except ModuleNotFoundError as err:
        raise BackendError(f"backend.model_path: {path}: its model code imports {err.name}, which is not installed: "
                           f"pip install -e '.[{family.extra}]'") from None
    except ImportError as err:  # a name this transformers lacks: the wrong version for the family
        raise BackendError(f"backend.model_path: {path}: its model code failed to import ({err}); {family.label} "
                           f"needs transformers{family.transformers_spec}: pip install -e '.[{family.extra}]'") from None
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise BackendError(f"backend.model_path: {path}: loading failed: {type(err).__name__}: {first}") from None


def _device_map(path: Path, family: Family, wanted: str | None, gpus: int) -> dict | None:
    """None: the whole model on the worker's GPU. "split": the upstream layout over every
    GPU the worker sees."""
    if wanted is None:
        return None
    if not family.splittable:
        raise BackendError(f"backend.device_map: split exists upstream for InternVL-based checkpoints only, "
                           f"not {family.label}: use null (one GPU)")
    if gpus < 2:
        raise BackendError(f"backend.device_map: split needs at least 2 visible GPUs and this worker sees {gpus} "
                           "(with split, the supervisor gives an experiment every GPU it sees: is only one visible?)")
    try:
        return split_device_map(llm_layer_count(path), gpus)
    except FamilyError as err:
        raise BackendError(str(err)) from None
