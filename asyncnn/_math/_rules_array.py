"""Forward and VJP rules of reductions, shape changes, indexing and matrix products."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

from asyncnn.backends import acc_mean, acc_sum, batched_product, is_half, scatter_add
from asyncnn.backends import array_namespace as ns
from asyncnn.backends import matmul as backend_matmul

from ._autodiff import Forward, VjpRule
from ._rules_elementwise import _bf16_in_float32, unbroadcast


def normalize_axis(axis: Any, ndim: int, op: str = "") -> tuple[int, ...]:
    """``axis`` (None, an int or a sequence of ints) as a sorted tuple of non-negative axes.

    Raises:
        TypeError: when an axis is not an integer (numpy integers are).
        ValueError: when an axis is out of range; the message names ``op`` when given.
    """
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple | list) else (axis,)
    out = [check_axis(a, ndim, op) for a in axes]
    if len(set(out)) != len(out):  # as numpy: (0, 0) or (1, -1) is a mistake, not one axis
        raise ValueError(f"{op + ': ' if op else ''}axis {tuple(axes)} names an axis twice")
    return tuple(sorted(out))


def check_axis(axis: Any, ndim: int, op: str = "") -> int:
    """One ``axis`` of an array of ``ndim`` dimensions, made non-negative.

    Raises:
        TypeError: when ``axis`` is not an integer (numpy integers are).
        ValueError: when ``axis`` is outside ``[-ndim, ndim)``: never a silent wrap-around.
    """
    prefix = f"{op}: " if op else ""
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(f"{prefix}axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        if ndim == 0:  # ("valid: 0 to -1" said nothing)
            raise ValueError(
                f"{prefix}axis {axis}: the array is 0-d (a scalar), which has no axis; give it "
                "one first (x.reshape(1) or x[None])"
            )
        raise ValueError(
            f"{prefix}axis {axis} is out of range for an array of {ndim} dimensions "
            f"(valid: {-ndim} to {ndim - 1})"
        )
    return int(axis) % ndim


def _keepdims_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in axes else s for i, s in enumerate(shape))


def _sum(x: Any, axis: tuple[int, ...], keepdims: bool) -> tuple[Any, Any]:
    return acc_sum(x, axis, keepdims), (x.shape, axis)


def _sum_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    shape, axes = res
    return (ns(g).broadcast_to(g.reshape(_keepdims_shape(shape, axes)), shape),)


def _mean(x: Any, axis: tuple[int, ...], keepdims: bool) -> tuple[Any, Any]:
    return acc_mean(x, axis, keepdims), (x.shape, axis)


def divided_by_count(g: Any, count: int) -> Any:
    """``g / count`` in ``g``'s dtype: a mean's cotangent shared among its ``count`` entries.

    A 16-bit ``g`` is divided in float32 and rounded once: numpy (NEP 50) casts the int to
    ``g``'s dtype, where float16 holds no count past 65504 (the gradient of a mean over 100,352
    entries was exactly 0) and rounds those past 2048 (3001 to 3000; bfloat16 past 256).
    Other dtypes divide as they did (a float32 gradient is bit for bit the same).
    """
    if is_half(g.dtype):
        return (g.astype(np.float32) / count).astype(g.dtype)
    return g / count


def _mean_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    shape, axes = res
    count = 1
    for a in axes:
        count *= shape[a]
    if count:  # else x is empty, and so is its gradient: no 0/0 warning for nothing
        g = divided_by_count(g, count)
    return (ns(g).broadcast_to(g.reshape(_keepdims_shape(shape, axes)), shape),)


def _quiet_division(xp: Any) -> Any:
    """Silences numpy's words on a division by 0: a variance over no degrees of freedom is inf
    (NaN for a constant group), as numpy's and torch's, whose op warned once already."""
    if xp.__name__ == "numpy":
        return xp.errstate(divide="ignore", invalid="ignore")
    return contextlib.nullcontext()


def _dropped(out: Any, axes: tuple[int, ...], keepdims: bool) -> Any:
    """A reduction's ``keepdims=True`` result ``out`` without the ``axes`` unless ``keepdims``."""
    if keepdims:
        return out
    return out.reshape(tuple(s for i, s in enumerate(out.shape) if i not in axes))


