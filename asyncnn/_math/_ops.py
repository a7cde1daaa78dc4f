"""The differentiable operations: thin public functions over the primitives' rule tables.

Every function accepts raw backend arrays or traced arrays (and Python lists or tuples, taken as
numpy arrays). On raw arrays it computes and returns a raw array; inside ``vjp`` it also records
how to differentiate itself.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from asyncnn.backends import array_namespace, is_floating
from asyncnn.backends._dtypes import unknown_dtype_hint

from ._autodiff import Primitive, Tracer, _is_tracer
from ._autodiff_args import COMPLEX_REFUSED, _hides
from ._ops_checks import (
    check_broadcast,
    check_concatenated,
    check_matmul_batch,
    check_stacked,
    index_guard,
    is_integer,
)
from ._rules_array import RULES as _ARRAY_RULES
from ._rules_array import _is_basic_index, check_axis, normalize_axis
from ._rules_elementwise import RULES as _ELEMENTWISE_RULES

__all__ = [
    "abs", "add", "astype", "broadcast_to", "concatenate", "cos", "cumprod", "cumsum", "divide",
    "exp", "expand_dims", "expm1", "gelu", "getitem", "log", "log1p", "matmul", "max",
    "maximum", "mean", "min", "minimum", "multiply", "negative", "power", "prod", "relu",
    "reshape", "sigmoid", "sin", "sqrt", "square", "squeeze", "stack", "std", "subtract", "sum",
    "take", "tanh", "transpose", "unstack", "var", "where",
]  # fmt: skip

# One table: every primitive of asyncnn, by name. The nn primitives (softmax, conv, ...) join it
# when their module is imported (see _ops_nn).
PRIMITIVES: dict[str, Primitive] = {
    name: Primitive._builtin(name, fwd, rule)
    for name, (fwd, rule) in {**_ELEMENTWISE_RULES, **_ARRAY_RULES}.items()
}
_P = PRIMITIVES


def raw(x: Any) -> Any:
    """The raw array behind a traced array (no gradient will flow through the result)."""
    return x.value if type(x) is Tracer else x


def namespace_of(*xs: Any) -> Any:
    """The array module (numpy or cupy) of the given arrays, traced or raw."""
    return array_namespace(*(raw(x) for x in xs))


def zeros_like_raw(x: Any) -> Any:
    return array_namespace(x).zeros_like(x)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def check_floating(x: Any, name: str, arg: str = "x", *others: Any) -> None:
    """Refuses an integer or bool ``x``, the argument ``arg`` of op ``name``, where the op
    computes in floating point: numpy would promote it (an int64 image into a float32
    convolution gives float64, two int64 arrays an integer one), and it gets no gradient. The
    layers refuse such input too, as torch does.

    Args:
        x: the argument, raw or traced (a Python number has no dtype and passes; a list is
            an array by then, see :func:`as_array`).
        name: the op, named in the message.
        arg: the argument's name in the message.
        others: the op's other arrays: the first floating one's dtype is the cast suggested
            (float32 without one).

    Raises:
        TypeError: naming the op, the argument, its dtype and shape, and the cast to make.
    """
    dtype = _dtype(x)
    if dtype is not None and not is_floating(dtype):
        like = next((d for d in map(_dtype, others) if d is not None and is_floating(d)), None)
        cast = "float32" if like is None else str(like)
        raise TypeError(
            f"{name}: {arg} must be floating point, got dtype {dtype} (shape {_shape(x)}); "
            f"convert it first, e.g. {arg}.astype(np.{cast})"
        )


def _dtype(x: Any) -> Any:
    return getattr(raw(x), "dtype", None)


def as_array(x: Any, op: str) -> Any:
    """``x``, an array argument of op ``op``, with a Python list, tuple or number made a numpy
    array once, at the op's door, as numpy's functions take one: the rules compute with the
    array operators, and on two lists ``+`` concatenated them (``ops.add([1., 2.], [3., 4.])``
    gave a list of 4) and ``*`` repeated them. Anything else is returned as it is.

    Raises:
        TypeError: when the list holds traced arrays (a numpy array cannot hold them).
        ValueError: when the list is ragged (its rows of different lengths).
    """
    t = type(x)
    if t is np.ndarray or t is Tracer:  # (the common cases, answered first)
        return x
    if t is float or t is int or t is bool:
        # (an op's one array argument: relu(2.0) failed on its missing dtype; a number beside
        # an array stays a number, see _broadcasting, for numpy's weak promotion)
        return np.asarray(x)
    if isinstance(x, list | tuple):
        if _hides(x, _is_tracer):
            raise TypeError(
                f"{op}: got a {type(x).__name__} holding traced arrays, which cannot become one "
                "array without losing their gradients; join them with ops.stack(...) first"
            )
        try:
            return np.asarray(x)
        except ValueError as e:  # (numpy's words name no op)
            raise ValueError(f"{op}: the {type(x).__name__} given is not an array: {e}") from None
    return x


def _broadcasting(name: str, *args: Any, **params: Any) -> Any:
    """``_P[name](*args, **params)``, where a shape mismatch fails naming the op and the shapes
    instead of with numpy's message from inside the rule (lists and tuples are arrays)."""
    for a in args:
        t = type(a)  # (identity tests first: a union isinstance cost every scalar's op 12%)
        if t is np.ndarray or t is Tracer or t is float or t is int:
            continue
        if t is list or t is tuple or isinstance(a, list | tuple):  # (a NamedTuple too)
            # only the lists: a Python number beside them stays one (numpy's weak promotion:
            # where(mask_list, x32, 0.0) is float32)
            args = tuple([as_array(b, name) if isinstance(b, list | tuple) else b for b in args])
            break
    try:
        out = _P[name](*args, **params)
    except ValueError:
        check_broadcast(name, [_shape(a) for a in args])
        raise
    if type(out) is Tracer and out.value.dtype.kind == "c":
        raise _complex_result(name, args)
    return out


