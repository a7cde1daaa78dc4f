"""The check of parameters handed to a graph's layers (``Trainer.params = ...``, a run's
``state``) against the ones the layers make: the same structure, the same array shapes, real
numeric dtypes. Apart from ``_checks.py`` (a step's data) because it looks at weights, not
batches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from asyncnn._math._data import has_numpy_dtype
from asyncnn.backends import is_floating, to_numpy

__all__ = ["check_params"]


def check_params(
    name: str,
    current: Any,
    given: Any,
    owner: str = "tr.params",
    *,
    place: str | None = None,
    floating: str | None = None,
) -> None:
    """Checks ``given`` against a layer's ``current`` parameters: the same structure, the same
    array shapes, real numeric dtypes; ``owner`` names where they were given (``tr.params``,
    ``state.params``: ``owner[name]``), or ``place`` names them whole
    (``state.earlier_params['stage0'][3]``). With ``floating``, an integer array is refused
    too, the message ending with it (an optimizer's buffer: no cast makes one of ints).

    Raises:
        ValueError: naming the layer, the place in its parameters and what differs.
    """
    _compare(f"{owner}[{name!r}]" if place is None else place, current, given, "", floating)


def _compare(tree: str, want: Any, got: Any, path: str, floating: str | None = None) -> None:
    where = f"{tree}{path}"
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping):
            raise ValueError(
                f"{where} must be a dict with keys {sorted(want)}, got {type(got).__name__}"
            )
        if set(want) != set(got):
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            raise ValueError(
                f"{where} must have the keys {sorted(want)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        for k in want:
            _compare(tree, want[k], got[k], f"{path}[{k!r}]", floating)
        return
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(want):
            n = len(got) if isinstance(got, list | tuple) else type(got).__name__
            raise ValueError(
                f"{where} must be a list of {len(want)} entries (one per module), got {n}"
            )
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            _compare(tree, w, g, f"{path}[{i}]", floating)
        return
    if not (hasattr(want, "shape") and hasattr(want, "dtype")):
        return  # a scalar setting kept in the tree
    if not hasattr(got, "shape") or not has_numpy_dtype(got):
        try:  # a list, or an array of a dtype numpy does not know (a torch tensor's)
            got = np.asarray(to_numpy(got))
        except (ValueError, TypeError, RuntimeError) as exc:
            raise ValueError(
                f"{where} ({type(got).__name__}) cannot be read as an array: {exc}"
            ) from exc
    shape = tuple(got.shape)
    if shape != tuple(want.shape):
        raise ValueError(f"{where} has shape {shape}; the layer's is {tuple(want.shape)}")
    if not (np.dtype(got.dtype).kind in "iu" or is_floating(got.dtype)):
        raise ValueError(f"{where} has dtype {got.dtype}; parameters are real numbers (float)")
    if floating is not None and np.dtype(got.dtype).kind in "iu":
        raise ValueError(f"{where} is {got.dtype}; {floating}")
