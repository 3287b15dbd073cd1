"""Hostile input and damaged files, provoked for real: run.json of the wrong shape,
a torn events.jsonl, names that would lead out of the run folder, values a worker
would choke on, a folder given to `watch`, a truncated PNG and a NaN TIFF in a
folder dataset, an override of an unknown section. Each is refused (or survived)
in one line naming the file, key or value, with a non-zero exit and nothing lost."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from sa2va_contract.config import ConfigError, load_config
from sa2va_contract.events import Finished, GpuSample, Metrics, Progress, Started
from sa2va_contract.layout import EVENTS_FILE, GPUS_FILE, RUN_FILE, OutsideError, experiment_dir, inside
from sa2va_contract.recovery import ERROR, OOM, classify_exception
from sa2va_tui.cli import app
from sa2va_tui.logtail import LogWatcher
from sa2va_tui.runstate import StateBook
from sa2va_tui.runstore import RunStore, RunStoreError, read_events, read_gpu_samples

from conftest import QUICK_CONFIG, run_cli


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def finished_run(logs: Path) -> RunStore:
    """A run folder as a supervisor leaves it: one finished experiment, its events."""
    config = load_config(None, [f"run.logs_dir={logs}"])
    store = RunStore.create(config)
    book = StateBook()
    for event in (Started("prompt_rl", pid=1, gpu=None, batch_size=8), Finished("prompt_rl")):
        book.apply(event)
        store.append_event(event)
    store.write_state(book.states, None, active=False)
    store.close()
    return store


# --- row 7: run.json of the wrong shape -------------------------------------------------

WRONG_SHAPES = {
    "null": (b"null", "a JSON object expected, found null"),
    "a list": (b"[1, 2]", "a JSON object expected, found a list"),
    "a string for a number": (b'{"created_at": "yesterday"}', 'created_at: input should be a valid number'),
    "a list for the experiments": (b'{"experiments": []}', "experiments: input should be a valid dictionary"),
    "a state of the wrong type": (b'{"experiments": {"prompt_rl": {"name": "prompt_rl", "timesteps": [1]}}}',
                                  "experiments.prompt_rl.timesteps: input should be a valid integer"),
    "a path for a name": (b'{"experiments": {"../x": {"name": "../x"}}}',
                          "experiments: '../x' is not a plain experiment name"),
    "random bytes": (bytes(range(128, 256)), "'utf-8' codec can't decode"),
}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    """A logs folder with two finished runs, a second apart (run ids name their second)."""
    logs = tmp_path_factory.mktemp("two_runs") / "logs"
    finished_run(logs)
    time.sleep(1.05)
    finished_run(logs)
    return logs


@pytest.mark.parametrize("shape", list(WRONG_SHAPES))
def test_run_json_of_the_wrong_shape_is_one_line_and_never_an_older_run(tmp_path, two_runs, shape):
    content, reason = WRONG_SHAPES[shape]
    logs = tmp_path / "logs"
    shutil.copytree(two_runs, logs)
    older, latest = (RunStore(path) for path in sorted(logs.iterdir()))
    (latest.path / RUN_FILE).write_bytes(content)

    for args in (["status"], ["report"], ["resume", "latest"], ["status", latest.run_id],
                 ["report", latest.run_id], ["resume", latest.run_id]):
        result = invoke(*args, "--logs-dir", logs)
        lines = error_lines(result.output)
        assert result.exit_code == 2 and len(lines) == 1, (args, result.output)
        assert "Traceback" not in result.output and older.run_id not in result.output, (args, result.output)
        assert lines[0].startswith("error: ") and f"{latest.run_id}/{RUN_FILE}" in lines[0] and reason in lines[0]
        if len(args) == 1 or args[-1] == "latest":
            assert lines[0].startswith("error: the latest run is unreadable: "), lines[0]

    listing = invoke("runs", "--logs-dir", logs)
    assert listing.exit_code == 0, listing.output
    rows = {line.split()[0]: line for line in listing.output.splitlines()[1:] if line.strip()}
    assert "prompt_rl finished" in rows[older.run_id]
    assert "unreadable: " + reason[:20] in rows[latest.run_id]
    # Nothing read is written: the damaged file is left as it was, for a person to look at.
    assert (latest.path / RUN_FILE).read_bytes() == content


def test_events_and_evaluation_of_the_wrong_shape_are_skipped_by_readers(tmp_path):
    store = finished_run(tmp_path / "logs")
    with open(store.path / EVENTS_FILE, "a") as f:
        for line in ('{"type": "metrics", "experiment": "prompt_rl", "step": "x", "values": [1]}',
                     '{"type": "restarting", "experiment": "prompt_rl", "reason": "oom", "attempt": 2, "changes": [1]}',
                     "null", "[1]", '"text"'):
            f.write(line + "\n")
    (store.path / "evaluation.json").write_text("[1, 2]")
    assert [type(e) for e in read_events(store.path)] == [Started, Finished]
    for args in (["report", store.run_id], ["runs"]):
        result = invoke(*args, "--logs-dir", tmp_path / "logs")
        assert result.exit_code == 0 and "Traceback" not in result.output, result.output


# --- row 8: a torn last line of events.jsonl ------------------------------------------


def test_a_torn_last_line_is_ended_before_the_next_event_is_appended(tmp_path):
    store = finished_run(tmp_path / "logs")
    events = store.path / EVENTS_FILE
    os.truncate(events, events.stat().st_size - 7)  # a crash mid-write of the last line
    gpus = store.path / GPUS_FILE
    gpus.write_text('{"type": "gpu_sample", "experiment": "", "available": fal')

    resumed = RunStore.open(store.path)
    resumed.append_event(Metrics("prompt_rl", step=5, values={"loss": 0.5}))
    resumed.append_gpu_sample(GpuSample("", available=False, message="no GPU"))
    resumed.close()

    assert [type(e) for e in read_events(store.path)] == [Started, Metrics]  # the torn Finished alone is lost
    assert [e.message for e in read_gpu_samples(store.path)] == ["no GPU"]
    assert events.read_text().endswith('"values": {"loss": 0.5}}\n')
    assert len(events.read_text().splitlines()) == 3


# --- row 10: names that would lead out of the run folder -------------------------------

HOSTILE_NAMES = ["../../x", "/tmp/abs", ".hidden", "a/b", "x\n", "..", ""]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_variant_name_that_is_not_plain_is_refused_in_one_line(tmp_path, name):
    variant = json.dumps({name: {"base": "prompt_rl"}})
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"variants: {variant}\n")
    for args in (["-c", config_file], ["-c", QUICK_CONFIG, "--set", f"variants={variant}"]):
        result = invoke("check", *args)
        lines = error_lines(result.output)
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert f"variants.{name!r}: not a plain name" in lines[0], lines[0]
    assert not (tmp_path / "x").exists()


def test_every_experiment_folder_lies_inside_its_run_folder(tmp_path):
    store = finished_run(tmp_path / "logs")
    for name in ("../x", str(tmp_path / "abs"), "..", "."):
        with pytest.raises(RunStoreError, match="not a plain experiment name"):
            store.exp_dir(name)
    # A link planted in the run folder does not lead the experiment out of it either.
    (tmp_path / "elsewhere").mkdir()
    (store.path / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RunStoreError, match="outside"):
        store.exp_dir("linked")
    with pytest.raises(OutsideError):
        inside(store.path, store.path / "prompt_rl" / ".." / ".." / "x")
    assert experiment_dir(store.path, "prompt_rl-seed1") == store.path / "prompt_rl-seed1"
    assert not (tmp_path / "x").exists() and not (tmp_path / "logs" / "x").exists()
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == []


def test_a_run_id_is_one_folder_name_under_the_logs_folder(tmp_path):
    """`status ../x` looks for ../x from where it runs, never for logs/../x."""
    outside_run = finished_run(tmp_path / "other")
    (tmp_path / "logs").mkdir()
    escaping = f"../other/{outside_run.run_id}"
    result = invoke("status", escaping, "--logs-dir", tmp_path / "logs")
    assert result.exit_code == 2 and error_lines(result.output) == [
        f"error: {escaping}: no such run (looked for a run folder there and under {tmp_path / 'logs'})"]


# --- row 13: values a worker would choke on -------------------------------------------

HOSTILE_VALUES = {
    "prompt_rl.seed=-1": "prompt_rl.seed: must be >= 0",
    f"prompt_rl.seed={2**70}": "prompt_rl.seed: must be < 4294967296",
    "dataset.seed=-1": "dataset.seed: must be >= 0",
    "prompt_rl.ppo.learning_rate=.inf": "prompt_rl.ppo.learning_rate: must be a finite number, not inf",
    "postprocess_rl.ppo.gamma=.nan": "postprocess_rl.ppo.gamma: must be a finite number, not nan",
    "reward_net.finetune.learning_rate=-.inf": "reward_net.finetune.learning_rate: must be a finite number",
    "prompt_rl.ppo.net_arch=[-5]": "prompt_rl.ppo.net_arch.0: must be >= 1",
    "prompt_rl.ppo.net_arch=[64, 0]": "prompt_rl.ppo.net_arch.1: must be >= 1",
    "variants={v: {base: prompt_rl, seed: -1}}": "variants.v.seed: must be >= 0",
}


@pytest.mark.parametrize("override", list(HOSTILE_VALUES))
def test_the_schema_refuses_values_a_worker_would_choke_on(override):
    with pytest.raises(ConfigError) as err:
        load_config(QUICK_CONFIG, [override])
    assert str(err.value).startswith(f"--set {override}: {HOSTILE_VALUES[override]}"), str(err.value)


def test_a_rollout_buffer_that_cannot_fit_is_refused_by_check_and_launch(tmp_path):
    logs = tmp_path / "logs"
    overrides = ["--set", f"prompt_rl.ppo.n_steps={10**12}", "--set", f"run.logs_dir={logs}"]
    checked = invoke("check", "-c", QUICK_CONFIG, *overrides)
    problems = [line for line in error_lines(checked.output) if line.startswith("error prompt_rl")]
    assert checked.exit_code == 2 and len(problems) == 1, checked.output
    assert "prompt_rl.ppo.n_steps: a rollout of n_steps * n_envs = 4,000,000,000,000 steps needs at least" in problems[0]
    launched = invoke("launch", "--headless", "-c", QUICK_CONFIG, *overrides)
    lines = error_lines(launched.output)
    assert launched.exit_code == 2 and len(lines) == 1, launched.output
    # The same line (the memory available moves between the two).
    assert lines[0].split(" GiB of memory")[0].rsplit(" ", 1)[0] == \
        "error: " + problems[0][len("error "):].split(" GiB of memory")[0].rsplit(" ", 1)[0]
    assert not logs.exists()  # no run folder, no worker


def test_only_cuda_allocator_errors_count_as_out_of_memory():
    import torch

    try:
        np.empty(2**62, np.uint8)  # the host cannot give it: numpy's MemoryError
    except MemoryError as err:
        host = err
    try:
        torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator's RuntimeError
    except RuntimeError as err:
        cpu = err
    assert "DefaultCPUAllocator" in str(cpu) or "allocate" in str(cpu)
    assert classify_exception(host) == classify_exception(cpu) == ERROR
    assert classify_exception(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == OOM
    assert classify_exception(RuntimeError("CUDA error: out of memory")) == OOM


def test_made_variants_are_capped_before_they_are_built():
    seeds = invoke("check", "-c", QUICK_CONFIG, "--seeds", str(2**32))
    sweep = invoke("check", "-c", QUICK_CONFIG, "--sweep", "prompt_rl.seed=" + ",".join(map(str, range(300))))
    assert seeds.exit_code == sweep.exit_code == 2
    assert error_lines(seeds.output) == [
        f"error: --seeds {2**32}: would make 12,884,901,885 variants of 3 experiment(s), more than the 256 one "
        "command may make"]
    assert error_lines(sweep.output)[-1].endswith(": 300 combinations, more than the 256 variants one command may make")


def test_an_alias_bomb_in_a_config_is_one_line_without_expanding_it(tmp_path):
    """Nine levels of ten YAML aliases: a billion items, were the error line to print
    the value whole. Under a 2 GiB address-space limit, that would be a MemoryError."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("prompt_rl:\n  ppo:\n    net_arch:\n" + "".join(f"      {line}\n" for line in levels))

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    result = subprocess.run([sys.executable, "-m", "sa2va_tui.cli", "check", "-c", str(bomb)], capture_output=True,
                            text=True, timeout=120, preexec_fn=limit_memory)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"error: {bomb}: prompt_rl.ppo.net_arch: input should be a valid list, got {{'a0': ")
    assert len(lines[0]) < 400