def _variance(x: Any, axis: tuple[int, ...], ddof: float) -> tuple[Any, Any, float]:
    """``(var, mean, n - ddof)`` over ``axis``, both kept as length-1 axes: the sum of squared
    deviations from the mean over ``max(n - ddof, 0)``, as numpy's two passes. The gradients
    divide by ``n - ddof`` itself, as torch's with a dim do (negative past the count)."""
    xp = ns(x)
    n = math.prod(x.shape[a] for a in axis)
    # (an empty group has no mean: numpy's mean of nothing warns; its variance is 0/0 anyway)
    mu = (
        x.mean(axis=axis, keepdims=True) if n else xp.zeros(_keepdims_shape(x.shape, axis), x.dtype)
    )
    xc = x - mu
    with _quiet_division(xp):  # (a Python float divides: it keeps a float32 sum float32)
        var = (xc * xc).sum(axis=axis, keepdims=True) / max(n - ddof, 0.0)
    return var, mu, n - ddof


def _var(x: Any, axis: tuple[int, ...], ddof: float, keepdims: bool) -> tuple[Any, Any]:
    var, mu, dof = _variance(x, axis, ddof)
    return _dropped(var, axis, keepdims), (x, mu, dof, axis)


def _var_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    # torch's 2 * g * (x - mean) / dof, dof = n - ddof: where ddof == n ±inf, NaN at the
    # mean; past n finite, of the other sign (torch.var(x, dim, correction=) does not clamp
    # dof, where its value does; its form without a dim gives g * inf instead, see ops.var)
    x, mu, dof, axes = res
    g = g.reshape(_keepdims_shape(x.shape, axes))
    with _quiet_division(ns(x)):
        return ((x - mu) * (g * (2.0 / dof if dof else math.inf)),)


def _std(x: Any, axis: tuple[int, ...], ddof: float, keepdims: bool) -> tuple[Any, Any]:
    var, mu, dof = _variance(x, axis, ddof)
    out = ns(x).sqrt(var)
    return _dropped(out, axis, keepdims), (x, mu, dof, axis, out)


def _std_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    # the variance's gradient times g / (2 * std), which torch sets to 0 where the std is 0 (a
    # constant group: no direction changes it to first order), where sqrt's rule gives 0/0.
    # Past the count (ddof > n) the std is inf and the share 0: a gradient of 0, as torch's
    x, mu, dof, axes, out = res
    xp = ns(x)
    g = g.reshape(out.shape)
    zero = out == 0
    share = xp.where(zero, xp.zeros((), out.dtype), g / xp.where(zero, xp.ones((), out.dtype), out))
    with _quiet_division(xp):
        return ((x - mu) * (share * (1.0 / dof if dof else math.inf)),)


def _numpy_s_integer(x: Any) -> Any:
    """The dtype numpy sums and multiplies a small integer or bool ``x`` in (int64, uint64 for
    unsigned ones), named: cupy's need not be numpy's; None for any other ``x``."""
    if x.dtype.kind in "biu" and x.dtype.itemsize < 8:
        return np.uint64 if x.dtype.kind == "u" else np.int64
    return None


def _cumsum(x: Any, axis: int | None) -> tuple[Any, Any]:
    # (axis None: numpy's, over the flattened array. A 16-bit x arrives in float32, see RULES)
    return ns(x).cumsum(x, axis=axis, dtype=_numpy_s_integer(x)), (x.shape, axis)


def _cumsum_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    # each entry reaches the sums from its own on: the cotangent's sums from the end
    shape, axis = res
    xp = ns(g)
    along = 0 if axis is None else axis  # (flattened: g is 1-d, reshaped back)
    return (xp.flip(xp.cumsum(xp.flip(g, along), axis=along), along).reshape(shape),)


def _prod(x: Any, axis: tuple[int, ...], keepdims: bool) -> tuple[Any, Any]:
    # (a 16-bit x arrives in float32, see RULES)
    out = ns(x).prod(x, axis=axis, dtype=_numpy_s_integer(x), keepdims=keepdims)
    return out, (x, axis, out)


def _quiet_products(xp: Any) -> Any:
    """Silences numpy's words on products that overflow, underflow or meet a 0 or inf: the
    rules below compute each way for every row and keep the one that row takes (torch's
    backward warns of none of them)."""
    if xp.__name__ == "numpy":
        return xp.errstate(all="ignore")
    return contextlib.nullcontext()


def _wide(dtype: Any) -> Any:
    """The dtype to run a scan of products of ``dtype`` in: float64 for float32 (whose running
    products overflow where the answer does not), else ``dtype`` itself."""
    return np.float64 if dtype == np.float32 else dtype


