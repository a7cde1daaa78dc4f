"""A plain forward pass through a graph (no actors): for ``predict`` and ``evaluate``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn.backends import get_backend, is_cupy_array

from ._routing import plain_values

if TYPE_CHECKING:
    from ._graph import Graph

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
            continue  # a router, a merge, or a layer of an expert branch
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
            else:
                args = [values[src] for src in node.inputs]
                if backend.device.kind == "cuda":
                    args = [backend.asarray(a) for a in args]
                values[name] = node.module({}, *args)
    return values
