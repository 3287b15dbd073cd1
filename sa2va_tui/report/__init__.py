"""The status report of a run, written from its folder alone: during the run, after it,
from any terminal.

    read_report(run_dir)               -> ReportData: the facts, in no language   (facts, indicators)
    write_curves(data, report_file)    -> learning curves as PNG files next to the report   (curves)
    render_markdown(data, lang, ...)   -> the report as Markdown   (to_markdown)
    render_json(data, lang, ...)       -> the same facts as JSON, its sentences in the language   (to_json)

Every sentence is in `i18n` in both languages and said through `phrases`. Every
judgement reuses the code that makes it elsewhere: states and ETAs from `runstate`,
hints and the reward trend from `analysis` (the same words the app shows), the
folder's contents from `runstore`. Nothing here imports torch; matplotlib only to
draw the curves.
"""

from __future__ import annotations

from pathlib import Path

from sa2va_tui.report.curves import write_curves
from sa2va_tui.report.facts import ReportData, read_facts
from sa2va_tui.report.indicators import check_indicators
from sa2va_tui.report.to_json import render_json
from sa2va_tui.report.to_markdown import render_markdown

__all__ = ["ReportData", "read_report", "render_json", "render_markdown", "write_curves"]


def read_report(run_dir: Path, now: float | None = None) -> ReportData:
    """Everything the report says, read from the run folder. Raises RunStoreError when
    it is not a run folder."""
    data = read_facts(run_dir, now)
    data.indicators = check_indicators(data)
    return data
