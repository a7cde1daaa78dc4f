"""Floating dtypes, bfloat16 included, and sums that accumulate 16-bit floats in float32.

numpy knows bfloat16 only through the ``ml_dtypes`` package, as a dtype of kind ``"V"``, so
``dtype.kind == "f"`` misses it: ask :func:`is_floating`. cupy (14 and later) computes with it
when ml_dtypes is installed. Importing this module registers the name ``"bfloat16"`` with numpy
when ml_dtypes is there, so ``numpy.dtype("bfloat16")`` works everywhere after ``import asyncnn``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._parallel import current_team
from ._registry import fused_nn_kernels_of

try:  # optional: only the 16-bit brain float needs it
    import ml_dtypes as _ml_dtypes
except ImportError:  # pragma: no cover - depends on the machine
    _ml_dtypes = None

__all__ = [
    "BFLOAT16",
    "acc_sum",
    "is_floating",
    "is_half",
    "rebuildable_name",
    "unknown_dtype_hint",
]

#: numpy's bfloat16 dtype (from ml_dtypes), or None where ml_dtypes is not installed
BFLOAT16: np.dtype[Any] | None = None if _ml_dtypes is None else np.dtype(_ml_dtypes.bfloat16)


# dtype -> its name from rebuildable_name, filled as dtypes are first met (asked per tensor)
_NAMES: dict[np.dtype[Any], str | None] = {}


def rebuildable_name(dtype: np.dtype[Any]) -> str | None:
    """A name that ``np.dtype`` rebuilds ``dtype`` from (in another process, or reading a file):
    its ``str`` (``"<f4"``: byte order included) or, where that names another dtype, its name:
    the extension floats of ml_dtypes have the ``str`` ``"<V2"`` (bfloat16: raw bytes, read back
    as void) or ``"<f1"`` (float8_e5m2: unknown to numpy), while numpy knows their names once
    ml_dtypes is imported. None where neither rebuilds it (a structured dtype)."""
    if dtype in _NAMES:
        return _NAMES[dtype]
    found = None
    for code in (dtype.str, dtype.name):
        try:
            if np.dtype(code) == dtype:
                found = code
                break
        except TypeError:
            pass
    _NAMES[dtype] = found
    return found


def unknown_dtype_hint(dtype: Any) -> str:
    """How to fix a dtype that numpy refused, as ``" (...)"`` to end the error with, or ``""``.

    numpy knows the name ``"bfloat16"`` once ml_dtypes is imported (this module does it), so
    only a machine without the package refuses it: every such error should say to install it.
    """
    if BFLOAT16 is None and isinstance(dtype, str) and dtype == "bfloat16":
        return " (numpy knows bfloat16 only through the ml_dtypes package: pip install ml_dtypes)"
    return ""


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating dtype (numpy's kind ``"f"``, any width, or
    bfloat16); False for None (no dtype, as ``getattr(x, "dtype", None)`` gives), which
    ``np.dtype`` would read as float64. The math treats these as differentiable (a cast to a
    long double keeps its gradient); a run's own ``dtype`` must also pass
    :func:`is_compute_float`."""
    if dtype is None:
        return False
    if isinstance(dtype, np.dtype):  # an array's dtype: asked on every 16-bit check of a step
        dt = dtype
    else:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            return False
    return dt.kind == "f" or (BFLOAT16 is not None and dt == BFLOAT16)


def is_compute_float(dtype: Any) -> bool:
    """Whether ``dtype`` is one asyncnn computes a run's parameters in: float16, float32,
    float64 or bfloat16. Not ml_dtypes' float8 types (``float8_e5m2`` is of kind ``"f"``, but
    its sums are not widened as 16-bit ones are: a run in it trained on 1-byte sums) nor
    numpy's long double where it is wider than float64 (no GPU computes in it)."""
    # (the item size tells float16/32/64 from the float8s and the long double, whatever the
    # byte order; bfloat16 is of kind "V")
    if not is_floating(dtype):
        return False
    dt = np.dtype(dtype)
    return dt.kind != "f" or dt.itemsize in _FLOAT_SIZES


_FLOAT_SIZES = (2, 4, 8)  # float16, float32, float64


def is_half(dtype: Any) -> bool:
    """Whether ``dtype`` is a 16-bit float (float16 or bfloat16): sums of it run in float32."""
    dt = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
    return dt.itemsize == 2 and is_floating(dt)


def acc_sum(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """``x.sum(axis, keepdims)`` in ``x``'s dtype, accumulated in float32 for 16-bit floats.

    A bfloat16 accumulator has 8 significant bits: summing 10^5 ones in it gives 99,840 on cupy.
    """
    if is_half(x.dtype):
        fused = None if axis is None else fused_nn_kernels_of(x)
        if fused is not None:  # one kernel on a GPU (a bias gradient): no cast after it
            return fused.half_sum(x, axis, keepdims)
        return x.sum(axis=axis, keepdims=keepdims, dtype=np.float32).astype(x.dtype)
    if (axis == 0 or axis == (0,)) and type(x) is np.ndarray and x.ndim == 2:
        team = current_team()  # a bias gradient on a compute team: cut by columns
        if team is not None:
            out = team.sum_rows(x)
            return out[None, :] if keepdims else out
    return x.sum(axis=axis, keepdims=keepdims)


def acc_mean(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """``x.mean(axis, keepdims)``, accumulated in float32 for 16-bit floats."""
    if is_half(x.dtype):
        return x.mean(axis=axis, keepdims=keepdims, dtype=np.float32).astype(x.dtype)
    return x.mean(axis=axis, keepdims=keepdims)