def _complex_result(op: str, args: Sequence[Any], dtype: Any = None) -> TypeError:
    """The error for op ``op`` whose result from a traced (real) array is complex: mixed with a
    complex constant among ``args``, or cast to the complex ``dtype``. Its rules would take the
    complex cotangent without conjugates, and the real gradient is wrong."""
    traced = next(a for a in args if type(a) is Tracer)
    what = f"a traced (differentiated) {traced.dtype} array of shape {traced.shape}"
    if dtype is not None:
        what = f"{what} cast to {np.dtype(dtype)}"
    else:
        const: Any = next((a for a in args if type(a) is not Tracer and np.iscomplexobj(a)), 0j)
        with_ = (
            f"a {const.dtype} constant of shape {tuple(const.shape)}"
            if hasattr(const, "shape") and not isinstance(const, complex)
            else f"the complex number {const!r}"
        )
        what = f"{what} with {with_}"
    return TypeError(
        f"{op}: {what} gives a complex result, and {COMPLEX_REFUSED}; or take the value "
        "without its gradient first (ops.raw(x))"
    )


# -- elementwise ----------------------------------------------------------------------------------
def add(a: Any, b: Any) -> Any:
    """``a + b`` with numpy broadcasting."""
    return _broadcasting("add", a, b)


def subtract(a: Any, b: Any) -> Any:
    """``a - b`` with numpy broadcasting."""
    return _broadcasting("subtract", a, b)


def multiply(a: Any, b: Any) -> Any:
    """``a * b`` with numpy broadcasting."""
    return _broadcasting("multiply", a, b)


def divide(a: Any, b: Any) -> Any:
    """``a / b`` with numpy broadcasting."""
    return _broadcasting("divide", a, b)


def negative(x: Any) -> Any:
    """``-x``."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "negative")
    return _P["negative"](x)


def power(a: Any, b: Any) -> Any:
    """``a ** b``.

    The gradients are torch's: ``b * a**(b - 1)`` (0 where ``b == 0``) for ``a`` and
    ``out * log(a)`` (0 where ``a == 0`` and ``b >= 0``, NaN where ``a < 0``) for ``b``, except
    where ``a == 0`` and ``b < 0``: there ``out`` is infinite for every such ``b``, and the
    gradient for ``b`` is NaN, where torch gives -inf. As in torch, a float32 or float64
    ``a ** -0.5`` is ``1 / sqrt(a)`` (NaN at -inf, -inf at -0.0), in the value and in the
    gradient of ``a ** 0.5``.
    """
    return _broadcasting("power", a, b)


def square(x: Any) -> Any:
    """``x * x``."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "square")
    return _P["multiply"](x, x)


def exp(x: Any) -> Any:
    """Elementwise exponential."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "exp")
    return _P["exp"](x)


def log(x: Any) -> Any:
    """Elementwise natural logarithm."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "log")
    return _P["log"](x)


def tanh(x: Any) -> Any:
    """Elementwise hyperbolic tangent."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "tanh")
    return _P["tanh"](x)


def sigmoid(x: Any) -> Any:
    """Elementwise logistic function ``1 / (1 + exp(-x))``, computed without overflow."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "sigmoid")
    return _P["sigmoid"](x)


