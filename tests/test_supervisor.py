"""The supervisor with real worker processes (spawn), real signals and a real run folder.

The workers run the three real experiments (configs/quick.yaml made smaller still, see
`conftest.SMALL_RUN`, on a mask cache filled once per session). `sv_workload` stands in
only where a real experiment cannot show the behaviour on this machine: placement on a
GPU (there is none here; a real experiment given one asks CUDA for it), an arbitrary
error at startup, a process that vanishes without a word, one that never reaches a step
point. Bounds on time are the issue's own limits, generous where the machine is shared.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ENDLESS, QUICK_CONFIG, foreground_cli
from fake_nvml import GiB, FakeGpu, FakeNvml
from sa2va_contract.config import EXPERIMENT_KINDS, load_config
from sa2va_contract.events import (
    Checkpoint,
    Failed,
    Finished,
    Paused,
    Progress,
    Restarting,
    Resumed,
    Started,
    Stopped,
)
from sa2va_tui.runstore import load_run, pid_alive, read_events
from sa2va_tui.supervisor import Supervisor, SupervisorError
from supervision import HERE, Recorder, log_of, make_config, supervise, wait_for_steps


def test_launch_runs_three_experiments_and_a_variant_to_the_end(real_run, tmp_path):
    from sa2va_tui.cli import app

    logs = tmp_path / "logs"
    args = ["launch", "--all", "--headless", "-c", str(QUICK_CONFIG)]
    for setting in [*real_run, "run.name=e2e", "variants={prompt_rl_seed1: {base: prompt_rl, seed: 1}}"]:
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    names = ["prompt_rl", "postprocess_rl", "reward_net", "prompt_rl_seed1"]
    (run_dir,) = logs.iterdir()
    assert run_dir.name.endswith("-e2e")
    snapshot = load_run(run_dir)
    assert not snapshot.active and list(snapshot.experiments) == names
    for name in names:
        state = snapshot.experiments[name]
        assert state.state == "finished" and state.attempts == 1, name
        assert state.timesteps == state.total > 0, name
        assert (run_dir / name / "train.log").is_file() and Path(state.last_checkpoint).is_file()
        assert f"{name} finished" in " ".join(result.output.split())
    for name in ("prompt_rl", "postprocess_rl", "prompt_rl_seed1"):
        summary = snapshot.experiments[name].summary
        assert summary["timesteps"] == snapshot.experiments[name].total == 256
        assert (run_dir / name / "final_model.zip").is_file()
    assert "dice_after" in snapshot.experiments["reward_net"].summary["finetune"]
    # Two seeds, two trainings: the variant's episodes are its own.
    rewards = {name: [row["rollout/ep_rew_mean"] for row in csv.DictReader((run_dir / name / "progress.csv").open())]
               for name in ("prompt_rl", "prompt_rl_seed1")}
    assert rewards["prompt_rl"] != rewards["prompt_rl_seed1"] and len(rewards["prompt_rl"]) >= 4
    events = list(read_events(run_dir))
    for name in names:
        kinds = [e.type for e in events if e.experiment == name]
        if kinds[0] == "queued":  # two cores: two run at once, the others wait their turn
            kinds.pop(0)
        assert kinds[0] == "started" and kinds[-1] == "finished" and "progress" in kinds and "checkpoint" in kinds
        assert "metrics" in kinds and "phase" in kinds
    assert (run_dir / "config.yaml").is_file()

    status = CliRunner().invoke(app, ["status", "--logs-dir", str(logs)])
    assert status.exit_code == 0, status.output
    # Four experiments and the mask stage, which found every pair cached.
    assert "no supervisor running" in status.output and status.output.count("finished") == 5
    assert "mask stage: finished, 0/0 pairs" in status.output and "masks: model calls 0," in status.output


def test_launch_refuses_unknown_experiment_in_one_line(tmp_path):
    from sa2va_tui.cli import app

    result = CliRunner().invoke(app, ["launch", "--only", "nope", "--set", f"run.logs_dir={tmp_path}"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --only nope: not an enabled experiment (enabled: prompt_rl, postprocess_rl, reward_net)"]


# --- control ---------------------------------------------------------------------------


def test_pause_resume_stop_then_resume_the_run(real_run):
    config = make_config(real_run, f"prompt_rl.total_timesteps={ENDLESS}", "prompt_rl.checkpoint_every=100000")
    supervisor, rec = supervise(config)
    supervisor.start()
    rec.wait_for(lambda e: isinstance(e, Progress) and e.timesteps >= 64)
    asked = time.monotonic()
    supervisor.pause("prompt_rl")
    paused = rec.wait_for(lambda e: isinstance(e, Paused))
    # Measured by benchmarks/ against the one second; here only printed.
    print(f"pause latency {(time.monotonic() - asked) * 1000:.0f} ms")
    assert supervisor.states()["prompt_rl"].state == "paused"
    held = supervisor.states()["prompt_rl"].timesteps
    assert held == paused.step >= 64  # where it stands, though PPO reports progress twice a second
    time.sleep(1.0)
    assert supervisor.states()["prompt_rl"].timesteps == held  # it really stands still
    assert not rec.after(paused, Progress) and not rec.after(paused, Checkpoint)
    supervisor.resume("prompt_rl")
    resumed = rec.wait_for(lambda e: isinstance(e, Resumed))
    rec.wait_for(lambda e: isinstance(e, Progress) and e.timesteps > paused.step + 64)
    assert supervisor.states()["prompt_rl"].state == "running"
    assert min(e.timesteps for e in rec.after(resumed, Progress)) >= paused.step

    supervisor.stop("prompt_rl")
    stopped = rec.wait_for(lambda e: isinstance(e, Stopped))
    assert supervisor.wait(30)
    (last,) = rec.of(Checkpoint)  # the only one: saved on the way out
    assert last.step == stopped.step > paused.step and Path(last.path).is_file()
    assert supervisor.states()["prompt_rl"].state == "stopped"
    with pytest.raises(SupervisorError, match="not running"):
        supervisor.pause("prompt_rl")
    supervisor.shutdown()

    # `sa2va-tui resume RUN`: a new supervisor on the same folder carries on from there.
    again = Supervisor.for_run(supervisor.run_dir)
    rec2 = Recorder()
    again.subscribe(rec2)
    again.start()
    try:
        second = rec2.wait_for(lambda e: isinstance(e, Started) and e.experiment == "prompt_rl")
        rec2.wait_for(lambda e: isinstance(e, Progress) and e.timesteps > stopped.step + 64)
    finally:
        again.shutdown()
    (restart,) = rec2.of(Restarting)
    assert (restart.reason, restart.attempt, restart.changes.to_json()) == ("resume", 2, {"resume_from": last.path})
    assert (second.attempt, second.resumed_from) == (2, last.path)
    assert min(e.timesteps for e in rec2.of(Progress, "prompt_rl")) == stopped.step  # carried on, not from zero
    assert f"resumed from {last.path} at {stopped.step} timesteps" in log_of(again, "prompt_rl")
    assert rec2.of(Stopped)[-1].reason == "shutdown"
    assert load_run(supervisor.run_dir).experiments["prompt_rl"].attempts == 2


def test_sigkill_is_reported_and_a_restart_carries_the_timesteps_on(real_run):
    config = make_config(real_run, f"prompt_rl.total_timesteps={ENDLESS}", "prompt_rl.checkpoint_every=128")
    supervisor, rec = supervise(config)
    supervisor.start()
    try:
        started = rec.wait_for(lambda e: isinstance(e, Started) and e.experiment == "prompt_rl")  # not the mask stage
        ckpt = rec.wait_for(lambda e: isinstance(e, Checkpoint) and e.step >= 256)
        os.kill(started.pid, signal.SIGKILL)
        failed = rec.wait_for(lambda e: isinstance(e, Failed))
        assert (failed.kind, failed.exit_code, failed.message) == ("killed", -signal.SIGKILL, "killed by SIGKILL")
        # The last lines of its log: SB3's table of the training it was killed in.
        assert failed.log_tail == log_of(supervisor, "prompt_rl").splitlines()[-len(failed.log_tail):]
        assert len(failed.log_tail) == 20 and any("total_timesteps" in line for line in failed.log_tail)
        assert supervisor.wait(10)  # no automatic restart after a kill
        state = supervisor.states()["prompt_rl"]
        assert state.state == "failed" and state.failure.kind == "killed" and state.pid is None
        assert not pid_alive(started.pid)
        last = rec.of(Checkpoint)[-1]
        assert last.step >= ckpt.step and state.last_checkpoint == last.path

        with pytest.raises(SupervisorError, match="must divide n_steps"):
            supervisor.restart("prompt_rl", batch_size=24)  # the rollout is 16 x 2
        supervisor.restart("prompt_rl", batch_size=16)
        second = rec.wait_for(lambda e: isinstance(e, Started) and e.attempt == 2)
        rec.wait_for(lambda e: isinstance(e, Progress) and e.timesteps > last.step + 128)
        supervisor.stop("prompt_rl")
        stopped = rec.wait_for(lambda e: isinstance(e, Stopped))
        assert supervisor.wait(30)
    finally:
        supervisor.shutdown()
    (restart,) = rec.of(Restarting)
    assert (restart.reason, restart.attempt, restart.changes.to_json()["resume_from"]) == ("manual", 2, last.path)
    assert restart.changes.to_json()["batch_size"] == [32, 16]
    assert (second.resumed_from, second.batch_size) == (last.path, 16)
    after = [e.timesteps for e in rec.after(second, Progress)]
    assert min(after) == last.step and stopped.step > last.step + 128  # carried on, not from zero
    # The model itself was loaded from that checkpoint and trains at the new batch size.
    assert f"resumed from {last.path} at {last.step} timesteps, batch size 16" in log_of(supervisor, "prompt_rl")
    state = load_run(supervisor.run_dir).experiments["prompt_rl"]
    assert (state.state, state.attempts, state.batch_size) == ("stopped", 2, 16)


def test_workers_report_errors_and_silent_deaths_and_print_only_to_their_log(tmp_path, capfd):
    """sv_workload: GPU placement (no GPU here), an arbitrary error at startup, and a
    process that exits without a word, none of which a real experiment does on cue."""
    nvml = FakeNvml([FakeGpu(used=50 * GiB), FakeGpu(used=10 * GiB)])
    config = load_config(QUICK_CONFIG, [f"run.logs_dir={tmp_path}", "prompt_rl.device=auto",
                                        "reward_net.device=auto", "reward_net.gpu=0"])
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
    assert (error.kind, error.message) == ("startup", "ValueError: the stand-in experiment failed on purpose")
    assert "fail: about to go wrong" in error.log_tail and any("Traceback" in line for line in error.log_tail)

    (vanished,) = rec.of(Failed, "reward_net")
    assert (vanished.kind, vanished.exit_code) == ("error", 7)
    assert vanished.message == "exited with code 7 without a report" and "vanish: leaving" in vanished.log_tail

    log = log_of(supervisor, "prompt_rl")
    for line in ("print to stdout", "print to stderr", "raw write to fd 1", "raw write to fd 2"):
        assert f"probe: {line}" in log
    captured = capfd.readouterr()
    assert "probe:" not in captured.out + captured.err and "fail:" not in captured.out + captured.err
    states = load_run(supervisor.run_dir).experiments
    assert [states[k].state for k in EXPERIMENT_KINDS] == ["finished", "failed", "failed"]


def test_shutdown_kills_a_worker_that_does_not_stop_in_time(tmp_path):
    """sv_workload: a real experiment reaches a step point every few milliseconds."""
    config = load_config(QUICK_CONFIG, [f"run.logs_dir={tmp_path}", "postprocess_rl.enabled=false",
                                        "reward_net.enabled=false"])
    supervisor, rec = supervise(config, entry_points={"prompt_rl": "sv_workload:stuck"})
    supervisor.start()
    started = rec.wait_for(lambda e: isinstance(e, Started))
    rec.wait_for(lambda e: isinstance(e, Progress))  # training: a stop before it would end the worker by itself
    t0 = time.monotonic()
    supervisor.shutdown(grace_s=1.0)
    assert time.monotonic() - t0 < 8
    assert not pid_alive(started.pid)
    (failed,) = rec.of(Failed)
    assert (failed.kind, failed.message) == ("killed", "did not stop within 1 s and was killed")
    assert not load_run(supervisor.run_dir).active


SUPERVISOR_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from sa2va_contract.config import load_config
    from sa2va_contract.events import Started
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    if __name__ == "__main__":
        config = load_config(sys.argv[1], sys.argv[2:])
        supervisor = Supervisor(config, RunStore.create(config))
        started = {}
        supervisor.subscribe(lambda e: isinstance(e, Started) and started.setdefault(e.experiment, e.pid))
        supervisor.start()
        while len(started) < 2 or not all(s.timesteps > 0 for s in supervisor.states().values()):
            time.sleep(0.05)
        supervisor.pause("postprocess_rl")
        while supervisor.states()["postprocess_rl"].state != "paused":
            time.sleep(0.05)
        print(json.dumps({"run_dir": str(supervisor.run_dir), "workers": started}), flush=True)
        time.sleep(600)
""")


