"""numpy's moves of entries as differentiable ops: ``pad``, ``flip``, ``take_along_axis``,
``repeat`` and ``tile`` (torch's ``F.pad``, ``flip``, ``gather``, ``repeat_interleave`` and
``tile``), their gradients the sums over each entry's copies. Apart from :mod:`._ops`, whose
helpers they share, so that each module stays one subject."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncnn.backends import to_numpy

from ._autodiff import Tracer
from ._ops import (
    _P,
    _dtype,
    _shape,
    as_array,
    checked_axis,
    namespace_of,
    raw,
    reshape,
)
from ._ops_checks import index_guard
from ._rules_array import check_axis, normalize_axis

__all__ = ["flip", "pad", "repeat", "take_along_axis", "tile"]

# -- pad, flip, take_along_axis, repeat, tile: numpy's moves of entries ----------------------------
_PAD_MODES = ("constant", "edge", "reflect")


def pad(
    x: Any,
    pad_width: int | Sequence[int] | Sequence[Sequence[int]],
    mode: str = "constant",
    constant_values: Any = 0,
) -> Any:
    """``x`` padded: numpy's ``pad(x, pad_width, mode, constant_values=)``.

    ``pad_width`` as numpy takes it: an int (that many entries before and after every axis),
    one pair ``(before, after)`` for every axis, or a pair per axis,
    ``((before_0, after_0), (before_1, after_1), ...)``. ``mode`` is numpy's ``"constant"``
    (``constant_values``, a number cast to ``x``'s dtype, as numpy casts it), ``"edge"`` (the
    entry at the end repeated: torch's ``F.pad(x, p, "replicate")``) or ``"reflect"`` (the
    mirror about the end entry, which is not repeated: torch's ``F.pad(x, p, "reflect")``,
    here also past the axis' length, again and again, as numpy's). torch's ``F.pad`` pads the
    last axes, its widths the last axis' first: ``F.pad(x, (1, 2, 3, 4))`` is
    ``ops.pad(x, ((0, 0), ..., (3, 4), (1, 2)))``.

    The gradient is ``g``'s part at ``x``'s place for ``"constant"``; for ``"edge"`` and
    ``"reflect"``, each padded entry's cotangent is also added onto the entry it copies, as
    torch's. Those sums run in float32 for float16 and bfloat16 and round once.

    Raises:
        TypeError: a width that is no int, a ``constant_values`` that is no number (numpy's
            per-axis values: pad one axis at a time), or a traced one.
        ValueError: a negative width, widths that are not one pair per axis, a mode other
            than the three, ``constant_values`` with another mode, or ``"edge"`` or
            ``"reflect"`` padding an axis of length 0 (it has no entry to copy; numpy refuses
            it too).
    """
    x = as_array(x, "pad")
    shape = _shape(x)
    widths = _pad_widths(pad_width, shape)
    if not isinstance(mode, str) or mode not in _PAD_MODES:
        torch_s = {"replicate": ' (torch\'s "replicate" is numpy\'s "edge")'}.get(mode, "")
        raise ValueError(
            f"pad: mode must be one of {', '.join(map(repr, _PAD_MODES))}, got {mode!r}{torch_s}"
        )
    if type(constant_values) is Tracer:
        raise TypeError(
            "pad: constant_values is a traced array, and pad takes its value as a constant (its "
            "gradient would be lost); pass ops.raw(value) to pad with its value"
        )
    given = constant_values
    if hasattr(given, "shape") and type(given) is not np.ndarray:
        given = to_numpy(given)  # (a GPU number: read once, as numpy's pad reads it)
    if (
        isinstance(given, list | tuple)
        or np.ndim(given) != 0
        or np.asarray(given).dtype.kind not in "biuf"
    ):
        raise TypeError(
            f"pad: constant_values must be one number, got {constant_values!r}; for numpy's "
            "values per axis, pad one axis at a time (numpy pads the axes in order too)"
        )
    if mode != "constant":
        if np.asarray(given) != 0:
            raise ValueError(
                f"pad: constant_values is for mode='constant' only, got {constant_values!r} "
                f"with mode={mode!r} (numpy refuses it too)"
            )
        for axis, (n, (before, after)) in enumerate(zip(shape, widths, strict=True)):
            if n == 0 and (before or after):
                raise ValueError(
                    f"pad: mode={mode!r} cannot pad axis {axis} of x (shape {shape}), which has "
                    "length 0 and no entry to copy; pad it with mode='constant'"
                )
    # (the value in x's dtype first, as numpy casts it; a 16-bit x is padded in float32, see
    # the rule, which holds the rounded value exactly)
    dtype = _dtype(x)
    cast = np.asarray(given).astype(dtype)
    value = float(cast) if dtype.kind in "fV" else cast.item()
    return _P["pad"](x, widths=widths, mode=mode, value=value)


def _pad_widths(pad_width: Any, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """numpy's ``pad_width`` as one ``(before, after)`` pair of ints per axis of ``shape``."""
    given = raw(pad_width)
    try:
        widths = np.asarray(given)
    except ValueError:  # (ragged)
        widths = np.asarray(None)
    if widths.dtype.kind not in "iu" or (widths.size == 0 and len(shape)):
        raise TypeError(
            f"pad: pad_width must be ints, got {pad_width!r}: an int, a pair (before, after) "
            "or one pair per axis, e.g. ((1, 1), (0, 2))"
        )
    if (widths < 0).any():
        raise ValueError(f"pad: pad_width must not be negative, got {pad_width!r}")
    try:
        pairs = np.broadcast_to(widths, (len(shape), 2))
    except ValueError:
        raise ValueError(
            f"pad: pad_width {pad_width!r} is not an int, a pair or one pair per axis for x of "
            f"shape {shape} ({len(shape)} axes)"
        ) from None
    return tuple((int(b), int(a)) for b, a in pairs)


