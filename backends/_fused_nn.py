"""Fused softmax cross-entropy on cupy: three kernels a step instead of about eighteen; ReLU
in one kernel each way (forward without a zero array for 16-bit floats; the gradient instead of
two or three); a 16-bit float's sum over axes in one kernel (accumulated in float32, rounded on
the store) instead of a sum and a cast, a raw one for a bias gradient.

An eager step on a GPU is bound by launching kernels from Python (each launch costs tens of
microseconds of host time on the lent machines), and the cross-entropy written with array
operations launches about thirteen kernels forward (a cast, the row maximum, the shift, the
exponential, the row sums, the division, the logarithm, the label gather, ...) and five more for
its gradient. Here one kernel computes each row's softmax (kept for the gradient) and its loss,
one their mean or sum, and one the gradient of the logits, in the logits' dtype.

The arithmetic is the array code's, step for step, in the same dtype (float32 for 16-bit logits,
as there): the row maximum, ``exp(z - max)``, the row sum, the division, and the loss
``log(sum) - (z[label] - max)`` (the difference first, as torch: a small ``log(sum)`` added to a
large max would round away). The row sum is added in order, so results can differ from the
array code's tree-shaped sums in the last bits; a label outside ``[0, C)`` gives that row a NaN
loss, and so the mean or sum (the array code adds a NaN from a kernel of its own instead).

One thread per row: meant for classification heads. Rows longer than :data:`MAX_CLASSES` take the
array code.

Imported only from the math's rules (cross-entropy, ReLU) and 16-bit sums, through the backend,
on cupy arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import cupy
import numpy as np

from ._dtypes import is_floating
from ._fused_source import built

__all__ = [
    "COLUMN_SUM_ROWS",
    "LOSS_SUM_ROWS",
    "MAX_CLASSES",
    "cross_entropy_grad",
    "cross_entropy_rows",
    "embedding_rows",
    "fits",
    "half_sum",
    "mean_of_kept",
    "reduce_losses",
    "relu",
    "relu_grad",
]

#: the longest row (number of classes) the fused kernels take; one thread walks a row three times
MAX_CLASSES = 1024

_FORWARD = r"""
const long long base = i * c;
A m = (A)z[base];
for (long long j = 1; j < c; ++j) {
  const A v = (A)z[base + j];
  m = v > m ? v : m;
}
A s = 0;
for (long long j = 0; j < c; ++j) {
  const A e = exp((A)z[base + j] - m);
  p[base + j] = e;
  s += e;
}
for (long long j = 0; j < c; ++j) p[base + j] = p[base + j] / s;
const long long label = (long long)y[i];
nll = (ignoring && label == ignore) ? (A)0
    : (label >= 0 && label < c) ? log(s) - ((A)z[base + label] - m) : (A)nan("");
