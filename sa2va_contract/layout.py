"""Every file and folder name of a run folder, in one place.

    logs/<run-id>/                 run id = <YYYYmmdd-HHMMSS>-<run.name>, never reused
        config.yaml                the resolved config the run started with
        run.json                   every experiment's state (replaced atomically)
        events.jsonl               one JSON line per event, appended
        gpus.jsonl                 a GPU sample every few seconds (the report's GPU history)
        evaluation.json            after `sa2va-tui evaluate`
        <experiment>/
            train.log              everything the worker printed, SB3's tables included
            progress.csv           one row per PPO iteration
            tensorboard/           one TensorBoard run, continued on resume
            checkpoints/           ckpt_<timesteps>.zip (PPO), last.pt and previous.pt (reward network)
            best_model.zip, best.json, final_model.zip                      (PPO)
            best_reward_net.pth, final_reward_net.pth, finetuned_segmenter.pt (reward net)
    logs/.mask_cache/<model fingerprint>/   segmenter outputs shared by every run
    logs/.mask_cache/datasets/              the built-in dataset's splits, generated once

The engine writes these names and the tool reads them back; neither spells one out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# --- the run ------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
#: The supervisor's own warnings and faults (a worker killed, a full disk).
SUPERVISOR_LOG = "supervisor.log"
GPUS_FILE = "gpus.jsonl"
EVALUATION_FILE = "evaluation.json"
#: What the run keeps of itself at the top of its folder: nothing else may write over them.
RUN_RECORDS = (CONFIG_FILE, RUN_FILE, EVENTS_FILE, GPUS_FILE, EVALUATION_FILE)
#: Under the logs folder, beside the runs (unless `backend.cache_dir` moves it).
MASK_CACHE_DIR = ".mask_cache"
#: Under the mask cache's folder: the built-in dataset's generated splits.
DATASET_MEMO_DIR = "datasets"


def cache_dir_for(config) -> Path:
    """The mask cache's folder for a config (`backend.cache_dir`, else under the logs)."""
    return config.backend.cache_dir or (config.run.logs_dir / MASK_CACHE_DIR)

# --- one experiment -----------------------------------------------------------------
LOG_FILE = "train.log"
PROGRESS_CSV = "progress.csv"
TENSORBOARD_DIR = "tensorboard"
#: The name TensorBoard gives its event files.
TFEVENTS_GLOB = "events.out.tfevents.*"
CHECKPOINT_DIR = "checkpoints"
BEST_MODEL = "best_model.zip"
BEST_RECORD = "best.json"
FINAL_MODEL = "final_model.zip"
#: The reward network's checkpoint (network, fine-tuned segmenter, optimisers), and the
#: one before it, kept so that a damaged last one costs one checkpoint's steps only.
REWARD_NET_CHECKPOINT = f"{CHECKPOINT_DIR}/last.pt"
REWARD_NET_PREVIOUS = f"{CHECKPOINT_DIR}/previous.pt"
BEST_REWARD_NET = "best_reward_net.pth"
FINAL_REWARD_NET = "final_reward_net.pth"
FINETUNED_SEGMENTER = "finetuned_segmenter.pt"

_PPO_CHECKPOINT = re.compile(r"^ckpt_(\d+)\.zip$")
#: An experiment's name is its folder's name and a key on the command line: letters,
#: digits, "_" and "-" only (so no separator, no "..", no hidden folder).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


class OutsideError(ValueError):
    """A path the tool would write that lies outside the folder it belongs to."""


def is_plain_name(name: object) -> bool:
    """Whether `name` may name an experiment (and so its folder)."""
    return isinstance(name, str) and _PLAIN_NAME.fullmatch(name) is not None


def is_run_id(text: str) -> bool:
    """Whether `text` may be a run id looked up under a logs folder: one folder name,
    never "." or ".." (run ids are `<time>-<run.name>`, dots allowed)."""
    return bool(text) and text not in (".", "..") and os.sep not in text and "/" not in text and "\0" not in text


def inside(root: Path, path: Path) -> Path:
    """`path` when it lies inside `root` (after resolving "..", and links); else an
    OutsideError naming both. Every run-folder path built from a name goes through it."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise OutsideError(f"{path}: outside {root}")
    return Path(path)


def experiment_dir(run_dir: Path, name: str) -> Path:
    """An experiment's folder in its run folder; a name that is not plain, or a folder
    that a link leads elsewhere, is an OutsideError."""
    if not is_plain_name(name):
        raise OutsideError(f"{name!r}: not a plain experiment name (letters, digits, '_' and '-')")
    return inside(run_dir, Path(run_dir) / name)


def ppo_checkpoint_name(timesteps: int) -> str:
    """Zero-padded, so that names sort as their timesteps do."""
    return f"ckpt_{timesteps:09d}.zip"


def ppo_checkpoint_step(name: str) -> int | None:
    """The timesteps a PPO checkpoint's file name says, None for any other name."""
    found = _PPO_CHECKPOINT.match(name)
    return int(found.group(1)) if found else None
