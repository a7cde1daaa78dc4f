"""The interpreter's switch interval while compute teams are open.

A team's workers spend most of their time in BLAS and numpy's loops, with the GIL released, and
need it back for a few microseconds of Python between two calls (to take the next part, to mark
one done). The thread that holds it meanwhile (the event loop running the runtime, an actor's
autodiff on another worker) keeps it until it blocks or until ``sys.getswitchinterval()`` has
passed since a waiter asked: 5 ms by default, which is ten to a hundred of the team's parts. So
each open team asks for a shorter interval, and the interval from before the first team returns
when the last one closes, in whatever order the teams close (as ``_blas.py`` does with BLAS's
thread count, which is process-wide too).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from ._checks import check_number

__all__ = [
    "AUTO_SWITCH_INTERVAL",
    "AUTO_SWITCH_WORKERS",
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


def check_switch_interval(value: Any) -> None:
    """Raises an error naming ``switch_interval`` unless ``value`` is ``"auto"``, None or a
    finite number of seconds of at least 1e-6 (the interpreter counts whole microseconds)."""
    if isinstance(value, str) and value != "auto":
        raise TypeError(f"switch_interval must be a number, 'auto' or None, got {value!r}")
    if value != "auto":
        check_number("switch_interval", value, integer=False, least=1e-6, finite=True,
                     none_ok=True)  # fmt: skip


def auto_interval(workers: int) -> float | None:
    """The interval ``switch_interval="auto"`` asks for in a team of ``workers`` (None: leave
    Python's own)."""
    return AUTO_SWITCH_INTERVAL if workers >= AUTO_SWITCH_WORKERS else None


class _SwitchIntervals:
    """The switch intervals that the open teams hold: the newest holder's applies; the
    interval found before the first returns once the last has released its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[object, float]] = []  # (owner, its interval), oldest first
        self._original: float | None = None

    def hold(self, owner: object, interval: float) -> None:
        with self._lock:
            if not self._held:
                self._original = sys.getswitchinterval()
            self._held.append((owner, interval))
            sys.setswitchinterval(interval)

    def release(self, owner: object) -> None:
        """Gives ``owner``'s interval back (nothing when it holds none)."""
        with self._lock:
            index = next((i for i, (o, _) in enumerate(self._held) if o is owner), None)
            if index is None:
                return
            newest = index == len(self._held) - 1
            del self._held[index]
            if not self._held:
                original, self._original = self._original, None
                if original is not None:
                    sys.setswitchinterval(original)
            elif newest:
                sys.setswitchinterval(self._held[-1][1])


SWITCH_INTERVALS = _SwitchIntervals()
