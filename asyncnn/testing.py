"""Helpers for testing code built on asyncnn: gradient checks against finite differences."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._math._autodiff import vjp
from ._math._autodiff_args import RuleError
from ._math._pytree import tree_flatten, tree_unflatten
from .backends import array_namespace, is_floating, to_numpy

__all__ = ["check_grads", "numerical_vjp"]

#: check_grads' default ``(rtol, atol)`` by a leaf's dtype: its gradient is compared with
#: finite differences taken in float64, so the tolerance is that of the vjp's own rounding
_TOLERANCES = {8: (1e-6, 1e-8), 4: (1e-4, 1e-5), 2: (2e-2, 1e-2)}


def _inner(a: Any, b: Any) -> float:
    return float(np.sum(to_numpy(a).astype(np.float64) * to_numpy(b).astype(np.float64)))


def _is_real_float(leaf: Any) -> bool:
    """Whether ``vjp`` differentiates ``leaf`` as a real float (a Python float, or an array of
    float16/32/64 or bfloat16)."""
    if isinstance(leaf, float):
        return True
    return hasattr(leaf, "shape") and is_floating(getattr(leaf, "dtype", None))


def _is_complex(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and getattr(getattr(leaf, "dtype", None), "kind", "") == "c"


def _as_float64(leaf: Any) -> Any:
    if isinstance(leaf, float) or not _is_real_float(leaf):
        return leaf
    return array_namespace(leaf).asarray(to_numpy(leaf).astype(np.float64))


def numerical_vjp(
    fn: Callable[..., Any], args: tuple[Any, ...], cotangent: Any, eps: float = 1e-6
) -> list[Any]:
    """Central finite differences of ``<cotangent, fn(*args)>`` for every float leaf of ``args``.

    The differences are taken in float64: every 16- and 32-bit float leaf of ``args`` is
    converted to float64 first (a step of ``eps`` would be rounded away in float32), so this is
    the gradient of the float64 function, whatever the arguments' dtypes.

    Returns a flat list (flattening order of ``args``) of float64 numpy arrays, with ``None``
    at leaves that are not real floats (Python floats and float arrays).
    """
    leaves, treedef = tree_flatten(args)
    leaves = [_as_float64(leaf) for leaf in leaves]
    ct_leaves = tree_flatten(cotangent)[0]

    def objective(new_leaves: list[Any]) -> float:
        out_leaves = tree_flatten(fn(*tree_unflatten(treedef, new_leaves)))[0]
        return builtin_sum(_inner(c, o) for c, o in zip(ct_leaves, out_leaves, strict=True))

    def with_leaf(i: int, value: Any) -> list[Any]:
        return [*leaves[:i], value, *leaves[i + 1 :]]

    grads: list[Any] = []
    for i, leaf in enumerate(leaves):
        if not _is_real_float(leaf):
            grads.append(None)
            continue
        if isinstance(leaf, float):
            plus, minus = objective(with_leaf(i, leaf + eps)), objective(with_leaf(i, leaf - eps))
            grads.append(np.asarray((plus - minus) / (2 * eps)))
            continue
        xp = array_namespace(leaf)
        host = to_numpy(leaf).copy()
        g = np.zeros_like(host)
        flat = host.reshape(-1)
        for j in range(flat.size):
            orig = flat[j]
            flat[j] = orig + eps
            plus = objective(with_leaf(i, xp.asarray(host)))
            flat[j] = orig - eps
            minus = objective(with_leaf(i, xp.asarray(host)))
            flat[j] = orig
            g.reshape(-1)[j] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


builtin_sum = sum


def _leaf_names(tree: Any, name: str) -> list[str]:
    """A name for each leaf of ``tree``, in ``tree_flatten``'s order (``args[0]['weight']``)."""
    if type(tree) is dict:
        return [n for k in sorted(tree) for n in _leaf_names(tree[k], f"{name}[{k!r}]")]
    if type(tree) is list or type(tree) is tuple:
        return [n for i, v in enumerate(tree) for n in _leaf_names(v, f"{name}[{i}]")]
    return [name]


