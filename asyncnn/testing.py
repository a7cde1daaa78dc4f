"""Helpers for testing code built on asyncnn: gradient checks against finite differences."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._math._autodiff import vjp
from ._math._autodiff_args import RuleError
from ._math._pytree import leaf_name, tree_flatten, tree_unflatten
from .backends import array_namespace, is_floating, to_numpy

__all__ = ["check_grads", "numerical_vjp"]

#: check_grads' default ``(rtol, atol)`` by a leaf's dtype: its gradient is compared with
#: finite differences taken in float64, so the tolerance is that of the vjp's own rounding
#: (the finite differences' rounding is bounded apart, entry by entry: see check_grads)
_TOLERANCES = {8: (1e-6, 1e-8), 4: (1e-4, 1e-5), 2: (2e-2, 1e-2)}


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


#: how far each float64 evaluation of an output entry may be off by rounding, relative to the
#: entry: a central difference subtracts two of them, so its error is at most twice this times
#: ``sum |ct| * |output|`` over the entries that the step moved, over the step's length
_EPS64 = float(np.finfo(np.float64).eps)
_FD_ROUNDING = 8 * _EPS64


def _as_outputs(out: Any) -> list[np.ndarray]:
    return [to_numpy(o).astype(np.float64) for o in tree_flatten(out)[0]]


def _finite_differences(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    cotangent: Any,
    eps: float,
    names: list[str],
    owner: str,
) -> tuple[list[Any], list[Any]]:
    """:func:`numerical_vjp`'s gradients, and for each the bound on its rounding error.

    Each difference is taken output entry by output entry, ``<ct, fn(x + h) - fn(x - h)>``,
    not as the difference of the two inner products: entries that the step leaves alone then
    cancel exactly, and the rounding left is that of the entries it moved, bounded by
    ``2 * _FD_ROUNDING`` times the root sum of squares of ``|ct| * max(|fn(x + h)|,
    |fn(x - h)|)`` over those entries, over the step actually taken, ``(x + eps) - (x - eps)``
    as float64 rounds them.
    """
    leaves, treedef = tree_flatten(args)
    leaves = [_as_float64(leaf) for leaf in leaves]
    ct_leaves = [to_numpy(c).astype(np.float64) for c in tree_flatten(cotangent)[0]]

    def outputs(new_leaves: list[Any]) -> list[np.ndarray]:
        return _as_outputs(fn(*tree_unflatten(treedef, new_leaves)))

    base = outputs(leaves)

    def with_leaf(i: int, value: Any) -> list[Any]:
        return [*leaves[:i], value, *leaves[i + 1 :]]

    def difference(plus: list[np.ndarray], minus: list[np.ndarray], step: float) -> Any:
        total, squares, unseen = 0.0, 0.0, 0.0
        for c, p, m, b in zip(ct_leaves, plus, minus, base, strict=True):
            total += float(np.sum(c * (p - m)))
            moved = (p != b) | (m != b)  # (a NaN counts as moved: its bound is NaN, and fails)
            size = np.abs(c) * np.maximum(np.abs(p), np.abs(m))
            squares += float(np.sum(np.where(moved, size * size, 0.0)))
            if not moved.all():
                unseen = max(unseen, float(np.max(np.where(moved, 0.0, size))))
        # the entries' rounding errors are independent: they add up as a root sum of squares
        # (summed as worst cases, the bound was thousands of times the error over a dense op's
        # thousand outputs, and let gradients 1e-3 off pass). An entry the step did not visibly
        # move may still have moved by less than its last place (sum(v**2) at [1e5, 1e-3]: a
        # step of v[1] rounds away): the largest such adds half a unit of its last place each
        # side (all of them would loosen the bound by every output that cannot depend on x)
        rounding = _FD_ROUNDING * math.sqrt(squares) + 0.5 * _EPS64 * unseen
        return total / step, 2 * rounding / step

    def step_of(name: str, j: int | None, orig: float) -> tuple[float, float, float]:
        up, down = orig + eps, orig - eps
        step = up - down
        where = name if j is None else f"{name} flat index {j}"
        if not step > 0:  # (where eps rounds away)
            raise ValueError(
                f"{owner}: eps={eps!r} is below the spacing of float64 at {where} "
                f"(value {orig!r}): x + eps rounds to x; pass a larger eps"
            )
        return up, down, step

    for name, leaf in zip(names, leaves, strict=True):
        # (checked before any step: another leaf's inf would make inf - inf of its outputs)
        if _is_real_float(leaf) and not np.all(np.isfinite(to_numpy(leaf))):
            j = int(np.argmin(np.isfinite(to_numpy(leaf)).reshape(-1)))
            where = name if isinstance(leaf, float) else f"{name} flat index {j}"
            value = float(np.reshape(to_numpy(leaf), -1)[j])
            raise ValueError(
                f"{owner}: {where} is {value!r}; finite differences need finite arguments"
            )

    grads: list[Any] = []
    errors: list[Any] = []
    for i, leaf in enumerate(leaves):
        if not _is_real_float(leaf):
            grads.append(None)
            errors.append(None)
            continue
        if isinstance(leaf, float):
            up, down, step = step_of(names[i], None, leaf)
            g, e = difference(outputs(with_leaf(i, up)), outputs(with_leaf(i, down)), step)
            grads.append(np.asarray(g))
            errors.append(np.asarray(e))
            continue
        xp = array_namespace(leaf)
        host = to_numpy(leaf).copy()
        g_flat = np.zeros(host.size)
        e_flat = np.zeros(host.size)
        flat = host.reshape(-1)
        for j in range(flat.size):
            orig = float(flat[j])
            up, down, step = step_of(names[i], j, orig)
            flat[j] = up
            plus = outputs(with_leaf(i, xp.asarray(host)))
            flat[j] = down
            minus = outputs(with_leaf(i, xp.asarray(host)))
            flat[j] = orig
            g_flat[j], e_flat[j] = difference(plus, minus, step)
        grads.append(g_flat.reshape(host.shape))
        errors.append(e_flat.reshape(host.shape))
    return grads, errors


def numerical_vjp(
    fn: Callable[..., Any], args: tuple[Any, ...], cotangent: Any, eps: float = 1e-6
) -> list[Any]:
    """Central finite differences of ``<cotangent, fn(*args)>`` for every float leaf of ``args``.

    The differences are taken in float64: every 16- and 32-bit float leaf of ``args`` is
    converted to float64 first (a step of ``eps`` would be rounded away in float32), so this is
    the gradient of the float64 function, whatever the arguments' dtypes. Each is
    ``<cotangent, fn(x + eps) - fn(x - eps)>`` over the step float64 takes,
    ``(x + eps) - (x - eps)`` (not quite ``2 * eps`` where float64 rounds ``x + eps``), the outputs
    subtracted entry by entry (so the entries a step leaves alone add no rounding).

    Returns a flat list (flattening order of ``args``) of float64 numpy arrays, with ``None``
    at leaves that are not real floats (Python floats and float arrays).

    Raises:
        ValueError: ``eps`` is below float64's spacing at some argument entry (``x + eps == x``),
            or an entry is inf or NaN.
    """
    names = _leaf_names(args, "args")
    return _finite_differences(fn, args, cotangent, eps, names, "numerical_vjp")[0]


def _leaf_names(tree: Any, name: str) -> list[str]:
    """A name for each leaf of ``tree``, in ``tree_flatten``'s order (``args[0]['weight']``)."""
    treedef = tree_flatten(tree)[1]
    return [leaf_name(treedef, k, name) for k in range(treedef.num_leaves)]


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
    :func:`numerical_vjp`), at every entry ``x_j`` of the leaf::

        |vjp - fd| <= atol + rtol * max(|vjp|, |fd|) + fd_rounding_j

    ``fd_rounding_j`` is a bound on the rounding error of the finite difference itself:
    ``16 * 2.2e-16 * sqrt(sum_k (|ct_k| * max(|fn(x+)_k|, |fn(x-)_k|))**2) / (x+ - x-)``, over
    the output entries ``k`` that the step ``x_j +- eps`` moved (each float64 evaluation of one
    may be off by 8 units of its last place, independently of the others: a root sum of
    squares), plus ``2.2e-16 * |ct_k| * |fn(x)_k| / (x+ - x-)`` for the largest entry it did
    not visibly move (which it may have moved by less than its last place), ``x+ - x-`` being
    the step float64 takes (about ``2 * eps``). It grows with the size of the outputs (large
    values) and with the square root of the number a step moves, and is tiny beside ``rtol``
    for outputs of order 1: a float64 gradient 1e-5 off still fails where a dense op's
    thousands of outputs are in the thousands, not where they are near 1e5. (Finite
    differences cannot resolve errors smaller than their own.) It counts the outputs'
    magnitudes, not those of the values computed on the way: a function that cancels large
    terms (a layer norm of inputs near 1e3, ``(x + 1e8) - 1e8``) loses more to rounding than
    its outputs show, and needs a larger ``atol``. The
    differences' truncation error (of order ``eps**2`` times the third derivative) is not
    counted: a function that curves sharply at the scale of ``eps`` needs a smaller ``eps``.

    Args:
        fn: a function of the arguments built from asyncnn ops.
        *args: its arguments (pytrees); float64 ones check the vjp to the tightest tolerance.
        rtol: the relative tolerance; by default by each leaf's dtype, for the vjp's own
            rounding: ``1e-6`` for float64 (and Python floats), ``1e-4`` for float32, ``2e-2``
            for float16 and bfloat16 (an error of 1e-3 passes there: check in float64 to find
            small ones).
        atol: the absolute tolerance; by default ``1e-8``, ``1e-5`` and ``1e-2`` by dtype as
            for ``rtol``.
        eps: the finite-difference step, added to and taken from each entry in float64.
        seed: seeds the random cotangent.

    Raises:
        AssertionError: naming the argument leaf (``args[0]['weight']``), the index where the
            gradient is worst and both values, or a gradient of the wrong shape or dtype.
        TypeError: a complex leaf (finite differences here are of real leaves only).
        ValueError: ``eps`` is below float64's spacing at an argument entry (``x + eps ==
            x``, from about ``|x| > 4e9`` at the default ``eps``): pass a larger one; or an
            argument entry is inf or NaN.
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
    numeric, fd_errors = _finite_differences(fn, args, cotangent, eps, names, "check_grads")
    for name, leaf, a, n, fd_error in zip(names, leaves, analytic, numeric, fd_errors, strict=True):
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
        scale = leaf_atol + leaf_rtol * np.maximum(np.abs(a), np.abs(n)) + fd_error
        if not np.all(err <= scale):  # (a NaN anywhere fails)
            excess = np.nan_to_num(err - scale, nan=np.inf)
            worst = int(np.argmax(np.where(err <= scale, -np.inf, excess)))
            raise AssertionError(
                f"{name}: vjp and finite differences differ; at flat index {worst} vjp gives "
                f"{a.reshape(-1)[worst]:.10g}, finite differences {n.reshape(-1)[worst]:.10g} "
                f"(max abs error {err.max():.3g}; allowed there {scale.reshape(-1)[worst]:.3g}, "
                f"{np.reshape(fd_error, -1)[worst]:.3g} of it for the finite differences' own "
                "rounding)"
            )
