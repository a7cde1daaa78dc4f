"""The whole graph's check before any compute (:func:`validate`): its wiring, then the shapes
and dtypes of every node, found by evaluating each on a couple of rows of zeros (a loop's
lengths made full, so its cell runs), with the rule that a layer keeps the batch dimension
(:func:`check_layer_rows`). Apart from ``_checks.py``, which checks the data a run is given,
because this looks at the graph alone, once per graph."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn._errors import GraphError
from asyncnn._math._pytree import tree_leaves, tree_map
from asyncnn.backends import get_backend, to_numpy

if TYPE_CHECKING:
    from ._graph import Graph
    from ._node import Node

__all__ = ["ParamShape", "check_layer_rows", "validate"]


def validate(
    graph: Graph,
    dtype: str = "float32",
    rows: int = 2,
    param_shapes: dict[str, Any] | None = None,
    out_shapes: dict[str, tuple[int, ...]] | None = None,
    out_dtypes: dict[str, np.dtype[Any]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Checks ``graph`` before any training compute: wiring, then shapes and dtypes by evaluating
    every node on ``rows`` rows of zeros. Returns each node's output shape.

    Args:
        graph: the network.
        dtype: the run's floating dtype.
        rows: the rows of the zeros each node is evaluated on.
        param_shapes: filled, where given, with each layer's parameters as the evaluation made
            them, each array as a :class:`ParamShape` (its shape and dtype, no data): a state
            given to a run is checked against them without initialising the layers again.
        out_shapes: filled, where given, with each node's output shape as the evaluation
            found it, as far as it got (a replay names the layer whose output changed, before
            the node the check failed at); the dict returned when the check passes.
        out_dtypes: filled, where given, with each layer's output dtype as the evaluation
            found it, as far as it got (a replay compares them with the dtypes the run sent).

    Raises:
        GraphError: naming the node, its module and the shapes it was given.
    """
    graph.check_structure()
    shapes: dict[str, tuple[int, ...]] = {} if out_shapes is None else out_shapes
    values: dict[str, Any] = {}
    dt = np.dtype(dtype)
    for name, node in graph.nodes.items():
        if node.kind == "input":
            values[name] = input_zeros(node, rows, dt)
            shapes[name] = values[name].shape
            continue
        if node.kind == "loss":
            _check_no_params(node, dtype)
        args = [values[src] for src in node.inputs]
        if node.role == "loop":
            args = _loop_check_args(node.module, args)
        arg_desc = ", ".join(
            f"{src} {tuple(a.shape)} {a.dtype}" for src, a in zip(node.inputs, args, strict=True)
        )
        try:
            # Zeros may well give log(0) and the like: only shapes and dtypes are checked here.
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out = _evaluate_node(node, args, dtype, param_shapes)
        except Exception as exc:
            # an input declared as one number per row is the usual cause of a shape error: say
            # how to declare it (a TypeError is of a dtype: float labels, float token ids)
            flat = [] if isinstance(exc, TypeError) else [
                src for src in node.inputs
                if graph.nodes[src].kind == "input" and tuple(graph.nodes[src].shape or ()) == (None,)
                and np.dtype(graph.nodes[src].dtype).kind == "f"
            ]  # fmt: skip
            hint = (
                f"; input {flat[0]!r} is declared as shape (None,), one number per row: if it "
                "has features, declare them (g.input(name, shape=(None, ...)), or "
                "Graph.sequential(..., input_shape=(None, ...)))"
                if flat
                else _integer_hint(graph, node, exc)
            )
            raise GraphError(
                f"{node.kind} {name!r} ({node.module!r}) fails on its inputs [{arg_desc}] "
                f"(batch of {rows}): {type(exc).__name__}: {exc}{hint or _indices_hint(node)}"
            ) from exc
        out = to_numpy(out)
        if node.kind == "layer":
            if not hasattr(out, "shape"):
                raise GraphError(
                    f"layer {name!r} ({node.module!r}) returned a {type(out).__name__}, not one "
                    f"array: a layer gives one array{_indices_hint(node)}"
                )
            check_layer_rows(node, [a.shape for a in args], out.shape)
            values[name] = out
            shapes[name] = tuple(out.shape)
            if out_dtypes is not None:
                out_dtypes[name] = np.dtype(out.dtype)
        elif getattr(out, "size", 0) != 1:
            reduction = getattr(node.module, "reduction", None)
            hint = (
                f" (its reduction is {reduction!r}: use 'mean' or 'sum')"
                if reduction not in (None, "mean", "sum")
                else ""
            )
            raise GraphError(f"loss {name!r} must return a scalar, got shape {np.shape(out)}{hint}")
    graph.shapes = shapes
    return shapes


