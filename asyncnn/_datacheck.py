"""Checks of what a user hands the Trainer, before any compute: labels against the loss's class
count, the inputs ``predict`` and ``evaluate`` need (names, shapes, dtypes), and parameters
assigned to ``tr.params``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._math._data import has_numpy_dtype
from ._runtime._checks import check_input, row_chunks
from ._runtime._graph import Graph
from .backends import is_floating, to_numpy

__all__ = ["check_inputs", "check_labels", "check_params", "needed_inputs", "require_inputs"]


def check_labels(
    graph: Graph, shapes: Mapping[str, tuple[int, ...]], data: Mapping[str, Any]
) -> None:
    """Checks the integer labels of each cross-entropy loss against its class count, and the
    ids that each layer starting with an Embedding reads from an input against its table (on a
    GPU an id out of range is not an error there: its row is NaN).

    Raises:
        ValueError: naming the input, the first bad row, its value and the valid range.
    """
    from ._math._nn import CrossEntropyLoss

    _check_ids(graph, data)

    for name in graph.losses:
        node = graph.nodes[name]
        if not isinstance(node.module, CrossEntropyLoss) or len(node.inputs) != 2:
            continue
        logits, labels = node.inputs
        if graph.nodes[labels].kind != "input" or labels not in data:
            continue
        shape = shapes.get(logits)
        if shape is None or len(shape) < 2:
            continue
        classes = int(shape[1])
        y = data[labels]  # (with a batch axis: a dataset's array)
        if np.dtype(y.dtype).kind not in "iu":
            continue
        found = _first_outside(y, classes)
        if found is not None:
            value, where = found
            raise ValueError(
                f"input {labels!r}: label {value} at {where} is out of range for loss "
                f"{name!r} ({type(node.module).__name__} over the {classes} classes of "
                f"{logits!r}): labels must be in 0..{classes - 1}"
            )


def _check_ids(graph: Graph, data: Mapping[str, Any]) -> None:
    """The ids of each input read by an Embedding against its table (see :func:`check_labels`)."""
    from ._math._nn._linear import first_embedding

    for name, node in graph.nodes.items():
        embedding = first_embedding(node.module) if node.kind == "layer" else None
        if embedding is None or not node.inputs or node.inputs[0] not in data:
            continue
        ids = data[node.inputs[0]]
        if graph.nodes[node.inputs[0]].kind != "input" or np.dtype(ids.dtype).kind not in "iu":
            continue  # (float ids: the graph's check has refused them)
        n = embedding.num_embeddings
        found = _first_outside(ids, n)
        if found is not None:
            value, where = found
            raise ValueError(
                f"input {node.inputs[0]!r}: id {value} at {where} is out of range for layer "
                f"{name!r} ({embedding!r}): ids must be in 0..{n - 1}; map them into that "
                "range, or make num_embeddings as large as the vocabulary"
            )


def _first_outside(values: Any, n: int) -> tuple[int, str] | None:
    """The first integer of ``values`` (a dataset's array, rows first) outside ``[0, n)`` and
    where it is (``"row 5"``, or ``"index (5, 2)"``), or None; read in chunks of rows, so the
    memory it takes is bounded whatever the size of ``values``."""
    for start, chunk in row_chunks(values):
        part = np.asarray(to_numpy(chunk))
        bad = (part < 0) | (part >= n)
        if not bad.any():
            continue
        index = np.unravel_index(int(np.argmax(bad)), part.shape)
        at = (start + int(index[0]), *(int(i) for i in index[1:]))
        return int(part[index]), (f"row {at[0]}" if len(at) == 1 else f"index {at}")
    return None


def needed_inputs(graph: Graph, targets: list[str]) -> list[str]:
    """The graph inputs that ``targets`` (node names) depend on, in the graph's input order."""
    seen: set[str] = set()
    stack = list(targets)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(graph.nodes[name].inputs)
    return [n for n in graph.inputs if n in seen]


def require_inputs(graph: Graph, data: Mapping[str, Any], targets: list[str], what: str) -> None:
    """Checks that ``data`` gives every input that ``targets`` need, and no input the graph
    lacks (names only).

    Raises:
        TypeError: ``data`` is not a dict (an array, or an ``(x, y)`` tuple as Keras takes),
            showing the dict to pass instead.
        ValueError: naming the missing inputs and what needs them, or the unknown ones.
    """
    need = needed_inputs(graph, targets)
    if not isinstance(data, Mapping):
        # (`name in array` compared elementwise: "the truth value of an array ... is ambiguous")
        fields = ", ".join(f"{n!r}: {n}" for n in need)
        raise TypeError(
            f"{what} takes a dict of arrays named like the graph's inputs, e.g. {{{fields}}}; "
            f"got {type(data).__name__}"
        )
    missing = [n for n in need if n not in data]
    if missing:
        raise ValueError(
            f"{what} needs the input{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)} (for {', '.join(repr(t) for t in targets)}); "
            f"the data gave {sorted(data)}"
        )
    unknown = [k for k in data if k not in graph.inputs]
    if unknown:
        raise ValueError(
            f"{what}: the data has {unknown}, which the graph has no input for ({graph.inputs})"
        )


def check_inputs(graph: Graph, data: Mapping[str, Any], targets: list[str], what: str) -> None:
    """Checks the shape and dtype of each input that ``targets`` need against the graph's
    declaration, and that there are rows (after :func:`require_inputs`, on arrays sharing their
    first dimension).

    Raises:
        ValueError: naming the input, the shape or dtype it has and the one declared.
    """
    rows = None
    for name in needed_inputs(graph, targets):
        rows = check_input(graph.nodes[name], data[name], f"{what}: ")[0]
    if rows == 0:
        raise ValueError(f"{what}: the data has 0 rows")


def check_params(name: str, current: Any, given: Any) -> None:
    """Checks ``given`` against a layer's ``current`` parameters: the same structure, the same
    array shapes, real numeric dtypes.

    Raises:
        ValueError: naming the layer, the place in its parameters and what differs.
    """
    _compare(name, current, given, "")


def _compare(layer: str, want: Any, got: Any, path: str) -> None:
    where = f"tr.params[{layer!r}]{path}"
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping):
            raise ValueError(
                f"{where} must be a dict with keys {sorted(want)}, got {type(got).__name__}"
            )
        if set(want) != set(got):
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            raise ValueError(
                f"{where} must have the keys {sorted(want)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        for k in want:
            _compare(layer, want[k], got[k], f"{path}[{k!r}]")
        return
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(want):
            n = len(got) if isinstance(got, list | tuple) else type(got).__name__
            raise ValueError(
                f"{where} must be a list of {len(want)} entries (one per module), got {n}"
            )
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            _compare(layer, w, g, f"{path}[{i}]")
        return
    if not (hasattr(want, "shape") and hasattr(want, "dtype")):
        return  # a scalar setting kept in the tree
    if not hasattr(got, "shape") or not has_numpy_dtype(got):
        try:  # a list, or an array of a dtype numpy does not know (a torch tensor's)
            got = np.asarray(to_numpy(got))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ValueError(
                f"{where} ({type(got).__name__}) cannot be read as an array: {exc}"
            ) from exc
    shape = tuple(got.shape)
    if shape != tuple(want.shape):
        raise ValueError(f"{where} has shape {shape}; the layer's is {tuple(want.shape)}")
    if not (np.dtype(got.dtype).kind in "iu" or is_floating(got.dtype)):
        raise ValueError(f"{where} has dtype {got.dtype}; parameters are real numbers (float)")
