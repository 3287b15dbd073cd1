"""Files read back from a run folder or the mask cache, damaged or hostile, for real:
truncated checkpoints, checkpoints newer than the recorded one, a recorded path from
another working directory, planted pickles that would write a marker file, cache
entries cut short or of the wrong shape. Small real runs (SMALL_RUN, the session's
mask cache)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from experiments import prompt_rl, reward_net
from experiments.backends import make_cached_segmenter
from experiments.backends.cache import ENTRY_SUFFIX, CachedSegmenter, _read_entry
from experiments.backends.embedded import load_embedded
from experiments.checkpoints import resolve_recorded
from experiments.datasets import load_split
from experiments.evaluate import evaluate_run
from experiments.harness import ListSink, WorkerContext, run_experiment
from experiments.reward.rows import evaluation_rows
from sa2va_contract.evaluation import load_evaluation
from sa2va_contract.config import load_config
from sa2va_contract.events import Failed, Notice, Progress, event_from_dict
from sa2va_contract.layout import (
    BEST_MODEL,
    BEST_RECORD,
    CHECKPOINT_DIR,
    EVALUATION_FILE,
    FINAL_MODEL,
    BEST_REWARD_NET,
    FINETUNED_SEGMENTER,
    PROGRESS_CSV,
    REWARD_NET_CHECKPOINT,
    REWARD_NET_PREVIOUS,
    ppo_checkpoint_name,
)

from sa2va_tui.text import describe

from conftest import QUICK_CONFIG, SMALL_RUN

PROMPT_ONLY = ("postprocess_rl.enabled=false", "reward_net.enabled=false")


class Payload:
    """Unpickled, it writes its marker file: what a hostile run folder would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the payload ran"))


def _config(cache, *overrides):
    return load_config(QUICK_CONFIG, [*SMALL_RUN, f"backend.cache_dir={cache}", *overrides])


def _context(config, kind, exp_dir, **kwargs):
    return WorkerContext(kind, config, config.experiments()[kind], exp_dir, sink=ListSink(), **kwargs)


