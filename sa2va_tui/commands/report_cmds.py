"""`report`, `evaluate`, `tensorboard`, `runs`: what runs produced, from their folders."""

from __future__ import annotations

import enum
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from sa2va_tui.commands.common import LogsDirOption, app, fail, find_run_or_exit, load_run_or_exit

RunArgument = typer.Argument(None, help="A run folder or run id (default: the latest run).")
#: TensorBoard binds here only: its pages must not be reachable from other machines.
LOCALHOST = "127.0.0.1"
#: How long TensorBoard may take to answer before the command gives up on it.
TENSORBOARD_START_S = 60.0


class ReportFormat(str, enum.Enum):
    md = "md"
    json = "json"


class ReportLang(str, enum.Enum):
    en = "en"
    zh = "zh"


@app.command()
def report(
    run: Optional[str] = RunArgument,
    format_: ReportFormat = typer.Option(ReportFormat.md, "--format", help="Markdown or JSON."),
    lang: ReportLang = typer.Option(ReportLang.en, "--lang", help="English or Chinese."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", metavar="FILE",
        help="Write the report to FILE and its learning curves as PNG images next to it "
             "(default: show it in the terminal)."),
    logs_dir: Path = LogsDirOption,
) -> None:
    """The status report of a run, from its folder alone: during the run or after it."""
    from sa2va_tui.report import read_report, render_json, render_markdown, write_curves
    from sa2va_tui.runstore import RunStoreError

    run_dir = find_run_or_exit(run, logs_dir)
    if output is not None:
        _refuse_overwriting_the_run(run_dir, output)
    try:
        data = read_report(run_dir)
    except RunStoreError as err:
        fail(str(err))
    render = render_json if format_ is ReportFormat.json else render_markdown
    if output is None:
        text = render(data, lang.value)
        if format_ is ReportFormat.json:
            typer.echo(text)
        else:
            from rich.console import Console
            from rich.markdown import Markdown

            Console().print(Markdown(text))
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        curves = write_curves(data, output)
        output.write_text(render(data, lang.value, curves), encoding="utf-8")
    except OSError as err:
        fail(f"{output}: {err.strerror or err}")
    typer.echo(f"report: {output}")
    for path in curves.values():
        typer.echo(f"curves: {path}")


def _refuse_overwriting_the_run(run_dir: Path, output: Path) -> None:
    """`-o FILE` may put a report in the run folder, never over the run's own records
    (its state, events, config, evaluation) or into an experiment's folder."""
    from sa2va_contract.layout import RUN_RECORDS

    target, run_root = output.resolve(), run_dir.resolve()
    if target.parent == run_root and target.name in RUN_RECORDS:
        fail(f"-o {output}: is the run's own {target.name}; choose another file")
    if run_root in target.parents and target.parent != run_root:
        fail(f"-o {output}: inside an experiment's folder of the run; choose a file beside them")


