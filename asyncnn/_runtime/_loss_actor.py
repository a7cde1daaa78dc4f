"""The actor of a loss node: computes the loss as soon as its inputs arrive and starts the
backward wave."""

from __future__ import annotations

import collections
import functools
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn._errors import ActorError, StallError
from asyncnn._math._autodiff import primitive_vjp, vjp

from ._actor_base import _Actor
from ._capture_loss import LossGraphs
from ._checks import checked_scale
from ._loss_weights import weights_of
from ._messages import END, FORWARD, STOP, Message
from ._recorder import when_done

if TYPE_CHECKING:
    from ._context import ActorContext
    from ._node import Node
    from ._stage_orders import StageOrder

__all__ = ["MAX_UNREAD", "LossActor", "sums_over_rows"]

#: loss values a GPU loss actor may have queued for the host but not read yet: how many keys the
#: host may run ahead of the device before a loss actor waits for it
MAX_UNREAD = 2


def sums_over_rows(module: Any) -> bool:
    """Whether a loss module's value is a sum over its rows rather than a mean: whether it
    declares ``reduction = "sum"`` (a field, as the built-ins', or a class attribute; a custom
    loss that sums must, see docs/concepts.md, "Writing a loss"). Every other loss, custom ones
    included, is taken for a mean. A mean's keys are weighted by their share of the
    minibatch's rows, in the gradient under a flush and in the minibatch's reported loss; a
    sum's keys add up as they are. A run checks, as it starts, that each loss is what this
    says (``_loss_reductions.check_loss_reductions``): an undeclared sum would train at ``1/M``
    of ``Sync``'s speed under ``GPipe(M)``."""
    return getattr(module, "reduction", "mean") == "sum"


