"""Short real PPO runs of both experiments (quick config: 256 timesteps): what they
write, what they report, how they resume and stop, and what they ask of the model."""

from __future__ import annotations

import csv
import importlib

import pytest
from stable_baselines3 import PPO

from experiments.harness import ListSink, StopRequested, WorkerContext
from experiments.ppo_model import latest_checkpoint
from sa2va_contract.config import load_config
from sa2va_contract.events import Checkpoint, Metrics, Phase, Progress

from conftest import QUICK_CONFIG

KINDS = ["prompt_rl", "postprocess_rl"]


def _config(cache_dir, *overrides):
    return load_config(QUICK_CONFIG, [f"backend.cache_dir={cache_dir}", *overrides])


def _run(config, kind, exp_dir, **ctx_args):
    sink = ListSink()
    ctx = WorkerContext(kind, config, config.experiments()[kind], exp_dir, sink=sink, **ctx_args)
    summary = importlib.import_module(f"experiments.{kind}").run(ctx)
    return summary, sink


@pytest.fixture(scope="module", params=KINDS)
def trained(request, tmp_path_factory):
    """One finished run per experiment, on a fresh mask cache."""
    kind = request.param
    cache = tmp_path_factory.mktemp(f"cache_{kind}")
    exp_dir = tmp_path_factory.mktemp("run") / kind
    config = _config(cache)
    summary, sink = _run(config, kind, exp_dir)
    return kind, config, exp_dir, summary, sink


def _timesteps(csv_path):
    with csv_path.open() as handle:
        return [int(float(row["time/total_timesteps"])) for row in csv.DictReader(handle) if row["time/total_timesteps"]]


def test_a_run_writes_its_log_table_csv_tensorboard_checkpoints_and_models(trained):
    kind, config, exp_dir, summary, _ = trained
    log = (exp_dir / "train.log").read_text()
    assert "| rollout/" in log and "ep_rew_mean" in log and "| train/" in log and "| eval/" in log
    assert _timesteps(exp_dir / "progress.csv")[-1] == 256
    assert list((exp_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (exp_dir / "checkpoints").glob("*.zip")) == ["ckpt_000000128.zip", "ckpt_000000256.zip"]
    for name in ("best_model.zip", "final_model.zip"):
        assert PPO.load(exp_dir / name).num_timesteps > 0
    assert not list(exp_dir.rglob(".*.tmp"))  # every write completed by rename
    assert summary["timesteps"] == 256
    assert summary["val_policy_dice"] == pytest.approx(summary["val_baseline_dice"] + summary["val_dice_gain"])


def test_a_run_reports_phases_progress_checkpoints_and_every_sb3_metric(trained):
    kind, config, exp_dir, _, sink = trained
    phases = [e.phase for e in sink.of_type(Phase)]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == [
        "loading_model", "caching_masks", "training", "evaluating"]
    caching = [e for e in sink.of_type(Phase) if e.phase == "caching_masks"]
    assert caching[-1].done == caching[-1].total > 0
    assert sink.of_type(Progress)[-1].timesteps == 256
    assert [e.step for e in sink.of_type(Checkpoint)] == [128, 256]
    keys = set().union(*(e.values for e in sink.of_type(Metrics)))
    for key in ("rollout/ep_rew_mean", "time/fps", "train/value_loss", "eval/dice_gain", "eval/mean_dice"):
        assert key in keys


def test_the_cache_calls_the_model_once_per_distinct_image_and_prompt(trained):
    kind, config, _, summary, _ = trained
    samples = 2 * config.dataset.limit  # train and val
    prompts = len(config.backend.prompts) if kind == "prompt_rl" else 1
    assert summary["model_calls"] == samples * prompts
    assert summary["model_calls_in_training"] == 0


def test_a_resumed_run_continues_its_timestep_count(trained, tmp_path):
    kind, config, exp_dir, _, _ = trained
    longer = config.model_copy(deep=True)
    getattr(longer, kind).total_timesteps = 384
    resume_dir = tmp_path / kind
    import shutil

    shutil.copytree(exp_dir, resume_dir)
    checkpoint = resume_dir / "checkpoints" / "ckpt_000000256.zip"
    summary, sink = _run(longer, kind, resume_dir, resume_from=checkpoint, batch_size_override=16)
    assert summary["resumed_from"] == str(checkpoint)
    assert summary["model_calls"] == 0  # every mask came from the disk cache
    progress = [e.timesteps for e in sink.of_type(Progress)]
    assert progress[0] == 256 and progress[-1] == 384
    assert min(e.step for e in sink.of_type(Metrics)) > 256
    steps = _timesteps(resume_dir / "progress.csv")
    assert steps == sorted(steps) and steps[-1] == 384 and 256 in steps
    assert len(list((resume_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the same TensorBoard run
    assert "resumed from" in (resume_dir / "train.log").read_text()
    assert latest_checkpoint(resume_dir).name == "ckpt_000000384.zip"
    assert PPO.load(resume_dir / "final_model.zip").batch_size == 16


def test_stop_saves_a_checkpoint_then_stops(trained, tmp_path):
    kind, config, _, _, _ = trained

    class StopAtFirstCheckpoint(ListSink):
        def emit(self, event):
            super().emit(event)
            if isinstance(event, Checkpoint):
                ctx.control.stop("test")

    sink = StopAtFirstCheckpoint()
    ctx = WorkerContext(kind, config, config.experiments()[kind], tmp_path / kind, sink=sink)
    with pytest.raises(StopRequested):
        importlib.import_module(f"experiments.{kind}").run(ctx)
    saved = [e.step for e in sink.of_type(Checkpoint)]
    assert saved[0] == 128 and saved[-1] > 128
    assert PPO.load(latest_checkpoint(tmp_path / kind)).num_timesteps == saved[-1]
