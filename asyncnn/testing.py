"""Helpers for testing code built on asyncnn: gradient checks against finite differences."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._math._autodiff import vjp
from ._math._pytree import tree_flatten, tree_unflatten
from .backends import array_namespace, to_numpy

__all__ = ["check_grads", "numerical_vjp"]


def _inner(a: Any, b: Any) -> float:
    return float(np.sum(to_numpy(a).astype(np.float64) * to_numpy(b).astype(np.float64)))


def numerical_vjp(
    fn: Callable[..., Any], args: tuple[Any, ...], cotangent: Any, eps: float = 1e-6
) -> list[Any]:
    """Central finite differences of ``<cotangent, fn(*args)>`` for every float leaf of ``args``.

    Returns a flat list (flattening order of ``args``), with ``None`` at non-float leaves.
    """
    leaves, treedef = tree_flatten(args)
    ct_leaves = tree_flatten(cotangent)[0]

    def objective(new_leaves: list[Any]) -> float:
        out_leaves = tree_flatten(fn(*tree_unflatten(treedef, new_leaves)))[0]
        return builtin_sum(_inner(c, o) for c, o in zip(ct_leaves, out_leaves, strict=True))

    grads: list[Any] = []
    for i, leaf in enumerate(leaves):
        if getattr(getattr(leaf, "dtype", None), "kind", "") != "f":
            grads.append(None)
            continue
        xp = array_namespace(leaf)
        host = to_numpy(leaf).astype(np.float64)
        g = np.zeros_like(host)
        flat = host.reshape(-1)
        for j in range(flat.size):
            orig = flat[j]
            flat[j] = orig + eps
            plus = objective([*leaves[:i], xp.asarray(host, dtype=leaf.dtype), *leaves[i + 1 :]])
            flat[j] = orig - eps
            minus = objective([*leaves[:i], xp.asarray(host, dtype=leaf.dtype), *leaves[i + 1 :]])
            flat[j] = orig
            g.reshape(-1)[j] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


builtin_sum = sum


def check_grads(
    fn: Callable[..., Any],
    *args: Any,
    rtol: float = 1e-6,
    atol: float = 1e-8,
    eps: float = 1e-6,
    seed: int = 0,
) -> None:
    """Checks ``vjp(fn, *args)`` against central finite differences (use float64 inputs).

    A random cotangent is drawn for the output; the vjp's gradient of every float leaf must match
    the finite-difference gradient of ``<cotangent, fn(*args)>``.

    Raises:
        AssertionError: naming the argument leaf and the largest relative error.
    """
    out, pullback = vjp(fn, *args)
    rng = np.random.default_rng(seed)
    out_leaves, out_def = tree_flatten(out)
    ct_leaves = []
    for o in out_leaves:
        xp = array_namespace(o)
        ct_leaves.append(xp.asarray(rng.standard_normal(np.shape(o)), dtype=o.dtype))
    cotangent = tree_unflatten(out_def, ct_leaves)
    analytic = tree_flatten(pullback(cotangent))[0]
    numeric = numerical_vjp(fn, args, cotangent, eps)
    for k, (a, n) in enumerate(zip(analytic, numeric, strict=True)):
        if n is None:
            if a is not None:
                raise AssertionError(f"leaf {k}: expected no gradient (not a float), got one")
            continue
        a = to_numpy(a).astype(np.float64)
        if a.shape != n.shape:
            raise AssertionError(f"leaf {k}: gradient shape {a.shape}, argument shape {n.shape}")
        err = np.abs(a - n)
        scale = atol + rtol * np.maximum(np.abs(a), np.abs(n))
        if not np.all(err <= scale):
            worst = int(np.argmax(err - scale))
            raise AssertionError(
                f"leaf {k}: vjp and finite differences differ; at flat index {worst} vjp gives "
                f"{a.reshape(-1)[worst]:.10g}, finite differences {n.reshape(-1)[worst]:.10g} "
                f"(max abs error {err.max():.3g})"
            )
