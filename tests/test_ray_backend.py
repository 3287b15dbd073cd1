"""The supervisor's behaviours on the ray backend, with real Ray: a three-node cluster on
127.0.0.1 (`ray_cluster`, two nodes with two GPUs each that only Ray's counts know of),
the three real experiments in actors with `device: cpu`, and, for `launch`, the
private Ray instance the tool starts itself. The same behaviours as the local tests
(`test_supervisor.py`, `test_recovery.py`): three experiments to the end; pause,
resume, stop; a killed worker reported and restarted from its checkpoint; an injected
out-of-memory failure restarted at half the batch, on another node; a driver killed
without leaving an actor. `sv_workload` stands in where the real experiments cannot
show a behaviour on cue (placement of many attempts at once)."""

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
from sa2va_contract.events import (
    Checkpoint,
    Failed,
    Finished,
    GpuSample,
    Paused,
    Progress,
    Queued,
    Restarting,
    Resumed,
    Started,
    Stopped,
)
from sa2va_tui.app.widgets import GpuView
from sa2va_tui.cli import app
from sa2va_tui.report import read_report, render_markdown
from sa2va_tui.runstore import load_run, pid_alive, read_events
from sa2va_tui.supervisor import SupervisorError
from supervision import HERE, log_of, make_config, run_to_end, supervise, wait_for_steps

ALL = ("prompt_rl", "postprocess_rl", "reward_net")
PROBES = {name: "sv_workload:probe" for name in ALL}
GPU_HOSTS = {"node-a", "node-b"}


def test_three_experiments_run_to_the_end_on_the_cluster_quietly(ray_cluster, real_run, capfd):
    # prompt_rl takes a GPU slot (it computes on the CPU: the GPUs are only counted).
    config = make_config(real_run, *ray_cluster.settings(), "prompt_rl.num_gpus=1", experiments=ALL)
    nvml = FakeNvml([FakeGpu(used=2 * GiB, utilization=30), FakeGpu(used=5 * GiB)])
    supervisor, rec = supervise(config, nvml=nvml, gpu_interval=0.2, gpu_record_interval=0.5)
    supervisor.start()
    try:
        # Every GPU node's GPUs, by host, read there by its own sampler.
        sample = rec.wait_for(lambda e: isinstance(e, GpuSample) and e.available and all(g.memory_used for g in e.gpus))
        gpus = CliRunner().invoke(app, ["gpus", "--logs-dir", str(config.run.logs_dir)])  # from another terminal
        assert supervisor.wait(240)
    finally:
        supervisor.shutdown()
    assert sorted((g.host, g.index) for g in sample.gpus) == [("node-a", 0), ("node-a", 1), ("node-b", 0), ("node-b", 1)]
    assert {g.memory_used for g in sample.gpus} == {2 * GiB, 5 * GiB} and sample.message == "4 GPUs on 2 nodes"
    assert gpus.exit_code == 0 and "4 GPUs on 2 nodes" in gpus.output
    table = [line.split() for line in gpus.output.splitlines()[2:]]
    assert [row[:2] for row in table if row[0].startswith("node")] == [["node-a", "0"], ["node-b", "0"]]

    snapshot = load_run(supervisor.run_dir)
    for name in ALL:
        state = snapshot.experiments[name]
        assert state.state == "finished" and state.attempts == 1 and state.timesteps == state.total > 0, name
        assert Path(state.last_checkpoint).is_file(), name
        (started,) = rec.of(Started, name)
        (queued,) = rec.of(Queued, name)
        assert rec.events.index(queued) < rec.events.index(started)
        assert state.host == started.host and started.host in {"head", *GPU_HOSTS}
    assert rec.of(Queued, "prompt_rl")[0].resources == {"CPU": 1.0, "GPU": 1.0}
    assert rec.of(Queued, "reward_net")[0].resources == {"CPU": 1.0, "GPU": 0.0}
    assert rec.of(Started, "prompt_rl")[0].host in GPU_HOSTS and rec.of(Started, "prompt_rl")[0].gpu in (0, 1)
    assert rec.of(Started, "reward_net")[0].gpu is None
    kinds = [e.type for e in read_events(supervisor.run_dir) if e.experiment == "prompt_rl"]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "finished" and "checkpoint" in kinds
    assert (supervisor.run_dir / "postprocess_rl" / "final_model.zip").is_file()
    assert "dice_after" in snapshot.experiments["reward_net"].summary["finetune"]
    # Nothing of Ray's on the screen: its messages are in the run folder.
    captured = capfd.readouterr()
    assert captured.out == captured.err == ""
    assert (supervisor.run_dir / "ray.log").is_file()

    # Every view tells the hosts: status, the report's GPU table, the app's GPU panel.
    status = CliRunner().invoke(app, ["status", str(supervisor.run_dir)])
    rows = {line.split()[0]: line.split() for line in status.output.splitlines()[1:] if line.strip()}
    assert rows["experiment"][:4] == ["experiment", "state", "pid", "host"]
    assert all(rows[name][3] == snapshot.experiments[name].host for name in ALL), status.output
    markdown = render_markdown(read_report(supervisor.run_dir))
    gpu_rows = [line for line in markdown.splitlines() if line.startswith("| node-")]
    assert [row.split("|")[1:3] for row in gpu_rows] == [[" node-a ", " 0 "], [" node-a ", " 1 "], [" node-b ", " 0 "],
                                                         [" node-b ", " 1 "]]
    view = GpuView.of(sample, supervisor.states())
    assert view.grouped and view.hosts == ("node-a", "node-a", "node-b", "node-b") and view.lines == 2 * 4 + 2


