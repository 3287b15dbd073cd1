"""The line of experiments waiting for room: real workers on the quick config, the
stand-in NVML where GPUs are needed, and the room rules as pure functions."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from conftest import QUICK_CONFIG
from fake_nvml import GiB, FakeGpu, FakeNvml
from sa2va_contract.config import load_config
from sa2va_contract.events import Failed, Finished, Queued, Restarting, Started, Stopped
from sa2va_contract.gpus import GpuInfo, GpuSnapshot
from sa2va_tui.launching import NoDevice, Occupant, find_room
from sa2va_tui.runstore import load_run
from supervision import make_config, run_to_end, supervise


def gpus(*free_gib: float | None) -> GpuSnapshot:
    return GpuSnapshot(True, f"{len(free_gib)} GPUs", [
        GpuInfo(index=i, memory_used=None if f is None else int((80 - f) * GiB), memory_total=80 * GiB)
        for i, f in enumerate(free_gib)])


def experiment(**changes):
    return load_config(None, [f"prompt_rl.{k}={v}" for k, v in changes.items()]).prompt_rl


NO_GPU = GpuSnapshot(False, "no NVIDIA GPU")


def test_room_on_the_cpu_is_one_worker_per_core_and_max_parallel():
    cpu = experiment(device="cpu")
    assert find_room(cpu, None, [], NO_GPU, None, cores=2) == (True, ())
    assert find_room(cpu, None, [Occupant((), None)], NO_GPU, None, cores=2) == (True, ())
    assert find_room(cpu, None, [Occupant((), None)] * 2, NO_GPU, None, cores=2) == (False, ())
    # One that waits for the mask stage's pairs uses no core, so it holds no slot.
    waiting = Occupant((), None, idle=True)
    assert find_room(cpu, None, [Occupant((), None), waiting], NO_GPU, None, cores=2) == (True, ())
    assert find_room(cpu, None, [Occupant((), None), waiting], NO_GPU, max_parallel=2, cores=2) == (False, ())
    assert find_room(cpu, None, [Occupant((0,), None)], gpus(40), max_parallel=1, cores=2) == (False, ())


def test_room_on_a_gpu_is_its_free_memory_against_the_need():
    auto = experiment(device="auto")
    # Unknown need: a GPU of its own, the freest of those without one of ours.
    assert find_room(auto, None, [Occupant((1,), 8 * GiB)], gpus(30, 60), None, 2) == (True, (0,))
    both_taken = [Occupant((0,), None), Occupant((1,), 2 * GiB)]
    assert find_room(auto, None, both_taken, gpus(30, 60), None, 2) == (False, ())
    # Known need: any GPU with that much free, counting what ours just started will take.
    assert find_room(auto, 20 * GiB, [Occupant((1,), 8 * GiB)], gpus(30, 60), None, 2) == (True, (1,))
    assert find_room(auto, 20 * GiB, [Occupant((1,), 50 * GiB, listed=False)], gpus(10, 60), None, 2) == (False, ())
    assert find_room(auto, 20 * GiB, [], gpus(10, None), None, 2) == (True, (1,))  # N/A memory: a GPU of its own
    # Pinned: only that GPU.
    assert find_room(experiment(device="auto", gpu=0), 20 * GiB, [], gpus(30, 60), None, 2) == (True, (0,))
    # A model split over every GPU: all of them, free of ours.
    assert find_room(auto, None, [], gpus(30, 60), None, 2, every_gpu=True) == (True, (0, 1))
    assert find_room(auto, None, [Occupant((1,), 2 * GiB)], gpus(30, 60), None, 2, every_gpu=True) == (False, ())
    with pytest.raises(NoDevice, match="GPU 3 asked for"):
        find_room(experiment(device="auto", gpu=3), None, [], gpus(30, 60), None, 2)
    with pytest.raises(NoDevice, match="device is cuda but no NVIDIA GPU"):
        find_room(experiment(device="cuda"), None, [], NO_GPU, None, 2)


class AliveWorkers:
    """The most experiment workers of this test alive at once, sampled every 20 ms."""

    def __init__(self) -> None:
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            # The run's mask stage is no experiment: max_parallel does not count it.
            experiments = [p for p in multiprocessing.active_children() if p.name != "sa2va-mask_stage"]
            self.most = max(self.most, len(experiments))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.most


def test_four_variants_with_max_parallel_two_never_run_more_than_two(real_run):
    variants = "variants={" + ", ".join(f"seed{n}: {{base: prompt_rl, seed: {n}}}" for n in (1, 2, 3)) + "}"
    config = make_config(real_run, variants, "run.max_parallel=2")
    alive = AliveWorkers()
    supervisor, rec = run_to_end(config, 300)
    assert alive.stop() == 2
    states = load_run(supervisor.run_dir).experiments
    assert {name: s.state for name, s in states.items()} == dict.fromkeys(
        ["prompt_rl", "seed1", "seed2", "seed3"], "finished")
    queued = {e.experiment: e.position for e in rec.of(Queued)}
    assert queued == {"seed2": 1, "seed3": 2}  # two start at once; the others wait in order
    assert all(states[name].queued_s > 0 for name in queued)
    finishes = sorted(e.time for e in rec.of(Finished))
    starts = {e.experiment: e.time for e in rec.of(Started)}
    assert starts["seed2"] >= finishes[0] and starts["seed3"] >= finishes[1]


def test_a_queued_experiment_stopped_never_starts(real_run):
    config = make_config(real_run, "variants={second: {base: prompt_rl, seed: 2}}", "run.max_parallel=1")
    supervisor, rec = supervise(config)
    supervisor.start()
    try:
        rec.wait_for(lambda e: isinstance(e, Queued) and e.experiment == "second")
        assert supervisor.states()["second"].state == "queued" and supervisor.position("second") == 1
        supervisor.stop("second")
        assert supervisor.wait(180)
    finally:
        supervisor.shutdown()
    assert not rec.of(Started, "second")
    (stopped,) = rec.of(Stopped, "second")
    assert stopped.reason == "removed from the line"
    states = load_run(supervisor.run_dir).experiments
    assert (states["prompt_rl"].state, states["second"].state) == ("finished", "stopped")
    assert states["second"].queue_position is None and states["second"].queued_s > 0


def test_experiments_needing_a_gpu_of_their_own_take_turns_on_one_gpu(tmp_path):
    """Two stand-in experiments, one GPU, need unknown: the second waits for the first."""
    config = load_config(QUICK_CONFIG, [f"run.logs_dir={tmp_path}", "prompt_rl.device=auto",
                                        "postprocess_rl.device=auto", "reward_net.enabled=false"])
    entries = {"prompt_rl": "sv_workload:probe", "postprocess_rl": "sv_workload:probe"}
    supervisor, rec = run_to_end(config, 60, entry_points=entries, nvml=FakeNvml([FakeGpu(used=10 * GiB)]))
    first, second = rec.of(Started, "prompt_rl")[0], rec.of(Started, "postprocess_rl")[0]
    assert (first.gpu, second.gpu) == (0, 0)
    assert [e.experiment for e in rec.of(Queued)] == ["postprocess_rl"]
    assert second.time >= rec.of(Finished, "prompt_rl")[0].time


def test_a_checkpoint_split_over_the_gpus_holds_them_all(tmp_path):
    """backend.device_map: split: the worker sees every GPU; the next waits for all."""
    config = load_config(QUICK_CONFIG, [f"run.logs_dir={tmp_path}", "backend.kind=sa2va", "backend.model_path=/m",
                                        "backend.device_map=split", "prompt_rl.device=auto",
                                        "postprocess_rl.device=auto", "reward_net.enabled=false"])
    entries = {"prompt_rl": "sv_workload:probe", "postprocess_rl": "sv_workload:probe"}
    nvml = FakeNvml([FakeGpu(used=10 * GiB), FakeGpu(used=10 * GiB)])
    supervisor, rec = run_to_end(config, 60, entry_points=entries, nvml=nvml)
    first, second = rec.of(Finished, "prompt_rl")[0], rec.of(Finished, "postprocess_rl")[0]
    assert first.summary["cuda_visible_devices"] == second.summary["cuda_visible_devices"] == "0,1"
    assert rec.of(Started, "postprocess_rl")[0].time >= first.time


def test_a_failure_at_start_up_is_not_retried_and_a_crash_is_when_asked(tmp_path, caplog):
    config = load_config(QUICK_CONFIG, [f"run.logs_dir={tmp_path}", "recovery.retry_errors=2",
                                        "reward_net.enabled=false"])
    entries = {"prompt_rl": "sv_workload:fail", "postprocess_rl": "sv_workload:crash_once"}
    supervisor, rec = run_to_end(config, 90, entry_points=entries)
    (startup,) = rec.of(Failed, "prompt_rl")
    assert startup.kind == "startup" and not rec.of(Restarting, "prompt_rl")
    assert any("failed at start-up: not retried" in r.getMessage() for r in caplog.records)
    (crash,) = rec.of(Failed, "postprocess_rl")
    assert crash.kind == "error" and "a crash after training started" in crash.message
    (restart,) = rec.of(Restarting, "postprocess_rl")
    assert (restart.reason, restart.attempt, restart.changes.batch_size) == ("error", 2, None)
    states = load_run(supervisor.run_dir).experiments
    assert (states["prompt_rl"].state, states["postprocess_rl"].state) == ("failed", "finished")
    assert states["postprocess_rl"].error_restarts == 1


def test_a_crash_is_not_retried_by_default(tmp_path):
    config = load_config(QUICK_CONFIG, [f"run.logs_dir={tmp_path}", "reward_net.enabled=false",
                                        "prompt_rl.enabled=false"])
    supervisor, rec = run_to_end(config, 60, entry_points={"postprocess_rl": "sv_workload:crash_once"})
    assert [e.kind for e in rec.of(Failed)] == ["error"] and not rec.of(Restarting)
    assert supervisor.done
