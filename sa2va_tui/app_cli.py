"""The Typer application object and what every command shares.

Commands live in `sa2va_tui/commands/`, one module per area, each registering on
`app`. Modules import nothing heavy at import time, so `sa2va-tui --help` stays fast;
a command imports torch and friends only when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer

app = typer.Typer(
    name="sa2va-tui",
    help="Run, watch, steer and report the Sa2VA reinforcement-learning experiments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

ConfigOption = typer.Option(
    None, "--config", "-c", help="YAML config (default: configs/default.yaml when present, else built-in defaults)."
)
SetOption = typer.Option(
    [], "--set", "-s", metavar="KEY.PATH=VALUE", help="Override a config value, e.g. prompt_rl.total_timesteps=2000 (repeatable)."
)

DEFAULT_CONFIG = Path("configs/default.yaml")


@app.callback()
def _group() -> None:
    """Run, watch, steer and report the Sa2VA reinforcement-learning experiments."""


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, no traceback, a non-zero exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_config_or_exit(path: Optional[Path], overrides: list[str]):
    from sa2va_tui.config import ConfigError, load_config

    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        fail(str(err))


def main() -> None:
    # Registration happens on import; each module is light.
    from sa2va_tui import commands  # noqa: F401

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
