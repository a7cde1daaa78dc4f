"""What an actor sees of its run: a small, typed context instead of the whole run.

The run builds one :class:`ActorContext` and hands it to every actor it starts. Actors read the
run's description (graph, policy, optimizer, seed), the resources they compute with (the device
pool, the trace recorder), and report back only through the few callbacks listed here; nothing
else of the run is theirs to touch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from asyncnn.backends import DevicePool

    from ._graph import Graph
    from ._policies import Policy, StageOrder
    from ._recorder import Recorder

__all__ = ["ActorContext"]


@dataclass(frozen=True, eq=False)
class ActorContext:
    """The part of a run its actors use (``actor.ctx``; ``actor.run`` is the same object).

    Attributes:
        graph: the network being run.
        policy: the run's policy (its methods decide orders, updates, what is kept).
        optimizer: the optimizer every layer updates with.
        seed: the run's seed (dropout streams are seeded from it, the stage and the key).
        pool: the device pool to compute on.
        recorder: the trace recorder, or None without a trace.
        checks_finite: whether actors check what they produce for NaN and Inf.
        max_in_flight: how many keys may be in flight (bounds each actor's inbox).
        first_key: the first key this run admits (keys before it belong to earlier runs).
        cuda_graphs: whether GPU actors capture and replay CUDA graphs in this run.
        edge_index: ``(source, consumer, slot) -> the source's consumer edge``.
        channels: each node's inbox (a remote node's stand-in for nodes other processes
            host), filled once every actor exists.
        orders: each layer actor's order of work (``policy.orders``, made once per run).
        touch: records progress (the stall watchdog reads it).
        backward_done: ``backward_done(actor, key)``: a layer finished a key's backward.
        loss_reported: ``loss_reported(key, share, meta)``: a loss actor's key's share of its
            minibatch's loss (its value weighted by its rows, or whole for a summed loss).
        check_finite: ``check_finite(actor, kind, key, value)``: raises on NaN or Inf.
        dtype: the run's floating dtype (``Trainer(dtype=...)``, as a numpy dtype): that of the
            parameters, the floating inputs and the floating tensors actors send. An actor
            whose own arrays do not tell it (a layer without parameters on integer inputs)
            makes its floating results in it.
    """

    graph: Graph
    policy: Policy
    optimizer: Any
    seed: int
    pool: DevicePool
    recorder: Recorder | None
    checks_finite: bool
    max_in_flight: int
    first_key: int
    cuda_graphs: bool
    edge_index: Mapping[tuple[str, str, int], int]
    channels: Mapping[str, Any]
    orders: Mapping[str, StageOrder]
    touch: Callable[[], None]
    backward_done: Callable[[str, int], None]
    loss_reported: Callable[[int, float, Mapping[str, Any]], None]
    check_finite: Callable[[str, str, int, Any], None]
    dtype: np.dtype[Any]

    @property
    def inline_flops(self) -> float:
        """CPU work estimated below this many flops runs inline, not on a pool worker."""
        return self.pool.inline_flops
