"""The log-file event source, on logs written by real stable-baselines3 runs.

One subprocess trains PPO and A2C on CartPole for a few hundred timesteps, each with
SB3's logger writing its stdout table to the process's stdout, redirected (with stderr)
into a log file, and `progress.csv` beside it; a callback adds what real logs carry
between the tables: progress-bar redraws, prints, bytes that are not UTF-8. Every table
parsed from a log must match its row of the same run's `progress.csv`.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sa2va_contract.events import Metrics, Progress
from sa2va_tui.logtail import LogTail, LogWatcher, Sb3TableParser, experiment_names

GENERATOR = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import configure

    class Noise(BaseCallback):
        def _on_step(self):
            n = self.num_timesteps
            if n % 16 == 0:  # what tqdm writes: a redraw after a carriage return, no newline
                done = n * 10 // self.locals["total_timesteps"]
                sys.stderr.write(f"\\r{done * 10:3d}%|{'#' * done}{' ' * (10 - done)}| {n}/? [00:01<00:02, 150it/s]")
                sys.stderr.flush()
            if n % 100 == 0:
                print(f"\\x1b[32mcheckpoint\\x1b[0m at {n} | saved |", flush=True)
                os.write(2, b"latin-1 from a C library: caf\\xe9 \\xff\\xfe\\n")
            return True

    root = Path(sys.argv[1])
    runs = [("ppo", PPO, dict(n_steps=64, batch_size=32, n_epochs=2), 640, 1),
            ("a2c", A2C, dict(n_steps=8), 480, 10)]
    for name, algo, kwargs, steps, log_interval in runs:
        folder = root / name
        folder.mkdir()
        sys.stdout.flush(); sys.stderr.flush()
        log = open(folder / "train.log", "wb")
        os.dup2(log.fileno(), 1); os.dup2(log.fileno(), 2)
        model = algo("MlpPolicy", "CartPole-v1", seed=1, verbose=1, device="cpu", **kwargs)
        model.set_logger(configure(str(folder), ["stdout", "csv"]))
        model.learn(steps, callback=Noise(), log_interval=log_interval)
        sys.stdout.flush(); sys.stderr.flush()
""")


