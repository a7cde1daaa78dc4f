"""What ``Trainer.predict`` and ``Trainer.evaluate`` compute, once their data is checked: forward
passes over a data set in batches, at the weights given, for the graph's outputs or for the loss
over all of the data (and, of a classifier, the accuracy: :func:`_classifiers` says which loss
nodes are one). Apart from ``_train.py``, which checks the data and holds the weights, because
this is the arithmetic alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._math._data import ArrayDataset
from ._runtime._forward import forward_pass
from ._runtime._graph import Graph
from ._runtime._loss_actor import sums_over_rows
from .backends import to_numpy


def predict_outputs(
    graph: Graph, params: Mapping[str, Any], dataset: ArrayDataset, batch_size: int, dtype: str
) -> dict[str, np.ndarray]:
    """The graph's outputs (``g.output``) for ``dataset``, computed at ``params`` in batches
    of ``batch_size`` rows, as numpy arrays (see :meth:`Trainer.predict`)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in graph.outputs}
    # the outputs alone: each other activation goes once its readers have run
    keep = set(graph.outputs.values())
    for batch in dataset.batches(batch_size):
        outs = forward_pass(graph, params, batch, dtype, keep=keep)
        for name, src in graph.outputs.items():
            parts[name].append(np.asarray(to_numpy(outs[src])))
    return {name: np.concatenate(p) for name, p in parts.items()}


def evaluate_loss(
    graph: Graph, params: Mapping[str, Any], dataset: ArrayDataset, batch_size: int, dtype: str
) -> dict[str, float]:
    """The loss over ``dataset`` at ``params``, computed in batches of ``batch_size`` rows, and
    the accuracy of a classifier (see :meth:`Trainer.evaluate` for what each is)."""
    # {loss node: [the sum of its batches' values, each times its weight; the weights' sum]}
    sums = {name: [0.0, 0.0] for name in graph.losses}
    # {loss node: [labels matching their logits' argmax, labels]} of the classifiers
    counts = {name: [0, 0] for name in _classifiers(graph)}
    # the losses and the classifiers' logits alone: each other activation goes once its readers
    # have run
    keep = set(graph.losses) | {graph.nodes[name].inputs[0] for name in counts}
    for batch in dataset.batches(batch_size):
        rows = len(next(iter(batch.values())))
        outs = forward_pass(graph, params, batch, dtype, losses=True, keep=keep)
        for name in graph.losses:
            node = graph.nodes[name]
            # a mean, weighted by what it divides by (its rows, or its labels' weights), comes
            # back a mean over the data; a sum adds up
            if sums_over_rows(node.module):
                value, weight = float(to_numpy(outs[name])), 1.0
            else:
                weight = _mean_weight(node.module, batch, node.inputs, rows)
                value = float(to_numpy(outs[name])) * weight if weight else 0.0
            sums[name][0] += value
            sums[name][1] += weight
            if name not in counts:
                continue
            labels = np.asarray(to_numpy(batch[node.inputs[1]]))
            predicted = np.asarray(to_numpy(outs[node.inputs[0]])).argmax(axis=1)
            if predicted.shape != labels.shape:  # (a subclass's own call): never broadcast
                del counts[name]
                continue
            # one label per row, or per position; an ignored one (ignore_index) is no class
            counted = labels != getattr(node.module, "ignore_index", None)
            counts[name][0] += int(((predicted == labels) & counted).sum())
            counts[name][1] += int(counted.sum())
    loss = 0.0
    for name, (total, weight) in sums.items():
        if sums_over_rows(graph.nodes[name].module):
            loss += total
        else:  # (every label ignored: NaN, as the loss of the whole data at once)
            loss += total / weight if weight else float("nan")
    result = {"loss": loss}
    if counts:
        labelled = sum(t for _, t in counts.values())
        right = sum(c for c, _ in counts.values())
        result["accuracy"] = right / labelled if labelled else float("nan")
    return result


def _mean_weight(module: Any, batch: Mapping[str, Any], inputs: Sequence[str], rows: int) -> float:
    """What a mean loss of ``batch`` divides by, in rows: a built-in ``CrossEntropyLoss``'s
    labels' weight (:meth:`~asyncnn.nn.CrossEntropyLoss.mean_weight`) as a share of its
    labels' number, times the rows; else the rows. The batches' means, weighted by it, give
    the mean of the whole data at once (as torch's)."""
    from ._math._nn import CrossEntropyLoss

    if not isinstance(module, CrossEntropyLoss) or len(inputs) != 2 or inputs[1] not in batch:
        return float(rows)
    labels = np.asarray(to_numpy(batch[inputs[1]]))
    weight = module.mean_weight(labels)
    return float(rows) if weight is None else weight * rows / max(labels.size, 1)


def _classifiers(graph: Graph) -> list[str]:
    """The loss nodes whose accuracy :meth:`Trainer.evaluate` counts: a ``CrossEntropyLoss`` (or
    a subclass) reading logits and a graph input declared as integer class indices. Decided from
    the graph, never from the dtype of the data given."""
    from ._math._nn import CrossEntropyLoss

    found = []
    for name in graph.losses:
        node = graph.nodes[name]
        if isinstance(node.module, CrossEntropyLoss) and len(node.inputs) == 2:
            labels = graph.nodes[node.inputs[1]]
            if labels.kind == "input" and np.dtype(labels.dtype).kind in "iu":
                found.append(name)
    return found