def relu(x: Any) -> Any:
    """``max(x, 0)``; the gradient at 0 is 0 and at a NaN input the cotangent, as in torch
    (on the CPU and through the GPU's fused kernel alike)."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "relu")
    return _P["relu"](x)


def gelu(x: Any, approximate: str = "none") -> Any:
    """GELU, ``x * Phi(x)``; ``approximate="tanh"`` gives the tanh approximation (torch's names).

    Raises:
        TypeError: when ``x`` is not floating point (integers or bools), as ``nn.GELU`` and torch.
        ValueError: when ``approximate`` is neither ``"none"`` nor ``"tanh"``.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "gelu")
    check_floating(x, "gelu")
    return _P["gelu"](x, approximate=approximate)


def log1p(x: Any) -> Any:
    """Elementwise ``log(1 + x)``, precise for small ``x`` (gradient ``1 / (1 + x)``)."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "log1p")
    return _P["log1p"](x)


def expm1(x: Any) -> Any:
    """Elementwise ``exp(x) - 1``, precise for small ``x`` (gradient ``out + 1``)."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "expm1")
    return _P["expm1"](x)


def sin(x: Any) -> Any:
    """Elementwise sine."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "sin")
    return _P["sin"](x)


def cos(x: Any) -> Any:
    """Elementwise cosine."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "cos")
    return _P["cos"](x)


def _number(value: Any, op: str, name: str) -> float:
    """``value``, the hyperparameter ``name`` of op ``op``, as a Python float: a numpy float64
    scalar would promote a float32 input (NEP 50), a Python float keeps its dtype, as torch's
    scalars do.

    Raises:
        TypeError: naming the op and the argument, when ``value`` is no real number (a bool,
            a string, an array).
    """
    if not _is_number(value):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__} {value!r:.60}")
    return float(value)


def _is_number(value: Any) -> bool:
    """Whether ``value`` is a real number, Python's or numpy's, and no bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def sqrt(x: Any) -> Any:
    """Elementwise square root."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "sqrt")
    return _P["sqrt"](x)


def abs(x: Any) -> Any:  # noqa: A001 - numpy's name
    """Elementwise absolute value (gradient ``sign(x)``, 0 at 0 and at NaN, as in torch)."""
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "abs")
    return _P["abs"](x)


def maximum(a: Any, b: Any) -> Any:
    """Elementwise maximum; at ties each side gets half the gradient. Where one side is NaN (the
    output too), both get the whole gradient, as in torch."""
    return _broadcasting("maximum", a, b)


def minimum(a: Any, b: Any) -> Any:
    """Elementwise minimum; at ties each side gets half the gradient. Where one side is NaN (the
    output too), both get the whole gradient, as in torch."""
    return _broadcasting("minimum", a, b)


def where(condition: Any, a: Any, b: Any) -> Any:
    """``a`` where ``condition`` holds, else ``b``. The condition gets no gradient."""
    return _broadcasting("where", raw(condition), a, b)


def astype(x: Any, dtype: Any) -> Any:
    """``x`` converted to ``dtype``; the gradient is converted back. An integer or boolean
    ``dtype`` gives a constant: a step function has no gradient (torch's ``.long()``, too).

    Raises:
        TypeError: a complex ``dtype`` for a traced ``x`` (complex values are not
            differentiated: compute with the real and imaginary parts as real arrays).
    """
    x = as_array(x, "astype")
    try:
        dtype = np.dtype(dtype)
    except TypeError as exc:  # (numpy's own words, and how to get bfloat16 where it is absent)
        raise TypeError(f"astype: unknown dtype {dtype!r}{unknown_dtype_hint(dtype)}") from exc
    if raw(x).dtype == dtype:
        return x
    if not is_floating(dtype):
        if type(x) is Tracer and np.dtype(dtype).kind == "c":
            raise _complex_result("astype", [x], dtype)
        return _P["astype"](raw(x), dtype=dtype)
    return _P["astype"](x, dtype=dtype)


