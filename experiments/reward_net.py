"""Experiment 3: a reward network that predicts mask quality, then guides fine-tuning.

Step 1 trains a small CNN to predict the Dice of an (image, mask) pair against ground
truth it never sees at inference. Its training masks come from every candidate prompt
and from perturbed copies of them, so the labels span the whole quality range.

Step 2 fine-tunes the segmenter to raise the reward network's score on train images
without their labels, with a penalty that keeps its masks close to those of the
starting model, and reports Dice before and after on the reported split (test, or
val for a dataset without one), the figure the evaluation table shows too. The
starting weights are read, never written: the fine-tuned model is saved in the
experiment's folder.

Each image has one job (`image_sets`): the reward network learns on the first
`reward.samples` train images, its epoch is chosen on val images (on held-out
reward images when val is the reported split), fine-tuning draws from the next
`finetune.samples` train images, and the figure is measured on the reported split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from experiments.backends import make_cached_segmenter
from experiments.checkpoints import DamagedFile, damage_reason, keep_previous, newest_loadable
from experiments.datasets import Sample, render_prompt, reported_split
from experiments.harness import StopRequested, WorkerContext
from experiments.intervals import delta_interval
from experiments.mask_needs import every_prompt, reward_image_sets, reward_net_samples
from experiments.mask_stage import await_pairs, report_mask_work
from experiments.metrics import dice
from experiments.reward.network import (
    RewardNet,
    consensus_map,
    images_to_tensor,
    load_reward_net,
    resize_maps,
    reward_net_state,
    save_atomic,
)
from experiments.reward.parted import BatchParts, batch_parts
from experiments.reward.quality import QualitySet, build_quality_set, pearson, pick_best_accuracy, spearman
from sa2va_contract.layout import (
    BEST_REWARD_NET,
    FINAL_REWARD_NET,
    FINETUNED_SEGMENTER,
    REWARD_NET_CHECKPOINT,
    REWARD_NET_PREVIOUS,
    TENSORBOARD_DIR,
)

#: Fine-tuning steps between checkpoints (each holds the segmenter and its optimiser).
FINETUNE_CHECKPOINT_EVERY = 50


# --- the experiment ------------------------------------------------------------------


def image_sets(config, experiment) -> dict[str, list[Sample]]:
    """The images of each job, disjoint (`experiments.mask_needs.reward_image_sets`,
    which the mask stage reads too)."""
    return reward_image_sets(config, experiment)


def _candidate_masks(ctx: WorkerContext, segmenter, samples: Sequence[Sample]) -> dict[str, list]:
    templates = ctx.config.backend.prompts
    ctx.phase("caching_masks", 0, len(samples) * len(templates))
    def report(done: int, total: int) -> None:
        ctx.control_point()
        ctx.phase("caching_masks", done, total)

    wanted = every_prompt(samples, templates)
    await_pairs(ctx, segmenter, wanted)
    segmenter.segment(wanted.images, wanted.prompts, on_progress=report)
    report_mask_work(ctx, segmenter)
    return {s.id: [segmenter.predict(s, t).mask for t in templates] for s in samples}


def _predict(net: RewardNet, data: QualitySet, batch_size: int, device: str, parts: BatchParts) -> np.ndarray:
    def predict(rows: slice) -> list[np.ndarray]:
        out = []
        with torch.no_grad():  # grad mode is the calling thread's own
            for start in range(rows.start, rows.stop, batch_size):
                out.append(net(*data.inputs(slice(start, min(start + batch_size, rows.stop)), device)).cpu().numpy())
        return out

    out = [batch for part in parts.side_by_side(predict, len(data)) for batch in part]
    return np.concatenate(out) if out else np.zeros(0)


def _evaluate(net: RewardNet, data: QualitySet, batch_size: int, device: str,
              parts: BatchParts) -> dict[str, float]:
    net.eval()
    predicted = _predict(net, data, batch_size, device, parts)
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
    batch_size, tune_batch = reward_cfg.batch_size, tune_cfg.batch_size

    ctx.phase("loading_model")
    segmenter = make_cached_segmenter(config, device="cpu")
    images = image_sets(config, exp)
    train, val = images["reward"], images["choice"]

    train_masks = _candidate_masks(ctx, segmenter, reward_net_samples(images))
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
    resume = _resume_point(ctx, reward_cfg.width)
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
    reward_parts = batch_parts(net.parameters(), device)
    try:
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

                def batch_loss(part: slice, rows=rows) -> tuple[torch.Tensor]:
                    return (F.mse_loss(net(*train_set.inputs(rows[part], device)),
                                       train_set.labels[rows[part]].to(device)),)

                optimiser.zero_grad(set_to_none=True)
                loss, = reward_parts.gradients(batch_loss, len(rows))
                optimiser.step()
                losses.append(loss)
            values = {"reward/train_loss": float(np.mean(losses)),
                      **_evaluate(net, val_set, batch_size, device, reward_parts), "reward/epoch": epoch + 1}
            ctx.metrics(progress.step, values)
            for key, value in values.items():
                writer.add_scalar(key, value, progress.step)
            if values["reward/spearman"] > best["reward/spearman"]:
                best = {k: v for k, v in values.items()}
                save_atomic(reward_net_state(net), ctx.exp_dir / BEST_REWARD_NET)
            save_checkpoint(ctx, {"stage": "reward", "epoch": epoch + 1, "step": progress.step, "best": best,
                                  "reward_net": reward_net_state(net), "optimiser": optimiser.state_dict()},
                            progress.step)
        save_atomic(reward_net_state(net), ctx.exp_dir / FINAL_REWARD_NET)

        best_net = _best_reward_net(ctx, net, device, resume)
        for parameter in best_net.parameters():
            parameter.requires_grad_(False)
        consensus = {s.id: consensus_map(train_masks[s.id]) for s in images["finetune"]}
        record_peak_gpu_memory(peaks, "reward_training")
        # The trainable form wraps the segmenter's model: one Sa2VA per worker.
        tuned = finetune(ctx, best_net, images["finetune"], images["report"], consensus, tune_batch, progress, writer,
                         resume, base=segmenter)
        record_peak_gpu_memory(peaks, "finetune")
        return {
            "reward_net": {k: round(float(v), 4) for k, v in best.items()},
            "images": {job: len(samples) for job, samples in images.items()},
            "finetune": tuned,
            "batch_size": batch_size,
            "cache_damaged": segmenter.damaged,
            **({"peak_gpu_memory_gib": peaks} if peaks else {}),
        }
    finally:
        # Closed on every way out, a stop's included: the worker then skips the
        # interpreter's teardown, which would otherwise flush it.
        writer.close()
        reward_parts.close()


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
    report: Sequence[Sample],
    consensus: dict[str, torch.Tensor],
    batch_size: int,
    progress: _Progress,
    writer,
    resume: dict | None,
    base=None,
) -> dict[str, float]:
    """Raise the reward network's score of the segmenter's soft masks on unlabelled
    train images, anchored to the starting model's masks; Dice before and after on the
    `report` images. The embedded model is tuned whole; Sa2VA along its mask-decoder
    path (see `Sa2VAMaskDecoder`)."""
    from experiments.backends import make_trainable

    model = make_trainable(ctx.config, ctx.device, base=base)
    # Its threads also measure Dice and make the anchors, image by image, side by side.
    parts = batch_parts(model.trainable_parameters(), ctx.device, model.threads_at_once)
    try:
        return _finetune_with(ctx, model, parts, reward_net, train, report, consensus, batch_size, progress,
                              writer, resume)
    finally:
        parts.close()


def _finetune_with(ctx: WorkerContext, model, parts: BatchParts, reward_net: RewardNet,
                   train: Sequence[Sample], report: Sequence[Sample], consensus: dict[str, torch.Tensor],
                   batch_size: int, progress: _Progress, writer, resume: dict | None) -> dict[str, float]:
    config, cfg = ctx.config, ctx.experiment.finetune
    device = ctx.device
    template = config.backend.prompts[config.backend.default_prompt]

    def dice_per_image() -> np.ndarray:
        return np.concatenate(parts.side_by_side(lambda rows: _dice_per_image(model, report[rows], template),
                                                 len(report)))

    def anchors_of(rows: slice) -> dict[str, torch.Tensor]:
        with torch.no_grad():  # grad mode is the calling thread's own
            return {s.id: torch.sigmoid(model.mask_logits([s.image], [render_prompt(template, s)]))[0]
                    for s in train[rows]}

    # Measured before any step, and before a resumed run's weights are loaded, so that
    # they describe the starting model.
    before = dice_per_image()
    initial = [p.detach().clone() for p in model.trainable_parameters()]
    anchors = {key: value for part in parts.side_by_side(anchors_of, len(train)) for key, value in part.items()}
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=cfg.learning_rate)
    first_step = 0
    if resume is not None and resume["stage"] == "finetune":
        model.load_state_dict(resume["segmenter"])
        optimiser.load_state_dict(resume["optimiser"])
        first_step = int(resume["finetune_step"])

    rng = np.random.default_rng(ctx.experiment.seed + first_step)
    size = ctx.experiment.reward.input_size
    ctx.phase("training", first_step, cfg.steps)
    last: dict[str, float] = {}
    def save_finetune_checkpoint(steps_done: int) -> None:
        save_checkpoint(ctx, {"stage": "finetune", "epoch": ctx.experiment.reward.epochs, "step": progress.step,
                              "best": {}, "finetune_step": steps_done, "reward_net": reward_net_state(reward_net),
                              "segmenter": model.state_dict(), "optimiser": optimiser.state_dict()},
                        progress.step)

    for step in range(first_step, cfg.steps):
        try:
            progress.advance()
        except StopRequested:
            save_finetune_checkpoint(step)  # stop saves first; a reward-net epoch is too short to need that
            raise
        batch = [train[i] for i in rng.choice(len(train), size=min(batch_size, len(train)), replace=False)]

        def batch_loss(part: slice, batch=batch) -> tuple[torch.Tensor, ...]:
            return finetune_loss(model, reward_net, batch[part], template, consensus, anchors, size,
                                 cfg.anchor_weight, device)

        optimiser.zero_grad(set_to_none=True)
        loss, reward, anchor = parts.gradients(batch_loss, len(batch))
        optimiser.step()
        last = {"finetune/reward": reward, "finetune/anchor": anchor, "finetune/loss": loss}
        finished = step + 1 == cfg.steps
        if (step + 1) % 10 == 0 or finished:
            ctx.metrics(progress.step, last)
            for key, value in last.items():
                writer.add_scalar(key, value, progress.step)
        if (step + 1) % FINETUNE_CHECKPOINT_EVERY == 0 or finished:
            save_finetune_checkpoint(step + 1)
    model.save(ctx.exp_dir / FINETUNED_SEGMENTER)
    change = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in zip(model.trainable_parameters(), initial)))
    scale = torch.sqrt(sum((q**2).sum() for q in initial))
    ctx.phase("evaluating")
    after = dice_per_image()
    gain = delta_interval([after - before])
    split, _ = reported_split(config.dataset)
    summary = {
        "split": split,
        "images": len(report),
        "dice_before": round(float(before.mean()), 4),
        "dice_after": round(float(after.mean()), 4),
        "dice_gain": round(gain.mean, 4),
        "dice_gain_interval": [round(gain.low, 4), round(gain.high, 4)],
        "relative_weight_change": float(change / scale),
        **{k: round(v, 4) for k, v in last.items()},
    }
    ctx.metrics(progress.step, {"finetune/dice_before": float(before.mean()), "finetune/dice_after": float(after.mean())})
    return summary


def finetune_loss(model, reward_net: RewardNet, batch: Sequence[Sample], template: str,
                  consensus: dict[str, torch.Tensor], anchors: dict[str, torch.Tensor], size: int,
                  anchor_weight: float, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fine-tuning step's loss (minus the reward network's mean score of the soft
    masks, plus the anchor penalty) with its two parts. Nearly all of a step's cost is
    the segmenter's forward and backward pass (`python -m benchmarks backend`)."""
    prompts = [render_prompt(template, s) for s in batch]
    logits = model.mask_logits([s.image for s in batch], prompts)
    soft = torch.sigmoid(logits).unsqueeze(1)
    images = resize_maps(images_to_tensor([s.image for s in batch], device), size)
    agreed = resize_maps(torch.stack([consensus[s.id] for s in batch]).to(device), size)
    reward = reward_net(images, resize_maps(soft, size), agreed, prompts).mean()
    anchor = F.binary_cross_entropy_with_logits(logits, torch.stack([anchors[s.id] for s in batch]))
    return -reward + anchor_weight * anchor, reward, anchor


