"""A plain forward pass through a graph (no actors): for ``predict`` and ``evaluate``."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn.backends import get_backend, is_cupy_array

from ._graph_checks import check_layer_rows
from ._routing import plain_values

if TYPE_CHECKING:
    from ._graph import Graph
    from ._node import Node

__all__ = ["forward_pass"]


def forward_pass(
    graph: Graph,
    params: Mapping[str, Any],
    batch: Mapping[str, Any],
    dtype: str,
    losses: bool = False,
    keep: Collection[str] | None = None,
) -> dict[str, Any]:
    """The nodes' outputs for ``batch`` in evaluation mode (no dropout), in topological order.

    Inputs the batch does not give are skipped, with the nodes that need them (so ``predict``
    needs no labels). Loss nodes are computed only with ``losses=True``.

    Args:
        keep: the nodes whose outputs come back (None: every node's). Any other output goes as
            soon as the last node that reads it has run, so a deep graph holds a few of a
            batch's activations at a time, not all of them (``predict`` keeps the graph's
            outputs, ``evaluate`` its losses and the logits it counts the accuracy of).

    Raises:
        GraphError: a layer gave another number of rows than its inputs (a filter, which the
            graph's check on zeros passes), named with both shapes as its actor names it in
            ``fit``.
    """
    values: dict[str, Any] = {}
    done = None if keep is None else _last_reads(graph, keep)
    for step, (name, node) in enumerate(graph.nodes.items()):
        _run_node(graph, name, node, params, batch, dtype, losses, values)
        if done is not None:
            for gone in done[step]:
                values.pop(gone, None)  # (a node skipped for a missing input has none)
    return values


def _last_reads(graph: Graph, keep: Collection[str]) -> list[list[str]]:
    """For each step of the topological walk, the outputs not in ``keep`` that no later node
    reads: those of the nodes whose last reader it is, and its own if nothing reads it. A
    reader that does not run (a loss without ``losses``, a node missing an input) still counts,
    so an output is never dropped before a node that could need it."""
    last: dict[str, int] = {}
    for step, (name, node) in enumerate(graph.nodes.items()):
        last[name] = step
        for src in node.inputs:
            last[src] = step
    done: list[list[str]] = [[] for _ in graph.nodes]
    for name, step in last.items():
        if name not in keep:
            done[step].append(name)
    return done


def _run_node(
    graph: Graph,
    name: str,
    node: Node,
    params: Mapping[str, Any],
    batch: Mapping[str, Any],
    dtype: str,
    losses: bool,
    values: dict[str, Any],
) -> None:
    """Puts node ``name``'s output for ``batch`` into ``values`` (see :func:`forward_pass`),
    unless it is skipped."""
    if node.kind == "input":
        if name in batch:
            arr = batch[name]
            if not is_cupy_array(arr):  # device data stays on its device
                arr = np.asarray(arr)
            if np.dtype(node.dtype).kind == "f":
                arr = arr.astype(dtype, copy=False)
            values[name] = arr
        return
    if node.kind == "loss" and not losses:
        return
    if any(src not in values for src in node.inputs):
        return
    if node.kind == "layer" and plain_values(graph, name, params.get(name), values, dtype):
        if node.role == "layer":  # a layer of an expert branch: its rows kept, as in fit
            _check_branch_rows(node, values)
        return  # (a router, a merge)
    backend = get_backend(node.device)
    # cupy computes on the thread's current device: with stages on several GPUs, each node
    # must run on its own (a loss runs on the device of the layer feeding it)
    with backend.activate():
        if node.kind == "layer":
            args = [backend.asarray(values[src]) for src in node.inputs]
            try:
                values[name] = node.module(params[name], *args)
            except (ValueError, TypeError) as exc:
                # a module's own message names itself ("loop: lengths[2] = 9 ..."), not
                # its node, which the actors' errors in fit do
                if f"{name!r}" in str(exc):
                    raise
                if type(exc) in (ValueError, TypeError):
                    raise type(exc)(f"layer {name!r}: {exc}") from exc
                # (a subclass may need other arguments, or carry fields: kept as it is)
                exc.add_note(f"in layer {name!r}")
                raise
            if node.role == "layer":  # (a loop keeps its rows, as its actor takes it to)
                _check_rows(node, [a.shape for a in args], values[name])
        else:
            args = [values[src] for src in node.inputs]
            if backend.device.kind == "cuda":
                args = [backend.asarray(a) for a in args]
            values[name] = node.module({}, *args)


def _check_rows(node: Node, input_shapes: list[Any], out: Any) -> None:
    """Refuses, as the layer's actor does in ``fit``, an output with other rows than the inputs:
    a layer that drops rows by their values (a filter) passes the graph's check on zeros, and
    here its outputs would no longer line up with the rows given (``predict``), or the loss
    would be blamed for them (``evaluate``). One comparison of two ints, per batch."""
    shape = getattr(out, "shape", None)
    if shape is not None and (not shape or shape[0] != input_shapes[0][0]):
        check_layer_rows(node, input_shapes, shape)


def _check_branch_rows(node: Node, values: Mapping[str, Any]) -> None:
    """:func:`_check_rows` of a layer of an expert branch, whose value is ``("branch", rows,
    output)`` (its input: those ``rows`` of the router's input, or the branch's value before)."""
    _, rows, out = values[node.name]
    if out is None:  # (no row came to it)
        return
    src = values[node.inputs[0]]
    features = (src[1] if src[0] == "routed" else src[2]).shape[1:]
    _check_rows(node, [(len(rows), *features)], out)
