"""Checks and queries of a graph's wiring that need no execution: routers, merges and their
expert branches (called by :meth:`Graph.check_structure`)."""

from __future__ import annotations

import math
from numbers import Real
from typing import TYPE_CHECKING, Any

from asyncnn._errors import GraphError

if TYPE_CHECKING:
    from ._graph import Graph
    from ._node import Node

__all__ = ["check_capacity_factor", "check_merge", "check_routing", "expert_starts"]


def check_capacity_factor(router: str, factor: Any) -> None:
    """Raises :class:`GraphError` unless a router's ``capacity_factor`` is None or a finite
    number > 0 (an infinite one would fail only when the first key arrives)."""
    if factor is None:
        return
    if isinstance(factor, bool) or not isinstance(factor, Real) or not 0 < float(factor) < math.inf:
        raise GraphError(
            f"router {router!r}: capacity_factor={factor!r} must be a finite number > 0 (or "
            "None, for capacity=... or no limit)"
        )


def expert_starts(graph: Graph, router: Node) -> list[str]:
    """The first layer of each expert branch of ``router``, in expert order: the nodes that
    read it, but its merge."""
    return [c for c, _ in router.consumers if graph.nodes[c].role != "merge"]


def check_merge(graph: Graph, name: str, inputs: tuple[str, ...], module: Any) -> None:
    """Checks a merge node's inputs (``g.merge`` checks them as it builds one; a ``Merge``
    module given to ``g.layer``, or a node of a graph spec, comes here): a router first, then
    one branch per expert of it, and a ``Merge`` over that many experts.

    Raises:
        GraphError: naming the merge, what it reads and what it must read.
    """
    src = inputs[0] if inputs else None
    if src is None or graph.nodes[src].role != "router":
        raise GraphError(
            f"merge {name!r}: {src!r} is not a router (make one with g.router); a merge reads "
            "a router first, then the last tensor of each of its expert branches, in order "
            f"(g.merge(name, router, *branches)); it reads {list(inputs)}"
        )
    experts = graph.nodes[src].module.experts
    branches = len(inputs) - 1
    if branches != experts:
        raise GraphError(
            f"merge {name!r}: router {src!r} has {experts} experts but {branches} branches were "
            "given; pass the last tensor of each expert branch, in order"
        )
    if getattr(module, "experts", experts) != experts:
        raise GraphError(
            f"merge {name!r}: its module {module!r} is over {module.experts} experts but router "
            f"{src!r} has {experts}; make it Merge({experts}) (g.merge makes the right one)"
        )


def check_routing(graph: Graph) -> None:
    """Checks the wiring of routers and merges: each merge reads a router and one branch per
    expert (:func:`check_merge`); one merge per router, one branch per expert, each a chain of
    one-input layers coming back into the merge in expert order; and that no graph output reads
    a router or a branch layer."""
    for node in graph.nodes.values():
        if node.role == "merge":
            check_merge(graph, node.name, node.inputs, node.module)
    # node -> (router, merge) for the routers and their branch layers, whose values outside the
    # actors are a key's routed rows, not one array a row per input row
    inside: dict[str, tuple[str, str]] = {}
    for node in graph.nodes.values():
        if node.role != "router":
            continue
        check_capacity_factor(node.name, node.module.capacity_factor)
        experts = int(node.module.experts)
        merges = [c for c, _ in node.consumers if graph.nodes[c].role == "merge"]
        if len(merges) != 1:
            raise GraphError(
                f"router {node.name!r} needs exactly one merge reading it (g.merge(name, router, "
                f"*branches)); it has {merges or 'none'}"
            )
        merge = graph.nodes[merges[0]]
        starts = expert_starts(graph, node)
        if len(starts) != experts:
            raise GraphError(
                f"router {node.name!r} has {experts} experts but {len(starts)} layers read "
                f"it ({starts}); add one expert layer per expert: g.layer(name, module, router)"
            )
        if merge.inputs[0] != node.name or len(merge.inputs) != experts + 1:
            raise GraphError(
                f"merge {merge.name!r} must read router {node.name!r} first, then the "
                f"{experts} expert branches; it reads {list(merge.inputs)}"
            )
        inside[node.name] = (node.name, merge.name)
        for e, start in enumerate(starts):
            for name in _check_branch(graph, node, merge, e, start):
                inside[name] = (node.name, merge.name)
    for out, src in graph.outputs.items():
        if src in inside:
            router_name, merge_name = inside[src]
            what = (
                f"router {router_name!r}, whose value is a routing of rows to experts"
                if src == router_name
                else f"layer {src!r} of an expert branch of router {router_name!r}, which gets "
                "only the rows routed to it (a different set per key)"
            )
            raise GraphError(
                f"output {out!r} reads {what}, not one row per input row; read the merge "
                f"instead: g.output({out!r}, {merge_name!r}), or a layer after it"
            )


def _check_branch(graph: Graph, router: Node, merge: Node, e: int, start: str) -> list[str]:
    """The layers of expert branch ``e`` (from ``start`` to the merge), checked."""
    name = start
    layers: list[str] = []
    while True:
        n = graph.nodes[name]
        layers.append(name)
        if len(n.inputs) != 1 or n.kind != "layer":
            raise GraphError(
                f"expert branch {e} of router {router.name!r}: {n.kind} {name!r} reads "
                f"{list(n.inputs)}; a branch is a chain of one-input layers"
            )
        if len(n.consumers) != 1:
            raise GraphError(
                f"expert branch {e} of router {router.name!r}: layer {name!r} feeds "
                f"{[c for c, _ in n.consumers]}; a branch layer feeds exactly one node "
                f"(the next layer of its branch, or the merge {merge.name!r})"
            )
        ((nxt, slot),) = n.consumers
        if nxt == merge.name:
            if slot != e + 1:
                raise GraphError(
                    f"merge {merge.name!r}: expert branch {e} (from {start!r}) comes in "
                    f"at input {slot}; pass the branches in expert order"
                )
            return layers
        name = nxt
