"""`check`: validate a config and everything it points to."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sa2va_tui.commands.common import (
    BackendOption,
    ConfigOption,
    SeedsOption,
    SetOption,
    SweepOption,
    app,
    backend_overrides,
    fail,
    load_config_or_exit,
    with_command_variants,
)


@app.command()
def check(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    backend: Optional[str] = BackendOption,
    sweep: list[str] = SweepOption,
    seeds: int = SeedsOption,
    deep: bool = typer.Option(False, "--deep", help="Sa2VA: also load the model, segment one image with every prompt "
                              "and take two fine-tuning steps, on the GPU, and estimate the mask cache's time."),
) -> None:
    """Validate a config and what it points to: dataset files, model path, GPUs asked for (on
    the ray backend: the cluster's nodes, each experiment's request, the shared run folder)."""
    from sa2va_tui.preflight import preflight

    cfg, made = with_command_variants(load_config_or_exit(config, backend_overrides(backend, set_)), sweep, seeds)
    report = preflight(cfg)
    for line in report.found:
        typer.echo(f"ok    {line}")
    for line in report.warnings:
        typer.echo(f"warn  {line}")
    for line in report.problems:
        typer.echo(f"error {line}", err=True)
    if report.problems:
        fail(f"{len(report.problems)} problem(s) in {config or 'the config'}")
    for name, changes in made.items():
        typer.echo(f"ok    variant {name}: {variant_words(changes)}")
    if cfg.backend.kind == "sa2va" and cfg.run.backend == "local":
        _fill_estimate(cfg)
    if deep:
        _deep_check(cfg)
    typer.echo("config is ready")


def stage_layout(cfg) -> tuple[int, int]:
    """(replicas, GPUs) the run's mask stage would start with now; (0, 0) without a GPU."""
    from sa2va_tui.gpus import read_gpus
    from sa2va_tui.launching import mask_stage_gpus

    snapshot = read_gpus()
    if not snapshot.available or not snapshot.gpus:
        return 0, 0
    replicas, split_over = mask_stage_gpus(cfg, snapshot)
    return (len(replicas), len(set(replicas))) if replicas else (1, len(split_over))


def _fill_estimate(cfg) -> None:
    """How long the mask stage takes to fill a cold cache, over the GPUs it will use."""
    from sa2va_tui import engine

    try:
        typer.echo(f"ok    {engine.mask_fill_estimate(cfg, *stage_layout(cfg))}")
    except (OSError, ValueError) as err:  # a dataset that cannot be read is check's own problem line
        typer.echo(f"warn  mask stage: no estimate ({err})")


def _deep_check(cfg) -> None:
    """The engine's deep check: it brings torch and the model into this process."""
    from sa2va_tui import engine

    problem = engine.deep_check(cfg, typer.echo, *stage_layout(cfg))
    if problem:
        fail(problem)


def variant_words(changes: dict) -> str:
    """`ppo.learning_rate=3e-4, seed=2`: what a made variant changes from its base."""
    from sa2va_tui.compare import flatten

    flat = flatten({k: v for k, v in changes.items() if k not in ("base", "enabled")})
    return ", ".join(f"{key}={value}" for key, value in flat.items()) or "as its base"