def _others_products(v: Any) -> Any:
    """For each entry of ``v`` along its last axis, the product of the others: the products
    before it times those after it, with no division (for the rows no division suits: a
    product that underflowed to 0, or is inf or NaN). The mantissas and the exponents apart
    (``v = m * 2**e``): the products of the mantissas, each in [0.5, 1), stay in range for rows
    of about a thousand entries, where the products before an entry could underflow and those
    after it overflow (0 * inf); the exponents add up exactly."""
    xp = ns(v)
    m, e = xp.frexp(v)
    ones = xp.ones((*v.shape[:-1], 1), dtype=v.dtype)
    before = xp.cumprod(xp.concatenate([ones, m[..., :-1]], axis=-1), axis=-1)
    after = xp.flip(xp.cumprod(xp.flip(xp.concatenate([m[..., 1:], ones], axis=-1), -1), -1), -1)
    e = e.astype(np.int32, copy=False)
    return xp.ldexp(before * after, e.sum(axis=-1, keepdims=True, dtype=np.int32) - e)


def _prod_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    # Each entry's gradient is g times the product of the others in its group. A group with no
    # 0 and a finite, nonzero product: torch's g * (out / x), to its bits (the running
    # products from either end overflowed where the product did not). One 0: the 0's entry
    # gets g times the product of the others (the 0 replaced by 1), the others 0; several: all
    # 0 (where out / x was 0/0). A product that underflowed to 0 (or is inf or NaN): the
    # products before each entry times those after it, which keep [1e-200, 1e-200, 1e200]'s 1
    x, axes, out = res
    xp = ns(x)
    if x.size == 0:
        return (xp.zeros(x.shape, dtype=g.dtype),)
    kept = [i for i in range(x.ndim) if i not in axes]
    order = kept + list(axes)  # the reduced axes last, merged into one
    n = math.prod(x.shape[a] for a in axes)
    v = xp.transpose(x, order).reshape((-1, n))  # one group a row
    g1 = g.reshape((-1, 1))
    out1 = out.reshape((-1, 1))
    zero = v == 0
    zeros = zero.sum(axis=-1, keepdims=True)
    divides = (zeros == 0) & xp.isfinite(out1) & (out1 != 0)
    with _quiet_products(xp):
        divided = g1 * (out1 / xp.where(divides, v, xp.ones((), v.dtype)))
        wide = _wide(v.dtype)
        rest = xp.where(zero, xp.ones((), wide), v.astype(wide)).prod(axis=-1, keepdims=True)
        at_zero = xp.where(zero & (zeros == 1), g1 * rest.astype(v.dtype), xp.zeros((), v.dtype))
    grad = xp.where(divides, divided, at_zero)
    left = xp.nonzero(((zeros == 0) & ~divides)[:, 0])[0]
    if left.size:  # (no 0, but the product underflowed to 0 or is inf or NaN)
        with _quiet_products(xp):
            others = _others_products(v[left].astype(_wide(v.dtype))).astype(v.dtype)
            grad[left] = g1[left] * others
    inverse = [0] * x.ndim
    for i, a in enumerate(order):
        inverse[a] = i
    return (xp.transpose(grad.reshape(tuple(x.shape[a] for a in order)), inverse),)


def _cumprod(x: Any, axis: int | None) -> tuple[Any, Any]:
    # (axis None: numpy's, over the flattened array. A 16-bit x arrives in float32, see RULES)
    out = ns(x).cumprod(x, axis=axis, dtype=_numpy_s_integer(x))
    return out, (x, axis, out)


