"""numpy's functions of traced arrays: what ``Tracer.__array_function__`` (NEP 18) does with
each numpy function given a traced array. Those that call the array's method of their name run
numpy's own code (:data:`BY_METHOD`); those with a match in the ops run it, with numpy's
meaning (:data:`FUNCTIONS`); any other is refused by name (:func:`refusal`), never converting
the array (its gradient would be lost). Apart from ``_autodiff.py``, the tracing itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import _ops
from ._autodiff import _UNSET, Tracer, _check_c_order, _raw

__all__ = ["BY_METHOD", "FUNCTIONS", "refusal"]


def _moves() -> Any:
    """:mod:`._ops_moves`, imported on first use: it imports the ops, which import the tracing,
    which imports this module."""
    from . import _ops_moves

    return _ops_moves


def _numpy_name(func: Any) -> str:
    """``np.sort``, ``np.linalg.norm``: a numpy function as its users write it."""
    module = str(getattr(func, "__module__", None) or "numpy")
    if module == "numpy" or module.startswith("numpy."):
        module = "np" + module[len("numpy") :]
    return f"{module}.{func.__name__}"


#: a differentiable match of a numpy function that a traced array does not dispatch itself
#: (numpy 2.1's cumulative_sum takes include_initial=, which the ops have no match for)
_FUNCTION_MATCHES: dict[Any, str] = {
    func: match
    for func, match in (
        (getattr(np, "cumulative_sum", None), "ops.cumsum(t, axis)"),
        (getattr(np, "cumulative_prod", None), "ops.cumprod(t, axis)"),
        (np.copy, "t itself (a traced array is never changed in place)"),
    )
    if func is not None
}


def refusal(func: Any) -> TypeError:
    """The error of a numpy function that has no differentiable match for a traced array (it
    would convert the array, losing its gradient)."""
    name = _numpy_name(func)
    match = _FUNCTION_MATCHES.get(func)
    if match is not None:
        return TypeError(
            f"numpy's {name} cannot differentiate a traced array: {match} is its differentiable "
            "match"
        )
    return TypeError(
        f"numpy's {name} cannot differentiate a traced array, and asyncnn.ops has no match for "
        "it: write it with the ops (np.concatenate, np.where, np.diff, ... and the ufuncs with "
        "an op become them), or apply it to ops.raw(t) for a value with no gradient"
    )


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _np_ravel(a: Any, order: Any = "C") -> Any:
    _check_c_order(order, "ravel")
    return _ops.reshape(a, -1)


def _np_expand_dims(a: Any, axis: Any) -> Any:
    if not isinstance(axis, tuple | list):
        return _ops.expand_dims(a, axis)
    a = _ops.as_array(a, "expand_dims")
    shape = _shape_of(a)
    axes = _ops.checked_axis(_ops.normalize_axis, axis, a, "expand_dims", added=len(axis))
    rest = iter(shape)
    return _ops.reshape(a, [1 if i in axes else next(rest) for i in range(len(shape) + len(axes))])


def _joined(name: str, arrays: Any, out: Any, dtype: Any, casting: Any) -> list[Any]:
    """The arrays np.concatenate and np.stack join, once their keywords are checked."""
    if out is not None:
        raise TypeError(f"np.{name} of traced arrays cannot write into out=; use the result")
    if dtype is not None:
        raise TypeError(
            f"np.{name} of traced arrays takes no dtype=, got dtype={dtype!r}: convert the "
            f"result, ops.astype(ops.{name}(arrays, axis), dtype)"
        )
    if not (type(casting) is str and casting == "same_kind"):
        raise TypeError(
            f"np.{name} of traced arrays takes casting='same_kind' only, got casting={casting!r}: "
            "leave it out (the result takes the arrays' common dtype) and convert with "
            "ops.astype where another is needed"
        )
    return list(arrays)  # (a traced array is the sequence of its rows, as a numpy array is)


def _np_concatenate(
    arrays: Any, axis: Any = 0, out: Any = None, *, dtype: Any = None, casting: Any = "same_kind"
) -> Any:
    joined = _joined("concatenate", arrays, out, dtype, casting)
    if axis is None:  # numpy's: the arrays flattened, one after the other
        return _ops.concatenate([_ops.reshape(a, -1) for a in joined], 0)
    return _ops.concatenate(joined, axis)


def _np_stack(
    arrays: Any, axis: Any = 0, out: Any = None, *, dtype: Any = None, casting: Any = "same_kind"
) -> Any:
    return _ops.stack(_joined("stack", arrays, out, dtype, casting), axis)


def _np_where(condition: Any, *x_y: Any) -> Any:
    if not x_y:
        raise TypeError(
            "np.where(condition) of a traced array gives the indices of its nonzero entries, "
            "which have no gradient: take them from its value, np.nonzero(ops.raw(t))"
        )
    if len(x_y) != 2:
        raise ValueError("np.where: either both or neither of x and y should be given")
    return _ops.where(condition, x_y[0], x_y[1])  # (the condition gets no gradient)


def _refuse_out(name: str, out: Any) -> None:
    if out is not None:
        raise TypeError(f"np.{name} of traced arrays cannot write into out=; use the result")


def _np_dot(a: Any, b: Any, out: Any = None) -> Any:
    _refuse_out("dot", out)
    sa, sb = _shape_of(a), _shape_of(b)
    if not sa or not sb:
        return _ops.multiply(a, b)
    n, k = sa[-1], sb[-2 if len(sb) > 1 else 0]
    if n != k:
        raise ValueError(
            f"np.dot: shapes {sa} and {sb} are not aligned: {n} (last axis of a) != {k} "
            f"({'second-to-last' if len(sb) > 1 else 'only'} axis of b)"
        )
    if len(sa) <= 2 and len(sb) <= 2:
        return _ops.matmul(a, b)
    # numpy's dot of more axes sums over a's last and b's second-to-last for each pair of the
    # others (no broadcasting, unlike matmul): one product of the two made matrices
    a2 = _ops.reshape(a, (-1, n))
    if len(sb) == 1:
        return _ops.reshape(_ops.matmul(a2, b), sa[:-1])
    nb = len(sb)
    b2 = _ops.reshape(_ops.transpose(b, (nb - 2, *range(nb - 2), nb - 1)), (n, -1))
    return _ops.reshape(_ops.matmul(a2, b2), sa[:-1] + sb[:-2] + sb[-1:])


def _np_inner(a: Any, b: Any) -> Any:
    sa, sb = _shape_of(a), _shape_of(b)
    if not sa or not sb:
        return _ops.multiply(a, b)
    if sa[-1] != sb[-1]:
        raise ValueError(
            f"np.inner: shapes {sa} and {sb} are not aligned: their last axes have lengths "
            f"{sa[-1]} and {sb[-1]}"
        )
    n = sa[-1]  # (a sum over the last axes, for each pair of the others)
    product = _ops.matmul(_ops.reshape(a, (-1, n)), _ops.transpose(_ops.reshape(b, (-1, n))))
    return _ops.reshape(product, sa[:-1] + sb[:-1])


def _np_outer(a: Any, b: Any, out: Any = None) -> Any:
    _refuse_out("outer", out)
    return _ops.multiply(_ops.reshape(a, (-1, 1)), _ops.reshape(b, (1, -1)))


def _np_broadcast_to(array: Any, shape: Any, subok: Any = False) -> Any:
    # (subok keeps a subclass of ndarray: a traced array stays one either way)
    return _ops.broadcast_to(array, shape)


def _np_diff(
    a: Any, n: Any = 1, axis: Any = -1, prepend: Any = _UNSET, append: Any = _UNSET
) -> Any:
    if n == 0:  # (numpy's order of checks: a returned as it is)
        return a
    if n < 0:
        raise ValueError(f"np.diff: order must be non-negative but got {n!r}")
    a = _ops.as_array(a, "diff")
    shape = _shape_of(a)
    if not shape:
        raise ValueError(
            "np.diff: the array is 0-d (a scalar), which has no axis to take differences along"
        )
    axis = _ops.checked_axis(_ops.check_axis, axis, a, "diff")
    edge = (*shape[:axis], 1, *shape[axis + 1 :])  # (where a number is broadcast to)
    parts = [a]
    if prepend is not _UNSET:
        parts.insert(0, _diff_edge(prepend, edge))
    if append is not _UNSET:
        parts.append(_diff_edge(append, edge))
    if len(parts) > 1:
        a = _ops.concatenate(parts, axis)
    before = (slice(None),) * axis
    later, earlier = (*before, slice(1, None)), (*before, slice(None, -1))
    for _ in range(n):
        a = _ops.subtract(_ops.getitem(a, later), _ops.getitem(a, earlier))
    return a


def _diff_edge(x: Any, edge: tuple[int, ...]) -> Any:
    x = _ops.as_array(x, "diff")
    return _ops.broadcast_to(x, edge) if not _shape_of(x) else x


def _np_pad(array: Any, pad_width: Any, mode: Any = "constant", **kwargs: Any) -> Any:
    # (numpy's keywords per mode: constant_values for "constant", reflect_type for "reflect";
    # numpy refuses one another mode does not take, and so does this)
    allowed = {"constant": {"constant_values"}, "reflect": {"reflect_type"}}
    mode_s = mode if isinstance(mode, str) else None
    unsupported = set(kwargs) - allowed.get(mode_s or "", set())
    if unsupported and mode_s in ("constant", "edge", "reflect"):
        raise ValueError(
            f"np.pad: unsupported keyword arguments for mode {mode!r}: "
            f"{', '.join(sorted(unsupported))} (numpy refuses them too)"
        )
    reflect_type = kwargs.pop("reflect_type", "even")
    if not (type(reflect_type) is str and reflect_type == "even"):
        raise TypeError(
            f"np.pad of a traced array takes reflect_type='even' only, got "
            f"reflect_type={reflect_type!r}: ops.pad's reflect is numpy's even one (torch's)"
        )
    return _moves().pad(array, pad_width, mode, kwargs.get("constant_values", 0))


def _np_flip(m: Any, axis: Any = None) -> Any:
    return _moves().flip(m, axis)


def _np_take_along_axis(arr: Any, indices: Any, axis: Any = -1) -> Any:
    # (numpy 2.3's default axis, -1; earlier numpy had none)
    return _moves().take_along_axis(arr, indices, axis)


def _np_repeat(a: Any, repeats: Any, axis: Any = None) -> Any:
    return _moves().repeat(a, repeats, axis)


def _np_tile(A: Any, reps: Any) -> Any:  # noqa: N803 - numpy's name
    return _moves().tile(A, reps)


def _np_like(name: str) -> Callable[..., Any]:
    """np.zeros_like and the like of a traced array: a plain array of its shape and dtype, a
    constant (torch's zeros_like has no gradient either), made by the value's own library."""

    def like(a: Any, *args: Any, **kwargs: Any) -> Any:
        value = _raw(a)
        return getattr(_ops.namespace_of(value), name)(value, *args, **kwargs)

    return like


def _np_full_like(a: Any, fill_value: Any, *args: Any, **kwargs: Any) -> Any:
    if type(fill_value) is Tracer:
        raise TypeError(
            "np.full_like of a traced fill_value would drop its gradient: "
            "ops.broadcast_to(fill_value, t.shape) keeps it (ops.astype for another dtype)"
        )
    return _np_like("full_like")(a, fill_value, *args, **kwargs)


#: numpy's functions that call the traced array's method of their name (or read its shape or
#: dtype): numpy's own implementation runs, calling the method
BY_METHOD = frozenset(
    (
        np.reshape, np.transpose, np.swapaxes, np.take, np.squeeze, np.clip,
        np.sum, np.mean, np.max, np.amax, np.min, np.amin, np.std, np.var, np.prod,
        np.cumsum, np.cumprod,
        np.any, np.all,  # (the boolean ufuncs' reductions: refused, saying there is no gradient)
        np.shape, np.ndim, np.size, np.result_type, np.can_cast, np.iscomplexobj, np.isrealobj,
    )
)  # fmt: skip

#: numpy's functions that a traced array answers with the ops, with numpy's meaning
FUNCTIONS: dict[Any, Callable[..., Any]] = {
    np.ravel: _np_ravel,
    np.expand_dims: _np_expand_dims,
    np.concatenate: _np_concatenate,  # (np.concat too: numpy 2's other name of it)
    np.stack: _np_stack,
    np.where: _np_where,
    np.dot: _np_dot,
    np.inner: _np_inner,
    np.outer: _np_outer,
    np.broadcast_to: _np_broadcast_to,
    np.diff: _np_diff,
    np.pad: _np_pad,
    np.flip: _np_flip,
    np.take_along_axis: _np_take_along_axis,
    np.repeat: _np_repeat,
    np.tile: _np_tile,
    np.zeros_like: _np_like("zeros_like"),
    np.ones_like: _np_like("ones_like"),
    np.empty_like: _np_like("empty_like"),
    np.full_like: _np_full_like,
}
