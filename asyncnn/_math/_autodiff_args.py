"""What the differentiating functions accept, apart from the tracing itself (see ``_autodiff``):
which leaves are differentiated, the containers that pytrees keep whole and would hide arrays from
a trace (and the message that says so), a pullback's cotangent checked against the output's
structure, and ``argnums`` checked against the call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..backends._dtypes import is_floating
from ._pytree import TreeDef, tree_flatten


def _is_differentiable(x: Any) -> bool:
    if type(x) is np.ndarray:  # the common case, answered first
        kind = x.dtype.kind
        return kind == "f" or kind == "c" or (kind == "V" and is_floating(x.dtype))
    dtype = getattr(x, "dtype", None)
    if dtype is not None:
        kind = getattr(dtype, "kind", "")
        return hasattr(x, "shape") and (kind in "fc" or (kind == "V" and is_floating(dtype)))
    return isinstance(x, float)


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


def _select(argnums: int | Sequence[int], n: int) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for a in nums:
        if not -n <= a < n:
            raise ValueError(f"argnums={argnums!r} but the function was called with {n} arguments")
    nums = tuple(a % n for a in nums)
    if len(nums) > 1 and len(set(nums)) != len(nums):  # the later would replace the earlier
        raise ValueError(f"argnums={argnums!r} names an argument twice")
    return nums