def test_a_logs_folder_that_is_a_file_is_refused_before_anything_starts(tmp_path):
    blocker = tmp_path / "logs"
    blocker.write_text("not a folder")
    for where in (blocker, blocker / "sub"):
        result = invoke("launch", "--headless", "-c", QUICK_CONFIG, "--set", f"run.logs_dir={where}")
        assert result.exit_code == 2 and len(error_lines(result.output)) == 1, result.output
        assert error_lines(result.output)[0].startswith(f"error: run.logs_dir: {where}: ")
    assert blocker.read_text() == "not a folder"


# --- row 15: watch a folder, a log that cannot be read --------------------------------


def sb3_table(timesteps: int) -> str:
    """A table as stable-baselines3's own stdout logger prints it."""
    import io

    from stable_baselines3.common.logger import HumanOutputFormat

    out = io.StringIO()
    HumanOutputFormat(out).write({"rollout/ep_rew_mean": 1.5, "time/total_timesteps": timesteps},
                                 {"rollout/ep_rew_mean": None, "time/total_timesteps": None})
    return out.getvalue()


def test_watch_refuses_what_is_not_a_regular_file(tmp_path):
    folder, fifo, log = tmp_path / "logs", tmp_path / "pipe", tmp_path / "ok.log"
    folder.mkdir()
    os.mkfifo(fifo)
    log.write_text(sb3_table(64))
    result = invoke("watch", log, folder, fifo, "--headless", "--no-follow")
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"error: not a regular file: {folder}, {fifo} (watch follows log files)"]


