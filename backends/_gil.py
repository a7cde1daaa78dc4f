"""The interpreter's switch interval while compute teams are open.

A team's workers spend most of their time in BLAS and numpy's loops, with the GIL released, and
need it back for a few microseconds of Python between two calls (to take the next part, to mark
one done). The thread that holds it meanwhile (the event loop running the runtime, an actor's
autodiff on another worker) keeps it until it blocks or until ``sys.getswitchinterval()`` has
passed since a waiter asked: 5 ms by default, which is ten to a hundred of the team's parts. So
an open team of many workers asks for a shorter interval, held as BLAS's thread count is
(``_held.py``: the newest team's applies, and the one from before returns when the last closes).
"""

from __future__ import annotations

import sys
from typing import Any

from ._checks import check_number
from ._held import HeldSetting

__all__ = [
    "AUTO_SWITCH_INTERVAL",
    "AUTO_SWITCH_WORKERS",
    "MAX_SWITCH_INTERVAL",
    "SWITCH_INTERVALS",
    "auto_interval",
    "check_switch_interval",
]

#: The switch interval (seconds) a team of :data:`AUTO_SWITCH_WORKERS` workers or more asks for
#: by default (``switch_interval="auto"``). On lent 16-core hosts at batch 64 (session 26,
#: medians of 3 interleaved runs, the MLP of ``bench_parallel.py``) it beat Python's 5 ms in 14
#: of 18 pairs of runs: in one probe by 8% under ``Sync`` and 13-17% under ``Async``, in the
#: other within that host's noise.
AUTO_SWITCH_INTERVAL = 5e-5
#: Below this many workers ``"auto"`` leaves Python's interval alone: with 2 workers on 2 cores
#: the same probe lost in 7 of 9 pairs (more forced switches between three busy threads), and
#: on the 2-core VM it was within the noise.
AUTO_SWITCH_WORKERS = 8


#: The longest switch interval (seconds) a team may ask for: 200 times Python's 5 ms. The
#: interval bounds how long a thread running Python keeps the GIL from a worker back from BLAS,
#: so a longer one only stalls the team (and the event loop); far longer ones are not even
#: kept: CPython counts the interval in microseconds, and 1e300 s became an interval of 0.
MAX_SWITCH_INTERVAL = 1.0


def check_switch_interval(value: Any) -> None:
    """Raises an error naming ``switch_interval`` unless ``value`` is ``"auto"``, None or a
    finite number of seconds from 1e-6 (the interpreter counts whole microseconds) to
    :data:`MAX_SWITCH_INTERVAL` (1 s)."""
    if isinstance(value, str) and value != "auto":
        raise TypeError(f"switch_interval must be a number, 'auto' or None, got {value!r}")
    if value != "auto":
        check_number("switch_interval", value, integer=False, least=1e-6, finite=True,
                     none_ok=True)  # fmt: skip
        if value is not None and value > MAX_SWITCH_INTERVAL:
            raise ValueError(
                f"switch_interval must be at most {MAX_SWITCH_INTERVAL} s (seconds a thread "
                "running Python may keep the GIL from a worker; Python's own is 0.005), got "
                f"{value!r}; pass None to leave the interpreter's interval as it is"
            )


def auto_interval(workers: int) -> float | None:
    """The interval ``switch_interval="auto"`` asks for in a team of ``workers`` (None: leave
    Python's own)."""
    return AUTO_SWITCH_INTERVAL if workers >= AUTO_SWITCH_WORKERS else None


class _SwitchIntervals(HeldSetting[float]):
    """The switch intervals that the open teams hold (see :class:`HeldSetting`)."""

    def _set(self, value: float, first: bool) -> float:
        found = sys.getswitchinterval()
        sys.setswitchinterval(value)
        return found

    def _restore(self, original: float) -> None:
        sys.setswitchinterval(original)


SWITCH_INTERVALS = _SwitchIntervals()
