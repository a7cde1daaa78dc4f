"""A plain forward pass through a graph (no actors): for ``predict`` and ``evaluate``."""

from __future__ import annotations

from collections.abc import Mapping
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
) -> dict[str, Any]:
    """Every node's output for ``batch`` in evaluation mode (no dropout), in topological order.

    Inputs the batch does not give are skipped, with the nodes that need them (so ``predict``
    needs no labels). Loss nodes are computed only with ``losses=True``.

    Raises:
        GraphError: a layer gave another number of rows than its inputs (a filter, which the
            graph's check on zeros passes), named with both shapes as its actor names it in
            ``fit``.
    """
    values: dict[str, Any] = {}
    for name, node in graph.nodes.items():
        if node.kind == "input":
            if name in batch:
                arr = batch[name]
                if not is_cupy_array(arr):  # device data stays on its device
                    arr = np.asarray(arr)
                if np.dtype(node.dtype).kind == "f":
                    arr = arr.astype(dtype, copy=False)
                values[name] = arr
            continue
        if node.kind == "loss" and not losses:
            continue
        if any(src not in values for src in node.inputs):
            continue
        if node.kind == "layer" and plain_values(graph, name, params.get(name), values, dtype):
            if node.role == "layer":  # a layer of an expert branch: its rows kept, as in fit
                _check_branch_rows(node, values)
            continue  # (a router, a merge)
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
    return values


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
