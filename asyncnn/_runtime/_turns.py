"""Turns: the stages that share a device compute one at a time, in the device's order.

An interleaved schedule puts several stage actors on one device and gives the device one order
across them (each actor's :class:`StageOrder` is its own part of it). Each actor still waits for
the messages its next operation needs; :class:`DeviceTurns` adds the other half: before it
computes, an actor waits until the device's order has reached its operation, and after it, it
passes the turn on. So the device runs exactly its schedule, one operation at a time, and its
idle slots are those the schedule has.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

__all__ = ["DeviceTurns"]


class DeviceTurns:
    """Whose turn it is on one device: which of the stages it hosts computes next.

    The device's order is a sequence of stage numbers per minibatch (the stage of each of its
    operations, in order), made by ``sequence(minibatch_keys)`` when a minibatch starts; a stage
    whose number is at the cursor computes, the others wait. Made once per run by a policy's
    :meth:`Policy.orders` and shared by the orders of the stages on the device.

    Args:
        device: the device's number (for messages).
        sequence: ``sequence(m)``: the stage of each operation of the device, in its order, for a
            minibatch of ``m`` keys.
    """

    def __init__(self, device: int, sequence: Callable[[int], list[int]]) -> None:
        self.device = device
        self._sequence = sequence
        self._stages: list[int] | None = None  # this minibatch's, once it has started
        self._cursor = 0
        self._waiting: dict[int, anyio.Event] = {}

    def is_turn(self, stage: int, minibatch_keys: int) -> bool:
        """Whether ``stage`` computes next. ``minibatch_keys`` is the size of the minibatch of the
        operation it is about to compute (read when a minibatch starts)."""
        if self._stages is None:
            self._stages = self._sequence(minibatch_keys)
            self._cursor = 0
        return self._stages[self._cursor] == stage

    def next_stage(self) -> int | None:
        """The stage whose turn it is (``None`` between minibatches)."""
        return None if self._stages is None else self._stages[self._cursor]

    async def wait(self, stage: int, minibatch_keys: int) -> None:
        """Waits until it is ``stage``'s turn (:meth:`is_turn`)."""
        while not self.is_turn(stage, minibatch_keys):
            event = self._waiting.get(stage)
            if event is None:
                event = self._waiting[stage] = anyio.Event()
            await event.wait()

    def passed(self, stage: int) -> None:
        """Records that ``stage`` has done the operation of its turn, and wakes the stage whose
        turn is next (every waiting stage when the minibatch is over).

        Raises:
            RuntimeError: it was not ``stage``'s turn.
        """
        stages = self._stages
        if stages is None or stages[self._cursor] != stage:
            raise RuntimeError(
                f"device {self.device}: stage {stage} computed out of turn (stage "
                f"{self.next_stage()} was next)"
            )
        self._cursor += 1
        if self._cursor == len(stages):
            self._stages = None
            woken = list(self._waiting)  # the next minibatch: each re-reads its size
        else:
            woken = [stages[self._cursor]]
        for s in woken:
            event = self._waiting.pop(s, None)
            if event is not None:
                event.set()
