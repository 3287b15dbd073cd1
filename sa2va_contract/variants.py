"""Variants made by a command rather than written in the config: `launch --seeds N`
(a sweep over other keys can extend `command_variants`).

A variant is an entry of `Config.variants`: a name and `{base: <kind>, <changed
fields>}`. A made variant's name says what changed from the experiment it comes
from, `<experiment>-seed<N>`, and stays a plain identifier (it names a folder).
Experiments that differ in their seed only are one method measured several times:
`seed_groups` tells the evaluation which to fold into one row.
"""

from __future__ import annotations

from typing import Any

from sa2va_contract.config import Config, ExperimentConfig, validate_config

#: Fields that say where and how an experiment runs, not what it learns.
_PLACEMENT_FIELDS = ("seed", "device", "gpu", "faults", "enabled")


def seed_variant_name(experiment: str, seed: int) -> str:
    return f"{experiment}-seed{seed}"


def command_variants(config: Config, seeds: int = 1) -> dict[str, dict[str, Any]]:
    """The variants a command asks for: every enabled experiment of the config (its
    own variants too) run with `seeds` seeds in all, the experiment itself with its
    own seed s and `seeds - 1` more with seeds s+1, s+2, ..."""
    if seeds < 1:
        raise ValueError(f"seeds: {seeds} must be >= 1")
    made: dict[str, dict[str, Any]] = {}
    for name, experiment in config.experiments().items():
        changes = {key: value for key, value in config.variants.get(name, {}).items() if key != "base"}
        for extra in range(1, seeds):
            seed = experiment.seed + extra
            made[seed_variant_name(name, seed)] = {"base": experiment.kind, **changes, "seed": seed}
    return made


def with_variants(config: Config, made: dict[str, dict[str, Any]], origin: str) -> Config:
    """The config with the made variants added (what the run folder's config.yaml then
    holds); a name the config already uses is a ConfigError naming `origin`."""
    taken = [name for name in made if name in config.variants]
    if taken:
        from sa2va_contract.config import ConfigError

        raise ConfigError(f"{origin}: the config already has a variant named {taken[0]}")
    data = config.model_dump(mode="python")
    data["variants"] = {**config.variants, **made}
    return validate_config(data, origin)


def seed_groups(experiments: dict[str, ExperimentConfig]) -> dict[str, list[str]]:
    """Experiments that differ in nothing but their seed (and where they run), in
    order: {group name: member names}. A group is named after its first member (the
    base experiment comes before its seed variants)."""
    groups: dict[tuple, list[str]] = {}
    for name, experiment in experiments.items():
        what = experiment.model_dump(mode="json", exclude=set(_PLACEMENT_FIELDS))
        groups.setdefault((experiment.kind, repr(sorted(what.items()))), []).append(name)
    return {members[0]: members for members in groups.values()}