# -- reductions ------------------------------------------------------------------------------------
def sum(x: Any, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Any:  # noqa: A001
    """Sum over ``axis`` (all axes by default; ``axis=()`` sums over none, as in numpy, where
    torch's ``dim=()`` reduces all)."""
    x = as_array(x, "sum")
    return _P["sum"](x, axis=checked_axis(normalize_axis, axis, x, "sum"), keepdims=keepdims)


def mean(x: Any, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Any:
    """Mean over ``axis`` (all axes by default; ``axis=()`` over none, as in numpy). The mean of
    an empty axis is NaN, with numpy's warning."""
    x = as_array(x, "mean")
    return _P["mean"](x, axis=checked_axis(normalize_axis, axis, x, "mean"), keepdims=keepdims)


def max(x: Any, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Any:  # noqa: A001
    """Maximum over ``axis`` (all axes by default).

    Tied maxima share the gradient equally, as in ``torch.amax`` (while ``torch.max(x, dim)``
    gives it all to the index it returns). As ``torch.amax``'s, the gradient is the cotangent
    times each entry's share, so an infinite cotangent gives NaN at the entries that are not
    maxima, and a group holding a NaN has a NaN gradient throughout (``torch.max(x)`` without
    a dim selects instead: 0 at the others, and all of it to the NaN entries).

    Raises:
        ValueError: when a reduced axis has length 0 (an empty maximum has no value).
    """
    x = as_array(x, "max")
    return _P["max"](x, axis=_nonempty_axes(x, axis, "max"), keepdims=keepdims)


def min(x: Any, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Any:  # noqa: A001
    """Minimum over ``axis`` (all axes by default); ties share the gradient as in ``max``.

    Raises:
        ValueError: when a reduced axis has length 0 (an empty minimum has no value).
    """
    x = as_array(x, "min")
    return _P["min"](x, axis=_nonempty_axes(x, axis, "min"), keepdims=keepdims)


def var(
    x: Any, axis: int | Sequence[int] | None = None, ddof: float = 0, keepdims: bool = False
) -> Any:
    """Variance over ``axis`` (all axes by default), numpy's ``var``: the sum of squared
    deviations from the mean divided by ``n - ddof``. torch's ``correction`` is ``ddof``, but
    torch's default is 1 (the unbiased estimate) and numpy's, this one's, 0. A bool ``ddof``
    counts as 0 or 1, as in numpy and torch (``ddof=True`` is the unbiased estimate).

    The gradient is torch's, ``2 * g * (x - mean) / (n - ddof)``. float16 and bfloat16 compute
    in float32 and round once, as torch does (a deviation of 300 squared overflows float16).
    Where ``ddof >= n`` the variance divides by 0, inf (NaN for a constant group) as in numpy
    and torch, with a ``RuntimeWarning``. The gradient there is still ``2 * g * (x - mean) /
    (n - ddof)``, as ``torch.var(x, dim, correction=ddof)``'s: ``±inf`` (NaN at the mean)
    where ``ddof == n``, finite and of the other sign where ``ddof > n``, for any ``axis``,
    ``None`` included. torch's form without a dim, ``torch.var(x, correction=c)`` with ``c``
    at least ``x.numel()`` (and any form on a 0-d ``x``), gives ``g * inf`` at every entry
    instead (NaN at the mean).

    Raises:
        TypeError: an integer or bool ``x`` (numpy would give float64, torch refuses it), or a
            ``ddof`` that is no number.
        ValueError: an axis out of range or named twice, or a ``ddof`` that is not finite.
    """
    return _variance_op("var", x, axis, ddof, keepdims)


def std(
    x: Any, axis: int | Sequence[int] | None = None, ddof: float = 0, keepdims: bool = False
) -> Any:
    """Standard deviation over ``axis``, ``sqrt(var(x, axis, ddof))``: numpy's ``std`` (torch's
    ``correction`` is ``ddof``, whose torch default is 1, numpy's and this one's 0; a bool
    ``ddof`` counts as 0 or 1).

    Its gradient is torch's, ``g * (x - mean) / ((n - ddof) * std)``, and 0 where the standard
    deviation is 0 (a constant group), as torch sets it (``sqrt(var(x))`` would give 0/0 = NaN
    there); NaN where the std is NaN (one entry with ``ddof=1``). 16-bit inputs and
    ``ddof >= n`` as :func:`var`: ``torch.std(x, dim, correction=ddof)``'s gradient, NaN where
    ``ddof == n`` and 0 where ``ddof > n`` (NaN for a constant group, whose std is NaN), where
    torch's form without a dim (or on a 0-d ``x``) gives NaN throughout.

    Raises:
        TypeError: an integer or bool ``x``, or a ``ddof`` that is no number.
        ValueError: an axis out of range or named twice, or a ``ddof`` that is not finite.
    """
    return _variance_op("std", x, axis, ddof, keepdims)


def cumsum(x: Any, axis: int | None = None) -> Any:
    """Cumulative sum along ``axis``: numpy's ``cumsum(x, axis)``, torch's ``cumsum(x, dim)``.
    ``axis=None`` (numpy's default; torch has none) sums over the flattened array, giving a 1-d
    result of ``x.size`` entries (a 0-d ``x`` gives shape ``(1,)``).

    The gradient is the cotangent's cumulative sum from the other end (flip, cumsum, flip), as
    torch's; reshaped back to ``x``'s shape for ``axis=None``. float16 and bfloat16 sum in
    float32 and round each entry once, as torch does (a float16 running sum of 0.1s stalls at
    256). Integers and bools sum in numpy's dtypes, as :func:`sum`'s: int64, uint64 for
    unsigned integers (torch gives int64 for every integer).

    Raises:
        TypeError: an axis that is no int, or several axes.
        ValueError: an axis out of range, or any axis of a 0-d ``x`` (``axis=None`` flattens it).
    """
    x = as_array(x, "cumsum")
    return _P["cumsum"](x, axis=_running_axis(x, axis, "cumsum", "sum"))


def prod(x: Any, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Any:
    """Product over ``axis``: numpy's ``prod(x, axis, keepdims=)``, torch's ``prod(x, dim)``
    (all axes by default; ``axis=()`` multiplies over none, and the product of nothing is 1,
    as in numpy).

    The gradient is ``g`` times the product of the other entries of each group, as torch's.
    A group with no zero and a finite, nonzero product gets torch's ``g * (out / x)``, to its
    bits. One zero: that entry gets ``g`` times the product of the others (the zero taken as
    1), the others 0; several zeros: 0 throughout (where ``out / x`` is 0/0). A product that
    underflowed to 0 with no zero (or is inf or NaN): the products before each entry times
    those after it, so ``[1e-200, 1e-200, 1e200]`` gets ``[1, 1, 0]`` (torch's 0 / 1e-200 is
    0). float32 groups take their products in float64 there. float16 and bfloat16 multiply in
    float32 and round once, as torch's ``cumprod`` and its ``prod`` on a GPU do (its ``prod``
    on the CPU multiplies in float16, where ``300 * 300 * (1/300)`` overflows to inf).
    Integers and bools multiply in numpy's dtypes, as :func:`sum`'s: int64, uint64 for
    unsigned integers (torch gives int64 for every integer).

    Raises:
        TypeError: an axis that is no int.
        ValueError: an axis out of range or named twice, naming the axis and ``x``'s shape.
    """
    x = as_array(x, "prod")
    return _P["prod"](x, axis=checked_axis(normalize_axis, axis, x, "prod"), keepdims=keepdims)


def cumprod(x: Any, axis: int | None = None) -> Any:
    """Cumulative product along ``axis``: numpy's ``cumprod(x, axis)``, torch's
    ``cumprod(x, dim)``. ``axis=None`` (numpy's default; torch has none) multiplies over the
    flattened array, giving a 1-d result of ``x.size`` entries (a 0-d ``x`` gives shape
    ``(1,)``).

    The gradient is torch's: entry ``i`` gets the sum over ``j >= i`` of ``g[j]`` times the
    product of entries ``0..j`` but ``i``. Along a row with no zero whose running products are
    all finite and nonzero, it is torch's reversed running sum of ``g * out`` (summed in
    float64 for float32, as torch's CPU ``cumsum``) divided by ``x``. Elsewhere (a zero, where
    that divides 0 by 0, or a running product that under- or overflowed), and at an entry
    whose division overflowed, nothing is divided: a scan from the end in ``log2(n)``
    whole-array rounds for an axis of length ``n`` (in float64 for float32), exact at zeros.
    float16 and bfloat16 multiply in float32 and round each entry once, as torch does.
    Integers and bools multiply in numpy's dtypes (int64, uint64 for unsigned integers).

    Raises:
        TypeError: an axis that is no int, or several axes.
        ValueError: an axis out of range (naming the axis and ``x``'s shape), or any axis of a
            0-d ``x`` (``axis=None`` flattens it).
    """
    x = as_array(x, "cumprod")
    return _P["cumprod"](x, axis=_running_axis(x, axis, "cumprod", "product"))


def _running_axis(x: Any, axis: Any, op: str, running: str) -> int | None:
    """The one axis (or None) of a running ``op`` (cumsum, cumprod) of ``x``, checked."""
    if axis is None:
        return None
    if isinstance(axis, tuple | list):
        raise TypeError(
            f"{op}: axis must be one int or None, got {axis!r}: a running {running} goes along "
            "one axis (numpy's and torch's too); over adjacent axes merged, take "
            "ops.reshape(x, ...) first, or None for the flattened array"
        )
    return checked_axis(check_axis, axis, x, op)


_Axis = TypeVar("_Axis")


def checked_axis(
    check: Callable[[Any, int, str], _Axis], axis: Any, x: Any, op: str, *, added: int = 0
) -> _Axis:
    """``check(axis, ndim, op)`` (:func:`check_axis` or :func:`normalize_axis`) for the op
    ``op`` of ``x``: one array, or the list of an op of several (``concatenate``, ``stack``),
    whose first decides ``ndim``; ``added`` counts the axes the op inserts (``expand_dims``'s,
    ``stack``'s). Every op's axis goes through it, so that each error names the input's shape
    (``prod: axis 2 is out of range for an array of 2 dimensions (valid: -2 to 1); x has shape
    (2, 3)``), or the arrays' (``...; the 2 arrays have shape (2, 3)``).

    Raises:
        TypeError: an axis that is no int (``check``'s).
        ValueError: ``check``'s, naming the shape(s) too (a 0-d array's says so already).
    """
    several = isinstance(x, list)
    ndim = len(_shape(x[0] if several else x)) + added
    try:
        return check(axis, ndim, op)
    except ValueError as e:
        if ndim == 0:  # ("the array is 0-d (a scalar)")
            raise
        # (the shapes said only here: every reduction's call passes through on its way)
        said = _arrays_shapes([_shape(a) for a in x]) if several else f"x has shape {_shape(x)}"
        raise ValueError(f"{e}; {said}") from None


def _arrays_shapes(shapes: list[tuple[int, ...]]) -> str:
    """The shapes of an op's arrays, said briefly: one shape where all share it, else the first
    five and how many more."""
    if len(shapes) == 1:
        return f"the array has shape {shapes[0]}"
    if len(set(shapes)) == 1:
        return f"the {len(shapes)} arrays have shape {shapes[0]}"
    listed = ", ".join(str(s) for s in shapes[:5])
    more = f" and {len(shapes) - 5} more" if len(shapes) > 5 else ""
    return f"the arrays have shapes {listed}{more}"


def _variance_op(op: str, x: Any, axis: Any, ddof: Any, keepdims: bool) -> Any:
    x = as_array(x, op)
    check_floating(x, op)  # (torch refuses integers; numpy would give float64)
    # (a bool is 0 or 1 to numpy's and torch's var, where the other ops' numbers refuse it)
    dof = float(ddof) if isinstance(ddof, bool | np.bool_) else _number(ddof, op, "ddof")
    if not math.isfinite(dof):
        raise ValueError(f"{op}: ddof must be a finite number, got {ddof!r}")
    shape = _shape(x)
    axes = checked_axis(normalize_axis, axis, x, op)
    n = math.prod([shape[a] for a in axes])
    groups = math.prod([s for i, s in enumerate(shape) if i not in axes])
    if n - dof <= 0 and groups:  # (no group, no value to warn of)
        warnings.warn(
            f"{op}: ddof={ddof!r} leaves no degrees of freedom over axes {axes} of x (shape "
            f"{shape}), {n} entries each: the {op} is inf (NaN for a constant group), as numpy's "
            "and torch's; use a ddof below the count",
            RuntimeWarning,
            stacklevel=3,
        )
    return _P[op](x, axis=axes, ddof=dof, keepdims=keepdims)


def _nonempty_axes(x: Any, axis: Any, op: str) -> tuple[int, ...]:
    shape = _shape(x)
    axes = checked_axis(normalize_axis, axis, x, op)
    for a in axes:
        if shape[a] == 0:
            raise ValueError(
                f"{op}: axis {a} of x (shape {shape}) has length 0, and the {op}imum of nothing "
                "has no value (numpy and torch refuse it too); leave out empty inputs, or "
                "reduce over other axes"
            )
    return axes


# -- shapes ----------------------------------------------------------------------------------------
def _shape_arg(shape: Any, op: str) -> tuple[int, ...]:
    """``shape``, the shape argument of op ``op``, as a tuple of ints: one int (a numpy integer
    too) is a 1-d shape, as numpy takes it.

    Raises:
        TypeError: naming the op, when ``shape`` is neither an int nor a sequence of ints.
    """
    if isinstance(shape, int | np.integer):
        return (int(shape),)
    try:
        return tuple([operator.index(s) for s in shape])
    except TypeError:
        raise TypeError(
            f"{op}: shape must be an int or a sequence of ints, got {shape!r}; e.g. (2, 3), "
            "or 6 for a 1-d shape"
        ) from None


def reshape(x: Any, shape: int | Sequence[int]) -> Any:
    """``x`` with a new shape of the same size (one entry may be -1; one int is a 1-d shape)."""
    shape = _shape_arg(shape, "reshape")
    x = as_array(x, "reshape")
    try:
        return _P["reshape"](x, shape=shape)
    except ValueError as e:  # one input: the only ValueError is numpy's about the shape
        raise ValueError(
            f"reshape: x of shape {_shape(x)} (size {math.prod(_shape(x))}) cannot take shape "
            f"{shape} ({e}); the sizes must be equal, one entry may be -1"
        ) from None


def transpose(x: Any, axes: Sequence[int] | None = None) -> Any:
    """Permutes the axes (reverses them by default)."""
    axes = None if axes is None else tuple(axes)
    x = as_array(x, "transpose")
    try:
        return _P["transpose"](x, axes=axes)
    except ValueError:  # one input: the only ValueError is numpy's about the axes
        ndim = len(_shape(x))
        raise ValueError(
            f"transpose: axes {axes} are not a permutation of the {ndim} axes of x (shape "
            f"{_shape(x)}): name each axis once, e.g. {tuple(reversed(range(ndim)))}"
        ) from None


def expand_dims(x: Any, axis: int) -> Any:
    """Inserts an axis of length 1 at ``axis``."""
    x = as_array(x, "expand_dims")
    shape = list(_shape(x))
    shape.insert(checked_axis(check_axis, axis, x, "expand_dims", added=1), 1)
    return reshape(x, shape)


def squeeze(x: Any, axis: int | Sequence[int] | None = None) -> Any:
    """Removes axes of length 1 (those named by ``axis``, or all)."""
    x = as_array(x, "squeeze")
    shape = _shape(x)
    axes = (
        tuple(i for i, s in enumerate(shape) if s == 1)
        if axis is None
        else checked_axis(normalize_axis, axis, x, "squeeze")
    )
    for a in axes:
        if shape[a] != 1:
            raise ValueError(f"squeeze: axis {a} of shape {shape} has length {shape[a]}, not 1")
    return reshape(x, [s for i, s in enumerate(shape) if i not in axes])


def broadcast_to(x: Any, shape: int | Sequence[int]) -> Any:
    """``x`` broadcast to ``shape`` (one int is a 1-d shape)."""
    shape = _shape_arg(shape, "broadcast_to")
    x = as_array(x, "broadcast_to")
    try:
        return _P["broadcast_to"](x, shape=shape)
    except ValueError:  # one input: the only ValueError is numpy's about the shapes
        raise ValueError(
            f"broadcast_to: x of shape {_shape(x)} cannot be broadcast to {shape} (aligned from "
            "the right, each dimension of x must equal the target's or be 1, and the target has "
            "at least as many dimensions)"
        ) from None


def getitem(x: Any, index: Any) -> Any:
    """``x[index]``: slices, integers, integer arrays (repeats accumulate) or boolean masks.

    An index counts from the end when negative, as in numpy: each must be in ``[-n, n)`` for an
    axis of length ``n``. Host indices (Python ints, lists, numpy arrays) are checked on the host.
    Integer arrays on a GPU are not read back (a round trip to the host on every call, which a
    CUDA graph cannot capture): where one is out of range the result is NaN (cupy alone would
    wrap it around to another entry) and its gradient reaches no entry of ``x``; into an integer
    ``x``, which has no NaN, they are checked on the host.

    Raises:
        IndexError: when an index is out of range (host indices, or GPU ones into a non-float
            ``x``).
    """
    if type(x) is not Tracer and type(x) is not np.ndarray:
        x = as_array(x, "getitem")
    if isinstance(index, tuple):
        index = tuple(raw(i) for i in index)
    else:
        index = raw(index)
    if _is_basic_index(index):
        # ints and slices: the array library refuses an int out of range itself; the named
        # error is made only on the way out (x[i] in a loop pays nothing for it)
        try:
            return _P["getitem"](x, idx=index)
        except IndexError:
            index_guard(raw(x), index)
            raise
    guard = index_guard(raw(x), index)
    if guard:
        return _P["getitem"](x, idx=index if isinstance(index, tuple) else (index,), guard=guard)
    return _P["getitem"](x, idx=index)


def take(x: Any, indices: Any, axis: int = 0) -> Any:
    """Gathers entries of ``x`` along ``axis`` at integer ``indices`` (as ``numpy.take``).

    Out-of-range indices are treated as in :func:`getitem`: refused on the host, NaN for GPU
    indices into a float ``x``.

    Raises:
        TypeError: when ``indices`` are not integers (floats, bools).
        IndexError: when an index is outside ``[-n, n)`` (host indices, or GPU ones into a
            non-float ``x``).
    """
    x = as_array(x, "take")
    axis = checked_axis(check_axis, axis, x, "take")
    indices = raw(indices)
    if isinstance(indices, list | tuple):
        indices = np.asarray(indices)  # checked as a numpy array is
        if indices.size == 0:
            indices = indices.astype(np.intp)  # (numpy makes [] float64)
    dtype = getattr(indices, "dtype", None)
    if (dtype.kind not in "iu") if dtype is not None else not is_integer(indices):
        raise TypeError(
            f"take: indices must be integers, got "
            f"{'dtype ' + str(dtype) if dtype is not None else type(indices).__name__}; "
            "convert them first, e.g. indices.astype(np.int64)"
        )
    guard = bool(index_guard(raw(x), (slice(None),) * axis + (indices,), "take"))
    return _P["take"](x, indices, axis=axis, guard=guard)


def take_trusted(x: Any, indices: Any, axis: int = 0) -> Any:
    """:func:`take` of indices valid by construction (the library's own row numbers): no check
    on the host and no guard on a GPU, whose kernels over the indices would cost each call about
    as much as the gather itself."""
    return _P["take"](x, raw(indices), axis=check_axis(axis, len(_shape(x)), "take"))


def getitem_trusted(x: Any, index: tuple[Any, ...]) -> Any:
    """:func:`getitem` of an index valid by construction (see :func:`take_trusted`)."""
    return _P["getitem"](x, idx=tuple(raw(i) for i in index))


def concatenate(arrays: Sequence[Any], axis: int = 0) -> Any:
    """Joins arrays along an existing axis."""
    if not arrays:
        raise ValueError("concatenate needs at least one array")
    arrays = [as_array(a, "concatenate") for a in arrays]
    axis = checked_axis(check_axis, axis, arrays, "concatenate")
    try:
        out = _P["concatenate"](*arrays, axis=axis)
    except ValueError:
        check_concatenated([_shape(a) for a in arrays], axis)
        raise  # not the shapes: say what numpy (or the trace) said
    if type(out) is Tracer and out.value.dtype.kind == "c":
        raise _complex_result("concatenate", arrays)
    return out


def stack(arrays: Sequence[Any], axis: int = 0) -> Any:
    """Joins arrays of one shape along a new axis."""
    if not arrays:
        raise ValueError("stack needs at least one array")
    arrays = [as_array(a, "stack") for a in arrays]
    axis = checked_axis(check_axis, axis, arrays, "stack", added=1)
    try:
        out = _P["stack"](*arrays, axis=axis)
    except ValueError:
        check_stacked([_shape(a) for a in arrays])
        raise  # not the shapes: say what numpy (or the trace) said
    if type(out) is Tracer and out.value.dtype.kind == "c":
        raise _complex_result("stack", arrays)
    return out


def unstack(x: Any, axis: int = 0) -> list[Any]:
    """Cuts ``x`` along ``axis`` into a list of its pieces, ``[x[:, 0], x[:, 1], ...]`` for
    ``axis=1`` (torch's ``unbind``); ``stack(unstack(x, a), a)`` is ``x``.

    Differentiated, the pieces' cotangents come back as one gradient of ``x`` (zeros for a piece
    that gets none): a loop over a sequence's steps costs time linear in its length, where
    indexing each step, ``x[:, t]``, gives back a gradient of ``x``'s whole shape per step."""
    x = as_array(x, "unstack")
    axis = checked_axis(check_axis, axis, x, "unstack")
    n = _shape(x)[axis]
    if type(x) is not Tracer:
        return [x[(slice(None),) * axis + (i,)] for i in range(n)]
    whole = _P["unstack"](x, axis=axis)
    return [_P["unstack_piece"](whole, axis=axis, index=i) for i in range(n)]


def matmul(a: Any, b: Any) -> Any:
    """Matrix product with numpy's ``matmul`` rules (vectors, batches, broadcasting)."""
    if type(a) is not Tracer and type(a) is not np.ndarray:
        a = as_array(a, "matmul")
    if type(b) is not Tracer and type(b) is not np.ndarray:
        b = as_array(b, "matmul")
    sa, sb = _shape(a), _shape(b)
    if not sa or not sb or sa[-1] != sb[0 if len(sb) == 1 else -2]:
        raise ValueError(f"matmul: shapes {sa} and {sb} do not line up")
    try:
        out = _P["matmul"](a, b)
    except ValueError:
        check_matmul_batch(sa, sb)
        raise
    if type(out) is Tracer and out.value.dtype.kind == "c":
        raise _complex_result("matmul", (a, b))
    return out


# numpy ufuncs applied to a traced array are routed here (see Tracer.__array_ufunc__).
UFUNC_OPS: dict[str, Any] = {
    "add": add, "subtract": subtract, "multiply": multiply, "true_divide": divide,
    "divide": divide, "negative": negative, "power": power, "exp": exp, "log": log,
    "tanh": tanh, "sqrt": sqrt, "absolute": abs, "maximum": maximum, "minimum": minimum,
    "matmul": matmul, "square": square, "log1p": log1p, "expm1": expm1, "sin": sin, "cos": cos,
}  # fmt: skip