@app.command()
def evaluate(
    run: str = typer.Argument(..., help="A run folder, a run id under --logs-dir, or 'latest'."),
    split: Optional[str] = typer.Option(
        None, "--split", help="The split that reports: train, val or test (default: test; val, with a warning, "
                              "for a dataset without a test split)."),
    by: Optional[str] = typer.Option(
        None, "--by", metavar="condition|difficulty",
        help="Also show where each row's gain comes from: by the dataset's condition, or by quarter of the "
             "baseline's Dice."),
    logs_dir: Path = LogsDirOption,
) -> None:
    """Score the baselines and every experiment of a run (every seed), all rows on the same images.

    Train learns, val chooses, test reports. Prints the table and keeps it in the run
    folder (evaluation.json) for the report and `runs`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sa2va_contract.config import SPLITS
    from sa2va_contract.evaluation import BREAKDOWNS
    from sa2va_contract.layout import EVALUATION_FILE
    from sa2va_tui import engine
    from sa2va_tui.headless import QuietConsole
    from sa2va_tui.runstore import RunStoreError, load_run, load_run_config
    from sa2va_tui.text import breakdown_table, evaluation_table, print_table, seeds_table, warning_text

    if split is not None and split not in SPLITS:
        fail(f"--split {split}: one of {', '.join(SPLITS)}")
    if by is not None and by not in BREAKDOWNS:
        fail(f"--by {by}: one of {', '.join(BREAKDOWNS)}")
    run_dir = find_run_or_exit(run, logs_dir)
    try:
        snapshot, config = load_run(run_dir), load_run_config(run_dir)
    except RunStoreError as err:
        fail(str(err))
    finished = [name for name, s in snapshot.experiments.items() if s.state == "finished"]
    if not finished:
        states = ", ".join(f"{name} {s.state}" for name, s in snapshot.experiments.items())
        fail(f"{snapshot.run_id}: no experiment has finished yet ({states})")
    # `evaluate | head`: a reader that goes away silences the table, not the evaluation
    # (it is kept in the run folder all the same).
    console = QuietConsole()
    for name, s in snapshot.experiments.items():
        if s.state != "finished":
            console.print(f"note: {name} has not finished ({s.state}); a model it saved so far is evaluated if any",
                          highlight=False, soft_wrap=True)

    columns = (TextColumn(f"evaluating on {split or 'the reported split'}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("evaluate", total=None)
        table = engine.evaluate_run(config, run_dir, split,
                                    on_progress=lambda done, total: bar.update(task, completed=done, total=total))
    print_table(console, evaluation_table(table))
    per_seed = seeds_table(table)
    if per_seed is not None:
        print_table(console, per_seed)
    if by is not None:
        groups = breakdown_table(table, by)
        if groups is not None:
            print_table(console, groups)
        else:
            console.print(f"--by {by}: the dataset names no condition per image; --by difficulty works on any dataset")
    if table.warning:
        console.print(f"warning: {warning_text(table)}", highlight=False, soft_wrap=True)
    console.print(f"saved: {run_dir / EVALUATION_FILE}", highlight=False, soft_wrap=True)


@app.command()
def tensorboard(
    run: Optional[str] = RunArgument,
    port: int = typer.Option(6006, "--port", min=1, max=65535, help="The port, on 127.0.0.1 only."),
    logs_dir: Path = LogsDirOption,
) -> None:
    """One TensorBoard over every experiment of a run, on 127.0.0.1 only.

    Each experiment is its own named run, on one port; Ctrl+C (or SIGTERM, SIGHUP) stops it."""
    from sa2va_tui.runstore import tensorboard_dir
    from sa2va_tui.signals import StopRequests

    snapshot = load_run_or_exit(run, logs_dir)
    run_dir = snapshot.path
    folders = {name: tensorboard_dir(run_dir / name) for name in snapshot.experiments}
    spec = {name: folder.resolve() for name, folder in folders.items() if folder is not None}
    if not spec:
        fail(f"{snapshot.run_id}: no experiment has written TensorBoard files yet")
    for name, folder in spec.items():
        if ":" in name or "," in str(folder) or ":" in str(folder):
            fail(f"{folder}: TensorBoard's --logdir_spec cannot name a run or folder with ':' or ','")
    _check_port_free(port)
    log = Path(tempfile.mkstemp(prefix="sa2va-tensorboard-", suffix=".log")[1])
    # Whatever ends this command ends TensorBoard too: a stop signal only takes note,
    # and the child is stopped on the way out. Stopped as asked is a success (exit 0).
    with StopRequests() as requests:
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "tensorboard.main", "--logdir_spec",
                 ",".join(f"{name}:{folder}" for name, folder in spec.items()), "--host", LOCALHOST, "--port",
                 str(port)], stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_until_serving(process, port, log, requests)
            missing = [name for name, folder in folders.items() if folder is None]
            typer.echo(f"TensorBoard at http://{LOCALHOST}:{port}/ with runs {', '.join(spec)}"
                       + (f" (no TensorBoard files yet: {', '.join(missing)})" if missing else "")
                       + f"; its log: {log}; Ctrl+C stops it")
            code = None
            while code is None and not requests.stop.is_set():
                try:
                    code = process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
        except KeyboardInterrupt:
            code = None
        finally:
            _stop(process)
    if code:
        fail(f"tensorboard exited with code {code}: {_last_line(log)}")
    log.unlink(missing_ok=True)  # kept only when something went wrong


def _check_port_free(port: int) -> None:
    """Fail now, in one line, rather than let TensorBoard fail in its own words."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOCALHOST, port))
        except OSError:
            fail(f"port {port} on {LOCALHOST} is in use; choose another with --port")