def test_pause_resume_stop_on_the_cluster(ray_cluster, real_run):
    config = make_config(real_run, *ray_cluster.settings(), f"prompt_rl.total_timesteps={ENDLESS}",
                         "prompt_rl.checkpoint_every=100000")
    supervisor, rec = supervise(config)
    supervisor.start()
    try:
        rec.wait_for(lambda e: isinstance(e, Progress) and e.timesteps >= 64)
        supervisor.pause("prompt_rl")
        paused = rec.wait_for(lambda e: isinstance(e, Paused))
        assert supervisor.states()["prompt_rl"].state == "paused"
        held = supervisor.states()["prompt_rl"].timesteps
        time.sleep(1.0)
        assert supervisor.states()["prompt_rl"].timesteps == held == paused.step
        assert not rec.after(paused, Progress)
        supervisor.resume("prompt_rl")
        rec.wait_for(lambda e: isinstance(e, Resumed))
        rec.wait_for(lambda e: isinstance(e, Progress) and e.timesteps > paused.step + 64)
        assert supervisor.states()["prompt_rl"].state == "running"
        supervisor.stop("prompt_rl")
        stopped = rec.wait_for(lambda e: isinstance(e, Stopped))
        assert supervisor.wait(30)
    finally:
        supervisor.shutdown()
    (last,) = rec.of(Checkpoint)  # saved on the way out
    assert last.step == stopped.step > paused.step and Path(last.path).is_file()
    assert supervisor.states()["prompt_rl"].state == "stopped"
    with pytest.raises(SupervisorError, match="not running"):
        supervisor.pause("prompt_rl")


def test_a_killed_worker_is_reported_and_restarted_from_its_checkpoint(ray_cluster, real_run, capfd):
    config = make_config(real_run, *ray_cluster.settings(), f"prompt_rl.total_timesteps={ENDLESS}",
                         "prompt_rl.checkpoint_every=128")
    supervisor, rec = supervise(config)
    supervisor.start()
    try:
        started = rec.wait_for(lambda e: isinstance(e, Started))
        rec.wait_for(lambda e: isinstance(e, Checkpoint) and e.step >= 256)
        os.kill(started.pid, signal.SIGKILL)
        failed = rec.wait_for(lambda e: isinstance(e, Failed))
        assert failed.kind == "killed" and failed.message.startswith("the worker died: ")
        assert failed.exit_code is None  # Ray does not say
        assert failed.log_tail and failed.log_tail == log_of(supervisor, "prompt_rl").splitlines()[-len(failed.log_tail):]
        assert supervisor.wait(10)  # no automatic restart after a kill
        state = supervisor.states()["prompt_rl"]
        assert state.state == "failed" and state.failure.kind == "killed" and state.pid is None
        last = rec.of(Checkpoint)[-1]
        assert state.last_checkpoint == last.path

        supervisor.restart("prompt_rl", batch_size=16)
        second = rec.wait_for(lambda e: isinstance(e, Started) and e.attempt == 2)
        rec.wait_for(lambda e: isinstance(e, Progress) and e.timesteps > last.step + 128)
        supervisor.stop("prompt_rl")
        stopped = rec.wait_for(lambda e: isinstance(e, Stopped))
        assert supervisor.wait(30)
    finally:
        supervisor.shutdown()
    (restart,) = rec.of(Restarting)
    assert restart.changes.to_json() == {"resume_from": last.path, "batch_size": [32, 16]}  # no GPU claimed: Ray places
    assert (second.resumed_from, second.batch_size) == (last.path, 16)
    assert min(e.timesteps for e in rec.after(second, Progress)) == last.step and stopped.step > last.step + 128
    assert f"resumed from {last.path} at {last.step} timesteps, batch size 16" in log_of(supervisor, "prompt_rl")
    # Ray's driver prints a dead worker's news on stdout: it went to ray.log instead.
    captured = capfd.readouterr()
    assert captured.out == captured.err == ""
    assert "(raylet) A worker died or was killed" in (supervisor.run_dir / "ray.log").read_text()