def _cumprod_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    # The gradient of entry i is sum over j >= i of g[j] times the product of entries 0..j but
    # i. A row with no 0 and every running product finite and nonzero: torch's reversed
    # running sum of g * out divided by x (the sum in float64 for float32, as torch's CPU
    # cumsum), to its bits. Other rows (a 0, where that divides 0 by 0; a running product
    # that under- or overflowed) never divide: the product of those before i, E[i], times
    # S[i] = g[i] + x[i+1] * S[i+1], a scan of (multiplier, addend) pairs from the end in
    # log2(n) rounds, each over the whole array (a loop over the axis would be n rounds), in
    # float64 for float32 (its unscaled S overflowed where E[i] * S[i] did not)
    x, axis, out = res
    xp = ns(x)
    along = 0 if axis is None else axis  # (flattened: g is 1-d)
    v = xp.moveaxis(x.reshape(-1) if axis is None else x, along, -1)
    n = v.shape[-1]
    if n <= 1:  # (each entry's gradient is its g, as torch's: x * g / x need not be g)
        return (xp.zeros(x.shape, dtype=g.dtype) if n == 0 else g.reshape(x.shape),)
    lead = v.shape[:-1]
    v = v.reshape((-1, n))  # one row a scan
    o = xp.moveaxis(out.reshape(-1) if axis is None else out, along, -1).reshape((-1, n))
    gr = xp.moveaxis(g, along, -1).reshape((-1, n))
    wide = _wide(v.dtype)
    fine = xp.all((v != 0) & xp.isfinite(o) & (o != 0), axis=-1, keepdims=True)
    with _quiet_products(xp):
        w = (gr * o).astype(wide)
        tails = xp.flip(xp.cumsum(xp.flip(w, -1), axis=-1), -1).astype(v.dtype)
        grad = tails / xp.where(fine, v, xp.ones((), v.dtype))
    # (an entry whose division overflowed takes the scan's, where that stays finite)
    left = xp.nonzero(~(fine & xp.isfinite(grad)).all(axis=-1))[0]
    if left.size:
        vl = v[left]
        with _quiet_products(xp):
            scan = _cumprod_scan(vl.astype(wide), gr[left].astype(wide)).astype(grad.dtype)
            divided = tails[left] / xp.where(vl != 0, vl, xp.ones((), vl.dtype))
        # the division where it is finite: in a row with no 0 (the scan's where that one
        # overflowed), and elsewhere where the scan is not finite (its products before an entry
        # underflowed to 0 and its sums after it overflowed: 0 * inf), torch's answer there
        use = xp.isfinite(divided) & (vl != 0) & (fine[left] | ~xp.isfinite(scan))
        grad[left] = xp.where(use, divided, scan)
    return (xp.moveaxis(grad.reshape((*lead, n)), -1, along).reshape(x.shape),)


def _cumprod_scan(v: Any, g: Any) -> Any:
    """The gradient of each row's running product of ``v`` (rows of 2 entries or more), with
    no division: E[i] * S[i] as :func:`_cumprod_vjp` says."""
    xp = ns(v)
    n = v.shape[-1]
    edge = xp.zeros((*v.shape[:-1], 1), dtype=v.dtype)
    # S[i] = add[i] + mul[i] * S[i + step], S past the end 0 (so mul there is 0)
    mul = xp.concatenate([v[..., 1:], edge], axis=-1)
    add = g
    step = 1
    while step < n:
        add_next = add.copy()
        add_next[..., :-step] += mul[..., :-step] * add[..., step:]
        mul_next = xp.zeros_like(mul)
        mul_next[..., :-step] = mul[..., :-step] * mul[..., step:]
        add, mul, step = add_next, mul_next, 2 * step
    before = xp.cumprod(xp.concatenate([edge + 1, v[..., :-1]], axis=-1), axis=-1)
    return before * add


# -- pad, flip, repeat, tile: values moved, their gradients the sums over each entry's copies ------
def _pad_places(n: int, before: int, after: int, mode: str) -> Any:
    """The entry of an axis of length ``n`` (``n > 0``) each place of its padded copy holds,
    numpy's ``edge`` and ``reflect``: the nearest end, or the mirror about the ends (again and
    again past ``n``: a period of ``2 * (n - 1)``; an axis of length 1 repeats its entry)."""
    j = np.arange(-before, n + after)
    if mode == "edge" or n == 1:
        return np.clip(j, 0, n - 1)
    m = j % (2 * (n - 1))
    return np.where(m < n, m, 2 * (n - 1) - m)


def _pad(x: Any, widths: tuple[tuple[int, int], ...], mode: str, value: Any) -> tuple[Any, Any]:
    # (a 16-bit x arrives in float32, see RULES; value is a number x's dtype holds exactly)
    xp = ns(x)
    if mode == "constant":
        shape = tuple(s + b + a for s, (b, a) in zip(x.shape, widths, strict=True))
        out = xp.full(shape, value, dtype=x.dtype)
        out[tuple(slice(b, b + s) for s, (b, _) in zip(x.shape, widths, strict=True))] = x
        return out, (x.shape, widths, None)
    # edge and reflect: each padded axis gathers its places, one axis after another (numpy's
    # order; the places of the axes are independent, so any order gives the same array)
    places = []
    for axis, (before, after) in enumerate(widths):
        if before or after:
            at = xp.asarray(_pad_places(x.shape[axis], before, after, mode))
            places.append((axis, at))
            x = xp.take(x, at, axis=axis)
    return x, (None, widths, places)


