"""`train-embedded` and `headroom`: the embedded model's own commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sa2va_tui.commands.common import ConfigOption, SetOption, app, fail, load_config_or_exit


@app.command("train-embedded")
def train_embedded(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Where to write the weights (default: the weights shipped in the package)."
    ),
    minutes: Optional[float] = typer.Option(
        None, "--minutes", min=0.1, help="Stop early after this many minutes (the result is then not reproducible)."
    ),
) -> None:
    """Retrain the embedded segmentation model from scratch on the built-in dataset,
    reproducibly (fixed seeds, one thread; about 12 minutes on two CPU cores)."""
    cfg = load_config_or_exit(config, set_)
    if cfg.dataset.kind != "builtin":
        fail("dataset.kind: the embedded model trains on the built-in dataset (kind: builtin)")
    from sa2va_tui import engine

    shipped = engine.embedded_weights()
    target = out or shipped
    summary = engine.train_embedded(cfg, target, minutes_budget=minutes)
    for key, value in summary.items():
        typer.echo(f"{key}: {value}")
    if target == shipped:
        typer.echo("the shipped weights changed: cached masks of the old model are no longer used")


@app.command()
def headroom(
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
    split: str = typer.Option("val", help="Which split to measure."),
    train_images: int = typer.Option(400, min=0, help="Train images for the learnability check (0: skip it)."),
) -> None:
    """What the experiments can gain with this backend and data: the default prompt's
    Dice against the best prompt and the best post-processing chosen with the labels,
    and simple label-free choosers as a learnability check."""
    cfg = load_config_or_exit(config, set_)
    from sa2va_tui import engine

    engine.print_headroom(cfg, split, train_images)
