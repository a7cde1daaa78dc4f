"""What the differentiating functions accept, apart from the tracing itself (see ``_autodiff``):
which leaves are differentiated, the containers that pytrees keep whole and would hide arrays from
a trace (and the message that says so), a pullback's cotangent checked against the output's
structure, and ``argnums`` checked against the call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..backends import is_cupy_array
from ..backends._dtypes import is_floating
from ._pytree import TreeDef, leaf_name, tree_flatten


def _is_differentiable(x: Any) -> bool:
    """Whether ``x`` is a leaf that is differentiated: a real floating array (bfloat16 too) or a
    Python float. A complex one is not (see :func:`_is_complex`)."""
    if type(x) is np.ndarray:  # the common case, answered first
        kind = x.dtype.kind
        return kind == "f" or (kind == "V" and is_floating(x.dtype))
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        kind = getattr(dtype, "kind", "")
        return hasattr(x, "shape") and (kind == "f" or (kind == "V" and is_floating(dtype)))
    return isinstance(x, float)


def _is_complex(x: Any) -> bool:
    """Whether ``x`` is a complex array or number: a leaf the differentiating functions refuse."""
    if isinstance(x, complex):  # (numpy's complex128 scalars too)
        return True
    return hasattr(x, "shape") and getattr(getattr(x, "dtype", None), "kind", "") == "c"


#: why complex values are refused, and what to do instead (the end of each such message)
COMPLEX_REFUSED = (
    "complex values are not differentiated (the rules take no complex conjugates, so the "
    "gradients through them would be wrong): pass the real and imaginary parts as two real "
    "arrays (z.real, z.imag) and compute with those"
)


def _complex_leaf(who: str, treedef: TreeDef, k: int, leaf: Any) -> TypeError:
    """The error for leaf ``k`` of the primals (of structure ``treedef``), which is complex."""
    name = leaf_name(treedef, k, "primals")
    dtype = getattr(leaf, "dtype", type(leaf).__name__)
    return TypeError(
        f"{who}: {name} is complex ({dtype}, shape {tuple(getattr(leaf, 'shape', ()))}), and "
        f"{COMPLEX_REFUSED}, or pass it undifferentiated (an argument outside grad's argnums, "
        "or a keyword argument). (primals: vjp's arguments after fn, or the arguments that "
        "grad's and value_and_grad's argnums name, in order)"
    )


_CONTAINERS = (dict, list, tuple)


def _hides(x: Any, found: Callable[[Any], bool]) -> bool:
    """Whether ``x``, a container that pytrees keep whole (a namedtuple, an OrderedDict: only
    plain dicts, lists and tuples are opened), holds something ``found`` picks, at any depth."""
    if isinstance(x, dict):
        return any(_hides(v, found) for v in x.values())
    if isinstance(x, list | tuple):
        return any(_hides(v, found) for v in x)
    return found(x)


def _unopened(who: str, where: str, leaf: Any, fate: str) -> str:
    kind = type(leaf).__name__
    base = next(t for t in _CONTAINERS if isinstance(leaf, t)).__name__
    plain = "x._asdict() or tuple(x)" if hasattr(leaf, "_asdict") else f"{base}(x)"
    return (
        f"{who}: {where} arrays inside {kind}(...), which would {fate}: pytrees open only plain "
        f"dicts, lists and tuples, and any other type ({kind} too) is one leaf; use {plain}"
    )


def _cotangent_leaves(cotangent: Any, out_def: TreeDef) -> list[Any]:
    """The leaves of a pullback's cotangent, checked to have the output's structure (a lone
    array stands for a one-leaf output)."""
    if out_def.kind == "leaf" and type(cotangent) not in (dict, list, tuple):
        return [cotangent]
    ct_leaves, ct_def = tree_flatten(cotangent)
    if ct_def != out_def:
        if out_def.kind == "leaf" and len(ct_leaves) == 1:
            return ct_leaves[:1]
        raise ValueError(
            f"pullback: the cotangent's structure {ct_def!r} differs from the output's {out_def!r}"
        )
    return ct_leaves


class RuleError(ValueError):
    """A primitive's rule returned something else than its contract says
    (``asyncnn.testing.check_grads`` fails such a rule with an ``AssertionError``, as it does a
    wrong gradient)."""


class CheckedForward:
    """A forward rule written outside the library, checked to return ``(output, residuals)``;
    its residuals also keep the shapes of the positional arguments, for :class:`CheckedRule`.
    (A class, not a closure: a primitive pickles where its rules do.)"""

    __slots__ = ("name", "forward")

    def __init__(self, name: str, forward: Callable[..., Any]) -> None:
        self.name = name
        self.forward = forward

    def __call__(self, *args: Any, **params: Any) -> tuple[Any, Any]:
        result = self.forward(*args, **params)
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise RuleError(
                f"{self.name}: its forward rule returned {_described(result)}; a forward rule "
                "returns the pair (output, residuals), the residuals being what the VJP rule "
                "needs (None for nothing)"
            )
        out = result[0]
        if isinstance(out, tuple | list | dict):
            # (vjp returned the container, and a pullback or the next op failed on it, naming
            # neither the primitive nor the cause)
            raise RuleError(
                f"{self.name}: its forward rule's output is a {type(out).__name__} of "
                f"{len(out)} (the first of the pair (output, residuals)); a primitive has one "
                "output: stack the outputs into one array (xp.stack, and index it after the "
                "call) or write one primitive per output"
            )
        shapes = tuple(tuple(getattr(a, "shape", ())) for a in args)
        return out, _Checked(result[1], shapes, tuple(getattr(a, "dtype", None) for a in args))


class _Checked:
    """A checked forward's residuals and the shapes of its arguments."""

    __slots__ = ("res", "shapes", "dtypes")

    def __init__(
        self, res: Any, shapes: tuple[tuple[int, ...], ...], dtypes: tuple[Any, ...]
    ) -> None:
        self.res = res
        self.shapes = shapes
        self.dtypes = dtypes


