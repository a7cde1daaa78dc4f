"""CUDA graphs of GPU loss actors: the loss and its gradients captured once, replayed after
(the slots and buffers are those of :mod:`._capture`, whose docstring says when each applies)."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from ._capture import _Graphs, _Stats

if TYPE_CHECKING:
    from ._loss_actor import LossActor

__all__ = ["LossGraphs"]


class LossGraphs:
    """The CUDA graphs of one GPU loss actor: its loss value and input gradients."""

    def __init__(self, actor: LossActor) -> None:
        self.base = _Graphs(actor)
        self.actor = actor
        self.entries: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self.base.memory = lambda: self.base.held([e[3] for e in self.entries.values()])

    @property
    def stats(self) -> _Stats:
        return self.base.stats

    def slot(self, meta: dict[str, Any]) -> int:
        """The slot of the key whose loss comes now (:meth:`_Graphs.slot`)."""
        return self.base.slot(meta)

    def value_and_grads(self, inputs: list[Any], scale: float, slot: int = 0) -> tuple[Any, Any]:
        """The actor's ``_value_and_grads`` through a graph where one is (or can now be)
        captured, in the key's ``slot`` (:meth:`_Graphs.slot`)."""
        actor, base = self.actor, self.base
        xs = actor._to_device(inputs)
        sig = base._signature(xs)
        if sig is not None:
            sig = None if slot < 0 else (sig, float(scale), slot)

        def capture() -> tuple[Any, list[Any], Any, Any]:
            static = [base.xp.empty_like(x) for x in xs]
            base._load(static, xs)
            graph, result, keep = base._capture(lambda: actor._value_and_grads(static, scale))
            return graph, static, result, keep

        # an entry: (graph, static inputs, result, keep)
        entry = base.lookup(self.entries, sig, capture, lambda e: base._load(e[1], xs))
        if entry is None:
            return actor._value_and_grads(xs, scale)
        entry[0].launch(actor.stream)
        if base.streaming:  # the value is copied to the host right behind, on this stream
            value, grads = entry[2]
            return value, base.copied(list(grads))
        return entry[2]
