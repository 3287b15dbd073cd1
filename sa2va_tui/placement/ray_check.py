"""`sa2va-tui check` on the ray backend: can Ray be started or reached, what its nodes
offer, whether every experiment's request fits some node, and, for `ray.storage:
shared`, whether every node sees the run folder as this machine does: one task per
node writes a marker there, then one per node lists the markers; a node that does not
see all of them has a folder of its own at that path."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sa2va_contract.config import Config
from sa2va_tui.placement.base import LaunchError
from sa2va_tui.placement.ray_placement import NODE_ID_LABEL, Node, infeasible, nodes_of, resource_request, where_to
from sa2va_tui.placement.ray_session import RaySession
from sa2va_tui.text import describe_request

#: Where the markers go, under the logs folder (removed afterwards).
MARKERS = ".sa2va-shared-check"
TASK_TIMEOUT_S = 60.0


@dataclass
class ClusterCheck:
    found: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_cluster(config: Config) -> ClusterCheck:
    """What `check` says about the cluster of `config.ray`."""
    report = ClusterCheck()
    with tempfile.TemporaryDirectory(prefix="sa2va-check-") as scratch:
        session = RaySession(config.ray, Path(scratch))
        try:
            session.start()
        except LaunchError as err:
            report.problems.append(str(err))
            return report
        try:
            nodes = [n for n in nodes_of(session.ray.nodes()) if n.alive]
            where = "a private Ray instance on this machine" if session.private else f"the Ray cluster at {config.ray.address}"
            report.found.append(f"ray: {where}, {len(nodes)} node(s): "
                                + "; ".join(f"{n.host} ({describe_request(n.resources)})" for n in nodes))
            gpus = sum(n.gpus for n in nodes)
            for name, exp in config.experiments().items():
                request = resource_request(exp, gpus)
                problem = infeasible(request, where_to(exp, nodes), nodes)
                if problem:
                    report.problems.append(f"{name}: {problem}")
                else:
                    report.found.append(f"{name}: asks Ray for {describe_request(request)}")
            if config.ray.storage == "shared":
                _check_shared(session.ray, nodes, config.run.logs_dir, report)
            else:
                report.found.append("ray.storage: ship (files travel with the events; a node writes in "
                                    f"{config.ray.scratch_dir or '/tmp/sa2va-scratch'})")
        finally:
            session.close()
    return report


def _check_shared(ray, nodes: list[Node], logs_dir: Path, report: ClusterCheck) -> None:
    from sa2va_tui.placement.ray_actor import read_markers, write_marker

    logs_dir.mkdir(parents=True, exist_ok=True)
    folder, token = logs_dir / MARKERS, secrets.token_hex(4)
    on = {n.node_id: {"label_selector": {NODE_ID_LABEL: n.node_id}} for n in nodes}
    try:
        ray.get([write_marker.options(**on[n.node_id]).remote(str(folder), token) for n in nodes], timeout=TASK_TIMEOUT_S)
        seen = dict(ray.get([read_markers.options(**on[n.node_id]).remote(str(folder), token) for n in nodes],
                            timeout=TASK_TIMEOUT_S))
    except ray.exceptions.RayError as err:
        report.problems.append(f"ray.storage: the shared-folder check failed on the cluster: {str(err).splitlines()[0]}")
        return
    finally:
        shutil.rmtree(folder / token, ignore_errors=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    everyone = {n.node_id for n in nodes}
    blind = [n.host for n in nodes if set(seen.get(n.node_id, [])) != everyone]
    if blind:
        report.problems.append(f"ray.storage: shared, but {', '.join(blind)} do(es) not see {logs_dir} as this machine "
                               "does: mount it at the same path on every node, or set ray.storage: ship")
    else:
        report.found.append(f"ray.storage: shared: every node ({len(nodes)}) reads and writes {logs_dir}")