def _dice_per_image(model, samples: Sequence[Sample], template: str) -> np.ndarray:
    predictions = model.segment([s.image for s in samples], [render_prompt(template, s) for s in samples])
    return np.array([dice(p.mask, s.mask) for p, s in zip(predictions, samples)], np.float64)


#: What every checkpoint holds, and what each stage adds.
_CHECKPOINT_KEYS = ("stage", "epoch", "step", "best", "reward_net", "optimiser")
_STAGE_KEYS = {"reward": (), "finetune": ("finetune_step", "segmenter")}


def save_checkpoint(ctx: WorkerContext, state: dict, step: int) -> None:
    """The new checkpoint as `last.pt`, the one it replaces kept as `previous.pt`."""
    path = ctx.exp_dir / REWARD_NET_CHECKPOINT
    keep_previous(path, ctx.exp_dir / REWARD_NET_PREVIOUS)
    save_atomic(state, path)
    ctx.checkpoint_saved(path, step)


def read_checkpoint(path: Path, width: int) -> dict:
    """A reward-net checkpoint, tensors only (`weights_only`), checked to be one: its
    keys, its stage, its network of this config's width."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise DamagedFile("not a reward-net checkpoint (not a dict)")
    stage = state.get("stage")
    if stage not in _STAGE_KEYS:
        raise DamagedFile(f"not a reward-net checkpoint (stage {stage!r})")
    absent = [key for key in (*_CHECKPOINT_KEYS, *_STAGE_KEYS[stage]) if key not in state]
    if absent:
        raise DamagedFile(f"not a whole reward-net checkpoint (no {', '.join(absent)})")
    for key in ("epoch", "step", *(("finetune_step",) if stage == "finetune" else ())):
        if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
            raise DamagedFile(f"its {key} is not a count ({state[key]!r})")
    if not isinstance(state["best"], dict):
        raise DamagedFile("its best record is not a dict")
    RewardNet(width=width).load_state_dict(state["reward_net"]["model"])
    return state


def _resume_point(ctx: WorkerContext, width: int) -> dict | None:
    """The newest loadable of `last.pt` and `previous.pt` (or the checkpoint asked for);
    None to start afresh."""
    in_folder = [path for path in (ctx.exp_dir / REWARD_NET_CHECKPOINT, ctx.exp_dir / REWARD_NET_PREVIOUS)
                 if path.is_file()]
    found = newest_loadable(ctx.exp_dir, ctx.resume_from, in_folder, lambda path: read_checkpoint(path, width),
                            ctx.notice)
    return found[1] if found is not None else None


def _best_reward_net(ctx: WorkerContext, net: RewardNet, device: str, resume: dict | None) -> RewardNet:
    """The network of the best epoch; if its file will not load, the one in hand (the
    checkpoint's, which is the best one, in the fine-tuning stage; else the last
    epoch's), said in one line."""
    path = ctx.exp_dir / BEST_REWARD_NET
    try:
        return load_reward_net(path, device)
    except Exception as err:  # noqa: BLE001 - a damaged file is said, the network in hand used
        source = "the checkpoint's" if resume is not None and resume["stage"] == "finetune" else "the last epoch's"
        ctx.notice(f"skipped {path}: {damage_reason(err)}; fine-tuning with {source} reward network")
        return net.eval()


def _tensorboard(exp_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(exp_dir / TENSORBOARD_DIR))
