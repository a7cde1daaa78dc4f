"""Checks of what a user hands the Trainer, before any compute: labels against the loss's class
count and ids against an Embedding's table, the inputs ``predict`` and ``evaluate`` need (names,
shapes, dtypes), and parameters assigned to ``tr.params``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._math._data import has_numpy_dtype
from ._runtime._checks import check_input, check_ranges, range_checks, upstream
from ._runtime._graph import Graph
from .backends import is_floating, to_numpy

__all__ = ["check_inputs", "check_labels", "check_params", "needed_inputs", "require_inputs"]


def check_labels(
    graph: Graph,
    shapes: Mapping[str, tuple[int, ...]],
    data: Mapping[str, Any],
    targets: list[str] | None = None,
) -> None:
    """Checks the integer labels of each cross-entropy loss against its class count, and the
    ids that each layer starting with an Embedding reads from an input against its table (on a
    GPU an id out of range is not an error there: its row is NaN); only those the nodes
    ``targets`` need, where given. ``run.step`` checks each batch with the same helper
    (``check_ranges``), in the same words.

    Raises:
        ValueError: naming the input, the first bad row, its value and the valid range.
    """
    check_ranges(range_checks(graph, shapes, targets), data)


def needed_inputs(graph: Graph, targets: list[str]) -> list[str]:
    """The graph inputs that ``targets`` (node names) depend on, in the graph's input order."""
    seen = upstream(graph, targets)
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
