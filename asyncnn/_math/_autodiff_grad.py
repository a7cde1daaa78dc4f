"""The gradient transforms a user calls, ``value_and_grad`` and ``grad``, built on :func:`vjp`:
the value of a scalar function of pytrees and its gradient with respect to chosen arguments."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._autodiff import _is_tracer, _raw, vjp
from ._autodiff_args import (
    _CONTAINERS,
    _hides,
    _select,
    _unopened,
)
from ._pytree import tree_flatten, tree_unflatten

__all__ = ["grad", "value_and_grad"]


def value_and_grad(
    fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """Returns a function computing ``fn``'s scalar value and its gradient.

    Args:
        fn: returns a scalar (an array of size 1), or ``(scalar, aux)`` when ``has_aux``.
        argnums: which positional argument(s) to differentiate; a tuple gives a tuple of grads.
        has_aux: ``fn`` returns ``(value, aux)``; the result is then ``((value, aux), grad)``.

    Keyword arguments of the returned function are passed to ``fn`` as they are, not
    differentiated (as in JAX): ``value_and_grad(loss)(params, x, scale=2.0)``.

    Raises:
        ValueError: when ``fn``'s value is not a scalar: an array of another size, or a tuple,
            list or dict (``(loss, aux)`` needs ``has_aux=True``; :func:`vjp` takes any
            output).
    """

    def wrapped(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        nums = _select(argnums, len(args))
        aux: list[Any] = []

        def partial(*diff: Any) -> Any:
            full = list(args)
            for a, d in zip(nums, diff, strict=True):
                full[a] = d
            out = fn(*full, **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise ValueError("has_aux=True needs fn to return a pair (value, aux)")
                aux.append(out[1])
                return out[0]
            return out

        value, pullback = vjp(partial, *(args[a] for a in nums))
        if isinstance(value, _CONTAINERS):  # (the pullback's cotangent error named no fn)
            kind = type(value).__name__
            raise ValueError(
                f"grad needs fn to return a scalar, got a {kind} of {len(value)}"
                + (
                    " as the value of (value, aux); use vjp for several outputs"
                    if has_aux
                    else "; return (value, aux) with has_aux=True, or use vjp for several outputs"
                )
            )
        if getattr(value, "size", 1) != 1:
            raise ValueError(
                f"grad needs fn to return a scalar, got shape {getattr(value, 'shape', None)}; "
                "use vjp for non-scalar outputs"
            )
        ones = _ops.namespace_of(value).ones_like(value) if hasattr(value, "dtype") else 1.0
        grads = pullback(ones)
        g = grads[0] if isinstance(argnums, int) else grads
        if has_aux:
            leaves, treedef = tree_flatten(aux[0])
            for x in leaves:
                if isinstance(x, _CONTAINERS) and _hides(x, _is_tracer):
                    raise TypeError(
                        _unopened("value_and_grad", "the aux holds", x, "come back traced")
                    )
            return (value, tree_unflatten(treedef, [_raw(x) for x in leaves])), g
        return value, g

    return wrapped


def grad(
    fn: Callable[..., Any], argnums: int | Sequence[int] = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Returns a function computing the gradient of scalar-valued ``fn``.

    See :func:`value_and_grad` for the arguments (keyword arguments go to ``fn``, not
    differentiated); with ``has_aux`` the result is ``(grad, aux)``.
    """
    vg = value_and_grad(fn, argnums, has_aux)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out, g = vg(*args, **kwargs)
        return (g, out[1]) if has_aux else g

    return wrapped


from . import _ops  # noqa: E402  (the ops module imports Primitive and Tracer from here)
