"""The facts of a run's report, read from its folder alone and in no language: its
experiments, their metric series, GPU use, every problem and how it was resolved.
This module reads files: it imports no torch."""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from sa2va_contract import events
from sa2va_contract.evaluation import EvaluationTable, load_evaluation
from sa2va_contract.gpus import GpuInfo
from sa2va_contract.layout import LOG_FILE
from sa2va_tui.analysis import Hint, hints, reward_trend
from sa2va_tui.runstate import EPISODE_REWARD, ExperimentState, StateBook
from sa2va_tui.runstore import (
    file_tree,
    load_run,
    pid_alive,
    read_events,
    read_gpu_samples,
    tensorboard_dir,
    tensorboard_records,
)

EPISODE_LENGTH = "rollout/ep_len_mean"


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
    #: The node it is in, on a cluster (None: the supervisor's machine).
    host: str | None = None

    @property
    def label(self) -> int | str:
        """How the report names it: its index, after its host on a cluster ("node-a/0")."""
        return self.index if self.host is None else f"{self.host}/{self.index}"


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
    #: The restart that followed.
    restart: events.Restarting | None = None
    #: The experiment's state now.
    outcome: str = ""


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
    evaluation: EvaluationTable | None
    files: list[str]
    #: Filled in by `sa2va_tui.report.read_report` (`indicators.check_indicators`).
    indicators: list[Any] = field(default_factory=list)
    #: The run's mask stage, if it had one, and run.json's `model_calls`,
    #: `distinct_pairs` and `cache_hits` (empty where the run recorded none).
    mask_stage: ExperimentState | None = None
    mask_counts: dict[str, int] = field(default_factory=dict)


def read_facts(run_dir: Path, now: float | None = None) -> ReportData:
    """Everything the report tells, read from the run folder. Raises RunStoreError
    when it is not a run folder."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    snapshot = load_run(run_dir)
    recorded = list(read_events(run_dir))
    samples = read_gpu_samples(run_dir)
    live = snapshot.supervised
    series = metric_series(recorded)
    experiments = {name: _experiment(run_dir, state, series.get(name, {}), live, now)
                   for name, state in snapshot.experiments.items()}
    last_sample = samples[-1] if samples else None
    return ReportData(
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
        problems=find_problems(recorded, experiments),
        evaluation=load_evaluation(run_dir),
        files=file_tree(run_dir),
        mask_stage=snapshot.mask_stage,
        mask_counts=dict(snapshot.mask_counts),
    )


def run_reference(run_dir: Path) -> str:
    """The run as `sa2va-tui <command> RUN` finds it from here (default --logs-dir)."""
    default = Path("logs") / run_dir.name
    if default.resolve() == run_dir.resolve():
        return run_dir.name
    return str(run_dir)


def metric_series(recorded: Iterable[events.Event]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every metric of every experiment over steps. A restart resumes from a checkpoint:
    what the earlier attempt logged past it is dropped, as progress.csv and TensorBoard
    drop it, so a curve never runs back on itself."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    checkpoint_steps: dict[str, int] = {}
    for event in recorded:
        if isinstance(event, events.Checkpoint):
            checkpoint_steps[event.path] = event.step
        elif isinstance(event, events.Started) and event.attempt > 1:
            keep = checkpoint_steps.get(event.resumed_from, 0) if event.resumed_from else 0
            for points in series[event.experiment].values():
                points[:] = [p for p in points if p[0] <= keep]
        elif isinstance(event, events.Metrics):
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
        tensorboard_records=tensorboard_records(exp_dir),
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


def gpu_usage(samples: Sequence[events.GpuSample]) -> list[GpuReport]:
    """Per GPU (per host and index, on a cluster): its latest sample, and its utilisation
    and memory over the samples in which one of our experiments ran on it."""
    if not samples or not samples[-1].available:
        return []
    history: dict[tuple[str | None, int], list[GpuInfo]] = defaultdict(list)
    for sample in samples:
        for gpu in sample.gpus:
            history[gpu.host, gpu.index].append(gpu)
    reports = []
    for gpu in samples[-1].gpus:
        ours = [g for g in history[gpu.host, gpu.index] if any(p.experiment for p in g.processes)]
        utils = [g.utilization for g in ours if g.utilization is not None]
        memory = [g.memory_used for g in ours if g.memory_used is not None]
        reports.append(GpuReport(
            index=gpu.index,
            name=gpu.name,
            utilization=gpu.utilization,
            memory_used=gpu.memory_used,
            memory_total=gpu.memory_total,
            experiments=[(p.experiment, p.used_memory) for p in gpu.processes if p.experiment],
            samples=len(history[gpu.host, gpu.index]),
            busy_samples=len(ours),
            util_mean=statistics.fmean(utils) if utils else None,
            util_std=statistics.pstdev(utils) if len(utils) > 1 else None,
            memory_peak=max(memory) if memory else None,
            host=gpu.host,
        ))
    return reports


def find_problems(recorded: Iterable[events.Event], experiments: dict[str, ExperimentReport]) -> list[Problem]:
    """Every failure with the restart that answered it, every restart no failure
    caused, and every experiment left unfinished by a supervisor that went away."""
    problems: list[Problem] = []
    open_failure: dict[str, Problem] = {}
    for event in recorded:
        if isinstance(event, events.Failed):
            problem = Problem(event.experiment, event.time, event.kind, event.message, event.step, event.batch_size,
                              event.gpu, event.exit_code)
            problems.append(problem)
            open_failure[event.experiment] = problem
        elif isinstance(event, events.Restarting):
            problem = open_failure.pop(event.experiment, None)
            if problem is None:
                problem = Problem(event.experiment, event.time, "restart")
                problems.append(problem)
            problem.restart = event
    for problem in problems:
        known = experiments.get(problem.experiment)
        problem.outcome = known.shown_state if known else ""
    for name, exp in experiments.items():
        if exp.shown_state == "interrupted":
            problems.append(Problem(name, exp.state.updated_at, "interrupted", step=exp.state.timesteps,
                                    outcome="interrupted"))
    return problems