class CheckedRule:
    """A VJP rule written outside the library, checked to return one gradient (or None) per
    positional argument, each wanted one of its argument's shape and, for a floating argument,
    dtype: a bare array was zipped with the arguments along its first axis, a gradient of
    another shape (a rule that did not undo its broadcasting) was broadcast into the sum, a
    wrong gradient without a word, and one of another dtype (a float16 argument's gradient
    computed in float32) reached the optimizer, whose error named neither rule nor argument."""

    __slots__ = ("name", "rule")

    def __init__(self, name: str, rule: Callable[[Any, Any, tuple[bool, ...]], Any]) -> None:
        self.name = name
        self.rule = rule

    def __call__(self, g: Any, res: _Checked, needs: tuple[bool, ...]) -> Sequence[Any]:
        grads = self.rule(g, res.res, needs)
        n = len(needs)
        args = f"{n} positional argument{'s' if n != 1 else ''}"
        if not isinstance(grads, tuple | list):
            raise RuleError(
                f"{self.name}: its VJP rule returned {_described(grads)}, not a tuple of one "
                f"gradient (or None) per positional argument (it has {args}); return (g,) for "
                "one argument"
            )
        if len(grads) != n:
            raise RuleError(
                f"{self.name}: its VJP rule returned {len(grads)} gradients for {args}; return "
                "one gradient (or None) per positional argument, in their order"
            )
        for i, (grad, need, shape) in enumerate(zip(grads, needs, res.shapes, strict=True)):
            if need and grad is not None:
                if isinstance(grad, int | float | np.generic):
                    # a number for a 0-d argument (numpy's 0-d arithmetic gives scalars): as an
                    # array of the argument's dtype, which the rules upstream take
                    grads = list(grads)
                    grads[i] = grad = np.asarray(grad, dtype=res.dtypes[i])
                got = tuple(getattr(grad, "shape", ()))
                if got != shape:
                    raise RuleError(
                        f"{self.name}: its VJP rule's gradient for argument {i + 1} has the "
                        f"wrong shape: gradient shape {got}, argument shape {shape}; each "
                        "gradient has its argument's shape (sum it over the axes the forward "
                        "broadcast)"
                    )
                dtype = res.dtypes[i]
                # (an integer argument's or a Python number's gradient is taken as it comes)
                if dtype is not None and is_floating(dtype):
                    got_dtype = getattr(grad, "dtype", None)
                    if got_dtype != dtype:
                        raise RuleError(
                            f"{self.name}: its VJP rule's gradient for argument {i + 1} has "
                            f"the wrong dtype: gradient dtype {got_dtype}, the argument's is "
                            f"{dtype}; each "
                            "gradient has its argument's dtype (compute in it, or cast the "
                            f"gradient: grad.astype({str(dtype)!r}))"
                        )
        return grads


def _described(x: Any) -> str:
    kind = type(x).__name__
    what = f"{'an' if kind[:1] in 'aeiou' or kind == 'ndarray' else 'a'} {kind}"
    shape = getattr(x, "shape", None)
    return what if shape is None else f"{what} of shape {tuple(shape)}"


def _select(argnums: int | Sequence[int], n: int) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for a in nums:
        if not -n <= a < n:
            raise ValueError(f"argnums={argnums!r} but the function was called with {n} arguments")
    nums = tuple(a % n for a in nums)
    if len(nums) > 1 and len(set(nums)) != len(nums):  # the later would replace the earlier
        raise ValueError(f"argnums={argnums!r} names an argument twice")
    return nums


def _mixed_devices(op: str, args: Sequence[Any], params: dict[str, Any]) -> TypeError | None:
    """The error for an op whose arrays (raw values: its arguments and array parameters) sit on
    different devices, a GPU's and the host or two GPUs; None where they do not (the op failed
    for another reason). Asked only once the op has failed: cupy refuses a numpy operand with a
    bare ``TypeError`` naming no op and no argument."""
    found: list[tuple[str, str]] = []  # (device, what is there)
    named = [(f"argument {i + 1}", a) for i, a in enumerate(args)] + list(params.items())
    for what, a in named:
        if type(a) is np.ndarray:
            device = "the host (numpy)"
        elif is_cupy_array(a) and hasattr(a, "device"):
            device = f"cuda:{a.device.id} (cupy)"
        else:
            continue  # (a Python number or a numpy scalar goes anywhere)
        found.append((device, f"{what} {tuple(a.shape)} {a.dtype} on {device}"))
    if len({device for device, _ in found}) < 2:
        return None
    return TypeError(
        f"{op}: its arrays are on different devices: {'; '.join(t for _, t in found)}. Move "
        "them to one device first: asyncnn.backends.get_backend('cuda:0').asarray(x) for a "
        "host array, asyncnn.backends.to_numpy(x) for a GPU one (a run moves its inputs and "
        "labels itself; a direct call of an op does not)"
    )