"""

_GRADIENT = r"""
const long long r = i / c;
const long long label = (long long)y[r];
const A onehot = (label == i % c) ? (A)1 : (A)0;
const A scale = per_row ? g[r] : (mean ? g[0] / (ignoring ? kept[0] : n) : g[0]);
grad = (ignoring && label == ignore) ? (T)(p * (A)0) : (T)((p - onehot) * scale);
"""

# max(x, 0) as numpy's and cupy's maximum compute it: NaN comes through, -0 becomes +0; for
# 16-bit floats, without the zero array the array code makes each call (A: as just below)
_RELU = "const A v = (A)x; y = (v > (A)0 || v != v) ? x : (T)(A)0;"

# g where out != 0, else +0, as the array code selects it (torch's rule: a NaN input, whose
# output is NaN, passes g; an infinite or NaN g where the output is 0 gives 0), in one pass
# instead of a comparison, a cast of the mask and a select (A: the arithmetic's type, double
# for float64 and float otherwise, as a typedef: cupy infers a kernel's type placeholders from
# its array arguments only)
_RELU_GRAD = "grad = ((A)out != (A)0) ? g : (T)(A)0;"


# out[..., j] = w[id, j] for an id in [0, n), else NaN (A: float, or double for float64, as for
# the ReLU: a 16-bit T is built from a float); ids of an unsigned type past 2**63 turn negative
_EMBEDDING = r"""
const long long id = (long long)ids[i / d];
out = (id >= 0 && id < n) ? w[id * d + i % d] : (T)(A)nan("");
"""


@functools.cache
def _forward() -> Any:
    return cupy.ElementwiseKernel(
        "raw T z, raw I y, int64 c, int64 ignore, bool ignoring",
        "raw A p, A nll",
        _FORWARD,
        "asyncnn_cross_entropy_rows",
    )


@functools.cache
def _gradient() -> Any:
    return cupy.ElementwiseKernel(
        "A p, raw I y, raw A g, int64 c, A n, bool per_row, bool mean, raw A kept, int64 ignore,"
        " bool ignoring", "T grad", _GRADIENT, "asyncnn_cross_entropy_grad",
    )  # fmt: skip


@functools.cache
def _relu_gradient(ctype: str) -> Any:
    return cupy.ElementwiseKernel(
        "T g, T out", "T grad", _RELU_GRAD, f"asyncnn_relu_grad_{ctype}",
        preamble=f"typedef {ctype} A;",
    )  # fmt: skip


@functools.cache
def _relu_forward(ctype: str) -> Any:
    return cupy.ElementwiseKernel(
        "T x", "T y", _RELU, f"asyncnn_relu_{ctype}", preamble=f"typedef {ctype} A;"
    )


@functools.cache
def _embedding(ctype: str) -> Any:
    return cupy.ElementwiseKernel(
        "raw T w, raw I ids, int64 n, int64 d", "T out", _EMBEDDING,
        f"asyncnn_embedding_rows_{ctype}", preamble=f"typedef {ctype} A;",
    )  # fmt: skip


def embedding_rows(weight: Any, ids: Any) -> Any:
    """``weight[ids]`` for a float (n, d) ``weight`` and integer ``ids`` of any shape, in one
    kernel: ``ids.shape + (d,)``, with NaN rows where an id is outside ``[0, n)`` (negative
    ones included: they are not counted from the end)."""
    n, d = weight.shape
    out = cupy.empty((*ids.shape, d), dtype=weight.dtype)
    # raw arrays are read by flat index: both C-contiguous and flat (a copy only for views)
    w = cupy.ascontiguousarray(weight).reshape(-1)
    flat = cupy.ascontiguousarray(ids).reshape(-1)
    ctype = "double" if weight.dtype == np.float64 else "float"
    _embedding(ctype)(w, flat, np.int64(n), np.int64(d), out)
    return out


def relu(x: Any) -> Any:
    """``max(x, 0)`` of a float ``x`` in one kernel, as ``maximum(x, 0)`` computes it bit for
    bit (NaN kept, ``-0`` to ``+0``)."""
    return _relu_forward("double" if x.dtype == np.float64 else "float")(x)


def relu_grad(g: Any, out: Any) -> Any:
    """The gradient of ``relu`` at its output ``out`` (``g`` where ``out != 0``, a positive or
    NaN output, else ``0 * g``), in one kernel; ``g`` and ``out`` of one shape and dtype."""
    return _relu_gradient("double" if g.dtype == np.float64 else "float")(g, out)


@functools.cache
def _half_sum() -> Any:
    return cupy.ReductionKernel(
        "T x", "T y", "(float)x", "a + b", "y = (T)a", "0", "asyncnn_half_sum",
        reduce_type="float",
    )  # fmt: skip


# (C type, header, to float, from float rounding to nearest) of each 16-bit float
_HALF_C = {
    "float16": ("__half", "cuda_fp16.h", "__half2float", "__float2half_rn"),
    "bfloat16": ("__nv_bfloat16", "cuda_bf16.h", "__bfloat162float", "__float2bfloat16_rn"),
}

#: the most rows :func:`half_sum` adds with the column kernel (each thread walks rows/8 of them)
COLUMN_SUM_ROWS = 16384

# a (rows, cols) array's column sums: a block takes 32 columns; its 8 rows of threads add every
# 8th row each, in order, and the first row of threads adds the 8 partial sums in order, so the
# result depends on the shape alone; one launch whose host cost is a raw kernel's, a fraction of
# a reduction kernel's (a bias gradient, once per dense layer per step)
_COLUMN_SUM = r"""
#include <{header}>
extern "C" __global__ void asyncnn_column_sum_{name}(
    const {ctype}* x, {ctype}* y, long long rows, long long cols) {{
  __shared__ float part[8][33];
  const long long c = (long long)blockIdx.x * 32 + threadIdx.x;
  float s = 0.0f;
  if (c < cols)
    for (long long r = threadIdx.y; r < rows; r += 8) s += {to_float}(x[r * cols + c]);
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {{
    float t = part[0][threadIdx.x];
    for (int k = 1; k < 8; ++k) t += part[k][threadIdx.x];
    y[c] = {from_float}(t);
  }}
}}
"""


@functools.cache
def _column_sum(name: str) -> Any:
    ctype, header, to_float, from_float = _HALF_C[name]
    source = _COLUMN_SUM.format(
        header=header, name=name, ctype=ctype, to_float=to_float, from_float=from_float
    )
    # None: the reduction kernel serves
    return built(cupy.RawKernel(source, f"asyncnn_column_sum_{name}"))


def half_sum(x: Any, axis: Any, keepdims: bool) -> Any:
    """``x.sum(axis, dtype=float32).astype(x.dtype)`` for a 16-bit ``x``, in one kernel: the
    sum accumulated in float32 and rounded once.

    A C-contiguous 2-D array summed over axis 0 (a bias gradient) of at most
    :data:`COLUMN_SUM_ROWS` rows takes a raw kernel that adds each column's values in a fixed
    order (every 8th row in turn, then the 8 partial sums), cheaper to launch; anything else
    takes a reduction kernel that adds in the order of cupy's own. Either way the result may be
    one rounding apart from cupy's ``sum`` and cast, which may add in another order (CUB's).
    """
    if (
        x.ndim == 2
        and axis in (0, (0,))
        and x.flags.c_contiguous
        and 0 < x.shape[0] <= COLUMN_SUM_ROWS
        and x.shape[1] > 0
    ):
        kernel = _column_sum(str(x.dtype))
        if kernel is not None:
            rows, cols = x.shape
            y = cupy.empty((1, cols) if keepdims else (cols,), dtype=x.dtype)
            kernel(((cols + 31) // 32,), (32, 8), (x, y, np.int64(rows), np.int64(cols)))
            return y
    return _half_sum()(x, axis=axis, keepdims=keepdims)


#: the most losses :func:`reduce_losses` adds in its one block (each thread adds n/256 of them);
#: more (a loss per pixel, say) take cupy's own reduction, which spreads over the whole GPU
LOSS_SUM_ROWS = 16384

# the mean or the sum of a vector of float32 or float64 losses in one block: each of 256
# threads adds every 256th value in order, then a tree of fixed shape adds theirs; a raw kernel
# is cheaper to launch than cupy's reduction (a loss, once per step). Given labels (``y`` not
# null), it also counts those other than ``ignore`` beside the sums (whose order it keeps: the
# same bits where nothing is ignored), divides by that count and writes it to ``kept``.
_LOSS_SUM = r"""
extern "C" __global__ void asyncnn_loss_sum_{ctype}(
    const {ctype}* x, const long long* y, {ctype}* out, {ctype}* kept, long long n,
    long long ignore, {ctype} divisor) {{
  __shared__ {ctype} part[256];
  __shared__ {ctype} count[256];
  {ctype} s = 0;
  {ctype} k = 0;
  for (long long i = threadIdx.x; i < n; i += 256) {{
    s += x[i];
    if (y) k += (y[i] != ignore) ? ({ctype})1 : ({ctype})0;
  }}
  part[threadIdx.x] = s;
  count[threadIdx.x] = k;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {{
    if (threadIdx.x < w) {{
      part[threadIdx.x] += part[threadIdx.x + w];
      count[threadIdx.x] += count[threadIdx.x + w];
    }}
    __syncthreads();
  }}
  if (threadIdx.x == 0) {{
    if (y) kept[0] = count[0];
    out[0] = part[0] / (y ? count[0] : divisor);
  }}
}}
"""

# a null pointer for the kernel's ``y`` and ``kept`` (passed by value: a kernel's pointer is a
# 64-bit word)
_NULL = np.uint64(0)


@functools.cache
def _loss_sum(ctype: str) -> Any:
    return cupy.RawKernel(_LOSS_SUM.format(ctype=ctype), f"asyncnn_loss_sum_{ctype}")


def _ctype(losses: Any) -> str:
    return {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}[losses.dtype]


def reduce_losses(losses: Any, reduction: str) -> Any:
    """The ``"mean"`` or ``"sum"`` of a 1-D float32 or float64 array of losses as a 0-d
    array, in one kernel that adds in a fixed order (256 strided partial sums, then a tree);
    NaN where any loss is NaN, and NaN for the mean of none. More than :data:`LOSS_SUM_ROWS`
    losses take cupy's ``mean`` or ``sum`` instead (one block would be slow on them)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduce_losses: reduction must be 'mean' or 'sum', got {reduction!r}")
    if losses.size > LOSS_SUM_ROWS:
        return losses.mean() if reduction == "mean" else losses.sum()
    ctype = _ctype(losses)
    losses = cupy.ascontiguousarray(losses)
    n = losses.size
    out = cupy.empty((), dtype=losses.dtype)
    divisor = losses.dtype.type(n if reduction == "mean" else 1)
    args = (losses, _NULL, out, _NULL, np.int64(n), np.int64(0), divisor)
    _loss_sum(ctype)((1,), (256,), args)
    return out