def _pad_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    shape, widths, places = res
    if places is None:  # constant: x's own place in the padded array
        return (g[tuple(slice(b, b + s) for s, (b, _) in zip(shape, widths, strict=True))],)
    # each copy's cotangent added back onto the entry it copies, the axes in reverse order
    # (a 16-bit g arrives in float32, see RULES: the sums round once)
    xp = ns(g)
    for axis, at in reversed(places):
        n = g.shape[axis] - widths[axis][0] - widths[axis][1]
        out = xp.zeros((*g.shape[:axis], n, *g.shape[axis + 1 :]), dtype=g.dtype)
        scatter_add(xp.moveaxis(out, axis, 0), at, xp.moveaxis(g, axis, 0))
        g = out
    return (g,)


def _flip(x: Any, axis: tuple[int, ...]) -> tuple[Any, Any]:
    index = tuple(slice(None, None, -1) if i in axis else slice(None) for i in range(x.ndim))
    return x[index], index


def _flip_vjp(g: Any, index: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g[index],)


def _repeat(x: Any, repeats: Any, axis: int | None) -> tuple[Any, Any]:
    """``repeat(x, repeats, axis)``: ``repeats`` an int, or a numpy array of one count per
    entry along ``axis`` (cupy's repeat takes no array: a list of them)."""
    # (axis None: numpy's, over the flattened array. A 16-bit x arrives in float32, see RULES)
    counts = repeats if isinstance(repeats, int) else repeats.tolist()
    out = ns(x).repeat(x, counts, axis=axis)
    return out, (x.shape, repeats, axis)


def _repeat_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    # the sum of each entry's copies: a reshape and a sum for one count, else a scatter-add
    # of each copy's cotangent onto its entry (none to an entry of count 0)
    shape, repeats, axis = res
    xp = ns(g)
    along = 0 if axis is None else axis  # (flattened: g is 1-d, reshaped back)
    n = math.prod(shape) if axis is None else shape[axis]
    if isinstance(repeats, int):
        split = (*g.shape[:along], n, repeats, *g.shape[along + 1 :])
        return (g.reshape(split).sum(axis=along + 1).reshape(shape),)
    out = xp.zeros((*g.shape[:along], n, *g.shape[along + 1 :]), dtype=g.dtype)
    owners = xp.asarray(np.repeat(np.arange(n), repeats))
    scatter_add(xp.moveaxis(out, along, 0), owners, xp.moveaxis(g, along, 0))
    return (out.reshape(shape),)


def _tile(x: Any, reps: tuple[int, ...]) -> tuple[Any, Any]:
    # (reps has as many entries as x has axes or more, numpy's: see ops.tile. A 16-bit x
    # arrives in float32, see RULES)
    return ns(x).tile(x, reps), (x.shape, reps)


def _tile_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    # the sum over the tiles: g as (reps_0, size_0, reps_1, size_1, ...), summed over the reps
    shape, reps = res
    sizes = (1,) * (len(reps) - len(shape)) + tuple(shape)
    split = tuple(v for pair in zip(reps, sizes, strict=True) for v in pair)
    return (g.reshape(split).sum(axis=tuple(range(0, len(split), 2))).reshape(shape),)


def _extreme(x: Any, axis: tuple[int, ...], keepdims: bool, which: str) -> tuple[Any, Any]:
    out = getattr(x, which)(axis=axis, keepdims=True)
    res = (x, out, axis)
    return (
        out
        if keepdims
        else out.reshape(tuple(out.shape[i] for i in range(x.ndim) if i not in axis))
    ), res


def _max(x: Any, axis: tuple[int, ...], keepdims: bool) -> tuple[Any, Any]:
    return _extreme(x, axis, keepdims, "max")


def _min(x: Any, axis: tuple[int, ...], keepdims: bool) -> tuple[Any, Any]:
    return _extreme(x, axis, keepdims, "min")


def _extreme_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    # Ties share the gradient equally (like torch.amax), so the rule is symmetric and exact.
    x, out, axes = res
    mask = (x == out).astype(g.dtype)
    with np.errstate(invalid="ignore"):  # a NaN's group has no match: 0/0, NaN as in torch
        mask /= mask.sum(axis=axes, keepdims=True)
        grad = mask * g.reshape(out.shape)
    # the others get 0 whatever g, as torch's max and min select (0 times an infinite g is NaN)
    xp = ns(grad)
    return (xp.where(mask == 0, xp.zeros((), grad.dtype), grad).astype(grad.dtype, copy=False),)


def _reshape(x: Any, shape: tuple[int, ...]) -> tuple[Any, Any]:
    return x.reshape(shape), x.shape


def _reshape_vjp(g: Any, shape: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g.reshape(shape),)