def test_an_oom_restarts_at_half_the_batch_on_another_node_with_shipped_files(ray_cluster, real_run, tmp_path):
    """`ray.storage: ship`: the attempts write in node-local scratch; the run folder gets
    their files with their events, and the second attempt its checkpoint."""
    scratch = tmp_path / "scratch"
    config = make_config(real_run, *ray_cluster.settings(), "ray.storage=ship", f"ray.scratch_dir={scratch}",
                         "prompt_rl.num_gpus=1", "prompt_rl.faults={oom_at_step: 150, oom_min_batch_size: 32}")
    supervisor, rec = run_to_end(config, 180)

    (oom,) = rec.of(Failed)
    assert (oom.kind, oom.step, oom.batch_size) == ("oom", 150, 32) and "out of memory" in oom.message
    (restart,) = rec.of(Restarting)
    checkpoint = rec.before(oom, Checkpoint, "prompt_rl")[-1]
    assert restart.reason == "oom" and restart.changes.to_json() == {"batch_size": [32, 16],
                                                                     "resume_from": checkpoint.path}
    first, second = rec.of(Started)
    assert first.host in GPU_HOSTS and second.host in GPU_HOSTS and second.host != first.host
    assert (second.batch_size, second.resumed_from) == (16, checkpoint.path)
    state = load_run(supervisor.run_dir).experiments["prompt_rl"]
    assert (state.state, state.oom_restarts, state.batch_size, state.host) == ("finished", 1, 16, second.host)

    exp_dir = supervisor.run_dir / "prompt_rl"
    # The events name the run folder's files, and every one of them is there.
    assert checkpoint.path.startswith(str(exp_dir)) and Path(checkpoint.path).is_file()
    assert all(Path(e.path).is_file() for e in rec.of(Checkpoint))
    assert (exp_dir / "final_model.zip").is_file() and (exp_dir / "best_model.zip").is_file()
    log = log_of(supervisor, "prompt_rl")
    assert log.count("attempt 1 of prompt_rl") == 1 and log.count("attempt 2 of prompt_rl") == 1  # one log, both
    assert f"resumed from {scratch}" in log  # the second attempt read its checkpoint from its own scratch
    # One progress.csv: the first attempt's rows up to its checkpoint, then the second's.
    rows = list(csv.DictReader((exp_dir / "progress.csv").open()))
    steps = [int(row["time/total_timesteps"]) for row in rows]
    assert steps == sorted(steps) and sorted(set(steps)) == list(range(32, 257, 32))
    assert [int(row["time/iterations"]) for row in rows if int(row["time/total_timesteps"]) == checkpoint.step + 32] == [1]
    assert not list(scratch.glob("*/prompt_rl/attempt-*")), "scratch is cleaned after each attempt"


