"""Where each node of a graph runs on a cluster (a worker, or the driver), checked before any
worker is touched."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn._errors import GraphError
from asyncnn._runtime._graph import Graph
from asyncnn._runtime._policies import Policy

if TYPE_CHECKING:
    from ._base import Cluster

__all__ = ["check_turns", "placement"]


def placement(graph: Graph, cluster: Cluster) -> dict[str, int | None]:
    """Where each layer and loss runs: its ``worker``, or ``None`` for the driver. A loss without
    one runs beside the layer it reads first (no extra hop for the logits).

    Raises:
        GraphError: a node names a worker the cluster does not have.
    """
    where: dict[str, int | None] = {}
    for name in graph.layers:
        where[name] = _worker_of("layer", name, graph.nodes[name].worker, cluster)
    for name in graph.losses:
        node = graph.nodes[name]
        w = _worker_of("loss", name, node.worker, cluster)
        if w is None:
            w = next((where[s] for s in node.inputs if s in where), None)
        where[name] = w
    return where


def _worker_of(kind: str, name: str, w: Any, cluster: Cluster) -> int | None:
    """A node's worker as a Python int (None: the driver), or the error naming the node. A
    numpy integer is taken, as the graph takes it; a bool, a string... is not."""
    if w is None:
        return None
    if not isinstance(w, int | np.integer) or isinstance(w, bool | np.bool_):
        raise GraphError(
            f"{kind} {name!r} is placed on worker={w!r:.40} (of type {type(w).__name__}): "
            f"worker= takes an int (0..{cluster.workers - 1}), or None for the driver"
        )
    if 0 <= w < cluster.workers:
        return int(w)
    raise GraphError(
        f"{kind} {name!r} is placed on worker={w!r}, but the cluster has {cluster.workers} "
        f"workers (0..{cluster.workers - 1}); nodes without worker= run in the driver"
    )


def check_turns(graph: Graph, policy: Policy, where: dict[str, int | None]) -> None:
    """Refuses, before any worker starts, a placement that puts layers of one device (stages
    that take turns in the device's order, as under ``Interleaved1F1B``) in different
    processes: turns are passed within a process.

    Raises:
        GraphError: naming the layers and where each is placed.
    """
    mates: dict[int, list[str]] = {}
    for name, order in policy.orders(graph.layers).items():
        turns = order.device_turns()
        if turns is not None:
            mates.setdefault(id(turns), []).append(name)
    for names in mates.values():
        places = {n: where[n] for n in names}
        if len(set(places.values())) > 1:
            raise GraphError(
                f"the policy {policy.name} runs layers {names} on one device, taking turns, but "
                f"they are placed on different workers {places} (None: the driver); place them "
                "on one worker (see docs/policies.md)"
            )
