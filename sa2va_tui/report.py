"""The status report of a run, written from its folder alone: during the run, after it,
from any terminal.

    read_report(run_dir)               -> ReportData: the facts, in no language
    write_curves(data, report_file)    -> learning curves as PNG files next to the report
    render_markdown(data, lang, ...)   -> the report as Markdown (the terminal shows it with rich)
    render_json(data, lang, ...)       -> the same facts as JSON, its sentences in the language

Every judgement reuses the code that makes it elsewhere: the experiments' states and
ETAs come from `runstate`, the hints and the reward trend from `analysis` (the same
words the app shows), the evaluation table from `experiments.evaluate`. This module
reads files: it imports no torch, and matplotlib only to draw the curves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import struct
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from experiments.evaluate import EVALUATION_FILE, EvaluationTable
from experiments.metrics import METRIC_NAMES
from sa2va_tui.analysis import (
    HIGH_APPROX_KL,
    HIGH_CLIP_FRACTION,
    LOW_EXPLAINED_VARIANCE,
    PPO_METRICS,
    REWARD_NET_METRICS,
    Hint,
    MetricRow,
    hints,
    reward_trend,
)
from sa2va_tui.events import Checkpoint, Event, Failed, GpuSample, Metrics, Restarting, Started
from sa2va_tui.headless import format_duration
from sa2va_tui.report_i18n import Translator
from sa2va_tui.runstate import EPISODE_REWARD, ExperimentState, StateBook
from sa2va_tui.runstore import LOG_FILE, load_run, pid_alive, read_events, read_gpu_samples

EPISODE_LENGTH = "rollout/ep_len_mean"
#: What the reward network reports on top of `analysis.REWARD_NET_METRICS`: the
#: segmenter's val Dice before and after its fine-tuning.
REWARD_NET_EXTRA = ("finetune/val_dice_before", "finetune/val_dice_after")
#: A GPU whose utilisation varies more than this (standard deviation, in points)
#: while our experiments run on it is not used steadily.
GPU_STEADY_STD = 20.0
#: Entries shown per folder in the file tree; the rest are counted.
TREE_ENTRIES = 12
TENSORBOARD_DIR = "tensorboard"
TFEVENTS_GLOB = "events.out.tfevents.*"


# --- the facts --------------------------------------------------------------------------


@dataclass
class ExperimentReport:
    """One experiment as the run folder tells it."""

    state: ExperimentState
    #: The state to show: the recorded one, or "interrupted" when nobody runs it any more.
    shown_state: str
    #: Its process, while that runs.
    pid: int | None
    #: Every metric over steps (oldest first).
    series: dict[str, list[tuple[int, float]]]
    hints: list[Hint]
    trend: str | None
    remaining_s: float | None
    finish_at: float | None
    log: Path | None
    tensorboard: Path | None
    #: Records in its TensorBoard event files (each file starts with one version record).
    tensorboard_records: int
    checkpoint_exists: bool

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def remaining_timesteps(self) -> int | None:
        return max(0, self.state.total - self.state.timesteps) if self.state.total else None

    @property
    def rewards(self) -> list[float]:
        return [v for _, v in self.series.get(EPISODE_REWARD, [])]


@dataclass
class GpuReport:
    """One GPU: its latest sample, and how it was used over the recorded ones."""

    index: int
    name: str | None
    utilization: int | None
    memory_used: int | None
    memory_total: int | None
    #: (experiment, bytes or None) of ours on it.
    experiments: list[tuple[str, int | None]]
    samples: int
    #: Utilisation over the samples in which one of our experiments ran on it.
    busy_samples: int = 0
    util_mean: float | None = None
    util_std: float | None = None
    memory_peak: int | None = None


@dataclass
class Problem:
    """A failure or a restart, and what was done about it."""

    experiment: str
    time: float
    #: oom, error or killed (a failure); restart (a restart no failure caused);
    #: interrupted (left unfinished when its supervisor went away).
    kind: str
    message: str = ""
    step: int | None = None
    batch_size: int | None = None
    gpu: int | None = None
    exit_code: int | None = None
    #: The restart that followed: reason, attempt, changes, time.
    restart: dict[str, Any] | None = None
    #: The experiment's state now.
    outcome: str = ""


@dataclass
class Indicator:
    """A sign of success, checked from the data: pass, fail, or unknown."""

    name: str
    status: str
    #: What the check saw, for the sentence that tells it.
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportData:
    run_dir: Path
    run_id: str
    #: How a command names this run: its id when it lies under ./logs, else its path.
    run_ref: str
    created_at: float
    updated_at: float
    generated_at: float
    live: bool
    supervisor_pid: int | None
    experiments: dict[str, ExperimentReport]
    #: None: the run recorded no GPU sample.
    gpu_available: bool | None
    gpu_message: str
    gpu_sampled_at: float | None
    gpus: list[GpuReport]
    #: When the whole run should be done (live), or was done (finished); None otherwise.
    finish_at: float | None
    problems: list[Problem]
    indicators: list[Indicator]
    evaluation: EvaluationTable | None
    files: list[str]


def read_report(run_dir: Path, now: float | None = None) -> ReportData:
    """Everything the report says, read from the run folder. Raises RunStoreError when
    it is not a run folder."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    snapshot = load_run(run_dir)
    events = list(read_events(run_dir))
    samples = read_gpu_samples(run_dir)
    live = snapshot.supervised
    series = metric_series(events)
    experiments = {name: _experiment(run_dir, state, series.get(name, {}), live, now)
                   for name, state in snapshot.experiments.items()}
    last_sample = samples[-1] if samples else None
    data = ReportData(
        run_dir=run_dir,
        run_id=snapshot.run_id,
        run_ref=run_reference(run_dir),
        created_at=snapshot.created_at,
        updated_at=snapshot.updated_at,
        generated_at=now,
        live=live,
        supervisor_pid=snapshot.supervisor_pid if live else None,
        experiments=experiments,
        gpu_available=last_sample.available if last_sample else None,
        gpu_message=last_sample.message if last_sample else "",
        gpu_sampled_at=last_sample.time if last_sample else None,
        gpus=gpu_usage(samples),
        finish_at=_run_finish(snapshot.experiments, live, now),
        problems=find_problems(events, experiments),
        indicators=[],
        evaluation=load_evaluation(run_dir),
        files=file_tree(run_dir),
    )
    data.indicators = check_indicators(data)
    return data


