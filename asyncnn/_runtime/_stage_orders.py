"""The order of work at each stage: :class:`StageOrder`, a small state machine naming the exact
message a layer actor processes next, and the built-in orders (:class:`AnyOrder`,
:class:`RecordedOrder`, :class:`OneFOneBOrder`).

Apart from ``_policies.py`` so that it reads as the policies' decisions: a policy hands each
actor one of these through :meth:`Policy.order_for`, and the actor follows it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ._messages import BACKWARD, FORWARD

if TYPE_CHECKING:
    from ._turns import DeviceTurns

__all__ = ["AnyOrder", "OneFOneBOrder", "RecordedOrder", "StageOrder"]

Op = tuple[str, int]  # (kind, key)


class StageOrder(abc.ABC):
    """The order in which one stage processes its messages."""

    @abc.abstractmethod
    def next(self) -> Op | None:
        """The message to process next, or ``None`` to take whichever is ready first."""

    @abc.abstractmethod
    def done(self, op: Op, minibatch_keys: int) -> None:
        """Records that ``op`` was processed; ``minibatch_keys`` is the size of its minibatch."""

    def start(self, first_key: int) -> None:  # noqa: B027 - optional
        """Told before any message: keys of this run are numbered from ``first_key`` on."""

    def end_of_stream(self, total_keys: int) -> None:  # noqa: B027 - optional
        """Told once ``total_keys`` keys (from the start or the last end) are all that will come,
        so that a continuous order can cool down."""

    def device_turns(self) -> DeviceTurns | None:
        """The turns of the device this stage shares with other stages (an interleaved order:
        the actor waits for its turn before each operation and passes it on after), or ``None``
        (the default): the stage computes as soon as its next operation is ready."""
        return None


class AnyOrder(StageOrder):
    """Free-running: whatever message is complete first."""

    def next(self) -> Op | None:
        return None

    def done(self, op: Op, minibatch_keys: int) -> None:
        pass


#: ``on_op(actor, seq, kind, key)``, called after each recorded operation an actor processed
OpCallback = Callable[[str, int, str, int], None]


class RecordedOrder(StageOrder):
    """Exactly a given sequence of operations (replay); afterwards, nothing more.

    ``on_op``, where given, is called as ``on_op(actor, seq, kind, key)`` after each operation
    (a replay's hook: it may raise to stop the run there)."""

    def __init__(self, ops: list[Op], actor: str = "", on_op: OpCallback | None = None) -> None:
        self.ops = ops
        self.i = 0
        self.actor = actor
        self.on_op = on_op

    def next(self) -> Op:
        if self.i < len(self.ops):
            return self.ops[self.i]
        return (FORWARD, -1)  # a key that never comes: the actor idles until it is stopped

    def done(self, op: Op, minibatch_keys: int) -> None:
        seq = self.i
        self.i += 1
        if self.on_op is not None:
            self.on_op(self.actor, seq, op[0], op[1])


class OneFOneBOrder(StageOrder):
    """``w`` warm-up forwards, then one forward one backward, then the remaining backwards.

    With ``flush=True`` the pattern restarts at each minibatch (PipeDream-Flush); with
    ``flush=False`` it runs over the whole stream of keys (PipeDream). ``warmup=None`` gives all
    forwards first (GPipe). Keys are numbered consecutively in admission order.
    """

    def __init__(self, warmup: int | None, flush: bool) -> None:
        # (a negative warm-up would plan a backward before its forward: the run would stall)
        if warmup is not None and (
            isinstance(warmup, bool | np.bool_)
            or not isinstance(warmup, int | np.integer)
            or warmup < 0
        ):
            raise ValueError(
                f"OneFOneBOrder(warmup={warmup!r}): warmup must be None (all forwards first) "
                "or an int >= 0, the forwards before the first backward"
            )
        self.warmup = None if warmup is None else int(warmup)
        self.flush = _check_bool("OneFOneBOrder", "flush", flush)
        self.base = 0  # first key of the current minibatch (flush) or of the stream
        self.f = 0  # forwards done since base
        self.b = 0  # backwards done since base
        self.total: int | None = None  # keys in the current minibatch / stream, once known

    def next(self) -> Op:
        w = self.warmup
        limit = self.total
        if limit is not None and w is not None:
            w = min(w, limit)
        more_forwards = limit is None or self.f < limit
        if more_forwards and (w is None or self.f - self.b <= w):
            return (FORWARD, self.base + self.f)
        return (BACKWARD, self.base + self.b)

    def done(self, op: Op, minibatch_keys: int) -> None:
        if op[0] == FORWARD:
            self.f += 1
            if self.flush:
                self.total = minibatch_keys
        else:
            self.b += 1
            if self.total is not None and self.b == self.total:
                self.base += self.total
                self.f = self.b = 0
                self.total = None

    def start(self, first_key: int) -> None:
        self.base = first_key

    def end_of_stream(self, total_keys: int) -> None:
        if not self.flush:
            self.total = total_keys
            if self.b >= total_keys:  # everything was done before the news came: next stream
                self.base += total_keys
                self.f = self.b = 0
                self.total = None


def _check_bool(policy: str, field: str, value: Any) -> bool:
    # a string such as "no" is truthy: it would silently mean the opposite
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{policy}({field}={value!r}): {field} must be True or False")
    return bool(value)
