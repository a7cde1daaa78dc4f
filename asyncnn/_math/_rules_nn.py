"""Forward and VJP rules of the neural-network primitives (softmax family, conv, pools, norms).

Convolutions and pools share one idea: a window offset ``k`` of the kernel picks, for every output
position at once, a strided slice of the padded input. The forward gathers those slices (im2col for
conv, a running max or sum for pools) and the VJP adds the gradient back through the same slices
(col2im), so there is no per-output-position Python loop and the code runs unchanged on cupy.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from asyncnn.backends import acc_mean, acc_sum, fused_nn_kernels_of, is_half, scatter_add
from asyncnn.backends import array_namespace as ns
from asyncnn.backends._parallel import narrowed

from ._autodiff import Forward, VjpRule
from ._rules_array import _nan_where, divided_by_count
from ._rules_elementwise import grad_like, like

Ints = tuple[int, ...]


# -- softmax family -------------------------------------------------------------------------------
def _quiet(xp: Any) -> Any:
    """Silences numpy's warnings for rows that are all -inf (their logsumexp is -inf and their
    softmax NaN) and rows holding +inf (their softmax NaN), as in torch: the answer, not an
    accident."""
    if xp.__name__ == "numpy":
        return xp.errstate(divide="ignore", invalid="ignore")
    return contextlib.nullcontext()


def _shifted(x: Any, axis: int, posinf: bool = True) -> tuple[Any, Any]:
    """``(x - max, max)`` along ``axis``; rows that are all -inf shift by 0 instead of NaN, and
    so does an empty axis (whose logsumexp is -inf and softmax empty, as in torch), where numpy's
    max has no value.

    A row holding +inf shifts by it where ``posinf`` (the softmax and log-softmax: NaN
    throughout, as torch's and as :func:`_cross_entropy`'s loss), and by 0 otherwise (the
    logsumexp: +inf, as torch's).
    """
    xp = ns(x)
    if x.shape[axis] == 0:
        return x.copy(), xp.zeros(x.shape[:axis] + (1,) + x.shape[axis + 1 :], x.dtype)
    m = x.max(axis=axis, keepdims=True)
    m = xp.where(m == -xp.inf if posinf else ~xp.isfinite(m), 0, m).astype(x.dtype, copy=False)
    return x - m, m


def _softmax(x: Any, axis: int) -> tuple[Any, Any]:
    xp = ns(x)
    with _quiet(xp):  # (and a row holding +inf: inf - inf, NaN as in torch)
        e, _ = _shifted(x, axis)
        xp.exp(e, out=e)
        e /= e.sum(axis=axis, keepdims=True)
    return e, (e, axis)


def _softmax_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    p, axis = res
    gp = g * p
    gp -= p * gp.sum(axis=axis, keepdims=True)
    return (gp,)


def _log_softmax(x: Any, axis: int) -> tuple[Any, Any]:
    xp = ns(x)
    with _quiet(xp):  # (and a row holding +inf: inf - inf, NaN as in torch)
        z, _ = _shifted(x, axis)
        z -= xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
    return z, (z, axis)


def _log_softmax_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    out, axis = res
    return (g - ns(g).exp(out) * g.sum(axis=axis, keepdims=True),)


def _logsumexp(x: Any, axis: int, keepdims: bool) -> tuple[Any, Any]:
    xp = ns(x)
    z, m = _shifted(x, axis, posinf=False)
    e = xp.exp(z, out=z)
    s = e.sum(axis=axis, keepdims=True)
    with _quiet(xp):
        e /= s  # the softmax: the VJP's only need
        out = xp.log(s) + m
    return (out if keepdims else out.squeeze(axis)), (e, axis)


def _logsumexp_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    p, axis = res
    if g.ndim < p.ndim:
        g = ns(g).expand_dims(g, axis)
    return (g * p,)


# -- convolution ----------------------------------------------------------------------------------
def out_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool = False
) -> int:
    """Length of a convolution's or pool's output along one axis (torch's formula).

    ``ceil_mode`` rounds the count of strides up, as torch's pools: the last window may then
    run past the end of the padded input, but it must start inside the input or its left
    padding (torch drops one that would start in the right padding, which holds no input).
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pad(x: Any, padding: Ints, value: float = 0.0, after: Ints | None = None) -> Any:
    """``x`` with ``padding`` cells of ``value`` on both sides of each spatial axis, and
    ``after`` more at the end (where a ceil-mode pool's last window runs past the padding)."""
    extra = after or (0,) * len(padding)
    if not any(padding) and not any(extra):
        return x
    xp = ns(x)
    spatial = x.shape[2:]
    out = xp.full(
        x.shape[:2] + tuple(s + 2 * p + e for s, p, e in zip(spatial, padding, extra, strict=True)),
        value,
        dtype=x.dtype,
    )
    out[_inner(x.ndim, padding, spatial)] = x
    return out


def _inner(ndim: int, padding: Ints, spatial: Ints) -> tuple[slice, ...]:
    """The index of the unpadded region inside a padded array."""
    return (slice(None), slice(None)) + tuple(
        slice(p, p + s) for p, s in zip(padding, spatial, strict=True)
    )


def _windows(
    kernel: Ints, stride: Ints, dilation: Ints, out_shape: Ints
) -> Iterator[tuple[Ints, tuple[slice, ...]]]:
    """For each kernel offset: the offset and the index of the input slice it reads (N, C, ...)."""
    for offset in itertools.product(*(range(k) for k in kernel)):
        yield (
            offset,
            (slice(None), slice(None))
            + tuple(
                slice(o * d, o * d + s * (n - 1) + 1, s)
                for o, d, s, n in zip(offset, dilation, stride, out_shape, strict=True)
            ),
        )


def _conv_geometry(
    x_shape: Ints, kernel: Ints, stride: Ints, padding: Ints, dilation: Ints
) -> Ints:
    return tuple(
        out_size(n, k, s, p, d)
        for n, k, s, p, d in zip(x_shape[2:], kernel, stride, padding, dilation, strict=True)
    )


def _conv(x: Any, w: Any, b: Any, stride: Ints, padding: Ints, dilation: Ints) -> tuple[Any, Any]:
    xp = ns(x, w)
    n, c = x.shape[:2]
    o = w.shape[0]
    kernel = tuple(w.shape[2:])
    out_shape = _conv_geometry(x.shape, kernel, stride, padding, dilation)
    xpad = _pad(x, padding)
    # Columns laid out (C, *kernel, N, *out) so that the whole batch is one matrix product with
    # the weight seen as (O, C * prod(kernel)).
    cols = xp.empty((c, *kernel, n, *out_shape), dtype=x.dtype)
    for offset, index in _windows(kernel, stride, dilation, out_shape):
        cols[(slice(None), *offset)] = xp.swapaxes(xpad[index], 0, 1)
    ck = c * int(np.prod(kernel))
    positions = int(np.prod(out_shape))  # explicit sizes, not -1: the batch may be empty
    cols2 = cols.reshape(ck, n * positions)
    # (O, N * prod(out)); two bfloat16 arrays multiply in float32 on numpy: rounded back
    out = narrowed(w.reshape(o, ck) @ cols2, w, cols2)
    out = xp.ascontiguousarray(xp.swapaxes(out.reshape(o, n, positions), 0, 1))
    out = out.reshape(n, o, *out_shape)
    if b is not None:
        out += b.reshape((o,) + (1,) * len(out_shape))
    geometry = (tuple(x.shape), kernel, stride, padding, dilation, out_shape)
    return out, (cols2, w, None if b is None else b.dtype, geometry)


def _acc_dtype(dtype: Any) -> Any:
    """The dtype that sums of ``dtype`` run in: float32 for 16-bit floats, whose own sums stall
    (a bfloat16 sum of ones at 256, a float16 one at 2048) or overflow past 65504."""
    return np.float32 if is_half(dtype) else dtype


def _conv_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any, Any]:
    cols2, w, bias_dtype, geometry = res
    x_shape, kernel, stride, padding, dilation, out_shape = geometry
    xp = ns(g)
    n, o = g.shape[:2]
    # (O, N * prod(out)): the layout the forward's product produced.
    positions = int(np.prod(out_shape))
    g2 = xp.ascontiguousarray(xp.swapaxes(g.reshape(n, o, positions), 0, 1))
    g2 = g2.reshape(o, n * positions)
    gx = gw = gb = None
    if needs[1]:
        gw = (g2 @ cols2.T).reshape(w.shape).astype(w.dtype, copy=False)
    if bias_dtype is not None and needs[2]:
        # in the bias's dtype, as the weight's: float64 input to float32 parameters gave a
        # float64 bias gradient, which an optimizer's update refuses
        gb = acc_sum(g, (0, *range(2, g.ndim))).astype(bias_dtype, copy=False)
    if needs[0]:
        c = x_shape[1]
        ck = c * int(np.prod(kernel))  # (explicit, as in the forward: no -1 of a size-0 weight)
        dcols = narrowed(w.reshape(o, ck).T @ g2, w, g2).reshape(c, *kernel, n, *out_shape)
        padded = tuple(s + 2 * p for s, p in zip(x_shape[2:], padding, strict=True))
        gpad = xp.zeros((n, c, *padded), dtype=_acc_dtype(g.dtype))
        for offset, index in _windows(kernel, stride, dilation, out_shape):
            gpad[index] += xp.swapaxes(dcols[(slice(None), *offset)], 0, 1)
        gx = gpad[_inner(len(x_shape), padding, x_shape[2:])] if any(padding) else gpad
        gx = gx.astype(cols2.dtype, copy=False)
    return gx, gw, gb


# -- pooling --------------------------------------------------------------------------------------
def _lowest(dtype: Any) -> Any:
    """A padding value no entry of ``dtype`` is below: -inf would become 0 in int8 or int16 and
    True in bool."""
    if dtype.kind == "b":
        return False
    if dtype.kind in "iu":
        return np.iinfo(dtype).min
    return -np.inf


def _max_pool(
    x: Any,
    kernel: Ints,
    stride: Ints,
    padding: Ints,
    dilation: Ints | None = None,
    ceil_mode: bool = False,
) -> tuple[Any, Any]:
    xp = ns(x)
    dilation = dilation or (1,) * len(kernel)
    sizes = tuple(x.shape[2:])
    out_shape = tuple(
        out_size(n, k, s, p, d, ceil_mode)
        for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation, strict=True)
    )
    # a ceil-mode window past the end reads the overhang as more padding: -inf, never taken
    after = _overhang(sizes, kernel, stride, padding, out_shape, dilation)
    xpad = _pad(x, padding, _lowest(x.dtype), after)
    windows = _windows(kernel, stride, dilation, out_shape)
    out = xpad[next(windows)[1]].copy()
    arg = xp.zeros(out.shape, dtype=np.int32)
    floating = x.dtype.kind not in "iub"
    # A running max over kernel offsets: strict ">" keeps the first maximum, as torch does, and
    # a NaN wins (as in torch; ">" alone would drop it unless it came first in its window).
    for k, (_, index) in enumerate(windows, start=1):
        window = xpad[index]
        better = window > out
        if floating:
            better |= window != window
        # (cupy's where has no bfloat16 kernel: it returned the maximum in float32; the cast
        # is exact, and free where the dtype is kept; a copyto in place was 14% slower on numpy)
        out = xp.where(better, window, out).astype(x.dtype, copy=False)
        arg[better] = k
    if floating and any(padding):
        # A window whose real entries are all -inf kept its first offset where that is padding
        # (-inf too, and ">" never moves past it): its gradient went into the padding and was
        # lost. torch looks at real entries only, and the first real one takes it. arg is
        # still 0 wherever the maximum is -inf (an entry taken would be above it, or NaN).
        first = _first_real(xp, sizes, kernel, stride, padding, dilation, out_shape)
        arg += (out == -xp.inf) * first
    return out, (arg, tuple(x.shape), kernel, stride, padding, out_shape, dilation, after)