def mean_of_kept(losses: Any, labels: Any, ignore: int) -> tuple[Any, Any]:
    """``(mean, kept)``: the mean of a 1-D float32 or float64 array of ``losses`` over the
    positions whose label is not ``ignore`` (their losses already 0), and how many those are,
    both 0-d arrays of the losses' dtype, in one kernel that adds the losses as
    :func:`reduce_losses` does (the same bits where no label is ignored). With every label
    ignored the mean is NaN, as torch's. More than :data:`LOSS_SUM_ROWS` losses take cupy's
    sums instead."""
    labels = labels.reshape(-1)
    if losses.size > LOSS_SUM_ROWS:
        kept = (labels != ignore).sum(dtype=losses.dtype)
        return losses.sum() / kept, kept
    ctype = _ctype(losses)
    losses = cupy.ascontiguousarray(losses)
    labels = cupy.ascontiguousarray(labels.astype(cupy.int64, copy=False))
    out = cupy.empty((), dtype=losses.dtype)
    kept = cupy.empty((), dtype=losses.dtype)
    one = losses.dtype.type(1)  # (not read: the count divides)
    args = (losses, labels, out, kept, np.int64(losses.size), np.int64(ignore), one)
    _loss_sum(ctype)((1,), (256,), args)
    return out, kept


