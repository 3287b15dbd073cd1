"""`sa2va-tui check --deep`: the user's Sa2VA checkpoint on the user's GPU, before GPU
hours are spent. Loads the model once, segments one image with every candidate prompt,
takes two fine-tuning steps on it (the weights must move, and the trainable logits must
match predict_forward's), and prints load time, seconds per mask, peak GPU memory per
phase and the time the mask cache will take to fill for the configured dataset.

Every failure is a `BackendError` whose message is one line naming what to change.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import numpy as np
import torch

from experiments.backends.sa2va import BackendError
from experiments.datasets.base import render_prompt
from sa2va_contract.config import Config

#: bf16 on a GPU: the trainable forward casts its float32 masters under autocast, the
#: model's own bf16 weights do not; a few logits near 0 may fall on the other side.
MASK_AGREEMENT = 0.99
FLOAT32_TOLERANCE = 1e-3
Echo = Callable[[str], None]


def run_deep_check(config: Config, echo: Echo, replicas: int = 1, gpus: int = 1) -> None:
    """Load, segment every prompt of one image and take two fine-tuning steps; then the
    mask stage's fill time at the measured time per mask, with `replicas` models over
    `gpus` GPUs (the stage's layout as the UI computed it; 0 without a GPU: one
    replica, where this check ran)."""
    if config.backend.kind != "sa2va":
        raise BackendError(f"backend.kind: check --deep is for sa2va, not {config.backend.kind}")
    peaks = _Peaks()
    with _phase("reading the dataset"):
        sample = _first_sample(config)
    with _phase("loading the model"):
        segmenter, load_s = _load(config)
    peaks.mark("load")
    echo(f"ok    loaded {config.backend.model_path} ({segmenter.family.label}) in {load_s:.1f} s on {segmenter.device()}")
    with _phase("segmenting"):
        per_mask, masked = _segment_every_prompt(config, segmenter, sample, echo)
    peaks.mark("segment")
    with _phase("fine-tuning"):
        _finetune_two_steps(config, segmenter, sample, masked, echo)
    peaks.mark("finetune")
    echo(f"ok    peak GPU memory: {peaks.describe()}")
    echo(f"ok    {_cache_estimate(config, per_mask, replicas, gpus)}")


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    """Whatever goes wrong in a phase becomes one line naming it."""
    try:
        yield
    except BackendError:
        raise
    except torch.OutOfMemoryError:
        raise BackendError(f"check --deep: CUDA out of memory while {name}: use a smaller checkpoint, or "
                           "backend.device_map: split over several GPUs (InternVL-based checkpoints)") from None
    except Exception as err:  # noqa: BLE001 - the model's own code can raise anything
        first = (str(err).strip().splitlines() or [""])[0]
        raise BackendError(f"check --deep: {name} failed: {type(err).__name__}: {first}") from None


def _first_sample(config: Config):
    from experiments.datasets import load_split

    samples = load_split(config.dataset, "train")
    if not samples:
        raise BackendError("dataset: the train split is empty: check --deep needs one image")
    return samples[0]


def _load(config: Config):
    from experiments.backends import make_segmenter

    start = time.perf_counter()
    segmenter = make_segmenter(config)
    return segmenter, time.perf_counter() - start


def _segment_every_prompt(config: Config, segmenter, sample, echo: Echo) -> tuple[float, list[str]]:
    """Seconds per mask (the first call, which sets generation up, left out when there
    are more) and the prompts that gave a mask."""
    seconds, masked = [], []
    for template in config.backend.prompts:
        prompt = render_prompt(template, sample)
        start = time.perf_counter()
        (prediction,) = segmenter.segment([sample.image], [prompt])
        seconds.append(time.perf_counter() - start)
        share = float(prediction.mask.mean())
        if prediction.mask.any():
            masked.append(prompt)
        answer = f"{share:.1%} of the image" if prediction.mask.any() else "no [SEG]: an empty mask"
        echo(f"ok    {prompt!r}: {answer} ({seconds[-1]:.2f} s)")
    per_mask = float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))
    echo(f"ok    {len(seconds)} prompts on {sample.id}: {per_mask:.2f} s per mask after the first ({seconds[0]:.2f} s)")
    return per_mask, masked


def _finetune_two_steps(config: Config, segmenter, sample, masked: list[str], echo: Echo) -> None:
    from experiments.backends import make_trainable
    from experiments.backends.sa2va_trainable import predict_forward_logits

    if not masked:
        raise BackendError(f"backend.prompts: no candidate prompt gave a [SEG] on {sample.id}; "
                           "fine-tuning needs a mask to check (try other prompts)")
    prompt = masked[0]
    trainable = make_trainable(config, str(segmenter.device()), base=segmenter)
    reference = predict_forward_logits(segmenter, sample.image, prompt)
    logits = trainable.mask_logits([sample.image], [prompt])
    diff, agreement = _compare(logits.detach(), reference, exact=next(segmenter.model.text_hidden_fcs.parameters()).dtype
                               == torch.float32)
    echo(f"ok    trainable path = predict_forward on {prompt!r}: max |logit diff| {diff:.2g}, "
         f"masks agree on {agreement:.2%} of pixels")
    start_weights = [p.detach().clone() for p in trainable.trainable_parameters()]
    optimiser = torch.optim.Adam(trainable.trainable_parameters(), lr=config.reward_net.finetune.learning_rate)
    started = time.perf_counter()
    for _ in range(2):
        optimiser.zero_grad(set_to_none=True)
        # Any loss with a gradient everywhere on the mask path will do: push towards the opposite mask.
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, (logits.detach() < 0).float())
        loss.backward()
        optimiser.step()
        logits = trainable.mask_logits([sample.image], [prompt])
    step_s = (time.perf_counter() - started) / 2
    moved = sum(int((p.detach() != q).sum()) for p, q in zip(trainable.trainable_parameters(), start_weights))
    total = sum(q.numel() for q in start_weights)
    if moved == 0:
        raise BackendError("reward_net.finetune.learning_rate: two Adam steps left every trained weight as it was")
    echo(f"ok    fine-tuning: 2 steps on {prompt!r} moved {moved / total:.0%} of {total:,} trained weights "
         f"(float32 masters), {step_s:.2f} s per step of one image")


def _compare(logits: torch.Tensor, reference: torch.Tensor | None, exact: bool) -> tuple[float, float]:
    """Float32 models must match to FLOAT32_TOLERANCE; bf16 ones in their masks."""
    if reference is None:
        raise BackendError("backend: predict_forward gave no mask the second time for the same input (not deterministic)")
    reference = reference.to(logits.device)
    diff = float((logits - reference).abs().max())
    agreement = float(((logits > 0) == (reference > 0)).float().mean())
    ok = diff <= FLOAT32_TOLERANCE if exact else agreement >= MASK_AGREEMENT
    if not ok:
        raise BackendError(f"backend: the trainable path's logits differ from predict_forward's (max |diff| {diff:.3g}, "
                           f"masks agree on {agreement:.1%} of pixels): this checkpoint's code does not decode as "
                           "sam2.py's inject_language_embd does")
    return diff, agreement


class _Peaks:
    """Peak GPU memory per phase (torch's allocator: what this process's tensors took)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.values[phase] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()

    def describe(self) -> str:
        if not self.values:
            return "n/a (no CUDA: the model ran on the CPU)"
        return ", ".join(f"{phase} {gib:.1f} GiB" for phase, gib in self.values.items())


def _cache_estimate(config: Config, per_mask: float, replicas: int, gpus: int) -> str:
    """The run's mask stage on a cold cache, at the measured time per mask."""
    from experiments.mask_needs import fill_estimate

    return fill_estimate(config, per_mask, replicas or 1, gpus or 1, measured=True)