def _transpose(x: Any, axes: tuple[int, ...] | None) -> tuple[Any, Any]:
    if axes is None:
        axes = tuple(reversed(range(x.ndim)))
    return x.transpose(axes), axes


def _transpose_vjp(g: Any, axes: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    inverse = [0] * len(axes)
    for i, a in enumerate(axes):
        inverse[a] = i
    return (g.transpose(inverse),)


def _broadcast_to(x: Any, shape: tuple[int, ...]) -> tuple[Any, Any]:
    return ns(x).broadcast_to(x, shape), tuple(x.shape)


def _broadcast_to_vjp(g: Any, shape: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (unbroadcast(g, shape),)


def _is_basic_index(idx: Any) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in items)


# -- guarded indices: integer arrays on a GPU, not read back to the host ---------------------------
# cupy wraps an index outside [-n, n) around (5 of five reads entry 0) where numpy raises, and
# reading the indices back for a check costs a round trip per call. A guarded index reads entry
# 0 instead and its result is NaN; its gradient goes to a spare entry past the end, then dropped.
def _bad_and_wide(indices: Any, n: int) -> tuple[Any, Any]:
    """Where integer ``indices`` are outside ``[-n, n)``, and the indices as int64 (a uint64 past
    2**63 turns negative, so it is bad, as numpy reads it too)."""
    wide = indices.astype(np.int64, copy=False)
    return (wide < -n) | (wide >= n), wide


def _spare(wide: Any, bad: Any, n: int) -> Any:
    """Indices counted from 0, bad ones sent to the spare entry ``n`` (``% n`` because a
    negative index would reach the spare of an axis of ``n + 1``; every index is bad for
    ``n == 0``)."""
    return ns(wide).where(bad, n, wide % max(n, 1))


def _nan_where(bad: Any, out: Any) -> Any:
    # a NaN of out's dtype (a Python one would widen a 16-bit out), filled by a kernel: no copy
    # from the host, which a CUDA-graph capture would refuse
    xp = ns(out)
    # (cupy's where computes bfloat16 in float32: back to out's dtype)
    return xp.where(bad, xp.full((), np.nan, dtype=out.dtype), out).astype(out.dtype, copy=False)


def _padded(shape: tuple[int, ...], axes: Any) -> tuple[int, ...]:
    return tuple(s + 1 if i in axes else s for i, s in enumerate(shape))


def _unpadded(out: Any, shape: tuple[int, ...]) -> Any:
    return out[tuple(slice(0, s) for s in shape)]


def _getitem(x: Any, idx: Any, guard: tuple[tuple[int, int], ...] = ()) -> tuple[Any, Any]:
    """``x[idx]``; ``guard`` names the (place in ``idx``, axis of ``x``) of each integer array to
    guard (``idx`` is then a tuple): where one of them is outside its axis, the result is NaN."""
    if not guard:
        return x[idx], (x.shape, x.dtype, idx, ())
    xp = ns(x)
    safe, spare = list(idx), list(idx)
    bad: Any = False
    for place, axis in guard:
        bad_here, wide = _bad_and_wide(idx[place], x.shape[axis])
        bad = bad | bad_here  # (the arrays broadcast together)
        safe[place] = wide
    for place, axis in guard:  # every guarded array to its spare where any of them is bad
        n = x.shape[axis]
        safe[place] = xp.where(bad, 0, safe[place])
        spare[place] = _spare(safe[place], bad, n)
    # the mask in the result's layout, by the same index into an array that is True only at
    # the spare of the first guarded axis (zero strides: no memory of x's size)
    axis = guard[0][1]
    at_spare = xp.arange(x.shape[axis] + 1) == x.shape[axis]
    view = [1] * x.ndim
    view[axis] = x.shape[axis] + 1
    padded = _padded(x.shape, {a for _, a in guard})
    mask = xp.broadcast_to(at_spare.reshape(view), padded)[tuple(spare)]
    if 0 in (x.shape[a] for _, a in guard):  # (no entry to read: all NaN)
        out = xp.full(mask.shape, np.nan, dtype=x.dtype)
    else:
        out = _nan_where(mask, x[tuple(safe)])
    return out, (x.shape, x.dtype, tuple(spare), padded)


def _getitem_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    shape, dtype, idx, padded = res
    xp = ns(g)
    if padded:  # guarded: the gradient of a bad index goes to the spare, then dropped
        out = xp.zeros(padded, dtype=g.dtype)
        scatter_add(out, idx, g)
        return (_unpadded(out, shape),)
    out = xp.zeros(shape, dtype=g.dtype)
    if _is_basic_index(idx) or getattr(getattr(idx, "dtype", None), "kind", "") == "b":
        out[idx] = g  # each position is picked at most once
    else:
        scatter_add(out, idx, g)  # an index may repeat: its gradients add up
    return (out,)


def _take(x: Any, indices: Any, axis: int, guard: bool = False) -> tuple[Any, Any]:
    """``take(x, indices, axis)``; with ``guard`` (integer indices on a GPU, not checked on the
    host) the result is NaN where an index is outside ``[-n, n)``, as numpy would refuse."""
    xp = ns(x)
    if not guard:
        return xp.take(x, indices, axis=axis), (x.shape, indices, axis, None)
    n = x.shape[axis]
    bad, wide = _bad_and_wide(indices, n)
    if n == 0:  # (no entry to read: all NaN)
        out = xp.full((*x.shape[:axis], *wide.shape, *x.shape[axis + 1 :]), np.nan, x.dtype)
    else:
        out = xp.take(x, xp.where(bad, 0, wide), axis=axis)
        out = _nan_where(bad.reshape((1,) * axis + bad.shape + (1,) * (x.ndim - axis - 1)), out)
    return out, (x.shape, wide, axis, bad)


def _take_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, None]:
    shape, indices, axis, bad = res
    xp = ns(g)
    padded = None
    if bad is not None:  # guarded: a bad index's gradient goes to the spare, then dropped
        indices = _spare(indices, bad, shape[axis])
        padded = _padded(shape, (axis,))
    indices = xp.asarray(indices)  # a list or an int takes as an array does
    out = xp.zeros(padded or shape, dtype=g.dtype)
    moved = xp.moveaxis(out, axis, 0)  # a view: scattering into it fills `out`
    gi = xp.moveaxis(g, tuple(range(axis, axis + indices.ndim)), tuple(range(indices.ndim)))
    scatter_add(moved, indices, gi)
    return (_unpadded(out, shape) if padded else out), None


