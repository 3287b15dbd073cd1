"""Datasets: the built-in procedural one and folders of real data, one entry point."""

from __future__ import annotations

from sa2va_contract.config import DatasetConfig

from experiments.datasets.base import SPLITS, Sample, render_prompt

__all__ = ["SPLITS", "Sample", "load_split", "render_prompt"]


def load_split(config: DatasetConfig, split: str) -> list[Sample]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    if config.kind == "builtin":
        from experiments.datasets.builtin import builtin_split

        return builtin_split(config, split)
    from experiments.datasets.folder import folder_split

    assert config.root is not None  # the config validator guarantees it
    return folder_split(config.root, split, config.expression, config.target, config.manifest, config.limit)