def input_zeros(node: Node, rows: int, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """What the graph's check feeds input ``node``: ``rows`` rows of zeros of its shape, in the
    run's floating ``dtype`` for a float input, else in its own (an unknown size past the batch
    dimension: 0)."""
    shape = (rows, *(int(d or 0) for d in (node.shape or (None,))[1:]))
    return np.zeros(shape, dtype=dtype if np.dtype(node.dtype).kind == "f" else node.dtype)


def _loop_check_args(loop: Any, args: list[Any]) -> list[Any]:
    """A loop's inputs for the graph's check: its zero ``lengths`` (zeros from the data) would
    run the cell no step at all, so neither ``xs`` nor the cell would be checked; every row
    runs every step instead (the output's shape is the same either way)."""
    if not loop.has_lengths:
        return args
    _, xs, lengths = loop.split(args)
    full = np.full(lengths.shape, loop.steps(xs), dtype=lengths.dtype)
    return [*args[:-1], full]


def check_layer_rows(node: Node, input_shapes: list[Any], output_shape: Any) -> None:
    """Refuses a layer whose output has another number of rows than its inputs.

    The first dimension is the batch everywhere between the inputs and the losses: a minibatch
    is cut into keys along it, routers and merges move rows by index, and a key's loss is scaled
    by its rows. A layer that drops rows (``x[:-1]``) or pools them (``x.sum(0, keepdims=True)``)
    fails later under another node's name, or, broadcast back onto the rows by a later layer,
    trains silently a model that changes with how the minibatch is cut (``Sync`` and ``GPipe``
    no longer agree). A reduction over the rows belongs in a loss node. The check is one
    comparison of two ints.

    Raises:
        GraphError: naming the layer, its module, its input shapes and its output shape.
    """
    rows = input_shapes[0][0]
    if len(output_shape) and output_shape[0] == rows:
        return
    got = "no batch dimension" if not len(output_shape) else _rows(output_shape[0])
    ins = ", ".join(str(tuple(s)) for s in input_shapes)
    raise GraphError(
        f"layer {node.name!r} ({node.module!r}) gives an output of shape "
        f"{tuple(output_shape)} for inputs of shape {ins}: {got} where its inputs have "
        f"{_rows(rows)}. A layer must keep the batch dimension (the first), one output row per "
        "input row: a minibatch is cut into microbatches along it and routers move rows by "
        "index. Reduce over the rows (a sum or mean over the batch) in a loss node, "
        "g.loss(...), instead"
    )


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


@dataclass(frozen=True)
class ParamShape:
    """A parameter array's shape and dtype, without its data (see :func:`validate`)."""

    shape: tuple[int, ...]
    dtype: Any


def _param_shape(leaf: Any) -> Any:
    return ParamShape(tuple(leaf.shape), leaf.dtype) if hasattr(leaf, "shape") else leaf


def _evaluate_node(
    node: Any, args: list[Any], dtype: str, param_shapes: dict[str, Any] | None = None
) -> Any:
    if node.kind == "layer":
        # a node placed on a worker is checked on the host: its GPU may be on another machine
        backend = get_backend("cpu" if node.worker is not None else node.device)
        params = node.module.init(0, backend=backend, dtype=dtype)
        if param_shapes is not None:
            param_shapes[node.name] = tree_map(_param_shape, params)
        with backend.activate():  # on the node's GPU, whichever device is current
            return node.module(params, *[backend.asarray(a) for a in args])
    return node.module({}, *args)


def _integer_hint(graph: Graph, node: Node, exc: Exception) -> str:
    """Where a node wants integers (class labels, token ids) and reads an input declared
    floating: says how to declare it (its data, integers, would pass as floats)."""
    floating = [
        src for src in node.inputs
        if graph.nodes[src].kind == "input" and np.dtype(graph.nodes[src].dtype).kind in "fb"
    ]  # fmt: skip
    if not isinstance(exc, TypeError) or "integer" not in str(exc) or not floating:
        return ""
    return (
        f"; input {floating[-1]!r} is declared {graph.nodes[floating[-1]].dtype}: if it holds "
        "integers, declare it so (g.input(name, shape, dtype='int64'), or "
        "Graph.sequential(..., input_dtype=... or label_dtype='int64'))"
    )


def _check_no_params(loss: Node, dtype: str) -> None:
    """A loss node is called with no parameters (``{}``) and trains none: refuses a loss module
    that has some (a layer's module given to ``g.loss``)."""
    init = getattr(loss.module, "init", None)
    try:
        params = init(0, dtype=dtype) if init is not None else {}  # None: a plain function
    except Exception:
        return  # calling it will tell
    if tree_leaves(params):
        raise GraphError(
            f"loss {loss.name!r}: its module {loss.module!r} has parameters, but a loss node "
            "trains none (it is called with {}); put that module in a layer, g.layer(name, "
            "module, ...), and give the loss its output"
        )


def _indices_hint(node: Any) -> str:
    """What to do where ``node``'s module (or one in its ``Sequential``) is a max pool with
    ``return_indices=True``: its pair (values, indices) is no layer's output (a direct call
    gives it, for a ``MaxUnpool``); empty otherwise."""
    module = node.module
    inner = getattr(module, "modules", None)
    for m in (module, *(inner if isinstance(inner, tuple) else ())):
        if getattr(m, "return_indices", False) is True:
            which = "it" if m is module else f"its {type(m).__name__}"
            return (
                f"; with return_indices=True {which} returns (values, indices), a pair: give "
                "return_indices=False in a graph (the indices are for a direct call, such as "
                "a MaxUnpool's)"
            )
    return ""
