"""Datasets: the built-in procedural one and folders of real data, one entry point."""

from __future__ import annotations

from pathlib import Path

from sa2va_contract.config import Config, DatasetConfig
from sa2va_contract.layout import DATASET_MEMO_DIR, cache_dir_for

from experiments.datasets.base import SPLITS, Sample, render_prompt

__all__ = ["SPLITS", "Sample", "has_split", "load_split", "render_prompt", "reported_split", "run_split"]


def run_split(config: Config, split: str) -> list[Sample]:
    """`load_split` as a run's workers call it: the built-in dataset's splits generated
    once, beside the run's mask cache, and read by every other worker."""
    return load_split(config.dataset, split, cache_dir_for(config) / DATASET_MEMO_DIR)


def load_split(config: DatasetConfig, split: str, memo_dir: Path | None = None) -> list[Sample]:
    """The samples of `split`. `memo_dir`: where the built-in dataset keeps the splits it
    generated, for every process of a run (`run_split` passes the run's)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    if config.kind == "builtin":
        from experiments.datasets.builtin import builtin_split

        return builtin_split(config, split, memo_dir)
    from experiments.datasets.folder import folder_split

    assert config.root is not None  # the config validator guarantees it
    return folder_split(config.root, split, config.expression, config.target, config.manifest, config.limit)


def has_split(config: DatasetConfig, split: str) -> bool:
    """Whether the dataset holds this split (the built-in one holds all three; a folder
    dataset a split it has a folder for)."""
    if config.kind == "builtin":
        return split in SPLITS
    assert config.root is not None
    return (config.root / split / "images").is_dir()


def reported_split(config: DatasetConfig, requested: str | None = None) -> tuple[str, str]:
    """The split that reports, and the key of a warning (`evaluation.WARNINGS`) when
    its figures flatter the methods, else "". Test reports; a dataset without one
    reports on val, with the warning."""
    split = requested or ("test" if has_split(config, "test") else "val")
    if split == "val":
        return split, "no_test_split" if requested is None else "val_reports"
    return split, "train_reports" if split == "train" else ""
