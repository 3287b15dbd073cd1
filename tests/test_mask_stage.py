"""The run's mask stage, with the real model, real workers and a cache of the test's own:
one model call per distinct pair however many experiments read it, none on a warm
cache, nothing half-written after a stop, pause obeyed, and its card in the app."""

from __future__ import annotations

import json
import time

import pytest

from conftest import SMALL_RUN
from experiments.backends.cache import ENTRY_SUFFIX, _read_entry
from sa2va_contract import events
from sa2va_contract.layout import RUN_FILE
from supervision import make_config, run_to_end, supervise
from test_app import T0, RecordedHub, run_async, until

#: Smaller than SMALL_RUN's images, so a cold cache fills in seconds, and one rollout
#: of training: what is tested here ends before training begins.
COLD = ("dataset.limit=6", "dataset.image_size=64", "prompt_rl.total_timesteps=32", "postprocess_rl.total_timesteps=32")


@pytest.fixture
def cold_run(tmp_path) -> list[str]:
    """A small real run with an empty mask cache of its own."""
    return [*SMALL_RUN, *COLD, f"backend.cache_dir={tmp_path / 'cache'}", f"run.logs_dir={tmp_path / 'logs'}"]


def cache_files(folder):
    """The mask files (the built-in dataset's generated splits live beside them)."""
    from sa2va_contract.layout import DATASET_MEMO_DIR

    return sorted(p for p in folder.rglob("*") if p.is_file() and DATASET_MEMO_DIR not in p.relative_to(folder).parts)


def test_two_experiments_cost_one_call_per_pair_and_a_warm_run_none(cold_run, tmp_path):
    config = make_config(cold_run, experiments=("prompt_rl", "postprocess_rl"))
    supervisor, rec = run_to_end(config, timeout=150, cores=1)
    # One core, but both start at once: one waiting for its pairs holds no core.
    assert not rec.of(events.Queued) and len(rec.of(events.Started)) == 3
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
    assert len(files) == figures["distinct_pairs"] and all(f.suffix == ENTRY_SUFFIX for f in files)

    # Warm: one experiment is enough to show that nothing is computed again.
    warm, rec = run_to_end(make_config(cold_run, experiments=("postprocess_rl",)), timeout=150)
    again = json.loads((warm.run_dir / RUN_FILE).read_text())
    assert again["model_calls"] == 0 and again["distinct_pairs"] == 2 * 6
    assert again["cache_hits"] >= again["distinct_pairs"]
    assert [e.ready_for for e in rec.of(events.PairsReady)] == ["postprocess_rl"]  # ready at once
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
    assert all(f.suffix == ENTRY_SUFFIX for f in files), [f.name for f in files if f.suffix != ENTRY_SUFFIX]
    for f in files:
        _read_entry(f)  # raises on a file cut short
    figures = json.loads((supervisor.run_dir / RUN_FILE).read_text())
    assert figures["mask_stage"]["state"] == "stopped"
    assert supervisor.states()["prompt_rl"].state == "finished"
    # Every pair computed once: by the stage before the stop, by the experiment after.
    assert figures["model_calls"] == figures["distinct_pairs"] == len(files)


@run_async
async def test_the_app_shows_the_stage_as_a_card_of_its_own():
    """Its pairs done of those to compute, rate, devices and who is ready, after the
    experiments' cards (whose numbers stay theirs); restart is not offered for it."""
    from sa2va_tui.app import AppSource, Sa2vaApp
    from sa2va_tui.app.widgets import ExperimentCard

    hub = RecordedHub()
    app = Sa2vaApp(AppSource(hub=hub, title="stage", log_path=lambda name: None), clock=lambda: T0 + 30)
    stage = events.MASK_STAGE
    async with app.run_test(size=(100, 30)) as pilot:
        hub.feed([
            events.Started("prompt_rl", pid=5001, gpu=None, batch_size=32, time=T0),
            events.Started(stage, pid=5000, gpu=None, batch_size=8, time=T0),
            events.Phase(stage, phase="caching_masks", done=0, total=1200, time=T0 + 1),
            events.MaskWork(stage, model_calls=0, cache_hits=40, distinct_pairs=1240, devices=["cpu ×2"], time=T0 + 1),
            events.Progress(stage, timesteps=0, total=1200, time=T0 + 1),
            events.Progress(stage, timesteps=600, total=1200, time=T0 + 11),
            events.PairsReady(stage, ready_for="postprocess_rl", pairs=240, time=T0 + 11),
        ])
        await until(pilot, lambda: len(app.query(ExperimentCard)) == 2, "two cards")
        cards = {c.experiment: c for c in app.query(ExperimentCard)}
        await until(pilot, lambda: cards[stage].view is not None and cards[stage].size.width > 0, "its card drawn")
        await pilot.pause(0.1)
        text = str(cards[stage].render())
        assert "2 mask stage" in text and "600/1,200 pairs" in text and "50%" in text
        assert "60 pairs/s" in text and "ready: postprocess_rl" in text and "cpu ×2" in text
        await pilot.press("2")
        await pilot.pause(0.2)
        assert app.dashboard.selected == stage
        assert app.dashboard.check_action("restart", ()) is not True


