"""Recovery with real worker processes: an out-of-memory failure, real in PyTorch's
own type (`faults.oom_at_step`), restarted by the supervisor at half the batch size,
from its checkpoint, on the freest GPU, until the limit or the floor."""

from __future__ import annotations

from conftest import QUICK_CONFIG
from fake_nvml import GiB, FakeGpu, FakeNvml
from sa2va_contract.config import load_config
from sa2va_contract.events import Checkpoint, Failed, Finished, GpuSample, Paused, Restarting, Started
from sa2va_contract.gpus import GpuProcess
from sa2va_contract.recovery import smaller_batch_size as next_batch_size
from sa2va_tui.runstore import load_run, read_events
from supervision import log_of, make_config, run_to_end, supervise


def test_batch_size_halving_keeps_dividing_the_rollout():
    def ppo(n_steps: int, n_envs: int, batch: int):
        config = load_config(None, [f"prompt_rl.ppo={{n_steps: {n_steps}, n_envs: {n_envs}, batch_size: {batch}}}"])
        return config.experiments()["prompt_rl"]

    exp = ppo(48, 2, 48)  # rollout 96
    assert next_batch_size(exp, 48, 4) == 24
    assert next_batch_size(exp, 24, 4) == 12
    assert next_batch_size(exp, 12, 4) == 6
    assert next_batch_size(exp, 6, 4) is None  # 3 is below the floor
    assert next_batch_size(exp, 64, 4) == 32
    assert next_batch_size(ppo(5, 3, 15), 15, 1) == 5  # half is 7; 5 is the largest divisor of 15 below
    reward = load_config(None).experiments()["reward_net"]
    assert next_batch_size(reward, 16, 4) == 8 and next_batch_size(reward, 7, 4) is None


# --- end to end through the CLI --------------------------------------------------------


def test_injected_ooms_restart_themselves_with_half_the_batch(real_run):
    """prompt_rl (PPO's minibatch) and reward_net (its fine-tuning batch), side by side,
    each out of memory once by `faults.oom_at_step`, each restarted by the supervisor."""
    config = make_config(
        real_run, "prompt_rl.faults={oom_at_step: 150, oom_min_batch_size: 32}",
        # reward_net: step 0 is its one reward-network batch (then a checkpoint), 1 and 2
        # its fine-tuning steps; 8 halves to 4, the floor of configs/quick.yaml.
        "reward_net.finetune={steps: 2, batch_size: 8}", "reward_net.faults={oom_at_step: 1, oom_min_batch_size: 8}",
        experiments=("prompt_rl", "reward_net"))
    supervisor, rec = run_to_end(config, 180)

    oom = {e.experiment: e for e in rec.of(Failed)}
    restart = {e.experiment: e for e in rec.of(Restarting)}
    assert sorted(oom) == sorted(restart) == ["prompt_rl", "reward_net"]
    for name, step, batch, smaller in (("prompt_rl", 150, 32, 16), ("reward_net", 1, 8, 4)):
        assert (oom[name].kind, oom[name].step, oom[name].batch_size, oom[name].gpu) == ("oom", step, batch, None)
        assert "out of memory" in oom[name].message
        checkpoints = rec.before(oom[name], Checkpoint, name)
        assert restart[name].reason == "oom" and restart[name].attempt == 2
        assert restart[name].changes.to_json() == {"batch_size": [batch, smaller], "resume_from": checkpoints[-1].path}
        (first, second) = rec.of(Started, name)
        assert (first.batch_size, second.batch_size, second.resumed_from) == (batch, smaller, checkpoints[-1].path)
        state = load_run(supervisor.run_dir).experiments[name]
        assert (state.state, state.oom_restarts, state.batch_size, state.attempts) == ("finished", 1, smaller, 2)
        assert state.timesteps == state.total
        recorded = [e.type for e in read_events(supervisor.run_dir) if e.experiment == name]
        last_start = max(i for i, kind in enumerate(recorded) if kind == "started")
        assert recorded.index("failed") < recorded.index("restarting") < last_start
    resumed_at = rec.before(oom["prompt_rl"], Checkpoint, "prompt_rl")[-1].step
    summary = rec.of(Finished, "prompt_rl")[0].summary
    assert summary["timesteps"] == 256 and summary["resumed_from"].endswith(f"ckpt_{resumed_at:09d}.zip")
    assert f"at {resumed_at} timesteps, batch size 16" in log_of(supervisor, "prompt_rl")


