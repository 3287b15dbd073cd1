"""Experiment 3: a reward network that predicts mask quality, then guides fine-tuning.

Step 1 trains a small CNN to predict the Dice of an (image, mask) pair against ground
truth it never sees at inference. Its training masks come from every candidate prompt
and from perturbed copies of them, so the labels span the whole quality range.

Step 2 fine-tunes the segmenter to raise the reward network's score on train images
without their labels, with a penalty that keeps its masks close to those of the
starting model, and reports val Dice before and after. The starting weights are read,
never written: the fine-tuned model is saved in the experiment's folder.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.backends import make_cached_segmenter
from experiments.datasets import Sample, load_split, render_prompt
from experiments.harness import StopRequested, WorkerContext
from experiments.metrics import dice

CHECKPOINT = "checkpoints/last.pt"
BEST_REWARD_NET = "best_reward_net.pth"
FINAL_REWARD_NET = "final_reward_net.pth"
FINETUNED_SEGMENTER = "finetuned_segmenter.pt"
#: Fine-tuning steps between checkpoints (each holds the segmenter and its optimiser).
FINETUNE_CHECKPOINT_EVERY = 50


# --- the model -----------------------------------------------------------------------


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_reward_net(path: Path, device: str = "cpu") -> RewardNet:
    state = torch.load(path, map_location=device, weights_only=True)
    net = RewardNet(width=int(state["width"]), text_buckets=int(state["text_buckets"]))
    net.load_state_dict(state["model"])
    return net.to(device).eval()


def reward_net_state(net: RewardNet) -> dict[str, Any]:
    return {"width": net.width, "text_buckets": net.text_buckets, "model": net.state_dict()}


# --- the training set ----------------------------------------------------------------

PERTURBATIONS = ("erode", "dilate", "shift", "holes", "blobs", "partial")


def perturb(mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong mask: the kinds of error a segmenter makes."""
    h, w = mask.shape
    m = mask.astype(np.uint8)
    if kind in ("erode", "dilate"):
        size = int(rng.integers(2, 6)) * 2 - 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        return (cv2.erode(m, kernel) if kind == "erode" else cv2.dilate(m, kernel)).astype(bool)
    if kind == "shift":
        dy, dx = rng.integers(-h // 10, h // 10 + 1), rng.integers(-w // 10, w // 10 + 1)
        return np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
    if kind in ("holes", "blobs"):
        out = m.copy()
        for _ in range(int(rng.integers(2, 7))):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            if kind == "holes" and mask.any():
                ys, xs = np.nonzero(mask)
                pick = int(rng.integers(0, len(xs)))
                centre = (int(xs[pick]), int(ys[pick]))
            axes = (int(rng.integers(2, max(3, w // 8))), int(rng.integers(2, max(3, h // 8))))
            cv2.ellipse(out, centre, axes, float(rng.uniform(0, 180)), 0, 360, 0 if kind == "holes" else 1, -1)
        return out.astype(bool)
    if kind == "partial":
        if not mask.any():
            return mask.copy()
        # Cut along a random direction at a quantile of the mask's own extent, so the
        # cut always falls through the object and drops 20-70 % of it.
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        along = xx * np.cos(angle) + yy * np.sin(angle)
        cut = np.quantile(along[mask], rng.uniform(0.3, 0.8))
        return mask & (along < cut)
    raise ValueError(f"unknown perturbation {kind!r}")


@dataclass
class QualitySet:
    """(image, mask, true Dice) triples; `groups` names the image of each mask and
    `candidate` marks masks straight from a candidate prompt (for pick-the-best)."""

    images: torch.Tensor  # (n_images, 3, S, S) float
    consensus: torch.Tensor  # (n_images, 1, S, S) float
    queries: list[str]  # (n_images,) what is to be segmented in each image
    masks: torch.Tensor  # (n_pairs, 1, S, S) float
    labels: torch.Tensor  # (n_pairs,)
    image_index: torch.Tensor  # (n_pairs,) long
    candidate: np.ndarray  # (n_pairs,) bool

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, rows: torch.Tensor | slice, device: str) -> tuple:
        """The network's inputs for some pairs: images, masks, consensus, queries."""
        index = self.image_index[rows]
        return (self.images[index].to(device), self.masks[rows].to(device), self.consensus[index].to(device),
                [self.queries[int(i)] for i in index])


def build_quality_set(
    samples: Sequence[Sample],
    candidates: dict[str, list[np.ndarray]],
    query_template: str,
    perturbations_per_mask: int,
    size: int,
    seed: int,
) -> QualitySet:
    rng = np.random.default_rng(seed)
    masks, labels, index, candidate = [], [], [], []
    for i, sample in enumerate(samples):
        for mask in candidates[sample.id]:
            variants = [(mask, True)] + [
                (perturb(mask, PERTURBATIONS[rng.integers(len(PERTURBATIONS))], rng), False)
                for _ in range(perturbations_per_mask)
            ]
            for variant, is_candidate in variants:
                masks.append(variant)
                labels.append(float(dice(variant, sample.mask)))
                index.append(i)
                candidate.append(is_candidate)
    images = resize_maps(images_to_tensor([s.image for s in samples]), size)
    consensus = resize_maps(torch.stack([consensus_map(candidates[s.id]) for s in samples]), size)
    mask_tensor = resize_maps(torch.from_numpy(np.stack(masks)).float().unsqueeze(1), size)
    queries = [render_prompt(query_template, s) for s in samples]
    return QualitySet(images, consensus, queries, mask_tensor, torch.tensor(labels), torch.tensor(index),
                      np.array(candidate))


# --- statistics ----------------------------------------------------------------------


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks, ties sharing the mean of their positions."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(a)), _ranks(np.asarray(b)))


def pick_best_accuracy(predicted: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> float:
    """How often the mask ranked first by the network is (one of) the truly best."""
    hits = []
    for group in np.unique(groups):
        members = groups == group
        if members.sum() < 2:
            continue
        best = truth[members].max()
        hits.append(truth[members][int(np.argmax(predicted[members]))] >= best - 1e-9)
    return float(np.mean(hits)) if hits else 0.0


# --- the experiment ------------------------------------------------------------------


def _candidate_masks(ctx: WorkerContext, segmenter, samples: Sequence[Sample]) -> dict[str, list]:
    templates = ctx.config.backend.prompts
    ctx.phase("caching_masks", 0, len(samples) * len(templates))
    def report(done: int, total: int) -> None:
        ctx.control_point()
        ctx.phase("caching_masks", done, total)

    segmenter.warm(samples, templates, on_progress=report)
    return {s.id: [segmenter.predict(s, t).mask for t in templates] for s in samples}


def _predict(net: RewardNet, data: QualitySet, batch_size: int, device: str) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            out.append(net(*data.inputs(slice(start, start + batch_size), device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _evaluate(net: RewardNet, data: QualitySet, batch_size: int, device: str) -> dict[str, float]:
    net.eval()
    predicted = _predict(net, data, batch_size, device)
    truth = data.labels.numpy()
    candidates = data.candidate
    return {
        "reward/val_loss": float(np.mean((predicted - truth) ** 2)),
        "reward/val_mae": float(np.mean(np.abs(predicted - truth))),
        "reward/pearson": pearson(predicted, truth),
        "reward/spearman": spearman(predicted, truth),
        "reward/pick_best_acc": pick_best_accuracy(
            predicted[candidates], truth[candidates], data.image_index.numpy()[candidates]
        ),
    }


class _Progress:
    """One step count across both stages, so pause, stop, fault injection and the
    progress bar all see a single timeline."""

    def __init__(self, ctx: WorkerContext, total: int, step: int = 0) -> None:
        self.ctx, self.total, self.step = ctx, total, step

    def advance(self) -> None:
        self.ctx.step_point(self.step)
        self.step += 1
        self.ctx.progress(self.step, self.total)


def run(ctx: WorkerContext) -> dict[str, Any]:
    config, exp = ctx.config, ctx.experiment
    device = ctx.device
    torch.manual_seed(exp.seed)
    if device == "cpu":
        # Workers share the cores: one thread each is as fast as two here, and two
        # threads per worker spin against each other when three workers run at once.
        torch.set_num_threads(1)
    reward_cfg, tune_cfg = exp.reward, exp.finetune
    batch_size = min(reward_cfg.batch_size, ctx.batch_size_override or reward_cfg.batch_size)
    tune_batch = min(tune_cfg.batch_size, ctx.batch_size_override or tune_cfg.batch_size)

    ctx.phase("loading_model")
    segmenter = make_cached_segmenter(config, device="cpu")
    train = load_split(config.dataset, "train")[: reward_cfg.samples]
    val = load_split(config.dataset, "val")[: max(8, reward_cfg.samples // 4)]

    train_masks = _candidate_masks(ctx, segmenter, list(train) + list(val))
    peaks: dict[str, float] = {}
    record_peak_gpu_memory(peaks, "model_and_masks")
    rng_seed = exp.seed
    query = config.backend.prompts[config.backend.default_prompt]
    train_set = build_quality_set(train, train_masks, query, reward_cfg.perturbations_per_mask, reward_cfg.input_size,
                                  rng_seed)
    val_set = build_quality_set(val, train_masks, query, reward_cfg.perturbations_per_mask, reward_cfg.input_size,
                                rng_seed + 1)

    batches_per_epoch = -(-len(train_set) // batch_size)
    total = reward_cfg.epochs * batches_per_epoch + tune_cfg.steps
    checkpoint_path = ctx.exp_dir / CHECKPOINT
    resume = _load_checkpoint(ctx.resume_from or (checkpoint_path if checkpoint_path.exists() else None))
    if resume is not None:
        # The steps taken as they were taken, then those left at this attempt's batch
        # size (smaller after an out-of-memory error: more batches per epoch).
        epochs_left = reward_cfg.epochs - int(resume["epoch"]) if resume["stage"] == "reward" else 0
        tune_left = tune_cfg.steps - int(resume.get("finetune_step", 0))
        total = int(resume["step"]) + epochs_left * batches_per_epoch + tune_left

    net = RewardNet(width=reward_cfg.width).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=reward_cfg.learning_rate, weight_decay=1e-4)
    start_epoch, best = 0, {"reward/spearman": -2.0}
    progress = _Progress(ctx, total)
    if resume is not None:
        net.load_state_dict(resume["reward_net"]["model"])
        if resume["stage"] == "reward":
            optimiser.load_state_dict(resume["optimiser"])
        start_epoch, best, progress.step = int(resume["epoch"]), dict(resume["best"]), int(resume["step"])

    writer = _tensorboard(ctx.exp_dir)
    ctx.phase("training")
    generator = torch.Generator().manual_seed(exp.seed)
    for epoch in range(start_epoch, reward_cfg.epochs):
        if resume is not None and resume["stage"] == "finetune":
            break
        net.train()
        order = torch.randperm(len(train_set), generator=generator)
        losses = []
        for start in range(0, len(order), batch_size):
            progress.advance()
            rows = order[start : start + batch_size]
            predicted = net(*train_set.inputs(rows, device))
            loss = F.mse_loss(predicted, train_set.labels[rows].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        values = {"reward/train_loss": float(np.mean(losses)), **_evaluate(net, val_set, batch_size, device), "reward/epoch": epoch + 1}
        ctx.metrics(progress.step, values)
        for key, value in values.items():
            writer.add_scalar(key, value, progress.step)
        if values["reward/spearman"] > best["reward/spearman"]:
            best = {k: v for k, v in values.items()}
            save_atomic(reward_net_state(net), ctx.exp_dir / BEST_REWARD_NET)
        save_atomic(
            {"stage": "reward", "epoch": epoch + 1, "step": progress.step, "best": best,
             "reward_net": reward_net_state(net), "optimiser": optimiser.state_dict()},
            checkpoint_path,
        )
        ctx.checkpoint_saved(checkpoint_path, progress.step)
    save_atomic(reward_net_state(net), ctx.exp_dir / FINAL_REWARD_NET)

    best_net = load_reward_net(ctx.exp_dir / BEST_REWARD_NET, device)
    for parameter in best_net.parameters():
        parameter.requires_grad_(False)
    consensus = {s.id: consensus_map(masks) for s, masks in ((s, train_masks[s.id]) for s in train)}
    record_peak_gpu_memory(peaks, "reward_training")
    # The trainable form wraps the segmenter's model: one Sa2VA per worker.
    tuned = finetune(ctx, best_net, train, val, consensus, tune_batch, progress, writer, resume, base=segmenter)
    record_peak_gpu_memory(peaks, "finetune")
    writer.close()
    return {
        "reward_net": {k: round(float(v), 4) for k, v in best.items()},
        "finetune": tuned,
        "batch_size": batch_size,
        **({"peak_gpu_memory_gib": peaks} if peaks else {}),
    }


def record_peak_gpu_memory(peaks: dict[str, float], phase: str) -> None:
    """The most GPU memory torch held during `phase` (since the last call), in GiB; the
    counter restarts for the next phase. Nothing without CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks[phase] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        torch.cuda.reset_peak_memory_stats()


def finetune(
    ctx: WorkerContext,
    reward_net: RewardNet,
    train: Sequence[Sample],
    val: Sequence[Sample],
    consensus: dict[str, torch.Tensor],
    batch_size: int,
    progress: _Progress,
    writer,
    resume: dict | None,
    base=None,
) -> dict[str, float]:
    """Raise the reward network's score of the segmenter's soft masks on unlabelled
    train images, anchored to the starting model's masks. The embedded model is tuned
    whole; Sa2VA along its mask-decoder path (see `Sa2VAMaskDecoder`)."""
    from experiments.backends import make_trainable

    config, cfg = ctx.config, ctx.experiment.finetune
    device = ctx.device
    template = config.backend.prompts[config.backend.default_prompt]
    model = make_trainable(config, device, base=base)
    # Measured before any step, and before a resumed run's weights are loaded, so that
    # they describe the starting model.
    before_val = _val_dice(model, val, template)
    initial = [p.detach().clone() for p in model.trainable_parameters()]
    with torch.no_grad():
        anchors = {s.id: torch.sigmoid(model.mask_logits([s.image], [render_prompt(template, s)]))[0] for s in train}
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=cfg.learning_rate)
    first_step = 0
    if resume is not None and resume["stage"] == "finetune":
        model.load_state_dict(resume["segmenter"])
        optimiser.load_state_dict(resume["optimiser"])
        first_step = int(resume["finetune_step"])

    rng = np.random.default_rng(ctx.experiment.seed + first_step)
    size = ctx.experiment.reward.input_size
    checkpoint_path = ctx.exp_dir / CHECKPOINT
    ctx.phase("training", first_step, cfg.steps)
    last: dict[str, float] = {}
    def save_checkpoint(steps_done: int) -> None:
        save_atomic(
            {"stage": "finetune", "epoch": ctx.experiment.reward.epochs, "step": progress.step, "best": {},
             "finetune_step": steps_done, "reward_net": reward_net_state(reward_net),
             "segmenter": model.state_dict(), "optimiser": optimiser.state_dict()},
            checkpoint_path,
        )
        ctx.checkpoint_saved(checkpoint_path, progress.step)

    for step in range(first_step, cfg.steps):
        try:
            progress.advance()
        except StopRequested:
            save_checkpoint(step)  # stop saves first; a reward-net epoch is too short to need that
            raise
        batch = [train[i] for i in rng.choice(len(train), size=min(batch_size, len(train)), replace=False)]
        logits = model.mask_logits([s.image for s in batch], [render_prompt(template, s) for s in batch])
        soft = torch.sigmoid(logits).unsqueeze(1)
        images = resize_maps(images_to_tensor([s.image for s in batch], device), size)
        agreed = resize_maps(torch.stack([consensus[s.id] for s in batch]).to(device), size)
        reward = reward_net(images, resize_maps(soft, size), agreed, [render_prompt(template, s) for s in batch]).mean()
        anchor = F.binary_cross_entropy_with_logits(logits, torch.stack([anchors[s.id] for s in batch]))
        loss = -reward + cfg.anchor_weight * anchor
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        last = {"finetune/reward": float(reward.detach()), "finetune/anchor": float(anchor.detach()),
                "finetune/loss": float(loss.detach())}
        finished = step + 1 == cfg.steps
        if (step + 1) % 10 == 0 or finished:
            ctx.metrics(progress.step, last)
            for key, value in last.items():
                writer.add_scalar(key, value, progress.step)
        if (step + 1) % FINETUNE_CHECKPOINT_EVERY == 0 or finished:
            save_checkpoint(step + 1)
    model.save(ctx.exp_dir / FINETUNED_SEGMENTER)
    change = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in zip(model.trainable_parameters(), initial)))
    scale = torch.sqrt(sum((q**2).sum() for q in initial))
    ctx.phase("evaluating")
    after_val = _val_dice(model, val, template)
    summary = {
        "val_dice_before": round(before_val, 4),
        "val_dice_after": round(after_val, 4),
        "relative_weight_change": float(change / scale),
        **{k: round(v, 4) for k, v in last.items()},
    }
    ctx.metrics(progress.step, {"finetune/val_dice_before": before_val, "finetune/val_dice_after": after_val})
    return summary


def _val_dice(model, samples: Sequence[Sample], template: str) -> float:
    predictions = model.segment([s.image for s in samples], [render_prompt(template, s) for s in samples])
    return float(np.mean([dice(p.mask, s.mask) for p, s in zip(predictions, samples)]))


def _load_checkpoint(path: Path | None) -> dict | None:
    if path is None or not Path(path).exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _tensorboard(exp_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(exp_dir / "tensorboard"))


# --- evaluation rows -----------------------------------------------------------------

#: Post-processing choices that reranking considers for every candidate prompt's mask.
RERANK_OPERATIONS = ((), ("fill_holes",), ("drop_small",), ("bridge_gaps",), ("close",), ("drop_small", "fill_holes"))


def rerank(reward_net: RewardNet, samples: Sequence[Sample], segmenter, templates: Sequence[str], query: str,
           settings, size: int) -> list[np.ndarray]:
    """Per image, of every candidate prompt times a few post-processing choices, the
    mask the reward network scores highest. No label is read."""
    from experiments.postprocess import apply_sequence

    chosen = []
    for sample in samples:
        predictions = [segmenter.predict(sample, template) for template in templates]
        candidates = [apply_sequence(p.mask, p.prob, ops, settings) for p in predictions for ops in RERANK_OPERATIONS]
        n = len(candidates)
        masks = resize_maps(torch.from_numpy(np.stack(candidates)).float().unsqueeze(1), size)
        images = resize_maps(images_to_tensor([sample.image]), size).expand(n, -1, -1, -1)
        agreed = resize_maps(consensus_map([p.mask for p in predictions]).unsqueeze(0), size).expand(n, -1, -1, -1)
        with torch.no_grad():
            scores = reward_net(images, masks, agreed, [render_prompt(query, sample)] * n)
        chosen.append(candidates[int(torch.argmax(scores))])
    return chosen


def evaluation_rows(config, run_dir: Path, samples: Sequence[Sample], segmenter) -> tuple[list, dict[str, str]]:
    """The reward-network experiment's two rows of the evaluation table: the fine-tuned
    segmenter with the default prompt, and reward-network reranking."""
    from experiments.backends import cache_dir_for, make_trainable
    from experiments.backends.cache import CachedSegmenter
    from experiments.evaluate import row_from_masks
    from experiments.postprocess import OpSettings

    exp_dir = Path(run_dir) / "reward_net"
    ids, truths = [s.id for s in samples], [s.mask for s in samples]
    template = config.backend.prompts[config.backend.default_prompt]
    rows, missing = [], {}
    tuned_path = exp_dir / FINETUNED_SEGMENTER
    if tuned_path.is_file():
        tuned = CachedSegmenter(make_trainable(config, finetuned=tuned_path, base=segmenter), cache_dir_for(config))
        masks = [tuned.predict(s, template).mask for s in samples]
        rows.append(row_from_masks("finetuned", "reward-guided fine-tuned model, default prompt", "model", ids, masks,
                                   truths, source=str(tuned_path)))
    else:
        missing["finetuned"] = f"no {FINETUNED_SEGMENTER} in {exp_dir}"
    net_path = exp_dir / BEST_REWARD_NET
    if net_path.is_file():
        settings = OpSettings.of(config.postprocess_rl)
        masks = rerank(load_reward_net(net_path), samples, segmenter, config.backend.prompts, template, settings,
                       config.reward_net.reward.input_size)
        rows.append(row_from_masks("reward_rerank", "reward-network reranking (prompts x post-processing, no labels)",
                                   "policy", ids, masks, truths, source=str(net_path)))
    else:
        missing["reward_rerank"] = f"no {BEST_REWARD_NET} in {exp_dir}"
    return rows, missing