def test_check_estimates_the_fill_time_on_sa2va(tmp_path, monkeypatch):
    """`check` on a Sa2VA config: the run's distinct pairs, the time at the documented
    figure per pair, over the GPU replicas the stage runs (none here: no GPU)."""
    from typer.testing import CliRunner

    from experiments.backends.sa2va_families import LOADER_ENV
    from experiments.mask_needs import SA2VA_SECONDS_PER_PAIR, fill_estimate
    from sa2va_contract.config import load_config
    from sa2va_standin import write_checkpoint
    from sa2va_tui import engine
    from sa2va_tui.cli import app

    from conftest import QUICK_CONFIG

    monkeypatch.setenv(LOADER_ENV, "sa2va_standin:load_standin")
    checkpoint = write_checkpoint(tmp_path / "ckpt", "internvl2_5")
    settings = ["backend.kind=sa2va", f"backend.model_path={checkpoint}", "dataset.limit=5",
                "reward_net.reward.samples=2"]
    result = CliRunner().invoke(app, ["check", "-c", str(QUICK_CONFIG), *(a for s in settings for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    assert "mask stage: 110 distinct pairs, but no GPU to compute them on" in result.output
    config = load_config(QUICK_CONFIG, settings)
    line = fill_estimate(config, SA2VA_SECONDS_PER_PAIR, replicas=1, gpus=1, measured=False)
    assert "about 2 min on 1 GPU replica over 1 GPU (1.00 s per pair" in line  # 110 pairs x 1 s
    assert "an assumed figure; check --deep measures it" in line
    # Two replicas on one GPU with room for two, one on another: a third of the time.
    line = engine.mask_fill_estimate(config, 3, 2)
    assert "about 37 s on 3 GPU replicas over 2 GPUs" in line


# --- Sa2VA: a replica on every GPU with room -----------------------------------------


def test_sa2va_replicas_fill_every_gpu_that_has_room(tmp_path):
    """As many replicas on a GPU as its free memory holds, the freest first; a cap
    spreads them over the GPUs; with room nowhere, one on the freest (as one model would
    be placed); the stage's worker sees exactly those GPUs."""
    from fake_nvml import FakeGpu, FakeNvml, GiB
    from sa2va_contract.config import load_config
    from sa2va_standin import write_checkpoint
    from sa2va_tui.gpus import read_gpus
    from sa2va_tui.launching import mask_stage_gpus, replica_memory_need, stage_replica_gpus, stage_spec
    from sa2va_tui.runstore import RunStore

    from conftest import QUICK_CONFIG

    snapshot = read_gpus(FakeNvml([FakeGpu(used=70 * GiB), FakeGpu(used=10 * GiB), FakeGpu(used=36 * GiB)]))
    # Free: 10, 70 and 44 GiB; at 20 GiB a replica: none, three and two.
    assert stage_replica_gpus(snapshot, 20 * GiB) == (1, 1, 1, 2, 2)
    assert stage_replica_gpus(snapshot, 20 * GiB, most=2) == (1, 2)
    assert stage_replica_gpus(snapshot, 90 * GiB) == (1,)
    import pynvml

    # Memory not reported (NVML answers "not supported"): one on it, as one model would be.
    unknown = read_gpus(FakeNvml([FakeGpu(failing={"nvmlDeviceGetMemoryInfo": pynvml.NVML_ERROR_NOT_SUPPORTED})]))
    assert unknown.gpus[0].memory_free is None
    assert stage_replica_gpus(unknown, 20 * GiB) == (0,)

    checkpoint = write_checkpoint(tmp_path / "ckpt", "internvl3")
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 4096)
    config = load_config(QUICK_CONFIG, ["backend.kind=sa2va", f"backend.model_path={checkpoint}",
                                        f"run.logs_dir={tmp_path / 'logs'}"])
    assert replica_memory_need(config) == int(4096 * 1.25 + 2 * GiB)  # the weights, a quarter more, 2 GiB
    sized = config.model_copy(update={"backend": config.backend.model_copy(update={"replica_memory_gb": 30.0})})
    assert replica_memory_need(sized) == 30 * GiB
    assert mask_stage_gpus(sized, snapshot) == ((1, 1, 2), ())  # 30 GiB each: two fit on GPU 1, one on GPU 2...
    assert mask_stage_gpus(sized.model_copy(update={"backend": sized.backend.model_copy(update={"max_replicas": 2})}),
                           snapshot) == ((1, 2), ())  # ...and a cap of two spreads them
    store = RunStore.create(config)
    spec = stage_spec(config, store, ["prompt_rl"], (1, 1, 2))
    assert (spec.visible_gpus, spec.replica_gpus, spec.gpu) == ("1,2", (1, 1, 2), 1)
    # A model split over the GPUs cannot be copied: one, seeing every GPU.
    split = config.model_copy(update={"backend": config.backend.model_copy(update={"device_map": "split"})})
    assert mask_stage_gpus(split, snapshot) == ((), (0, 1, 2))
    spec = stage_spec(split, store, ["prompt_rl"], *mask_stage_gpus(split, snapshot))
    assert (spec.visible_gpus, spec.replica_gpus) == ("0,1,2", ())


def test_the_sa2va_stage_loads_one_model_per_replica_and_computes_each_pair_once(tmp_path, monkeypatch):
    """The stage's worker with the layout the supervisor gave it (two replicas on GPU 3,
    one on GPU 5): three models, each pair computed once among them, the devices said.
    (No CUDA here: the stand-in's replicas run on the CPU.)"""
    import sa2va_standin
    from experiments import mask_stage
    from experiments.backends.sa2va_families import LOADER_ENV
    from experiments.harness import Control, ListSink
    from sa2va_contract.config import load_config
    from sa2va_standin import write_checkpoint

    from conftest import QUICK_CONFIG

    monkeypatch.setenv(LOADER_ENV, "sa2va_standin:load_standin")
    checkpoint = write_checkpoint(tmp_path / "ckpt", "internvl3")
    config = load_config(QUICK_CONFIG, ["backend.kind=sa2va", f"backend.model_path={checkpoint}", "dataset.limit=4",
                                        "backend.batch_size=1", f"backend.cache_dir={tmp_path / 'cache'}",
                                        f"run.logs_dir={tmp_path / 'logs'}", "prompt_rl.enabled=false",
                                        "reward_net.enabled=false"])
    sink = ListSink()
    ctx = mask_stage.stage_context(config, exp_dir=tmp_path / "stage", sink=sink, control=Control(), gpu=3,
                                   needs_of=("postprocess_rl",), replica_gpus=(3, 3, 5))
    loads = len(sa2va_standin.LOADS)
    summary = mask_stage.run(ctx)
    assert len(sa2va_standin.LOADS) - loads == 3
    assert summary["replicas"] == 3 and summary["devices"] == ["gpu 3 ×2", "gpu 5"]
    assert summary["distinct_pairs"] == 8 and summary["model_calls"] == 8  # train and val, the default prompt
    assert cache_files(tmp_path / "cache") and len(cache_files(tmp_path / "cache")) == 8
    assert [e.ready_for for e in sink.of_type(events.PairsReady)] == ["postprocess_rl"]


def test_on_a_cpu_the_stage_s_replicas_yield_to_training_and_its_own_thread_does_not(tmp_path, monkeypatch):
    """The embedded stage's replica threads compute at a lower priority; the thread
    that hears pause and stop keeps its own. (A spy on the real model's `segment`
    reads the priority of the thread that calls it.)"""
    import os
    import threading

    from experiments import mask_stage
    from experiments.backends.embedded import EmbeddedSegmenter
    from experiments.harness import Control, ListSink
    from sa2va_contract.config import load_config

    from conftest import QUICK_CONFIG

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen, segment = [], EmbeddedSegmenter.segment
    monkeypatch.setattr(EmbeddedSegmenter, "segment", lambda self, *a: seen.append(priority()) or segment(self, *a))
    mine = priority()
    config = load_config(QUICK_CONFIG, ["dataset.limit=4", f"backend.cache_dir={tmp_path / 'cache'}",
                                        "prompt_rl.enabled=false", "reward_net.enabled=false"])
    ctx = mask_stage.stage_context(config, exp_dir=tmp_path / "stage", sink=ListSink(), control=Control(),
                                   needs_of=("postprocess_rl",))
    summary = mask_stage.run(ctx)
    assert summary["model_calls"] == 8
    assert seen and set(seen) == {min(19, mine + mask_stage.CPU_REPLICA_NICENESS)}
    assert priority() == mine
