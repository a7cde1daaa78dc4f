"""The check of the modules' integer arguments (sizes, counts, axes), shared so that all take
the same values: a Python int or a numpy integer (``nn.Linear(np.prod(shape), k)``, as torch and
asyncnn's ops take), never a bool or a float such as ``16.0``, and all store a plain ``int``, so
that a module made with ``np.int64(16)`` equals, hashes, prints and specs as one made with 16
(a spec, and so a checkpoint or trace, cannot carry a numpy scalar)."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

__all__ = ["as_int", "check_int", "store_sizes"]


def as_int(value: Any) -> int | None:
    """``value`` as a plain int where it is an integer that is not a bool: a Python int, a numpy
    integer, anything with ``__index__``; None otherwise (a bool or numpy bool, which would pass
    for 1 or 0; a float, even a whole one; a string; an array of more than one entry)."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return int(operator.index(value))
    except TypeError:
        return None


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a plain int (see :func:`as_int`), checked to be at least ``minimum``.

    Raises:
        ValueError: ``value`` is not such an integer, or is below ``minimum``, naming the
            module (``owner``), the argument and the value.
    """
    index = as_int(value)
    if index is None or index < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return index


def store_sizes(module: Any, *names: str) -> None:
    """Checks ``module``'s fields ``names`` with :func:`check_int` (ints >= 1), naming the
    module's class, and stores each as a plain int (on a frozen dataclass, in its
    ``__post_init__``).

    Raises:
        ValueError: a field that is not an int >= 1.
    """
    for name in names:
        size = check_int(type(module).__name__, name, getattr(module, name))
        object.__setattr__(module, name, size)
