"""What keeps a run from hanging or going wrong without a word: the checks that refuse a call
from another thread than the run's loop, or one the run can no longer serve (after its block was
left, or once a step was cut off part-way); the checks of a step's batch (``_checks.py``'s:
names, shapes, dtypes, and the ids and labels it holds against their range, as ``Trainer``
checks its data); the turn that lets steps and drains from several tasks go in one at a time, in the
order they were called; and the watchdog that raises a :class:`StallError` when no progress is
made. Apart from ``_run.py``, the scheduler, because none of it decides what runs: each guards
the scheduler's calls and its loop.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from asyncnn._errors import StallError

from ._checks import check_batch, check_ranges
from ._stall import BlockedLoopMonitor

if TYPE_CHECKING:
    from ._checks import RangeCheck
    from ._graph import Graph

__all__ = ["RunGuards", "checked_max_in_flight", "checked_split"]

#: the methods that run one op of an actor, with ``computing`` set throughout (``Serving._run_op``,
#: ``LossActor._process``): a frame of one on the loop thread's stack is that op running now
_OP_METHODS = ("_run_op", "_process")


def checked_split(policy: Any, rows: int) -> list[tuple[int, int]]:
    """``policy.split(rows)``, checked: ``(start, stop)`` pairs of ints that cover the rows
    ``0 .. rows`` in order, each part at least one row. A custom policy's split that drops,
    repeats or overruns rows would otherwise train on the wrong rows without a word (or, with
    no part at all, wait forever for a key that never comes)."""
    parts = policy.split(rows)
    expected = 0
    ok = isinstance(parts, list | tuple) and len(parts) > 0
    if ok:
        for part in parts:
            if (
                not isinstance(part, tuple | list)
                or len(part) != 2
                or not all(isinstance(b, int | np.integer) and not isinstance(b, bool)
                           for b in part)
                or int(part[0]) != expected
                or not int(part[0]) < int(part[1]) <= rows
            ):  # fmt: skip
                ok = False
                break
            expected = int(part[1])
        ok = ok and expected == rows
    if not ok:
        raise ValueError(
            f"{type(policy).__name__}.split({rows}) returned {parts!r}: a minibatch's split "
            f"must be a list of (start, stop) int pairs that cover its rows 0..{rows} in "
            "order, each part one row or more (e.g. [(0, 4), (4, 8)] for 8 rows): every row "
            "goes into exactly one key"
        )
    return [(int(lo), int(hi)) for lo, hi in parts]


def checked_max_in_flight(policy: Any, num_stages: int) -> int:
    """``policy.max_in_flight(num_stages)``, checked: an int of at least 1 (with none, the first
    step would wait forever for room that never comes)."""
    n = policy.max_in_flight(num_stages)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(
            f"{type(policy).__name__}.max_in_flight({num_stages}) returned {n!r}: it must be "
            "an int >= 1, the keys that may be admitted and not yet finished"
        )
    return int(n)


class RunGuards:
    """The guards of a run, a base of :class:`~._run.Run` (whose set-up gives the attributes
    below)."""

    #: seconds without progress, while keys are in flight, before a StallError
    stall_timeout: float
    #: keys admitted whose backward wave has not finished
    in_flight: int
    #: when an actor last made progress (``time.perf_counter``)
    last_event: float
    #: every node's actor (stand-ins for those other processes host)
    actors: dict[str, Any]
    #: the actors of this process
    local: dict[str, Any]
    #: the ``open_run`` block was left: the actors have stopped
    _ended: bool
    #: the block's body has ended (its final drain runs, then the actors stop)
    _closing: bool
    #: why this run cannot go on, or None
    _broken: str | None
    #: a step or drain holds the turn
    _stepping: bool
    #: the turns of the steps and drains waiting, in the order they were called
    _step_turns: collections.deque[anyio.Event]
    #: the thread that watches the loop itself (:meth:`_watch_loop`)
    _monitor: BlockedLoopMonitor | None
    #: the thread of the loop the run was opened on
    _loop_thread: int
    #: the network
    graph: Graph
    #: every tensor is checked for NaN/Inf
    checks_finite: bool
    #: the run's float dtype, which float inputs are cast to
    dtype: np.dtype[Any]
    #: the last batch checked (its names, shapes and dtypes) and its rows
    _last_batch: tuple[Any, int]
    #: the ids and labels of each batch to check against their range
    _range_checks: list[RangeCheck]

    def _checked_rows(self, batch: Mapping[str, Any], check_data: bool | None) -> int:
        """The rows of ``batch``, once checked (see :meth:`Run.step`). A batch like the last one
        (names, shapes, dtypes) passes the same checks of its inputs, which are then skipped,
        unless each batch's values are checked for NaN; ids and labels are checked each time
        unless ``check_data`` is False (GPU ones only where it is True): one vectorised min and
        max of each such input."""
        try:
            items = batch.items()
        except AttributeError:
            check_batch(self.graph, batch)  # not a mapping: says so, naming the inputs
            raise
        signature = tuple(
            [(k, getattr(v, "shape", None), getattr(v, "dtype", None)) for k, v in items]
        )
        if signature == self._last_batch[0] and not self.checks_finite:
            rows = self._last_batch[1]
        else:
            rows = check_batch(self.graph, batch, self.checks_finite, self.dtype)
            self._last_batch = (signature, rows)
        if check_data is not False and self._range_checks:
            check_ranges(self._range_checks, batch, device=check_data is True)
        return rows

    def _check_usable(self, what: str) -> None:
        """Raises where the run cannot take ``what`` (a call from another thread than its loop's,
        a step after the block, or any wait once a step was cut off part-way, which would wait
        forever)."""
        if threading.get_ident() != self._loop_thread:
            self._wrong_thread(what)
        if (self._ended or self._closing) and what == "step":
            when = "after" if self._ended else "while"
            raise RuntimeError(
                f"run.step() {when} the open_run block was left: "
                + ("its actors have stopped" if self._ended else "its final drain had begun, "
                   "and its actors stop after it, so this step's keys would never run")
                + ". Step inside the block (a task that steps must end before the block does: "
                "start it in a task group inside the block), or open a new run "
                "(open_run(..., state=run.state()) goes on from this one's weights)"
            )  # fmt: skip
        if self._broken is not None:
            raise RuntimeError(f"run.{what}() cannot wait: {self._broken}")

    def _wrong_thread(self, what: str) -> None:
        raise RuntimeError(
            f"run.{what}() was called from another thread (or event loop) than the one the run "
            "was opened on; its actors and channels belong to that loop. From a worker thread, "
            f"call it through the run's loop: trio.from_thread.run(run.{what}, ...) or "
            f"anyio.from_thread.run(run.{what}, ...), in a thread started with "
            "trio.to_thread.run_sync or anyio.to_thread.run_sync"
        )

    def _cut_off(self, what: str) -> None:
        """Marks the run as one that cannot go on (the first cause is the one kept)."""
        if self._broken is None:
            # run.state() is what it always is, the gradients summed and not applied included:
            # here those are (some of) the keys of the minibatch cut off, which the new run's
            # first update would apply on top of its own minibatch's
            self._broken = (
                f"{what}, so the run cannot finish it; leave the open_run block and open a new "
                "run from its weights: open_run(..., state=dataclasses.replace(run.state(), "
                "pending_grads={}, pending_delays={})) (run.state() alone also carries the "
                "gradients of the cut-off minibatch's finished keys, which the new run's first "
                "update would apply)"
            )

    async def _take_turn(self) -> None:
        """Takes the turn among steps and drains (each in the order called): at once when none
        holds it, else once those called before have gone in; release it with
        :meth:`_pass_turn`. A cancellation point (a step cancelled already goes nowhere), not a
        yield."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self._stepping:
            await self._wait_turn()
        else:
            self._stepping = True

    async def _wait_turn(self) -> None:
        """Waits until the steps called before this one have gone in."""
        turn = anyio.Event()
        self._step_turns.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # the turn came as this step was cancelled: hand it on
                self._pass_turn()
            else:
                self._step_turns.remove(turn)
            raise

    def _pass_turn(self) -> None:
        if self._step_turns:
            self._step_turns.popleft().set()  # still stepping: the next step's turn
        else:
            self._stepping = False

    def _watch_loop(self) -> BlockedLoopMonitor:
        """Starts the thread that watches this loop itself (an inline compute that never
        returns stops the loop, and the watchdog with it); called on the loop's thread before
        any actor runs, since the first actor may block the loop before the watchdog starts."""
        interval = min(max(self.stall_timeout / 10, 0.01), 1.0)
        self._monitor = BlockedLoopMonitor(
            threading.get_ident(), self.stall_timeout, interval, self._blocking_actor
        )
        return self._monitor

    async def _watchdog(self) -> None:
        interval = min(max(self.stall_timeout / 10, 0.01), 1.0)
        monitor = self._monitor or self._watch_loop()
        # when the silence is counted from at the earliest: the end of a time the loop itself
        # stood still (its process suspended, or the caller's own blocking code), when no actor
        # could make progress, so none is blamed for it
        resumed = time.perf_counter()
        try:
            while True:
                before = time.perf_counter()
                await anyio.sleep(interval)
                now = time.perf_counter()
                monitor.tick()
                if now - before - interval > self.stall_timeout / 2:
                    resumed = now
                if self.in_flight > 0 and now - max(self.last_event, resumed) > self.stall_timeout:
                    lines = [f"  {name}: {a.describe()}" for name, a in self.actors.items()]
                    raise StallError(
                        f"no progress for {self.stall_timeout:g} s with {self.in_flight} keys in "
                        "flight; what each actor was doing:\n" + "\n".join(lines)
                    )
        finally:
            monitor.stop()

    def _blocking_actor(self, frame: FrameType) -> tuple[FrameType, str] | None:
        """The op of a CPU actor of this process that the loop's thread is inside (``frame``
        is its innermost frame; read by the monitor thread, while the loop's thread waits for
        the GIL or is in a C call): the op's frame, the innermost where one op runs another's
        in its task, and what it is, or None where the thread is in none (an op that awaits a
        pool thread is off the stack: the loop's own wait, or another task, runs there)."""
        codes = {
            code
            for actor in self.local.values()
            for name in _OP_METHODS
            if (code := getattr(getattr(type(actor), name, None), "__code__", None)) is not None
        }
        f: FrameType | None = frame
        while f is not None and f.f_code not in codes:
            f = f.f_back
        if f is None:
            return None
        # (the op's own frame, started: reading its locals from this thread copies them into
        # its locals dict, and writes nothing the frame reads)
        actor = f.f_locals.get("self")
        if actor is None or not any(a is actor for a in self.local.values()):
            return None
        computing = actor.computing
        if computing is None or not actor.on_cpu:  # (a GPU actor's host work is a few launches)
            return None
        kind, key, since = computing
        return f, (
            f"actor {actor.name!r} has been computing its {kind} of key {key} for "
            f"{time.perf_counter() - since:.1f} s"
        )
