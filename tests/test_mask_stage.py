"""The run's mask stage, with the real model, real workers and a cache of the test's own:
one model call per distinct pair however many experiments read it, none on a warm
cache, nothing half-written after a stop, pause obeyed, and its card in the app."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from conftest import SMALL_RUN
from sa2va_contract import events
from sa2va_contract.layout import RUN_FILE
from supervision import make_config, run_to_end, supervise

#: Smaller than SMALL_RUN's images, so a cold cache fills in seconds.
COLD = ("dataset.limit=6", "dataset.image_size=64")


@pytest.fixture
def cold_run(tmp_path) -> list[str]:
    """A small real run with an empty mask cache of its own."""
    return [*SMALL_RUN, *COLD, f"backend.cache_dir={tmp_path / 'cache'}", f"run.logs_dir={tmp_path / 'logs'}"]


def cache_files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_two_experiments_cost_one_call_per_pair_and_a_warm_run_none(cold_run, tmp_path):
    config = make_config(cold_run, experiments=("prompt_rl", "postprocess_rl"))
    supervisor, rec = run_to_end(config, timeout=150)
    figures = json.loads((supervisor.run_dir / RUN_FILE).read_text())
    # prompt_rl reads every candidate mask of train and val (6 images each, 11 prompts);
    # postprocess_rl the default prompt's of the same images: a subset.
    assert figures["distinct_pairs"] == 2 * 6 * len(config.backend.prompts)
    assert figures["model_calls"] == figures["distinct_pairs"]
    work = {e.experiment: e for e in rec.of(events.MaskWork)}
    assert work["prompt_rl"].model_calls == 0 and work["postprocess_rl"].model_calls == 0
    assert work["prompt_rl"].cache_hits == figures["distinct_pairs"]
    assert {e.ready_for for e in rec.of(events.PairsReady)} == {"prompt_rl", "postprocess_rl"}
    # The smaller need is computed first, so postprocess_rl is unblocked first.
    assert [e.ready_for for e in rec.of(events.PairsReady)][0] == "postprocess_rl"
    assert all(s.state == "finished" for s in supervisor.states().values())
    assert figures["mask_stage"]["state"] == "finished"
    files = cache_files(tmp_path / "cache")
    assert len(files) == figures["distinct_pairs"] and all(f.suffix == ".npz" for f in files)

    warm, rec = run_to_end(config, timeout=150)
    again = json.loads((warm.run_dir / RUN_FILE).read_text())
    assert again["model_calls"] == 0
    assert again["cache_hits"] >= again["distinct_pairs"] == figures["distinct_pairs"]
    assert rec.of(events.PairsReady)  # every experiment ready at once
    assert len(cache_files(tmp_path / "cache")) == len(files)


def test_stop_during_the_stage_leaves_only_whole_cache_files(cold_run, tmp_path):
    config = make_config(cold_run, "dataset.limit=40", experiments=("prompt_rl",))
    supervisor, rec = supervise(config)
    supervisor.start()
    try:
        rec.wait_for(lambda e: isinstance(e, events.Progress) and e.experiment == events.MASK_STAGE
                     and 0 < e.timesteps < e.total, timeout=120)
        supervisor.pause(events.MASK_STAGE)
        paused = rec.wait_for(lambda e: isinstance(e, events.Paused) and e.experiment == events.MASK_STAGE, 10)
        held = len(cache_files(tmp_path / "cache"))
        time.sleep(1.0)
        # Paused: at most the batches in flight when it paused were written since.
        assert len(cache_files(tmp_path / "cache")) - held <= 2 * config.backend.batch_size
        assert supervisor.stage().state == "paused" and paused.experiment == events.MASK_STAGE
        supervisor.resume(events.MASK_STAGE)
        asked = time.monotonic()
        supervisor.stop(events.MASK_STAGE)
        rec.wait_for(lambda e: isinstance(e, events.Stopped) and e.experiment == events.MASK_STAGE, 10)
        stopped_in = time.monotonic() - asked
        # The experiment computes what the stage left undone itself.
        assert supervisor.wait(150)
    finally:
        supervisor.shutdown()
    assert stopped_in < 10
    files = cache_files(tmp_path / "cache")
    assert all(f.suffix == ".npz" for f in files), [f.name for f in files if f.suffix != ".npz"]
    for f in files:
        with np.load(f) as data:
            assert {"bits", "shape"} <= set(data.files)
    figures = json.loads((supervisor.run_dir / RUN_FILE).read_text())
    assert figures["mask_stage"]["state"] == "stopped"
    assert supervisor.states()["prompt_rl"].state == "finished"
    # Every pair computed once: by the stage before the stop, by the experiment after.
    assert figures["model_calls"] == figures["distinct_pairs"] == len(files)
