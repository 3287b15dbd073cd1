"""`compare`: experiments of several runs side by side, from their folders."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Optional

import typer

from sa2va_tui.commands.common import LogsDirOption, app, fail, find_run_or_exit


class CompareFormat(str, enum.Enum):
    md = "md"
    json = "json"
    csv = "csv"


@app.command()
def compare(
    runs: list[str] = typer.Argument(..., help="Run folders or run ids under --logs-dir ('latest' too)."),
    format_: CompareFormat = typer.Option(CompareFormat.md, "--format", help="Markdown, JSON or CSV."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", metavar="FILE",
        help="Write the table to FILE and the overlaid learning curves as a PNG next to it (FILE-curves.png)."),
    logs_dir: Path = LogsDirOption,
) -> None:
    """Experiments of several runs side by side: the settings that differ, best and
    final learning-curve values, reported Dice, wall time, OOM restarts, state."""
    from sa2va_tui import compare as comparing
    from sa2va_tui.runstore import RunStoreError

    run_dirs = [find_run_or_exit(ref, logs_dir) for ref in runs]
    try:
        comparison = comparing.compare_runs(run_dirs)
    except RunStoreError as err:
        fail(str(err))
    render = {CompareFormat.md: comparing.render_markdown, CompareFormat.json: comparing.render_json,
              CompareFormat.csv: comparing.render_csv}[format_]
    text = render(comparison)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        curves = comparing.write_curves(comparison, output.with_name(f"{output.stem}-curves.png"))
    except OSError as err:
        fail(f"{output}: {err.strerror or err}")
    typer.echo(f"comparison: {output}")
    if curves is not None:
        typer.echo(f"curves: {curves}")
