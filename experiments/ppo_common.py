"""PPO machinery shared by the prompt-choice and post-processing experiments.

One place builds the PPO from the config, the vectorised environments, the logger
(SB3's stdout table into `train.log`, `progress.csv`, TensorBoard, and our own output
format that turns every metric dict into an event), and the callback that reports
progress, obeys pause and stop, writes checkpoints and keeps the best model by its
score on the val split. An experiment only says how to make its environments and
how to score a policy (`PPOTask`).

Files in the experiment folder:
    train.log              SB3's stdout table, appended across restarts
    progress.csv           one row per PPO iteration, rows past a resumed checkpoint dropped
    tensorboard/           one TensorBoard run, continued on resume
    checkpoints/ckpt_<timesteps>.zip
    best_model.zip         best val score so far (best.json says which step and score)
    final_model.zip

Every zip is built, saved and read back by `experiments/ppo_model.py`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import (
    CSVOutputFormat,
    HumanOutputFormat,
    KVWriter,
    Logger,
    TensorBoardOutputFormat,
)
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from experiments.harness import StopRequested, WorkerContext
from experiments.ppo_model import build_ppo, load_policy, load_ppo, read_best_record, resume_point, save_model_atomically
from sa2va_contract.files import atomic_write_text
from sa2va_contract.layout import (
    BEST_MODEL,
    BEST_RECORD,
    CHECKPOINT_DIR,
    FINAL_MODEL,
    LOG_FILE,
    PROGRESS_CSV,
    TENSORBOARD_DIR,
    ppo_checkpoint_name,
)
#: Seconds between progress events: a UI needs no more, and a queue must not flood.
PROGRESS_INTERVAL = 0.5
log = logging.getLogger(__name__)


# --- logger outputs -------------------------------------------------------------------


class EventOutputFormat(KVWriter):
    """Every metric dict SB3 writes (rollout/*, time/*, train/*, and our eval/*)
    becomes a Metrics event at the step SB3 gives, without scraping any text."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        self.ctx.metrics(step, key_values)

    def close(self) -> None:
        """Nothing to release: events go to the context's sink."""


class ResumableCSVOutputFormat(CSVOutputFormat):
    """`progress.csv` continued across restarts: an existing file keeps its header and
    its rows up to the resumed step (rows written after the checkpoint would repeat
    those steps), and new rows are appended. SB3's own format truncates the file."""

    def __init__(self, filename: str, resume_step: int | None = None) -> None:
        path = Path(filename)
        if resume_step is None or not path.is_file() or path.stat().st_size == 0:
            super().__init__(filename)
            return
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            rows = list(csv.reader(handle))
        header, body = (rows[0], rows[1:]) if rows else ([], [])
        column = header.index("time/total_timesteps") if "time/total_timesteps" in header else None
        if column is not None:
            body = [row for row in body if len(row) == len(header) and _row_before(row, column, resume_step)]
        kept = io.StringIO()
        csv.writer(kept, lineterminator="\n").writerows([header, *body])
        atomic_write_text(path, kept.getvalue())
        self.file = path.open("r+")
        self.file.seek(0, os.SEEK_END)
        self.keys = header
        self.separator = ","
        self.quotechar = '"'


def _row_before(row: list[str], column: int, resume_step: int) -> bool:
    """Whether a progress.csv row lies at or before the resumed step; a row whose step is
    not a number (a torn line) is dropped with the steps past the checkpoint."""
    if not row[column]:
        return True
    try:
        return float(row[column]) <= resume_step
    except ValueError:
        return False


class ResumableTensorBoardFormat(TensorBoardOutputFormat):
    """One TensorBoard run across restarts: the same folder, and `purge_step` makes
    TensorBoard drop what an earlier process wrote past the resumed checkpoint."""

    def __init__(self, folder: str, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder, purge_step=resume_step)
        self._is_closed = False


class TrainingLog:
    """The logger of one training process and the file it writes its table to."""

    def __init__(self, ctx: WorkerContext, resume_step: int | None = None) -> None:
        folder = ctx.exp_dir
        self.log_file, self._owns_file = _log_stream(folder / LOG_FILE)
        formats: list[KVWriter] = [
            HumanOutputFormat(self.log_file),
            ResumableCSVOutputFormat(str(folder / PROGRESS_CSV), resume_step),
            ResumableTensorBoardFormat(str(folder / TENSORBOARD_DIR), resume_step),
            EventOutputFormat(ctx),
        ]
        self.logger = Logger(folder=str(folder), output_formats=formats)

    def write_line(self, text: str) -> None:
        self.log_file.write(text.rstrip("\n") + "\n")
        self.log_file.flush()

    def close(self) -> None:
        self.logger.close()
        if self._owns_file:
            self.log_file.close()
        else:
            self.log_file.flush()


def _log_stream(path: Path) -> tuple[TextIO, bool]:
    """Where SB3's stdout table goes: stdout when a supervised worker's stdout already
    is the experiment's log (writing both would double every table), else the log file
    itself, appended so that a restart continues it. Returns (stream, owned)."""
    try:
        out, log = os.fstat(sys.stdout.fileno()), os.stat(path)
        if (out.st_dev, out.st_ino) == (log.st_dev, log.st_ino):
            return sys.stdout, False
    except (OSError, ValueError, AttributeError):  # no such log yet, or stdout is no file
        pass
    # Line-buffered: a reader tailing the log (`sa2va-tui watch`) sees whole lines.
    return path.open("a", buffering=1, encoding="utf-8"), True


# --- environments and the model ------------------------------------------------------


def make_vec_env(make_env: Callable[[], gym.Env], n_envs: int) -> VecEnv:
    """`n_envs` copies in this process, each behind a Monitor. In-process beats
    subprocesses here: a step costs microseconds to a few hundred, far less than
    the pickling a subprocess round trip would add."""
    return DummyVecEnv([lambda: Monitor(make_env()) for _ in range(n_envs)])


# --- scoring a policy ------------------------------------------------------------------


@dataclass
class EpisodeOutcome:
    """One deterministic episode on one sample: what it ended on."""

    sample: int
    info: dict
    answer: Any
    actions: list[int]


def run_episodes(model: PPO, envs: Sequence[gym.Env]) -> list[EpisodeOutcome]:
    """Play one deterministic episode per environment, env i on sample i, with the
    policy's predictions batched across environments. The answer is what each
    episode ends on, never the best state it passed through."""
    obs = np.stack([env.reset(options={"sample": i})[0] for i, env in enumerate(envs)])
    actions: list[list[int]] = [[] for _ in envs]
    infos: list[dict | None] = [None] * len(envs)
    active = list(range(len(envs)))
    while active:
        chosen, _ = model.predict(obs[active], deterministic=True)
        still = []
        for i, action in zip(active, np.asarray(chosen).reshape(-1)):
            actions[i].append(int(action))
            step_obs, _, terminated, truncated, info = envs[i].step(int(action))
            obs[i] = step_obs
            if terminated or truncated:
                infos[i] = info
            else:
                still.append(i)
        active = still
    return [EpisodeOutcome(i, infos[i] or {}, envs[i].unwrapped.answer(), actions[i]) for i in range(len(envs))]


@dataclass
class PPOTask:
    """What differs between the two PPO experiments.

    `make_env` makes one training environment; `score` plays the policy on the val
    split and returns named values, among them `score_key`, the higher the better,
    which picks the best model.
    """

    make_env: Callable[[], gym.Env]
    score: Callable[[PPO], dict[str, float]]
    score_key: str = "dice_gain"


# --- the callback ----------------------------------------------------------------------


class TrainingCallback(BaseCallback):
    """Progress, control, checkpoints and best-model selection, at every step.

    `ctx.step_point` runs once per vectorised step: it blocks while paused, raises
    `StopRequested` on stop and raises the injected out-of-memory error where the
    config asks for one.
    """

    def __init__(self, ctx: WorkerContext, task: PPOTask, total: int, best: dict | None = None) -> None:
        super().__init__(verbose=0)
        self.ctx = ctx
        self.task = task
        self.total = total
        self.every_checkpoint = ctx.experiment.checkpoint_every
        self.every_eval = ctx.experiment.eval_every
        self.best = best or {}
        self._next_checkpoint = 0
        self._next_eval = 0
        self._last_progress = 0.0

    def _on_training_start(self) -> None:
        start = self.model.num_timesteps
        self._next_checkpoint = (start // self.every_checkpoint + 1) * self.every_checkpoint
        self._next_eval = (start // self.every_eval + 1) * self.every_eval
        self.ctx.progress(start, self.total)

    def _on_step(self) -> bool:
        steps = self.model.num_timesteps
        self.ctx.step_point(steps)
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL:
            self._last_progress = now
            self.ctx.progress(steps, self.total)
        if steps >= self._next_eval:
            self._next_eval = (steps // self.every_eval + 1) * self.every_eval
            self.evaluate()
        if steps >= self._next_checkpoint:
            self._next_checkpoint = (steps // self.every_checkpoint + 1) * self.every_checkpoint
            self.save_checkpoint()
        return True

    def _on_training_end(self) -> None:
        self.ctx.progress(self.model.num_timesteps, self.total)

    def save_checkpoint(self) -> Path:
        steps = self.model.num_timesteps
        path = self.ctx.exp_dir / CHECKPOINT_DIR / ppo_checkpoint_name(steps)
        save_model_atomically(self.model, path)
        self.ctx.checkpoint_saved(path, steps)
        return path

    def evaluate(self) -> dict[str, float]:
        """Score the current policy on the val split; keep it if it is the best yet.
        The values go to the logger (all outputs, events included) under eval/."""
        values = self.task.score(self.model)
        for key, value in values.items():
            self.logger.record(f"eval/{key}", value)
        score = values[self.task.score_key]
        if not self.best or score > self.best["score"]:
            save_model_atomically(self.model, self.ctx.exp_dir / BEST_MODEL)
            self.best = {"score": score, "step": self.model.num_timesteps, **values}
            atomic_write_text(self.ctx.exp_dir / BEST_RECORD, json.dumps(self.best, indent=2))
        return values


# --- training --------------------------------------------------------------------------


@dataclass
class TrainingResult:
    model: PPO
    timesteps: int
    resumed_from: str | None
    best: dict
    seconds: float
    #: Environment steps per second of this process's training (None if it trained none).
    steps_per_second: float | None


def train(ctx: WorkerContext, task: PPOTask) -> TrainingResult:
    """Train to `total_timesteps`, resuming from `ctx.resume_from` or from the latest
    checkpoint in the experiment folder. On StopRequested a checkpoint is saved
    before the exception goes on."""
    import torch

    # Two cores shared by several workers: more torch threads only contend.
    torch.set_num_threads(1)
    cfg = ctx.experiment
    total = cfg.total_timesteps
    env = make_vec_env(task.make_env, cfg.ppo.n_envs)
    found = resume_point(ctx, lambda path: load_ppo(path, env, cfg.ppo, cfg.seed, ctx.device))
    if found is not None:
        # Built from the config: this attempt's batch size (smaller after an
        # out-of-memory failure), not the saved one.
        checkpoint, model = found
        resume_step = model.num_timesteps
    else:
        checkpoint, model = None, build_ppo(cfg.ppo, env, cfg.seed, ctx.device)
        resume_step = None
    log = TrainingLog(ctx, resume_step)
    model.set_logger(log.logger)
    best = read_best_record(ctx.exp_dir / BEST_RECORD, ctx.notice) if resume_step is not None else {}
    callback = TrainingCallback(ctx, task, total, best)
    # Building the model and its environments takes seconds: a pause or stop asked for
    # meanwhile is answered here, not only at the first training step.
    ctx.control_point()
    start_steps = model.num_timesteps
    if checkpoint is not None:
        log.write_line(f"resumed from {checkpoint} at {start_steps} timesteps, batch size {model.batch_size}")
    started = time.perf_counter()
    try:
        if start_steps < total:
            model.learn(total - start_steps, callback=callback, reset_num_timesteps=checkpoint is None,
                        tb_log_name="ppo")
        else:
            callback.init_callback(model)
        seconds = time.perf_counter() - started
        if start_steps < total or not callback.best:
            # The policy after the last update has not been scored yet.
            callback.evaluate()
            log.logger.record("time/total_timesteps", model.num_timesteps)
            log.logger.dump(model.num_timesteps)
        save_model_atomically(model, ctx.exp_dir / FINAL_MODEL)
        trained = model.num_timesteps - start_steps
        return TrainingResult(
            model=model,
            timesteps=model.num_timesteps,
            resumed_from=str(checkpoint) if checkpoint is not None else None,
            best=callback.best,
            seconds=seconds,
            steps_per_second=trained / seconds if trained > 0 and seconds > 0 else None,
        )
    except StopRequested:
        callback.save_checkpoint()
        raise
    finally:
        log.close()
        env.close()


class PhaseReporter:
    """`ctx.phase(name, done, total)` at most every PROGRESS_INTERVAL seconds, and
    always at the end, for a phase reported from many small steps."""

    def __init__(self, ctx: WorkerContext, phase: str) -> None:
        self.ctx = ctx
        self.phase = phase
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        self.ctx.control_point()
        now = time.monotonic()
        if done >= total or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self.ctx.phase(self.phase, done, total)

    def part(self, offset: int, total: int) -> Callable[[int, int], None]:
        """A callback for one part of the phase: its `done` counts from `offset`."""
        return lambda done, _part_total: self(offset + done, total)


def load_inputs(ctx: WorkerContext, splits: Sequence[str] = ("train", "val")):
    """The "loading_model" phase of both experiments: the cached segmenter and the
    samples of each split."""
    from experiments.backends import make_cached_segmenter
    from experiments.datasets import run_split

    ctx.phase("loading_model")
    segmenter = make_cached_segmenter(ctx.config, ctx.device)
    return segmenter, {split: run_split(ctx.config, split) for split in splits}


def run_ppo_experiment(ctx: WorkerContext, build_tables: Callable, make_env: Callable,
                       score: Callable) -> tuple[dict, dict, dict]:
    """What both PPO experiments do, in order: load, cache masks into tables, train,
    score the best model on val. Returns the summary, the best model's val score and
    the tables, for an experiment to add figures of its own. The summary's figures are
    val's, the split that chose the best model: `evaluate` reports on test."""
    segmenter, splits = load_inputs(ctx)
    tables = build_tables(ctx, segmenter, splits)
    calls_before_training = segmenter.model_calls
    ctx.phase("training")
    result = train(ctx, PPOTask(make_env=lambda: make_env(tables["train"]), score=lambda model: score(model, tables["val"])))
    ctx.phase("evaluating")
    cfg = ctx.experiment
    _, chosen = load_policy(ctx.exp_dir, make_env(tables["val"]), cfg.ppo, cfg.seed, ctx.notice)
    final = score(chosen, tables["val"])
    summary = {
        "timesteps": result.timesteps,
        "resumed_from": result.resumed_from,
        "best_step": result.best.get("step"),
        "val_baseline_dice": final["baseline_dice"],
        "val_policy_dice": final["mean_dice"],
        "val_dice_gain": final["dice_gain"],
        "val_dice_gain_interval": [final["dice_gain_low"], final["dice_gain_high"]],
        "steps_per_second": result.steps_per_second,
        "model_calls": segmenter.model_calls,
        "model_calls_in_training": segmenter.model_calls - calls_before_training,
        "cache_disk_hits": segmenter.disk_hits,
        "cache_damaged": segmenter.damaged,
    }
    return summary, final, tables
