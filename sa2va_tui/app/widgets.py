"""The panels of the dashboard. Each widget is given a plain "view" (a frozen value of
what it shows) and redraws only when the view changed, so a calm run costs nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from rich.markup import escape
from textual.content import Content
from textual.message import Message
from textual.widget import Widget

from sa2va_tui.analysis import PPO_METRICS, REWARD_NET_METRICS, Hint, hints, reward_trend
from sa2va_contract.events import GpuSample
from sa2va_tui.text import format_clock, format_duration, place_name
from sa2va_tui.runstate import ExperimentState

from sa2va_tui.app.render import STATE_MARKS, STATE_STYLES, bar, number, sparkline, state_label

#: The screen class (a vertical breakpoint) under which cards get a fourth line.
TALL = "-tall"
GIB = 1024**3


class ViewWidget(Widget):
    """A widget drawn from a view value; `show(view)` refreshes only on a change."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.view: Any = None

    def show(self, view: Any) -> None:
        if view != self.view:
            # A new layout only when the height changes: laying out the screen costs
            # several times more than repainting one widget.
            layout = self.height_of(view) != self.height_of(self.view)
            self.view = view
            self.refresh(layout=layout)

    def height_of(self, view: Any) -> int | None:
        """The lines a view takes, as far as it differs between views (default: never)."""
        return None if view is None else 0


def is_reward_net(state: ExperimentState) -> bool:
    return state.kind == "reward_net" or any(key.startswith("reward/") for key in state.metrics)


@dataclass(frozen=True)
class CardView:
    number: int
    name: str
    state: str
    details: tuple[str, ...]
    fraction: float | None
    progress: str
    figures: str
    rewards: tuple[float, ...]
    trend: str | None
    extra: tuple[str, ...]

    @classmethod
    def of(cls, index: int, s: ExperimentState, rewards: Sequence[float], now: float) -> "CardView":
        phase = (s.phase or "").replace("_", " ")
        # The bar is the training's progress: a count of its own here would read as a
        # second, different progress (fine-tuning steps against all steps).
        if phase and s.phase_total and s.phase != "training":
            phase += f" {s.phase_done or 0}/{s.phase_total} ({(s.phase_done or 0) / s.phase_total:.0%})"
        details = [phase] if phase else []
        if s.state == "queued":
            details = [f"#{s.queue_position or '?'} in line, waiting {format_duration(s.waited_s(now))}"]
        if s.pid is not None:  # a process of ours: where it runs is known
            details += [place_name(s.gpu, s.host), f"pid {s.pid}"]
        if s.batch_size:
            details.append(f"batch {s.batch_size}")
        progress = f"{s.timesteps:,}/{s.total:,}" if s.total else f"{s.timesteps:,} steps"
        if s.fraction is not None:
            progress += f" {s.fraction:4.0%}"
        if not s.terminal:
            eta = s.eta_at(now)
            progress += f"  ETA {format_duration(eta)}" if eta is not None else "  ETA ?"
        if is_reward_net(s):
            figures = " · ".join(f"{row.label} {row.format(s.metrics)}" for row in REWARD_NET_METRICS
                                 if row.key in s.metrics) or "no figures yet"
            rewards, trend = (), None
        else:
            length = s.metrics.get("rollout/ep_len_mean")
            figures = f"ep len {number(length, '.3g')}"
            rewards, trend = tuple(rewards), reward_trend(rewards)
        extra = [f"attempt {s.attempts}"] if s.attempts > 1 else []
        if s.oom_restarts:
            extra.append(f"{s.oom_restarts} OOM restart{'s' if s.oom_restarts > 1 else ''}")
        if s.checkpoint_step is not None:
            extra.append(f"checkpoint at {s.checkpoint_step:,}")
        if s.state == "failed" and s.failure:
            extra.append(f"{s.failure.kind}: {s.failure.message}")
        state = s.state
        if state == "failed" and s.failure:
            state += f" ({s.failure.kind})"
        return cls(index, s.name, state, tuple(details), s.fraction, progress, figures, rewards, trend, tuple(extra))

    @classmethod
    def of_stage(cls, index: int, s: ExperimentState, now: float) -> "CardView":
        """The mask stage's card: pairs done of those to compute, rate, ETA, devices, and
        the experiments whose pairs are all in."""
        details = [(s.phase or "").replace("_", " ")] if s.phase and not s.terminal else []
        details += [", ".join(s.devices)] if s.devices else []
        if s.pid is not None:
            details.append(f"pid {s.pid}")
        progress = f"{s.timesteps:,}/{s.total:,} pairs" if s.total else ("no pair to compute" if s.phase_total == 0
                                                                          else "pairs: counting")
        if s.fraction is not None:
            progress += f" {s.fraction:4.0%}"
        if not s.terminal and s.total:
            eta = s.eta_at(now)
            progress += f"  ETA {format_duration(eta)}" if eta is not None else "  ETA ?"
        rate = f"{s.rate:,.0f} pairs/s" if s.rate else "pairs/s -"
        ready = f"ready: {', '.join(s.pairs_ready)}" if s.pairs_ready else "ready: none yet"
        counts = f"{s.distinct_pairs:,} distinct, {s.cache_hits:,} cached" if s.distinct_pairs is not None else ""
        figures = " · ".join(part for part in (rate, ready, counts) if part)
        extra = [f"{s.failure.kind}: {s.failure.message}"] if s.state == "failed" and s.failure else []
        state = s.state + (f" ({s.failure.kind})" if s.state == "failed" and s.failure else "")
        return cls(index, "mask stage", state, tuple(details), s.fraction, progress, figures, (), None, tuple(extra))