def _first_real(
    xp: Any, sizes: Ints, kernel: Ints, stride: Ints, padding: Ints, dilation: Ints, out_shape: Ints
) -> Any:
    """For each output position of a pool, the first kernel offset (numbered as
    :func:`_windows` yields them) whose input cell is not padding, shaped (1, 1, *out_shape).

    Along each axis the window at ``o`` starts at ``o * stride - padding``. Without dilation
    every window holds a real cell (the padding is at most half the kernel, and a ceil-mode
    window starts inside the input); a dilated one can step over the whole input, and gets
    ``prod(kernel)``, which no offset has: no gradient, as torch (whose maximum there is -inf).
    """
    first = xp.zeros((1, 1, *out_shape), dtype=np.int32)
    empty = xp.zeros((1, 1, *out_shape), dtype=bool)
    step = 1  # (offsets are numbered in row-major order of the kernel's axes)
    for axis in reversed(range(len(kernel))):
        start = stride[axis] * xp.arange(out_shape[axis], dtype=np.int32) - padding[axis]
        # the offsets before the window's first real cell: ceil(-start / dilation), or none
        lead = -(xp.minimum(start, 0) // dilation[axis])
        along = [1] * (len(kernel) + 2)
        along[axis + 2] = out_shape[axis]
        hollow = (lead >= kernel[axis]) | (start + lead * dilation[axis] >= sizes[axis])
        empty |= hollow.reshape(along)
        first += (lead * step).reshape(along)
        step *= kernel[axis]
    first[empty] = step  # (in place: the dtype stays int32 on numpy and cupy alike)
    return first


def _max_pool_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    arg, x_shape, kernel, stride, padding, out_shape, dilation, after = res
    xp = ns(g)
    dtype = g.dtype
    padded = tuple(s + 2 * p + e for s, p, e in zip(x_shape[2:], padding, after, strict=True))
    # overlapping windows (stride < kernel) add up at an entry that is the maximum of several:
    # in float32 for 16-bit floats, rounded once, as the average pool's and conv's gradients
    # (in bfloat16 256 + 1 + 1 stayed 256)
    acc = _acc_dtype(g.dtype)
    gpad = xp.zeros((*x_shape[:2], *padded), dtype=acc)
    g = g.astype(acc, copy=False)
    zero = xp.zeros((), dtype=acc)
    for k, (_, index) in enumerate(_windows(kernel, stride, dilation, out_shape)):
        gpad[index] += xp.where(arg == k, g, zero)
    if any(padding) or any(after):
        gpad = gpad[_inner(len(x_shape), padding, x_shape[2:])]
    return (gpad.astype(dtype, copy=False),)


def max_pool_indices(out: Any, res: Any) -> Any:
    """Torch's ``return_indices`` of a max pool: for each output entry, the flat index into the
    input's spatial plane (``h * W + w``; the position in 1-d) of the entry it took, int64.

    ``out`` and ``res`` are :func:`_max_pool`'s. A window whose real entries are all the
    dtype's lowest value names its first real entry, as torch (integers here too: a window of
    int8 -128s beside the padding, -128 as well, kept the padding's offset); a dilated window
    that holds no entry (whose offset is ``prod(kernel)``) gets torch's index of where it
    started looking: along each axis its first cell at or past 0, which lies past the input
    (in 2-d the flat index may even name a real cell).
    """
    arg, x_shape, kernel, stride, padding, out_shape, dilation, _ = res
    xp = ns(arg)
    sizes = tuple(x_shape[2:])
    if any(padding) and out.dtype.kind in "iub":
        # (the floating case was settled in _max_pool, for the gradient's sake)
        first = _first_real(xp, sizes, kernel, stride, padding, dilation, out_shape)
        arg = arg + (out == _lowest(out.dtype)) * first
    arg = arg.astype(np.int64)
    hollow = arg == int(np.prod(kernel))
    flat = xp.zeros(arg.shape, dtype=np.int64)
    step = int(np.prod(kernel))  # (offsets are numbered in row-major order of the kernel's axes)
    for axis, (n, k, s, p, o, d) in enumerate(
        zip(sizes, kernel, stride, padding, out_shape, dilation, strict=True)
    ):
        step //= k
        along = [1] * arg.ndim
        along[axis + 2] = o
        start = (s * xp.arange(o, dtype=np.int64) - p).reshape(along)
        offset = (arg // step) % k
        if any(padding):
            lead = -(xp.minimum(start, 0) // d)  # (torch's first cell at or past 0)
            offset = xp.where(hollow, lead, offset)
        flat = flat * n + start + offset * d
    return flat


def _max_unpool(x: Any, indices: Any, plane: Ints) -> tuple[Any, Any]:
    """Torch's ``max_unpool``: ``x``'s entries written into zeros of spatial shape ``plane`` at
    their flat ``indices`` (checked to be in range by the op). Where an index repeats, the
    last entry written stays (the one latest in ``x``'s plane, as torch 2.13's CPU kernel
    keeps), on a GPU too: neither numpy nor cupy promises which of the values a repeated index
    of an assignment keeps, so those entries are chosen before they are written."""
    xp = ns(x)
    n, c = x.shape[:2]
    size = int(np.prod(plane))
    m = int(np.prod(x.shape[2:]))  # (explicit sizes, not -1: the batch may be empty)
    rows = xp.arange(n * c, dtype=np.int64).reshape(n * c, 1) * size
    flat = (rows + indices.reshape(n * c, m).astype(np.int64, copy=False)).reshape(-1)
    bits = _bits(x.reshape(-1))
    out = xp.zeros(n * c * size, dtype=bits.dtype)  # (all bits 0: +0.0 in a float's view)
    if flat.size and int(xp.bincount(flat).max()) > 1:
        # overlapping windows: of the entries bound for one place, the last one (the order of
        # the keys target * count + source, unique, does not depend on the sort's stability)
        order = xp.argsort(flat * flat.size + xp.arange(flat.size, dtype=np.int64))
        target = flat[order]
        last = xp.ones(flat.size, dtype=bool)
        last[:-1] = target[1:] != target[:-1]
        kept = order[last]
        out[flat[kept]] = bits[kept]
    else:
        out[flat] = bits
    return out.view(x.dtype).reshape(n, c, *plane), (flat, tuple(x.shape))


def _bits(a: Any) -> Any:
    """``a``, a 16-bit float array, seen as uint16 (cupy has no bfloat16 kernels to scatter
    or gather it; moving the bits is exact); any other array as it is."""
    return a.view(np.uint16) if is_half(a.dtype) else a


def _max_unpool_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, None]:
    # every entry gets the gradient at its index, a repeated one too (torch's gather), though
    # only one of them was kept there
    flat, x_shape = res
    return _bits(g.reshape(-1))[flat].view(g.dtype).reshape(x_shape), None


def _avg_pool(
    x: Any,
    kernel: Ints,
    stride: Ints,
    padding: Ints,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> tuple[Any, Any]:
    xp = ns(x)
    ones = (1,) * len(kernel)
    sizes = tuple(x.shape[2:])
    out_shape = tuple(
        out_size(n, k, s, p, 1, ceil_mode)
        for n, k, s, p in zip(sizes, kernel, stride, padding, strict=True)
    )
    after = _overhang(sizes, kernel, stride, padding, out_shape)
    xpad = _pad(x, padding, after=after)
    acc = _acc_dtype(x.dtype)
    out = xp.zeros((*x.shape[:2], *out_shape), dtype=acc)
    for _, index in _windows(kernel, stride, ones, out_shape):
        out += xpad[index]
    divisor: Any = divisor_override  # (torch's: every window, whatever its count of cells)
    if divisor is None:
        divisor = _avg_divisor(
            xp, sizes, kernel, stride, padding, out_shape, count_include_pad, acc
        )
    out /= divisor
    res = (tuple(x.shape), kernel, stride, padding, out_shape, after, divisor)
    return out.astype(x.dtype, copy=False), res


def _overhang(
    sizes: Ints,
    kernel: Ints,
    stride: Ints,
    padding: Ints,
    out_shape: Ints,
    dilation: Ints | None = None,
) -> Ints:
    """How far a ceil-mode pool's last window (spread by ``dilation``, 1 by default) runs past
    the end of the padded input, per axis (0 in floor mode, whose windows all fit)."""
    return tuple(
        max(0, (o - 1) * s + d * (k - 1) + 1 - (n + 2 * p))
        for n, k, s, p, o, d in zip(
            sizes, kernel, stride, padding, out_shape, dilation or (1,) * len(kernel), strict=True
        )
    )


def _avg_divisor(
    xp: Any,
    sizes: Ints,
    kernel: Ints,
    stride: Ints,
    padding: Ints,
    out_shape: Ints,
    count_include_pad: bool,
    dtype: Any,
) -> Any:
    """What each window's sum is divided by, torch's rule: the window's cells inside the input
    and its padding (``count_include_pad``; a ceil-mode window's cells past the padding do not
    count), or inside the input only. The kernel's size where every window has it (floor mode
    with the padding counted, as before these options), else an array (1, 1, *out_shape)."""
    geometry = tuple(zip(sizes, kernel, stride, padding, out_shape, strict=True))
    if count_include_pad and all((o - 1) * s + k <= n + 2 * p for n, k, s, p, o in geometry):
        return int(np.prod(kernel))
    divisor: Any = 1
    for axis, (n, k, s, p, o) in enumerate(geometry):
        start = s * xp.arange(o, dtype=np.int64)  # in the padded input's coordinates
        end = xp.minimum(start + k, n + 2 * p)
        if not count_include_pad:
            start, end = xp.maximum(start, p), xp.minimum(end, n + p)
        along = [1] * (len(kernel) + 2)
        along[axis + 2] = o
        divisor = divisor * (end - start).reshape(along)
    # (no count is 0: every window starts inside the input or its left padding, which is at
    # most half the kernel, so it holds a cell of the input)
    return divisor.astype(dtype)


def _avg_pool_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    x_shape, kernel, stride, padding, out_shape, after, divisor = res
    xp = ns(g)
    ones = (1,) * len(kernel)
    padded = tuple(s + 2 * p + e for s, p, e in zip(x_shape[2:], padding, after, strict=True))
    acc = _acc_dtype(g.dtype)
    gpad = xp.zeros((*x_shape[:2], *padded), dtype=acc)
    share = g.astype(acc, copy=False) / divisor
    for _, index in _windows(kernel, stride, ones, out_shape):
        gpad[index] += share
    if any(padding) or any(after):
        gpad = gpad[_inner(len(x_shape), padding, x_shape[2:])]
    return (gpad.astype(g.dtype, copy=False),)


# -- normalization, dropout, losses ---------------------------------------------------------------
def _layer_norm(x: Any, w: Any, b: Any, ndim: int, eps: float) -> tuple[Any, Any]:
    xp = ns(x)
    axes = tuple(range(x.ndim - ndim, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=axes, keepdims=True)  # biased, as torch
    rstd = 1 / xp.sqrt(var + eps)
    xhat = xc * rstd
    out = xhat
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out, (xhat, rstd, w, None if b is None else b.dtype, axes)


def _layer_norm_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any, Any]:
    xhat, rstd, w, bias_dtype, axes = res
    lead = tuple(range(g.ndim - len(axes)))
    gw = gb = None
    if w is not None and needs[1]:
        gw = (g * xhat).sum(axis=lead).astype(w.dtype, copy=False)
    if bias_dtype is not None and needs[2]:
        gb = g.sum(axis=lead).astype(bias_dtype, copy=False)
    gx = None
    if needs[0]:
        gh = g * w if w is not None else g
        gx = rstd * (
            gh
            - gh.mean(axis=axes, keepdims=True)
            - xhat * (gh * xhat).mean(axis=axes, keepdims=True)
        ).astype(xhat.dtype, copy=False)
    return gx, gw, gb


def _group_norm(x: Any, w: Any, b: Any, groups: int, eps: float) -> tuple[Any, Any]:
    xp = ns(x)
    n, c = x.shape[:2]
    size = c // groups * int(np.prod(x.shape[2:], dtype=np.int64))
    xg = x.reshape(n, groups, size)
    if size:
        mu = xg.mean(axis=-1, keepdims=True)
        xc = xg - mu
        var = (xc * xc).mean(axis=-1, keepdims=True)  # biased, as torch
    else:  # (no entries to normalize: numpy's mean of nothing warns)
        xc, var = xg, xp.zeros((n, groups, 1), x.dtype)
    rstd = 1 / xp.sqrt(var + eps)
    xhat = (xc * rstd).reshape(x.shape)
    along = (1, c) + (1,) * (x.ndim - 2)  # a channel's weight over its positions
    out = xhat
    if w is not None:
        out = out * w.reshape(along)
    if b is not None:
        out = out + b.reshape(along)
    return out, (xhat, rstd, w, None if b is None else b.dtype, groups)


def _group_norm_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any, Any]:
    xhat, rstd, w, bias_dtype, groups = res
    n, c = g.shape[:2]
    along = (1, c) + (1,) * (g.ndim - 2)
    others = (0, *range(2, g.ndim))  # each channel's batch and positions
    gw = gb = gx = None
    if w is not None and needs[1]:
        gw = (g * xhat).sum(axis=others).astype(w.dtype, copy=False)
    if bias_dtype is not None and needs[2]:
        gb = g.sum(axis=others).astype(bias_dtype, copy=False)
    if needs[0]:
        size = xhat.size // max(n * groups, 1)
        gh = (g * w.reshape(along) if w is not None else g).reshape(n, groups, size)
        xh = xhat.reshape(n, groups, size)
        if size:  # layer_norm's rule, over each group
            gh = rstd * (
                gh - gh.mean(axis=-1, keepdims=True) - xh * (gh * xh).mean(axis=-1, keepdims=True)
            )
        gx = gh.reshape(g.shape).astype(xhat.dtype, copy=False)
    return gx, gw, gb


def _dropout(x: Any, keep: Any, scale: Any) -> tuple[Any, Any]:
    # the mask is kept as it was drawn, bools (1 byte an entry), not as the factor of x's
    # width: the backward makes the factor again
    return x * _dropout_factor(keep, scale, x.dtype), (keep, scale)


def _dropout_vjp(g: Any, res: tuple[Any, Any], needs: tuple[bool, ...]) -> tuple[Any]:
    keep, scale = res
    return (g * _dropout_factor(keep, scale, g.dtype),)


def _dropout_factor(keep: Any, scale: Any, dtype: Any) -> Any:
    """The factor dropout multiplies by, as the op made it when it kept that factor: the
    mask times the float64 ``scale``, cast once to ``dtype`` (``scale`` where ``keep``, +0
    elsewhere; a float16 scale past 65504 is inf, a dropped entry still +0, never 0 * inf)."""
    return (keep * scale).astype(dtype, copy=False)


def _class_last(logits: Any) -> Any:
    """(N, C, d1, ...) logits as (M, C) rows, one per labelled position."""
    if logits.ndim == 2:
        return logits
    return ns(logits).moveaxis(logits, 1, -1).reshape(-1, logits.shape[1])


def _cross_entropy(
    logits: Any, labels: Any, reduction: str, ignore_index: int | None = None
) -> tuple[Any, Any]:
    xp = ns(logits)
    z = _class_last(logits)
    y = labels.reshape(-1)
    fused = fused_nn_kernels_of(z)
    # where ignore_index is given: the rows it labels (kept False) have a loss and a gradient
    # of 0, and the mean divides by the rows kept (kept_count, a 0-d array)
    kept = kept_count = None
    if fused is not None and fused.fits(z, y):
        # one kernel for the softmax and the row losses (and one for the gradient): an eager
        # GPU step is bound by its launches, and the array code below takes about eighteen
        compute = _acc_dtype(z.dtype)
        p, nll = fused.cross_entropy_rows(z, y, compute, ignore_index)
        rows = None
    else:
        if is_half(z.dtype):
            # 16-bit logits: the softmax, its sums and the loss in float32 (the loss comes out
            # float32; the gradient goes back in the logits' dtype)
            z = z.astype(xp.float32)
        fused = None
        rows = xp.arange(y.size)
        if ignore_index is not None:
            kept = y != ignore_index
            y = xp.where(kept, y, 0)  # (an ignored row reads class 0, then counts for nothing)
        with _quiet(xp):  # (a row holding +inf: inf - inf, its loss NaN as torch's)
            m = z.max(axis=1, keepdims=True)
            p = xp.exp(z - m)
            s = p.sum(axis=1, keepdims=True)
            p /= s  # the softmax, kept for the VJP
            # (the label's logit less the max first, as torch: log(s) + m would round a small
            # log(s) away against a large max, a loss of log 2 coming out 0 for logits of 1e8)
            nll = xp.log(s)[:, 0] - (z[rows, y] - m[:, 0])
        if kept is not None:
            nll = xp.where(kept, nll, 0).astype(nll.dtype, copy=False)
    if fused is not None and reduction != "none":
        # one kernel for the mean or sum; a label outside [0, C) has made its row's loss NaN,
        # and so the whole loss, as the poison below does for the array code
        if ignore_index is not None and reduction == "mean":
            out, kept_count = fused.mean_of_kept(nll, y, ignore_index)
        else:
            out = fused.reduce_losses(nll, reduction)
        shape = tuple(logits.shape)
        return out, (p, y, rows, fused, reduction, shape, logits.dtype, ignore_index, None,
                     kept_count)  # fmt: skip
    if kept is not None and reduction == "mean":
        kept_count = kept.sum(dtype=nll.dtype)
        with _quiet(xp):  # (every label ignored: 0 / 0, NaN as in torch)
            out = nll.sum() / kept_count
    else:
        out = _reduced(nll, labels, reduction)
    if not isinstance(labels, np.ndarray):  # (a subclass, np.memmap, was checked on the host)
        # labels on a GPU: a range check would stop the host on every step (and cannot be
        # captured into a CUDA graph), so a label outside [0, C) makes the loss NaN instead
        from asyncnn.backends._graphs import label_poison  # imports cupy

        out = out + label_poison(labels, logits.shape[1], out.dtype, ignore_index)
    # (the mask of the rows kept, for the array code; the count of them, for a mean)
    shape = tuple(logits.shape)
    return out, (p, y, rows, fused, reduction, shape, logits.dtype, ignore_index, kept,
                 kept_count)  # fmt: skip


def _reduced(nll: Any, labels: Any, reduction: str) -> Any:
    """The per-row losses ``nll`` reduced as ``reduction`` says (``"none"``: in ``labels``'
    shape)."""
    if reduction == "mean":
        if not nll.size:  # (numpy's mean warns of an empty slice: NaN, as torch's, quietly)
            return ns(nll).full((), float("nan"), dtype=nll.dtype)
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    return nll.reshape(labels.shape)


def _cross_entropy_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, None]:
    p, y, rows, fused, reduction, shape, dtype, ignore, mask, count = res
    xp = ns(g)
    if fused is not None:
        p = fused.cross_entropy_grad(p, y, g, reduction, dtype, ignore, count)
    else:
        # softmax - onehot, built in place in the softmax residual (a pullback runs once).
        p[rows, y] -= 1
        if reduction == "none":
            p *= g.reshape(-1, 1)
        elif reduction == "mean":
            # (no rows, or every row ignored: a divisor of 1, which no row's gradient sees)
            p *= g / ((y.shape[0] or 1) if count is None else xp.maximum(count, 1))
        else:
            p *= g
        if mask is not None:
            # an ignored row: +0, as torch's (a product with 0 could be -0), but NaN where its
            # softmax is (a row holding inf or NaN), as torch's and the composed loss's
            p = xp.where(mask[:, None] | (p != p), p, 0).astype(p.dtype, copy=False)
    if len(shape) > 2:
        p = xp.moveaxis(p.reshape(shape[0], *shape[2:], shape[1]), -1, 1)
    return p.astype(dtype, copy=False), None


def _mse(pred: Any, target: Any, reduction: str) -> tuple[Any, Any]:
    # the steps of (pred - target) ** 2 and its reduction as separate ops would take, so a
    # loss computed here equals theirs bit for bit, in one node instead of three
    d = pred - target
    sq = d * d
    if reduction == "mean":
        out = acc_mean(sq, tuple(range(sq.ndim)), False)
    elif reduction == "sum":
        out = acc_sum(sq, tuple(range(sq.ndim)), False)
    else:
        out = sq
    return out, (d, reduction, like(pred), like(target))


def _mse_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
    d, reduction, pred_like, target_like = res
    if reduction == "mean":
        g = divided_by_count(g, d.size)  # (float16's own division made it 0 past 65504 entries)
    gd = g * d
    gd = gd + gd  # d * d has d twice: two equal contributions, added as a trace adds them
    return (
        grad_like(gd, pred_like) if needs[0] else None,
        grad_like(-gd, target_like) if needs[1] else None,
    )


# -- embedding ------------------------------------------------------------------------------------
def _embedding(weight: Any, ids: Any, guard: bool) -> tuple[Any, Any]:
    """Rows of ``weight`` at ``ids``; with ``guard`` (ids on a GPU, not checked on the host), the
    row of an id outside ``[0, n)`` is NaN instead of the row cupy's take would wrap it to."""
    xp = ns(weight)
    if not guard:  # (ids checked on the host)
        return xp.take(weight, ids, axis=0), (weight.shape, ids, guard)
    fused = fused_nn_kernels_of(weight)
    if fused is not None:
        out = fused.embedding_rows(weight, ids)  # one kernel instead of the six below
    else:
        bad = (ids < 0) | (ids >= weight.shape[0])
        if weight.shape[0] == 0:  # (no row to read: every row is NaN)
            out = xp.full((*ids.shape, *weight.shape[1:]), np.nan, dtype=weight.dtype)
        else:
            out = _nan_where(bad[..., None], xp.take(weight, xp.where(bad, 0, ids), axis=0))
    return out, (weight.shape, ids, guard)


def _embedding_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, None]:
    shape, ids, guard = res
    if not needs[0]:
        return None, None
    xp = ns(g)
    n = shape[0]
    ids = xp.asarray(ids)  # (a numpy scalar id takes as an array does)
    if not guard:
        out = xp.zeros(shape, dtype=g.dtype)
        scatter_add(out, ids, g)  # an id may repeat: its gradients add up
        return out, None
    # an id outside the table sends its gradient to a spare row past the end, then dropped:
    # cupy's add.at would wrap it into a row the forward never read
    spare = xp.where((ids >= 0) & (ids < n), ids.astype(xp.int64), n)
    out = xp.zeros((n + 1, *shape[1:]), dtype=g.dtype)
    scatter_add(out, spare, g)
    return out[:n], None


