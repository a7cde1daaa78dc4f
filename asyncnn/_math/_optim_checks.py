"""The checks the optimizers share: of a hyperparameter (a real number >= 0; a clipping norm
above 0, or None) and of the leaves given to ``init``, ``update`` and ``clip_grad_norm`` (real
float arrays; gradients and state buffers shaped and typed like their parameters, each wrong
leaf named).

Apart from ``_optim.py`` so that it reads as the optimizers' arithmetic: these only decide
which message a wrong argument gets, before any array is computed. The real-number check
(``_real``) serves the modules' and datasets' float hyperparameters too, so that all name the
argument and refuse a bool or a string alike.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from ..backends import is_floating
from ._autodiff_args import _CONTAINERS, _hides, _unopened
from ._pytree import TreeDef


def _real(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    return float(value)


def _non_negative(owner: str, name: str, value: Any) -> float:
    x = _real(owner, name, value)
    if not x >= 0.0:  # written so that NaN fails too
        raise ValueError(f"{owner}: invalid {name} value {value!r}: it must be >= 0")
    return x


def _check_clip_norm(owner: str, clip_norm: Any) -> float | None:
    if clip_norm is None:
        return None
    x = _real(owner, "clip_norm", clip_norm)
    if not x > 0.0:
        raise ValueError(
            f"{owner}: clip_norm must be > 0 (or None for no clipping), got {clip_norm!r}"
        )
    return x


def _check_step(owner: str, step: Any) -> int:
    """``state["step"]`` (the updates made) as :meth:`Optimizer.update` takes it: an int >= 0,
    a numpy integer too, never a bool; a checkpoint's loader asks it before a run starts.

    Raises:
        ValueError: naming ``owner`` and the value.
    """
    # (Optimizer.update asks the same inline, on every update; keep the two alike)
    if (
        type(step) is not int and (isinstance(step, bool) or not isinstance(step, numbers.Integral))
    ) or step < 0:
        raise ValueError(
            f"{owner}: state['step'] must be an int >= 0 (the updates made), got {step!r:.40}"
        )
    return int(step)


def _not_a_float_array(x: Any) -> str | None:
    """What is wrong with ``x`` as a parameter or gradient leaf (None: a real floating array)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not hasattr(x, "shape"):
        return f"is {type(x).__name__}, not an array"
    if dtype.kind != "f" and not is_floating(dtype):
        return f"is {dtype}; only float16/32/64 and bfloat16 arrays can be updated or clipped"
    return None


def _is_array(x: Any) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape")


def _leaf_error(who: str, i: int, treedef: TreeDef, leaf: Any, wrong: str) -> TypeError:
    """The error of parameter leaf ``i``, which ``wrong`` says is not a float array; for a
    container pytrees keep whole (a namedtuple, an OrderedDict) holding arrays, the fix."""
    if isinstance(leaf, _CONTAINERS) and _hides(leaf, _is_array):
        return TypeError(_unopened(who, "params hold", leaf, "not be updated"))
    return TypeError(f"{who}: parameter leaf {i} of {treedef!r} {wrong}")


def _check_params(owner: str, params: list[Any], treedef: TreeDef) -> None:
    """Refuses, at ``init``, a parameter leaf that ``update`` would refuse: else the state came
    out of object arrays (an OrderedDict, one leaf), int buffers, or numpy's own error."""
    for i, p in enumerate(params):
        wrong = _not_a_float_array(p)
        if wrong is not None:
            raise _leaf_error(f"{owner}.init", i, treedef, p, wrong)


def _check_grads(params: list[Any], grads: list[Any], treedef: TreeDef) -> None:
    for p, g in zip(params, grads, strict=True):
        # the common leaf, asked first (every update asks it of every leaf): a real float
        # array and a gradient of its very dtype and shape; any other pair (bfloat16, an equal
        # but distinct dtype object, an error) goes through the checks that name it
        try:
            p_dtype = p.dtype
            if g.dtype is p_dtype and g.shape == p.shape and p_dtype.kind == "f":
                continue
        except AttributeError:
            pass
        break
    else:
        return
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        try:
            p_shape, p_dtype, g_shape, g_dtype = p.shape, p.dtype, g.shape, g.dtype
        except AttributeError:
            if g is None:
                raise ValueError(
                    f"update: gradient leaf {i} of {treedef!r} is None; every parameter needs a "
                    "gradient (use zeros for a parameter that got none)"
                ) from None
            wrong = _not_a_float_array(p)
            if wrong is not None:
                raise _leaf_error("update", i, treedef, p, wrong) from None
            raise TypeError(
                f"update: gradient leaf {i} of {treedef!r} {_not_a_float_array(g)}"
            ) from None
        if g_shape != p_shape:
            raise ValueError(
                f"update: gradient leaf {i} of {treedef!r} has shape {g_shape}, but its "
                f"parameter has shape {p_shape}"
            )
        if g_dtype != p_dtype:
            raise TypeError(
                f"update: gradient leaf {i} of {treedef!r} is {g_dtype}, but its parameter is "
                f"{p_dtype}; cast the gradient with .astype({str(p_dtype)!r})"
            )
        if p_dtype.kind != "f" and not is_floating(p_dtype):
            # numpy would fail deep in a ufunc (int), or Adam compute g * g, not |g|^2 (complex)
            raise TypeError(f"update: parameter leaf {i} of {treedef!r} {_not_a_float_array(p)}")


def _check_buffer(
    owner: str,
    buf_name: str,
    params: list[Any],
    buffer: list[Any],
    treedef: TreeDef,
    state_dtype: Callable[[Any], Any] | None = None,
) -> None:
    """Refuses a buffer leaf of another shape than its parameter, or of a dtype other than the
    parameter's and the one the optimizer keeps it in (``state_dtype(p.dtype)``: float32 for
    Adam's moments of a float16 parameter, whose float16 ones an older state holds).

    Raises:
        ValueError: a leaf that is not an array, or of another shape, named.
        TypeError: a leaf of another dtype, named with the dtypes it may have.
    """
    # broadcasting would otherwise reshape the parameters, or promote their dtype, silently
    for i, (p, b) in enumerate(zip(params, buffer, strict=True)):
        shape = getattr(b, "shape", None)
        if shape == p.shape and (
            b.dtype == p.dtype or (state_dtype is not None and b.dtype == state_dtype(p.dtype))
        ):
            continue
        where = f"{owner}.update: state[{buf_name!r}] leaf {i} of {treedef!r}"
        hint = f"was the state made for other parameters? Make it with {owner}.init(params)"
        if shape is None:
            raise ValueError(f"{where} is {b!r}, not an array; {hint}")
        if shape != p.shape:
            raise ValueError(
                f"{where} has shape {shape}, but its parameter has shape {p.shape}; {hint}"
            )
        kept = p.dtype if state_dtype is None else state_dtype(p.dtype)
        if kept != p.dtype:
            raise TypeError(
                f"{where} is {b.dtype}, but its parameter is {p.dtype}; {owner} keeps the "
                f"buffers of a {p.dtype} parameter in {np.dtype(kept)} ({p.dtype} ones, as an "
                f"older state holds them, are taken too); {hint}"
            )
        raise TypeError(f"{where} is {b.dtype}, but its parameter is {p.dtype}; {hint}")
