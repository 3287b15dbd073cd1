"""Small text pictures the widgets are drawn from: bars, sparklines, state colours.

Plain functions of their inputs, so that a widget can build its content once per change
and the snapshot tests see exactly the same characters every time.
"""

from __future__ import annotations

import math
from typing import Sequence

from textual.content import Content

SPARK = "▁▂▃▄▅▆▇█"
FULL, HALF_END, EMPTY = "━", "╸", "━"

#: Colour of each experiment state (Textual theme variables).
STATE_STYLES = {
    "pending": "$text-muted",
    "queued": "$text-muted",
    "running": "$success",
    "paused": "$warning",
    "restarting": "$warning",
    "failed": "bold $error",
    "finished": "$accent",
    "stopped": "$text-muted",
}
#: A mark before the state word, so that it reads without colour too.
STATE_MARKS = {
    "pending": "○",
    "queued": "◌",
    "running": "▶",
    "paused": "⏸",
    "restarting": "↻",
    "failed": "✗",
    "finished": "✓",
    "stopped": "■",
}


def state_label(state: str) -> Content:
    """The state with its mark and colour; `state` may carry a detail: "failed (oom)"."""
    word = state.split(" ", 1)[0]
    return Content.styled(f"{STATE_MARKS.get(word, '?')} {state}", STATE_STYLES.get(word, ""))


def bar(fraction: float | None, width: int, style: str = "$success") -> Content:
    """A progress bar `width` cells wide; all background when the fraction is unknown."""
    width = max(0, width)
    if fraction is None:
        return Content.styled(EMPTY * width, "$surface-lighten-2")
    halves = round(max(0.0, min(1.0, fraction)) * width * 2)
    full, half = divmod(halves, 2)
    done = FULL * full + (HALF_END if half else "")
    return Content.assemble((done, style), (EMPTY * (width - len(done)), "$surface-lighten-2"))


def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values as block characters scaled between their min and max."""
    shown = [v for v in values if math.isfinite(v)][-width:] if width > 0 else []
    if not shown:
        return ""
    low, high = min(shown), max(shown)
    if high == low:
        return SPARK[len(SPARK) // 2] * len(shown)
    top = len(SPARK) - 1
    return "".join(SPARK[round((v - low) / (high - low) * top)] for v in shown)


def number(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)
