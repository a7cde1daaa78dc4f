"""What a run leaves behind and a later run starts from (:class:`RunState`), and the fresh state
of a graph's layers (:func:`init_state`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._graph import Graph

__all__ = ["RunState", "init_state", "node_seed"]


@dataclass
class RunState:
    """What a run leaves behind and a later run starts from: weights, optimizer state, versions.

    Read it with ``run.state()`` or ``Trainer.state``; start a run from it with
    ``open_run(..., state=...)``, which needs ``params``, ``opt_states`` and ``versions`` for
    every layer of the graph. Its values are the run's own objects (device arrays, a custom
    actor's state as its ``actor_state`` returned it), not copies.

    Attributes:
        params: ``{layer: parameters}``, a pytree of backend arrays per layer.
        opt_states: ``{layer: optimizer state}``.
        versions: ``{layer: parameter version}``, the updates applied so far.
        minibatches: minibatches admitted so far (the next one's index).
        keys: keys admitted so far (the next key).
        pending_grads: gradients a layer has summed but not applied yet (``Async`` with
            ``min_update_frequency > 1``, custom update rules): ``{layer: (sum, count)}``;
            carried from one ``fit`` to the next.
        actor_states: custom actors' own state (``LayerActor.actor_state``): ``{layer: state}``,
            given to each one's ``load_actor_state`` when a run starts.
        earlier_params: earlier versions of a layer's parameters that the policy keeps for
            forwards pinned to them (``Policy.versions_kept``; ``PipeDream2BW``: the version
            before the latest): ``{layer: {version: parameters}}``. A run that starts from
            them goes on pinning as one unbroken run would (the first minibatch of the next
            ``fit`` computes at the version before the latest); a layer without them starts
            anew, its first minibatch at its latest weights. Carried from one ``fit`` to the
            next and kept by checkpoints; ``Trainer.params = ...`` drops those of the layers
            it sets. A trace's initial state record holds them (a replay starts from them too),
            and a cluster sends each worker its layers' ones.
        pending_delays: the delays of a layer's :attr:`pending_grads` (the layer's version at
            the update minus its forward's, as the actor noted them, in order): ``{layer:
            [delay, ...]}``, at most as many as the pending count (a skipped key's zero
            gradient has none). The update that applies the gradients counts them (its trace
            event, ``ActorStatistics.delays``, the mean delay a remedy such as ``PipeMareLR``
            corrects with), as one unbroken run would; a layer without them counts no delay for
            its carried gradients (as a checkpoint or trace written before them). Carried and
            kept wherever :attr:`pending_grads` are; ``open_run`` drops those of a layer with
            no pending gradients.
    """

    params: dict[str, Any]
    opt_states: dict[str, Any]
    versions: dict[str, int]
    minibatches: int = 0
    keys: int = 0
    pending_grads: dict[str, tuple[Any, int]] = field(default_factory=dict)
    actor_states: dict[str, Any] = field(default_factory=dict)
    earlier_params: dict[str, dict[int, Any]] = field(default_factory=dict)
    pending_delays: dict[str, list[int]] = field(default_factory=dict)


def node_seed(seed: int, index: int) -> int:
    """The init seed of the layer at topological position ``index``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def init_state(
    graph: Graph, optimizer: Any, seed: int, dtype: str, placed_on_host: bool = False
) -> RunState:
    """Fresh parameters (seeded per node, or per module by its place in a chain of
    ``Graph.sequential``: :attr:`Node.init_offset`) and optimizer states for every layer.

    With ``placed_on_host``, layers placed on a worker get host arrays (the worker moves them to
    its device; the values are the same on every backend)."""
    params: dict[str, Any] = {}
    opt_states: dict[str, Any] = {}
    for i, name in enumerate(graph.layers):
        node = graph.nodes[name]
        device = "cpu" if placed_on_host and node.worker is not None else node.device
        if node.init_offset is None:
            params[name] = node.module.init(node_seed(seed, i), backend=device, dtype=dtype)
        else:  # a stage of a chain: seeded by its modules' places in the whole chain
            params[name] = node.module.init(
                node_seed(seed, 0), backend=device, dtype=dtype, offset=node.init_offset
            )
        opt_states[name] = optimizer.init(params[name])
    return RunState(params, opt_states, {name: 0 for name in graph.layers})
