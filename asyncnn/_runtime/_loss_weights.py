"""How a minibatch's keys share its mean loss: by their rows, or, for a loss whose mean divides
by its labels' weight (a cross-entropy loss with ignored labels or class weights), by that.

A flush (``GPipe(M)``, ``OneFOneB(M)``) seeds each key's loss gradient with its share of the
minibatch, and the minibatch's reported loss sums the keys' shares: with shares by the labels'
weight, both come out as the loss of the whole minibatch at once, as in ``Sync``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (the graph's nodes name the loss actor's class: a circle at run time)
    from ._graph import Graph

__all__ = ["label_weights", "labels_weighed", "weights_of"]


def labels_weighed(graph: Graph) -> list[tuple[str, str, Any]]:
    """``(loss, its labels' input, its module)`` of each loss node that can say what its mean
    divides by (``mean_weight``: the built-in ``CrossEntropyLoss``) and reads its labels from
    a graph input; a run asks them at each minibatch split into several keys."""
    found = []
    for name in graph.losses:
        node = graph.nodes[name]
        if len(node.inputs) == 2 and graph.nodes[node.inputs[1]].kind == "input":
            if callable(getattr(node.module, "mean_weight", None)):
                found.append((name, node.inputs[1], node.module))
    return found


def label_weights(
    losses: Sequence[tuple[str, str, Any]],
    arrays: Mapping[str, Any],
    parts: Sequence[tuple[int, int]],
) -> dict[str, list[tuple[float, float]]]:
    """For each of ``losses`` whose labels in ``arrays`` weigh otherwise than their rows: per
    part of ``parts`` (the keys' rows), ``(its labels' weight, the minibatch's)``. None of a
    loss whose labels are on a GPU (read back only at a host sync), all counted at weight 1
    (the rows then say the same, exactly) or all ignored (its mean is NaN whatever the
    shares)."""
    found: dict[str, list[tuple[float, float]]] = {}
    for name, source, module in losses:
        labels = arrays[source]
        total = module.mean_weight(labels)
        if not total:
            continue  # (a minibatch whose every label is ignored: NaN by its rows, as in Sync)
        if getattr(module, "weight", None) is None and total == getattr(labels, "size", None):
            continue  # every label counted, at weight 1: its rows say the same
        found[name] = [(float(module.mean_weight(labels[lo:hi])), total) for lo, hi in parts]
    return found


def weights_of(name: str, meta: Mapping[str, Any]) -> tuple[float, float]:
    """What a loss node's key weighs in its minibatch's mean: ``(its labels' weight, the
    minibatch's)`` where the run set them, else ``(rows, mb_rows)``."""
    weighed = meta.get("weights")
    if weighed is not None:
        pair = weighed.get(name)
        if pair is not None:
            return float(pair[0]), float(pair[1])
    return int(meta["rows"]), int(meta["mb_rows"])
