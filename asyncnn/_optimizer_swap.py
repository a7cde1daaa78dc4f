"""What assigning another optimizer to a trainer does to each layer's optimizer state: kept
where the new optimizer takes it as its own (the same structure and shapes), else made fresh by
it (``Trainer.optimizer``'s setter; ``Trainer.load(path, optimizer=...)`` reads the same way);
an RMSprop after one of another ``momentum`` or ``centered`` (a buffer more or fewer) goes on
with the step and square averages, as torch's does (:func:`rmsprop_carried`, the one rule the
setter and a load both follow)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._math._optim_rms import RMSprop
from ._math._pytree import tree_flatten
from ._runtime._graph import Graph
from ._runtime._state import RunState
from .backends import get_backend

__all__ = ["fitted_opt_states", "rmsprop_carried"]


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
        if held is None:
            states[name] = fresh
        elif _same_layout(held, fresh):
            states[name] = held
        else:
            states[name] = rmsprop_carried(held, fresh, optimizer) or fresh
    return states


#: the buffers an RMSprop's state may hold, by its momentum and centered
_RMSPROP_BUFFERS = frozenset({"square_avg", "momentum_buffer", "grad_avg"})


def rmsprop_carried(held: Any, fresh: Any, optimizer: Any) -> dict[str, Any] | None:
    """``held``, the state of an RMSprop of another ``momentum`` or ``centered`` (a buffer more
    or fewer), as ``optimizer``'s: its step and the buffers both use kept, a buffer only
    ``optimizer`` uses from ``fresh`` (zeros), one it does not use dropped; None where either
    is no RMSprop's (or a kept buffer has other shapes).

    torch's RMSprop, its group's momentum (or centered) changed, goes on with the square
    averages and the step, and ignores a buffer it no longer uses; switched on, it finds no
    buffer (a KeyError) where this starts one at zero, as its first step would."""
    if not (isinstance(optimizer, RMSprop) and isinstance(held, dict) and isinstance(fresh, dict)):
        return None
    if "square_avg" not in held or not set(held) <= {"step", *_RMSPROP_BUFFERS}:
        return None
    carried = {"step": held.get("step", fresh["step"])}
    for name in optimizer.buffer_names():
        if name not in held:
            carried[name] = fresh[name]
        elif _same_layout(held[name], fresh[name]):
            carried[name] = held[name]
        else:
            return None
    return carried


def _same_layout(state: Any, like: Any) -> bool:
    """Whether the pytree ``state`` has the structure of ``like`` and leaves of the same
    shapes (an optimizer state that ``like``'s optimizer takes as its own)."""
    leaves, treedef = tree_flatten(state)
    like_leaves, like_treedef = tree_flatten(like)
    return treedef == like_treedef and all(
        np.shape(a) == np.shape(b) for a, b in zip(leaves, like_leaves, strict=True)
    )