def _wait_until_serving(process: subprocess.Popen, port: int, log: Path, requests) -> None:
    """Return once TensorBoard accepts connections (or a stop signal came); fail if it
    exits or takes too long."""
    deadline = time.monotonic() + TENSORBOARD_START_S
    while time.monotonic() < deadline and not requests.stop.is_set():
        if process.poll() is not None:
            fail(f"tensorboard exited with code {process.returncode}: {_last_line(log)}")
        try:
            with socket.create_connection((LOCALHOST, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    if requests.stop.is_set():
        return
    _stop(process)
    fail(f"tensorboard did not answer on port {port} within {TENSORBOARD_START_S:g} s; its log: {log}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"no output (see {log})"


@app.command()
def runs(logs_dir: Path = LogsDirOption) -> None:
    """The runs under --logs-dir: id, start, each experiment's state, the best evaluated Dice.

    An experiment shows as interrupted when its supervisor went away before it ended; a
    run whose run.json cannot be read shows as unreadable, with the reason."""
    from rich.table import Table

    from sa2va_tui.report.facts import shown_state
    from sa2va_tui.runstore import scan_runs
    from sa2va_tui.text import format_time, output_console

    found = scan_runs(logs_dir)
    if not found:
        typer.echo(f"{logs_dir}: no runs yet")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("run", "started", "experiments", "best Dice, Δ [95 % interval]"):
        table.add_column(column, no_wrap=True)
    for entry in found:
        snapshot = entry.snapshot
        if snapshot is None:
            reason = entry.problem.reason if entry.problem is not None else "unknown"
            table.add_row(entry.path.name, format_time(entry.created_at), f"unreadable: {reason}", "-")
            continue
        live = snapshot.supervised
        states = "\n".join(f"{name} {shown_state(s, live)}" for name, s in snapshot.experiments.items()) or "-"
        table.add_row(snapshot.run_id, format_time(snapshot.created_at), states, _headline_dice(entry.path))
    console = output_console()
    console.print(table)


def _headline_dice(run_dir: Path) -> str:
    """`0.7312 combined +0.0210 [+0.0150, +0.0270] (val chose, test reports)`: the best
    row on the reported split, its gain over the baseline with its interval ("within
    noise" where that covers 0), and the splits; where that row is a baseline, the best
    method's figure too."""
    from sa2va_contract.evaluation import load_evaluation
    from sa2va_tui.text import interval_text, splits_text

    table = load_evaluation(run_dir)
    best = table.best() if table is not None else None
    if best is None:
        return "-"
    def figure(row) -> str:
        gain = interval_text(row.interval) if row.interval is not None else f"{table.delta(row, 'dice'):+.4f}"
        return f"{row.mean('dice'):.4f} {row.name} {gain}"

    line = f"{figure(best)} ({splits_text(table)})"
    methods = [row for row in table.rows if row.is_method]
    if not best.is_method and methods:
        # The best row is a baseline: say how the best method of the run did.
        line += f"; best method: {figure(max(methods, key=lambda row: row.mean('dice')))}"
    return line
