"""`launch`, `resume`, `status`, `gpus`, `watch`: running experiments and looking at them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Optional

import typer

from sa2va_tui.commands.common import (
    ConfigOption,
    LogsDirOption,
    SetOption,
    app,
    fail,
    find_run_or_exit,
    load_config_or_exit,
    load_run_or_exit,
)

if TYPE_CHECKING:
    from rich.table import Table

    from sa2va_contract.gpus import GpuSnapshot
    from sa2va_tui.app import AppSource
    from sa2va_tui.runstate import EventHub

HeadlessOption = typer.Option(False, "--headless", help="No Textual app: progress bars and one line per event.")


def _show(source: "EventHub") -> NoReturn:
    from sa2va_tui.headless import run_headless

    raise typer.Exit(run_headless(source))


def _show_app(source: "AppSource") -> NoReturn:
    """The Textual app over a source it starts itself, once it listens."""
    from sa2va_tui.app import run_app

    raise typer.Exit(run_app(source))


def _run_supervisor(supervisor, names: list[str] | None, headless: bool) -> NoReturn:
    from sa2va_tui.supervisor import SupervisorError

    typer.echo(f"run {supervisor.store.run_id}: {supervisor.run_dir}")
    if not headless:
        from sa2va_tui.app import AppSource

        _show_app(AppSource.of_supervisor(supervisor, names))
    try:
        supervisor.start(names)
    except SupervisorError as err:
        supervisor.shutdown(0.0)
        fail(str(err))
    _show(supervisor)


@app.command()
def launch(
    all_: bool = typer.Option(False, "--all", help="Every enabled experiment of the config (the default)."),
    only: list[str] = typer.Option([], "--only", metavar="NAME", help="Only this experiment (repeatable)."),
    headless: bool = HeadlessOption,
    seeds: int = typer.Option(1, "--seeds", min=1, metavar="N",
                              help="Run each experiment with N seeds (variants <experiment>-seed<N>); "
                                   "`evaluate` folds them into one row with an interval."),
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
) -> None:
    """Start experiments, each in its own worker process, in a new run folder logs/<run-id>/."""
    from sa2va_contract.config import ConfigError
    from sa2va_contract.variants import command_variants, with_variants

    if all_ and only:
        fail("use --all or --only, not both")
    cfg = load_config_or_exit(config, set_)
    made = command_variants(cfg, seeds)
    try:
        cfg = with_variants(cfg, made, f"--seeds {seeds}")
    except ConfigError as err:
        fail(str(err))
    enabled = cfg.experiments()
    for name in only:
        if name not in enabled:
            fail(f"--only {name}: not an enabled experiment (enabled: {', '.join(enabled) or 'none'})")
    # --only NAME runs NAME's seeds too.
    only = [*only, *(variant for name in only for variant in made if variant.rsplit("-seed", 1)[0] == name)]
    if not enabled:
        fail("no experiment is enabled in the config")
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    _run_supervisor(Supervisor(cfg, RunStore.create(cfg)), list(only) or None, headless)


@app.command()
def resume(
    run: str = typer.Argument(..., help="A run folder, a run id under --logs-dir, or 'latest'."),
    logs_dir: Path = LogsDirOption,
    headless: bool = HeadlessOption,
) -> None:
    """Continue every unfinished experiment of a run from its last checkpoint."""
    from sa2va_tui.runstore import RunStoreError
    from sa2va_tui.supervisor import Supervisor, SupervisorError

    run_dir = find_run_or_exit(run, logs_dir)
    try:
        supervisor = Supervisor.for_run(run_dir)
    except (RunStoreError, SupervisorError) as err:
        fail(str(err))
    if all(s.state == "finished" for s in supervisor.states().values()):
        typer.echo(f"every experiment of {run_dir.name} has finished")
        return
    _run_supervisor(supervisor, None, headless)


@app.command()
def status(
    run: Optional[str] = typer.Argument(None, help="A run folder or run id (default: the latest run)."),
    logs_dir: Path = LogsDirOption,
) -> None:
    """The state of a run, from its folder alone: works from any terminal, during or after the run."""
    from rich.console import Console
    from rich.table import Table

    from sa2va_tui.runstate import StateBook
    from sa2va_tui.runstore import pid_alive
    from sa2va_tui.text import format_clock, format_duration

    snapshot = load_run_or_exit(run, logs_dir)
    now = time.time()
    live = snapshot.supervised
    table = Table(box=None, pad_edge=False)
    for column in ("experiment", "state", "pid", "GPU", "phase", "progress", "reward", "ETA"):
        table.add_column(column, justify="right" if column in ("pid", "GPU", "reward") else "left", no_wrap=True)
    cut_short = [name for name, s in snapshot.experiments.items() if not live and not s.terminal]
    for name, s in snapshot.experiments.items():
        state = f"{s.state}*" if name in cut_short else s.state
        progress = f"{s.timesteps}/{s.total or '?'}" + (f" {s.fraction:.0%}" if s.fraction is not None else "")
        table.add_row(
            name,
            state,
            str(s.pid) if live and pid_alive(s.pid) else "-",
            "CPU" if s.gpu is None else str(s.gpu),
            (s.phase or "-").replace("_", " "),
            progress,
            f"{s.episode_reward:.4g}" if s.episode_reward is not None else "-",
            format_duration(s.eta_at(now)) if live and not s.terminal else "-",
        )
    console = Console()
    supervisor = f"supervisor pid {snapshot.supervisor_pid}" if live else "no supervisor running"
    console.print(f"run {snapshot.run_id} ({supervisor}, updated {format_clock(snapshot.updated_at)})",
                  highlight=False, soft_wrap=True)
    console.print(table)
    if cut_short:
        console.print(f"* cut short: its supervisor is gone; `sa2va-tui resume {snapshot.run_id}` continues it",
                      highlight=False, soft_wrap=True)
    if live:
        finish = StateBook(snapshot.experiments).finish_time(now)
        line = f"overall finish: {format_clock(finish)} (in {format_duration(finish - now)})" if finish else \
            "overall finish: not known yet"
        console.print(line, highlight=False, soft_wrap=True)


def gpu_table(snapshot: "GpuSnapshot") -> "Table":
    """Per GPU: name, utilisation, memory, and the processes on it (ours by name)."""
    from rich.table import Table

    def gib(n: int | None) -> str:
        return "N/A" if n is None else f"{n / 1024**3:.1f}"

    table = Table(box=None, pad_edge=False)
    for column in ("GPU", "name", "util", "memory GiB", "processes"):
        table.add_column(column)
    for gpu in snapshot.gpus:
        processes = ", ".join(
            f"{p.experiment or f'pid {p.pid}'} ({'N/A' if p.used_memory is None else gib(p.used_memory) + ' GiB'})"
            for p in gpu.processes)
        table.add_row(
            str(gpu.index),
            gpu.name or "N/A",
            "N/A" if gpu.utilization is None else f"{gpu.utilization}%",
            f"{gib(gpu.memory_used)} / {gib(gpu.memory_total)}",
            processes or "-",
        )
    return table


@app.command()
def gpus(logs_dir: Path = LogsDirOption) -> None:
    """The GPUs now: utilisation, memory, and which experiments of the latest run use them."""
    from rich.console import Console

    from sa2va_tui.gpus import read_gpus
    from sa2va_tui.runstore import RunStoreError, find_run, load_run

    workers: dict[int, str] = {}
    try:
        latest = load_run(find_run(None, logs_dir))
        if latest.supervised:
            workers = {s.pid: name for name, s in latest.experiments.items() if s.pid}
    except RunStoreError:
        pass  # no run yet: the GPUs alone
    snapshot = read_gpus(workers=workers)
    if not snapshot.available:
        typer.echo(snapshot.message)
        return
    Console().print(gpu_table(snapshot))


@app.command()
def watch(
    logs: list[Path] = typer.Argument(..., help="Log files with stable-baselines3's stdout tables."),
    total: Optional[int] = typer.Option(None, "--total", min=1, help="Total timesteps, for percent and ETA."),
    follow: bool = typer.Option(True, "--follow/--no-follow", help="Keep following the logs (default) or read them once."),
    headless: bool = HeadlessOption,
) -> None:
    """Show experiments started elsewhere, from their log files."""
    from sa2va_tui.logtail import LogWatcher

    missing = [str(p) for p in logs if not p.is_file()]
    if missing and not follow:
        fail(f"no such log file: {', '.join(missing)}")
    watcher = LogWatcher(logs, total=total, follow=follow)
    if not headless:
        from sa2va_tui.app import AppSource

        _show_app(AppSource.of_watcher(watcher))
    watcher.start()
    _show(watcher)
