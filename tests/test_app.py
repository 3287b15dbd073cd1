"""The Textual app: driven with Pilot against a real supervisor and the real
experiments in real worker processes (configs/quick.yaml made smaller still, on a mask
cache filled once per session), and pinned by snapshots of a recorded run.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from textual.pilot import Pilot
from textual.widgets import Log, RichLog, Static

from sa2va_tui.analysis import hints, reward_trend
from sa2va_tui.app import AppSource, Sa2vaApp
from sa2va_tui.app.screens import ConfirmScreen, HelpScreen
from sa2va_tui.app.widgets import ExperimentCard
from sa2va_contract.config import EXPERIMENT_KINDS, load_config
from sa2va_contract.events import (
    Checkpoint,
    Event,
    Failed,
    GpuSample,
    Metrics,
    Paused,
    Phase,
    Progress,
    RestartChanges,
    Restarting,
    Resumed,
    Started,
    Stopped,
)
from sa2va_contract.gpus import GpuInfo, GpuProcess
from sa2va_tui.logtail import LogWatcher
from sa2va_tui.runstate import EventHub
from sa2va_tui.runstore import RunStore
from sa2va_tui.supervisor import Supervisor

from conftest import ENDLESS, QUICK_CONFIG


# --- helpers ---------------------------------------------------------------------------


def run_async(test: Callable) -> Callable:
    """An async test run on its own event loop (no asyncio plugin is installed)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return wrapper


