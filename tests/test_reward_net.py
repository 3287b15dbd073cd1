"""Experiment 3 end to end on the embedded default, small."""

import hashlib
import itertools
import shutil

import numpy as np
import pytest
import torch

from experiments.backends import make_cached_segmenter
from experiments.backends.base import EMBEDDED_WEIGHTS
from experiments.datasets import load_split
from experiments.harness import ListSink, WorkerContext, run_experiment
from experiments.reward.network import load_reward_net
from experiments.reward.quality import PERTURBATIONS, pearson, perturb, pick_best_accuracy, spearman
from experiments.reward.rows import evaluation_rows
from experiments.reward_net import image_sets, run
from sa2va_contract.layout import BEST_REWARD_NET, FINAL_REWARD_NET, FINETUNED_SEGMENTER
from sa2va_contract.layout import REWARD_NET_CHECKPOINT as CHECKPOINT
from sa2va_contract.config import load_config
from sa2va_contract.events import Checkpoint, Failed, Metrics, Progress

from conftest import QUICK_CONFIG


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rank_statistics_against_hand_values():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert spearman(a, a**3) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties share their mean rank: ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), a) == pytest.approx(0.9486832980505138)
    groups = np.array([0, 0, 0, 1, 1])
    truth = np.array([0.2, 0.9, 0.5, 0.7, 0.1])
    assert pick_best_accuracy(np.array([0.1, 0.8, 0.3, 0.2, 0.6]), truth, groups) == 0.5


def test_perturbations_make_worse_masks():
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    rng = np.random.default_rng(0)
    for kind in PERTURBATIONS:
        changed = perturb(mask, kind, rng)
        assert changed.shape == mask.shape and changed.dtype == bool
        assert (changed != mask).any(), kind


@pytest.fixture
def small_run(tmp_path):
    weights = tmp_path / "start.pt"
    shutil.copy(EMBEDDED_WEIGHTS, weights)
    config = load_config(
        QUICK_CONFIG,
        [f"backend.weights={weights}", f"backend.cache_dir={tmp_path / 'cache'}",
         "reward_net.reward.samples=12", "reward_net.reward.epochs=3", "reward_net.finetune.steps=10"],
    )
    return config, weights


def test_reward_net_trains_reports_and_fine_tunes(tmp_path, small_run):
    config, weights = small_run
    before = sha(weights)
    sink = ListSink()
    ctx = WorkerContext("reward_net", config, config.reward_net, tmp_path / "reward_net", sink=sink)
    summary = run(ctx)

    epochs = [e for e in sink.of_type(Metrics) if "reward/spearman" in e.values]
    assert len(epochs) == 3
    for key in ("reward/train_loss", "reward/val_loss", "reward/val_mae", "reward/pearson", "reward/pick_best_acc"):
        assert key in epochs[-1].values
    progress = sink.of_type(Progress)
    assert progress[-1].timesteps == progress[-1].total
    assert sink.of_type(Checkpoint)

    exp_dir = tmp_path / "reward_net"
    for name in (BEST_REWARD_NET, FINAL_REWARD_NET):
        net = load_reward_net(exp_dir / name)  # weights_only=True inside
        score = net(torch.zeros(2, 3, 64, 64), torch.zeros(2, 1, 64, 64), torch.zeros(2, 1, 64, 64), ["the rings"] * 2)
        assert score.shape == (2,) and ((0 <= score) & (score <= 1)).all()
    assert list((exp_dir / "tensorboard").glob("events.out.tfevents.*"))

    # Fine-tuning changed the segmenter's weights and left the start checkpoint intact.
    assert sha(weights) == before
    tuned = exp_dir / FINETUNED_SEGMENTER
    assert tuned.exists() and sha(tuned) != before
    start_state = torch.load(weights, weights_only=True)
    tuned_state = torch.load(tuned, weights_only=True)
    start_params = start_state["state"]
    tuned_params = tuned_state["state"]
    changed = [k for k in start_params if not torch.equal(start_params[k], tuned_params[k])]
    assert changed, "fine-tuning left every weight as it was"
    assert summary["finetune"]["relative_weight_change"] > 0
    tuning = summary["finetune"]
    assert tuning["split"] == "test" and tuning["images"] == len(load_split(config.dataset, "test"))
    assert 0.0 <= tuning["dice_before"] <= 1.0 and 0.0 <= tuning["dice_after"] <= 1.0
    low, high = tuning["dice_gain_interval"]
    assert low <= tuning["dice_gain"] <= high
    assert tuning["dice_gain"] == pytest.approx(tuning["dice_after"] - tuning["dice_before"], abs=2e-4)

    # Its two rows of the evaluation table, on the table's own images.
    samples = load_split(config.dataset, "val")[:6]
    rows, missing = evaluation_rows(config, exp_dir, samples, make_cached_segmenter(config))
    assert missing == {}
    assert [r.name for r in rows] == ["finetuned", "reward_rerank"]
    for row in rows:
        assert row.sample_ids == [s.id for s in samples]
        assert all(0.0 <= v <= 1.0 for v in row.values["dice"])
    assert rows[0].source == str(tuned)


