"""The supervisor with real worker processes (spawn), real signals and a real run folder.

The workers run `sv_workload` (real torch steps, atomic checkpoints, the experiment
contract) until the three experiments exist. Bounds on time are the issue's own limits,
generous where the machine is shared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from fake_nvml import GiB, FakeGpu, FakeNvml
from sa2va_tui.config import EXPERIMENT_KINDS, Config, load_config
from sa2va_tui.events import (
    Checkpoint,
    Event,
    Failed,
    Finished,
    GpuSample,
    Paused,
    Progress,
    Restarting,
    Resumed,
    Started,
    Stopped,
)
from sa2va_tui.runstore import RunStore, load_run, pid_alive, read_events
from sa2va_tui.supervisor import Supervisor, SupervisorError, next_batch_size

HERE = Path(__file__).resolve().parent
WORKLOAD = {kind: "sv_workload:run" for kind in EXPERIMENT_KINDS}


def make_config(tmp_path: Path, *overrides: str, experiments=("prompt_rl",), steps: int = 150,
                every: int = 50) -> Config:
    settings = [f"run.logs_dir={tmp_path / 'logs'}", "run.name=test"]
    for kind in EXPERIMENT_KINDS:
        if kind not in experiments:
            settings.append(f"{kind}.enabled=false")
    for kind in ("prompt_rl", "postprocess_rl"):
        settings += [f"{kind}.total_timesteps={steps}", f"{kind}.checkpoint_every={every}", f"{kind}.device=cpu",
                     f"{kind}.ppo={{n_steps: 64, n_envs: 2, batch_size: 64}}"]
    settings += [f"reward_net.finetune.steps={steps}", "reward_net.device=cpu"]
    return load_config(None, settings + list(overrides))


class Recorder:
    """A subscriber that keeps every event and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, match: Callable[[Event], bool], timeout: float = 60.0) -> Event:
        with self._cond:
            found: list[Event] = []

            def seen() -> bool:
                found[:] = [e for e in self.events if match(e)]
                return bool(found)

            assert self._cond.wait_for(seen, timeout), f"no such event within {timeout} s; got {self.types()}"
            return found[0]

    def of(self, cls: type[Event], name: str | None = None) -> list:
        with self._cond:
            return [e for e in self.events if isinstance(e, cls) and (name is None or e.experiment == name)]

    def types(self) -> list[str]:
        return [e.type for e in self.events]


def supervise(config: Config, entry_points=WORKLOAD, **kwargs) -> tuple[Supervisor, Recorder]:
    supervisor = Supervisor(config, RunStore.create(config), entry_points=entry_points, **kwargs)
    recorder = Recorder()
    supervisor.subscribe(recorder)
    return supervisor, recorder


# --- policy ----------------------------------------------------------------------------


def test_batch_size_halving_keeps_dividing_the_rollout(tmp_path):
    cfg = make_config(tmp_path, "prompt_rl.ppo={n_steps: 48, n_envs: 2, batch_size: 48}")
    exp = cfg.experiments()["prompt_rl"]  # rollout 96
    assert next_batch_size(exp, 48, 4) == 24
    assert next_batch_size(exp, 24, 4) == 12
    assert next_batch_size(exp, 12, 4) == 6
    assert next_batch_size(exp, 6, 4) is None  # 3 is below the floor
    assert next_batch_size(exp, 64, 4) == 32
    odd = make_config(tmp_path, "prompt_rl.ppo={n_steps: 5, n_envs: 3, batch_size: 15}").experiments()["prompt_rl"]
    assert next_batch_size(odd, 15, 1) == 5  # half is 7; 5 is the largest divisor of 15 below
    reward = make_config(tmp_path, experiments=("reward_net",)).experiments()["reward_net"]
    assert next_batch_size(reward, 16, 4) == 8 and next_batch_size(reward, 7, 4) is None


# --- end to end through the CLI --------------------------------------------------------


