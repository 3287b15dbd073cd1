"""Faults of processes, streams, signals and disk, provoked for real on the real command:
a reader that closes the pipe, GNU `timeout`'s two SIGTERMs and a hang-up, a file-size
limit (RLIMIT_FSIZE, SIGXFSZ ignored: every write past it gets EFBIG, as a full disk
gives ENOSPC) on the supervisor's run folder and on a worker's checkpoint, and stop
signals to `tensorboard`. Each asserts what the user sees and what is left on disk.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ENDLESS, QUICK_CONFIG, ROOT, foreground_cli
from supervision import wait_for_steps
from sa2va_contract import events
from sa2va_contract.config import EXPERIMENT_KINDS, load_config
from sa2va_tui.runstate import ExperimentState
from sa2va_tui.runstore import RunStore, load_run, pid_alive, read_events
from test_report_commands import _free_port, _listening_addresses

def _only(real_run: list[str], kind: str, *settings: str) -> list[str]:
    """`--set` flags for a small real run of one experiment kind."""
    chosen = [*real_run, "run.name=faults", *(f"{k}.enabled=false" for k in EXPERIMENT_KINDS if k != kind), *settings]
    return [flag for setting in chosen for flag in ("--set", setting)]


def _start(args: list[str], stdout=subprocess.PIPE, file_size_limit: int | None = None,
           command: tuple[str, ...] = ()) -> subprocess.Popen:
    """`sa2va-tui ARGS` in a process group of its own (what a terminal or `timeout`
    gives it), optionally under a file-size limit its workers inherit."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit get EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.Popen([*command, *foreground_cli(*args)], stdout=stdout,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"}, preexec_fn=limit_file_size if file_size_limit else None)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    """Wait for the command; its stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)  # with PYTHONFAULTHANDLER: every process's stacks
        time.sleep(2.0)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the command did not end within {timeout:g} s:\n{err}")
    return err


def _workers(run_dir: Path) -> list[int]:
    return [e.pid for e in read_events(run_dir) if isinstance(e, events.Started)]


def _leftover_temp_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def _checkpoint(run_dir: Path, state: ExperimentState) -> Path:
    """The file of an experiment's recorded checkpoint (run.json may name it relative
    to the run folder or to the experiment's)."""
    assert state.last_checkpoint, f"{state.name}: no checkpoint recorded"
    found = [p for p in (Path(state.last_checkpoint), run_dir / state.last_checkpoint,
                         run_dir / state.name / state.last_checkpoint) if p.is_file()]
    assert found, f"{state.name}: {state.last_checkpoint} is not there"
    return found[0]


def _assert_no_worker_left(run_dir: Path) -> None:
    pids = _workers(run_dir)
    assert pids, "no worker was started"
    deadline = time.monotonic() + 10  # a worker the supervisor reaped is gone; its zombie, if any, is not alive
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if pid_alive(pid)], "a worker outlived the command"


@pytest.fixture(scope="module")
def closed_reader_run(mask_cache, tmp_path_factory):
    """A headless launch whose reader reads three lines and closes the pipe (`| head
    -3`), run to its end: the command's exit code, stderr, the three lines, its folder."""
    logs = tmp_path_factory.mktemp("closed_reader") / "logs"
    from conftest import SMALL_RUN

    real_run = [*SMALL_RUN, f"backend.cache_dir={mask_cache}", f"run.logs_dir={logs}"]
    read_end, write_end = os.pipe()
    started = time.monotonic()
    proc = _start(["launch", "--headless", "-c", str(QUICK_CONFIG),
                   *_only(real_run, "prompt_rl", "prompt_rl.total_timesteps=128")], stdout=write_end)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        head = [reader.readline() for _ in range(3)]
    err = _finish(proc)
    print(f"| head -3: exit {proc.returncode} {time.monotonic() - started:.1f} s after the launch")
    (run_dir,) = logs.iterdir()
    return {"code": proc.returncode, "stderr": err, "head": head, "dir": run_dir}


def test_a_reader_that_closes_silences_the_output_and_the_run_goes_on(closed_reader_run):
    run = closed_reader_run
    assert run["head"][0].startswith("run ") and all(run["head"]), run["head"]
    assert run["code"] == 0, run["stderr"]
    # Nothing on stderr either: no traceback, no "Exception ignored ... BrokenPipeError".
    assert run["stderr"] == ""
    snapshot = load_run(run["dir"])
    assert not snapshot.active
    state = snapshot.experiments["prompt_rl"]
    assert state.state == "finished" and state.timesteps >= 128
    assert any(isinstance(e, events.Finished) for e in read_events(run["dir"])), "the folder recorded the end"
    _assert_no_worker_left(run["dir"])


