"""The actor of a loss node: computes the loss as soon as its inputs arrive and starts the
backward wave."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from asyncnn._errors import ActorError
from asyncnn._math._autodiff import vjp

from ._actors import _Actor
from ._capture import LossGraphs, capture_allowed
from ._graph import Node
from ._messages import BACKWARD, END, FORWARD, STOP, Message

if TYPE_CHECKING:
    from ._run import Run

__all__ = ["LossActor"]


class LossActor(_Actor):
    """The actor of a loss node: computes the loss as soon as its inputs arrive, reports it, and
    sends the gradient of each input that comes from a layer back upstream."""

    def __init__(self, run: Run, node: Node) -> None:
        super().__init__(run, node)
        self.module = node.module
        self.input_is_layer = [run.graph.nodes[src].kind == "layer" for src in node.inputs]
        self.graphs: LossGraphs | None = None
        if not self.on_cpu and capture_allowed(run):
            self.graphs = LossGraphs(self)

    def _file_other(self, msg: Message) -> None:
        if msg.kind == STOP:
            self.stopping = True
        elif msg.kind != END:
            super()._file_other(msg)

    async def serve(self) -> None:
        while True:
            while not self.ready:
                if self.stopping:
                    return
                self.waiting_for = "the inputs of a key"
                await self._take_message()
            _, key = self.ready.popleft()
            start = time.perf_counter()
            self.computing = (FORWARD, key, start)
            rec = self.run.recorder
            if rec is not None:
                rec.event(self.name, "start", FORWARD, key, 0, "", self.seq)
            try:
                await self._loss(key)
            except ActorError:
                raise
            except Exception as exc:
                raise self._fail(exc, FORWARD, key) from exc
            self.computing = None
            self.stats.busy_seconds += time.perf_counter() - start
            self.run.touch()

    async def _loss(self, key: int) -> None:
        inputs = self.fwd_slots.pop(key)
        del self.fwd_count[key]
        meta = self.meta.pop(key)
        scale = self.run.policy.loss_cotangent(int(meta["rows"]), int(meta["mb_rows"]))
        self.after = self.events.pop(key, [])
        fn = self._value_and_grads if self.graphs is None else self.graphs.value_and_grads
        value, grads = await self.compute(fn, inputs, scale, cost=0)
        if self.graphs is not None:
            # a replayed step is short: poll by yielding to the loop for a while before the
            # pool's sleeping back-off (whose first sleeps overshoot a sub-millisecond step)
            deadline = time.perf_counter() + 2e-3
            while not self.backend.event_done(self.last_event) and time.perf_counter() < deadline:
                await anyio.lowlevel.checkpoint()
        await self.wait_for_device()  # the host reads the loss value
        self.run.check_finite(self.name, FORWARD, key, value)
        self.stats.forwards += 1
        self.run.loss_reported(key, float(value), meta)
        for slot, (src, from_layer) in enumerate(
            zip(self.node.inputs, self.input_is_layer, strict=True)
        ):
            if from_layer:
                edge = self.run.edge_index[(src, self.name, slot)]
                msg = Message(BACKWARD, key, 0, self.name, src, edge, (grads[slot],), meta)
                msg.event = self.last_event
                await self._send(msg)
        if self.run.recorder is not None:  # the end comes after the sends, as for layers
            self.run.recorder.event(
                self.name, "end", FORWARD, key, 0, "", self.seq, meta={"loss": float(value)}
            )
        self.seq += 1

    def _value_and_grads(self, inputs: list[Any], scale: float) -> tuple[Any, Any]:
        inputs = self._to_device(inputs)
        value, pullback = vjp(lambda *xs: self.module({}, *xs), *inputs)
        xp = self.backend.xp
        # a fill, not a copy from the host: capturable in a CUDA graph
        return value, pullback(xp.full((), scale, dtype=value.dtype))
