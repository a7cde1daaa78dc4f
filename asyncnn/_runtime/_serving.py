"""How a layer actor serves its inbox: it files each message until a key's forward or
backward is complete (every input slot; a gradient from every consumer that sends one back),
takes the operations in the order its policy planned (the stage's ``StageOrder``), and runs
each in its own task (:meth:`Serving.serve`) or, when it is idle and the work is small or queued
on a GPU, in the sender's (:meth:`Serving.run_directly`), with the trace's events, the busy time
and the order's bookkeeping.

Under a policy that splits backwards (``ZeroBubbleH1``) a backward is two operations of the
order, its input half and later its weight half; under an interleaved policy the stages of one
device take turns (``_turns.DeviceTurns``): an actor runs an operation only on its turn.

:class:`Serving` is the base of :class:`~asyncnn._runtime._actors.LayerActor`, which sets the
attributes declared here and defines what each operation computes (``_forward``, ``_backward``,
``_backward_weight``). Apart from it because when an operation runs, and in which task, is
another question than what it computes, and a custom actor changes only the second.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from asyncnn._errors import ActorError, StallError

from ._interleaved import BACKWARD_INPUT, BACKWARD_WEIGHT
from ._messages import BACKWARD, END, FORWARD, STOP, Message
from ._weight_versions import WeightVersions

if TYPE_CHECKING:
    from ._policies import StageOrder
    from ._turns import DeviceTurns

__all__ = ["Serving"]


class Serving(WeightVersions):
    """How a layer actor takes and runs its operations (see the module's docstring)."""

    #: the stage's planned order of operations, and the turns of the device it shares with
    #: other stages (an interleaved order; None otherwise)
    order: StageOrder
    turns: DeviceTurns | None
    stage: int
    #: a backward in two operations: the input half, and later the weight half
    splits_backward: bool
    #: key -> meta of the keys whose input half is done (their weight half is still to run)
    weight_due: dict[int, dict[str, Any]]
    #: (consumer, its input slot) of each edge out, and how many of them send a gradient back
    consumers: list[tuple[str, int]]
    grad_edges: int
    #: key -> the output's gradients come back so far (a slot per consumer edge), and their count
    bwd_grads: dict[int, list[Any]]
    bwd_count: dict[int, int]

    if TYPE_CHECKING:  # what each operation computes, and its cost: LayerActor defines them

        async def _forward(self, key: int) -> None: ...

        async def _backward(self, key: int, split: bool = False) -> None: ...

        async def _backward_weight(self, key: int) -> None: ...

        def _cost(self, rows: int) -> float: ...

    def _file_other(self, msg: Message) -> None:
        if msg.kind == BACKWARD:
            grads = self.bwd_grads.get(msg.key)
            if grads is None:
                grads = self.bwd_grads[msg.key] = [None] * len(self.consumers)
                self.bwd_count[msg.key] = 0
            grads[msg.slot] = msg.tensors[0]
            if msg.event is not None:
                self.events.setdefault(msg.key, []).append(msg.event)
            self.bwd_count[msg.key] += 1
            if self.bwd_count[msg.key] == self.grad_edges:
                self.ready.append((BACKWARD, msg.key))
        elif msg.kind == END:
            self.order.end_of_stream(int(msg.meta["total"]))
        elif msg.kind == STOP:
            self.stopping = True
        else:
            super()._file_other(msg)

    def _is_ready(self, op: tuple[str, int]) -> bool:
        kind, key = op
        if kind == FORWARD:
            return self.fwd_count.get(key, -1) == self.n_inputs
        if kind == BACKWARD_WEIGHT:
            return key in self.weight_due
        return self.bwd_count.get(key, -1) == self.grad_edges

    def _take_ready(self, op: tuple[str, int]) -> None:
        """Takes a planned operation's complete message out of :attr:`ready` (a split
        backward's input half reads the backward message; its weight half reads none)."""
        kind, key = op
        if kind == BACKWARD_WEIGHT:
            return
        self.ready.remove((BACKWARD, key) if kind == BACKWARD_INPUT else op)

    def _backward_half(self, key: int) -> tuple[str, int]:
        """The half of a split backward that a ``"backward"`` of ``key`` names (as a trace
        records both): the weight half once the input half is done."""
        return (BACKWARD_WEIGHT if key in self.weight_due else BACKWARD_INPUT, key)

    def _minibatch_keys(self, op: tuple[str, int]) -> int:
        """The key count of the minibatch of ``op``'s key, read before ``op`` runs (a backward
        takes its key's meta, the weight half its entry in :attr:`weight_due`)."""
        kind, key = op
        meta = self.weight_due[key] if kind == BACKWARD_WEIGHT else self.meta.get(key, {})
        return int(meta.get("mb_keys", 1))

    async def serve(self) -> None:
        """Processes messages in the policy's order until told to stop."""
        since_yield = 0
        while True:
            if self.handed_over:  # an op runs in a sender's task: decide after it
                await self._after_hand_over()
            op = planned = self.order.next()
            if self.splits_backward and op is not None and op[0] == BACKWARD:
                op = self._backward_half(op[1])  # a replayed split run's recorded order
            if op is None:
                if self.ready:
                    op = self.ready.popleft()
            elif self._is_ready(op):
                self._take_ready(op)
            else:
                self.waiting_for = op  # formatted only if a stall report asks
                op = None
            if op is None:
                if self.stopping:
                    return
                if planned is None:
                    self.waiting_for = "any message"
                await self._take_message()
                continue
            turns = self.turns
            mb_keys = self._minibatch_keys(op)
            if turns is not None and not turns.is_turn(self.stage, mb_keys):
                self.waiting_for = (
                    f"its turn on device {turns.device} for {op[0]} of key {op[1]} (stage "
                    f"{turns.next_stage()}'s is next)"
                )
                await turns.wait(self.stage, mb_keys)
            await self._run_op(op, mb_keys)
            since_yield += 1
            if since_yield == 16:
                # Inline work on queued messages never yields by itself: let the other actors
                # (and the stall watchdog) run now and then.
                since_yield = 0
                await anyio.lowlevel.checkpoint()

    def _completes(self, msg: Message) -> bool:
        """Whether filing ``msg`` completes its key's forward or backward here."""
        if msg.kind == FORWARD:
            return self.fwd_count.get(msg.key, 0) + 1 == self.n_inputs
        if msg.kind == BACKWARD:
            return self.bwd_count.get(msg.key, 0) + 1 == self.grad_edges
        return False

    async def run_directly(self, msg: Message) -> bool:
        """Runs the op ``msg`` completes here, in the sender's task, when this actor is idle,
        the op is the next its order plans, and all its work (forward, or backward and update)
        runs inline on the CPU or is queued on the GPU. Its sends may still wait (to another
        process, or a full inbox): this actor's own task, woken meanwhile by a message, then
        waits for the op to end before it decides anything (:meth:`_end_hand_over`). Plain
        layers only (:attr:`direct`)."""
        if self.computing is not None or self.ready or self.stopping or not self._completes(msg):
            return False
        if self.on_cpu:  # (a GPU actor's host work is a few launches, whatever the size)
            rows = msg.meta.get("rows", 1)
            if 4.0 * max(self.param_size, self._cost(rows)) >= self.inline_limit:
                return False
            if self._from_device(msg):
                return False
        planned = self.order.next()
        if planned is not None and planned != (msg.kind, msg.key):
            return False
        self._file(msg)
        self.handed_over = True
        try:
            await self._run_op(self.ready.pop())
        finally:
            self._end_hand_over()
            # (this actor's own task may stay parked: a stall report then says what is next)
            planned = self.order.next()
            self.waiting_for = "any message" if planned is None else planned
        return True

    async def _run_op(self, op: tuple[str, int], mb_keys: int | None = None) -> None:
        """Runs one planned op (a key's forward, backward or backward half), with its
        bookkeeping: the trace's events, the busy time, the order and the device's turn.

        ``mb_keys``: the key count of the op's minibatch (:meth:`_minibatch_keys`, where the
        caller read it already), which the order is told with the op."""
        if mb_keys is None:
            # read now: a backward takes its key's meta (the weight half its entry in
            # weight_due), after which every backward would be told 1
            mb_keys = self._minibatch_keys(op)
        turns = self.turns
        start = time.perf_counter()
        kind, key = op
        self.computing = (kind, key, start)
        rec = self.ctx.recorder
        if rec is not None:
            rec_kind, rec_meta = _recorded_kind(kind)
            # the version the compute sees: a forward's may be pinned earlier than the latest
            # (PipeDream2BW); one more O(1) question per forward where a policy keeps earlier
            # versions, in traced runs only
            seen = self.version
            if kind == FORWARD and self.versions_back:
                seen = self._forward_version(self.meta[key])
            rec.event(self.name, "start", rec_kind, key, seen, "", self.seq, meta=rec_meta)
        try:
            if kind == FORWARD:
                await self._forward(key)
            elif kind == BACKWARD_WEIGHT:
                await self._backward_weight(key)
            else:
                await self._backward(key, split=kind == BACKWARD_INPUT)
        except (ActorError, StallError):
            raise  # already names the actor, or a stall the monitor interrupted
        except Exception as exc:
            raise self._fail(exc, kind, key) from exc
        self.computing = None
        if rec is not None:
            rec.event(self.name, "end", rec_kind, key, self.version, "", self.seq, meta=rec_meta)
            self._record_device(rec, rec_kind, key, self.seq)
        self.seq += 1
        end = time.perf_counter()
        self.stats.busy_seconds += end - start
        self.order.done(op, mb_keys)
        if turns is not None:
            turns.passed(self.stage)
        self.ctx.touch()


def _recorded_kind(kind: str) -> tuple[str, dict[str, Any] | None]:
    """How a trace records an operation: a split backward's halves as ``"backward"`` with
    ``meta["half"]`` ``"input"`` or ``"weight"`` (the trace format's kinds stay forward and
    backward; a replay tells the halves apart by their order)."""
    if kind == BACKWARD_INPUT:
        return BACKWARD, {"half": "input"}
    if kind == BACKWARD_WEIGHT:
        return BACKWARD, {"half": "weight"}
    return kind, None
