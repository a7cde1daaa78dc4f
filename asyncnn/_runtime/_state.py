"""What a run leaves behind and a later run starts from (:class:`RunState`), and the fresh state
of a graph's layers (:func:`init_state`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from asyncnn._math._nn import Residual, Sequential
from asyncnn._math._pytree import leaf_path, tree_flatten
from asyncnn.backends import is_floating

if TYPE_CHECKING:
    from ._graph import Graph
    from ._node import Node

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
    its device; the values are the same on every backend).

    Raises:
        TypeError: a parameter that is not an array (a module whose ``init_params`` returns
            ``{"alpha": 0.5}``), naming the layer, the parameter, the module whose
            ``init_params`` drew it and the fix; and the optimizer's ``TypeError`` or
            ``ValueError`` on a layer's parameters (an integer array), naming the layer.
    """
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
        _check_param_leaves(node, params[name])
        try:
            opt_states[name] = optimizer.init(params[name])
        except (TypeError, ValueError) as exc:
            if type(exc) not in (TypeError, ValueError):
                raise  # (a subclass of its own: kept as it is)
            raise type(exc)(
                f"layer {name!r} ({node.module!r:.100}): {exc}{_drawn_by(node, params[name])}"
            ) from exc
    return RunState(params, opt_states, {name: 0 for name in graph.layers})


def _check_param_leaves(node: Node, params: Any) -> None:
    """Refuses a parameter that is not an array (a Python float): ``Module.init`` gives arrays
    of the run's dtype on the layer's device, which the optimizer updates; a float passed the
    graph's check (the forward takes it) and failed in the optimizer's ``init``, naming
    neither the layer nor the module."""
    leaves, treedef = tree_flatten(params)
    for k, leaf in enumerate(leaves):
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            continue
        labels = leaf_path(treedef, k)
        owner, place = _owner(node.module, labels)
        value = f"{leaf!r:.40}"
        number = isinstance(leaf, numbers.Real) and not isinstance(leaf, bool)
        raise TypeError(
            f"layer {node.name!r}: params{''.join(f'[{x!r}]' for x in labels)} is a "
            f"{type(leaf).__name__} ({value}), not an array: {type(owner).__name__}.init_params "
            f"({owner!r:.80}{place}) must draw each parameter as an array, of the run's dtype "
            "on the layer's device, for the optimizer to update; draw it with the initializer "
            f"it is given, which makes one: init.asarray({value if number else '...'}) (or "
            "init.ones(()), init.zeros(shape), init.normal(shape))"
        )


def _drawn_by(node: Node, params: Any) -> str:
    """Where the first parameter of ``params`` that is not a floating array comes from (what an
    optimizer refuses), as ``"; params[1]['w'] is drawn by M.init_params"``; "" if none is."""
    leaves, treedef = tree_flatten(params)
    for k, leaf in enumerate(leaves):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and is_floating(dtype):
            continue
        labels = leaf_path(treedef, k)
        owner, place = _owner(node.module, labels)
        path = "".join(f"[{x!r}]" for x in labels)
        return (
            f"; params{path} is drawn by {type(owner).__name__}.init_params "
            f"({owner!r:.80}{place}): draw it in floating point with its initializer "
            "(init.asarray(value) casts to the run's dtype)"
        )
    return ""


def _owner(module: Any, labels: list[Any]) -> tuple[Any, str]:
    """The module whose ``init_params`` drew the parameter at ``labels`` of ``module``'s
    parameters (into the containers: a ``Sequential``'s list by place, a ``Residual``'s own),
    and where it sits in ``module`` (``", module 1 of the layer's Sequential"``; "" where it
    is ``module``)."""
    place = ""
    for label in labels:
        while isinstance(module, Residual):
            module = module.module
        if not isinstance(module, Sequential) or not isinstance(label, int):
            break
        if not 0 <= label < len(module.modules):
            break
        whose = "the layer's Sequential" if not place else "a Sequential in it"
        module, place = module.modules[label], f", module {label} of {whose}"
    while isinstance(module, Residual):
        module = module.module
    return module, place
