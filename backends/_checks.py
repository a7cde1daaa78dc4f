"""Checks of the arguments that open the CPU compute team and the device pool.

Both ``ComputeTeam`` (``_parallel.py``) and ``open_device_pool`` (``_pool.py``) take thread
counts, flop thresholds and flags from a user, and both must refuse a string or a bool where a
number goes, with a message that names the argument; the checks live here, beside neither, so
that each of those files keeps to its own job.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["check_flag", "check_number"]


def check_number(
    name: str,
    value: Any,
    *,
    integer: bool,
    least: float,
    none_ok: bool = False,
    finite: bool = False,
) -> None:
    """Raises an error naming the argument ``name`` unless ``value`` is a number (a whole one
    when ``integer``; never a bool, never NaN; finite where ``finite``) of at least ``least``,
    or None where ``none_ok``."""
    if value is None and none_ok:
        return
    or_none = " or None" if none_ok else ""
    if isinstance(value, bool) or not isinstance(
        value, numbers.Integral if integer else numbers.Real
    ):
        raise TypeError(
            f"{name} must be {'an int' if integer else 'a number'}{or_none}, got {value!r}"
        )
    # (ints are finite: math.isinf would overflow on a huge one)
    nan = value != value
    if nan or (finite and not isinstance(value, numbers.Integral) and math.isinf(value)):
        kind = "a finite number" if finite else "a number, not NaN"
        raise ValueError(f"{name} must be {kind}{or_none}, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}{or_none}, got {value!r}")


def check_flag(name: str, value: Any, *, none_ok: bool = False) -> None:
    """Raises an error naming ``name`` unless ``value`` is True or False (or None where
    ``none_ok``): ``bool("false")`` is True, so a string must not pass as a flag."""
    if not (isinstance(value, bool | np.bool_) or (value is None and none_ok)):
        choices = "True, False or None" if none_ok else "True or False"
        raise TypeError(f"{name} must be {choices}, got {value!r}")
