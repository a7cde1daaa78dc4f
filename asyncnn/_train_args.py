"""The checks of what ``Trainer(...)`` is given, before anything is built from it: a graph, a
trace path that can be written, a cluster, a policy, an optimizer (an instance) and a
``cuda_graphs`` that goes with the cluster, and the graph's placement on that cluster, each
refused with what to pass instead. Apart from
``_train.py`` so that the trainer reads as what it does; the checks of the optimizer and
``cuda_graphs`` are the runtime's, which ``open_run`` makes too."""

from __future__ import annotations

from typing import Any

from ._cluster._base import Cluster
from ._cluster._placement import check_turns, placement
from ._runtime._checks import check_cuda_graphs, check_optimizer
from ._runtime._graph import Graph
from ._runtime._policies import Policy
from ._train_options import _check_trace_path


def check_trainer_args(
    graph: Any,
    trace: str | None,
    cluster: Any,
    policy: Any,
    optimizer: Any,
    cuda_graphs: bool | None,
) -> None:
    """Refuses, in this order, what is not a graph, a ``trace`` path that cannot be written, what
    is not a cluster, a policy, an optimizer, and ``cuda_graphs=True`` with a ``cluster`` (the
    graph's placement on the cluster is :func:`check_placement`'s, once the graph is checked).

    Raises:
        TypeError: a graph, cluster, policy or optimizer that is none (naming what was given).
        ValueError: ``cuda_graphs=True`` with a ``cluster``.
        FileNotFoundError: ``trace``'s folder does not exist (also NotADirectoryError,
            IsADirectoryError: see :class:`~asyncnn.Trainer`).
    """
    _check_graph(graph)
    _check_trace_path(trace)
    if cluster is not None and not callable(getattr(cluster, "open_run", None)):
        raise TypeError(
            "cluster must be an asyncnn.cluster cluster (e.g. "
            f"ann.cluster.LocalCluster(workers=2)), got {cluster!r}"
        )
    if not isinstance(policy, Policy):
        raise TypeError(
            f"policy must be an asyncnn.policies policy (e.g. policies.Sync()), got {policy!r}"
        )
    check_optimizer(optimizer)
    check_cuda_graphs(cuda_graphs, cluster)


def check_placement(graph: Graph, cluster: Any, policy: Policy) -> None:
    """Refuses, for a trainer made with a ``cluster``, a node placed on a worker the cluster
    lacks (``worker=7`` with 4 workers) and layers that take turns on one device placed in
    different processes: the checks the fit's run makes as it opens, made once the graph has
    been checked (as the run makes them after its own check).

    Raises:
        GraphError: naming the node, its ``worker=`` and the cluster's size (or the layers that
            take turns and where each is placed).
    """
    if isinstance(cluster, Cluster):
        # known now, as the trainer is made: a worker the cluster lacks was refused only when
        # the first fit opened its run, after the trainer was built and the data checked (the
        # fit checks again: the graph, the policy and the cluster may change before it)
        check_turns(graph, policy, placement(graph, cluster))


def _check_graph(graph: Any) -> None:
    """Refuses what is not a graph, as ``open_run`` does (it failed later, on its first
    attribute: "'NoneType' object has no attribute 'layers'").

    Raises:
        TypeError: naming what was given (its repr cut to about 80 characters), with the way
            to a graph from a spec dict or a module.
    """
    if isinstance(graph, Graph):
        return
    from ._math._nn import Module

    hint = ""
    if isinstance(graph, dict):  # (as open_run words it)
        hint = "; build one from a graph's spec with Graph.from_spec"
    elif isinstance(graph, Module):
        hint = (
            "; build one from a module with Graph.sequential([module], loss=..., input_shape=...)"
        )
    # (cut: a graph's spec or a module would print whole)
    raise TypeError(f"Trainer: graph must be an asyncnn.Graph, got {graph!r:.80}{hint}")
