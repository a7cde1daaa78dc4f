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

__all__ = ["DEFAULT_SWITCH_INTERVAL", "SWITCH_INTERVALS"]

#: The switch interval (seconds) a team asks for by default: how long a worker back from a BLAS
#: call may wait for the GIL at most. On a lent 16-core host at batch 64 (session 26) the MLP
#: ran 8% faster under ``Sync`` and 13-17% faster under ``Async`` at 5e-5 than at Python's 5e-3.
DEFAULT_SWITCH_INTERVAL = 5e-5


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
