"""Variants made by a command rather than written in the config: `launch --seeds N`
and `launch --sweep KEY=V1,V2,...` (the grid of every swept value).

A variant is an entry of `Config.variants`: a name and `{base: <kind>, <changed
fields>}`. A made variant's name says what changed from the experiment it comes
from, `<experiment>-seed<N>`, and stays a plain identifier (it names a folder).
Experiments that differ in their seed only are one method measured several times:
`seed_groups` tells the evaluation which to fold into one row.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import yaml

from sa2va_contract.config import Config, ConfigError, ExperimentConfig, validate_config

#: Fields that say where and how an experiment runs, not what it learns.
_PLACEMENT_FIELDS = ("seed", "device", "gpu", "faults", "enabled")
#: Variants one command may make (each is a worker): more is a slip of the keyboard
#: (`--seeds 4294967296`), and building them would take the machine's memory first.
MAX_MADE_VARIANTS = 256


def seed_variant_name(experiment: str, seed: int) -> str:
    return f"{experiment}-seed{seed}"


def command_variants(config: Config, seeds: int = 1) -> dict[str, dict[str, Any]]:
    """The variants a command asks for: every enabled experiment of the config (its
    own variants too) run with `seeds` seeds in all, the experiment itself with its
    own seed s and `seeds - 1` more with seeds s+1, s+2, ..."""
    if seeds < 1:
        raise ValueError(f"seeds: {seeds} must be >= 1")
    experiments = config.experiments()
    if len(experiments) * (seeds - 1) > MAX_MADE_VARIANTS:
        raise ConfigError(f"--seeds {seeds}: would make {len(experiments) * (seeds - 1):,} variants of "
                          f"{len(experiments)} experiment(s), more than the {MAX_MADE_VARIANTS} one command may make")
    made: dict[str, dict[str, Any]] = {}
    for name, experiment in experiments.items():
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


# --- sweeps: --sweep KEY=V1,V2,... ---------------------------------------------------

#: Short names of the settings swept most, for variant names ("prompt_rl-lr3e-4").
ABBREVIATIONS = {
    "learning_rate": "lr", "batch_size": "bs", "n_steps": "nsteps", "n_epochs": "epochs", "n_envs": "envs",
    "ent_coef": "ent", "clip_range": "clip", "gae_lambda": "lambda", "gamma": "gamma", "net_arch": "arch",
    "total_timesteps": "steps", "reward_scale": "rscale", "step_penalty": "penalty", "max_steps": "maxsteps",
    "anchor_weight": "anchor", "epochs": "epochs",
}


def parse_sweep(text: str) -> tuple[list[str], list[tuple[str, Any]]]:
    """`prompt_rl.ppo.learning_rate=3e-4,1e-3` -> (the key path, [(written, value), ...]):
    values split at top-level commas and read as YAML, as `--set` reads its value."""
    if "=" not in text:
        raise ConfigError(f"--sweep {text}: expected KEY.PATH=V1,V2,...")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--sweep {text}: the key names an experiment and one of its settings "
                          "(e.g. prompt_rl.ppo.learning_rate)")
    pieces = _top_level_split(raw)
    if len(pieces) < 2:
        raise ConfigError(f"--sweep {text}: give at least two values, separated by commas")
    values = []
    for piece in pieces:
        try:
            values.append((piece, yaml.safe_load(piece)))
        except yaml.YAMLError as err:
            raise ConfigError(f"--sweep {text}: {piece!r} is not a YAML value ({err.__class__.__name__})") from None
    return path, values


def _top_level_split(raw: str) -> list[str]:
    """`a,[1, 2],b` -> ["a", "[1, 2]", "b"]: commas inside brackets or quotes stay."""
    pieces, depth, quote, current = [], 0, "", ""
    for char in raw:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append(current.strip())
            current = ""
            continue
        current += char
    pieces.append(current.strip())
    return [p for p in pieces if p]


def _token(written: str) -> str:
    """A value as written, made fit for a folder name: `3e-4`, `0p5`, `64x64`."""
    text = written.strip().strip("'\"").replace(".", "p").replace(", ", "x").replace(",", "x")
    return "".join(c for c in text if c.isalnum() or c in "_-") or "v"


def apply_sweeps(config: Config, sweeps: list[str]) -> tuple[Config, dict[str, dict[str, Any]]]:
    """The config with each swept experiment replaced by the grid of its sweeps' values
    (every combination, one variant each, named from what changed), and those variants.
    An experiment that is swept runs only as its grid's points."""
    if not sweeps:
        return config, {}
    enabled = config.experiments()
    by_experiment: dict[str, list[tuple[list[str], list[tuple[str, Any]], str]]] = {}
    for text in sweeps:
        path, values = parse_sweep(text)
        if path[0] not in enabled:
            raise ConfigError(f"--sweep {text}: {path[0]} is not an enabled experiment "
                              f"(enabled: {', '.join(enabled) or 'none'})")
        by_experiment.setdefault(path[0], []).append((path[1:], values, text))
    points = sum(math.prod(len(values) for _, values, _ in swept) for swept in by_experiment.values())
    if points > MAX_MADE_VARIANTS:
        raise ConfigError(f"--sweep {' --sweep '.join(sweeps)}: {points:,} combinations, more than the "
                          f"{MAX_MADE_VARIANTS} variants one command may make")
    data = config.model_dump(mode="python")
    made: dict[str, dict[str, Any]] = {}
    for name, swept in by_experiment.items():
        kind = enabled[name].kind
        own = {k: v for k, v in data["variants"].pop(name, {}).items() if k != "base"}
        if name == kind:
            data[kind]["enabled"] = False  # the grid replaces it
        labels = _labels([keys for keys, _, _ in swept])
        for point in itertools.product(*(values for _, values, _ in swept)):
            changes: dict[str, Any] = copy.deepcopy(own)
            parts = []
            for (keys, _, _), label, (written, value) in zip(swept, labels, point):
                _set(changes, keys, value)
                parts.append(f"{label}{_token(written)}")
            made["-".join([name, *parts])] = {"base": kind, **changes, "enabled": True}
    data["variants"] = {**data["variants"], **made}
    return validate_config(data, "--sweep " + " --sweep ".join(sweeps)), made


def _labels(key_paths: list[list[str]]) -> list[str]:
    """Each swept key's short name; where two would read the same, their last two parts."""
    short = [ABBREVIATIONS.get(keys[-1], keys[-1].replace(".", "")) for keys in key_paths]
    return [s if short.count(s) == 1 else "".join(keys[-2:]) for s, keys in zip(short, key_paths)]


def _set(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value
