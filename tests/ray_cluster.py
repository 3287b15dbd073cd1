"""A Ray cluster of three nodes on this machine, for the ray backend's tests: a head
without GPUs and two nodes with two GPUs each, which exist only as Ray's resource counts
(this machine has none: the experiments run with `device: cpu` and only ask Ray for a
GPU slot). Every node binds 127.0.0.1, needs the token of this process's environment
(nothing is written under the home folder), and is labelled with its host name
(`sa2va/host`), the one thing told apart of nodes that share a machine."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
#: (label, CPUs, GPUs) of each node.
NODES = (("head", 2, 0), ("node-a", 2, 2), ("node-b", 2, 2))


@dataclass
class FakeCluster:
    cluster: Any
    address: str
    temp: Path

    def settings(self) -> list[str]:
        """`--set` overrides that put a run on this cluster."""
        return ["run.backend=ray", f"ray.address={self.address}"]

    def shutdown(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp, ignore_errors=True)


def start_cluster() -> FakeCluster:
    # A short folder: Ray's socket paths must fit in 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="sa2va-cluster-", dir="/tmp"))
    (temp / "ray").mkdir()
    # Before Ray is first imported: loopback addresses, a token held in the environment.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_TMPDIR"] = str(temp)  # where Cluster() notes the cluster's address
    from ray.cluster_utils import Cluster

    # The nodes' Python finds the tests' stand-ins (sv_workload, fake_nvml) as a real
    # cluster's finds what is installed on it; the tool ships its own packages.
    saved_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), saved_path) if p)
    try:
        common = dict(include_dashboard=False, temp_dir=str(temp), object_store_memory=80 * 2**20)
        (head, head_cpus, head_gpus), *others = NODES
        cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=head_cpus, num_gpus=head_gpus,
                                                                     labels={"sa2va/host": head}, **common))
        for label, cpus, gpus in others:
            cluster.add_node(num_cpus=cpus, num_gpus=gpus, labels={"sa2va/host": label}, **common)
        cluster.wait_for_nodes()
    finally:
        if saved_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_path
    return FakeCluster(cluster, cluster.address, temp)
