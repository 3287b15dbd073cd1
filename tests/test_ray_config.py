"""The ray backend's settings and its placement decisions, without a cluster: what the
config refuses in one line, what an attempt asks Ray for, and a restart plan that leaves
the device to Ray."""

from __future__ import annotations


import pytest

from conftest import QUICK_CONFIG
from sa2va_contract.config import ConfigError, load_config
from sa2va_contract.gpus import GpuInfo, GpuSnapshot
from sa2va_contract.recovery import plan_restart
from sa2va_tui.launching import Occupant, find_room
from sa2va_tui.placement.ray_placement import resource_request


@pytest.mark.parametrize("settings, message", [
    (["run.backend=ray", "prompt_rl.gpu=1"],
     "prompt_rl.gpu: Ray assigns GPU indices itself, so one cannot be pinned on the ray backend; pin a node with host"),
    (["run.backend=ray", "prompt_rl.device=cuda", "prompt_rl.num_gpus=0"],
     "prompt_rl.num_gpus: 0 for device cuda (the actor would see no GPU)"),
    (["prompt_rl.host=node-a"], "prompt_rl.host: only the ray backend places experiments on nodes (run.backend: ray)"),
    (["ray.scratch_dir=scratch"], "ray.scratch_dir: scratch must be an absolute path (it names a folder on every node)"),
    (["ray.storage=nfs"], "ray.storage: must be one of 'shared' or 'ship', not 'nfs'"),
    (["run.backend=slurm"], "run.backend: must be one of 'local' or 'ray', not 'slurm'"),
])
def test_placement_settings_the_backend_cannot_honour_are_one_line(settings, message):
    with pytest.raises(ConfigError) as caught:
        load_config(QUICK_CONFIG, settings)
    assert str(caught.value).split(": ", 1)[1] == message


def test_an_attempt_asks_ray_for_what_its_config_says():
    config = load_config(None, ["run.backend=ray", "prompt_rl.device=cpu", "postprocess_rl.num_gpus=0.5",
                                "postprocess_rl.num_cpus=2", "reward_net.device=cuda"])
    exps = config.experiments()
    assert resource_request(exps["prompt_rl"], 4) == {"CPU": 1.0, "GPU": 0.0}
    assert resource_request(exps["postprocess_rl"], 4) == {"CPU": 2.0, "GPU": 0.5}  # a shared GPU
    assert resource_request(exps["reward_net"], 0) == {"CPU": 1.0, "GPU": 1.0}  # infeasible there: said at launch
    auto = load_config(None, ["run.backend=ray"]).experiments()["prompt_rl"]
    assert resource_request(auto, 2)["GPU"] == 1.0 and resource_request(auto, 0)["GPU"] == 0.0


def test_a_plan_on_a_cluster_leaves_the_device_to_its_scheduler():
    exp = load_config(None).experiments()["prompt_rl"]
    common = dict(attempts=1, last_batch_size=64, last_gpu=0, last_failure="oom", checkpoint="ck.zip",
                  checkpoint_step=128, recovery=load_config(None).recovery)
    plan = plan_restart(exp, "oom", gpu=0, placed_by="Ray", **common)
    assert (plan.gpu, plan.placed_by, plan.lacks_gpu, plan.batch_size) == (None, "Ray", False, 32)
    assert plan.changes.to_json() == {"resume_from": "ck.zip", "batch_size": [64, 32]}  # no device change claimed
    # On a cluster the supervisor's line leaves room to Ray, which queues it itself.
    cluster = GpuSnapshot(True, "1 GPU on 1 node", [GpuInfo(index=0, host="node-a", memory_used=1, memory_total=10)],
                          assigned_by="Ray")
    assert find_room(load_config(None, ["prompt_rl.device=cuda"]).prompt_rl, None, [Occupant((), None)] * 5,
                     cluster, None, cores=1) == (True, ())
    local = plan_restart(exp, "oom", gpu=None, **common)
    assert (local.gpu, local.placed_by, local.lacks_gpu) == (None, None, True)
    assert local.changes.to_json()["gpu"] == [0, None]


def test_the_restart_dialog_says_ray_places_the_attempt():
    from sa2va_tui.app.main import restart_question

    exp = load_config(None).experiments()["prompt_rl"]
    plan = plan_restart(exp, "manual", attempts=1, last_batch_size=64, last_gpu=0, last_failure="oom",
                        checkpoint="ck.zip", checkpoint_step=128, recovery=load_config(None).recovery, gpu=None,
                        placed_by="Ray")
    device = restart_question("prompt_rl", plan).plain.splitlines()[-1]
    assert device == "device where Ray places it (another node if one can take it)"  # no GPU of ours claimed