@pytest.mark.parametrize("command", [["status"], ["runs"], ["report"]])
def test_commands_that_print_into_a_closed_pipe_exit_quietly(closed_reader_run, command):
    """`status | head -1` and the like, where the reader is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    logs = closed_reader_run["dir"].parent
    result = subprocess.run([sys.executable, "-m", "sa2va_tui.cli", *command, "--logs-dir", str(logs)],
                            stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60)
    os.close(write_end)
    assert result.stderr == "" and result.returncode in (0, 1), result.stderr


def test_timeout_two_sigterms_and_a_hang_up_are_one_graceful_stop(real_run):
    """GNU `timeout` signals the command, then its whole process group; a terminal that
    closes sends SIGHUP. All of it is one graceful stop: each worker saves a checkpoint.
    The output's reader is gone first, as `| tee` is after Ctrl+C."""
    logs = Path(next(s.split("=", 1)[1] for s in real_run if s.startswith("run.logs_dir=")))
    args = ["launch", "--headless", "-c", str(QUICK_CONFIG),
            *_only(real_run, "prompt_rl", f"prompt_rl.total_timesteps={ENDLESS}",
                   f"prompt_rl.checkpoint_every={ENDLESS}")]
    read_end, write_end = os.pipe()
    proc = _start(args, stdout=write_end, command=("timeout", "-s", "TERM", "600"))
    os.close(write_end)
    with os.fdopen(read_end) as reader:  # read until training, then go away
        lines = []
        while not lines or "phase: training" not in lines[-1]:
            lines.append(reader.readline())
            assert lines[-1], "".join(lines) + proc.stderr.read()
    wait_for_steps(logs, 1, alive=lambda: proc.poll() is None)
    # What `timeout` does when its time is up (or it is itself signalled): SIGTERM to the
    # command, then SIGTERM to the group, the workers included.
    os.kill(proc.pid, signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGHUP)
    err = _finish(proc, timeout=60)
    print(f"timeout's SIGTERMs and a SIGHUP: exit {proc.returncode} {time.monotonic() - signalled:.1f} s later")
    assert err == "", err  # no traceback, no BrokenPipeError
    (run_dir,) = logs.iterdir()
    snapshot = load_run(run_dir)
    assert not snapshot.active
    state = snapshot.experiments["prompt_rl"]
    assert state.state == "stopped", (state.state, state.failure)
    assert zipfile.is_zipfile(_checkpoint(run_dir, state)) and state.checkpoint_step == state.timesteps
    recorded = [e for e in read_events(run_dir) if isinstance(e, (events.Stopped, events.Failed))]
    assert [type(e) for e in recorded] == [events.Stopped], recorded  # not killed: nothing "did not stop within 0 s"
    _assert_no_worker_left(run_dir)


def _resumable_run(real_run: list[str], padding: int) -> Path:
    """A run folder that `resume` continues (prompt_rl stopped before its first
    checkpoint; it saves one every 64 steps), whose events.jsonl already holds `padding`
    bytes of a long run's events."""
    settings = _only(real_run, "prompt_rl", f"prompt_rl.total_timesteps={ENDLESS}",
                     "prompt_rl.checkpoint_every=64")[1::2]
    config = load_config(QUICK_CONFIG, settings)
    store = RunStore.create(config)
    store.write_state({"prompt_rl": ExperimentState("prompt_rl", kind="prompt_rl", state="stopped", attempts=1,
                                                    total=ENDLESS)}, None, active=False)
    with open(store.path / "events.jsonl", "w", encoding="utf-8") as f:
        step = 0
        while f.tell() < padding:
            step += 1
            f.write(events.Metrics("prompt_rl", step=step, values={"rollout/ep_rew_mean": 0.01}).to_json() + "\n")
    return store.path


def test_a_full_disk_under_the_run_folder_stops_the_run_in_one_line(real_run):
    limit = 1024 * 1024  # a limit per file, above a checkpoint's size (0.8 MB)
    # Room in events.jsonl for the events up to training (the mask stage's and the
    # experiment's, about 3 kB) and a few checkpoints' (0.23 kB each): it fills in training.
    run_dir = _resumable_run(real_run, padding=limit - 8000)
    before = json.loads((run_dir / "run.json").read_text())
    proc = _start(["resume", str(run_dir), "--headless"], file_size_limit=limit)
    out, err = proc.communicate(timeout=150)
    assert "Traceback" not in out + err and err == "", out + err
    problem = f"disk full: {run_dir / 'events.jsonl'}"
    assert sum(problem in line for line in out.splitlines()) == 1, out
    assert proc.returncode == 1, out
    # run.json: still whole, the run no longer active, the experiment stopped with the
    # checkpoint it saved on its way out (it fits under the limit).
    snapshot = load_run(run_dir)
    assert not snapshot.active and snapshot.created_at == before["created_at"]
    state = snapshot.experiments["prompt_rl"]
    assert state.state == "stopped" and state.attempts == 2, (state.state, state.failure)
    assert zipfile.is_zipfile(_checkpoint(run_dir, state))
    checkpoints = list((run_dir / "prompt_rl" / "checkpoints").glob("ckpt_*.zip"))
    assert len(checkpoints) >= 2 and all(zipfile.is_zipfile(p) for p in checkpoints), checkpoints
    assert problem in (run_dir / "supervisor.log").read_text()
    assert not _leftover_temp_files(run_dir)
    _assert_no_worker_left(run_dir)


