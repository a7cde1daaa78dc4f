"""Stalls the event loop cannot see: an actor's inline compute that never returns.

Small CPU work runs on the event-loop thread (a hand-off would cost more than the work), so
while it runs, the loop, and with it the stall watchdog, stands still. A
:class:`BlockedLoopMonitor` thread watches the watchdog's heartbeat: when the loop has not
ticked for the stall timeout while an actor is computing, it raises :class:`LoopBlockedError`
in the loop's thread (``PyThreadState_SetAsyncExc``), naming the actor. The exception arrives at
the next Python instruction of that thread: at once for Python code, and only when it returns
for a C call that holds on (a ``time.sleep``, one long numpy operation).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable

from asyncnn._errors import StallError

__all__ = ["BlockedLoopMonitor", "LoopBlockedError"]

_messages: dict[int, str] = {}  # thread -> the message of the error about to be raised there


class LoopBlockedError(StallError):
    """An actor's compute on the event-loop thread outlived the stall timeout."""

    def __init__(self, *args: object) -> None:
        if not args:  # raised by the monitor: the class is all it can pass
            args = (_messages.pop(threading.get_ident(), "the event loop was blocked"),)
        super().__init__(*args)


class BlockedLoopMonitor:
    """A daemon thread that raises :class:`LoopBlockedError` in ``loop_thread`` when the loop
    has not ticked (:meth:`tick`) for ``timeout`` seconds and ``blocker()`` names what is
    computing there (it returns None when nothing is)."""

    def __init__(
        self, loop_thread: int, timeout: float, interval: float, blocker: Callable[[], str | None]
    ) -> None:
        self.loop_thread = loop_thread
        self.timeout = timeout
        self.interval = interval
        self.blocker = blocker
        self.last_tick = time.perf_counter()
        self.fired_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._main, name="asyncnn stall monitor", daemon=True
        )
        self._thread.start()

    def tick(self) -> None:
        """The loop is alive (called by the in-loop watchdog)."""
        self.last_tick = time.perf_counter()

    def stop(self) -> None:
        self._stop.set()

    def _main(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            blocked = now - self.last_tick
            # fires again a timeout later if the loop is still blocked: the exception may have
            # landed where it was swallowed (its delivery point is wherever the thread was)
            if blocked <= self.timeout or (
                self.fired_at is not None and now - self.fired_at <= self.timeout
            ):
                continue
            what = self.blocker()
            if what is None or self._stop.is_set():
                continue
            _messages[self.loop_thread] = (
                f"no progress for {blocked:.1f} s (stall_timeout {self.timeout:g} s): {what}, on "
                "the event loop's thread, which it blocked (every actor stood still); it was "
                "interrupted. A handler must not block the loop: wait with await anyio.sleep(), "
                "not time.sleep() or a blocking lock, and run long work through await "
                "self.compute(fn, *args, cost=flops), which runs large work on a pool thread "
                "(work below the pool's inline threshold runs on the loop's thread)"
            )
            self.fired_at = now
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(self.loop_thread), ctypes.py_object(LoopBlockedError)
            )
