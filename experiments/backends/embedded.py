"""The embedded default backend: a small text-conditioned segmentation network.

A U-Net whose every stage is modulated (FiLM: a per-channel scale and shift) by an
embedding of the prompt. The prompt encoder hashes word unigrams, word bigrams and
character trigrams into a fixed table, so it needs no vocabulary file and gives
every string, seen in training or not, an embedding. Trained by
`experiments.backends.train_embedded` on the built-in dataset; the weights ship with
the package (`weights/embedded.pt`).
"""

from __future__ import annotations

import hashlib
import io
import re
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.backends.base import EMBEDDED_WEIGHTS, Prediction
from sa2va_contract.files import atomic_write_bytes

#: Part of the fingerprint: bump it when a code change alters what the same weights output.
CODE_VERSION = "embedded-1"
#: The U-Net downsamples twice: inputs are padded to a multiple of this.
_STRIDE = 4
#: Torch threads per process on a CPU: the fewest CPU milliseconds per image in the
#: grid of `python -m benchmarks backend` (a second thread in one process costs more
#: CPU time per image than it saves on this small network), so one-thread workers, one
#: per core, segment the most images per second.
CPU_THREADS = 1


@lru_cache(maxsize=4096)
def prompt_features(prompt: str, buckets: int) -> tuple[int, ...]:
    """Hashed ids of a prompt's word unigrams, word bigrams and character trigrams.
    crc32, not Python's salted hash(), so that ids are the same in every process."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    grams = [f"w:{w}" for w in words]
    grams += [f"b:{a}_{b}" for a, b in zip(words, words[1:])]
    for w in words:
        padded = f"<{w}>"
        grams += [f"c:{padded[i:i + 3]}" for i in range(len(padded) - 2)]
    if not grams:
        grams = ["w:"]  # an empty prompt still gets an embedding
    return tuple(zlib.crc32(g.encode()) % buckets for g in grams)


class HashedTextEncoder(nn.Module):
    """Prompt -> vector: mean of hashed n-gram embeddings, then a small MLP."""

    def __init__(self, buckets: int, embed_dim: int, out_dim: int) -> None:
        super().__init__()
        self.buckets = buckets
        self.table = nn.EmbeddingBag(buckets, embed_dim, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(embed_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.GELU())

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = [prompt_features(p, self.buckets) for p in prompts]
        flat = torch.tensor([i for one in ids for i in one], dtype=torch.long, device=self.table.weight.device)
        offsets = torch.tensor(np.cumsum([0] + [len(one) for one in ids[:-1]]), dtype=torch.long, device=flat.device)
        return self.mlp(self.table(flat, offsets))


class FiLMBlock(nn.Module):
    """Convolutions (3x3, batch norm, ReLU) whose last normalised output is scaled and
    shifted per channel by the prompt: the prompt decides what the features mean."""

    def __init__(self, in_ch: int, out_ch: int, convs: int, text_dim: int) -> None:
        super().__init__()
        layers = []
        for i in range(convs):
            layers += [nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch)]
            if i < convs - 1:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)
        self.film = nn.Linear(text_dim, 2 * out_ch)
        # Start as the identity modulation, so early training sees a plain U-Net.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(text)[:, :, None, None].chunk(2, dim=1)
        return F.relu(self.body(x) * (1 + gamma) + beta)


class FiLMUNet(nn.Module):
    """Image (N, 3, H, W) in [0, 1] and prompts -> foreground logits (N, H, W).

    Two downsamplings give a receptive field of about 48 pixels: the network sees
    local structure, and what a condition does to the whole image (faint overall,
    crowded, thin everywhere) it learns from the prompt, as a referring model should.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), buckets: int = 4096, embed_dim: int = 48,
                 text_dim: int = 64) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.arch = {"widths": list(widths), "buckets": buckets, "embed_dim": embed_dim, "text_dim": text_dim}
        self.text = HashedTextEncoder(buckets, embed_dim, text_dim)
        self.enc1 = FiLMBlock(3, c1, 2, text_dim)
        self.enc2 = FiLMBlock(c1, c2, 2, text_dim)
        self.bottom = FiLMBlock(c2, c3, 3, text_dim)
        self.dec2 = FiLMBlock(c3 + c2, c2, 2, text_dim)
        # Full resolution is where most of the compute goes: one convolution there.
        self.dec1 = FiLMBlock(c2 + c1, c1, 1, text_dim)
        self.head = nn.Conv2d(c1, 1, 1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        t = self.text(prompts)
        x = (images - 0.5) / 0.25
        e1 = self.enc1(x, t)
        e2 = self.enc2(F.max_pool2d(e1, 2), t)
        b = self.bottom(F.max_pool2d(e2, 2), t)
        d2 = self.dec2(torch.cat([_up(b), e2], 1), t)
        d1 = self.dec1(torch.cat([_up(d2), e1], 1), t)
        return self.head(d1)[:, 0]


def folded_forward(net: FiLMUNet, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """`net(images, prompts)` with batch norm in evaluation mode, each batch norm folded
    into the convolution before it and each FiLM modulation one fused multiply-add:
    the same function (up to float rounding) with four fewer passes over every
    activation, and those passes are what makes a large batch slow on a CPU (its
    activations outgrow the caches). The fold is recomputed from the parameters at
    every call (they are small) and is part of the autograd graph, so fine-tuning
    through it gets the gradients of the unfolded network."""
    if net.training:
        raise ValueError("folded_forward needs the network in evaluation mode (batch norm's running statistics)")
    t = net.text(prompts)
    x = (images - 0.5) / 0.25
    e1 = _folded_block(net.enc1, x, t)
    e2 = _folded_block(net.enc2, F.max_pool2d(e1, 2), t)
    b = _folded_block(net.bottom, F.max_pool2d(e2, 2), t)
    d2 = _folded_block(net.dec2, torch.cat([_up(b), e2], 1), t)
    d1 = _folded_block(net.dec1, torch.cat([_up(d2), e1], 1), t)
    return net.head(d1)[:, 0]


def _folded_block(block: FiLMBlock, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    layers = list(block.body)
    convs = [(conv, norm) for conv, norm in zip(layers, layers[1:]) if isinstance(conv, nn.Conv2d)]
    for i, (conv, norm) in enumerate(convs):
        assert isinstance(norm, nn.BatchNorm2d), "every convolution of a FiLMBlock is followed by batch norm"
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        x = F.conv2d(x, conv.weight * scale[:, None, None, None], norm.bias - norm.running_mean * scale, padding=1)
        if i < len(convs) - 1:
            x = x.relu_()
    gamma, beta = block.film(text)[:, :, None, None].chunk(2, dim=1)
    return torch.addcmul(beta, x, 1 + gamma).relu_()


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def to_batch(images: Sequence[np.ndarray], device: torch.device | str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Same-sized uint8 RGB images -> a float batch in [0, 1], padded (by reflection)
    to a multiple of the network's stride; also the original (H, W) to crop back to."""
    array = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    h, w = array.shape[1:3]
    batch = torch.from_numpy(array).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    pad_h, pad_w = -h % _STRIDE, -w % _STRIDE
    if pad_h or pad_w:
        batch = F.pad(batch, (0, pad_w, 0, pad_h), mode="reflect")
    return batch.contiguous(memory_format=torch.channels_last), (h, w)


class EmbeddedSegmenter:
    """The Segmenter and TrainableSegmenter forms of a FiLMUNet.

    Both run `folded_forward` (batch norm folded into the convolutions). `segment`
    runs in inference mode, in batches of `batch_size` images of one size.
    `mask_logits` is the same function with gradients (batch norm keeps its running
    statistics, so fine-tuning on small batches stays stable and
    the fine-tuned model is the one `segment` then runs).
    """

    gives_probabilities = True
    #: `mask_logits` only reads the network (in evaluation mode, nothing is updated).
    threads_at_once = True

    def __init__(self, net: FiLMUNet, device: str | torch.device = "cpu", batch_size: int = 32,
                 threshold: float = 0.5) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).to(memory_format=torch.channels_last).eval()
        self.batch_size = batch_size
        self.threshold = threshold
        self._fingerprint: tuple[tuple[int, ...], str] | None = None

    @property
    def fingerprint(self) -> str:
        """A hash of the weights and the code version. Recomputed only when a tensor
        was modified in place (an optimiser step), which torch counts per tensor, so
        a fine-tuned model never shares cached masks with the one it started from."""
        tensors = list(self.net.state_dict().values())
        versions = tuple(t._version for t in tensors)
        if self._fingerprint is None or self._fingerprint[0] != versions:
            self._fingerprint = (versions, weights_hash(self.net.state_dict()))
        return self._fingerprint[1]

    def segment(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[Prediction]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        out: list[Prediction | None] = [None] * len(images)
        self.net.eval()
        with torch.inference_mode():
            for indices in self._batches(images):
                probs = torch.sigmoid(self._logits([images[i] for i in indices], [prompts[i] for i in indices])).cpu()
                # One threshold and one conversion per batch; per image only views.
                masks, probs = (probs > self.threshold).numpy(), probs.contiguous().numpy()
                for row, i in enumerate(indices):
                    out[i] = Prediction(mask=masks[row], prob=probs[row])
        return out  # type: ignore[return-value]

    def mask_logits(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> torch.Tensor:
        shapes = {np.asarray(im).shape for im in images}
        if len(shapes) != 1:
            raise ValueError(f"mask_logits needs images of one size, got {sorted(shapes)}")
        self.net.eval()
        return self._logits(images, prompts)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state)

    def save(self, path: Path | str) -> None:
        save_weights(self.net, Path(path))

    def _logits(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> torch.Tensor:
        batch, (h, w) = to_batch(images, self.device)
        return folded_forward(self.net, batch, list(prompts))[:, :h, :w]

    def _batches(self, images: Sequence[np.ndarray]) -> list[list[int]]:
        """Indices grouped by image size, in order, at most batch_size per group."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(np.asarray(im).shape, []).append(i)
        return [group[k:k + self.batch_size] for group in by_shape.values() for k in range(0, len(group), self.batch_size)]


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(CODE_VERSION.encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_weights(net: FiLMUNet, path: Path, meta: dict | None = None) -> int:
    """Write the architecture and weights atomically, so a reader never sees half a
    file. Returns its size."""
    buffer = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save({"format": 1, "arch": net.arch, "state": state, "meta": meta or {}}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return len(buffer.getvalue())


def load_net(weights: Path) -> tuple[FiLMUNet, dict]:
    """The network in a weights file and the training summary stored with it."""
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such weights file (retrain with `sa2va-tui train-embedded`)")
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    net = FiLMUNet(**blob["arch"])
    net.load_state_dict(blob["state"])
    return net, blob.get("meta", {})


def load_embedded(weights: Path | None = None, device: str | torch.device = "cpu", batch_size: int = 32) -> EmbeddedSegmenter:
    """The embedded segmenter; `weights` None means the weights shipped with the package."""
    net, _ = load_net(Path(weights) if weights is not None else EMBEDDED_WEIGHTS)
    return EmbeddedSegmenter(net, device=device, batch_size=batch_size)
