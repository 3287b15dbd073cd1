"""The reward network: predicted Dice of a mask from the image, the mask, the query and
the consensus of the candidate masks, with the helpers every user of it feeds it
through (training, fine-tuning and reranking resize the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sa2va_contract.files import atomic_writer


class RewardNet(nn.Module):
    """Image (3 channels), mask (1 channel), the query ("the vessels") and the consensus
    of the starting model's candidate masks in, predicted Dice in [0, 1] out.

    The query matters because an image holds several kinds of structure and a perfect
    mask of the wrong kind is worth nothing. The consensus (the mean of the masks that
    the K candidate prompts give, all computed at inference) is the classic label-free
    quality signal: where prompts agree, the model is usually right."""

    def __init__(self, width: int = 16, text_buckets: int = 1024) -> None:
        super().__init__()
        from experiments.backends.embedded import HashedTextEncoder

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
            )

        self.width, self.text_buckets = width, text_buckets
        # The mask also enters as image*mask: what lies inside it is what a quality
        # judgement needs, and early is cheaper to learn.
        self.blocks = nn.ModuleList([block(9, width), block(width, 2 * width), block(2 * width, 4 * width),
                                     block(4 * width, 4 * width)])
        self.text = HashedTextEncoder(text_buckets, 32, 64)
        # Per-channel scale and shift of blocks 2 and 4 from the query (FiLM).
        self.film = nn.ModuleList([nn.Linear(64, 2 * 2 * width), nn.Linear(64, 2 * 4 * width)])
        self.head = nn.Sequential(nn.Linear(8 * width + 64 + 3, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, images: torch.Tensor, masks: torch.Tensor, consensus: torch.Tensor,
                queries: Sequence[str]) -> torch.Tensor:
        text = self.text(list(queries))
        x = torch.cat([images, masks, images * masks, consensus, masks * consensus], dim=1)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in (1, 3):
                scale, shift = self.film[i // 2](text).chunk(2, dim=1)
                x = x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        area = masks.mean(dim=(1, 2, 3)).unsqueeze(1)
        overlap = masks.mul(consensus).sum(dim=(1, 2, 3))
        agreement = (2 * overlap / (masks.sum(dim=(1, 2, 3)) + consensus.sum(dim=(1, 2, 3)) + 1e-6)).unsqueeze(1)
        features = torch.cat([pooled, text, area, torch.sqrt(area + 1e-6), agreement], dim=1)
        return torch.sigmoid(self.head(features)).squeeze(1)


def resize_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Training, fine-tuning and reranking all feed the network through here, so a soft
    mask with gradients and a binary training mask are resized the same way."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def consensus_map(candidate_masks: Sequence[np.ndarray]) -> torch.Tensor:
    """(1, H, W): the share of candidate prompts whose mask covers each pixel."""
    return torch.from_numpy(np.mean(np.stack(candidate_masks), axis=0, dtype=np.float32)).unsqueeze(0)


def images_to_tensor(images: Sequence[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).to(device).permute(0, 3, 1, 2).float() / 255.0


def save_atomic(obj: Any, path: Path) -> None:
    """A crash mid-write leaves the previous file whole."""
    with atomic_writer(path) as handle:
        torch.save(obj, handle)


def load_reward_net(path: Path, device: str = "cpu") -> RewardNet:
    state = torch.load(path, map_location=device, weights_only=True)
    net = RewardNet(width=int(state["width"]), text_buckets=int(state["text_buckets"]))
    net.load_state_dict(state["model"])
    return net.to(device).eval()


def reward_net_state(net: RewardNet) -> dict[str, Any]:
    return {"width": net.width, "text_buckets": net.text_buckets, "model": net.state_dict()}