def _notices(ctx) -> list[str]:
    return [e.message for e in ctx.sink.of_type(Notice)]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _plant_in_zip(path: Path, marker: Path, entry: str = "lr_schedule") -> None:
    """The SB3 zip at `path` with `entry` of its `data` replaced by a cloudpickled payload."""
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(files["data"])
    data[entry] = {":type:": "<class 'function'>",
                   ":serialized:": base64.b64encode(cloudpickle.dumps(Payload(marker))).decode()}
    files["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory, mask_cache):
    """A finished prompt_rl run: checkpoints at 64, 128, 192, 256, best and final models."""
    config = _config(mask_cache, *PROMPT_ONLY)
    exp_dir = tmp_path_factory.mktemp("prompt_run") / "prompt_rl"
    prompt_rl.run(_context(config, "prompt_rl", exp_dir))
    return config, exp_dir


@pytest.fixture
def prompt_copy(prompt_run, tmp_path):
    """The finished run's folder, copied, and a config that trains it 64 steps further."""
    config, exp_dir = prompt_run
    longer = config.model_copy(deep=True)
    longer.prompt_rl.total_timesteps = 320
    copy = tmp_path / "run" / "prompt_rl"
    shutil.copytree(exp_dir, copy)
    return longer, copy


def _checkpoint(exp_dir: Path, step: int) -> Path:
    return exp_dir / CHECKPOINT_DIR / ppo_checkpoint_name(step)


def test_resume_takes_the_newest_checkpoint_in_the_folder_not_the_recorded_one(prompt_copy):
    # As after a SIGKILLed supervisor: run.json knows ckpt 128, the worker saved 256 on its way out.
    config, exp_dir = prompt_copy
    ctx = _context(config, "prompt_rl", exp_dir, resume_from=_checkpoint(exp_dir, 128))
    summary = prompt_rl.run(ctx)
    assert ctx.sink.of_type(Progress)[0].timesteps == 256
    assert summary["resumed_from"] == str(_checkpoint(exp_dir, 256)) and summary["timesteps"] == 320
    assert _notices(ctx) == ["resuming from ckpt_000000256.zip, newer than the recorded ckpt_000000128.zip"]


def test_a_truncated_newest_checkpoint_is_skipped_for_the_next_older(prompt_copy):
    config, exp_dir = prompt_copy
    _truncate(_checkpoint(exp_dir, 256))
    (exp_dir / BEST_RECORD).write_text('{"score": 0.1, "st')  # torn too
    with (exp_dir / PROGRESS_CSV).open("a") as handle:
        handle.write("0.5,garbage,\x00\n")
    ctx = _context(config, "prompt_rl", exp_dir, resume_from=_checkpoint(exp_dir, 256))
    summary = prompt_rl.run(ctx)
    assert ctx.sink.of_type(Progress)[0].timesteps == 192 and summary["timesteps"] == 320
    notices = _notices(ctx)
    assert notices[0] == (f"skipped checkpoint {_checkpoint(exp_dir, 256)}: truncated or not a zip "
                          "(File is not a zip file)")
    assert notices[1] == f"resuming from {_checkpoint(exp_dir, 192)}"
    assert notices[2].startswith(f"ignored {exp_dir / BEST_RECORD}: JSONDecodeError")
    assert "garbage" not in (exp_dir / PROGRESS_CSV).read_text()


def test_a_notice_is_one_line_of_the_views_and_of_events_jsonl():
    notice = Notice("prompt_rl", message="skipped checkpoint [x]/ckpt_000000256.zip: truncated or not a zip")
    assert event_from_dict(json.loads(notice.to_json())) == notice
    assert describe(notice) == ("skipped checkpoint \\[x]/ckpt_000000256.zip: truncated or not a zip", "yellow")


def test_no_loadable_checkpoint_fails_in_one_line_and_deletes_nothing(prompt_copy):
    config, exp_dir = prompt_copy
    checkpoints = sorted((exp_dir / CHECKPOINT_DIR).iterdir())
    for path in checkpoints:
        _truncate(path, 0.3)
    sizes = {path: path.stat().st_size for path in checkpoints}
    ctx = _context(config, "prompt_rl", exp_dir)
    outcome = run_experiment(ctx, "experiments.prompt_rl:run")
    assert isinstance(outcome, Failed) and outcome.kind == "startup" and outcome.log_tail == []
    assert outcome.message.startswith(f"no checkpoint in {exp_dir} loads: ckpt_000000256.zip: truncated or not a zip")
    assert "\n" not in outcome.message and outcome.message.count("truncated or not a zip") == 4
    assert {path: path.stat().st_size for path in checkpoints} == sizes


def test_a_recorded_path_from_another_working_directory_is_found_in_the_run_folder(prompt_copy, tmp_path):
    config, exp_dir = prompt_copy
    run_dir = exp_dir.parent
    wanted = _checkpoint(exp_dir, 256)
    # Relative to the cwd it was recorded from, relative to the run folder, absolute.
    for recorded in (Path("elsewhere/logs") / run_dir.name / "prompt_rl" / CHECKPOINT_DIR / wanted.name,
                     Path("prompt_rl") / CHECKPOINT_DIR / wanted.name, wanted.resolve()):
        assert resolve_recorded(recorded, exp_dir).resolve() == wanted.resolve()
    ctx = _context(config, "prompt_rl", exp_dir, resume_from=Path("old/cwd/logs/x/prompt_rl/checkpoints") / wanted.name)
    prompt_rl.run(ctx)
    assert ctx.sink.of_type(Progress)[0].timesteps == 256 and _notices(ctx) == []


@pytest.mark.parametrize("kind", ["prompt_rl", "reward_net"])
def test_a_recorded_checkpoint_that_does_not_exist_fails_in_one_line(kind, mask_cache, tmp_path):
    config = _config(mask_cache)
    exp_dir = tmp_path / kind
    recorded = Path("logs/gone") / kind / CHECKPOINT_DIR / "ckpt_000000256.zip"
    outcome = run_experiment(_context(config, kind, exp_dir, resume_from=recorded), f"experiments.{kind}:run")
    assert isinstance(outcome, Failed) and outcome.log_tail == []
    assert outcome.message == (f"checkpoint {recorded} does not exist, and {exp_dir / CHECKPOINT_DIR} holds none "
                               "to resume from")
    assert not (exp_dir / CHECKPOINT_DIR).exists()  # no silent start at step 0


def test_a_planted_pickle_in_a_checkpoint_never_runs_on_resume(prompt_copy, tmp_path):
    config, exp_dir = prompt_copy
    marker = tmp_path / "marker"
    newest = _checkpoint(exp_dir, 256)
    probe = tmp_path / "probe.zip"
    shutil.copy(newest, probe)
    _plant_in_zip(probe, marker)
    PPO.load(probe, device="cpu")  # the plant is real: SB3's own loader runs it
    assert marker.read_text() == "the payload ran"
    marker.unlink()
    _plant_in_zip(newest, marker)
    _plant_in_zip(newest, marker, entry="policy_class")
    ctx = _context(config, "prompt_rl", exp_dir)
    summary = prompt_rl.run(ctx)
    assert not marker.exists() and summary["timesteps"] == 320
    assert ctx.sink.of_type(Progress)[0].timesteps == 256  # the checkpoint's weights and counters, nothing else


def test_a_pickle_planted_in_the_policy_weights_is_refused_and_skipped(prompt_copy, tmp_path):
    config, exp_dir = prompt_copy
    marker = tmp_path / "marker"
    newest = _checkpoint(exp_dir, 256)
    with zipfile.ZipFile(newest) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    buffer = io.BytesIO()
    torch.save({"weight": Payload(marker)}, buffer)
    files["policy.pth"] = buffer.getvalue()
    with zipfile.ZipFile(newest, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    ctx = _context(config, "prompt_rl", exp_dir)
    prompt_rl.run(ctx)
    assert not marker.exists()
    assert _notices(ctx)[0].startswith(f"skipped checkpoint {newest}: holds pickled objects other than tensors")
    assert ctx.sink.of_type(Progress)[0].timesteps == 192


def test_evaluate_runs_no_planted_pickle_and_skips_a_damaged_best_model(prompt_copy, mask_cache, tmp_path):
    config, exp_dir = prompt_copy
    marker = tmp_path / "marker"
    _truncate(exp_dir / BEST_MODEL)
    _plant_in_zip(exp_dir / FINAL_MODEL, marker)
    table = evaluate_run(config, exp_dir.parent)
    assert not marker.exists()
    assert table.row("prompt_policy").source == str(exp_dir / FINAL_MODEL)
    # Neither loads: the row is missing with both reasons, the evaluation still whole.
    _truncate(exp_dir / FINAL_MODEL)
    table = evaluate_run(config, exp_dir.parent)
    assert not table.has("prompt_policy") and table.has("baseline")
    assert table.missing["prompt_rl"] == (f"{BEST_MODEL}: truncated or not a zip (File is not a zip file); "
                                          f"{FINAL_MODEL}: truncated or not a zip (File is not a zip file)")


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, mask_cache):
    """A finished small reward_net run: last.pt and previous.pt beside it."""
    config = _config(mask_cache, "reward_net.reward={samples: 4, epochs: 2, batch_size: 64, perturbations_per_mask: 0}")
    exp_dir = tmp_path_factory.mktemp("reward_run") / "reward_net"
    reward_net.run(_context(config, "reward_net", exp_dir))
    return config, exp_dir


def test_reward_net_keeps_the_previous_checkpoint_and_falls_back_to_it(reward_run, tmp_path):
    config, original = reward_run
    exp_dir = tmp_path / "reward_net"
    shutil.copytree(original, exp_dir)
    last, previous = exp_dir / REWARD_NET_CHECKPOINT, exp_dir / REWARD_NET_PREVIOUS
    kept = torch.load(previous, weights_only=True)
    assert torch.load(last, weights_only=True)["step"] > kept["step"]
    _truncate(last)
    longer = config.model_copy(deep=True)
    longer.reward_net.finetune.steps = 4
    ctx = _context(longer, "reward_net", exp_dir, resume_from=Path("logs/elsewhere/reward_net") / REWARD_NET_CHECKPOINT)
    reward_net.run(ctx)
    assert _notices(ctx)[:2] == [f"skipped checkpoint {last}: truncated (not a whole PyTorch file)",
                                 f"resuming from {previous}"]
    assert ctx.sink.of_type(Progress)[0].timesteps == kept["step"] + 1
    assert torch.load(last, weights_only=True)["finetune_step"] == 4


def test_a_planted_pickle_in_the_reward_checkpoint_is_refused(reward_run, tmp_path):
    config, original = reward_run
    exp_dir = tmp_path / "reward_net"
    shutil.copytree(original, exp_dir)
    marker = tmp_path / "marker"
    last = exp_dir / REWARD_NET_CHECKPOINT
    state = torch.load(last, weights_only=True)
    torch.save({**state, "best": Payload(marker)}, last)
    ctx = _context(config, "reward_net", exp_dir)
    reward_net.run(ctx)
    assert not marker.exists()
    assert _notices(ctx)[0].startswith(f"skipped checkpoint {last}: holds pickled objects other than tensors")


def test_damaged_reward_net_files_cost_their_rows_and_run_no_pickle(reward_run, tmp_path):
    config, original = reward_run
    exp_dir = tmp_path / "reward_net"
    shutil.copytree(original, exp_dir)
    marker = tmp_path / "marker"
    _truncate(exp_dir / FINETUNED_SEGMENTER)
    torch.save({"width": 16, "text_buckets": 1024, "model": Payload(marker)}, exp_dir / BEST_REWARD_NET)
    samples = load_split(config.dataset, "test")[:2]
    rows, missing = evaluation_rows(config, exp_dir, samples, make_cached_segmenter(config))
    assert rows == [] and not marker.exists()
    assert missing["finetuned"] == f"{exp_dir / FINETUNED_SEGMENTER}: truncated (not a whole PyTorch file)"
    assert missing["reward_rerank"].startswith(f"{exp_dir / BEST_REWARD_NET}: holds pickled objects other than tensors")


@pytest.mark.parametrize("text", ["null", "[1, 2]", '{"rows": 5}', '{"split": "test", "sample_ids": [], "ro'])
def test_an_evaluation_file_of_another_shape_reads_as_none(tmp_path, text):
    (tmp_path / EVALUATION_FILE).write_text(text)
    assert load_evaluation(tmp_path) is None


def test_checkpoints_and_cache_files_honour_the_umask(reward_run, mask_cache):
    _, exp_dir = reward_run
    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    cache_files = list(Path(mask_cache).rglob(f"*{ENTRY_SUFFIX}"))[:5]
    for path in [exp_dir / REWARD_NET_CHECKPOINT, exp_dir / REWARD_NET_PREVIOUS, *cache_files]:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_damaged_cache_entries_are_deleted_recomputed_and_counted(tmp_path, mask_cache):
    config = _config(tmp_path / "cache")
    samples = load_split(config.dataset, "val")[:4]
    template = config.backend.prompts[0]
    model = load_embedded()
    first = CachedSegmenter(model, tmp_path / "cache")
    truth = [first.predict(s, template) for s in samples]
    paths = sorted((tmp_path / "cache").rglob(f"*{ENTRY_SUFFIX}"))
    assert len(paths) == 4
    marker = tmp_path / "marker"
    header = paths[3].read_bytes()[:12]
    _truncate(paths[0])                                       # a full disk or a copy cut short
    paths[1].write_bytes(b"no mask at all")
    with paths[2].open("wb") as handle:                       # a planted pickle
        np.savez(handle, bits=np.array([Payload(marker)], dtype=object), shape=np.array([4, 4]))
    paths[3].write_bytes(header + b"\0" * 3)                  # bytes that are no mask of the size it says
    second = CachedSegmenter(model, tmp_path / "cache")
    again = [second.predict(s, template) for s in samples]
    assert (second.damaged, second.model_calls, second.disk_hits) == (4, 4, 0)
    assert not marker.exists()
    for old, new in zip(truth, again):
        np.testing.assert_array_equal(old.mask, new.mask)
    third = CachedSegmenter(model, tmp_path / "cache")
    [third.predict(s, template) for s in samples]
    assert (third.damaged, third.model_calls, third.disk_hits) == (0, 0, 4)


def test_a_damaged_cache_entry_is_counted_in_the_run_summary(prompt_run, tmp_path, mask_cache):
    config, _ = prompt_run
    cache = tmp_path / "cache"
    shutil.copytree(mask_cache, cache)
    # Which file holds the first train image's default-prompt mask: the one a fresh cache makes.
    fresh = tmp_path / "fresh"
    sample = load_split(config.dataset, "train")[0]
    CachedSegmenter(load_embedded(), fresh).predict(sample, config.backend.prompts[config.backend.default_prompt])
    (entry,) = [path.relative_to(fresh) for path in fresh.rglob(f"*{ENTRY_SUFFIX}")]
    _truncate(cache / entry)
    config = config.model_copy(deep=True)
    config.backend.cache_dir = cache
    summary = prompt_rl.run(_context(config, "prompt_rl", tmp_path / "prompt_rl"))
    assert summary["cache_damaged"] == 1 and summary["model_calls"] == 1
    assert _read_entry(cache / entry)[0].size > 0  # computed again in its place