RULES: dict[str, tuple[Forward, VjpRule]] = {
    "softmax": (_softmax, _softmax_vjp),
    "log_softmax": (_log_softmax, _log_softmax_vjp),
    "logsumexp": (_logsumexp, _logsumexp_vjp),
    "conv": (_conv, _conv_vjp),
    "max_pool": (_max_pool, _max_pool_vjp),
    "max_unpool": (_max_unpool, _max_unpool_vjp),
    "avg_pool": (_avg_pool, _avg_pool_vjp),
    "layer_norm": (_layer_norm, _layer_norm_vjp),
    "group_norm": (_group_norm, _group_norm_vjp),
    "dropout": (_dropout, _dropout_vjp),
    "cross_entropy": (_cross_entropy, _cross_entropy_vjp),
    "mse_loss": (_mse, _mse_vjp),
    "embedding": (_embedding, _embedding_vjp),
}


def _widen_16_bit_rules() -> None:
    # normalisations and softmaxes use Python scalars, which cupy would promote bfloat16 with;
    # float16 too computes their statistics in float32, as torch does: its squares overflow
    # from 256 (a layer norm of [300, -300, 10, 0] was all zeros) and its sums along a strided
    # axis stall at 2048. (The MSE loss keeps its float16 steps: they equal the ops' own.)
    from ._rules_elementwise import _bf16_in_float32

    for name in ("softmax", "log_softmax", "logsumexp", "layer_norm", "group_norm", "mse_loss"):
        RULES[name] = _bf16_in_float32(*RULES[name], float16=name != "mse_loss")


_widen_16_bit_rules()
