"""`sa2va-tui compare` on two real runs that differ in two settings of one experiment."""

from __future__ import annotations

import csv
import io
import json

import pytest

from conftest import run_cli
from sa2va_tui.compare import compare_runs, differing_keys
from sa2va_tui.runstore import load_run, read_events
from supervision import make_config, run_to_end

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, mask_cache):
    """prompt_rl twice, with another learning rate and seed the second time."""
    from conftest import SMALL_RUN

    logs = tmp_path_factory.mktemp("compare") / "logs"
    base = [*SMALL_RUN, f"backend.cache_dir={mask_cache}", f"run.logs_dir={logs}"]
    first, _ = run_to_end(make_config(base), 180)
    second, _ = run_to_end(make_config(base, "prompt_rl.ppo.learning_rate=0.0003", "prompt_rl.seed=2"), 180)
    return first.run_dir, second.run_dir


def test_differing_keys_are_the_ones_not_equal_everywhere():
    assert differing_keys([{"a": 1, "b": [1, 2], "c": 0}, {"a": 1, "b": [1, 3]}]) == ["b", "c"]
    assert differing_keys([{"a": 1}, {"a": 1}]) == []


def test_compare_shows_exactly_the_settings_that_differ(two_runs):
    comparison = compare_runs(two_runs)
    assert comparison.differing == {"prompt_rl": ["ppo.learning_rate", "seed"]}
    first, second = comparison.rows
    assert (first.settings["ppo.learning_rate"], second.settings["ppo.learning_rate"]) == (0.001, 0.0003)
    assert (first.settings["seed"], second.settings["seed"]) == (0, 2)
    for row, run_dir in zip(comparison.rows, two_runs):
        state = load_run(run_dir).experiments["prompt_rl"]
        rewards = [(e.step, e.values["rollout/ep_rew_mean"]) for e in read_events(run_dir)
                   if e.type == "metrics" and "rollout/ep_rew_mean" in e.values]
        assert row.series == rewards and row.final == rewards[-1][1]
        assert (row.best_step, row.best) == max(rewards, key=lambda p: p[1])
        assert row.state == "finished" and row.oom_restarts == 0
        assert row.wall_s == pytest.approx(state.ended_at - state.started_at)


def test_compare_command_in_every_format(two_runs, tmp_path):
    refs = [str(p) for p in two_runs]
    md = run_cli("compare", *refs)
    assert md.returncode == 0, md.stderr
    header = next(line for line in md.stdout.splitlines() if line.startswith("| run |"))
    assert header.startswith("| run | experiment | ppo.learning_rate | seed | best rollout/ep_rew_mean |")
    assert sum(line.startswith(f"| {p.name} | prompt_rl | ") for p in two_runs for line in md.stdout.splitlines()) == 2

    as_json = json.loads(run_cli("compare", *refs, "--format", "json").stdout)
    assert [r["settings"] for r in as_json["rows"]] == [{"ppo.learning_rate": 0.001, "seed": 0},
                                                       {"ppo.learning_rate": 0.0003, "seed": 2}]
    rows = list(csv.DictReader(io.StringIO(run_cli("compare", *refs, "--format", "csv").stdout)))
    assert [(r["experiment"], r["seed"], r["state"]) for r in rows] == [("prompt_rl", "0", "finished"),
                                                                       ("prompt_rl", "2", "finished")]

    written = run_cli("compare", *refs, "-o", str(tmp_path / "cmp.md"))
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "cmp.md").read_text() == md.stdout
    assert (tmp_path / "cmp-curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_compare_of_a_missing_run_is_one_line(tmp_path):
    result = run_cli("compare", str(tmp_path / "nope"), "--logs-dir", str(tmp_path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no such run" in result.stderr
