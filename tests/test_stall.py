"""The thread that watches the event loop itself (``_stall.py``), driven round by round on a clock
of the test's own, over a thread that stands for the loop's."""

from __future__ import annotations

import sys
import threading
import time
from types import FrameType

import pytest

from asyncnn._runtime._stall import BlockedLoopMonitor, LoopBlockedError


class _Loop(threading.Thread):
    """Stands for the loop's thread: in an op (:meth:`op`, whose frame the blocker finds) while
    ``where`` is "op", elsewhere (the loop's own wait, the caller's code) while it is "outside".
    Records where a LoopBlockedError landed."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.where = "outside"
        self.now = "outside"  # where it is (it follows `where` within a millisecond)
        self.caught: list[tuple[str, LoopBlockedError]] = []

    def run(self) -> None:
        try:
            while self.where != "done":
                if self.where == "op":
                    self.op()
                elif self.where == "op2":
                    self.op2()
                self.now = "outside"
                time.sleep(0.001)
        except LoopBlockedError as e:
            self.caught.append(("outside", e))

    def op(self) -> None:
        try:
            while self.where == "op":
                self.now = "op"
                time.sleep(0.001)
        except LoopBlockedError as e:
            self.caught.append(("op", e))
            self.where = "done"

    def op2(self) -> None:
        """Another op (another actor's, or the next of the same actor)."""
        try:
            while self.where == "op2":
                self.now = "op2"
                time.sleep(0.001)
        except LoopBlockedError as e:
            self.caught.append(("op2", e))
            self.where = "done"

    def go(self, where: str) -> None:
        self.where = where
        deadline = time.monotonic() + 10
        while self.now != where and time.monotonic() < deadline:
            time.sleep(0.001)
        assert self.now == where

    def landed(self) -> list[str]:
        """Where the errors raised landed, given time to arrive."""
        time.sleep(0.05)
        return [where for where, _ in self.caught]


def _in_op(frame: FrameType) -> tuple[FrameType, str] | None:
    f: FrameType | None = frame
    while f is not None:
        if f.f_code is _Loop.op.__code__:
            return f, "the test's op"
        if f.f_code is _Loop.op2.__code__:
            return f, "the test's second op"
        f = f.f_back
    return None


@pytest.fixture
def loop():
    thread = _Loop()
    thread.start()
    yield thread
    thread.where = "done"
    thread.join(5)


def _monitor(loop: _Loop, clock: list[float], blocker=_in_op) -> BlockedLoopMonitor:
    """A monitor of ``loop`` (timeout 1 s, a round every 0.1 s) on the clock ``clock[0]``, with
    no thread of its own: the test calls its rounds."""
    assert loop.ident is not None
    return BlockedLoopMonitor(loop.ident, 1.0, 0.1, blocker, clock=lambda: clock[0], start=False)


def _rounds(monitor: BlockedLoopMonitor, clock: list[float], until: float) -> None:
    """The monitor's rounds, each on time (0.1 s after the one before), up to ``until``."""
    while clock[0] + 0.1 <= until + 1e-9:
        clock[0] = round(clock[0] + 0.1, 6)
        monitor.round()


def test_an_op_that_blocks_the_loop_past_the_timeout_is_interrupted_inside_it(loop):
    clock = [0.0]
    monitor = _monitor(loop, clock)
    loop.go("op")  # an op that began before the loop's last tick (at 0) and never returns
    _rounds(monitor, clock, 1.0)
    assert loop.landed() == []  # 1.0 s: not over the timeout yet
    _rounds(monitor, clock, 1.1)
    assert loop.landed() == ["op"]
    assert str(loop.caught[0][1]).startswith(
        "no progress for 1.1 s (stall_timeout 1 s): the test's op, on the event loop's thread"
    )


def test_a_suspended_process_is_not_taken_for_a_blocked_loop(loop):
    # (a run suspended with Ctrl-Z, or a laptop's sleep, for longer than stall_timeout threw
    # LoopBlockedError into the loop on resuming, blaming whatever op was running, or landing in
    # trio's epoll wait: the loop had not ticked, and the monitor took the pause for a block)
    clock = [0.0]
    monitor = _monitor(loop, clock)
    loop.go("op")
    _rounds(monitor, clock, 0.3)
    clock[0] = 3.3  # the process stood still 3 s: the monitor's round comes 3 s late
    monitor.round()
    assert loop.landed() == []
    monitor.tick()  # the loop ticks once it runs again
    loop.go("outside")
    _rounds(monitor, clock, 5.0)
    assert loop.landed() == []


def test_a_loop_still_blocked_after_a_suspension_is_interrupted_a_timeout_later(loop):
    clock = [0.0]
    monitor = _monitor(loop, clock)
    loop.go("op")
    _rounds(monitor, clock, 0.3)
    clock[0] = 3.3
    monitor.round()  # the pause is skipped: the silence is counted afresh from here
    _rounds(monitor, clock, 4.3)
    assert loop.landed() == []
    _rounds(monitor, clock, 4.5)
    assert loop.landed() == ["op"]


def test_a_silence_that_began_outside_any_op_is_no_ops_doing(loop):
    # (the caller's own time.sleep, or the loop's own wait, then an op: the error landed in the
    # caller's code, blaming an op for the caller's silence). The op is timed from where it
    # was first seen, not from the silence's start
    clock = [0.0]
    monitor = _monitor(loop, clock)
    _rounds(monitor, clock, 2.5)  # the caller's code, silent for longer than the timeout
    assert loop.landed() == []
    loop.go("op")  # first seen at 2.6
    _rounds(monitor, clock, 3.6)
    assert loop.landed() == []  # 1.0 s of it: not over the timeout
    _rounds(monitor, clock, 3.7)
    assert loop.landed() == ["op"]


def test_an_op_that_blocks_after_another_op_is_timed_from_where_it_was_seen(loop):
    # (one actor's op blocked the loop briefly, then another's blocked it for good, with no
    # tick between: the monitor gave up on the silence when the op changed, and the run hung)
    clock = [0.0]
    monitor = _monitor(loop, clock)
    loop.go("op")
    _rounds(monitor, clock, 0.5)  # the first op, seen from 0.1, for less than the timeout
    loop.go("op2")  # the second, first seen at 0.6
    _rounds(monitor, clock, 1.6)
    assert loop.landed() == []
    _rounds(monitor, clock, 1.7)
    assert loop.landed() == ["op2"]


def test_the_loop_leaving_the_op_before_the_raise_gets_nothing(loop):
    # the monitor finds the op, then the loop's thread leaves it before the monitor raises:
    # checked again right before the raise, nothing is thrown into where the thread went
    clock = [0.0]
    looks: list[float] = []

    def leaves_when_due(frame: FrameType) -> tuple[FrameType, str] | None:
        found = _in_op(frame)
        looks.append(clock[0])
        if clock[0] > 1.0 and found is not None:
            loop.go("outside")  # (with the frame found still held, as the monitor does)
        return found

    monitor = _monitor(loop, clock, leaves_when_due)
    loop.go("op")
    _rounds(monitor, clock, 1.5)
    assert looks and loop.landed() == []
    assert loop.is_alive()


def test_the_monitor_thread_watches_on_its_own():
    # the real thread, on the real clock: a loop thread that never ticks, blocked in an op
    ready = threading.Event()
    caught: list[BaseException] = []

    def blocked_op() -> None:
        ready.set()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.001)
        except LoopBlockedError as e:
            caught.append(e)

    def blocker(frame: FrameType) -> tuple[FrameType, str] | None:
        f: FrameType | None = frame
        while f is not None and f.f_code is not blocked_op.__code__:
            f = f.f_back
        return None if f is None else (f, "the op")

    thread = threading.Thread(target=blocked_op, daemon=True)
    thread.start()
    ready.wait()
    assert thread.ident is not None and thread.ident in sys._current_frames()
    monitor = BlockedLoopMonitor(thread.ident, 0.2, 0.02, blocker)
    try:
        thread.join(10)
    finally:
        monitor.stop()
    assert len(caught) == 1 and "(stall_timeout 0.2 s): the op" in str(caught[0])