def _in_dtype(g: Any, dtype: Any) -> Any:
    """``g`` in its input's ``dtype``: a float32 array joined with float64 ones gets a float32
    gradient, as in torch."""
    return g if dtype is None or g.dtype == dtype else g.astype(dtype)


def _concatenate(*xs: Any, axis: int) -> tuple[Any, Any]:
    out = ns(*xs).concatenate(xs, axis=axis)
    return out, ([x.shape[axis] for x in xs], [x.dtype for x in xs], axis)


def _concatenate_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> list[Any]:
    sizes, dtypes, axis = res
    grads = []
    start = 0
    for size, dtype, need in zip(sizes, dtypes, needs, strict=True):
        if need:
            index = [slice(None)] * g.ndim
            index[axis] = slice(start, start + size)
            grads.append(_in_dtype(g[tuple(index)], dtype))
        else:
            grads.append(None)
        start += size
    return grads


def _stack(*xs: Any, axis: int) -> tuple[Any, Any]:
    return ns(*xs).stack(xs, axis=axis), ([getattr(x, "dtype", None) for x in xs], axis)


def _stack_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> list[Any]:
    dtypes, axis = res
    xp = ns(g)
    return [
        _in_dtype(xp.take(g, i, axis=axis), dtype) if need else None
        for i, (dtype, need) in enumerate(zip(dtypes, needs, strict=True))
    ]


# -- unstack: one node for the whole array, and one per piece --------------------------------------
# A node gives one array, so ``ops.unstack`` records an "unstack" node (the array itself) and one
# "unstack_piece" node per piece. A piece's cotangent goes back as a Pieces, which the trace adds
# to the others' as it adds any cotangents (``prev + g``), and the unstack node writes them all
# into one gradient: a gradient of the whole array per piece, added up, cost T^2 for T pieces.
class Pieces:
    """The cotangents of an unstack's pieces so far, by piece; ``+`` gathers them (in place: the
    trace adds a cotangent to the sum it holds, which nothing else reads)."""

    __slots__ = ("cts",)

    def __init__(self, cts: dict[int, Any]) -> None:
        self.cts = cts

    def __add__(self, other: Pieces) -> Pieces:
        for i, g in other.cts.items():
            prev = self.cts.get(i)
            self.cts[i] = g if prev is None else prev + g
        return self


def _piece_index(axis: int, i: int) -> tuple[Any, ...]:
    return (slice(None),) * axis + (i,)


def _unstack(x: Any, axis: int) -> tuple[Any, Any]:
    return x, (x.shape, x.dtype, axis)


