"""Experiment 3 on the Sa2VA backend, end to end in one worker context, with the stand-in
loaded through the loader seam: one model per worker, fine-tuning that moves the
trained weights, and the evaluation rows on the same loaded model."""

import torch

from experiments.backends import make_cached_segmenter
from experiments.backends.sa2va_families import LOADER_ENV
from experiments.datasets import load_split
from experiments.harness import ListSink, WorkerContext
from experiments.reward.rows import evaluation_rows
from experiments.reward_net import run
from sa2va_contract.layout import FINETUNED_SEGMENTER
from sa2va_standin import LOADS, write_checkpoint
from sa2va_contract.config import load_config

from conftest import QUICK_CONFIG


def test_one_loaded_sa2va_serves_masks_fine_tuning_and_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv(LOADER_ENV, "sa2va_standin:load_standin")
    checkpoint = write_checkpoint(tmp_path / "ckpt", "internvl3")
    config = load_config(QUICK_CONFIG, [
        f"run.logs_dir={tmp_path / 'logs'}", "dataset.limit=6", "backend.kind=sa2va", f"backend.model_path={checkpoint}",
        "reward_net.device=cpu", "reward_net.reward={samples: 4, epochs: 1, batch_size: 64, perturbations_per_mask: 0}",
        "reward_net.finetune={steps: 3, batch_size: 2, learning_rate: 1.0e-4}",
    ])
    loads_before = len(LOADS)
    ctx = WorkerContext("reward_net", config, config.reward_net, tmp_path / "run" / "reward_net", sink=ListSink())
    summary = run(ctx)
    assert len(LOADS) - loads_before == 1  # the cached segmenter and the trainable share it
    assert summary["finetune"]["relative_weight_change"] > 0
    assert "peak_gpu_memory_gib" not in summary  # no CUDA here: nothing to record

    tuned = torch.load(ctx.exp_dir / FINETUNED_SEGMENTER, weights_only=True)
    assert tuned["format"] == "sa2va-mask-decoder-v2"
    assert all(v.dtype == torch.float32 for v in tuned["state"].values())
    assert any(k.startswith("grounding_encoder.sam2_model.sam_mask_decoder.") for k in tuned["state"])

    segmenter = make_cached_segmenter(config)
    rows, missing = evaluation_rows(config, ctx.exp_dir, load_split(config.dataset, "val")[:3], segmenter)
    assert [r.name for r in rows] == ["finetuned", "reward_rerank"] and missing == {}
    assert len(LOADS) - loads_before == 2  # evaluation: one more process's worth, again one model
