"""The run folder and the state fold: ids, atomic state, events, readers, `status`, ETA."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from typer.testing import CliRunner

from sa2va_contract.config import load_config
from sa2va_contract.events import (
    Checkpoint,
    Failed,
    Finished,
    GpuSample,
    Metrics,
    Paused,
    Progress,
    RestartChanges,
    Restarting,
    Resumed,
    Started,
)
from sa2va_tui.runstate import ExperimentState, RateEstimator, StateBook
from sa2va_contract.layout import EVENTS_FILE, RUN_FILE
from sa2va_tui.runstore import (
    RunStore,
    RunStoreError,
    find_run,
    list_runs,
    load_run,
    load_run_config,
    read_events,
)


@pytest.fixture
def config(tmp_path):
    return load_config(None, [f"run.logs_dir={tmp_path / 'logs'}", "run.name=my run/1", "prompt_rl.seed=7"])


def test_run_ids_are_unique_and_keep_the_resolved_config(config):
    first, second = RunStore.create(config), RunStore.create(config)
    assert first.path != second.path and first.path.parent == second.path.parent == config.run.logs_dir
    assert first.run_id.endswith("-my-run-1") and second.run_id.startswith(first.run_id)
    assert load_run_config(first.path).model_dump() == config.model_dump()


def test_state_is_replaced_atomically_while_others_read(config):
    store = RunStore.create(config)
    book = StateBook()
    book.add("prompt_rl", "prompt_rl")
    store.write_state(book.states, None)
    errors: list[Exception] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                json.loads((store.path / RUN_FILE).read_text())
            except Exception as err:  # noqa: BLE001 - any torn read is the failure
                errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        book.states["prompt_rl"].metrics = {f"m{j}": float(j) for j in range(i)}  # sizes vary
        store.write_state(book.states, None)
    done.set()
    reader.join()
    assert errors == []
    assert sorted(p.name for p in store.path.iterdir()) == ["config.yaml", RUN_FILE]


def test_events_are_appended_and_a_line_torn_by_a_crash_is_skipped(config):
    store = RunStore.create(config)
    written = [
        Started("a", pid=1, gpu=None, batch_size=8),
        Metrics("a", step=3, values={"rollout/ep_rew_mean": 0.5}),
        Failed("a", kind="oom", message="CUDA out of memory", step=3, batch_size=8, log_tail=["x"]),
        Restarting("a", reason="oom", attempt=2, changes=RestartChanges.from_json({"batch_size": [8, 4]})),
    ]
    for event in written:
        store.append_event(event)
    store.append_event(GpuSample("", available=False, message="no NVIDIA GPU"))  # shown, not kept
    store.close()
    with open(store.path / EVENTS_FILE, "a") as f:
        f.write('{"type": "progress", "experiment": "a", "timest')
    assert [e.to_dict() for e in read_events(store.path)] == [e.to_dict() for e in written]


def test_finding_runs(config, tmp_path):
    logs = config.run.logs_dir
    with pytest.raises(RunStoreError, match="no runs yet"):
        find_run(None, logs)
    first = RunStore.create(config)
    first.write_state({}, None)
    (logs / "not-a-run").mkdir()
    second = RunStore.create(config)
    second.created_at += 1
    second.write_state({}, None)
    assert list_runs(logs) == [first.path, second.path]
    assert find_run(None, logs) == second.path
    assert find_run(first.run_id, logs) == first.path
    assert find_run(str(first.path), tmp_path) == first.path
    with pytest.raises(RunStoreError) as err:
        find_run("nope", logs)
    assert str(err.value) == f"nope: no such run (looked for a run folder there and under {logs})"
    with pytest.raises(RunStoreError, match="not a run folder"):
        load_run(logs / "not-a-run")


def test_a_run_is_supervised_while_its_supervisor_lives(config):
    store = RunStore.create(config)
    store.write_state({}, None)
    assert load_run(store.path).supervised  # this process wrote it
    data = json.loads((store.path / RUN_FILE).read_text())
    (store.path / RUN_FILE).write_text(json.dumps({**data, "supervisor_pid": 2**22 + 12345}))
    assert not load_run(store.path).supervised
    store.write_state({}, None, active=False)
    assert not load_run(store.path).supervised


def _book_at(t0: float) -> StateBook:
    """prompt_rl at 100 timesteps/s, a quarter done; reward_net failed; one more finished."""
    book = StateBook()
    book.apply(Started("prompt_rl", pid=os.getpid(), gpu=1, batch_size=64, time=t0))
    for i in range(0, 11):
        book.apply(Progress("prompt_rl", timesteps=100 * i, total=4000, time=t0 + i))
    book.apply(Metrics("prompt_rl", step=1000, values={"rollout/ep_rew_mean": 0.125}, time=t0 + 10))
    book.apply(Started("reward_net", pid=1, gpu=None, batch_size=16, time=t0))
    book.apply(Failed("reward_net", kind="error", message="boom", time=t0 + 2))
    book.apply(Started("postprocess_rl", pid=2, gpu=0, batch_size=64, time=t0))
    book.apply(Finished("postprocess_rl", summary={"timesteps": 10}, time=t0 + 3))
    return book


def test_eta_from_a_smoothed_rate_and_the_overall_finish():
    t0 = 1_000_000.0
    book = _book_at(t0)
    s = book.states["prompt_rl"]
    assert s.rate == pytest.approx(100.0) and s.eta_s == pytest.approx(30.0)
    assert s.eta_at(t0 + 20) == pytest.approx(20.0)  # it ages while no report comes
    assert book.finish_time(t0 + 10) == pytest.approx(t0 + 40)  # the failed one is not waited for
    book.apply(Paused("prompt_rl", step=1000, time=t0 + 11))
    assert book.states["prompt_rl"].eta_at(t0 + 500) == pytest.approx(30.0)  # frozen while paused
    book.apply(Resumed("prompt_rl", time=t0 + 500))
    book.apply(Progress("prompt_rl", timesteps=1100, total=4000, time=t0 + 501))
    assert book.states["prompt_rl"].rate == pytest.approx(100.0)  # the pause did not count as slow training
    book.apply(Progress("prompt_rl", timesteps=1400, total=4000, time=t0 + 502))
    assert 100 < book.states["prompt_rl"].rate < 300  # smoothed, not the last sample


def test_rate_starts_over_after_a_resume_from_an_earlier_checkpoint():
    rate = RateEstimator()
    rate.update(500, 0.0)
    assert rate.update(600, 1.0) == pytest.approx(100)
    assert rate.update(400, 2.0) == pytest.approx(100)  # back to a checkpoint: a new baseline
    assert rate.update(500, 3.0) == pytest.approx(100)


def test_restarts_and_checkpoints_fold_into_the_state():
    book = StateBook()
    book.apply(Started("a", pid=5, gpu=0, batch_size=64))
    book.apply(Checkpoint("a", path="/x/ckpt_50.pt", step=50))
    book.apply(Failed("a", kind="oom", message="CUDA out of memory", step=60, batch_size=64, gpu=0))
    s = book.states["a"]
    assert (s.state, s.pid, s.failure.kind, s.failure.step) == ("failed", None, "oom", 60)
    book.apply(Restarting("a", reason="oom", attempt=2,
                          changes=RestartChanges.from_json({"batch_size": [64, 32], "gpu": [0, 1]})))
    assert (s.state, s.attempts, s.oom_restarts, s.batch_size, s.gpu) == ("restarting", 2, 1, 32, 1)
    assert (s.last_checkpoint, s.checkpoint_step) == ("/x/ckpt_50.pt", 50)
    assert ExperimentState.from_dict({**s.to_dict(), "from_a_newer_version": 1}) == s


def test_status_prints_a_run_from_its_folder_alone(config):
    from sa2va_tui.cli import app

    store = RunStore.create(config)
    now = time.time()
    book = _book_at(now - 10)
    store.write_state(book.states, book.finish_time(now))
    result = CliRunner().invoke(app, ["status", store.run_id, "--logs-dir", str(config.run.logs_dir)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.strip()}
    assert rows["prompt_rl"][1:] == ["running", str(os.getpid()), "1", "-", "1000/4000", "25%", "0.125",
                                     rows["prompt_rl"][-2], "-"]  # never queued
    assert rows["prompt_rl"][-2] in ("30s", "29s", "28s")
    assert rows["reward_net"][1:4] == ["failed", "-", "CPU"]
    assert rows["postprocess_rl"][1] == "finished"
    assert f"supervisor pid {os.getpid()}" in result.output and "overall finish:" in result.output

    store.write_state(book.states, None, active=False)
    after = CliRunner().invoke(app, ["status", "--logs-dir", str(config.run.logs_dir)])
    rows = {line.split()[0]: line.split() for line in after.output.splitlines() if line.strip()}
    # The word `runs` and `report` use for the same state.
    assert rows["prompt_rl"][1] == "interrupted" and "running*" not in after.output
    assert "overall finish" not in after.output
    assert f"`sa2va-tui resume {store.run_id}` continues it" in after.output


def test_status_and_resume_fail_in_one_line(tmp_path):
    from sa2va_tui.cli import app

    for args in (["status", "--logs-dir", str(tmp_path)], ["resume", "nope", "--logs-dir", str(tmp_path)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert result.output.startswith("error: ")


def test_resume_has_nothing_to_do_for_a_finished_run_and_refuses_a_live_one(config):
    from sa2va_tui.cli import app

    store = RunStore.create(config)
    book = StateBook()
    book.apply(Started("prompt_rl", pid=1, gpu=None, batch_size=8))
    book.apply(Finished("prompt_rl"))
    store.write_state(book.states, None, active=False)
    logs = str(config.run.logs_dir)
    done = CliRunner().invoke(app, ["resume", "latest", "--logs-dir", logs])
    assert (done.exit_code, done.output.strip()) == (0, f"every experiment of {store.run_id} has finished")

    store.write_state(book.states, None)  # as if this process still supervised it
    live = CliRunner().invoke(app, ["resume", store.run_id, "--logs-dir", logs])
    assert live.exit_code == 2
    assert live.output.strip() == f"error: {store.run_id} is still supervised by pid {os.getpid()}"


def test_run_json_keeps_checkpoints_relative_to_the_run_folder(config, tmp_path, monkeypatch):
    store = RunStore.create(config)
    checkpoint = store.exp_dir("prompt_rl") / "checkpoints" / "ckpt_000000128.zip"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"a checkpoint")
    state = ExperimentState("prompt_rl", kind="prompt_rl", state="stopped")
    state.last_checkpoint, state.checkpoint_step = str(checkpoint), 128
    store.write_state({"prompt_rl": state}, finish_time=None, active=False)
    on_disk = json.loads((store.path / RUN_FILE).read_text())["experiments"]["prompt_rl"]["last_checkpoint"]
    assert on_disk == "prompt_rl/checkpoints/ckpt_000000128.zip"

    moved = tmp_path / "elsewhere" / store.path.name
    moved.parent.mkdir()
    store.path.rename(moved)  # the folder moved, read from another working directory
    monkeypatch.chdir(tmp_path / "elsewhere")
    restored = load_run(moved).experiments["prompt_rl"].last_checkpoint
    assert restored == str(moved / on_disk) and open(restored, "rb").read() == b"a checkpoint"