def test_a_log_that_cannot_be_read_fails_alone_and_the_others_are_read_on(tmp_path):
    good, bad = tmp_path / "good.log", tmp_path / "bad.log"
    good.write_text(sb3_table(64))
    bad.write_text(sb3_table(32))
    watcher = LogWatcher([good, bad], total=256, interval=0.02)
    seen: list = []
    watcher.subscribe(seen.append)
    watcher.start()
    try:
        deadline = time.monotonic() + 20
        while watcher.states()["bad"].timesteps != 32 and time.monotonic() < deadline:
            time.sleep(0.02)
        bad.unlink()
        bad.mkdir()  # where the log was, a folder now: reading it is an OSError
        with open(good, "a") as f:
            f.write(sb3_table(128))
        while watcher.states()["good"].timesteps != 128 and time.monotonic() < deadline:
            time.sleep(0.02)
        states = watcher.states()
        assert (states["good"].timesteps, states["good"].state) == (128, "running")
        assert states["bad"].state == "failed" and states["bad"].timesteps == 32
        assert states["bad"].failure.message == f"{bad}: cannot be read (Is a directory)"
    finally:
        watcher.shutdown()
    assert [e.timesteps for e in seen if isinstance(e, Progress) and e.experiment == "good"] == [64, 128]


# --- row 16: a truncated PNG, a NaN TIFF --------------------------------------------------