def test_launch_runs_three_experiments_and_a_variant_to_the_end(tmp_path, monkeypatch):
    from sa2va_tui.app_cli import app
    from sa2va_tui import commands  # noqa: F401 - registers the commands
    import experiments.harness as harness

    for kind, entry in WORKLOAD.items():
        monkeypatch.setitem(harness.EXPERIMENT_ENTRY_POINTS, kind, entry)
    logs = tmp_path / "logs"
    args = ["--set", f"run.logs_dir={logs}", "--set", "run.name=e2e"]
    for kind in ("prompt_rl", "postprocess_rl"):
        args += ["--set", f"{kind}.total_timesteps=120", "--set", f"{kind}.checkpoint_every=60",
                 "--set", f"{kind}.ppo={{n_steps: 64, n_envs: 2, batch_size: 64}}"]
    args += ["--set", "reward_net.finetune.steps=80", "--set", "variants={prompt_rl_seed1: {base: prompt_rl, seed: 1}}"]
    config_file = tmp_path / "c.yaml"
    config_file.write_text("run: {name: e2e}\n")
    result = CliRunner().invoke(app, ["launch", "--all", "--headless", "-c", str(config_file), *args])
    assert result.exit_code == 0, result.output
    names = ["prompt_rl", "postprocess_rl", "reward_net", "prompt_rl_seed1"]
    (run_dir,) = logs.iterdir()
    assert run_dir.name.endswith("-e2e")
    snapshot = load_run(run_dir)
    assert not snapshot.active and list(snapshot.experiments) == names
    for name in names:
        state = snapshot.experiments[name]
        total = 80 if name == "reward_net" else 120
        assert (state.state, state.timesteps, state.total, state.attempts) == ("finished", total, total, 1)
        assert state.summary["timesteps"] == total
        assert (run_dir / name / "train.log").is_file() and state.last_checkpoint
        assert f"{name} finished" in " ".join(result.output.split())
    events = list(read_events(run_dir))
    for name in names:
        kinds = [e.type for e in events if e.experiment == name]
        assert kinds[0] == "started" and kinds[-1] == "finished" and "progress" in kinds and "checkpoint" in kinds
    assert (run_dir / "config.yaml").is_file()

    status = CliRunner().invoke(app, ["status", "--logs-dir", str(logs)])
    assert status.exit_code == 0, status.output
    assert "no supervisor running" in status.output and status.output.count("finished") == 4