class Recorder:
    """Every event the supervisor delivers, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, cls: type[Event], name: str, after: Event | None = None) -> list:
        """Events of `cls` for `name` (those that came after `after`, if given)."""
        with self._lock:
            start = 0 if after is None else self.events.index(after) + 1
            return [e for e in self.events[start:] if isinstance(e, cls) and e.experiment == name]


def supervised_app(real_run: list[str], *overrides: str, only: tuple[str, ...]) -> tuple[Sa2vaApp, Supervisor, Recorder]:
    settings = [*real_run, "run.name=apptest"]
    settings += [f"{kind}.enabled={str(kind in only).lower()}" for kind in EXPERIMENT_KINDS]
    config = load_config(QUICK_CONFIG, settings + list(overrides))
    supervisor = Supervisor(config, RunStore.create(config), stop_grace_s=10.0)
    recorder = Recorder()
    supervisor.subscribe(recorder)
    source = AppSource.of_supervisor(supervisor)
    source.stop_grace_s = 10.0
    return Sa2vaApp(source), supervisor, recorder


async def until(pilot: Pilot, condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await pilot.pause(0.1)


def state_of(supervisor: Supervisor, name: str) -> str:
    return supervisor.states()[name].state


def log_path(supervisor: Supervisor, name: str) -> Path:
    return supervisor.run_dir / name / "train.log"


def screen_text(app: Sa2vaApp) -> str:
    return "\n".join(str(static.render()) for static in app.screen.query(Static))


# --- against a real supervisor ---------------------------------------------------------


@run_async
async def test_every_key_acts_on_real_workers(real_run):
    app, supervisor, events = supervised_app(
        real_run, f"prompt_rl.total_timesteps={ENDLESS}", f"postprocess_rl.total_timesteps={ENDLESS}",
        "prompt_rl.checkpoint_every=256", "postprocess_rl.checkpoint_every=100000",
        only=("prompt_rl", "postprocess_rl"))
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            dash = app.dashboard
            await until(pilot, lambda: all(s.timesteps > 0 for s in supervisor.states().values())
                        and len(supervisor.states()) == 2, "both workers training")

            await pilot.press("2")
            assert dash.selected == "postprocess_rl"
            await pilot.press("tab")
            assert dash.selected == "mask_stage"  # the run's mask stage: its card comes last
            await pilot.press("tab")
            assert dash.selected == "prompt_rl"
            await pilot.press("shift+tab", "shift+tab")
            assert dash.selected == "postprocess_rl"
            await pilot.click(ExperimentCard, offset=(5, 0))  # the first card: prompt_rl
            assert dash.selected == "prompt_rl"

            # p pauses the worker itself: it reports Paused and its step count stands still.
            await pilot.press("p")
            await until(pilot, lambda: events.of(Paused, "prompt_rl") and state_of(supervisor, "prompt_rl") == "paused",
                        "prompt_rl paused")
            held = supervisor.states()["prompt_rl"].timesteps
            await pilot.pause(0.6)
            assert supervisor.states()["prompt_rl"].timesteps == held
            await until(pilot, lambda: str(app.query_one("#toggle_pause").label) == "Resume", "button says Resume")
            await pilot.press("p")
            await until(pilot, lambda: events.of(Resumed, "prompt_rl") and state_of(supervisor, "prompt_rl") == "running",
                        "prompt_rl resumed")

            # l shows the tail of the selected experiment's log file, and back.
            await pilot.press("l")
            log = app.query_one("#logtail", Log)
            # The end of a log that SB3's tables fill: whole lines of the file (the first
            # may be cut where the tail begins), followed as it grows.
            await until(pilot, lambda: any("total_timesteps" in line for line in log.lines), "log tail shown")
            written = set(log_path(supervisor, "prompt_rl").read_text().splitlines())
            assert set(log.lines[1:]) <= written and len(log.lines) >= 10
            assert str(log_path(supervisor, "prompt_rl")) in str(app.query_one("#bottom").border_title)
            await pilot.press("l")
            assert app.query_one("#bottom").border_title == "events"

            # s stops it (a checkpoint first); r asks, then resumes it from that checkpoint.
            await pilot.press("s")
            await until(pilot, lambda: events.of(Stopped, "prompt_rl") and state_of(supervisor, "prompt_rl") == "stopped",
                        "prompt_rl stopped")
            await pilot.press("r")
            assert isinstance(app.screen, ConfirmScreen)
            question = screen_text(app)
            assert "resumes from its checkpoint at step" in question and "device CPU" in question
            await pilot.press("y")
            await until(pilot, lambda: any(e.attempt == 2 and e.resumed_from for e in events.of(Started, "prompt_rl")),
                        "prompt_rl restarted from its checkpoint")
            second = events.of(Started, "prompt_rl")[-1]
            stopped = events.of(Stopped, "prompt_rl")[-1]
            # From the checkpoint saved on the way out.
            assert any(c.path == second.resumed_from and c.step == stopped.step for c in events.of(Checkpoint, "prompt_rl"))
            await until(pilot, lambda: events.of(Progress, "prompt_rl", after=second), "its first progress")
            assert events.of(Progress, "prompt_rl", after=second)[0].timesteps == stopped.step  # carried on

            # The mouse: the Pause button acts on the selected experiment (once the
            # dashboard has seen it running again and enabled the button).
            await until(pilot, lambda: not app.query_one("#toggle_pause").disabled
                        and dash.states["prompt_rl"].state == "running", "the Pause button enabled")
            await pilot.click("#toggle_pause")
            await until(pilot, lambda: state_of(supervisor, "prompt_rl") == "paused", "paused by the button")

            # ? lists every key; escape closes it.
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            help_text = screen_text(app)
            for key in ("tab/1-9", "p", "r", "s", "l", "?", "q"):
                assert f"  {key} " in help_text
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)

            # The event log has what happened, in words.
            lines = "\n".join(str(line.text) for line in app.query_one("#events", RichLog).lines)
            assert "paused at step" in lines and "stopped at step" in lines and "restarting (manual)" in lines

            # q asks, then stops every worker gracefully and ends the app.
            await pilot.press("q")
            assert isinstance(app.screen, ConfirmScreen)
            assert "Stops 2 running experiments" in screen_text(app)
            await pilot.press("y")
            await until(pilot, lambda: app.return_code is not None, "the app exited", timeout=30)
        assert supervisor.done
        for name in ("prompt_rl", "postprocess_rl"):
            assert events.of(Stopped, name)[-1].reason == "shutdown"
            assert state_of(supervisor, name) == "stopped"
        assert app.return_code == 0
    finally:
        supervisor.shutdown(0.0)


@run_async
async def test_restart_after_an_injected_oom_offers_half_the_batch(real_run):
    app, supervisor, events = supervised_app(
        real_run, "prompt_rl.checkpoint_every=32", "recovery.max_oom_restarts=0",
        "prompt_rl.faults={oom_at_step: 100, oom_min_batch_size: 32}", only=("prompt_rl",))
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: events.of(Failed, "prompt_rl") and state_of(supervisor, "prompt_rl") == "failed",
                        "the injected OOM")
            assert events.of(Failed, "prompt_rl")[0].kind == "oom"
            await pilot.press("r")
            assert isinstance(app.screen, ConfirmScreen)
            question = screen_text(app)
            assert "batch size 32 → 16" in question and "ran out of GPU memory" in question
            assert "checkpoint at step 96" in question  # the last before step 100, every 32
            await pilot.press("y")
            await until(pilot, lambda: state_of(supervisor, "prompt_rl") == "finished", "the restart finishing")
        restart = events.of(Restarting, "prompt_rl")[-1]
        assert restart.reason == "manual" and restart.changes.to_json()["batch_size"] == [32, 16]
        assert restart.changes.to_json()["resume_from"] == events.of(Checkpoint, "prompt_rl")[2].path
        second = events.of(Started, "prompt_rl")[-1]
        assert (second.batch_size, second.attempt) == (16, 2)
        assert min(e.timesteps for e in events.of(Progress, "prompt_rl", after=second)) == 96  # carried on
        assert supervisor.states()["prompt_rl"].timesteps == 256
    finally:
        supervisor.shutdown(0.0)


@run_async
async def test_watch_mode_hides_the_keys_that_need_a_worker_of_ours(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("-----------------------------\n| rollout/        |         |\n|    ep_rew_mean  | 5.07    |\n"
                   "| time/           |         |\n|    total_timesteps | 2048 |\n-----------------------------\n")
    watcher = LogWatcher([log], total=4096, follow=False)
    app = Sa2vaApp(AppSource.of_watcher(watcher))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.dashboard.states.get("train", None) is not None
                    and app.dashboard.states["train"].timesteps == 2048, "the log read")
        dash = app.dashboard
        for action in dash.CONTROL_ACTIONS:
            assert dash.check_action(action, ()) is False  # hidden from the footer
        assert not app.query("#toggle_pause") and not app.query("#stop") and not app.query("#restart")
        assert app.query_one("#toggle_log")
        await pilot.press("p", "s", "r")
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("question_mark")
        assert "cannot be paused, stopped or restarted here" in screen_text(app)
        await pilot.press("escape", "l")
        await until(pilot, lambda: any("ep_rew_mean" in line for line in app.query_one("#logtail", Log).lines),
                    "the watched log shown")


@run_async
async def test_more_experiments_than_fit_scroll_into_view_when_selected():
    hub = RecordedHub()
    names = [f"seed{n}" for n in range(1, 10)]
    app = Sa2vaApp(AppSource(hub=hub, title="nine", log_path=lambda name: None), clock=lambda: T0 + 60)
    async with app.run_test(size=(80, 24)) as pilot:
        hub.feed([Started(name, pid=5000 + i, gpu=None, batch_size=32, time=T0) for i, name in enumerate(names)])
        await until(pilot, lambda: len(app.query(ExperimentCard)) == 9, "nine cards")
        main = app.query_one("#main")
        card = {c.experiment: c for c in app.query(ExperimentCard)}
        assert not main.region.contains_region(card["seed9"].region)
        await pilot.press("9")
        await pilot.pause(0.2)
        assert app.dashboard.selected == "seed9"
        assert main.region.contains_region(card["seed9"].region)


def test_the_ui_imports_no_training_library():
    code = ("import sys, sa2va_tui.app, sa2va_tui.app.main, sa2va_tui.supervisor, sa2va_tui.logtail; "
            "print(sorted(m for m in ('torch', 'stable_baselines3', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- snapshots of a recorded run -------------------------------------------------------

T0 = 1_750_000_000.0
GiB = 1024**3


class RecordedControl:
    """The control of a run told by recorded events: no worker of it runs, so each
    request is refused as the supervisor refuses one for an experiment not running."""

    def _refuse(self, name: str, *args: object) -> None:
        raise RuntimeError(f"{name} is not running (a recorded run)")

    pause = resume = stop = restart = restart_plan = _refuse


class RecordedHub(EventHub):
    """An event source without processes: the test hands it events."""

    def feed(self, events: list[Event]) -> None:
        with self._lock:
            for event in events:
                self._book.apply(event)
        self._deliver(events)

    @property
    def done(self) -> bool:
        return False

    def shutdown(self, grace_s: float = 0.0) -> None:
        del grace_s


def recorded_run() -> list[Event]:
    """Three experiments mid-run: one training with warnings, one caching masks, the
    reward network out of memory and restarted on another GPU with half its batch."""
    ppo = {"rollout/ep_len_mean": 2.6, "train/approx_kl": 0.031, "train/clip_fraction": 0.12,
           "train/entropy_loss": -2.31, "train/explained_variance": 0.04, "train/value_loss": 0.012,
           "time/fps": 118.0}
    events: list[Event] = [
        Started("prompt_rl", pid=4101, gpu=0, batch_size=64, time=T0),
        Started("postprocess_rl", pid=4102, gpu=0, batch_size=64, time=T0),
        Started("reward_net", pid=4103, gpu=1, batch_size=32, time=T0),
        Phase("prompt_rl", phase="training", time=T0 + 2),
        Phase("postprocess_rl", phase="caching_masks", done=340, total=1000, time=T0 + 60),
        Phase("reward_net", phase="training", time=T0 + 2),
        Failed("reward_net", kind="oom", message="CUDA out of memory. Tried to allocate 2.00 GiB", step=300,
               batch_size=32, gpu=1, time=T0 + 30),
        Restarting("reward_net", reason="oom", attempt=2,
                   changes=RestartChanges.from_json({"batch_size": [32, 16], "gpu": [1, 0],
                                                     "resume_from": "logs/r/reward_net/ckpt.pt"}),
                   time=T0 + 31),
        Started("reward_net", pid=4104, gpu=0, batch_size=16, attempt=2, resumed_from="logs/r/reward_net/ckpt.pt",
                time=T0 + 32),
        Checkpoint("prompt_rl", path="logs/r/prompt_rl/checkpoints/ckpt_2048.zip", step=2048, time=T0 + 40),
    ]
    for i in range(16):
        at = T0 + 4 + i * 4
        events.append(Progress("prompt_rl", timesteps=256 * (i + 1), total=10000, time=at))
        events.append(Metrics("prompt_rl", step=256 * (i + 1), time=at,
                              values={**ppo, "rollout/ep_rew_mean": 0.02 * i - 0.05 * (i % 3), "time/iterations": i + 1}))
    events.append(Metrics("reward_net", step=400, time=T0 + 58,
                          values={"reward/train_loss": 0.021, "reward/val_mae": 0.083, "reward/spearman": 0.812}))
    events.append(Progress("reward_net", timesteps=400, total=1200, time=T0 + 50))
    events.append(Progress("reward_net", timesteps=420, total=1200, time=T0 + 58))
    events.append(GpuSample("", available=True, message="2 NVIDIA GPUs", time=T0 + 59, gpus=[
        GpuInfo(index=0, name="NVIDIA A100-SXM4-80GB", utilization=63, memory_used=31 * GiB, memory_total=80 * GiB,
                processes=[GpuProcess(pid=4101, used_memory=9 * GiB, experiment="prompt_rl"),
                           GpuProcess(pid=4104, used_memory=14 * GiB, experiment="reward_net"),
                           GpuProcess(pid=777, used_memory=5 * GiB, experiment=None)]),
        GpuInfo(index=1, name="NVIDIA A100-SXM4-80GB", utilization=None, memory_used=2 * GiB,
                memory_total=80 * GiB, processes=[]),
    ]))
    return events


@pytest.fixture
def recorded_app(monkeypatch) -> Callable[[], tuple[Sa2vaApp, RecordedHub]]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()

    def make() -> tuple[Sa2vaApp, RecordedHub]:
        hub = RecordedHub()
        source = AppSource(hub=hub, title="run 20250615-150640-demo", log_path=lambda name: None,
                           control=RecordedControl())
        return Sa2vaApp(source, clock=lambda: T0 + 60), hub

    yield make
    monkeypatch.undo()
    time.tzset()


def feed_recorded(hub: RecordedHub) -> Callable[[Pilot], object]:
    async def run_before(pilot: Pilot) -> None:
        # The snapshot's pilot may start before the dashboard has mounted and subscribed.
        await until(pilot, lambda: pilot.app.dashboard.is_mounted, "the dashboard mounted", timeout=10)
        hub.feed(recorded_run())
        await pilot.pause()
        pilot.app.dashboard.redraw()
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
def test_layout_snapshot(snap_compare, recorded_app, size):
    app, hub = recorded_app()
    assert snap_compare(app, terminal_size=size, run_before=feed_recorded(hub))


def test_oom_restart_confirmation_snapshot(snap_compare, recorded_app):
    """What `r` asks after an out-of-memory failure, drawn from a fixed plan."""
    from sa2va_tui.app.main import restart_question
    from sa2va_contract.recovery import RestartPlan

    app, hub = recorded_app()

    async def run_before(pilot: Pilot) -> None:
        await feed_recorded(hub)(pilot)
        plan = RestartPlan(reason="manual", attempt=2, batch_size=16, previous_batch_size=32, gpu=1, previous_gpu=0,
                           after_oom=True, resume_from="ckpt.pt", resume_step=300)
        await pilot.app.push_screen(ConfirmScreen("Restart reward_net?", restart_question("reward_net", plan),
                                                  yes="Restart"))
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


# --- the hints the app and the report share --------------------------------------------


def test_reward_trend_reads_rising_flat_and_falling():
    assert reward_trend([0.1 * i for i in range(12)]) == "rising"
    assert reward_trend([1.0 - 0.1 * i for i in range(12)]) == "falling"
    assert reward_trend([0.5, 0.52, 0.49, 0.51, 0.5, 0.48, 0.51, 0.5]) == "flat"
    assert reward_trend([1.0, 2.0]) is None


def test_hints_name_the_values_that_call_for_them():
    found = {h.key: h for h in hints({"train/explained_variance": 0.03, "train/approx_kl": 0.05,
                                      "train/clip_fraction": 0.1})}
    assert "value function still learning" in found["train/explained_variance"].text
    assert found["train/approx_kl"].level == "warn" and "large policy updates" in found["train/approx_kl"].text
    assert "train/clip_fraction" not in found
    assert hints({"train/explained_variance": 0.9, "train/approx_kl": 0.01}) == []
