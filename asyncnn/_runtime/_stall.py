"""Stalls the event loop cannot see: an actor's inline compute that never returns.

Small CPU work runs on the event-loop thread (a hand-off would cost more than the work), so
while it runs, the loop, and with it the stall watchdog, stands still. A
:class:`BlockedLoopMonitor` thread watches the watchdog's heartbeat: when the loop has not
ticked and the loop's thread has been inside one actor's op for the stall timeout
(its frames on the thread's stack: its own code or its inline compute, not an op that awaits a
pool thread, which leaves the thread to the loop), it raises :class:`LoopBlockedError` in the
loop's thread (``PyThreadState_SetAsyncExc``), naming the actor. The exception arrives at the
next Python instruction of that thread: at once for Python code, and only when it returns for a
C call that holds on (a ``time.sleep``, one long numpy operation); either way inside the op.

A loop that stood still for another reason (the caller's own blocking code, trio's or asyncio's
own wait) is none of an actor's doing and gets nothing thrown into it; nor does a process that
was suspended (Ctrl-Z, a laptop's sleep, a paused VM), which the monitor tells by its own
wake-up coming late by about as long.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

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
    has not ticked (:meth:`tick`) and the thread has been inside one op of an actor for
    ``timeout`` seconds.

    Each round (every ``interval`` seconds) in which the loop did not tick, the monitor looks at
    the loop thread's stack, and ``blocker(frame)`` (given the thread's innermost frame) names
    the op it is inside: that op's frame (the innermost, where one op runs another's in its
    task) and what to call it in the error, or None where it is in none. An op is timed from
    the loop's last tick where the silence's first look finds it (it began after that tick: an
    op on the thread lets none run), else from the round that first finds it: a silence that
    began elsewhere (the caller's own ``time.sleep``, the loop's own wait, another op) counts
    for nothing against it, and an op that then blocks is still caught a timeout later.

    A round that comes late by over half the timeout is the process having stood still
    (suspended, or this thread starved): it is skipped, and the silence counted afresh from it.
    ``clock`` (``time.perf_counter``) and ``start`` (False: no thread; call :meth:`round`) are
    for tests.
    """

    def __init__(
        self,
        loop_thread: int,
        timeout: float,
        interval: float,
        blocker: Callable[[FrameType], tuple[FrameType, str] | None],
        *,
        clock: Callable[[], float] = time.perf_counter,
        start: bool = True,
    ) -> None:
        self.loop_thread = loop_thread
        self.timeout = timeout
        self.interval = interval
        self.blocker = blocker
        self.clock = clock
        self.last_tick = clock()
        self.fired_at: float | None = None
        # the round before (when it ran), and when the silence is counted from at the earliest
        # (a suspension's end)
        self._last_round = self.last_tick
        self._armed = self.last_tick
        # the silence watched: the tick it follows (None: none yet), whether its first look was
        # taken, and the op's frame every look found the loop's thread inside (None: not one)
        self._period: float | None = None
        self._looked = False
        self._suspect: FrameType | None = None
        self._since = self.last_tick  # when the loop's thread entered the suspect op, at most
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._main, name="asyncnn stall monitor", daemon=True
        )
        if start:
            self._thread.start()

    def tick(self) -> None:
        """The loop is alive (called by the in-loop watchdog)."""
        self.last_tick = self.clock()

    def stop(self) -> None:
        self._stop.set()

    def _main(self) -> None:
        while not self._stop.wait(self.interval):
            self.round()

    def round(self) -> None:
        """One look at the loop (the thread's loop calls it every ``interval``)."""
        now = self.clock()
        late = now - self._last_round - self.interval
        self._last_round = now
        if late > self.timeout / 2:
            # The whole process stood still (SIGSTOP and SIGCONT, a laptop's sleep, a paused VM),
            # or this thread got no turn: the loop's silence meanwhile says nothing of an actor.
            # Watch afresh from now (a loop still blocked is caught a timeout later).
            self._armed = now
            self._period, self._looked, self._suspect = None, False, None
            return
        tick = self.last_tick
        if tick != self._period:  # it ticked since the last round: a new silence, if any
            self._period, self._looked, self._suspect = tick, False, None
            return
        frame = sys._current_frames().get(self.loop_thread)
        found = None if frame is None else self.blocker(frame)
        del frame  # (holds the loop's innermost frame and its locals alive)
        if found is None:
            self._suspect = None  # the thread is in no op: the silence is none of an op's doing
            self._looked = True
            return
        if found[0] is not self._suspect:
            # an op not seen before in this silence: at its first look, since the tick (the op
            # began after it: an op on the thread lets no tick run); later, since this round
            # (the silence before it was the caller's, the loop's, or another op's)
            self._suspect = found[0]
            self._since = tick if not self._looked else now
        self._looked = True
        blocked = now - max(self._since, self._armed)
        # fires again a timeout later if the loop is still blocked: the exception may have
        # landed where it was swallowed (a handler's own except)
        if blocked <= self.timeout or (
            self.fired_at is not None and now - self.fired_at <= self.timeout
        ):
            return
        if self._stop.is_set():
            return
        self.fired_at = now
        self._raise(found[0], (
            f"no progress for {blocked:.1f} s (stall_timeout {self.timeout:g} s): {found[1]}, on "
            "the event loop's thread, which it blocked (every actor stood still); it is "
            "interrupted where it runs Python next (a C call that holds on, such as "
            "time.sleep() or a lock, when it returns). A handler must not block the loop: wait with await anyio.sleep(), "
            "not time.sleep() or a blocking lock, and run long work through await "
            "self.compute(fn, *args, cost=flops), which runs large work on a pool thread "
            "(work below the pool's inline threshold runs on the loop's thread)"
        ))  # fmt: skip

    def _raise(self, op: FrameType, message: str) -> None:
        """Raises :class:`LoopBlockedError` in the loop's thread if it is inside ``op`` now.

        The loop's thread cannot leave ``op`` while this thread holds the GIL (it runs no
        Python without it), and nothing from the check to the raise lets go of it: a switch is
        forced only once the other thread has waited the switch interval (5 ms), far longer
        than these few instructions. The exception thus lands inside ``op``. Should a switch
        come all the same, the check after the raise takes the exception back if the thread
        left before it arrived."""
        if not self._inside(op):
            return
        _messages[self.loop_thread] = message
        _set_async_exc(self.loop_thread, LoopBlockedError)
        if not self._inside(op):
            _set_async_exc(self.loop_thread, None)
            _messages.pop(self.loop_thread, None)

    def _inside(self, op: FrameType) -> bool:
        """Whether ``op`` is on the loop thread's stack now."""
        frame = sys._current_frames().get(self.loop_thread)
        while frame is not None:
            if frame is op:
                return True
            frame = frame.f_back
        return False


def _set_async_exc(thread: int, exc: type[BaseException] | None) -> None:
    """Raises ``exc`` in ``thread`` at its next Python instruction (None: takes back one that
    has not arrived yet)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), None if exc is None else ctypes.py_object(exc)
    )
