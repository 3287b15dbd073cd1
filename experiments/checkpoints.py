"""Which checkpoint a resuming attempt loads, and keeping the one before the last.

A run folder may hold checkpoints newer than `run.json` knows (workers save on their
way out after their supervisor was killed), and one may be damaged (truncated by a
full disk or a copy cut short). So an attempt that resumes never trusts the recorded
path alone: it tries the checkpoints in its own folder, newest first, and loads the
first that loads, saying in one line each which it skipped and why. The recorded path
is read tolerantly: absolute, relative to the run folder, relative to the working
directory it was recorded from, or only its file name inside the experiment's folder.

Loading never runs code from the folder: every loader given here reads tensors with
`weights_only=True` and plain JSON (see `experiments.ppo_model.load_ppo`).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from experiments.harness import ClearError
from sa2va_contract.layout import CHECKPOINT_DIR, ppo_checkpoint_step

Loaded = TypeVar("Loaded")


class CheckpointError(ClearError):
    """No checkpoint could be loaded where one was expected; the message names each
    file tried and why it failed."""


class DamagedFile(ValueError):
    """A file of the run folder that is there but cannot be used (its reason says why)."""


def damage_reason(error: BaseException) -> str:
    """Why a file would not load, in a few words: the part a user can act on."""
    if isinstance(error, DamagedFile):
        return str(error)
    if isinstance(error, (zipfile.BadZipFile, EOFError)):
        return f"truncated or not a zip ({error})"
    if isinstance(error, pickle.UnpicklingError):
        # torch's weights_only refusal: the file holds objects that would run code. Its
        # message explains how to load it anyway; what the user needs is what was refused.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        return f"holds pickled objects other than tensors, not loaded ({found.group(1) if found else 'refused'})"
    if isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error):
        return "truncated (not a whole PyTorch file)"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def resolve_recorded(recorded: Path | str, exp_dir: Path) -> Path | None:
    """The file a recorded checkpoint path names, wherever the tool runs from now;
    None when none of its readings is a file."""
    recorded = Path(recorded)
    exp_dir = Path(exp_dir)
    readings = [recorded] if recorded.is_absolute() else [exp_dir.parent / recorded, recorded]
    # Recorded relative to another working directory, or the run folder was moved:
    # the same name in this experiment's own checkpoint folder.
    readings += [exp_dir / CHECKPOINT_DIR / recorded.name, exp_dir / recorded.name]
    return next((path for path in readings if path.is_file()), None)


def ppo_checkpoints(folder: Path) -> list[Path]:
    """The PPO checkpoints in `folder` (or `folder/checkpoints`), newest first."""
    folder = Path(folder)
    for candidate in (folder / CHECKPOINT_DIR, folder):
        if candidate.is_dir():
            found = sorted(((step, p) for p in candidate.iterdir()
                            if (step := ppo_checkpoint_step(p.name)) is not None and p.is_file()), reverse=True)
            if found:
                return [path for _, path in found]
    return []


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def newest_loadable(
    exp_dir: Path,
    recorded: Path | str | None,
    in_folder: Sequence[Path],
    load: Callable[[Path], Loaded],
    notice: Callable[[str], None],
) -> tuple[Path, Loaded] | None:
    """The checkpoint to resume from and what `load` made of it; None to start afresh.

    `in_folder`: the experiment's own checkpoints, newest first. `recorded`: the
    checkpoint the supervisor (or the user) asked for, if any. A recorded checkpoint
    outside the folder is tried first; inside it, the folder's newest is. A checkpoint
    asked for that is nowhere, or checkpoints of which none loads, raise
    `CheckpointError`: never a silent start from step 0."""
    exp_dir = Path(exp_dir)
    candidates = list(in_folder)
    asked = None
    if recorded is not None:
        asked = resolve_recorded(recorded, exp_dir)
        if asked is None and not candidates:
            raise CheckpointError(f"checkpoint {recorded} does not exist, and {exp_dir / CHECKPOINT_DIR} holds none "
                                  f"to resume from")
        if asked is None:
            notice(f"checkpoint {recorded} does not exist; trying the newest in {exp_dir / CHECKPOINT_DIR}")
        elif not any(_same_file(asked, path) for path in candidates):
            candidates.insert(0, asked)
    skipped: list[str] = []
    for path in candidates:
        try:
            loaded = load(path)
        except Exception as err:  # noqa: BLE001 - any file that will not load is skipped, the reason said
            line = f"{path.name}: {damage_reason(err)}"
            skipped.append(line)
            notice(f"skipped checkpoint {path}: {damage_reason(err)}")
            continue
        if asked is not None and not _same_file(asked, path) and not skipped:
            notice(f"resuming from {path.name}, newer than the recorded {asked.name}")
        elif skipped:
            notice(f"resuming from {path}")
        return path, loaded
    if skipped:
        raise CheckpointError(f"no checkpoint in {exp_dir} loads: " + "; ".join(skipped))
    return None


def keep_previous(path: Path, previous: Path) -> None:
    """Before `path` is replaced: `previous` becomes its current version, so that one
    damaged checkpoint never leaves none. A hard link under a temporary name, renamed
    over `previous`: `path` itself never disappears, so a new version that fails to be
    written (a full disk) leaves the old one where the run's records point."""
    path, previous = Path(path), Path(previous)
    if not path.exists():
        return
    staged = previous.with_name(f".{previous.name}.link")
    staged.unlink(missing_ok=True)
    try:
        os.link(path, staged)
    except OSError:  # a filesystem without hard links: a copy
        shutil.copyfile(path, staged)
    os.replace(staged, previous)