def test_placement_queued_infeasible_and_pinned(ray_cluster, tmp_path):
    """Three attempts that each want a whole node's two GPUs: two run, the third is
    queued until a node frees. An attempt no node can ever take fails at once."""
    base = [f"run.logs_dir={tmp_path}", *ray_cluster.settings()]
    config = make_config(base, *(f"{n}.device=cpu" for n in ALL), *(f"{n}.num_gpus=2" for n in ALL), experiments=ALL)
    supervisor, rec = run_to_end(config, 90, entry_points=PROBES)
    assert [s.state for s in supervisor.states().values()] == ["finished"] * 3
    order = [(e.type, e.experiment) for e in rec.events if isinstance(e, (Started, Finished))]
    running = [0]
    for kind, _ in order:  # never more at once than the two nodes' GPUs hold (both at once when starts are quick)
        running.append(running[-1] + (1 if kind == "started" else -1))
    assert max(running) <= 2 and running[-1] == 0
    assert {e.host for e in rec.of(Started)} <= GPU_HOSTS
    # Ray's GPUs are the attempt's CUDA devices, numbered as NVML numbers them.
    assert {e.summary["cuda_visible_devices"] for e in rec.of(Finished)} == {"0,1"}
    assert {e.summary["cuda_device_order"] for e in rec.of(Finished)} == {"PCI_BUS_ID"}

    config = make_config(base, "prompt_rl.num_gpus=8", "variants={pinned: {base: prompt_rl, num_gpus: 0, host: node-z},"
                         " on_head: {base: prompt_rl, num_gpus: 1, host: head}, on_b: {base: prompt_rl, num_gpus: 0,"
                         " host: node-b}}")
    supervisor, rec = run_to_end(config, 60, entry_points=PROBES)
    failures = {e.experiment: e.message for e in rec.of(Failed)}
    assert failures == {
        "prompt_rl": "infeasible: no node of the Ray cluster can ever give GPU 8, CPU 1; the largest node, node-a, "
                     "has GPU 2, CPU 2",
        "pinned": "host: no alive node of the Ray cluster is 'node-z' (nodes: head, node-a, node-b)",
        "on_head": "infeasible: no node of the Ray cluster on head can ever give GPU 1, CPU 1; the largest node, head, "
                   "has CPU 2",
    }
    assert not rec.of(Started, "prompt_rl") and [e.host for e in rec.of(Started, "on_b")] == ["node-b"]
    assert rec.of(Finished, "on_b")[0].summary["cuda_visible_devices"] == ""  # no GPU asked for: none seen


DRIVER_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from sa2va_contract.config import load_config
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    if __name__ == "__main__":
        config = load_config(sys.argv[1], sys.argv[2:])
        supervisor = Supervisor(config, RunStore.create(config))
        supervisor.start()
        while not all(s.timesteps > 0 for s in supervisor.states().values()):
            time.sleep(0.05)
        print(json.dumps({"run_dir": str(supervisor.run_dir), "pids": {n: s.pid for n, s in supervisor.states().items()}}),
              flush=True)
        time.sleep(600)
