"""The one interface every segmentation backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True, eq=False)
class Prediction:
    """A backend's answer for one (image, prompt): the binary mask, and the per-pixel
    foreground probability where the backend has one (Sa2VA does not)."""

    mask: np.ndarray  # (H, W) bool, same size as the image
    prob: np.ndarray | None = None  # (H, W) float32 in [0, 1]


@runtime_checkable
class Segmenter(Protocol):
    """Deterministic per (fingerprint, image, prompt), which is what lets the mask cache
    stand in for it."""

    #: Identifies model and weights; changes whenever outputs could change.
    fingerprint: str
    #: Whether predictions carry probabilities (thresholding is an operation then).
    gives_probabilities: bool

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[Prediction]:
        """Segment images[i] with prompts[i]; images are (H, W, 3) uint8 RGB."""
        ...


@runtime_checkable
class TrainableSegmenter(Protocol):
    """The differentiable form a backend offers for fine-tuning."""

    #: Whether `mask_logits` may run on several threads at once (fine-tuning on a CPU
    #: then computes a batch in parts side by side: `experiments.reward.parted`).
    threads_at_once: bool

    def trainable_parameters(self) -> list:  # list[torch.nn.Parameter]
        ...

    def mask_logits(self, images: Sequence[np.ndarray], prompts: Sequence[str]):
        """Per-pixel foreground logits with gradients, a torch tensor (N, H, W)."""
        ...


#: The embedded model's weights as shipped in the package.
EMBEDDED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "embedded.pt"
