"""Where an attempt may go on a Ray cluster, decided before Ray is asked: what it
requests, which nodes it may use, and whether any node could ever give it that.

Ray leaves a request no node can satisfy pending for ever, without a word (2.60 does
not surface infeasible actors), so the check is ours: against every alive node's
total resources and the attempt's node constraint. Pins and preferences are node
label selectors on Ray's own `ray.io/node-id` label, so they work on any cluster; a
node is named by its `sa2va/host` label, else by its host name. Plain functions of
`ray.nodes()`'s rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sa2va_contract.config import ExperimentConfig
from sa2va_tui.text import describe_request

HOST_LABEL = "sa2va/host"
NODE_ID_LABEL = "ray.io/node-id"


@dataclass(frozen=True)
class Node:
    node_id: str
    host: str
    alive: bool
    resources: dict[str, float]

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))


def nodes_of(rows: list[dict[str, Any]]) -> list[Node]:
    """`ray.nodes()` as `Node`s, alive ones first, by host."""
    nodes = [Node(node_id=row["NodeID"], host=(row.get("Labels") or {}).get(HOST_LABEL) or row.get("NodeManagerHostname")
                  or row.get("NodeManagerAddress", "?"), alive=bool(row.get("Alive")),
                  resources={k: float(v) for k, v in (row.get("Resources") or {}).items()}) for row in rows]
    return sorted(nodes, key=lambda n: (not n.alive, n.host, n.node_id))


def resource_request(experiment: ExperimentConfig, cluster_gpus: float) -> dict[str, float]:
    """What the attempt's actor asks Ray for: `num_cpus`, and `num_gpus`, by default 1 for
    device cuda, 0 for cpu, and for auto 1 when the cluster has any GPU."""
    gpus = experiment.num_gpus
    if gpus is None:
        gpus = 1.0 if experiment.device == "cuda" or (experiment.device == "auto" and cluster_gpus > 0) else 0.0
    return {"CPU": float(experiment.num_cpus), "GPU": float(gpus)}


@dataclass(frozen=True)
class Where:
    """The node constraint of one attempt, as Ray options and as words."""

    #: The nodes it may use at all (None: any).
    allowed: frozenset[str] | None = None
    #: Ray's actor options: `label_selector`, `fallback_strategy`.
    options: dict[str, Any] = field(default_factory=dict)
    words: str = ""
    #: Why no node is allowed (a pinned host that does not exist).
    problem: str | None = None


def where_to(experiment: ExperimentConfig, nodes: list[Node], avoid: str | None = None) -> Where:
    """A pinned host (`experiment.host`) is a hard constraint; `avoid`, the node of the last
    out-of-memory failure, a preference: elsewhere when anything else can take it now."""
    alive = [n for n in nodes if n.alive]
    if experiment.host is not None:
        ids = sorted(n.node_id for n in alive if n.host == experiment.host)
        if not ids:
            hosts = ", ".join(sorted({n.host for n in alive})) or "none"
            return Where(problem=f"host: no alive node of the Ray cluster is {experiment.host!r} (nodes: {hosts})")
        selector = ids[0] if len(ids) == 1 else f"in({','.join(ids)})"
        return Where(frozenset(ids), {"label_selector": {NODE_ID_LABEL: selector}}, f"on {experiment.host}")
    if avoid is not None and any(n.node_id == avoid for n in alive):
        host = next(n.host for n in alive if n.node_id == avoid)
        return Where(None, {"label_selector": {NODE_ID_LABEL: f"!{avoid}"},
                            "fallback_strategy": [{"label_selector": {}}]}, f"preferably not on {host}")
    return Where()


def infeasible(request: dict[str, float], where: Where, nodes: list[Node]) -> str | None:
    """Why no alive node could ever give `request` under `where`, or None."""
    if where.problem:
        return where.problem
    candidates = [n for n in nodes if n.alive and (where.allowed is None or n.node_id in where.allowed)]
    if any(all(n.resources.get(k, 0.0) >= v for k, v in request.items() if v) for n in candidates):
        return None
    largest = max(candidates, key=lambda n: tuple(n.resources.get(k, 0.0) for k in ("GPU", "CPU")), default=None)
    most = f"; the largest node, {largest.host}, has {describe_request(largest.resources)}" if largest else ""
    scope = f" {where.words}" if where.allowed is not None else ""
    return f"infeasible: no node of the Ray cluster{scope} can ever give {describe_request(request)}{most}"