def test_killing_the_supervisor_leaves_no_worker_behind(real_run, tmp_path):
    script = tmp_path / "supervisor_script.py"
    script.write_text(SUPERVISOR_SCRIPT)
    args = [*real_run, "reward_net.enabled=false"]
    for kind in ("prompt_rl", "postprocess_rl"):
        # Long runs without periodic checkpoints: a checkpoint found is one saved on the way out.
        args += [f"{kind}.total_timesteps={ENDLESS}", f"{kind}.checkpoint_every={ENDLESS}"]
    proc = subprocess.Popen([sys.executable, str(script), str(QUICK_CONFIG), *args], stdout=subprocess.PIPE,
                            text=True, cwd=HERE.parent)
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
        assert "supervisor lost" in log and "stopped at step" in log
        assert list((Path(info["run_dir"]) / name / "checkpoints").glob("ckpt_*.zip")), "saved on the way out"


def test_the_ui_side_imports_nothing_heavy():
    code = ("import sys; import sa2va_tui.supervisor, sa2va_tui.headless, sa2va_tui.logtail, sa2va_tui.gpus, "
            "sa2va_tui.commands; print(sorted({'torch', 'stable_baselines3', 'transformers', 'textual'} & "
            "set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ctrl_c_stops_every_worker_gracefully(real_run, tmp_path):
    logs = tmp_path / "logs"
    args = ["launch", "--headless", "-c", str(QUICK_CONFIG), "--set", "reward_net.enabled=false"]
    for setting in real_run:
        args += ["--set", setting]
    for kind in ("prompt_rl", "postprocess_rl"):
        args += ["--set", f"{kind}.total_timesteps={ENDLESS}", "--set", f"{kind}.checkpoint_every={ENDLESS}"]
    # Its own process group, as a terminal's foreground job (`foreground_cli`): Ctrl+C
    # reaches every process in it.
    # PYTHONFAULTHANDLER: should it ever hang, SIGABRT shows where (see below).
    proc = subprocess.Popen(foreground_cli(*args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=HERE.parent, start_new_session=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # never a full pipe
    reader.start()
    try:
        wait_for_steps(logs, 2, alive=lambda: proc.poll() is None)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # Every Python process of the group prints its threads' stacks (workers into
            # their train.log), for the failure message.
            os.killpg(proc.pid, signal.SIGABRT)
            time.sleep(2.0)
            reader.join(5.0)
            logs_written = "".join(f"\n--- {p}\n" + p.read_text(errors="replace")[-6000:]
                                   for p in logs.glob("*/*/train.log"))
            pytest.fail("no exit 60 s after Ctrl+C:\n" + "".join(lines) + logs_written)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10.0)
    output = "".join(lines)
    assert proc.returncode == 130, output
    assert "interrupted: stopping every experiment" in output and "Traceback" not in output
    (run_dir,) = logs.iterdir()
    snapshot = load_run(run_dir)
    assert not snapshot.active
    stopped = {e.experiment: e for e in read_events(run_dir) if isinstance(e, Stopped)}
    assert sorted(e.reason for e in stopped.values()) == ["shutdown", "shutdown"]
    for name, state in snapshot.experiments.items():
        assert state.state == "stopped" and state.timesteps > 0, name
        assert Path(state.last_checkpoint).is_file() and state.checkpoint_step == stopped[name].step, name
        assert state.timesteps == stopped[name].step, name  # what status shows is where it stopped