def _unstack_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    shape, dtype, axis = res
    if not isinstance(g, Pieces):  # (only pieces read this node; kept total all the same)
        return (g,)
    out = ns(*g.cts.values()).zeros(shape, dtype=dtype)  # zeros where a piece got none
    for i, ct in g.cts.items():
        out[_piece_index(axis, i)] = ct
    return (out,)


def _unstack_piece(x: Any, axis: int, index: int) -> tuple[Any, Any]:
    return x[_piece_index(axis, index)], index


def _unstack_piece_vjp(g: Any, index: Any, needs: tuple[bool, ...]) -> tuple[Pieces]:
    return (Pieces({index: g}),)


# The backend's product: inside a CUDA-graph capture it bypasses cupy (which refuses cuBLAS
# there); on a thread of a compute team a large CPU product is split across the team's workers.
_mm = backend_matmul


def _matmul(a: Any, b: Any) -> tuple[Any, Any]:
    return _mm(a, b), (a, b)


def _matmul_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
    a, b = res
    if a.ndim == 2 and b.ndim == 2 and a.dtype == b.dtype:  # the hot path: dense layers
        return (_mm(g, b.T) if needs[0] else None, _mm(a.T, g) if needs[1] else None)
    xp = ns(a, b)
    # Promote vectors to matrices as matmul does, then drop the added axes again.
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    g2 = g
    # The column axis first: for vector @ vector, g is 0-d and has no axis -2 yet.
    if b.ndim == 1:
        g2 = xp.expand_dims(g2, -1)
    if a.ndim == 1:
        g2 = xp.expand_dims(g2, -2)
    ga = gb = None
    # (batched_product: numpy's product, also for bfloat16 on cupy, which has no batched kernel
    # for it; the batch's sum in float32, then rounded, as numpy's float32 product gives)
    if needs[0]:
        ga = batched_product(g2, xp.swapaxes(b2, -1, -2))
        ga = unbroadcast(ga, a2.shape).reshape(a.shape).astype(a.dtype, copy=False)
    if needs[1]:
        gb = batched_product(xp.swapaxes(a2, -1, -2), g2)
        gb = unbroadcast(gb, b2.shape).reshape(b.shape).astype(b.dtype, copy=False)
    return ga, gb


RULES: dict[str, tuple[Forward, VjpRule]] = {
    "sum": (_sum, _sum_vjp),
    "mean": (_mean, _mean_vjp),
    "max": (_max, _extreme_vjp),
    "min": (_min, _extreme_vjp),
    "reshape": (_reshape, _reshape_vjp),
    "transpose": (_transpose, _transpose_vjp),
    "broadcast_to": (_broadcast_to, _broadcast_to_vjp),
    "getitem": (_getitem, _getitem_vjp),
    "take": (_take, _take_vjp),
    "concatenate": (_concatenate, _concatenate_vjp),
    "stack": (_stack, _stack_vjp),
    "unstack": (_unstack, _unstack_vjp),
    "unstack_piece": (_unstack_piece, _unstack_piece_vjp),
    "matmul": (_matmul, _matmul_vjp),
    # float16 too in float32, as torch: a deviation of 300 squared overflowed it
    "var": _bf16_in_float32(_var, _var_vjp, float16=True),
    "std": _bf16_in_float32(_std, _std_vjp, float16=True),
    # float16 too, as torch: a float16 running sum of 0.1s stalled at 256
    "cumsum": _bf16_in_float32(_cumsum, _cumsum_vjp, float16=True),
    # float16 too, as torch's cumprod and its prod on a GPU (its CPU prod multiplies in
    # float16): float16's 300 * 300 overflowed before the 1/300 that follows
    "prod": _bf16_in_float32(_prod, _prod_vjp, float16=True),
    "cumprod": _bf16_in_float32(_cumprod, _cumprod_vjp, float16=True),
    # moves, no arithmetic but their gradients' sums over copies: float16 too in float32, as
    # cumsum (a float16 sum of 3000 cotangents of 1 stalled at 2048); pad's value arrives
    # rounded to x's dtype, which float32 holds
    "pad": _bf16_in_float32(_pad, _pad_vjp, float16=True),
    "repeat": _bf16_in_float32(_repeat, _repeat_vjp, float16=True),
    "tile": _bf16_in_float32(_tile, _tile_vjp, float16=True),
    "flip": (_flip, _flip_vjp),
    # numpy's take_along_axis is an index of x: an arange for each other axis, broadcast with
    # the indices (see ops.take_along_axis); its gradient getitem's scatter-add
    "take_along_axis": (_getitem, _getitem_vjp),
}
