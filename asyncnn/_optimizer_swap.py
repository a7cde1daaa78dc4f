"""What assigning another optimizer to a trainer does to each layer's optimizer state: kept
where the new optimizer takes it as its own (the same structure and shapes), else made fresh by
it (``Trainer.optimizer``'s setter; ``Trainer.load(path, optimizer=...)`` reads the same way)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._math._pytree import tree_flatten
from ._runtime._graph import Graph
from ._runtime._state import RunState
from .backends import get_backend

__all__ = ["fitted_opt_states"]


def fitted_opt_states(
    state: RunState, graph: Graph, cluster: Any, optimizer: Any
) -> dict[str, Any]:
    """Each layer's optimizer state under ``optimizer``: its current one in ``state`` where
    that has the structure and shapes ``optimizer.init`` makes, else that fresh one (made where
    the layer's weights are, as the trainer made them: a layer of a worker's on the host).
    Every layer's state is made before the caller replaces any, so an ``init`` that fails
    changes nothing."""
    states = {}
    for name, params in state.params.items():
        node = graph.nodes[name]
        on_host = cluster is not None and node.worker is not None
        with get_backend("cpu" if on_host else node.device).activate():
            fresh = optimizer.init(params)
        held = state.opt_states.get(name)
        states[name] = held if held is not None and _same_layout(held, fresh) else fresh
    return states


def _same_layout(state: Any, like: Any) -> bool:
    """Whether the pytree ``state`` has the structure of ``like`` and leaves of the same
    shapes (an optimizer state that ``like``'s optimizer takes as its own)."""
    leaves, treedef = tree_flatten(state)
    like_leaves, like_treedef = tree_flatten(like)
    return treedef == like_treedef and all(
        np.shape(a) == np.shape(b) for a, b in zip(leaves, like_leaves, strict=True)
    )
