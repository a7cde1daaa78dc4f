"""Fused softmax cross-entropy on cupy: two kernels a step instead of about eighteen; the
ReLU's gradient in one kernel instead of two or three; a 16-bit float's sum over axes in one
kernel (accumulated in float32, rounded on the store) instead of a sum and a cast.

An eager step on a GPU is bound by launching kernels from Python (each launch costs tens of
microseconds of host time on the lent machines), and the cross-entropy written with array
operations launches about thirteen kernels forward (a cast, the row maximum, the shift, the
exponential, the row sums, the division, the logarithm, the label gather, ...) and five more for
its gradient. Here one kernel computes each row's softmax (kept for the gradient) and its loss,
and one computes the gradient of the logits, in the logits' dtype.

The arithmetic is the array code's, step for step, in the same dtype (float32 for 16-bit logits,
as there): the row maximum, ``exp(z - max)``, the row sum, the division, and the loss
``(log(sum) + max) - z[label]``. The row sum is added in order, so results can differ from the
array code's tree-shaped sums in the last bits; a label outside ``[0, C)`` gives that row a NaN
loss (the op's own label check still makes the whole loss NaN).

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

__all__ = [
    "MAX_CLASSES",
    "cross_entropy_grad",
    "cross_entropy_rows",
    "fits",
    "half_sum",
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
nll = (label >= 0 && label < c) ? (log(s) + m) - (A)z[base + label] : (A)nan("");
"""

_GRADIENT = r"""
const long long r = i / c;
const A onehot = ((long long)y[r] == i % c) ? (A)1 : (A)0;
const A scale = per_row ? g[r] : (mean ? g[0] / n : g[0]);
grad = (T)((p - onehot) * scale);
"""

# g * (out > 0) as the array code computes it (a product with 1 or 0: exact, so NaN and -0
# in g come through as there), in one pass instead of a comparison, a product and, for 16-bit
# floats, a cast of the mask (A: the arithmetic's type, double for float64 and float otherwise,
# as a typedef: cupy infers a kernel's type placeholders from its array arguments only)
_RELU_GRAD = "grad = (T)((A)g * (((A)out > (A)0) ? (A)1 : (A)0));"


@functools.cache
def _forward() -> Any:
    return cupy.ElementwiseKernel(
        "raw T z, raw I y, int64 c", "raw A p, A nll", _FORWARD, "asyncnn_cross_entropy_rows"
    )


@functools.cache
def _gradient() -> Any:
    return cupy.ElementwiseKernel(
        "A p, raw I y, raw A g, int64 c, A n, bool per_row, bool mean", "T grad", _GRADIENT,
        "asyncnn_cross_entropy_grad",
    )  # fmt: skip


@functools.cache
def _relu_gradient(ctype: str) -> Any:
    return cupy.ElementwiseKernel(
        "T g, T out", "T grad", _RELU_GRAD, f"asyncnn_relu_grad_{ctype}",
        preamble=f"typedef {ctype} A;",
    )  # fmt: skip


def relu_grad(g: Any, out: Any) -> Any:
    """The gradient of ``relu`` at its output ``out`` (``g`` where ``out > 0``, else ``0 * g``),
    in one kernel; ``g`` and ``out`` of one shape and dtype."""
    return _relu_gradient("double" if g.dtype == np.float64 else "float")(g, out)


@functools.cache
def _half_sum() -> Any:
    return cupy.ReductionKernel(
        "T x", "T y", "(float)x", "a + b", "y = (T)a", "0", "asyncnn_half_sum",
        reduce_type="float",
    )  # fmt: skip


def half_sum(x: Any, axis: Any, keepdims: bool) -> Any:
    """``x.sum(axis, dtype=float32).astype(x.dtype)`` for a 16-bit ``x``, in one kernel: the
    sum accumulated in float32 and rounded once. It adds in the order of cupy's own reduction
    kernels, so it equals the sum and the cast where cupy's ``sum`` takes those, and may be
    one rounding apart where cupy's sum adds in another order (CUB's)."""
    return _half_sum()(x, axis=axis, keepdims=keepdims)


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


def cross_entropy_rows(rows: Any, labels: Any, compute: Any) -> tuple[Any, Any]:
    """``(softmax, loss per row)`` of (M, C) logits ``rows`` against (M,) integer ``labels``,
    both in the dtype ``compute`` (the logits' own, or float32 for 16-bit ones), in one kernel."""
    m, c = rows.shape
    p = cupy.empty((m, c), dtype=compute)
    nll = cupy.empty((m,), dtype=compute)
    # raw arrays are read by flat index: both must be C-contiguous (a copy only for views)
    rows = cupy.ascontiguousarray(rows)
    labels = cupy.ascontiguousarray(labels.reshape(-1))
    _forward()(rows, labels, np.int64(c), p, nll)
    return p, nll


def cross_entropy_grad(softmax: Any, labels: Any, g: Any, reduction: str, dtype: Any) -> Any:
    """The gradient of the loss with respect to the (M, C) logits, in ``dtype``: ``(softmax -
    onehot(labels))`` times the incoming gradient ``g`` (a 0-d array for ``"mean"`` and
    ``"sum"``, divided by M for ``"mean"``; one value per row for ``"none"``), in one kernel."""
    m, c = softmax.shape
    labels = cupy.ascontiguousarray(labels.reshape(-1))
    g = cupy.ascontiguousarray(cupy.asarray(g, dtype=softmax.dtype).reshape(-1))
    grad = cupy.empty((m, c), dtype=dtype)
    _gradient()(
        softmax, labels, g, np.int64(c), softmax.dtype.type(m), reduction == "none",
        reduction == "mean", grad,
    )  # fmt: skip
    return grad
