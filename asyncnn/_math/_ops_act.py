"""torch's activations with hyperparameters, and ``clip``: thin public functions over the
elementwise rules (``_rules_elementwise.py``), apart from ``_ops.py`` for their argument checks:
numbers taken as Python floats (so that a float32 input stays float32), bounds rounded to the
input's dtype as torch rounds them."""

from __future__ import annotations

from typing import Any

import numpy as np

from asyncnn.backends import is_floating

from ._autodiff import Tracer
from ._ops import _P, _dtype, _is_number, _number, as_array, check_floating, raw

__all__ = ["clip", "elu", "hardtanh", "leaky_relu", "silu", "softplus"]


def _bound(value: Any, x: Any, name: str, op: str) -> Any:
    """A bound of :func:`clip`: a Python number, rounded to a float ``x``'s dtype (torch takes a
    scalar bound in the input's dtype: compared in float64, a float32 input equal to the
    rounded bound counted as below it), or None.

    Raises:
        TypeError: when the bound is an array or no number.
    """
    if value is None:
        return None
    if not _is_number(value):
        if hasattr(value, "shape") or isinstance(value, list | tuple):
            raise TypeError(
                f"{op}: {name} must be a number or None, got an array of shape "
                f"{np.shape(raw(value))}; for bounds per entry, use "
                "ops.minimum(ops.maximum(x, lo), hi) (whose gradient is halved at ties)"
            )
        raise TypeError(
            f"{op}: {name} must be a number or None, got {type(value).__name__} {value!r:.60}"
        )
    dtype = _dtype(x)
    if dtype is None or not is_floating(dtype):
        return value  # (an integer input: numpy's promotion, a float bound gives floats)
    with np.errstate(over="ignore"):  # (past float16's range: inf, which bounds nothing)
        return float(np.asarray(float(value)).astype(dtype))


def clip(x: Any, min: Any = None, max: Any = None) -> Any:  # noqa: A002 - torch's names
    """``x`` limited to ``[min, max]`` (numpy's ``clip``, torch's ``clamp``); either bound may
    be None, not both.

    The gradient is torch's clamp's: the cotangent where ``min <= x <= max`` (at a bound too),
    +0 elsewhere and at a NaN input (whose output is NaN). Where ``min > max`` every output is
    ``max``, as in torch and numpy. The bounds are numbers, taken in a float input's dtype (as
    torch takes them); an integer input stays integer with integer bounds. ``np.clip(t, lo,
    hi)`` of a traced array calls this, with the same errors.

    Raises:
        ValueError: when both bounds are None.
        TypeError: when a bound is an array (use :func:`maximum` and :func:`minimum`) or no
            number.
    """
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "clip")
    lo, hi = _bound(min, x, "min", "clip"), _bound(max, x, "max", "clip")
    if lo is None and hi is None:
        raise ValueError(
            "clip: give min, max or both (torch.clamp and numpy's clip need one too), e.g. "
            "ops.clip(x, min=0.0)"
        )
    return _P["clip"](x, lo=lo, hi=hi)


def hardtanh(x: Any, min_val: float = -1.0, max_val: float = 1.0) -> Any:
    """torch's ``hardtanh``: :func:`clip` whose gradient is 0 at the bounds too (the cotangent
    only where ``min_val < x < max_val``). An integer input stays integer, its bounds truncated
    towards 0 as torch's are. For ``nn.Hardtanh``, which checks its fields."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "hardtanh")
    dtype = _dtype(x)
    if dtype is not None and not is_floating(dtype):
        # (an infinite bound bounds no integer: none on that side)
        int_lo = None if min_val == -np.inf else int(min_val)
        int_hi = None if max_val == np.inf else int(max_val)
        return _P["clip"](x, lo=int_lo, hi=int_hi, inclusive=False)
    lo, hi = _bound(min_val, x, "min_val", "hardtanh"), _bound(max_val, x, "max_val", "hardtanh")
    if dtype == np.float16:
        # torch compares float16 with the float32 bounds (its kernel runs in float32): 0.09998
        # lies inside Hardtanh(-0.1, 0.1) though float16 rounds 0.1 to it (the rule computes
        # float16 in float32)
        lo, hi = float(np.float32(min_val)), float(np.float32(max_val))
    return _P["clip"](x, lo=lo, hi=hi, inclusive=False)


def leaky_relu(x: Any, negative_slope: float = 0.01) -> Any:
    """``x`` where ``x > 0``, else ``negative_slope * x`` (torch's ``leaky_relu``). The gradient
    at 0 and at a NaN input is ``negative_slope`` times the cotangent, as torch's.

    Raises:
        TypeError: when ``x`` is not floating point, or ``negative_slope`` no number.
    """
    slope = _number(negative_slope, "leaky_relu", "negative_slope")
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "leaky_relu")
    check_floating(x, "leaky_relu")
    return _P["leaky_relu"](x, negative_slope=slope)


def elu(x: Any, alpha: float = 1.0) -> Any:
    """``x`` where ``x > 0``, else ``alpha * (exp(x) - 1)`` (torch's ``elu``, through
    ``expm1``). The gradient at 0 is ``alpha`` times the cotangent, at a NaN input the cotangent.

    Raises:
        TypeError: when ``x`` is not floating point, or ``alpha`` no number.
    """
    a = _number(alpha, "elu", "alpha")
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "elu")
    check_floating(x, "elu")
    return _P["elu"](x, alpha=a)


def silu(x: Any) -> Any:
    """SiLU (swish), ``x * sigmoid(x)``, computed as torch's ``x / (1 + exp(-x))``.

    Raises:
        TypeError: when ``x`` is not floating point.
    """
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "silu")
    check_floating(x, "silu")
    return _P["silu"](x)


def softplus(x: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
    """torch's ``softplus``: ``log(1 + exp(beta * x)) / beta``, and ``x`` itself where
    ``beta * x > threshold`` (gradient 1 there, ``sigmoid(beta * x)`` elsewhere).

    Raises:
        TypeError: when ``x`` is not floating point, or ``beta`` or ``threshold`` no number.
    """
    b = _number(beta, "softplus", "beta")
    t = _number(threshold, "softplus", "threshold")
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "softplus")
    check_floating(x, "softplus")
    return _P["softplus"](x, beta=b, threshold=t)
