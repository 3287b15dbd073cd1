"""The Typer application object and what every command shares: its options, the
one-line failure, finding a config and a run.

Commands live beside this module, one module per area, each registering on `app`;
`sa2va_tui.cli` imports them all. Modules import nothing heavy at import time, so
`sa2va-tui --help` stays fast; a command imports what it needs only when it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

import typer

if TYPE_CHECKING:
    from sa2va_contract.config import Config
    from sa2va_tui.runstore import RunSnapshot

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
LogsDirOption = typer.Option(Path("logs"), "--logs-dir", help="Where the run folders are.")
SeedsOption = typer.Option(1, "--seeds", min=1, metavar="N",
                           help="Run each experiment with N seeds (variants <experiment>-seed<N>); "
                                "`evaluate` folds them into one row with an interval.")
SweepOption = typer.Option(
    [], "--sweep", metavar="KEY.PATH=V1,V2,...",
    help="Run the experiment KEY names once per value, e.g. prompt_rl.ppo.learning_rate=3e-4,1e-3 "
         "(repeatable: every combination; values read as YAML, like --set).")
BACKENDS = ("local", "ray")
BackendOption = typer.Option(None, "--backend", metavar="local|ray",
                             help="Where workers run (default: the config's run.backend).")

DEFAULT_CONFIG = Path("configs/default.yaml")


@app.callback()
def _group() -> None:
    """Run, watch, steer and report the Sa2VA reinforcement-learning experiments."""


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, no traceback, a non-zero exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def fail_all(problems: list[str], code: int = 2) -> NoReturn:
    """One line per problem on stderr, no traceback, a non-zero exit."""
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    raise typer.Exit(code)


def load_config_or_exit(path: Optional[Path], overrides: list[str]) -> "Config":
    from sa2va_contract.config import ConfigError, load_config

    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    try:
        return load_config(path, overrides)
    except ConfigError as err:
        fail(str(err))


def backend_overrides(backend: Optional[str], overrides: list[str]) -> list[str]:
    """`--set` overrides with `--backend` as one more (checked here, in one line)."""
    if backend is None:
        return list(overrides)
    if backend not in BACKENDS:
        fail(f"--backend {backend}: must be one of {', '.join(BACKENDS)}")
    return [*overrides, f"run.backend={backend}"]


def find_run_or_exit(ref: Optional[str], logs_dir: Path) -> Path:
    """A run folder by path or id under `logs_dir`; the latest for None or "latest"."""
    from sa2va_tui.runstore import RunStoreError, find_run

    try:
        return find_run(None if ref == "latest" else ref, logs_dir)
    except RunStoreError as err:
        fail(str(err))


def load_run_or_exit(ref: Optional[str], logs_dir: Path) -> "RunSnapshot":
    """The run as its folder tells it (see `find_run_or_exit`)."""
    from sa2va_tui.runstore import RunStoreError, load_run

    try:
        return load_run(find_run_or_exit(ref, logs_dir))
    except RunStoreError as err:
        fail(str(err))


def with_command_variants(config: "Config", sweeps: list[str], seeds: int) -> tuple["Config", dict[str, dict]]:
    """The config with the variants --sweep and --seeds ask for (checked by the schema
    before anything starts), and those variants by name."""
    from sa2va_contract.config import ConfigError
    from sa2va_contract.variants import apply_sweeps, command_variants, with_variants

    try:
        config, swept = apply_sweeps(config, sweeps)
        seeded = command_variants(config, seeds)
        return with_variants(config, seeded, f"--seeds {seeds}"), {**swept, **seeded}
    except ConfigError as err:
        fail(str(err))