""")


def test_killing_the_driver_leaves_no_actor(ray_cluster, real_run, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER_SCRIPT)
    args = [*real_run, *ray_cluster.settings(), "reward_net.enabled=false"]
    for kind in ("prompt_rl", "postprocess_rl"):
        args += [f"{kind}.total_timesteps={ENDLESS}"]
    proc = subprocess.Popen([sys.executable, str(script), str(QUICK_CONFIG), *args], stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        info = json.loads(proc.stdout.readline())
        pids = info["pids"].values()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = time.monotonic()
    while any(pid_alive(pid) for pid in pids) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    print(f"actors gone {(time.monotonic() - killed) * 1000:.0f} ms after their driver was killed")
    assert not any(pid_alive(pid) for pid in pids), "an actor outlived its driver by 10 s"
    # A driver started outside this checkout: its attempts ran the tool's code as shipped with the job.
    for name in ("prompt_rl", "postprocess_rl"):
        log = (Path(info["run_dir"]) / name / "train.log").read_text()
        assert f"code from {ray_cluster.temp}/session_" in log and "runtime_resources/py_modules_files" in log


def test_launch_on_a_private_ray_leaves_no_ray_process_and_nothing_under_home(real_run, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    args = ["launch", "--all", "--headless", "-c", str(QUICK_CONFIG), "--backend", "ray", "--set", "ray.num_cpus=3"]
    for setting in real_run:
        args += ["--set", setting]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing of the test cluster's
    proc = subprocess.Popen([sys.executable, "-m", "sa2va_tui.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE.parent, env={**env, "HOME": str(home)})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    (run_dir,) = (tmp_path / "logs").iterdir()
    snapshot = load_run(run_dir)
    assert [s.state for s in snapshot.experiments.values()] == ["finished"] * 3
    assert out.startswith("ray: starting a private instance on 127.0.0.1\n")  # ours; Ray's own lines are not there
    assert err == "" and "(raylet)" not in out and "worker.py" not in out and "Started a local Ray" not in out
    assert out.count("queued: waiting for the cluster to place it (CPU 1)") == 3
    assert "Started a local Ray instance" in (run_dir / "ray.log").read_text()
    assert (run_dir / "ray-session").is_dir()
    assert not (home / ".ray").exists()
    # Its instance's processes all named its folder under /tmp, which names its pid.
    left = [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, f"sa2va-ray-{proc.pid}-")]
    assert not left, [(p.name, (p / "cmdline").read_bytes()[:120]) for p in left]
    assert not list(Path("/tmp").glob(f"sa2va-ray-{proc.pid}-*"))


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_ctrl_c_stops_every_actor_gracefully(ray_cluster, real_run, tmp_path):
    """As the local test does it: the command in its own process group, as a terminal's
    foreground job, SIGINT to the group. Ray's own processes ignore it; the attempts
    save and stop, asked by the supervisor."""
    args = ["launch", "--headless", "-c", str(QUICK_CONFIG), "--set", "reward_net.enabled=false"]
    for setting in [*real_run, *ray_cluster.settings(), *(f"{k}.total_timesteps={ENDLESS}" for k in ALL[:2]),
                    *(f"{k}.checkpoint_every={ENDLESS}" for k in ALL[:2])]:
        args += ["--set", setting]
    proc = subprocess.Popen(foreground_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=HERE.parent, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for_steps(tmp_path / "logs", 2, alive=lambda: proc.poll() is None, timeout=120)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10.0)
    output = "".join(lines)
    assert proc.returncode == 130 and "interrupted: stopping every experiment" in output, output
    (run_dir,) = (tmp_path / "logs").iterdir()
    stopped = {e.experiment: e for e in read_events(run_dir) if isinstance(e, Stopped)}
    assert sorted(e.reason for e in stopped.values()) == ["shutdown", "shutdown"]
    for name, state in load_run(run_dir).experiments.items():
        assert state.state == "stopped" and Path(state.last_checkpoint).is_file(), name
        assert state.checkpoint_step == stopped[name].step == state.timesteps > 0, name


PRIVATE_DRIVER = textwrap.dedent("""
    import json, sys, time
    from sa2va_contract.config import load_config
    from sa2va_tui.runstore import RunStore
    from sa2va_tui.supervisor import Supervisor

    if __name__ == "__main__":
        config = load_config(sys.argv[1], sys.argv[2:])
        supervisor = Supervisor(config, RunStore.create(config), entry_points={"prompt_rl": "sv_workload:stuck"})
        supervisor.start()
        while not all(s.pid for s in supervisor.states().values()):
            time.sleep(0.05)
        print(json.dumps({n: s.pid for n, s in supervisor.states().items()}), flush=True)
        time.sleep(600)
""")


def test_a_killed_driver_s_private_instance_dies_and_its_leftovers_go_at_the_next_start(tmp_path):
    from sa2va_tui.placement.ray_session import end_leftovers

    script = tmp_path / "driver.py"
    script.write_text(PRIVATE_DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([sys.executable, str(script), str(QUICK_CONFIG), f"run.logs_dir={tmp_path}",
                             "run.backend=ray", "ray.num_cpus=2", "postprocess_rl.enabled=false",
                             "reward_net.enabled=false"], stdout=subprocess.PIPE, text=True, cwd=HERE, env=env)
    try:
        pids = list(json.loads(proc.stdout.readline()).values())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (folder,) = Path("/tmp").glob(f"sa2va-ray-{proc.pid}-*")
    killed = time.monotonic()
    while any(pid_alive(pid) for pid in pids) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    assert not any(pid_alive(pid) for pid in pids), "an actor outlived its driver by 10 s"
    end_leftovers()  # what the next start does first
    assert not folder.exists()
    time.sleep(0.5)
    assert not [p for p in Path("/proc").glob("[0-9]*") if pid_alive(int(p.name)) and _holds_files_in(p, folder)]


def _holds_files_in(proc: Path, folder: Path) -> bool:
    try:
        return any(os.readlink(fd).startswith(f"{folder}/") for fd in (proc / "fd").iterdir())
    except OSError:
        return False