def check_grads(
    fn: Callable[..., Any],
    *args: Any,
    rtol: float | None = None,
    atol: float | None = None,
    eps: float = 1e-6,
    seed: int = 0,
) -> None:
    """Checks ``vjp(fn, *args)`` against central finite differences.

    A random cotangent is drawn for the output; the vjp's gradient of every real float leaf
    (Python floats and float arrays) must have the leaf's shape and dtype and match the
    finite-difference gradient of ``<cotangent, fn(*args)>``, taken in float64 (see
    :func:`numerical_vjp`): ``|vjp - fd| <= atol + rtol * max(|vjp|, |fd|)`` everywhere.

    Args:
        fn: a function of the arguments built from asyncnn ops.
        *args: its arguments (pytrees); float64 ones check the vjp to the tightest tolerance.
        rtol: the relative tolerance; by default by each leaf's dtype, for the vjp's own
            rounding: ``1e-6`` for float64 (and Python floats), ``1e-4`` for float32, ``2e-2``
            for float16 and bfloat16 (an error of 1e-3 passes there: check in float64 to find
            small ones).
        atol: the absolute tolerance; by default ``1e-8``, ``1e-5`` and ``1e-2`` by dtype as
            for ``rtol``.
        eps: the finite-difference step.
        seed: seeds the random cotangent.

    Raises:
        AssertionError: naming the argument leaf (``args[0]['weight']``), the index where the
            gradient is worst and both values, or a gradient of the wrong shape or dtype.
        TypeError: a complex leaf (finite differences here are of real leaves only).
    """
    leaves = tree_flatten(args)[0]
    names = _leaf_names(args, "args")
    for name, leaf in zip(names, leaves, strict=True):
        if _is_complex(leaf):
            raise TypeError(
                f"check_grads: {name} is complex ({leaf.dtype}); it checks real float leaves "
                "only: pass the real and imaginary parts as two real arguments"
            )
    try:
        out, pullback = vjp(fn, *args)
    except RuleError as exc:  # a rule that breaks its contract: a wrong gradient
        raise AssertionError(str(exc)) from exc
    rng = np.random.default_rng(seed)
    out_leaves, out_def = tree_flatten(out)
    ct_leaves = []
    for o in out_leaves:
        xp = array_namespace(o)
        ct_leaves.append(xp.asarray(rng.standard_normal(np.shape(o)), dtype=o.dtype))
    cotangent = tree_unflatten(out_def, ct_leaves)
    try:
        analytic = tree_flatten(pullback(cotangent))[0]
    except RuleError as exc:
        raise AssertionError(str(exc)) from exc
    numeric = numerical_vjp(fn, args, cotangent, eps)
    for name, leaf, a, n in zip(names, leaves, analytic, numeric, strict=True):
        if n is None:
            if a is not None:
                raise AssertionError(f"{name}: expected no gradient (not a float), got one")
            continue
        if a is None:
            raise AssertionError(f"{name}: the vjp gave no gradient for a float leaf")
        want = np.dtype(np.float64) if isinstance(leaf, float) else np.dtype(leaf.dtype)
        got = getattr(a, "dtype", type(a).__name__)
        if got != want:
            raise AssertionError(f"{name}: gradient dtype {got}, the argument's is {want}")
        a = to_numpy(a).astype(np.float64)
        if a.shape != n.shape:
            raise AssertionError(f"{name}: gradient shape {a.shape}, argument shape {n.shape}")
        leaf_rtol, leaf_atol = _TOLERANCES.get(want.itemsize, _TOLERANCES[8])
        leaf_rtol = leaf_rtol if rtol is None else rtol
        leaf_atol = leaf_atol if atol is None else atol
        err = np.abs(a - n)
        scale = leaf_atol + leaf_rtol * np.maximum(np.abs(a), np.abs(n))
        if not np.all(err <= scale):  # (a NaN anywhere fails)
            excess = np.nan_to_num(err - scale, nan=np.inf)
            worst = int(np.argmax(np.where(err <= scale, -np.inf, excess)))
            raise AssertionError(
                f"{name}: vjp and finite differences differ; at flat index {worst} vjp gives "
                f"{a.reshape(-1)[worst]:.10g}, finite differences {n.reshape(-1)[worst]:.10g} "
                f"(max abs error {err.max():.3g})"
            )
