"""What `sa2va-tui check` verifies of the data and the model a config points to, before
a run spends an hour finding out (the GPUs are the tool's part: `sa2va_tui.preflight`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from experiments.datasets.folder import DatasetError, read_manifest, scan_split
from sa2va_contract.config import Config


@dataclass
class Preflight:
    found: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_data_and_model(config: Config) -> Preflight:
    report = Preflight()
    _check_dataset(config, report)
    _check_backend(config, report)
    if config.run.backend == "local":  # a Ray node's memory is not this machine's
        _check_rollout_memory(config, report, available_memory())
    return report


#: Floats SB3's rollout buffer keeps per step besides the observation: the action,
#: reward, return, episode start, value, log-probability and advantage.
_PER_STEP_FLOATS = 7


def _check_rollout_memory(config: Config, report: Preflight, available: int | None) -> None:
    """A PPO rollout buffer that cannot fit in memory fails in the worker with a
    MemoryError (or takes the machine's memory); say so here, naming the key. Every
    observation holds the image's features and two masks' at least."""
    from experiments.envs.features import IMAGE_FEATURES, MASK_FEATURES

    if available is None:
        return
    floats_per_step = IMAGE_FEATURES + 2 * MASK_FEATURES + _PER_STEP_FLOATS
    for name, exp in config.experiments().items():
        if exp.kind == "reward_net":
            continue
        steps = exp.ppo.n_steps * exp.ppo.n_envs
        needed = steps * floats_per_step * 4
        if needed > available:
            report.problems.append(
                f"{name}.ppo.n_steps: a rollout of n_steps * n_envs = {steps:,} steps needs at least "
                f"{needed / 2**30:,.1f} GiB for its buffer, more than the {available / 2**30:,.1f} GiB of memory "
                "available")


def available_memory() -> int | None:
    """Bytes of memory available to a new process now (Linux's MemAvailable), None
    where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _check_dataset(config: Config, report: Preflight) -> None:
    dataset = config.dataset
    if dataset.kind == "builtin":
        sizes = dataset.sizes
        limit = f", at most {dataset.limit} per split" if dataset.limit else ""
        report.found.append(
            f"dataset: built-in, {dataset.image_size}x{dataset.image_size}, "
            f"train/val/test {sizes.train}/{sizes.val}/{sizes.test}{limit}, seed {dataset.seed}, "
            f"{'one expression per kind' if dataset.expressions == 'fixed' else 'per-image expressions'}"
        )
        _check_reward_images(config, min(sizes.train, dataset.limit or sizes.train), report)
        return
    assert dataset.root is not None
    if not dataset.root.is_dir():
        report.problems.append(f"dataset.root: {dataset.root}: no such folder")
        return
    for split in ("train", "val", "test"):
        scan = scan_split(dataset.root, split)
        if split == "test" and not (dataset.root / split).exists():
            report.warnings.append(f"dataset: {dataset.root / split}: no test split (evaluate reports on val, the split "
                                   "that chose the checkpoints: its figures are optimistic)")
            continue
        report.problems.extend(scan.problems)
        if scan.pairs:
            report.found.append(f"dataset: {dataset.root / split}: {len(scan.pairs)} image/mask pairs")
        if split == "train":
            pairs = len(scan.pairs) if dataset.limit is None else min(len(scan.pairs), dataset.limit)
            _check_reward_images(config, pairs, report)
    if dataset.manifest is not None:
        try:
            described = read_manifest(dataset.manifest)
            report.found.append(f"dataset.manifest: {dataset.manifest}: {len(described)} expressions")
        except DatasetError as err:
            report.problems.extend(err.problems)


def _check_reward_images(config: Config, train_images: int, report: Preflight) -> None:
    """Fine-tuning never uses the reward network's images: some train images must be left."""
    for name, exp in config.experiments().items():
        if exp.kind == "reward_net" and exp.reward.samples >= train_images:
            report.problems.append(f"{name}.reward.samples: {exp.reward.samples} leaves no train image for fine-tuning "
                                   f"(the train split has {train_images}; fine-tuning must not use the reward "
                                   "network's images)")


def _check_backend(config: Config, report: Preflight) -> None:
    backend = config.backend
    report.found.append(
        f"prompts: {len(backend.prompts)} candidates, default {backend.default_prompt}: {backend.prompts[backend.default_prompt]!r}"
    )
    if backend.kind == "embedded":
        from experiments.backends.base import EMBEDDED_WEIGHTS

        weights = backend.weights or EMBEDDED_WEIGHTS
        if Path(weights).is_file():
            report.found.append(f"backend: embedded model, weights {weights}")
        else:
            report.problems.append(f"backend.weights: {weights}: no such file (sa2va-tui train-embedded writes it)")
        return
    path = Path(str(backend.model_path)).expanduser()
    if not path.is_dir():
        report.problems.append(f"backend.model_path: {backend.model_path}: no such checkpoint folder")
    elif not (path / "config.json").is_file():
        report.problems.append(f"backend.model_path: {path}: not a transformers checkpoint (no config.json)")
    else:
        _check_sa2va_checkpoint(config, path, report)
    if backend.trust_remote_code:
        report.warnings.append(f"backend.trust_remote_code: the code shipped in {backend.model_path} will run")


def _check_sa2va_checkpoint(config: Config, path: Path, report: Preflight) -> None:
    """The family config.json names, and what it needs: one line per missing piece."""
    from experiments.backends import sa2va_families as families

    try:
        detected = families.detect_family(path, config.backend.family)
    except families.FamilyError as err:
        report.problems.append(str(err))
        return
    family = detected.family
    report.found.append(f"backend: sa2va checkpoint {path}: {family.label} ({detected.reason})")
    loader = families.loader_override()
    if loader is not None:
        report.warnings.append(f"backend: {families.LOADER_ENV}={loader} loads the model, not transformers: "
                               "its requirements and the CUDA GPU are not checked")
        return
    report.problems.extend(families.requirement_problems(family, path, families.installed(family)))
    if config.backend.device_map == "split" and not family.splittable:
        report.problems.append(f"backend.device_map: split exists upstream for InternVL-based checkpoints only, "
                               f"not {family.label}")