def fits(rows: Any, labels: Any) -> bool:
    """Whether the fused kernels take these (M, C) ``rows`` and ``labels`` (M of them): a
    floating array (bfloat16 included) of at most :data:`MAX_CLASSES` columns, integer labels."""
    return (
        rows.ndim == 2
        and 0 < rows.shape[1] <= MAX_CLASSES
        and is_floating(rows.dtype)
        and labels.dtype.kind in "iu"
        and labels.size == rows.shape[0]
    )


def cross_entropy_rows(
    rows: Any, labels: Any, compute: Any, ignore: int | None = None
) -> tuple[Any, Any]:
    """``(softmax, loss per row)`` of (M, C) logits ``rows`` against (M,) integer ``labels``,
    both in the dtype ``compute`` (the logits' own, or float32 for 16-bit ones), in one kernel.
    A row whose label is ``ignore`` (where given) has a loss of 0."""
    m, c = rows.shape
    p = cupy.empty((m, c), dtype=compute)
    nll = cupy.empty((m,), dtype=compute)
    # raw arrays are read by flat index: both must be C-contiguous (a copy only for views)
    rows = cupy.ascontiguousarray(rows)
    labels = cupy.ascontiguousarray(labels.reshape(-1))
    index = np.int64(0 if ignore is None else ignore)
    _forward()(rows, labels, np.int64(c), index, ignore is not None, p, nll)
    return p, nll


def cross_entropy_grad(
    softmax: Any,
    labels: Any,
    g: Any,
    reduction: str,
    dtype: Any,
    ignore: int | None = None,
    kept: Any = None,
) -> Any:
    """The gradient of the loss with respect to the (M, C) logits, in ``dtype``: ``(softmax -
    onehot(labels))`` times the incoming gradient ``g`` (a 0-d array for ``"mean"`` and
    ``"sum"``, divided by M for ``"mean"``; one value per row for ``"none"``), in one kernel.
    With ``ignore``, the rows whose label it is get a gradient of 0, and the mean divides by
    ``kept`` instead (a 0-d array of the softmax's dtype: how many rows are not ignored, from
    :func:`mean_of_kept`)."""
    m, c = softmax.shape
    labels = cupy.ascontiguousarray(labels.reshape(-1))
    g = cupy.ascontiguousarray(cupy.asarray(g, dtype=softmax.dtype).reshape(-1))
    grad = cupy.empty((m, c), dtype=dtype)
    if kept is None:  # (read only for an ignoring mean)
        kept = g
    index = np.int64(0 if ignore is None else ignore)
    _gradient()(
        softmax, labels, g, np.int64(c), softmax.dtype.type(m), reduction == "none",
        reduction == "mean", kept.reshape(-1), index, ignore is not None, grad,
    )  # fmt: skip
    return grad
