"""Checks of what a user hands the Trainer, before any compute: labels against the loss's class
count and ids against an Embedding's table, the inputs ``predict`` and ``evaluate`` need (names,
shapes, dtypes), and parameters assigned to ``tr.params`` (``check_params``, the runtime's, which
checks a run's ``state`` too)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._runtime._checks import (
    check_input,
    check_ranges,
    overflow_cast,
    overflow_error,
    range_checks,
    upstream,
)
from ._runtime._graph import Graph
from ._runtime._param_checks import check_params

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
        # each missing input with what reads it, by the names the caller chose (a predict's
        # output names): listing every target blamed outputs that do not read it
        named = {src: name for name, src in graph.outputs.items()}
        why = []
        for m in missing:
            readers = [t for t in targets if m in upstream(graph, [t])]
            said = ", ".join(f"output {named[t]!r}" if t in named else repr(t) for t in readers)
            why.append(f"{m!r} (for {said})")
        raise ValueError(
            f"{what} needs the input{'s' if len(missing) > 1 else ''} {', '.join(why)}; "
            f"the data gave {sorted(data, key=str)}"
        )
    unknown = [k for k in data if k not in graph.inputs]
    if unknown:
        raise ValueError(
            f"{what}: the data has {unknown}, which the graph has no input for ({graph.inputs})"
        )


def check_inputs(
    graph: Graph, data: Mapping[str, Any], targets: list[str], what: str, dtype: Any = None
) -> None:
    """Checks the shape and dtype of each input that ``targets`` need against the graph's
    declaration, and that there are rows (after :func:`require_inputs`, on arrays sharing their
    first dimension); where ``dtype`` (the run's) is given, that no finite value of a float
    input overflows it (1e39 in float64 data of a float32 run would be computed on as Inf,
    its outputs finite-looking; a NaN or Inf in the data itself is left alone: it is computed
    on as given). Data of the run's dtype, or narrower, is not read for it.

    Raises:
        ValueError: naming the input, the shape or dtype it has and the one declared; or the
            input, the row and the value that overflows ``dtype``.
    """
    rows = None
    needed = needed_inputs(graph, targets)
    for name in needed:
        rows = check_input(graph.nodes[name], data[name], f"{what}: ")[0]
    if rows == 0:
        raise ValueError(f"{what}: the data has 0 rows")
    for name in needed:
        cast = overflow_cast(graph.nodes[name], data[name], dtype)
        said = None if cast is None else overflow_error(name, data[name], cast)
        if said is not None:
            raise ValueError(f"{what}: {said}")
