"""How a :class:`~asyncnn.backends.ComputeTeam` cuts one computation into parts: a product along
an output dimension (:func:`split_matmul`), an elementwise pass by rows of its result
(:func:`split_elementwise`), a column sum by columns (:func:`split_sum_rows`). Each part writes
its own piece of the result; the team's :meth:`~asyncnn.backends.ComputeTeam.run_parts` runs
them. Apart from ``_parallel.py``, the team's threads and queues, because these read only what
the team shows (its size, plan, part sizes, whether it is open and splits) and the shapes: the
methods of the same names there call them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ._blas import ALIGN, _has_own_transpose, _no_one_wide_tail, _product_plan, split_bounds

if TYPE_CHECKING:
    from ._parallel import ComputeTeam

__all__ = ["split_elementwise", "split_matmul", "split_sum_rows"]

_BLAS_KINDS = frozenset("fc")  # float32/64, complex64/128: the dtypes numpy hands to BLAS
#: arguments of an elementwise pass that go whole to every part besides numpy arrays
_SCALARS = (int, float, complex, np.generic)
#: operators whose numpy ufunc writes a part in place (no temporary)
_UFUNCS: dict[Any, np.ufunc] = {
    operator.add: np.add,
    operator.sub: np.subtract,
    operator.mul: np.multiply,
    operator.truediv: np.true_divide,
}


def split_matmul(
    team: ComputeTeam, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """:meth:`ComputeTeam.matmul`: ``a @ b``, a large 2-D float product cut along its larger
    output dimension by the team's plan (see there)."""
    if (
        a.ndim != 2
        or b.ndim != 2
        or a.dtype != b.dtype
        or a.shape[1] != b.shape[0]
        or not team.is_open
        or not team.splits_work
    ):
        return a @ b
    if a.dtype.kind not in _BLAS_KINDS or not a.dtype.isnative:
        if a.dtype.name == "bfloat16":
            # (ml_dtypes) numpy multiplies it in float32, as this split does; the result is
            # float32, which matmul() rounds back
            return team.matmul(a.astype(np.float32), b.astype(np.float32))
        return a @ b
    m, k = a.shape
    n = b.shape[1]
    axis, bounds = _product_plan(m, n, k, team.plan_workers, team.part_flops)
    if len(bounds) <= 2 or _has_own_transpose(a, b, axis, bounds):
        return a @ b
    out = np.empty((m, n), dtype=a.dtype)
    mm = np.matmul
    if axis == 0:

        def part(i: int) -> None:
            lo, hi = bounds[i], bounds[i + 1]
            mm(a[lo:hi], b, out=out[lo:hi])

    else:

        def part(i: int) -> None:
            lo, hi = bounds[i], bounds[i + 1]
            mm(a, b[:, lo:hi], out=out[:, lo:hi])

    team.run_parts(part, len(bounds) - 1)
    return out


def split_elementwise(team: ComputeTeam, fn: Callable[..., Any], *args: Any) -> Any:
    """:meth:`ComputeTeam.elementwise`: ``fn(*args)``, cut by rows of the result where the
    numpy arrays among ``args`` are large (see there)."""
    ndim = 0
    touched = 0
    for x in args:
        if type(x) is np.ndarray:
            ndim = max(ndim, x.ndim)
            touched += x.size
        elif not isinstance(x, _SCALARS):
            # another library's array, an ndarray subclass, or a nested list: its rows are
            # not this team's to cut (a list given whole to every part would not broadcast)
            return fn(*args)
    if ndim == 0 or touched < 2 * team.part_elements:
        return fn(*args)
    rows = 0
    lead = []
    for x in args:
        full = type(x) is np.ndarray and x.ndim == ndim and x.shape[0] > 1
        lead.append(full)
        if full:
            rows = max(rows, x.shape[0])
    if rows < 2 or any(f and x.shape[0] != rows for f, x in zip(lead, args, strict=True)):
        return fn(*args)  # an error for fn to raise, with numpy's own message
    bounds = team.row_bounds(rows, touched)
    if len(bounds) <= 2:
        return fn(*args)
    probe = fn(*(x[:0] if f else x for f, x in zip(lead, args, strict=True)))
    if type(probe) is not np.ndarray or probe.ndim != ndim:
        return fn(*args)
    out = np.empty((rows, *probe.shape[1:]), dtype=probe.dtype)
    fn = _UFUNCS.get(fn, fn)
    in_place = isinstance(fn, np.ufunc) and fn.nout == 1

    def part(i: int) -> None:
        lo, hi = bounds[i], bounds[i + 1]
        piece = [x[lo:hi] if f else x for f, x in zip(lead, args, strict=True)]
        if in_place:
            fn(*piece, out=out[lo:hi])
        else:
            out[lo:hi] = fn(*piece)

    team.run_parts(part, len(bounds) - 1)
    return out


def split_sum_rows(team: ComputeTeam, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """:meth:`ComputeTeam.sum_rows`: ``x.sum(axis=0)`` of a 2-D array, cut by columns when
    large, each column summed in the uncut call's order."""
    cols = x.shape[1]
    # integers and bools sum into a wider dtype; a byte-swapped array into a native one
    if x.dtype.kind not in _BLAS_KINDS or not x.dtype.isnative:
        return x.sum(axis=0)
    parts = len(team.row_bounds(cols, x.size)) - 1
    bounds = _no_one_wide_tail(split_bounds(cols, parts, ALIGN))
    if len(bounds) <= 2:
        return x.sum(axis=0)
    out = np.empty(cols, dtype=x.dtype)

    def part(i: int) -> None:
        lo, hi = bounds[i], bounds[i + 1]
        np.sum(x[:, lo:hi], axis=0, out=out[lo:hi])

    team.run_parts(part, len(bounds) - 1)
    return out
