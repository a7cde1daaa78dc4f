"""A graph's node and the reference to its output: what one node describes (its kind, module,
inputs, placement, custom actor) and its role, which decides the actor that runs it.

Apart from ``_graph.py``, whose job is building and checking a whole graph: a node is a plain
record that every actor is made from and reads, and none of them needs the builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from asyncnn._math._nn._loops import Loop
from asyncnn._math._nn._routing import Merge, Router

__all__ = ["Node", "TensorRef"]


@dataclass(frozen=True)
class TensorRef:
    """The output of a node, as handed out by :meth:`Graph.input` and :meth:`Graph.layer`."""

    graph_id: int
    node: str

    def __repr__(self) -> str:
        return f"<tensor of {self.node!r}>"


#: the role of a layer node by the type of its module (any other module: a plain layer)
_ROLES: dict[type, str] = {Router: "router", Merge: "merge", Loop: "loop"}


@dataclass
class Node:
    """One node of a graph.

    ``kind`` is ``"input"``, ``"layer"`` or ``"loss"``. Layers and losses read the outputs of
    ``inputs`` (node names, in argument order) and call ``module(params, *inputs)``. A node only
    describes; :attr:`role` says what it does, and the runtime picks the actor that runs it.
    """

    name: str
    kind: str
    module: Any = None
    inputs: tuple[str, ...] = ()
    shape: tuple[int | None, ...] | None = None  # inputs only; None marks the batch dimension
    dtype: str | None = None  # inputs only
    device: str = "cpu"
    worker: int | None = None
    #: a custom ``LayerActor`` subclass (from a spec: resolved when read); None: the role's
    custom_actor: Any = None
    #: the keyword arguments of the custom actor's ``setup`` (plain, msgpack-able values)
    actor_args: dict[str, Any] = field(default_factory=dict)
    stop_gradient: bool = False  # a layer that sends no gradient to its inputs
    #: a stage of ``Graph.sequential``: its ``Sequential`` holds the chain's modules from this
    #: place on, seeded (and drawing their dropout masks) by their place in the whole chain (at
    #: the first stage's seed), so neither depends on where the chain is cut; None: seeded by
    #: the node's position
    init_offset: int | None = None
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (node, input slot)
    #: the mark of a recurrent edge as set (by ``g.loop``, or read from a spec's
    #: ``"recurrent"``); :attr:`recurrent` reads it
    _recurrent_mark: bool = field(default=False, init=False, repr=False)

    @property
    def recurrent(self) -> bool:
        """Whether the node's output feeds itself, the one cycle a graph may have: always for a
        loop (its ``Loop`` module makes it one, whatever the mark says, so a spec written
        without ``"recurrent"`` rebuilds the same graph), and for any other node where it was
        marked so, which ``Graph.from_spec`` refuses."""
        return self._recurrent_mark or self.role == "loop"

    @recurrent.setter
    def recurrent(self, value: bool) -> None:
        self._recurrent_mark = bool(value)

    @property
    def role(self) -> str:
        """What the node does: ``"input"``, ``"loss"``, or for a layer ``"router"``,
        ``"merge"``, ``"loop"`` (by its module) or ``"layer"``."""
        if self.kind != "layer":
            return self.kind
        return _ROLES.get(type(self.module), "layer")

    @property
    def actor(self) -> Any:
        """The actor class the runtime runs this node with: the custom one where given, else
        its role's (the runtime's one table of actor classes decides)."""
        from ._actor_table import actor_class  # the runtime's table; the graph only describes

        return actor_class(self)