def broken_dataset(root: Path) -> list[str]:
    """A folder dataset with good pairs and damaged images; the lines `check` must print."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for stem in ("a", "b", "c", "d", "e"):
            for folder, pixels in (("images", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)),
                                   ("masks", np.where(rng.random((40, 40)) > 0.5, 255, 0).astype(np.uint8))):
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(root / split / folder / f"{stem}.png"), pixels)
    images = root / "train" / "images"
    whole = (images / "b.png").read_bytes()
    (images / "b.png").write_bytes(whole[: len(whole) // 2])  # cut mid-IDAT
    (images / "c.png").write_bytes((images / "c.png").read_bytes()[:-12])  # its IEND chunk lost
    corrupt = bytearray((images / "d.png").read_bytes())
    corrupt[60] ^= 0xFF  # a flipped byte inside the image data
    (images / "d.png").write_bytes(bytes(corrupt))
    nan = rng.random((40, 40)).astype(np.float32)
    nan[3, 3] = np.nan
    (images / "e.png").unlink()
    assert cv2.imwrite(str(images / "e.tiff"), nan)
    return [f"{images / 'b.png'}: truncated PNG (IDAT chunk cut short at byte {len(whole) // 2})",
            f"{images / 'c.png'}: truncated PNG (no IEND chunk in its",
            f"{images / 'd.png'}: corrupt PNG (the IDAT chunk at byte",
            f"{images / 'e.tiff'}: 1 NaN or infinite pixel values (a float image must be finite)"]


def test_check_lists_damaged_images_and_opencv_says_nothing(tmp_path):
    expected = broken_dataset(tmp_path / "data")
    result = run_cli("check", "-c", str(QUICK_CONFIG), "--set", "dataset.kind=folder",
                     "--set", f"dataset.root={tmp_path / 'data'}", "--set", "reward_net.enabled=false")
    assert result.returncode == 2, result.stdout + result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("error ")]
    assert len(problems) == len(expected), result.stderr
    for line, start in zip(problems, expected):
        assert line.startswith("error " + start), (line, start)
    everything = result.stdout + result.stderr
    for leak in ("WARN", "libpng", "Traceback", "imdecode"):
        assert leak not in everything, everything
    assert "ok    dataset: " + str(tmp_path / "data" / "val") + ": 5 image/mask pairs" in result.stdout


def test_launch_refuses_damaged_images_before_any_worker(tmp_path):
    expected = broken_dataset(tmp_path / "data")
    logs = tmp_path / "logs"
    result = invoke("launch", "--headless", "-c", QUICK_CONFIG, "--set", "dataset.kind=folder",
                    "--set", f"dataset.root={tmp_path / 'data'}", "--set", f"run.logs_dir={logs}",
                    "--set", "reward_net.enabled=false")
    lines = error_lines(result.output)
    assert result.exit_code == 2 and len(lines) == len(expected), result.output
    for line, start in zip(lines, expected):
        assert line.startswith("error: " + start), (line, start)
    assert not logs.exists()


# --- row 17: an override of an unknown section ------------------------------------------


def test_an_error_made_by_an_override_names_the_override(tmp_path):
    cases = {
        "nosection.x=1": "--set nosection.x=1: nosection: unknown key",
        "prompt_rl.ppo.nokey.y=2": "--set prompt_rl.ppo.nokey.y=2: prompt_rl.ppo.nokey: unknown key",
        # Valid itself, it makes the file's batch size wrong: the override is the cause.
        "prompt_rl.ppo.n_steps=33": "--set prompt_rl.ppo.n_steps=33: prompt_rl.ppo.batch_size: 32 must divide",
    }
    for override, line in cases.items():
        result = invoke("check", "-c", QUICK_CONFIG, "--set", "run.name=fine", "--set", override)
        assert result.exit_code == 2 and len(error_lines(result.output)) == 1, result.output
        assert error_lines(result.output)[0].startswith(f"error: {line}"), result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("nosection: {x: 1}\n")
    result = invoke("check", "-c", broken, "--set", "run.name=fine")
    assert error_lines(result.output) == [f"error: {broken}: nosection: unknown key"]


# --- beyond the table: a report written over the run it reports -------------------------


def test_a_report_never_overwrites_the_run_it_reports(tmp_path):
    store = finished_run(tmp_path / "logs")
    (store.path / "prompt_rl").mkdir()
    before = {name: (store.path / name).read_bytes() for name in (RUN_FILE, EVENTS_FILE, "config.yaml")}
    for target, why in ((store.path / RUN_FILE, "is the run's own run.json"),
                        (store.path / EVENTS_FILE, "is the run's own events.jsonl"),
                        (store.path / "prompt_rl" / "report.md", "inside an experiment's folder")):
        result = invoke("report", store.run_id, "--logs-dir", tmp_path / "logs", "-o", target)
        assert result.exit_code == 2 and error_lines(result.output) == [
            f"error: -o {target}: {why}" + ("; choose another file" if "own" in why else
                                              " of the run; choose a file beside them")]
    assert {name: (store.path / name).read_bytes() for name in before} == before
    beside = invoke("report", store.run_id, "--logs-dir", tmp_path / "logs", "-o", store.path / "report.md")
    assert beside.exit_code == 0 and (store.path / "report.md").read_text().strip()
