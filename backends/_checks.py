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

__all__ = ["MAX_POOL_WORKERS", "check_flag", "check_number", "check_workers"]

#: The most worker threads a compute team or device pool may have. A trace records its run's
#: pool, and a replay opens the same number of threads whatever its host, so the trace reader
#: refuses more than this (a crafted header must not start any number of threads); a pool of
#: more could write a trace that nothing reads back. No machine a run is recorded on has more
#: cores.
MAX_POOL_WORKERS = 4096


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


def check_workers(name: str, value: Any, *, none_ok: bool = False) -> None:
    """Raises an error naming ``name`` unless ``value`` is a whole number of worker threads
    from 1 to :data:`MAX_POOL_WORKERS` (checked before anything is sized by it: a count of
    ``10**9`` would fail as an empty ``MemoryError``), or None where ``none_ok``."""
    check_number(name, value, integer=True, least=1, none_ok=none_ok)
    if value is not None and value > MAX_POOL_WORKERS:
        raise ValueError(
            f"{name} must be at most {MAX_POOL_WORKERS}, got {value!r}: pass one worker per "
            "core this process may use (len(os.sched_getaffinity(0))); a trace of a run on "
            f"more than {MAX_POOL_WORKERS} workers could not be read back or replayed"
        )