def test_each_image_has_one_job_and_no_image_has_two():
    """The reward network's images, the ones that choose its epoch, the ones
    fine-tuning draws from and the reported ones are disjoint, asserted by id."""
    config = load_config(QUICK_CONFIG, ["reward_net.reward.samples=10", "reward_net.finetune.samples=8"])
    sets = {job: [s.id for s in samples] for job, samples in image_sets(config, config.reward_net).items()}
    assert [len(sets[job]) for job in ("reward", "choice", "finetune", "report")] == [10, 8, 8, 24]
    for a, b in itertools.combinations(sets, 2):
        assert not set(sets[a]) & set(sets[b]), f"{a} and {b} share images"
    assert all(i.startswith("builtin-train-") for i in sets["reward"] + sets["finetune"])
    assert all(i.startswith("builtin-val-") for i in sets["choice"])
    assert all(i.startswith("builtin-test-") for i in sets["report"])


def test_without_a_test_split_the_epoch_is_chosen_on_held_out_reward_images(tmp_path):
    from test_folder_dataset import make_split

    make_split(tmp_path, "train", [f"t{i}" for i in range(12)])
    make_split(tmp_path, "val", [f"v{i}" for i in range(4)])
    config = load_config(None, ["dataset.kind=folder", f"dataset.root={tmp_path}", "reward_net.reward.samples=8"])
    sets = {job: [s.id for s in samples] for job, samples in image_sets(config, config.reward_net).items()}
    assert [len(sets[job]) for job in ("reward", "choice", "finetune", "report")] == [6, 2, 4, 4]
    for a, b in itertools.combinations(sets, 2):
        assert not set(sets[a]) & set(sets[b]), f"{a} and {b} share images"
    greedy = load_config(None, ["dataset.kind=folder", f"dataset.root={tmp_path}", "reward_net.reward.samples=12"])
    with pytest.raises(ValueError, match="leaves no train image for fine-tuning"):
        image_sets(greedy, greedy.reward_net)


def test_injected_oom_is_a_real_torch_oom_and_the_checkpoint_survives(tmp_path, small_run):
    config, _ = small_run
    config = load_config(QUICK_CONFIG, [f"backend.weights={config.backend.weights}",
                                        f"backend.cache_dir={config.backend.cache_dir}",
                                        "reward_net.reward.samples=12", "reward_net.reward.epochs=3",
                                        "reward_net.faults.oom_at_step=150"])
    ctx = WorkerContext("reward_net", config, config.reward_net, tmp_path / "reward_net")
    with pytest.raises(torch.OutOfMemoryError, match="step 150"):
        run(ctx)
    # The worker's harness reports it as an out-of-memory failure, with step and batch size.
    ctx = WorkerContext("reward_net", config, config.reward_net, tmp_path / "again")
    outcome = run_experiment(ctx, "experiments.reward_net:run")
    assert isinstance(outcome, Failed) and outcome.kind == "oom"
    assert outcome.step == 150 and outcome.batch_size == config.reward_net.finetune.batch_size
    assert "out of memory" in outcome.message
    state = torch.load(tmp_path / "again" / CHECKPOINT, weights_only=True)
    assert state["stage"] == "reward" and 0 < state["step"] < 150


def test_a_batch_in_parts_gives_the_same_bits_on_one_thread_or_two_and_the_whole_batch_gradient():
    """Fine-tuning's step on a CPU: the embedded model's batch in parts, side by side on
    two threads, is the same computation as one after the other (so a run's result does
    not depend on the cores it had), and the gradient of the whole batch's loss."""
    from experiments.backends.embedded import load_embedded
    from experiments.datasets import render_prompt
    from sa2va_contract.config import DatasetConfig
    from experiments.reward.network import RewardNet, consensus_map
    from experiments.reward.parted import CPU_PARTS, BatchParts, part_rows
    from experiments.reward_net import finetune_loss

    assert [(r.start, r.stop) for r in part_rows(5, 2)] == [(0, 3), (3, 5)]
    assert [(r.start, r.stop) for r in part_rows(1, 2)] == [(0, 1)]
    torch.manual_seed(0)
    batch = load_split(DatasetConfig(limit=5, image_size=64), "train")
    template = "the {target}"
    reward_net = RewardNet(width=8).eval().requires_grad_(False)
    consensus = {s.id: consensus_map([s.mask]) for s in batch}
    model = load_embedded()
    with torch.no_grad():
        anchors = {s.id: torch.sigmoid(model.mask_logits([s.image], [render_prompt(template, s)]))[0] for s in batch}

    def gradients(parts: int, threads: int) -> tuple[list[float], list[torch.Tensor]]:
        model.net.zero_grad(set_to_none=True)
        parted = BatchParts(model.trainable_parameters(), parts, threads)
        try:
            values = parted.gradients(lambda rows: finetune_loss(model, reward_net, batch[rows], template, consensus,
                                                               anchors, 32, 1.0, "cpu"), len(batch))
        finally:
            parted.close()
        return values, [p.grad.clone() for p in model.trainable_parameters()]

    one_thread, two_threads, whole = gradients(CPU_PARTS, 1), gradients(CPU_PARTS, 2), gradients(1, 1)
    assert one_thread[0] == two_threads[0]
    assert all(torch.equal(a, b) for a, b in zip(one_thread[1], two_threads[1]))
    assert one_thread[0] == pytest.approx(whole[0], rel=1e-5)
    for parted, full in zip(one_thread[1], whole[1]):
        torch.testing.assert_close(parted, full, rtol=1e-4, atol=1e-7)
    assert any(g.abs().max() > 0 for g in whole[1])