def test_launch_refuses_unknown_experiment_in_one_line(tmp_path):
    from sa2va_tui.app_cli import app
    from sa2va_tui import commands  # noqa: F401

    result = CliRunner().invoke(app, ["launch", "--only", "nope", "--set", f"run.logs_dir={tmp_path}"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --only nope: not an enabled experiment (enabled: prompt_rl, postprocess_rl, reward_net)"]


# --- control ---------------------------------------------------------------------------


def test_pause_resume_stop_then_resume_the_run(tmp_path):
    config = make_config(tmp_path, steps=400, every=50)
    supervisor, rec = supervise(config)
    supervisor.start()
    rec.wait_for(lambda e: isinstance(e, Progress) and e.timesteps >= 60)
    asked = time.monotonic()
    supervisor.pause("prompt_rl")
    paused = rec.wait_for(lambda e: isinstance(e, Paused))
    latency = time.monotonic() - asked
    print(f"pause latency {latency * 1000:.0f} ms")
    assert latency < 1.0  # the limit
    assert supervisor.states()["prompt_rl"].state == "paused"
    held = supervisor.states()["prompt_rl"].timesteps
    time.sleep(0.6)
    assert supervisor.states()["prompt_rl"].timesteps == held == paused.step
    supervisor.resume("prompt_rl")
    rec.wait_for(lambda e: isinstance(e, Resumed))
    rec.wait_for(lambda e: isinstance(e, Progress) and e.timesteps > held + 20)
    assert supervisor.states()["prompt_rl"].state == "running"

    supervisor.stop("prompt_rl")
    stopped = rec.wait_for(lambda e: isinstance(e, Stopped))
    assert supervisor.wait(30)
    last = rec.of(Checkpoint)[-1]
    assert last.step == stopped.step and Path(last.path).is_file()  # saved on the way out
    assert supervisor.states()["prompt_rl"].state == "stopped"
    with pytest.raises(SupervisorError, match="not running"):
        supervisor.pause("prompt_rl")
    supervisor.shutdown()

    again = Supervisor.for_run(supervisor.run_dir, entry_points=WORKLOAD)
    rec2 = Recorder()
    again.subscribe(rec2)
    again.start()
    assert again.wait(60)
    again.shutdown()
    (restart,) = rec2.of(Restarting)
    assert (restart.reason, restart.attempt, restart.changes) == ("resume", 2, {"resume_from": last.path})
    finished = rec2.wait_for(lambda e: isinstance(e, Finished))
    assert finished.summary["resumed_at"] == stopped.step and finished.summary["timesteps"] == 400
    assert min(e.timesteps for e in rec2.of(Progress)) > stopped.step
    assert load_run(supervisor.run_dir).experiments["prompt_rl"].attempts == 2


def test_sigkill_is_reported_and_a_restart_carries_the_timesteps_on(tmp_path):
    config = make_config(tmp_path, steps=300, every=50)
    supervisor, rec = supervise(config)
    supervisor.start()
    started = rec.wait_for(lambda e: isinstance(e, Started))
    ckpt = rec.wait_for(lambda e: isinstance(e, Checkpoint) and e.step >= 100)
    os.kill(started.pid, signal.SIGKILL)
    failed = rec.wait_for(lambda e: isinstance(e, Failed))
    assert (failed.kind, failed.exit_code, failed.message) == ("killed", -signal.SIGKILL, "killed by SIGKILL")
    assert any("attempt 1 of prompt_rl" in line for line in failed.log_tail)
    assert supervisor.wait(10)  # no automatic restart after a kill
    state = supervisor.states()["prompt_rl"]
    assert state.state == "failed" and state.failure["kind"] == "killed"
    last = rec.of(Checkpoint)[-1]
    assert last.step >= ckpt.step

    with pytest.raises(SupervisorError, match="must divide n_steps"):
        supervisor.restart("prompt_rl", batch_size=48)
    supervisor.restart("prompt_rl", batch_size=32)
    assert supervisor.wait(60)
    supervisor.shutdown()
    restart = rec.of(Restarting)[0]
    assert (restart.reason, restart.attempt, restart.changes["resume_from"]) == ("manual", 2, last.path)
    assert restart.changes["batch_size"] == [64, 32]
    second = rec.of(Started)[1]
    assert (second.resumed_from, second.attempt, second.batch_size) == (last.path, 2, 32)
    after = [e.timesteps for e in rec.events[rec.events.index(second):] if isinstance(e, Progress)]
    assert min(after) == last.step + 1  # carried on, not from zero
    finished = rec.of(Finished)[0]
    assert finished.summary["resumed_at"] == last.step and finished.summary["timesteps"] == 300
    assert finished.summary["batch_size"] == 32


def test_injected_oom_restarts_itself_with_half_the_batch_on_the_freest_gpu(tmp_path):
    nvml = FakeNvml([FakeGpu(used=1 * GiB), FakeGpu(used=40 * GiB)])
    config = make_config(tmp_path, "prompt_rl.device=auto", "prompt_rl.faults={oom_at_step: 60, oom_min_batch_size: 64}",
                         steps=120, every=25)
    supervisor, rec = supervise(config, nvml=nvml, gpu_interval=0.05)
    supervisor.start()
    first = rec.wait_for(lambda e: isinstance(e, Started))
    assert (first.gpu, first.batch_size) == (0, 64)
    nvml.gpus[0].processes = {first.pid: 3 * GiB}
    sample = rec.wait_for(lambda e: isinstance(e, GpuSample) and e.gpus[0]["processes"])
    assert sample.available and sample.gpus[0]["processes"] == [
        {"pid": first.pid, "used_memory": 3 * GiB, "experiment": "prompt_rl"}]
    nvml.gpus[0].used = 70 * GiB  # something else fills GPU 0 meanwhile
    assert supervisor.wait(60)
    supervisor.shutdown()

    (oom,) = rec.of(Failed)
    assert (oom.kind, oom.step, oom.batch_size, oom.gpu) == ("oom", 60, 64, 0)
    assert "out of memory" in oom.message
    (restart,) = rec.of(Restarting)
    assert restart.reason == "oom" and restart.attempt == 2
    assert restart.changes == {"batch_size": [64, 32], "gpu": [0, 1], "resume_from": rec.of(Checkpoint)[1].path}
    second = rec.of(Started)[1]
    assert (second.gpu, second.batch_size) == (1, 32)
    finished = rec.of(Finished)[0]
    assert finished.summary == {**finished.summary, "batch_size": 32, "resumed_at": 50, "timesteps": 120,
                                "cuda_visible_devices": "1"}
    state = load_run(supervisor.run_dir).experiments["prompt_rl"]
    assert (state.state, state.oom_restarts, state.batch_size, state.gpu) == ("finished", 1, 32, 1)
    recorded = [e.type for e in read_events(supervisor.run_dir)]
    assert recorded.index("failed") < recorded.index("restarting")


def test_oom_restarts_stop_at_the_limit_and_the_floor(tmp_path):
    entries = {"prompt_rl": "sv_workload:oom"}
    config = make_config(tmp_path, "recovery={max_oom_restarts: 2, min_batch_size: 4}")
    supervisor, rec = supervise(config, entry_points=entries)
    supervisor.start()
    assert supervisor.wait(60)
    supervisor.shutdown()
    assert [e.batch_size for e in rec.of(Failed)] == [64, 32, 16]
    assert [e.changes["batch_size"] for e in rec.of(Restarting)] == [[64, 32], [32, 16]]
    assert supervisor.states()["prompt_rl"].state == "failed"  # for good

    floor = make_config(tmp_path, "recovery={max_oom_restarts: 5, min_batch_size: 32}")
    supervisor, rec = supervise(floor, entry_points=entries)
    supervisor.start()
    assert supervisor.wait(60)
    supervisor.shutdown()
    assert [e.batch_size for e in rec.of(Failed)] == [64, 32]


# --- failures and isolation ------------------------------------------------------------


def test_workers_report_errors_and_silent_deaths_and_print_only_to_their_log(tmp_path, capfd):
    nvml = FakeNvml([FakeGpu(used=50 * GiB), FakeGpu(used=10 * GiB)])
    config = make_config(tmp_path, "prompt_rl.device=auto", "reward_net.device=auto", "reward_net.gpu=0",
                         experiments=EXPERIMENT_KINDS)
    entries = {"prompt_rl": "sv_workload:probe", "postprocess_rl": "sv_workload:fail", "reward_net": "sv_workload:vanish"}
    supervisor, rec = supervise(config, entry_points=entries, nvml=nvml)
    supervisor.start()
    assert supervisor.wait(60)
    supervisor.shutdown()

    (probe,) = rec.of(Finished)
    assert probe.summary["cuda_visible_devices"] == "1"  # the freest GPU
    assert probe.summary["cuda_device_order"] == "PCI_BUS_ID"
    assert probe.summary["torch_loaded_before_entry"] is False
    assert [e.gpu for e in rec.of(Started, "reward_net")] == [0]  # pinned
    assert [e.gpu for e in rec.of(Started, "postprocess_rl")] == [None]  # device cpu

    (error,) = rec.of(Failed, "postprocess_rl")
    assert (error.kind, error.message) == ("error", "ValueError: the stand-in experiment failed on purpose")
    assert "fail: about to go wrong" in error.log_tail and any("Traceback" in line for line in error.log_tail)

    (vanished,) = rec.of(Failed, "reward_net")
    assert (vanished.kind, vanished.exit_code) == ("error", 7)
    assert vanished.message == "exited with code 7 without a report" and "vanish: leaving" in vanished.log_tail

    log = (supervisor.run_dir / "prompt_rl" / "train.log").read_text()
    for line in ("print to stdout", "print to stderr", "raw write to fd 1", "raw write to fd 2"):
        assert f"probe: {line}" in log
    captured = capfd.readouterr()
    assert "probe:" not in captured.out + captured.err and "fail:" not in captured.out + captured.err
    states = load_run(supervisor.run_dir).experiments
    assert [states[k].state for k in EXPERIMENT_KINDS] == ["finished", "failed", "failed"]


def test_shutdown_kills_a_worker_that_does_not_stop_in_time(tmp_path):
    supervisor, rec = supervise(make_config(tmp_path), entry_points={"prompt_rl": "sv_workload:stuck"})
    supervisor.start()
    started = rec.wait_for(lambda e: isinstance(e, Started))
    t0 = time.monotonic()
    supervisor.shutdown(grace_s=1.0)
    assert time.monotonic() - t0 < 8
    assert not pid_alive(started.pid)
    (failed,) = rec.of(Failed)
    assert (failed.kind, failed.message) == ("killed", "did not stop within 1 s and was killed")
    assert not load_run(supervisor.run_dir).active


SUPERVISOR_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from sa2va_tui.config import load_config
    from sa2va_tui.events import Started
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    if __name__ == "__main__":
        config = load_config(None, sys.argv[1:])
        supervisor = Supervisor(config, RunStore.create(config), entry_points={"prompt_rl": "sv_workload:run",
                                "postprocess_rl": "sv_workload:run"})
        started = {}
        supervisor.subscribe(lambda e: isinstance(e, Started) and started.setdefault(e.experiment, e.pid))
        supervisor.start()
        while len(started) < 2 or supervisor.states()["postprocess_rl"].timesteps < 20:
            time.sleep(0.05)
        supervisor.pause("postprocess_rl")
        time.sleep(0.5)
        print(json.dumps({"run_dir": str(supervisor.run_dir), "workers": started}), flush=True)
        time.sleep(600)
""")


def test_killing_the_supervisor_leaves_no_worker_behind(tmp_path):
    script = tmp_path / "supervisor_script.py"
    script.write_text(SUPERVISOR_SCRIPT)
    args = [f"run.logs_dir={tmp_path / 'logs'}", "reward_net.enabled=false"]
    for kind in ("prompt_rl", "postprocess_rl"):
        # Long runs without periodic checkpoints: a checkpoint found is one saved on the way out.
        args += [f"{kind}.total_timesteps=100000", f"{kind}.checkpoint_every=100000", f"{kind}.device=cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        info = json.loads(proc.stdout.readline())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = time.monotonic()
    pids = info["workers"].values()
    while any(pid_alive(pid) for pid in pids) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    gone = time.monotonic() - killed
    print(f"workers gone {gone * 1000:.0f} ms after the supervisor was killed")
    assert not any(pid_alive(pid) for pid in pids), "an orphaned worker outlived its supervisor by 10 s"
    for name in ("prompt_rl", "postprocess_rl"):  # one of them was paused: it noticed too
        log = (Path(info["run_dir"]) / name / "train.log").read_text()
        assert "supervisor lost" in log
        assert list((Path(info["run_dir"]) / name / "checkpoints").glob("ckpt_*.pt")), "saved on the way out"


def test_the_ui_side_imports_nothing_heavy():
    code = ("import sys; import sa2va_tui.supervisor, sa2va_tui.headless, sa2va_tui.logtail, sa2va_tui.gpus, "
            "sa2va_tui.commands; print(sorted({'torch', 'stable_baselines3', 'transformers', 'textual'} & "
            "set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


LAUNCH_WITH_WORKLOAD = (
    "import sys, experiments.harness as h; h.EXPERIMENT_ENTRY_POINTS.update(prompt_rl='sv_workload:run', "
    "postprocess_rl='sv_workload:run'); sys.argv[0] = 'sa2va-tui'; from sa2va_tui.cli import main; main()"
)


def test_ctrl_c_stops_every_worker_gracefully(tmp_path):
    logs = tmp_path / "logs"
    args = ["launch", "--headless", "--set", f"run.logs_dir={logs}", "--set", "reward_net.enabled=false"]
    for kind in ("prompt_rl", "postprocess_rl"):
        args += ["--set", f"{kind}.total_timesteps=100000", "--set", f"{kind}.checkpoint_every=100000"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    # Its own process group, as a terminal's foreground job: Ctrl+C reaches every process in it.
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH_WITH_WORKLOAD, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        output = []
        while sum("phase: training" in line for line in output) < 2:
            line = proc.stdout.readline()
            assert line, "".join(output)
            output.append(line)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(output) + rest
    assert proc.returncode == 130, output
    assert "interrupted: stopping every experiment" in output and "Traceback" not in output
    (run_dir,) = logs.iterdir()
    snapshot = load_run(run_dir)
    assert not snapshot.active
    for name, state in snapshot.experiments.items():
        assert state.state == "stopped" and state.timesteps > 0, name
        assert Path(state.last_checkpoint).is_file() and state.checkpoint_step == state.timesteps
    stopped = [e for e in read_events(run_dir) if isinstance(e, Stopped)]
    assert sorted(e.reason for e in stopped) == ["shutdown", "shutdown"]