def run_reference(run_dir: Path) -> str:
    """The run as `sa2va-tui <command> RUN` finds it from here (default --logs-dir)."""
    default = Path("logs") / run_dir.name
    if default.resolve() == run_dir.resolve():
        return run_dir.name
    return str(run_dir)


def metric_series(events: Iterable[Event]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every metric of every experiment over steps. A restart resumes from a checkpoint:
    what the earlier attempt logged past it is dropped, as progress.csv and TensorBoard
    drop it, so a curve never runs back on itself."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    checkpoint_steps: dict[str, int] = {}
    for event in events:
        if isinstance(event, Checkpoint):
            checkpoint_steps[event.path] = event.step
        elif isinstance(event, Started) and event.attempt > 1:
            keep = checkpoint_steps.get(event.resumed_from, 0) if event.resumed_from else 0
            for points in series[event.experiment].values():
                points[:] = [p for p in points if p[0] <= keep]
        elif isinstance(event, Metrics):
            for key, value in event.values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    series[event.experiment][key].append((event.step, float(value)))
    return {name: {k: v for k, v in metrics.items() if v} for name, metrics in series.items()}


def _experiment(run_dir: Path, state: ExperimentState, series: dict[str, list[tuple[int, float]]], live: bool,
                now: float) -> ExperimentReport:
    exp_dir = run_dir / state.name
    rewards = [v for _, v in series.get(EPISODE_REWARD, [])]
    remaining = state.eta_at(now) if live or state.state == "finished" else None
    if state.state == "finished":
        finish_at = state.ended_at
    else:
        finish_at = now + remaining if remaining is not None else None
    tensorboard = tensorboard_dir(exp_dir)
    log = exp_dir / LOG_FILE
    return ExperimentReport(
        state=state,
        shown_state=shown_state(state, live),
        pid=state.pid if live and pid_alive(state.pid) else None,
        series=series,
        hints=hints(state.metrics, rewards),
        trend=reward_trend(rewards),
        remaining_s=remaining,
        finish_at=finish_at,
        log=log if log.is_file() else None,
        tensorboard=tensorboard,
        tensorboard_records=sum(count_event_records(p) for p in exp_dir.rglob(TFEVENTS_GLOB)),
        checkpoint_exists=bool(state.last_checkpoint) and Path(state.last_checkpoint).is_file(),
    )


def shown_state(state: ExperimentState, live: bool) -> str:
    """The state to show: the recorded one, or "interrupted" for an experiment that had
    not ended when the supervisor of its run went away."""
    return state.state if live or state.terminal else "interrupted"


def _run_finish(states: dict[str, ExperimentState], live: bool, now: float) -> float | None:
    if states and all(s.state == "finished" for s in states.values()):
        return max((s.ended_at or 0.0) for s in states.values()) or None
    return StateBook(states).finish_time(now) if live else None


def load_evaluation(run_dir: Path) -> EvaluationTable | None:
    """The run's evaluation table, if it has been evaluated."""
    path = Path(run_dir) / EVALUATION_FILE
    if not path.is_file():
        return None
    try:
        return EvaluationTable.load(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # damaged, or from an incompatible version: the report goes on without it


def headline(table: EvaluationTable) -> tuple[str, float, float] | None:
    """The table's best result: the method (not the upper bound) with the highest mean
    Dice, with its difference from the baseline: (row name, Dice, delta)."""
    methods = [row for row in table.rows if row.kind != "upper_bound"]
    if not methods:
        return None
    best = max(methods, key=lambda row: row.mean("dice"))
    return best.name, best.mean("dice"), table.delta(best, "dice")


def tensorboard_dir(exp_dir: Path) -> Path | None:
    """Where an experiment's TensorBoard event files are: its `tensorboard/` folder, or
    the experiment folder itself for a layout of its own; None when it wrote none."""
    for candidate in (exp_dir / TENSORBOARD_DIR, exp_dir):
        if candidate.is_dir() and next(candidate.rglob(TFEVENTS_GLOB), None) is not None:
            return candidate
    return None


def count_event_records(path: Path) -> int:
    """How many records a TensorBoard event file holds (TFRecord framing: a length, its
    CRC, the data, the data's CRC). The first is the file's version, so a file with
    curves in it has more than one. A record cut short by a writer still at work is
    not counted."""
    count = 0
    try:
        with open(path, "rb") as f:
            while True:
                header = f.read(12)
                if len(header) < 12:
                    return count
                (length,) = struct.unpack("<Q", header[:8])
                f.seek(length + 4, os.SEEK_CUR)
                if f.tell() > os.fstat(f.fileno()).st_size:
                    return count
                count += 1
    except OSError:
        return count


def gpu_usage(samples: Sequence[GpuSample]) -> list[GpuReport]:
    """Per GPU: its latest sample, and its utilisation and memory over the samples in
    which one of our experiments ran on it."""
    if not samples or not samples[-1].available:
        return []
    history: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for sample in samples:
        for gpu in sample.gpus:
            history[gpu["index"]].append(gpu)
    reports = []
    for gpu in samples[-1].gpus:
        ours = [g for g in history[gpu["index"]] if any(p.get("experiment") for p in g["processes"])]
        utils = [g["utilization"] for g in ours if g["utilization"] is not None]
        memory = [g["memory_used"] for g in ours if g["memory_used"] is not None]
        reports.append(GpuReport(
            index=gpu["index"],
            name=gpu["name"],
            utilization=gpu["utilization"],
            memory_used=gpu["memory_used"],
            memory_total=gpu["memory_total"],
            experiments=[(p["experiment"], p["used_memory"]) for p in gpu["processes"] if p.get("experiment")],
            samples=len(history[gpu["index"]]),
            busy_samples=len(ours),
            util_mean=statistics.fmean(utils) if utils else None,
            util_std=statistics.pstdev(utils) if len(utils) > 1 else None,
            memory_peak=max(memory) if memory else None,
        ))
    return reports


def find_problems(events: Iterable[Event], experiments: dict[str, ExperimentReport]) -> list[Problem]:
    """Every failure with the restart that answered it, every restart no failure
    caused, and every experiment left unfinished by a supervisor that went away."""
    problems: list[Problem] = []
    open_failure: dict[str, Problem] = {}
    for event in events:
        if isinstance(event, Failed):
            problem = Problem(event.experiment, event.time, event.kind, event.message, event.step, event.batch_size,
                              event.gpu, event.exit_code)
            problems.append(problem)
            open_failure[event.experiment] = problem
        elif isinstance(event, Restarting):
            restart = {"reason": event.reason, "attempt": event.attempt, "changes": event.changes, "time": event.time}
            problem = open_failure.pop(event.experiment, None)
            if problem is None:
                problem = Problem(event.experiment, event.time, "restart")
                problems.append(problem)
            problem.restart = restart
    for problem in problems:
        known = experiments.get(problem.experiment)
        problem.outcome = known.shown_state if known else ""
    for name, exp in experiments.items():
        if exp.shown_state == "interrupted":
            problems.append(Problem(name, exp.state.updated_at, "interrupted", step=exp.state.timesteps,
                                    outcome="interrupted"))
    return problems


def file_tree(root: Path) -> list[str]:
    """The run folder as tree lines (name and size), long folders cut to their first
    and last entries."""
    lines = [f"{root.name}/"]

    def walk(folder: Path, prefix: str) -> None:
        try:
            entries = sorted(folder.iterdir(), key=lambda p: (not p.is_dir(), p.name))
        except OSError:
            return
        entries = [p for p in entries if not p.name.startswith(".")]  # temporary files of atomic writes
        shown: list[Path | int] = list(entries)
        if len(entries) > TREE_ENTRIES:
            head = TREE_ENTRIES - 3
            shown = [*entries[:head], len(entries) - head - 2, *entries[-2:]]
        for i, entry in enumerate(shown):
            last = i == len(shown) - 1
            branch = "└── " if last else "├── "
            if isinstance(entry, int):
                lines.append(f"{prefix}{branch}… (+{entry})")
            elif entry.is_dir():
                lines.append(f"{prefix}{branch}{entry.name}/")
                walk(entry, prefix + ("    " if last else "│   "))
            else:
                lines.append(f"{prefix}{branch}{entry.name}  {format_bytes(_size(entry))}")

    walk(root, "")
    return lines


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None  # removed between listing and looking (a checkpoint rotated away)


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GiB"


# --- success indicators -----------------------------------------------------------------


def check_indicators(data: ReportData) -> list[Indicator]:
    """The signs of success, each checked from what the run recorded."""
    return [_reward_rising(data), _no_crash(data), _checkpoints_saved(data), _tensorboard_written(data),
            _gpu_steady(data)]


def _status(ok: Iterable[bool]) -> str:
    """pass when every check holds, fail when one does not, unknown with none to make."""
    ok = list(ok)
    if not ok:
        return "unknown"
    return "pass" if all(ok) else "fail"


def _reward_rising(data: ReportData) -> Indicator:
    """By `analysis.reward_trend`, for every experiment that has an episode reward."""
    trends = {name: exp.trend for name, exp in data.experiments.items() if exp.rewards}
    readings = {name: len(data.experiments[name].rewards) for name in trends}
    judged = [t for t in trends.values() if t is not None]
    return Indicator("reward_rising", _status(t == "rising" for t in judged),
                     {"trends": trends, "readings": readings})


def _no_crash(data: ReportData) -> Indicator:
    crashes = [p.experiment for p in data.problems if p.kind in ("error", "killed")]
    failed = [name for name, exp in data.experiments.items() if exp.state.state == "failed"]
    ooms = [p for p in data.problems if p.kind == "oom"]
    return Indicator("no_crash", "fail" if crashes or failed else "pass",
                     {"crashes": crashes, "failed": failed, "oom": [p.experiment for p in ooms],
                      "oom_restarted": sum(p.restart is not None for p in ooms)})


def _checkpoints_saved(data: ReportData) -> Indicator:
    """Every experiment that trained has a last checkpoint, and the file is there."""
    trained = {name: exp for name, exp in data.experiments.items() if exp.state.timesteps > 0}
    checkpoints = {name: {"step": exp.state.checkpoint_step, "exists": exp.checkpoint_exists}
                   for name, exp in trained.items()}
    return Indicator("checkpoints_saved", _status(c["exists"] for c in checkpoints.values()),
                     {"checkpoints": checkpoints})


def _tensorboard_written(data: ReportData) -> Indicator:
    """Every experiment that trained wrote TensorBoard records beyond the file header."""
    records = {name: exp.tensorboard_records for name, exp in data.experiments.items() if exp.state.timesteps > 0}
    return Indicator("tensorboard_written", _status(n > 1 for n in records.values()), {"records": records})


def _gpu_steady(data: ReportData) -> Indicator:
    """Utilisation varied little on every GPU while our experiments ran on it."""
    if data.gpu_available is None:
        return Indicator("gpu_steady", "unknown", {"reason": "no_samples"})
    if not data.gpu_available:
        return Indicator("gpu_steady", "unknown", {"reason": "no_gpu", "message": data.gpu_message})
    spread = {g.index: g.util_std for g in data.gpus if g.util_std is not None}
    if not spread:
        return Indicator("gpu_steady", "unknown", {"reason": "too_few"})
    return Indicator("gpu_steady", _status(s <= GPU_STEADY_STD for s in spread.values()),
                     {"std": spread, "limit": GPU_STEADY_STD})


# --- learning curves ----------------------------------------------------------------


def curve_panels(data: ReportData) -> dict[str, list[str]]:
    """The metrics each curve image shows (those the run has): the episode reward; the
    main PPO metrics (the app's table, less the speed counters); the reward network's."""
    ppo = [row.key for row in PPO_METRICS if row.key != EPISODE_REWARD and not row.key.startswith("time/")]
    reward_net = [row.key for row in REWARD_NET_METRICS]
    have = {key for exp in data.experiments.values() for key in exp.series}
    panels = {"episode_reward": [EPISODE_REWARD], "ppo_metrics": ppo, "reward_net": reward_net}
    return {name: [k for k in keys if k in have] for name, keys in panels.items() if any(k in have for k in keys)}


def curve_path(report_file: Path, curve: str) -> Path:
    return report_file.with_name(f"{report_file.stem}-{curve}.png")


def write_curves(data: ReportData, report_file: Path) -> dict[str, Path]:
    """Draw every experiment's curves over its steps as PNG files next to `report_file`;
    returns them by curve name."""
    # The Figure API draws with the Agg canvas for a PNG and leaves pyplot's global
    # state (and any GUI backend) alone.
    from matplotlib.figure import Figure

    written = {}
    for curve, keys in curve_panels(data).items():
        columns = min(3, len(keys))
        rows = -(-len(keys) // columns)
        figure = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax, key in zip(axes, keys):
            for name, exp in data.experiments.items():
                points = exp.series.get(key)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None,
                            label=name)
            ax.set_title(key, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[len(keys):]:
            ax.set_visible(False)
        path = curve_path(report_file, curve)
        figure.savefig(path, dpi=100)
        written[curve] = path
    return written


# --- rendering ----------------------------------------------------------------------


def format_time(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _code(text: Any) -> str:
    """An identifier, path, command or message as Markdown code, on one line."""
    return "`" + " ".join(str(text).replace("`", "'").split()) + "`"


def _gpu_name(gpu: int | None) -> str:
    return "CPU" if gpu is None else f"GPU {gpu}"


def _progress(state: ExperimentState) -> str:
    text = f"{state.timesteps}/{state.total or '?'}"
    return text + (f" ({state.fraction:.0%})" if state.fraction is not None else "")


def _number(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """A Markdown table; `align` gives each column l or r (default l)."""
    marks = [("---:" if (align[i:i + 1] == "r") else "---") for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def metric_rows(state: ExperimentState) -> tuple[MetricRow, ...]:
    """The metrics to show for an experiment of this kind (the app's own lists)."""
    if state.kind == "reward_net":
        return REWARD_NET_METRICS + tuple(MetricRow(key, key, ".4f") for key in REWARD_NET_EXTRA)
    return PPO_METRICS


#: The threshold each hint of `analysis` compares with, for its translation.
_HINT_LIMITS = {
    "train/explained_variance": LOW_EXPLAINED_VARIANCE,
    "train/approx_kl": HIGH_APPROX_KL,
    "train/clip_fraction": HIGH_CLIP_FRACTION,
}


def hint_text(hint: Hint, exp: ExperimentReport, tr: Translator) -> str:
    """The hint in the report's language: analysis' own words in English, a translation
    of the same remark (same value, same threshold) otherwise."""
    if tr.lang == "en":
        return hint.text
    if hint.key == EPISODE_REWARD and exp.trend is not None:
        return tr("hint.trend", trend=tr.trend(exp.trend))
    value = exp.state.metrics.get(hint.key)
    translated = tr.optional(f"hint.{hint.key}", value=value, limit=_HINT_LIMITS.get(hint.key))
    return translated if translated is not None and value is not None else f"{_code(hint.key)}: {hint.text}"


def render_markdown(data: ReportData, lang: str = "en", curves: dict[str, Path] | None = None) -> str:
    """The whole report as Markdown; `curves` are the images written next to it."""
    tr = Translator(lang)
    parts = [
        _header(data, tr),
        _overview(data, tr),
        *(_experiment_section(exp, data, tr) for exp in data.experiments.values()),
        _gpu_section(data, tr),
        _finish_section(data, tr),
        _comparison(data, tr),
        _problems_section(data, tr),
        _files_section(data, tr),
        _next_steps(data, tr),
        _indicators_section(data, tr),
        _evaluation_section(data, tr),
        _curves_section(data, tr, curves),
    ]
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


def _header(data: ReportData, tr: Translator) -> list[str]:
    if data.live:
        supervisor = tr("header.live", pid=data.supervisor_pid)
    else:
        supervisor = tr("header.not_live")
    return [
        f"# {tr('header.title', run=_code(data.run_id))}",
        "",
        f"- {tr.item(tr('header.folder'), _code(data.run_dir))}",
        f"- {tr.item(tr('header.started'), format_time(data.created_at))}",
        f"- {tr.item(tr('header.updated'), format_time(data.updated_at))}",
        f"- {tr.item(tr('header.generated'), format_time(data.generated_at))}",
        f"- {supervisor}",
    ]


def _overview(data: ReportData, tr: Translator) -> list[str]:
    rows = [(_code(exp.name), tr.state(exp.shown_state), _gpu_name(exp.state.gpu), _progress(exp.state),
             _number(exp.state.episode_reward)) for exp in data.experiments.values()]
    headers = [tr("col.experiment"), tr("col.state"), "GPU", tr("col.progress"), tr("col.episode_reward")]
    return [f"## {tr('section.overview')}", "", *_table(headers, rows, "lllrr")]


def _experiment_section(exp: ExperimentReport, data: ReportData, tr: Translator) -> list[str]:
    s = exp.state
    lines = [f"## {tr('section.experiment', name=_code(exp.name))}", "", tr.description(s.kind), ""]
    phase = f" ({tr.phase(s.phase)})" if s.phase and not s.terminal else ""
    lines += [
        f"- {tr.item(tr('exp.state'), tr.state(exp.shown_state) + phase)}",
        f"- {tr.item(tr('exp.pid'), exp.pid or '-')}",
        "- " + tr.items((tr("exp.device"), _gpu_name(s.gpu)), (tr("exp.batch_size"), s.batch_size or "-"),
                        (tr("exp.attempts"), s.attempts)),
        f"- {tr.item(tr('exp.progress'), _progress(s))}",
    ]
    if s.episode_reward is not None or EPISODE_LENGTH in s.metrics:
        lines.append("- " + tr.items((tr("exp.episode_reward"), _number(s.episode_reward)),
                                     (tr("exp.episode_length"), _number(s.metrics.get(EPISODE_LENGTH), ".3g"))))
    if s.failure:
        kind = tr.failure_kind(s.failure.get("kind"))
        lines.append("- " + tr.item(tr("exp.failure", kind=kind), _code(s.failure.get("message", ""))))
    rows = [(_code(row.key), row.format(s.metrics)) for row in metric_rows(s) if row.key in s.metrics]
    if rows:
        step = tr("exp.at_step", step=s.metrics_step) if s.metrics_step is not None else ""
        lines += ["", tr.item(tr("exp.latest_metrics") + step, ""), "",
                  *_table([tr("col.metric"), tr("col.value")], rows, "lr")]
    lines += ["", tr.item(tr("exp.analysis"), ""), ""]
    lines += [f"- {hint_text(h, exp, tr)}" for h in exp.hints] or [f"- {tr('exp.no_hints')}"]
    lines += ["", tr.item(tr("exp.files"), ""), ""]
    if exp.log:
        lines.append(f"- {tr.items((tr('exp.log'), _code(exp.log)), (tr('exp.follow'), _code(f'tail -f {exp.log}')))}")
    if exp.tensorboard:
        command = _code(f"sa2va-tui tensorboard {data.run_ref}")
        lines.append(f"- {tr.items(('TensorBoard', _code(exp.tensorboard)), (tr('exp.open'), command))}")
    if not exp.log and not exp.tensorboard:
        lines.append(f"- {tr('exp.no_files')}")
    return lines


def _gpu_section(data: ReportData, tr: Translator) -> list[str]:
    lines = [f"## {tr('section.gpus')}", ""]
    if data.gpu_available is None:
        return lines + [tr("gpu.no_samples")]
    if not data.gpu_available:
        return lines + [tr("gpu.none", message=_code(data.gpu_message))]
    lines += [tr("gpu.as_of", time=format_time(data.gpu_sampled_at)), ""]
    rows = []
    for g in data.gpus:
        memory = f"{format_bytes(g.memory_used)} / {format_bytes(g.memory_total)}"
        ours = ", ".join(f"{_code(name)} ({format_bytes(used)})" for name, used in g.experiments) or "-"
        steady = (tr("gpu.history", mean=g.util_mean, std=g.util_std, peak=format_bytes(g.memory_peak),
                     n=g.busy_samples)
                  if g.util_std is not None else "-")
        rows.append((g.index, g.name or "N/A", "N/A" if g.utilization is None else f"{g.utilization}%", memory, ours,
                     steady))
    headers = ["GPU", tr("col.name"), tr("col.utilisation"), tr("col.memory"), tr("col.experiments"),
               tr("col.while_ours")]
    return lines + _table(headers, rows, "rlrrll")


def _finish_section(data: ReportData, tr: Translator) -> list[str]:
    rows = []
    for exp in data.experiments.values():
        s = exp.state
        rate = f"{s.rate:.1f}" if s.rate and data.live and not s.terminal else "-"
        remaining = format_duration(exp.remaining_s) if exp.remaining_s is not None else "-"
        rows.append((_code(exp.name), tr.state(exp.shown_state), exp.remaining_timesteps if s.total else "-", rate,
                     remaining, format_time(exp.finish_at)))
    headers = [tr("col.experiment"), tr("col.state"), tr("col.remaining_steps"), tr("col.rate"),
               tr("col.remaining_time"), tr("col.finish")]
    lines = [f"## {tr('section.finish')}", "", *_table(headers, rows, "llrrrl"), ""]
    if data.experiments and all(e.state.state == "finished" for e in data.experiments.values()):
        lines.append(tr("finish.done", time=format_time(data.finish_at)))
    elif data.live and data.finish_at is not None:
        lines.append(tr("finish.expected", time=format_time(data.finish_at),
                        left=format_duration(data.finish_at - data.generated_at)))
    elif data.live:
        lines.append(tr("finish.unknown"))
    else:
        lines.append(tr("finish.not_running", command=_code(f"sa2va-tui resume {data.run_ref}")))
    return lines


def _comparison(data: ReportData, tr: Translator) -> list[str]:
    """Side by side; the stability and value-estimate words follow the app's hints."""
    rows = []
    for exp in data.experiments.values():
        metrics = exp.state.metrics
        flagged = {h.key for h in exp.hints}
        kl, ev = metrics.get("train/approx_kl"), metrics.get("train/explained_variance")
        stability = "-" if kl is None else f"{kl:.3g} " + tr(
            "cmp.unstable" if "train/approx_kl" in flagged else "cmp.stable")
        value = "-" if ev is None else f"{ev:.3g} " + tr(
            "cmp.value_learning" if "train/explained_variance" in flagged else "cmp.value_good")
        reward = _number(exp.state.episode_reward)
        if exp.trend is not None:
            reward += f" ({tr.trend(exp.trend)})"
        fraction = exp.state.fraction
        rows.append((_code(exp.name), "-" if fraction is None else f"{fraction:.0%}", reward, stability, value))
    headers = [tr("col.experiment"), tr("col.progress"), tr("col.episode_reward"), tr("col.stability"),
               tr("col.value_estimate")]
    return [f"## {tr('section.comparison')}", "", *_table(headers, rows, "lrrrr")]


def _problems_section(data: ReportData, tr: Translator) -> list[str]:
    lines = [f"## {tr('section.problems')}", ""]
    if not data.problems:
        return lines + [tr("problems.none")]
    for p in data.problems:
        lines.append(f"- {format_time(p.time)} {tr.item(_code(p.experiment), _problem_text(p, tr))}")
    return lines


def _problem_text(p: Problem, tr: Translator) -> str:
    """What happened, what was changed, and how it ended."""
    if p.kind == "interrupted":
        return tr("problem.interrupted", step=p.step)
    if p.kind == "restart":
        what = tr("problem.restart")
    else:
        what = tr("problem.failed", kind=tr.failure_kind(p.kind), step=_number(p.step, "d"),
                  batch=p.batch_size or "-", gpu=_gpu_name(p.gpu))
        if p.exit_code is not None:
            what += tr("problem.exit_code", code=p.exit_code)
        if p.message:
            what = tr.item(what, _code(p.message))
    if p.restart is None:
        resolution = tr("problem.unresolved")
    else:
        changes = p.restart["changes"]
        done = [tr("problem.changed", what=tr.optional(f"change.{key}") or _code(key), old=_change_value(key, old),
                   new=_change_value(key, new))
                for key, value in changes.items() if isinstance(value, list) for old, new in [value]]
        origin = changes.get("resume_from")
        done.append(tr("problem.from_checkpoint", path=_code(Path(origin).name)) if origin
                    else tr("problem.from_start"))
        resolution = tr("problem.restarted", reason=tr.restart_reason(p.restart["reason"]),
                        attempt=p.restart["attempt"], changes=tr.join(done))
    outcome = tr("problem.outcome", state=tr.state(p.outcome))
    return tr("problem.sentence", what=what, resolution=resolution, outcome=outcome)


def _change_value(key: str, value: Any) -> str:
    return _gpu_name(value) if key == "gpu" else str(value)


def _files_section(data: ReportData, tr: Translator) -> list[str]:
    return [f"## {tr('section.files')}", "", "```", *data.files, "```"]


def _next_steps(data: ReportData, tr: Translator) -> list[str]:
    """Exact commands, as they work from the current folder."""
    ref = data.run_ref
    lines = [f"## {tr('section.next')}", ""]
    finished = [e.name for e in data.experiments.values() if e.state.state == "finished"]
    if finished:
        what = tr("next.evaluate", names=tr.names(_code(n) for n in finished), split=_code("val"))
        lines.append("- " + tr.item(what, _code(f"sa2va-tui evaluate {ref} --split val")))
    unfinished = [e.name for e in data.experiments.values() if e.shown_state in ("interrupted", "failed", "stopped")]
    if unfinished and not data.live:
        what = tr("next.resume", names=tr.names(_code(n) for n in unfinished))
        lines.append("- " + tr.item(what, _code(f"sa2va-tui resume {ref}")))
    if data.live:
        lines.append(f"- {tr.item(tr('next.status'), _code(f'sa2va-tui status {ref}'))}")
    lines.append(f"- {tr.item(tr('next.report'), _code(f'sa2va-tui report {ref} -o report.md'))}")
    lines.append(f"- {tr.item(tr('next.tensorboard'), _code(f'sa2va-tui tensorboard {ref}'))}")
    return lines


_MARKS = {"pass": "✓", "fail": "✗", "unknown": "?"}


def _indicators_section(data: ReportData, tr: Translator) -> list[str]:
    lines = [f"## {tr('section.indicators')}", ""]
    for ind in data.indicators:
        lines.append(f"- {_MARKS[ind.status]} {tr(f'ind.{ind.name}')} — "
                     f"{tr.item(tr.status(ind.status), indicator_text(ind, tr))}")
    return lines


def indicator_text(ind: Indicator, tr: Translator) -> str:
    """The facts behind one indicator, in words."""
    f = ind.facts
    if ind.name == "reward_rising":
        parts = [tr("ind.trend", name=_code(name), trend=tr.trend(trend)) if trend else
                 tr("ind.too_few", name=_code(name), n=f["readings"][name]) for name, trend in f["trends"].items()]
        return tr.join(parts) if parts else tr("ind.no_rewards")
    if ind.name == "no_crash":
        parts = [tr("ind.crashed", names=tr.names(_code(n) for n in f["crashes"]))] if f["crashes"] else []
        if f["failed"]:
            parts.append(tr("ind.failed", names=tr.names(_code(n) for n in f["failed"])))
        if f["oom"]:
            parts.append(tr("ind.oom", n=len(f["oom"]), restarted=f["oom_restarted"]))
        return tr.join(parts) if parts else tr("ind.no_failure")
    if ind.name == "checkpoints_saved":
        parts = [tr("ind.checkpoint" if c["exists"] else "ind.no_checkpoint", name=_code(name), step=c["step"])
                 for name, c in f["checkpoints"].items()]
        return tr.join(parts) if parts else tr("ind.nothing_trained")
    if ind.name == "tensorboard_written":
        parts = [tr("ind.records", name=_code(name), n=max(0, n - 1)) for name, n in f["records"].items()]
        return tr.join(parts) if parts else tr("ind.nothing_trained")
    if ind.name == "gpu_steady":
        if "std" in f:
            return tr.join(tr("ind.gpu_std", gpu=gpu, std=std, limit=f["limit"]) for gpu, std in f["std"].items())
        return tr(f"ind.gpu_{f['reason']}", message=_code(f.get("message", "")))
    raise ValueError(f"unknown indicator {ind.name}")


def _evaluation_section(data: ReportData, tr: Translator) -> list[str]:
    lines = [f"## {tr('section.evaluation')}", ""]
    table = data.evaluation
    if table is None:
        return lines + [tr("eval.none", command=_code(f"sa2va-tui evaluate {data.run_ref}"))]
    lines += [tr("eval.intro", split=_code(table.split), n=len(table.sample_ids), time=format_time(table.created)), ""]
    rows = []
    for row in table.rows:
        cells = [f"{row.mean(m):.4f} ± {row.std(m):.3f}" for m in METRIC_NAMES]
        deltas = ["", ""] if row.name == table.baseline else [f"{table.delta(row, m):+.4f}" for m in ("dice", "iou")]
        rows.append((tr.row_label(row), *cells, *deltas))
    headers = [tr("col.row"), "Dice", "IoU", "Recall", "Precision", "Δ Dice", "Δ IoU"]
    lines += _table(headers, rows, "lrrrrrr")
    if table.missing:
        lines += ["", tr("eval.missing", names=tr.names(_code(n) for n in table.missing))]
    return lines


def _curves_section(data: ReportData, tr: Translator, curves: dict[str, Path] | None) -> list[str]:
    lines = [f"## {tr('section.curves')}", ""]
    if curves is None:
        lines += [tr("curves.not_written"), ""]
    elif not curves:
        lines += [tr("curves.no_data"), ""]
    for curve, path in (curves or {}).items():
        lines += [f"![{tr(f'curve.{curve}')}]({path.name})", ""]
    panels = curve_panels(data)
    keys = [*panels.get("episode_reward", []), *panels.get("reward_net", [])]
    rows = [(_code(name), _code(key), len(points), _number(points[0][1]), _number(points[-1][1]))
            for name, exp in data.experiments.items() for key in keys for points in [exp.series.get(key)] if points]
    if rows:
        headers = [tr("col.experiment"), tr("col.metric"), tr("col.readings"), tr("col.first"), tr("col.last")]
        lines += _table(headers, rows, "llrrr")
    return lines



# --- JSON ---------------------------------------------------------------------------


def render_json(data: ReportData, lang: str = "en", curves: dict[str, Path] | None = None) -> str:
    """The report's facts as JSON, with its sentences (hints, problems, indicators) in
    the language."""
    tr = Translator(lang)
    experiments = {}
    for name, exp in data.experiments.items():
        experiments[name] = {
            **exp.state.to_dict(),
            "shown_state": exp.shown_state,
            "pid": exp.pid,
            "description": tr.description(exp.state.kind),
            "hints": [{"key": h.key, "level": h.level, "text": hint_text(h, exp, tr)} for h in exp.hints],
            "reward_trend": exp.trend,
            "remaining_timesteps": exp.remaining_timesteps,
            "remaining_s": exp.remaining_s,
            "finish_at": exp.finish_at,
            "log": exp.log,
            "tensorboard": exp.tensorboard,
            "tensorboard_records": exp.tensorboard_records,
            "checkpoint_exists": exp.checkpoint_exists,
            "series": {key: [list(p) for p in points] for key, points in exp.series.items()},
        }
    out = {
        "lang": lang,
        "run_id": data.run_id,
        "run_dir": data.run_dir,
        "created_at": data.created_at,
        "updated_at": data.updated_at,
        "generated_at": data.generated_at,
        "live": data.live,
        "supervisor_pid": data.supervisor_pid,
        "experiments": experiments,
        "gpus": {"available": data.gpu_available, "message": data.gpu_message, "sampled_at": data.gpu_sampled_at,
                 "gpus": [dataclasses.asdict(g) for g in data.gpus]},
        "finish_at": data.finish_at,
        "problems": [{**dataclasses.asdict(p), "text": _problem_text(p, tr)} for p in data.problems],
        "indicators": [{**dataclasses.asdict(i), "text": indicator_text(i, tr)} for i in data.indicators],
        "evaluation": _evaluation_json(data.evaluation, tr),
        "files": data.files,
        "curves": curves or {},
    }
    return json.dumps(out, indent=1, default=str, ensure_ascii=False)


def _evaluation_json(table: EvaluationTable | None, tr: Translator) -> dict[str, Any] | None:
    """The table's summary (its per-sample values stay in evaluation.json)."""
    if table is None:
        return None
    summary = table.to_dict()
    for row, source in zip(summary["rows"], table.rows):
        row["label"] = tr.row_label(source)
        del row["values"], row["sample_ids"]
    del summary["sample_ids"]
    return summary
