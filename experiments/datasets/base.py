"""What every dataset yields: one referring-segmentation sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sa2va_contract.config import SPLITS

__all__ = ["SPLITS", "Sample", "render_prompt"]


@dataclass(frozen=True, eq=False)
class Sample:
    """One image, what to segment in it, and the ground truth.

    `id` is stable across runs and unique within its dataset; the mask cache and the
    evaluation tables key on it. `target` is the noun phrase that candidate prompt
    templates put in place of `{target}`; `expression` is the dataset's own referring
    expression for the sample. `condition` is what the built-in dataset drew the image
    under ("faint", "crowded", ...), None for other datasets: it is there for the
    per-condition breakdown of an evaluation, and no policy or chooser ever reads it.
    """

    id: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) bool
    expression: str
    target: str
    condition: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def with_mask(self, mask: np.ndarray) -> "Sample":
        return Sample(self.id, self.image, mask, self.expression, self.target, self.condition)


def render_prompt(template: str, sample: Sample) -> str:
    """A candidate prompt for a sample: templates may name `{target}`; plain strings
    (the Sa2VA vessel prompts) pass through unchanged."""
    return template.replace("{target}", sample.target)