class ExperimentCard(ViewWidget):
    """One experiment at a glance; a click selects it."""

    class Chosen(Message):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.experiment = name

    @property
    def lines(self) -> int:
        """Three lines; a fourth (attempts, checkpoint, failure) where the terminal is tall."""
        return 4 if self.screen.has_class(TALL) else 3

    def get_content_height(self, container: Any, viewport: Any, width: int) -> int:
        return self.lines

    def render(self) -> Content:
        v: CardView | None = self.view
        if v is None:
            return Content(self.experiment)
        width = self.size.width
        head = Content.assemble((f"{v.number} {v.name}", "bold"), "  ", state_label(v.state))
        if v.details:
            head += Content.styled("  " + " · ".join(v.details), "$text-muted")
        progress = bar(v.fraction, max(8, width - len(v.progress) - 1)) + " " + v.progress
        lines = [head, progress, self._figures(v, width)]
        if self.lines == 4:
            lines.append(Content.styled(" · ".join(v.extra), "$error" if v.state == "failed" else "$text-muted"))
        return Content("\n").join(line.truncate(width, ellipsis=True) for line in lines)

    @staticmethod
    def _figures(v: CardView, width: int) -> Content:
        if not v.rewards and v.trend is None:
            reward = "reward -" if v.figures.startswith("ep len") else ""
            return Content(f"{reward}   {v.figures}" if reward else v.figures)
        latest = v.rewards[-1]
        spark_width = max(8, min(40, width // 3))
        trend_style = {"rising": "$success", "falling": "$error"}.get(v.trend or "", "$text-muted")
        return Content.assemble(
            "reward ", (f"{latest:.4g}", "bold"), " ", (sparkline(v.rewards, spark_width), "$accent"), " ",
            (v.trend or "", trend_style), "   ", v.figures,
        )

    def on_click(self) -> None:
        self.post_message(self.Chosen(self.experiment))


class TitleBar(ViewWidget):
    """The run, how many experiments are in each state, and when it all should end."""

    def render(self) -> Content:
        title, counts, finish = self.view or ("", (), "")
        parts = [Content.styled("sa2va-tui", "bold"), f"  {title}  ", Content.styled(finish, "bold")]
        for state, n in counts:
            parts += ["  ", Content.styled(f"{STATE_MARKS[state]} {n} {state}", STATE_STYLES[state])]
        return Content.assemble(*parts).truncate(self.size.width, ellipsis=True)

    @staticmethod
    def view_of(title: str, states: dict[str, ExperimentState], finish: float | None, now: float) -> tuple:
        counts = tuple((state, n) for state in STATE_MARKS
                       if (n := sum(s.state == state for s in states.values())))
        if states and all(s.terminal for s in states.values()):
            when = "all ended at " + format_clock(max((s.ended_at or 0) for s in states.values()) or None)
        elif finish is None:
            when = "finish: not known yet"
        else:
            when = f"finish {format_clock(finish)} (in {format_duration(finish - now)})"
        return title, counts, when


@dataclass(frozen=True)
class MetricsView:
    names: tuple[str, ...]
    #: (label, cells) where a cell is (text, flagged).
    rows: tuple[tuple[str, tuple[tuple[str, bool], ...]], ...]
    hints: tuple[tuple[str, Hint], ...]

    @classmethod
    def of(cls, states: dict[str, ExperimentState], rewards: dict[str, Sequence[float]]) -> "MetricsView":
        names = tuple(states)
        found = {name: hints(s.metrics, rewards.get(name, ())) for name, s in states.items()}
        flagged = {(name, h.key) for name, hs in found.items() for h in hs if h.level == "warn"}
        rows = []
        for row in (*PPO_METRICS, *REWARD_NET_METRICS):
            if any(row.key in s.metrics for s in states.values()):
                rows.append((row.label, tuple((row.format(s.metrics), (name, row.key) in flagged)
                                              for name, s in states.items())))
        return cls(names, tuple(rows), tuple((name, h) for name, hs in found.items() for h in hs))


class MetricsPanel(ViewWidget):
    """The training metrics of every experiment side by side, and what they suggest."""

    LABEL = 19

    def render(self) -> Content:
        v: MetricsView | None = self.view
        if v is None or not v.rows:
            return Content.styled("no metrics yet", "$text-muted")
        width = self.size.width
        column = max(8, min(16, (width - self.LABEL) // max(1, len(v.names))))
        lines = [Content.assemble(" " * self.LABEL, *(Content.styled(self._cell(n, column), "bold") for n in v.names))]
        for label, cells in v.rows:
            lines.append(Content.assemble(
                Content.styled(label.ljust(self.LABEL), "$text-muted"),
                *((self._cell(text, column), "bold $warning" if flagged else "") for text, flagged in cells),
            ))
        for name, hint in v.hints:
            style = "$warning" if hint.level == "warn" else "$text-muted"
            lines.append(Content.assemble(("! " if hint.level == "warn" else "· ", style), (name, "bold"),
                                          ": ", (hint.text, style)))
        return Content("\n").join(line.truncate(width, ellipsis=True) for line in lines)

    def height_of(self, view: MetricsView | None) -> int | None:
        return None if view is None else 1 + len(view.rows) + len(view.hints)

    @staticmethod
    def _cell(text: str, width: int) -> str:
        return (text if len(text) < width else text[: width - 2] + "…").rjust(width)


@dataclass(frozen=True)
class GpuView:
    available: bool | None
    message: str
    gpus: tuple[tuple[Any, ...], ...]
    #: The host of each entry of `gpus` (None: this machine): on a cluster they are grouped by it.
    hosts: tuple[str | None, ...] = ()

    @property
    def grouped(self) -> bool:
        return any(host is not None for host in self.hosts)

    @property
    def lines(self) -> int:
        return 2 * len(self.gpus) + (len(set(self.hosts)) if self.grouped else 0)

    @classmethod
    def of(cls, sample: GpuSample | None, states: dict[str, ExperimentState], sampled: bool = True) -> "GpuView":
        """`sampled` is False for a source that never reads the GPUs (the log watcher)."""
        if sample is None:
            return cls(None, "GPUs: not read yet" if sampled else
                       "GPUs are not read while watching logs; `sa2va-tui gpus` shows them", ())
        gpus = []
        # By host (the order a cluster's nodes were listed in), then as NVML numbers them.
        order = {host: i for i, host in enumerate(dict.fromkeys(g.host for g in sample.gpus))}
        for gpu in sorted(sample.gpus, key=lambda g: order[g.host]):
            users = tuple((p.experiment or f"pid {p.pid}", p.used_memory) for p in gpu.processes)
            # Ours placed on this GPU but not (yet) listed by NVML, e.g. still loading.
            listed = {u for u, _ in users}
            users += tuple((s.name, None) for s in states.values()
                           if s.gpu == gpu.index and s.pid and s.name not in listed
                           and (gpu.host is None or s.host == gpu.host))
            gpus.append((gpu.index, (gpu.name or "N/A").removeprefix("NVIDIA "), gpu.utilization, gpu.memory_used,
                         gpu.memory_total, users))
        return cls(sample.available, sample.message, tuple(gpus),
                   tuple(g.host for g in sorted(sample.gpus, key=lambda g: order[g.host])))


class GpuPanel(ViewWidget):
    """Per GPU: utilisation and memory bars, and the experiments on it."""

    def height_of(self, view: GpuView | None) -> int | None:
        return None if view is None else (view.lines if view.available else 1)

    def render(self) -> Content:
        v: GpuView | None = self.view
        if v is None or v.available is None:
            return Content.styled(v.message if v else "", "$text-muted")
        if not v.available:
            return Content.styled(f"{v.message}: experiments run on the CPU", "$warning")
        width = self.size.width
        # Everything on a GPU's line but its two bars takes 52 cells.
        bar_width = max(4, min(20, (width - 52) // 2))
        lines = []
        host_shown = object()
        for (index, name, util, used, total, users), host in zip(v.gpus, v.hosts or (None,) * len(v.gpus)):
            if v.grouped and host != host_shown:
                lines.append(Content.styled(host or "this machine", "bold $accent"))
                host_shown = host
            util_text = "N/A" if util is None else f"{util:3d}%"
            mem_fraction = used / total if used is not None and total else None
            mem_text = "N/A" if mem_fraction is None else f"{used / GIB:.1f}/{total / GIB:.0f} GiB"
            lines.append(Content.assemble(
                (f"GPU {index} ", "bold"), (f"{name[:14]:<14} ", "$text-muted"),
                "util ", bar(None if util is None else util / 100, bar_width, "$accent"), f" {util_text}  ",
                "mem ", bar(mem_fraction, bar_width, "$accent"), f" {mem_text}",
            ))
            who = " · ".join(f"{user} {'?' if memory is None else f'{memory / GIB:.1f} GiB'}" for user, memory in users)
            lines.append(Content.styled(f"      {who or 'no processes'}", "$text-muted"))
        return Content("\n").join(line.truncate(width, ellipsis=True) for line in lines)


def event_line(when: float, who: str, text: str, style: str = "") -> str:
    """One event-log line in Rich markup (`text` is markup already)."""
    body = f"[{style}]{text}[/]" if style else text
    return f"[dim]{format_clock(when)}[/] [bold]{escape(who)}[/] {body}"