def test_a_full_disk_under_reward_nets_checkpoint_is_one_line_and_not_retried(real_run):
    limit = 3 * 1024 * 1024  # its reward network (0.9 MB) and segmenter (1.5 MB) fit; its checkpoint (5 MB) not
    logs = Path(next(s.split("=", 1)[1] for s in real_run if s.startswith("run.logs_dir=")))
    proc = _start(["launch", "--headless", "-c", str(QUICK_CONFIG), *_only(real_run, "reward_net")],
                  file_size_limit=limit)
    out, err = proc.communicate(timeout=150)
    (run_dir,) = logs.iterdir()
    checkpoint = run_dir / "reward_net" / "checkpoints" / "last.pt"
    assert "Traceback" not in out + err and err == "", out + err
    assert proc.returncode == 1
    assert "FAILED (disk_full) at step" in out and f"disk full: {checkpoint}" in out, out
    assert "enforce fail" not in out and "inline_container" not in out
    state = load_run(run_dir).experiments["reward_net"]
    assert state.state == "failed" and state.failure.kind == "disk_full" and state.attempts == 1
    assert state.failure.message == f"disk full: {checkpoint}"
    assert "disk full: not retried" in (run_dir / "supervisor.log").read_text()
    # The checkpoint saved before the disk filled is whole, and run.json still points at it.
    assert _checkpoint(run_dir, state).resolve() == checkpoint.resolve() and state.checkpoint_step is not None
    with zipfile.ZipFile(checkpoint) as saved:
        assert saved.testzip() is None
    assert not _leftover_temp_files(run_dir)
    _assert_no_worker_left(run_dir)


ATOMIC_WRITE_UNDER_A_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    import torch
    from sa2va_contract.files import DiskFull, atomic_write_bytes, atomic_writer
    from sa2va_contract.recovery import classify_exception
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    target, model = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        atomic_write_bytes(target, b"x" * 8192)
    except DiskFull as err:
        print(err)
    try:
        with atomic_writer(model) as handle:
            torch.save({"w": torch.zeros(4096)}, handle)
    except DiskFull as err:
        print(err, classify_exception(err))
""")


def test_an_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temp(tmp_path):
    target, model = tmp_path / "run.json", tmp_path / "last.pt"
    target.write_text("the last good state")
    model.write_bytes(b"the last good checkpoint")
    script = tmp_path / "write.py"
    script.write_text(ATOMIC_WRITE_UNDER_A_LIMIT)
    result = subprocess.run([sys.executable, str(script), str(target), str(model)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    # torch.save's own words ("enforce fail at inline_container.cc") become the file's.
    assert result.stdout.splitlines() == [f"disk full: {target}", f"disk full: {model} disk_full"]
    assert target.read_text() == "the last good state" and model.read_bytes() == b"the last good checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "run.json", "write.py"]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_tensorboard_ends_its_server_on_sigterm_and_sighup(closed_reader_run, stop_signal):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sa2va_tui.cli", "tensorboard", str(closed_reader_run["dir"]),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"TensorBoard at http://127.0.0.1:{port}/"), line or proc.stderr.read()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        (server,) = [int(pid) for pid in children]
        assert _listening_addresses(port) == {"0100007F"}
        proc.send_signal(stop_signal)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()
    assert not pid_alive(server) and not _listening_addresses(port)


def test_a_subscriber_that_raises_anything_is_dropped_and_the_others_get_every_event(caplog):
    from sa2va_tui.drain import call_subscribers

    got: list[events.Event] = []

    def closed_terminal(event: events.Event) -> None:
        raise SystemExit(1)  # what rich raises on a broken pipe

    pending = [events.Phase("prompt_rl", phase="training"), events.Progress("prompt_rl", timesteps=3, total=9)]
    with caplog.at_level("ERROR", logger="sa2va_tui.drain"):
        broken = call_subscribers([closed_terminal, got.append], pending)
    assert broken == [closed_terminal] and got == pending
    assert len(caplog.records) == 1 and "gets no more events" in caplog.records[0].getMessage()