def test_oom_restarts_stop_at_the_limit_and_the_floor(real_run):
    """An experiment out of memory at every batch size: halved until the number of
    restarts runs out (prompt_rl) or the next size would be under the floor (a variant
    that starts at 8)."""
    config = make_config(
        real_run, "recovery={max_oom_restarts: 2, min_batch_size: 4}", "prompt_rl.faults={oom_at_step: 0}",
        "variants={small_batch: {base: prompt_rl, ppo: {batch_size: 8}}}")
    supervisor, rec = run_to_end(config, 180)
    assert [e.batch_size for e in rec.of(Failed, "prompt_rl")] == [32, 16, 8]  # 4 would be allowed: the limit
    assert [e.changes.to_json()["batch_size"] for e in rec.of(Restarting, "prompt_rl")] == [[32, 16], [16, 8]]
    assert [e.batch_size for e in rec.of(Failed, "small_batch")] == [8, 4]  # 2 is under the floor
    assert [e.changes.to_json()["batch_size"] for e in rec.of(Restarting, "small_batch")] == [[8, 4]]
    assert all(e.kind == "oom" for e in rec.of(Failed))
    states = load_run(supervisor.run_dir).experiments
    assert (states["prompt_rl"].state, states["prompt_rl"].oom_restarts) == ("failed", 2)  # for good
    assert (states["small_batch"].state, states["small_batch"].oom_restarts) == ("failed", 1)


# --- GPUs ------------------------------------------------------------------------------


def test_an_oom_restart_goes_to_the_freest_gpu(tmp_path):
    """Placement on a stand-in NVML's GPUs (sv_workload: no GPU here to run on)."""
    nvml = FakeNvml([FakeGpu(used=1 * GiB), FakeGpu(used=40 * GiB)])
    config = load_config(QUICK_CONFIG, [f"run.logs_dir={tmp_path}", "postprocess_rl.enabled=false",
                                        "reward_net.enabled=false", "prompt_rl.device=auto",
                                        "prompt_rl.faults={oom_at_step: 10, oom_min_batch_size: 32}"])
    supervisor, rec = supervise(config, entry_points={"prompt_rl": "sv_workload:probe"}, nvml=nvml, gpu_interval=0.05)
    supervisor.start()
    try:
        # Asked at once (the request waits in the worker's pipe), so that it holds on
        # GPU 0 at its first step points, well before its out-of-memory step.
        supervisor.pause("prompt_rl")
        first = rec.wait_for(lambda e: isinstance(e, Started))
        assert (first.gpu, first.batch_size) == (0, 32)
        assert rec.wait_for(lambda e: isinstance(e, Paused)).step < 10
        nvml.gpus[0].processes = {first.pid: 3 * GiB}
        sample = rec.wait_for(lambda e: isinstance(e, GpuSample) and e.gpus[0].processes)
        assert sample.available and sample.gpus[0].processes == [
            GpuProcess(pid=first.pid, used_memory=3 * GiB, experiment="prompt_rl")]
        nvml.gpus[0].used = 70 * GiB  # something else fills GPU 0 meanwhile
        supervisor.resume("prompt_rl")
        assert supervisor.wait(60)
    finally:
        supervisor.shutdown()
    (oom,) = rec.of(Failed)
    assert (oom.kind, oom.step, oom.gpu) == ("oom", 10, 0)
    (restart,) = rec.of(Restarting)
    assert restart.changes.to_json() == {"batch_size": [32, 16], "gpu": [0, 1], "resume_from": None}
    assert (rec.of(Started)[1].gpu, rec.of(Started)[1].batch_size) == (1, 16)
    assert rec.of(Finished)[0].summary["cuda_visible_devices"] == "1"
    state = load_run(supervisor.run_dir).experiments["prompt_rl"]
    assert (state.state, state.oom_restarts, state.batch_size, state.gpu) == ("finished", 1, 16, 1)


# --- failures and isolation ------------------------------------------------------------