def flip(x: Any, axis: int | Sequence[int] | None = None) -> Any:
    """``x`` with the order of its entries along ``axis`` reversed: numpy's ``flip(x, axis)``
    (every axis by default), torch's ``flip(x, dims)``.

    The gradient is ``g`` flipped along the same axes.

    Raises:
        TypeError: an axis that is no int.
        ValueError: an axis out of range or named twice, naming the axis and ``x``'s shape.
    """
    x = as_array(x, "flip")
    return _P["flip"](x, axis=checked_axis(normalize_axis, axis, x, "flip"))


def take_along_axis(x: Any, indices: Any, axis: int | None) -> Any:
    """Entries of ``x`` at integer ``indices`` along ``axis``: numpy's
    ``take_along_axis(x, indices, axis)``, torch's ``gather(x, axis, indices)``.

    ``indices`` has as many axes as ``x``; along the others its lengths are ``x``'s or 1, and
    the two broadcast, as numpy's (torch's ``gather`` takes shorter ones instead, and no
    broadcast). ``out[i, j] = x[i, indices[i, j]]`` for ``axis=1`` of 2-d arrays. A negative
    index counts from the end, as numpy's (torch refuses one). ``axis=None`` takes from the
    flattened ``x`` with 1-d indices. Out-of-range indices are treated as in :func:`getitem`:
    refused on the host, NaN for GPU indices into a float ``x``.

    The gradient is ``g`` added into zeros of ``x``'s shape at the indices (repeated indices
    add up, in float32 for float16 and bfloat16); the indices get none.

    Raises:
        TypeError: indices that are not integers (floats, bools), or an axis that is no int.
        ValueError: indices of another number of axes than ``x`` (1-d for ``axis=None``), or
            of lengths that do not broadcast with ``x``'s; an axis out of range.
        IndexError: an index outside ``[-n, n)`` (host indices, or GPU ones into a non-float
            ``x``).
    """
    x = as_array(x, "take_along_axis")
    indices = raw(indices)
    if isinstance(indices, list | tuple):
        indices = np.asarray(indices)
        if indices.size == 0:
            indices = indices.astype(np.intp)  # (numpy makes [] float64)
    dtype = getattr(indices, "dtype", None)
    if dtype is None or dtype.kind not in "iu":
        raise TypeError(
            "take_along_axis: indices must be an array of integers, got "
            f"{'dtype ' + str(dtype) if dtype is not None else type(indices).__name__}; "
            "convert them first, e.g. indices.astype(np.int64)"
        )
    ishape = tuple(indices.shape)
    if axis is None:
        if len(ishape) != 1:
            raise ValueError(
                "take_along_axis: axis=None takes from the flattened x, with 1-d indices; got "
                f"indices of shape {ishape}"
            )
        x = reshape(x, -1)
        axis = 0
    axis = checked_axis(check_axis, axis, x, "take_along_axis")
    shape = _shape(x)
    if len(ishape) != len(shape):
        raise ValueError(
            f"take_along_axis: indices must have as many axes as x: x has shape {shape}, the "
            f"indices {ishape}; add axes of length 1 (indices[:, None]) to broadcast"
        )
    for d, (n, k) in enumerate(zip(shape, ishape, strict=True)):
        if d != axis and n != k and 1 not in (n, k):
            raise ValueError(
                f"take_along_axis: indices of shape {ishape} do not broadcast with x of shape "
                f"{shape} along axis {d} ({k} and {n}): along each axis but {axis} their "
                "lengths must be equal, or one of them 1"
            )
    guard = index_guard(raw(x), (slice(None),) * axis + (indices,), "take_along_axis")
    xp = namespace_of(x)
    index = tuple(
        xp.asarray(indices)
        if d == axis
        else xp.arange(n).reshape((1,) * d + (n,) + (1,) * (len(shape) - d - 1))
        for d, n in enumerate(shape)
    )
    return _P["take_along_axis"](x, idx=index, guard=guard)