class LossActor(_Actor):
    """The actor of a loss node: computes the loss as soon as its inputs arrive, reports it, and
    sends the gradient of each input that comes from a layer back upstream."""

    def __init__(self, ctx: ActorContext, node: Node) -> None:
        super().__init__(ctx, node)
        self.module = node.module
        self.graphs: LossGraphs | None = None
        if not self.on_cpu and ctx.cuda_graphs:
            self.graphs = LossGraphs(self)
        # (key, the value's host copy in flight, the event after that copy, meta), oldest first
        self.unread: collections.deque[tuple[int, Any, Any, dict[str, Any]]] = collections.deque()
        self.spare: list[Any] = []  # host buffers read already, for the next copies
        # the input slots whose gradient goes upstream (the others, labels, are constants)
        self.diff_slots = [slot for slot, _, _ in self.grad_targets]
        #: the built-in losses say when they are one primitive call (see _value_and_grads)
        self.primitive_call = getattr(self.module, "primitive_call", None)
        self.sums_rows = sums_over_rows(self.module)
        # On the CPU without a trace, a message that finds this actor idle is taken in the
        # sender's task: a label is filed, and the input that completes a key has its loss
        # computed and its gradients sent right there (the same work in the same order, with
        # two task wake-ups fewer per key). A trace keeps every actor's events in its own task.
        self.direct = self.on_cpu and self.graphs is None and ctx.recorder is None
        #: the order of its keys, where one is given (:meth:`follow`); else each key as soon
        #: as its inputs are in (a policy orders the layers only)
        self.order: StageOrder | None = None

    def follow(self, order: StageOrder) -> None:
        """Processes the keys in ``order`` (a replay's :class:`RecordedOrder`: the recorded
        keys, with its ``on_op`` told of each once it is done) instead of as they complete.
        Given before the first message."""
        self.order = order
        self.direct = False  # (a key taken in a sender's task would skip the order)

    def _idle(self) -> bool:
        return not self.ready and self.computing is None and not self.stopping and not self.unread

    async def run_directly(self, msg: Message) -> bool:
        if msg.kind != FORWARD or not self._idle():
            return False
        if self._from_device(msg):
            return False
        self._file(msg)
        if self.ready:
            _, key = self.ready.popleft()
            self.handed_over = True
            try:
                await self._process(key)
            finally:
                self._end_hand_over()
        return True

    def _file_other(self, msg: Message) -> None:
        if msg.kind == STOP:
            self.stopping = True
        elif msg.kind != END:
            super()._file_other(msg)

    async def serve(self) -> None:
        while True:
            if self.handed_over:  # a key's loss runs in a sender's task: take none beside it
                await self._after_hand_over()
            elif self.ready and (key := self._next_ready()) is not None:
                await self._process(key)
            elif self.unread:  # nothing else to do: read the oldest loss (the device is behind)
                self.waiting_for = f"the device, to read the loss of key {self.unread[0][0]}"
                await self._read_oldest()
            elif self.stopping:
                return
            else:
                planned = None if self.order is None else self.order.next()
                # (a planned op: formatted only if a stall report asks)
                self.waiting_for = "the inputs of a key" if planned is None else planned
                await self._take_message()

    def _next_ready(self) -> int | None:
        """The complete key to process now, taken out of :attr:`ready`: the one the order plans
        next (None while it is not complete), or the oldest where no order is followed."""
        planned = None if self.order is None else self.order.next()
        if planned is None:
            return int(self.ready.popleft()[1])
        try:
            self.ready.remove(planned)
        except ValueError:
            return None
        return int(planned[1])

    async def _process(self, key: int) -> None:
        """The loss of a key whose inputs have all arrived, and its gradients sent back."""
        order = self.order
        mb_keys = int(self.meta[key].get("mb_keys", 1)) if order is not None else 1
        start = time.perf_counter()
        self.computing = (FORWARD, key, start)
        rec = self.ctx.recorder
        if rec is not None:
            rec.event(self.name, "start", FORWARD, key, 0, "", self.seq)
        try:
            await self._loss(key)
        except (ActorError, StallError):
            raise  # already names the actor, or a stall the monitor interrupted
        except Exception as exc:
            raise self._fail(exc, FORWARD, key) from exc
        self.computing = None
        self.stats.busy_seconds += time.perf_counter() - start
        self.ctx.touch()
        if order is not None:
            # outside the compute's error handling: a replay's hook may raise here to stop the
            # run, which is not the loss failing
            order.done((FORWARD, key), mb_keys)

    async def _loss(self, key: int) -> None:
        inputs = self.fwd_slots.pop(key)
        del self.fwd_count[key]
        meta = self.meta.pop(key)
        if "weights" in meta:  # (the labels' weights, where they differ from the rows)
            rows, mb_rows = weights_of(self.name, meta)
        else:
            rows, mb_rows = meta["rows"], meta["mb_rows"]
        if self.sums_rows:
            scale = 1.0
        else:
            policy = self.ctx.policy
            scale = checked_scale(
                policy, "loss_cotangent", (rows, mb_rows), policy.loss_cotangent(rows, mb_rows)
            )
        self.after = self.events.pop(key, [])
        fn: Any = self._value_and_grads
        if self.graphs is not None:
            fn = functools.partial(self.graphs.value_and_grads, slot=self.graphs.slot(meta))
        # On a GPU the host reads the value later (a copy to host memory is queued behind the
        # loss): the gradients leave first, so the device never idles while the host waits. A
        # check for NaN reads it now; a trace's event carries the copy, which its writer reads
        # once it has landed.
        now = self.on_cpu or self.ctx.checks_finite
        loss = 0.0
        if now:
            value, grads = await self.compute(fn, inputs, scale, cost=0)
            await self.wait_for_device()
            if rows or self.sums_rows:  # (a key whose every label is ignored: NaN, weighing 0)
                self.ctx.check_finite(self.name, FORWARD, key, value)
            # reported before the gradients leave: a cluster worker's report then rides with them
            loss = float(value)
            self.ctx.loss_reported(key, self._part(loss, meta), meta)
        else:
            value, grads = await self.compute(self._staged, fn, inputs, scale, cost=0)
        await self._send_grads(key, 0, grads, meta)
        self.stats.forwards += 1
        rec = self.ctx.recorder
        if rec is not None:  # the end comes after the sends, as for layers
            if now:
                recorded: Any = loss
            else:  # the writer sleeps until the copy has landed (an event of its own)
                landed = self.backend.record_event(self.stream, blocking=True)
                recorded = when_done(landed, functools.partial(float, value))
            rec.event(self.name, "end", FORWARD, key, 0, "", self.seq, meta={"loss": recorded})
            self._record_device(rec, FORWARD, key, self.seq)
        if not now:
            self.unread.append((key, value, self.last_event, meta))
            # read what has landed; past MAX_UNREAD keys ahead of the device the host waits
            while self.unread and (
                len(self.unread) > MAX_UNREAD or self.backend.event_done(self.unread[0][2])
            ):
                await self._read_oldest()
        self.seq += 1

    def _staged(self, fn: Any, inputs: list[Any], scale: float) -> Any:
        """``fn(inputs, scale)`` with the value's copy to the host queued behind it (a captured
        loss rewrites its value on the next replay: the copy is taken now)."""
        value, grads = fn(inputs, scale)
        spare = self.spare.pop() if self.spare else None
        return self.backend.to_host_async(value, spare), grads

    async def _read_oldest(self) -> None:
        key, value, event, meta = self.unread[0]
        await self.ctx.pool.wait(event, device=self.device)
        self.unread.popleft()
        loss = float(value)
        if self.ctx.recorder is None:  # (a trace's writer may not have read it yet)
            self.spare.append(value)
        self.ctx.loss_reported(key, self._part(loss, meta), meta)

    def _part(self, loss: float, meta: dict[str, Any]) -> float:
        """A key's part of its minibatch's loss: a mean's keys are weighted by their share of
        the minibatch's rows (or of its labels' weight, see ``_loss_weights``); a sum's add
        up. A key that weighs nothing (every label ignored: its mean NaN) adds nothing."""
        if self.sums_rows:
            return loss
        if "weights" not in meta:
            return loss * (meta["rows"] / meta["mb_rows"])
        weight, total = weights_of(self.name, meta)
        return loss * (weight / total) if weight else 0.0

    def _value_and_grads(self, inputs: list[Any], scale: float) -> tuple[Any, Any]:
        inputs = self._to_device(inputs)
        slots = self.diff_slots
        call = self.primitive_call(*inputs) if self.primitive_call is not None else None
        if call is not None:  # one primitive: its rules directly, as a trace of it would
            prim, args, params = call
            value, direct = primitive_vjp(prim, args, params, slots)
            return value, self._placed(direct(self._seed(value, scale)), len(inputs))
        # only the inputs whose gradient goes upstream are differentiated: the others (labels)
        # are constants of the loss, as in the plain loop
        if len(slots) == len(inputs):
            value, pullback = vjp(lambda *xs: self.module({}, *xs), *inputs)
            return value, pullback(self._seed(value, scale))

        def loss(*xs: Any) -> Any:
            args = list(inputs)
            for slot, x in zip(slots, xs, strict=True):
                args[slot] = x
            return self.module({}, *args)

        value, pullback = vjp(loss, *(inputs[slot] for slot in slots))
        return value, self._placed(pullback(self._seed(value, scale)), len(inputs))

    def _placed(self, grads: Any, n: int) -> list[Any]:
        """The gradients of :attr:`diff_slots`, in order, as one entry per input (None for
        the others)."""
        out: list[Any] = [None] * n
        for slot, g in zip(self.diff_slots, grads, strict=True):
            out[slot] = g
        return out

    def _seed(self, value: Any, scale: float) -> Any:
        """The loss's cotangent, ``scale``, as an array of the loss's dtype on its device."""
        if self.on_cpu:
            return np.array(scale, dtype=value.dtype)
        # a fill, not a copy from the host: capturable in a CUDA graph
        return self.backend.xp.full((), scale, dtype=value.dtype)
