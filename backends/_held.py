"""A process-wide setting that several open compute teams hold at once (BLAS's thread count,
the interpreter's switch interval): the value of the team opened last applies, and the value
from before the first returns once the last one has let go, in whatever order they close. A
team that restored the value it found on opening would hand a team still open the wrong one,
and leave the process on a team's value after all had closed.
"""

from __future__ import annotations

import threading
from typing import Any, Generic, TypeVar

__all__ = ["HeldSetting"]

T = TypeVar("T")


class HeldSetting(Generic[T]):
    """The values the open holders of one process-wide setting hold, oldest first; every
    change is made under one lock, from whichever thread opens or closes a holder.

    A subclass says how to set the value (:meth:`_set`) and how to put back what was there
    before the first holder (:meth:`_restore`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[object, T]] = []  # (holder, its value), oldest first
        self._original: Any = None  # what _set returned for the first holder

    def _set(self, value: T, first: bool) -> Any:
        """Sets ``value``, under the lock; ``first``: no holder held one before. Returns what
        :meth:`_restore` needs to put back the value found (used for the first holder only)."""
        raise NotImplementedError

    def _restore(self, original: Any) -> None:
        """Puts back the value found before the first holder (``original``: what :meth:`_set`
        returned then), under the lock."""
        raise NotImplementedError

    def hold(self, owner: object, value: T) -> None:
        """``owner``'s value applies from now on (until a newer holder's)."""
        with self._lock:
            first = not self._held
            found = self._set(value, first)
            if first:
                self._original = found
            self._held.append((owner, value))

    def release(self, owner: object) -> None:
        """Gives ``owner``'s value back (nothing when it holds none): the newest remaining
        holder's applies, or the value from before the first once none is left."""
        with self._lock:
            index = next((i for i, (o, _) in enumerate(self._held) if o is owner), None)
            if index is None:
                return
            newest = index == len(self._held) - 1
            del self._held[index]
            if not self._held:
                original, self._original = self._original, None
                self._restore(original)
            elif newest:
                self._set(self._held[-1][1], False)