def repeat(x: Any, repeats: Any, axis: int | None = None) -> Any:
    """Each entry of ``x`` repeated: numpy's ``repeat(x, repeats, axis)``, torch's
    ``repeat_interleave(x, repeats, dim)``. ``repeats`` is an int (every entry that many
    times) or a 1-d array of one count per entry along ``axis`` (or of one count). ``axis=None``
    (numpy's default; torch's too) repeats the entries of the flattened array.

    The gradient is the sum of each entry's copies' cotangents (0 for an entry repeated 0
    times), in float32 for float16 and bfloat16, rounded once.

    Raises:
        TypeError: repeats that are not integers, or an axis that is no int.
        ValueError: a negative count, counts that are not one per entry, or an axis out of
            range.
    """
    x = as_array(x, "repeat")
    shape = _shape(x)
    if axis is not None:
        axis = checked_axis(check_axis, axis, x, "repeat")
    n = math.prod(shape) if axis is None else shape[axis]
    counts = raw(repeats)
    if not isinstance(counts, int | np.integer | list | tuple | np.ndarray):
        counts = to_numpy(counts)  # (a GPU array: the result's shape needs its counts)
    counts = np.asarray(counts)
    if counts.size == 0 and counts.dtype.kind == "f":
        counts = counts.astype(np.intp)  # (numpy makes [] float64)
    if counts.dtype.kind not in "iu" or counts.ndim > 1:
        raise TypeError(
            f"repeat: repeats must be an int or a 1-d array of ints, got {repeats!r}; e.g. 3, "
            "or [2, 0, 1] for one count per entry"
        )
    if (counts < 0).any():
        raise ValueError(f"repeat: repeats must not be negative, got {repeats!r}")
    if counts.size == 1:
        return _P["repeat"](x, repeats=int(counts.reshape(())), axis=axis)
    if counts.size != n:
        where = "the flattened x" if axis is None else f"axis {axis} of x"
        raise ValueError(
            f"repeat: {counts.size} counts for {where} (shape {shape}), which has {n} entries: "
            "give one count per entry, or one int"
        )
    return _P["repeat"](x, repeats=counts.astype(np.int64), axis=axis)


def tile(x: Any, reps: int | Sequence[int]) -> Any:
    """``x`` repeated as tiles: numpy's ``tile(x, reps)``, torch's ``tile(x, reps)`` (and its
    ``x.repeat(*reps)`` where ``reps`` has as many entries as ``x`` has axes). With fewer
    entries than ``x`` has axes, ``reps`` is taken with 1s before them; with more, ``x`` with
    axes of length 1 before its own (both numpy's and torch's).

    The gradient is the sum over the tiles, in float32 for float16 and bfloat16, rounded once.

    Raises:
        TypeError: reps that are not ints.
        ValueError: a negative rep.
    """
    x = as_array(x, "tile")
    given = raw(reps)
    try:
        if isinstance(given, int | np.integer) and not isinstance(given, bool):
            counts: tuple[int, ...] = (operator.index(given),)
        else:
            counts = tuple(
                operator.index(r) for r in (given.tolist() if hasattr(given, "tolist") else given)
            )
            if any(isinstance(r, bool) for r in given):
                raise TypeError
    except TypeError:
        raise TypeError(
            f"tile: reps must be an int or a sequence of ints, got {reps!r}; e.g. (2, 1, 3)"
        ) from None
    if any(r < 0 for r in counts):
        raise ValueError(f"tile: reps must not be negative, got {reps!r}")
    ndim = len(_shape(x))
    return _P["tile"](x, reps=(1,) * (ndim - len(counts)) + counts)
