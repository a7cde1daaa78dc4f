"""The one table from what a node does (its role) to the actor class that runs it.

A graph only describes: each node has a role (``Node.role``: ``"layer"``, ``"router"``,
``"merge"``, ``"loop"``, ``"loss"``), and a custom actor class where the user gave one. The run
asks :func:`actor_class` which class to start for each node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asyncnn._errors import GraphError
from asyncnn._math._imports import UntrustedModuleError, import_by_path

from ._actors import LayerActor
from ._loops import LoopActor
from ._loss_actor import LossActor
from ._routing import MergeActor, RouterActor

if TYPE_CHECKING:
    from ._node import Node

__all__ = ["ACTORS", "actor_class", "resolve_actor"]

#: the actor class of each role
ACTORS: dict[str, type[Any]] = {
    "layer": LayerActor,
    "router": RouterActor,
    "merge": MergeActor,
    "loop": LoopActor,
    "loss": LossActor,
}


def actor_class(node: Node) -> type[Any]:
    """The class of the actor that runs ``node``: its custom class, else its role's."""
    custom: type[Any] | None = node.custom_actor
    return ACTORS[node.role] if custom is None else custom


def resolve_actor(path: str) -> type[Any]:
    """A custom actor class from its import path (``package.module:Class``).

    Raises:
        GraphError: the path names nothing, or something that is not a ``LayerActor`` subclass.
    """
    try:
        cls: type[Any] = import_by_path(path, LayerActor, "actor")
    except UntrustedModuleError:
        raise  # already says what to trust, and how
    except ValueError as exc:
        raise GraphError(f"graph spec: {exc}") from exc
    return cls
