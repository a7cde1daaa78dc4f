"""``_loss_weights``: under a flush, a minibatch's keys share a cross-entropy mean by their
labels' weight (ignored labels, class weights), so that ``GPipe`` and ``OneFOneB`` equal
``Sync`` as they do for any other loss."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._math._pytree import tree_leaves


def _fit(loss: Any, policy: Any, y: np.ndarray) -> tuple[list[float], Any]:
    x = np.random.default_rng(0).standard_normal((len(y), 6))
    graph = ann.Graph.sequential(
        [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)], loss=loss, stages=2,
        input_shape=(None, 6), input_dtype="float64",
    )  # fmt: skip
    tr = ann.Trainer(graph, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64", seed=0)
    history = tr.fit({"x": x, "y": y}, batch_size=12, epochs=2, shuffle=False)
    return history.losses, tr.params


@pytest.mark.parametrize(
    "loss",
    [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=(1.0, 3.0, 0.5), label_smoothing=0.1)],
    ids=["ignored", "weighted"],
)
@pytest.mark.parametrize("policy", [policies.GPipe(4), policies.OneFOneB(3)], ids=str)
def test_a_flush_equals_sync_with_ignored_labels_and_class_weights(loss: Any, policy: Any) -> None:
    # (each microbatch's mean was weighted by its rows: the weights came out 0.1-0.2 apart)
    y = np.random.default_rng(1).integers(0, 3, 24)
    y[[0, 1, 2, 3, 5, 13]] = -100  # the first microbatch of 3 rows wholly ignored
    losses, params = _fit(loss, policy, y)
    sync_losses, sync_params = _fit(loss, policies.Sync(), y)
    np.testing.assert_allclose(losses, sync_losses, rtol=1e-12)
    for a, b in zip(tree_leaves(params), tree_leaves(sync_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert np.isfinite(losses).all()


def test_class_weights_that_sum_to_the_label_count_are_still_shared_by_weight() -> None:
    # (a minibatch whose weights happened to sum to its labels' number was shared by rows)
    loss = nn.CrossEntropyLoss(weight=(0.5, 1.5, 1.0))
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2] * 2)  # each minibatch's weights sum to 12
    losses, params = _fit(loss, policies.GPipe(4), y)
    sync_losses, sync_params = _fit(loss, policies.Sync(), y)
    np.testing.assert_allclose(losses, sync_losses, rtol=1e-12)
    for a, b in zip(tree_leaves(params), tree_leaves(sync_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_the_shares_are_left_to_the_rows_where_they_say_the_same() -> None:
    from asyncnn._runtime._loss_weights import label_weights, labels_weighed

    graph = ann.Graph.sequential(
        [nn.Linear(2, 3)], loss=nn.CrossEntropyLoss(), input_shape=(None, 2)
    )
    losses = labels_weighed(graph)
    assert [(name, source) for name, source, _ in losses] == [("loss", "y")]
    parts = [(0, 2), (2, 4)]
    assert label_weights(losses, {"y": np.array([0, 1, 2, 1])}, parts) == {}
    assert label_weights(losses, {"y": np.full(4, -100)}, parts) == {}  # NaN as in Sync
    assert label_weights(losses, {"y": np.array([0, -100, 2, 1])}, parts) == {
        "loss": [(1.0, 3.0), (2.0, 3.0)]
    }
    mse = ann.Graph.sequential(
        [nn.Linear(2, 3)], loss=nn.MSELoss(), input_shape=(None, 2), label_shape=(None, 3)
    )
    assert labels_weighed(mse) == []  # a loss that cannot say: by its rows


def test_a_traced_flush_with_weighed_labels_replays_identically(tmp_path: Any) -> None:
    y = np.random.default_rng(1).integers(0, 3, 24)
    y[[0, 1, 2, 3, 5, 13]] = -100
    x = np.random.default_rng(0).standard_normal((24, 6))
    graph = ann.Graph.sequential(
        [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)], loss=nn.CrossEntropyLoss(), stages=2,
        input_shape=(None, 6), input_dtype="float64",
    )  # fmt: skip
    path = str(tmp_path / "run.trace")
    tr = ann.Trainer(
        graph, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(4), dtype="float64", trace=path
    )
    tr.fit({"x": x, "y": y}, batch_size=12, shuffle=False)
    admits = [e for e in ann.trace.read(path).events if e["ev"] == "admit"]
    assert admits[0]["m"]["weights"] == {"loss": [0.0, 7.0]}  # (the shares ride in the trace)
    rep = ann.replay(path)
    assert rep.identical, rep.first_divergence
