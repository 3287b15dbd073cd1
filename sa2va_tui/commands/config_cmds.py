"""`check`: validate a config and everything it points to."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sa2va_tui.commands.common import ConfigOption, SetOption, app, fail, load_config_or_exit


@app.command()
def check(config: Optional[Path] = ConfigOption, set_: list[str] = SetOption) -> None:
    """Validate a config and what it points to: dataset files, model path, GPUs asked for."""
    from sa2va_tui.preflight import preflight

    cfg = load_config_or_exit(config, set_)
    report = preflight(cfg)
    for line in report.found:
        typer.echo(f"ok    {line}")
    for line in report.warnings:
        typer.echo(f"warn  {line}")
    for line in report.problems:
        typer.echo(f"error {line}", err=True)
    if report.problems:
        fail(f"{len(report.problems)} problem(s) in {config or 'the config'}")
    typer.echo("config is ready")