@pytest.fixture(scope="module")
def sb3_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sb3")
    script = root / "generate.py"
    script.write_text(GENERATOR)
    subprocess.run([sys.executable, str(script), str(root)], check=True, timeout=240,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {name: root / name for name in ("ppo", "a2c")}


def read_all(tail: LogTail) -> list:
    events = []
    while True:
        events += tail.poll()
        if tail.caught_up:
            return events


def tables(events) -> list[dict[str, float]]:
    return [e.values for e in events if isinstance(e, Metrics)]


def csv_rows(folder: Path) -> list[dict[str, float]]:
    with open(folder / "progress.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.mark.parametrize("run", ["ppo", "a2c"])
def test_every_table_matches_its_progress_csv_row(sb3_runs, run):
    raw = (sb3_runs[run] / "train.log").read_bytes()
    assert b"\r" in raw and b"\xff" in raw and b"\x1b[32m" in raw  # the noise is really there
    events = read_all(LogTail(sb3_runs[run] / "train.log", run, total=640))
    parsed, expected = tables(events), csv_rows(sb3_runs[run])
    assert len(parsed) == len(expected) >= 4
    for table, row in zip(parsed, expected):
        assert set(table) == set(row)
        for key, value in row.items():
            # The table shows 3 significant digits of a float, an int whole.
            assert table[key] == pytest.approx(value, rel=5e-3, abs=1e-12), key
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.timesteps for p in progress] == [int(r["time/total_timesteps"]) for r in expected]
    assert all(p.total == 640 and p.experiment == run for p in progress)
    assert any("rollout/ep_rew_mean" in t for t in parsed) and any("train/value_loss" in t for t in parsed)


def test_partial_writes_in_any_chunks_give_the_same_tables(sb3_runs, tmp_path):
    raw = (sb3_runs["ppo"] / "train.log").read_bytes()
    whole = tables(read_all(LogTail(sb3_runs["ppo"] / "train.log", "ppo")))
    log = tmp_path / "train.log"
    tail = LogTail(log, "ppo")
    rng = random.Random(0)
    got, i = [], 0
    with open(log, "wb") as f:
        while i < len(raw):
            n = rng.randint(1, 300)
            f.write(raw[i:i + n])
            f.flush()
            i += n
            got += tail.poll()
    assert tables(got) == whole


def test_noise_between_and_inside_tables_and_a_lost_closing_line(sb3_runs, tmp_path):
    lines = (sb3_runs["a2c"] / "train.log").read_bytes().splitlines(keepends=True)
    whole = tables(read_all(LogTail(sb3_runs["a2c"] / "train.log", "a2c")))
    noisy = []
    for line in lines:
        noisy.append(line)
        if line.startswith(b"|"):  # another process writing to the same file, mid-table
            noisy.append(b"\r 42%|####      | 210/500 [00:01<00:01, 180.00it/s]\r\x1b[2K\n")
            noisy.append(b"\xc3\x28 warning: something | odd\n")
    first_row = next(i for i, line in enumerate(noisy) if line.startswith(b"|"))
    first_close = next(i for i in range(first_row, len(noisy)) if noisy[i].startswith(b"-"))
    del noisy[first_close]  # the first table's closing dashes are lost: the next table's opening ends it
    log = tmp_path / "noisy.log"
    log.write_bytes(b"".join(noisy))
    assert tables(read_all(LogTail(log, "a2c"))) == whole


def test_rotation_and_truncation_lose_nothing_written_before_them(sb3_runs, tmp_path):
    raw = (sb3_runs["ppo"] / "train.log").read_bytes()
    whole = tables(read_all(LogTail(sb3_runs["ppo"] / "train.log", "ppo")))
    cut = raw.index(b"\n", len(raw) // 3) + 1  # rotating handlers cut between lines
    cut2 = raw.index(b"\n", 2 * len(raw) // 3) + 1
    log = tmp_path / "train.log"
    tail = LogTail(log, "ppo")
    log.write_bytes(raw[:cut])
    got = tail.poll()
    os.rename(log, tmp_path / "train.log.1")
    log.write_bytes(raw[cut:cut2])  # a new file under the old name
    got += read_all(tail)
    with open(log, "r+b") as f:  # copytruncate: emptied in place, then written on
        f.truncate(0)
    got += tail.poll()
    with open(log, "ab") as f:
        f.write(raw[cut2:])
    got += read_all(tail)
    assert tables(got) == whole


def test_the_parser_on_sections_top_level_keys_and_text_values():
    parser = Sb3TableParser()
    table = """
        ------------------------------------
        | eval/                  |         |
        |    mean_reward         | 9.4     |
        |    success_rate        | nan     |
        | time/                  |         |
        |    total_timesteps     | 640     |
        | custom                 | 3       |
        | device                 | cpu     |
        | a_very_long_key_tha... | 1e+03   |
        ------------------------------------
    """
    results = [parser.feed(line) for line in textwrap.dedent(table).splitlines()]
    assert [r for r in results if r] == [{"eval/mean_reward": 9.4, "time/total_timesteps": 640.0, "custom": 3.0,
                                          "a_very_long_key_tha...": 1000.0}]


def test_names_of_watched_logs():
    paths = [Path("a/train.log"), Path("b/train.log"), Path("c/ppo.log")]
    assert experiment_names(paths) == ["a/train", "b/train", "ppo"]


def test_watcher_follows_a_log_that_appears_later(sb3_runs, tmp_path):
    raw = (sb3_runs["ppo"] / "train.log").read_bytes()
    log = tmp_path / "later.log"
    watcher = LogWatcher([log], total=640, interval=0.02)
    got = threading.Event()
    seen = []

    def on_event(event):
        seen.append(event)
        if isinstance(event, Progress) and event.timesteps == 640:
            got.set()

    watcher.subscribe(on_event)
    watcher.start()
    log.write_bytes(raw)
    assert got.wait(20)
    state = watcher.states()["later"]
    # Read to its end at its total: finished, when the log was last written.
    assert (state.timesteps, state.total, state.state) == (640, 640, "finished")
    assert state.ended_at == log.stat().st_mtime
    assert state.episode_reward == tables(seen)[-1]["rollout/ep_rew_mean"]
    assert not watcher.done
    watcher.shutdown()


def table_text(timesteps: int, fps: int) -> str:
    return ("-----------------------------\n| rollout/           |       |\n|    ep_rew_mean     | 1.5   |\n"
            f"| time/              |       |\n|    fps             | {fps}   |\n"
            f"|    total_timesteps | {timesteps}  |\n-----------------------------\n")


def wait_for_state(watcher: LogWatcher, name: str, match, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = watcher.states()[name]
        if match(state):
            return state
        time.sleep(0.02)
    raise AssertionError(f"{name} never matched: {watcher.states()[name]}")


def test_a_backlog_read_at_once_takes_its_rate_from_the_log_and_a_silent_log_stalls(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(table_text(2048, 100) + table_text(4096, 100))
    hour_ago = time.time() - 3600
    os.utime(log, (hour_ago, hour_ago))
    watcher = LogWatcher([log], total=8192, interval=0.02, stalled_after=60)
    watcher.start()
    try:
        # An hour silent, half way: stalled, its ETA unknown rather than "in 0 s".
        state = wait_for_state(watcher, "run", lambda s: s.state == "stalled")
        assert (state.timesteps, state.rate, state.eta_s) == (4096, 100, None)
        with open(log, "a") as f:
            f.write(table_text(6144, 50))
        state = wait_for_state(watcher, "run", lambda s: s.timesteps == 6144)
        assert (state.state, state.rate) == ("running", 50)  # the log's own fps, not the arrival rate
        assert state.eta_s == pytest.approx((8192 - 6144) / 50)
    finally:
        watcher.shutdown()


def test_watch_command_reads_logs_once(sb3_runs):
    from sa2va_tui.cli import app

    logs = [str(sb3_runs[run] / "train.log") for run in ("ppo", "a2c")]
    result = CliRunner().invoke(app, ["watch", *logs, "--total", "640", "--no-follow", "--headless"])
    assert result.exit_code == 0, result.output
    last_reward = csv_rows(sb3_runs["ppo"])[-1]["rollout/ep_rew_mean"]
    assert f"ppo/train finished: 640/640  100%  reward {last_reward:.3g}" in result.output
    assert "a2c/train finished: 480/640" in result.output

    missing = CliRunner().invoke(app, ["watch", "nope.log", "--no-follow"])
    assert missing.exit_code == 2 and missing.output.strip().splitlines()[-1] == "error: no such log file: nope.log"
