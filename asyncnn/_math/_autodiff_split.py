"""The two-halved pullback of zero-bubble schedules: :func:`vjp_split` gives the inputs' gradients
first and the parameters' later, from one trace and one set of residuals (see ``_autodiff``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._autodiff import _as_cotangent, _cotangent_leaves, _raw, _trace_call, _zeros_like
from ._pytree import tree_flatten, tree_unflatten

__all__ = ["vjp_split"]


def vjp_split(
    fn: Callable[..., Any], params: Any, *inputs: Any
) -> tuple[Any, Callable[[Any], tuple[tuple[Any, ...], Callable[[], Any]]]]:
    """Like :func:`vjp` of ``fn(params, *inputs)``, with a pullback in two halves that share one
    set of residuals: the inputs' cotangents first, the parameters' later (zero-bubble
    schedules send the input gradient upstream at once and defer the weight gradient).

    Returns:
        ``(out, input_pullback)``: ``input_pullback(cotangent)`` returns ``(input_grads,
        weight_pullback)``, ``input_grads`` one gradient per input (as :func:`vjp` gives
        them), and ``weight_pullback()`` the gradient of ``params``. The input half computes
        only what the inputs' gradients need and keeps, for the weight half, the cotangent of
        each node that reads a parameter-only value (and that node's residuals), not the input
        gradients it returns; the weight half finishes the walk. Each half may be called once
        (a cotangent the input half refuses leaves it usable, as :func:`vjp`'s pullback).
        Both give exactly (bit for bit) what :func:`vjp`'s pullback gives. The weight half
        reads the cotangent given to the input half, which the input gradients may share
        memory with: change neither in place before the weight half has run.

    Example:
        >>> y, pb = vjp_split(lambda w, x: ops.tanh(x @ w), w, x)
        >>> (gx,), weight_pullback = pb(ct)
        >>> gw = weight_pullback()
    """
    primals = (params, *inputs)
    trace, leaves, treedef, leaf_index, out_leaves, out_def, out_index, out_raw = _trace_call(
        fn, primals, "vjp_split"
    )
    param_leaves = len(tree_flatten(params)[0])
    # the nodes that depend on an input: the input half's walk; the others depend on
    # parameters (or nothing) only, and are the weight half's
    nodes = trace.nodes
    on_input = [False] * len(nodes)
    for i in leaf_index[param_leaves:]:
        if i >= 0:
            on_input[i] = True
    for i, node in enumerate(nodes):
        if node is not None and node.rule is not None:
            on_input[i] = any(p >= 0 and on_input[p] for p in node.parents)

    def input_pullback(cotangent: Any) -> tuple[tuple[Any, ...], Callable[[], Any]]:
        if trace.done:
            raise RuntimeError("this split pullback's input half has already run")
        ct_leaves = _cotangent_leaves(cotangent, out_def)
        grads: list[Any] = [None] * len(nodes)
        for i, ct, o in zip(out_index, ct_leaves, out_leaves, strict=True):
            if i >= 0 and ct is not None:
                ct = _as_cotangent(ct, _raw(o))
                grads[i] = ct if grads[i] is None else grads[i] + ct
        # spent only now: a cotangent refused above leaves it usable, as vjp's pullback
        trace.done = True
        # the seeds of parameter-only outputs wait for the weight half, like any other cotangent
        deferred: dict[int, Any] = {}  # node -> its cotangent, for its parameter-only parents
        for i in range(len(nodes) - 1, -1, -1):
            node = nodes[i]
            if node is None or node.rule is None or not on_input[i]:
                continue
            g = grads[i]
            if g is None:  # no cotangent reaches it: neither half needs its residuals
                nodes[i] = None
                continue
            grads[i] = None  # (the wanted nodes are input leaves, which have no rule)
            reads_params = any(
                p >= 0 and need and not on_input[p]
                for p, need in zip(node.parents, node.needs, strict=True)
            )
            if reads_params:
                deferred[i] = g
            needs = tuple(
                need and p >= 0 and on_input[p]
                for p, need in zip(node.parents, node.needs, strict=True)
            )
            if any(needs):
                in_grads = node.rule(g, node.res, needs)
                for p, ig, need in zip(node.parents, in_grads, needs, strict=True):
                    if need and ig is not None:
                        prev = grads[p]
                        grads[p] = ig if prev is None else prev + ig
            if not reads_params:
                nodes[i] = None  # its residuals are no longer needed
        flat_inputs: list[Any] = []
        for leaf, i in zip(leaves[param_leaves:], leaf_index[param_leaves:], strict=True):
            flat_inputs.append(None if i < 0 else grads[i] if grads[i] is not None else
                               _zeros_like(leaf))  # fmt: skip
        input_grads = tuple(tree_unflatten(treedef, [None] * param_leaves + flat_inputs))[1:]
        # the weight half's seeds (the parameter-only outputs'), all it reads of ``grads``:
        # closing over ``grads`` would keep the input gradients alive (sent upstream, and used
        # there long before a deferred weight half runs); None once the weight half has run
        pending: list[list[Any] | None] = [
            [None if on else g for g, on in zip(grads, on_input, strict=True)]
        ]

        def weight_pullback() -> Any:
            wgrads = pending[0]
            if wgrads is None:
                raise RuntimeError("this split pullback's weight half has already run")
            pending[0] = None  # (it may run once; and it keeps no sums once it has run)
            for i in range(len(nodes) - 1, -1, -1):
                node = nodes[i]
                nodes[i] = None
                if node is None or node.rule is None:
                    continue
                if on_input[i]:
                    g = deferred.get(i)
                    if g is None:
                        continue
                    needs = tuple(
                        need and p >= 0 and not on_input[p]
                        for p, need in zip(node.parents, node.needs, strict=True)
                    )
                else:
                    g = wgrads[i]
                    if g is None:
                        continue
                    needs = node.needs
                in_grads = node.rule(g, node.res, needs)
                for p, ig, need in zip(node.parents, in_grads, needs, strict=True):
                    if need and p >= 0 and ig is not None:
                        prev = wgrads[p]
                        wgrads[p] = ig if prev is None else prev + ig
            flat: list[Any] = []
            for leaf, i in zip(leaves[:param_leaves], leaf_index[:param_leaves], strict=True):
                flat.append(None if i < 0 else wgrads[i] if wgrads[i] is not None else
                            _zeros_like(leaf))  # fmt: skip
            return tree_unflatten(treedef, flat + [None] * (len(leaves) - param_leaves))[0]

        return input_grads, weight_pullback

    return out_raw, input_pullback
