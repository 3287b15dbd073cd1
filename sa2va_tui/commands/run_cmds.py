"""`launch`, `resume`, `status`, `gpus`, `watch`: running experiments and looking at them."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn, Optional

import typer

from sa2va_tui.commands.common import (
    BackendOption,
    ConfigOption,
    LogsDirOption,
    SeedsOption,
    SetOption,
    SweepOption,
    app,
    backend_overrides,
    fail,
    fail_all,
    find_run_or_exit,
    load_config_or_exit,
    load_run_or_exit,
    with_command_variants,
)

if TYPE_CHECKING:
    from rich.table import Table

    from sa2va_contract.gpus import GpuSnapshot
    from sa2va_tui.app import AppSource
    from sa2va_tui.runstate import EventHub

HeadlessOption = typer.Option(False, "--headless", help="No Textual app: progress bars and one line per event.")


def _supervisor_or_exit(make):
    """The supervisor `make()` builds; a backend that cannot start (Ray) is one line."""
    from sa2va_tui.placement import LaunchError
    from sa2va_tui.runstore import RunStoreError
    from sa2va_tui.supervisor import SupervisorError

    try:
        return make()
    except (LaunchError, RunStoreError, SupervisorError) as err:
        fail(str(err))


def _say(line: str) -> None:
    """A line of a command that runs experiments: a closed output (`| head`, a reader
    gone) silences it, and the run goes on without it."""
    from sa2va_tui.headless import silence_stdout

    try:
        typer.echo(line)
    except OSError:
        silence_stdout(sys.stdout)


def _show(source: "EventHub", start: Optional[Callable[[], None]] = None) -> NoReturn:
    from sa2va_tui.headless import run_headless

    raise typer.Exit(run_headless(source, start=start))


def _show_app(source: "AppSource") -> NoReturn:
    """The Textual app over a source it starts itself, once it listens. A stop signal
    (`sa2va_tui.signals`) stops every experiment gracefully, then ends the app."""
    import _thread
    import threading

    from sa2va_tui.app import run_app
    from sa2va_tui.signals import StopRequests

    def stop_then_leave() -> None:
        source.hub.shutdown(source.stop_grace_s)
        leaving.set()
        _thread.interrupt_main()  # the app's loop ends as after Ctrl+C outside it

    def on_signal() -> None:
        if leaving.is_set():
            raise KeyboardInterrupt
        if requests.force.is_set():
            threading.Thread(target=source.hub.shutdown, args=(0.0,), daemon=True).start()
        elif not stopping.is_set():
            stopping.set()
            threading.Thread(target=stop_then_leave, name="graceful-stop", daemon=True).start()

    leaving, stopping = threading.Event(), threading.Event()
    with StopRequests(on_signal) as requests:
        try:
            code = run_app(source)
        except KeyboardInterrupt:
            code = requests.exit_code or 130
    raise typer.Exit(code)


def _run_supervisor(supervisor, names: list[str] | None, headless: bool) -> NoReturn:
    import logging

    from sa2va_tui.supervisor import SupervisorError

    _say(f"run {supervisor.store.run_id}: {supervisor.run_dir}")
    # What the tool warns of stays in the run folder, whatever becomes of the terminal.
    problems, tool_log = supervisor.store.problem_log(), logging.getLogger("sa2va_tui")
    tool_log.addHandler(problems)
    try:
        if supervisor.config.run.on_event:
            from sa2va_tui.notify import Notifier

            supervisor.subscribe(Notifier(supervisor.config.run.on_event, supervisor.store.run_id,
                                          supervisor.run_dir, supervisor.states))
        if not headless:
            from sa2va_tui.app import AppSource

            _show_app(AppSource.of_supervisor(supervisor, names))

        def start() -> None:
            try:
                supervisor.start(names)
            except SupervisorError as err:
                supervisor.shutdown(0.0)
                fail(str(err))

        _show(supervisor, start)
    finally:
        tool_log.removeHandler(problems)
        problems.close()


@app.command()
def launch(
    all_: bool = typer.Option(False, "--all", help="Every enabled experiment of the config (the default)."),
    only: list[str] = typer.Option([], "--only", metavar="NAME", help="Only this experiment (repeatable)."),
    headless: bool = HeadlessOption,
    seeds: int = SeedsOption,
    sweep: list[str] = SweepOption,
    max_parallel: Optional[int] = typer.Option(
        None, "--max-parallel", min=1, help="At most N experiments at once; the others wait in line (run.max_parallel)."),
    backend: Optional[str] = BackendOption,
    config: Optional[Path] = ConfigOption,
    set_: list[str] = SetOption,
) -> None:
    """Start experiments, each in its own worker process (or Ray actor), in a new run folder logs/<run-id>/.

    Each waits in line until a device has room (the CPU's cores, a GPU's free memory)."""
    if all_ and only:
        fail("use --all or --only, not both")
    overrides = [*backend_overrides(backend, set_), *([f"run.max_parallel={max_parallel}"] if max_parallel else [])]
    cfg, made = with_command_variants(load_config_or_exit(config, overrides), sweep, seeds)
    enabled = cfg.experiments()
    for name in only:
        if name not in enabled:
            fail(f"--only {name}: not an enabled experiment (enabled: {', '.join(enabled) or 'none'})")
    # --only NAME runs the variants made of NAME too (its seeds, its sweep's points).
    only = [*only, *(variant for name in only for variant in made if variant.startswith(f"{name}-"))]
    if not enabled:
        fail("no experiment is enabled in the config")
    from sa2va_tui.preflight import launch_problems

    problems = launch_problems(cfg)  # before a run folder or any worker
    if problems:
        fail_all(problems)
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    store = RunStore.create(cfg)
    if cfg.run.backend == "ray":  # a few seconds before anything else shows
        _say("ray: starting a private instance on 127.0.0.1" if cfg.ray.address == "local" else
             f"ray: connecting to the cluster at {cfg.ray.address}")
    _run_supervisor(_supervisor_or_exit(lambda: Supervisor(cfg, store)), list(only) or None, headless)


@app.command()
def resume(
    run: str = typer.Argument(..., help="A run folder, a run id under --logs-dir, or 'latest'."),
    logs_dir: Path = LogsDirOption,
    headless: bool = HeadlessOption,
) -> None:
    """Continue every unfinished experiment of a run from its last checkpoint."""
    from sa2va_tui.supervisor import Supervisor

    run_dir = find_run_or_exit(run, logs_dir)
    # Asked of the folder first: a supervisor would start its backend (Ray) for nothing.
    snapshot = load_run_or_exit(str(run_dir), logs_dir)
    if not snapshot.supervised and all(s.state == "finished" for s in snapshot.experiments.values()):
        typer.echo(f"every experiment of {run_dir.name} has finished")
        return
    _run_supervisor(_supervisor_or_exit(lambda: Supervisor.for_run(run_dir)), None, headless)


@app.command()
def status(
    run: Optional[str] = typer.Argument(None, help="A run folder or run id (default: the latest run)."),
    logs_dir: Path = LogsDirOption,
) -> None:
    """The state of a run, from its folder alone: works from any terminal, during or after the run."""
    from rich.table import Table

    from sa2va_tui.report.facts import shown_state
    from sa2va_tui.runstate import StateBook
    from sa2va_tui.runstore import pid_alive
    from sa2va_tui.text import format_clock, format_duration, mask_counts_text, output_console, stage_detail

    snapshot = load_run_or_exit(run, logs_dir)
    now = time.time()
    live = snapshot.supervised
    table = Table(box=None, pad_edge=False)
    # On a cluster, where each worker runs (or last ran).
    hosts = any(s.host and s.host != snapshot.host for s in snapshot.experiments.values())
    for column in ("experiment", "state", "pid", *(("host",) if hosts else ()), "GPU", "phase", "progress", "reward",
                   "ETA", "queued"):
        table.add_column(column, justify="right" if column in ("pid", "GPU", "reward") else "left", no_wrap=True)
    cut_short = [name for name, s in snapshot.experiments.items() if not live and not s.terminal]
    for name, s in snapshot.experiments.items():
        state = shown_state(s, live)  # the word `runs` and `report` use
        if s.state == "queued" and s.queue_position:
            state += f" #{s.queue_position}"
        waited = s.waited_s(now if live else snapshot.updated_at)
        progress = f"{s.timesteps}/{s.total or '?'}" + (f" {s.fraction:.0%}" if s.fraction is not None else "")
        table.add_row(
            name,
            state,
            # A pid of another machine cannot be looked at from here: the run folder's word stands.
            str(s.pid) if live and s.pid and (pid_alive(s.pid) if s.host in (None, snapshot.host) else True) else "-",
            *((s.host or "-",) if hosts else ()),
            "CPU" if s.gpu is None else str(s.gpu),
            (s.phase or "-").replace("_", " "),
            progress,
            f"{s.episode_reward:.4g}" if s.episode_reward is not None else "-",
            format_duration(s.eta_at(now)) if live and not s.terminal else "-",
            format_duration(waited) if waited else "-",
        )
    console = output_console()
    supervisor = f"supervisor pid {snapshot.supervisor_pid}" if live else "no supervisor running"
    console.print(f"run {snapshot.run_id} ({supervisor}, updated {format_clock(snapshot.updated_at)})",
                  highlight=False, soft_wrap=True)
    console.print(table)
    if snapshot.mask_stage is not None:
        console.print(f"mask stage: {snapshot.mask_stage.state}, {stage_detail(snapshot.mask_stage, now)}",
                      highlight=False, soft_wrap=True)
    if snapshot.mask_counts:
        console.print(f"masks: {mask_counts_text(snapshot.mask_counts)}", highlight=False, soft_wrap=True)
    if cut_short:
        console.print(f"interrupted: its supervisor went away before it ended; `sa2va-tui resume {snapshot.run_id}` "
                      "continues it", highlight=False, soft_wrap=True)
    if live:
        finish = StateBook(snapshot.experiments).finish_time(now)
        line = f"overall finish: {format_clock(finish)} (in {format_duration(finish - now)})" if finish else \
            "overall finish: not known yet"
        console.print(line, highlight=False, soft_wrap=True)


def gpu_table(snapshot: "GpuSnapshot") -> "Table":
    """Per GPU: name, utilisation, memory, and the processes on it (ours by name); on a
    cluster grouped by host, which heads its group."""
    from rich.table import Table

    def gib(n: int | None) -> str:
        return "N/A" if n is None else f"{n / 1024**3:.1f}"

    by_host = any(gpu.host for gpu in snapshot.gpus)
    table = Table(box=None, pad_edge=False)
    for column in (*(("host",) if by_host else ()), "GPU", "name", "util", "memory GiB", "processes"):
        table.add_column(column)
    order = {host: i for i, host in enumerate(dict.fromkeys(g.host for g in snapshot.gpus))}
    previous = object()
    for gpu in sorted(snapshot.gpus, key=lambda g: order[g.host]):
        processes = ", ".join(
            f"{p.experiment or f'pid {p.pid}'} ({'N/A' if p.used_memory is None else gib(p.used_memory) + ' GiB'})"
            for p in gpu.processes)
        host = (gpu.host or "-") if gpu.host != previous else ""
        previous = gpu.host
        table.add_row(
            *((host,) if by_host else ()),
            str(gpu.index),
            gpu.name or "N/A",
            "N/A" if gpu.utilization is None else f"{gpu.utilization}%",
            f"{gib(gpu.memory_used)} / {gib(gpu.memory_total)}",
            processes or "-",
        )
    return table


@app.command()
def gpus(logs_dir: Path = LogsDirOption) -> None:
    """The GPUs now: utilisation, memory, and which experiments of the latest run use them
    (for a run on a Ray cluster, every node's GPUs as its supervisor last recorded them)."""
    from rich.console import Console

    from sa2va_tui.gpus import read_gpus
    from sa2va_tui.runstore import RunStoreError, find_run, load_run, load_run_config, read_gpu_samples
    from sa2va_tui.text import format_clock

    workers: dict[int, str] = {}
    try:
        latest = load_run(find_run(None, logs_dir))
        if latest.supervised:
            workers = {s.pid: name for name, s in latest.experiments.items() if s.pid}
            samples = read_gpu_samples(latest.path) if load_run_config(latest.path).run.backend == "ray" else []
            if samples:
                # The cluster's GPUs are read on their nodes; this machine sees none of them.
                typer.echo(f"run {latest.run_id} on Ray, as of {format_clock(samples[-1].time)}: {samples[-1].message}")
                if samples[-1].available:
                    Console().print(gpu_table(samples[-1].snapshot))
                return
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
    stalled_after: float = typer.Option(
        300.0, "--stalled-after", min=1.0, metavar="SECONDS", help="A log silent this long shows as stalled."),
    headless: bool = HeadlessOption,
) -> None:
    """Show experiments started elsewhere, from their log files.

    A log read to its end at --total shows as finished; one silent for --stalled-after
    seconds as stalled."""
    from sa2va_tui.logtail import LogWatcher

    # A folder, a pipe, a device: followed as a file, it would never end or never read.
    not_files = [str(p) for p in logs if p.exists() and not p.is_file()]
    if not_files:
        fail(f"not a regular file: {', '.join(not_files)} (watch follows log files)")
    missing = [str(p) for p in logs if not p.is_file()]
    if missing and not follow:
        fail(f"no such log file: {', '.join(missing)}")
    watcher = LogWatcher(logs, total=total, follow=follow, stalled_after=stalled_after)
    if not headless:
        from sa2va_tui.app import AppSource

        _show_app(AppSource.of_watcher(watcher))
    watcher.start()
    _show(watcher)
