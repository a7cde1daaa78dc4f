"""The checks of the ops' arguments against the shapes of their arrays, which turn a failure
into an error that names the op, the shapes and the fix: integer indices against their axes'
lengths, before an op reads them (on the host; for GPU indices, the places the rule guards
instead); and, once numpy has refused an op's arrays, whether their shapes are the reason
(shapes that do not broadcast, arrays to join that differ where they must agree). Apart from
``_ops.py``, whose ops call them, because none of it computes a value.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from asyncnn.backends import is_floating

__all__ = [
    "check_broadcast", "check_concatenated", "check_matmul_batch", "check_stacked",
    "index_guard", "is_integer",
]  # fmt: skip


def check_broadcast(op: str, shapes: list[tuple[int, ...]]) -> None:
    """Raises the error of elementwise op ``op`` whose arguments' ``shapes`` do not broadcast
    (returns where they do: the failure was another)."""
    try:
        np.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(
            f"{op}: shapes {' and '.join(map(str, shapes))} do not broadcast (aligned from "
            "the right, each pair of dimensions must be equal or one of them 1); reshape "
            "one of them, e.g. ops.expand_dims(b, -1) or ops.reshape(b, ...)"
        ) from None


def check_matmul_batch(sa: tuple[int, ...], sb: tuple[int, ...]) -> None:
    """Raises the error of ``matmul`` of shapes ``sa`` and ``sb`` whose batch dimensions do not
    broadcast (returns where they do)."""
    try:
        np.broadcast_shapes(sa[:-2], sb[:-2])
    except ValueError:
        raise ValueError(
            f"matmul: shapes {sa} and {sb} do not line up: their batch dimensions "
            f"{sa[:-2]} and {sb[:-2]} do not broadcast"
        ) from None


def check_concatenated(shapes: list[tuple[int, ...]], axis: int) -> None:
    """Raises the error of ``concatenate`` along ``axis`` of arrays of ``shapes`` that differ
    outside that axis (returns where they do not)."""
    rest = {(len(s), s[:axis] + s[axis + 1 :]) for s in shapes}
    if len(rest) != 1:
        raise ValueError(
            f"concatenate: shapes {', '.join(map(str, shapes))} differ outside axis {axis}: "
            "the arrays must have the same number of dimensions and the same lengths on every "
            "axis but the one they are joined along"
        ) from None


def check_stacked(shapes: list[tuple[int, ...]]) -> None:
    """Raises the error of ``stack`` of arrays of ``shapes`` that differ (returns where they are
    one shape)."""
    if len(set(shapes)) != 1:
        raise ValueError(
            f"stack: shapes {', '.join(map(str, shapes))} differ: stacked arrays must all have "
            "one shape (ops.concatenate joins arrays along an existing axis)"
        ) from None


def index_guard(x: Any, index: Any, op: str = "getitem") -> tuple[tuple[int, int], ...]:
    """Checks the integer parts of ``index`` into ``x`` that can be checked without a round trip
    to the GPU, and returns the (place in the index, axis) of the GPU integer arrays to guard
    instead (empty when none: an index of another kind is left to the array library).

    Raises:
        IndexError: an index outside ``[-n, n)`` for its axis of length ``n``.
    """
    items = index if isinstance(index, tuple) else (index,)
    # (a list as an array, once: the index itself keeps its list)
    items = tuple(np.asarray(i) if isinstance(i, list) else i for i in items)
    if all(i is None or i is Ellipsis or isinstance(i, slice) for i in items):
        return ()  # (slices: nothing to check, and the common case)
    # (_ops_nn imports _ops, which imports this module; looked up per call, as tests patch it)
    from . import _ops_nn

    shape = tuple(getattr(x, "shape", ()))
    widths = [_index_width(i) for i in items]
    used = sum(widths)
    if used > len(shape) or [i is Ellipsis for i in items].count(True) > 1:
        return ()  # the array library says what is wrong
    floating = is_floating(getattr(x, "dtype", None))
    guard = []
    axis = 0
    for place, (item, width) in enumerate(zip(items, widths, strict=True)):
        if item is Ellipsis:
            axis += len(shape) - used
            continue
        if width == 1 and is_integer(item):
            n = shape[axis]
            if isinstance(item, int):
                bounds: tuple[int, ...] = (item,)
            elif not _ops_nn.ids_on_host(item) and floating:
                guard.append((place, axis))
                bounds = ()
            else:  # host indices, or GPU ones into a non-float x (read in one copy)
                bounds = _ops_nn.id_range(item) if item.size else ()
            for v in bounds:
                if not -n <= v < n:
                    raise IndexError(
                        f"{op}: index {v} is out of bounds for axis {axis} with size {n} (x of "
                        f"shape {shape}); valid indices are {-n} to {n - 1} (negative ones count "
                        "from the end)"
                    )
        axis += width
    return tuple(guard)


def _index_width(item: Any) -> int:
    """How many axes of the indexed array ``item`` of an index uses."""
    if item is None or item is Ellipsis or isinstance(item, bool):
        return 0
    kind = getattr(getattr(item, "dtype", None), "kind", None)
    return item.ndim if kind == "b" else 1


def is_integer(item: Any) -> bool:
    """Whether ``item`` of an index is an integer or an array (or list) of integers."""
    if isinstance(item, bool):
        return False
    if isinstance(item, int):
        return True
    return getattr(getattr(item, "dtype", None), "kind", None) in ("i", "u")
