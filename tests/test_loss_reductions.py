"""The check that each loss is the reduction over rows the runtime takes it for
(``_loss_reductions.check_loss_reductions``): a sum taken for a mean trains at 1/M under a
flush that splits minibatches, so it is refused there (and warned of elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn._math._pytree import tree_leaves
from asyncnn._runtime._graph_checks import validate
from asyncnn._runtime._loss_reductions import _row_reduction, check_loss_reductions


@dataclass(frozen=True)
class SumSquares(nn.Module):
    """A squared error summed over the rows, not saying so."""

    def __call__(self, params: Any, pred: Any, target: Any, *, rng: Any = None) -> Any:
        return ops.sum((pred - target) ** 2)


@dataclass(frozen=True)
class SumSquaresDeclared(SumSquares):
    """The same, with the declaration as a field."""

    reduction: str = "sum"


@dataclass(frozen=True)
class SumSquaresClassAttr(SumSquares):
    """The same, with the declaration as a class attribute."""

    reduction: ClassVar[str] = "sum"


@dataclass(frozen=True)
class MeanCallingItselfASum(nn.Module):
    """A row mean that declares a sum."""

    reduction: str = "sum"

    def __call__(self, params: Any, pred: Any, target: Any, *, rng: Any = None) -> Any:
        return ops.mean((pred - target) ** 2)


@dataclass(frozen=True)
class BatchCentred(nn.Module):
    """A batch-level loss: the spread of the rows' errors around their batch mean."""

    def __call__(self, params: Any, pred: Any, target: Any, *, rng: Any = None) -> Any:
        err = ops.sum(pred - target, axis=1)
        return ops.mean((err - ops.mean(err)) ** 2) + ops.mean(err**2)


@dataclass(frozen=True)
class Hinge(nn.Module):
    """A custom row mean (a multi-class hinge), integer labels."""

    def __call__(self, params: Any, logits: Any, labels: Any, *, rng: Any = None) -> Any:
        onehot = labels[:, None] == np.arange(logits.shape[1])
        picked = ops.sum(ops.where(onehot, logits, 0.0), axis=1, keepdims=True)
        return ops.mean(ops.relu(1.0 - picked + logits))


def _regression(loss: Any) -> ann.Graph:
    graph = ann.Graph.sequential(
        [nn.Linear(4, 2)], loss=loss, stages=1, input_shape=(None, 4), label_shape=(None, 2),
        label_dtype="float64",
    )  # fmt: skip
    validate(graph, "float64")
    return graph


def test_an_undeclared_sum_over_rows_is_refused_where_a_policy_splits_minibatches() -> None:
    # (GPipe(4) scaled each microbatch's gradient by its share of the rows: the sum trained at
    # 1/4 of Sync's speed, and reported 1/4 of its loss, without a word)
    graph = _regression(SumSquares())
    for policy in [policies.GPipe(4), policies.OneFOneB(2), policies.PipeDream2BW(2)]:
        with pytest.raises(ann.GraphError) as e:
            check_loss_reductions(graph, policy)
        msg = str(e.value)
        assert "loss 'loss' (SumSquares())" in msg and "sum of its rows' losses" in msg
        assert f"{policy!r}" in msg and "reduction = 'sum'" in msg and "divide" in msg


@pytest.mark.parametrize("loss", [SumSquaresDeclared(), SumSquaresClassAttr()], ids=str)
def test_a_declared_sum_passes_and_trains_as_under_sync(loss: Any) -> None:
    graph = _regression(loss)
    check_loss_reductions(graph, policies.GPipe(4))  # no error, no warning
    x = np.random.default_rng(0).standard_normal((32, 4))
    t = np.random.default_rng(1).standard_normal((32, 2))
    results = []
    for policy in [policies.Sync(), policies.GPipe(4)]:
        tr = ann.Trainer(graph, optimizer=optim.SGD(lr=0.01), policy=policy, dtype="float64")
        history = tr.fit({"x": x, "y": t}, batch_size=32)
        results.append((history.losses, tr.params))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12)
    for a, b in zip(tree_leaves(results[0][1]), tree_leaves(results[1][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_an_undeclared_sum_warns_where_only_the_reported_losses_would_be_off() -> None:
    # Sync takes a minibatch whole (training is exact), and PipeDream seeds each key's loss
    # unscaled: only the losses combined as row means (epoch, evaluate) would be off
    graph = _regression(SumSquares())
    for policy in [policies.Sync(), policies.PipeDream(4), policies.Async()]:
        with pytest.warns(UserWarning, match=r"loss 'loss' \(SumSquares\(\)\) sums over its rows"):
            check_loss_reductions(graph, policy)


def test_a_mean_declaring_a_sum_is_refused_where_a_policy_splits_minibatches() -> None:
    graph = _regression(MeanCallingItselfASum())
    with pytest.raises(ann.GraphError, match=r"declares reduction='sum' but .* the mean of its"):
        check_loss_reductions(graph, policies.OneFOneB(3))
    with pytest.warns(UserWarning, match="declares reduction='sum'"):
        check_loss_reductions(graph, policies.Sync())


def test_a_batch_level_loss_warns_where_microbatches_would_change_it() -> None:
    graph = _regression(BatchCentred())
    with pytest.warns(UserWarning, match=r"neither a mean nor a sum .* GPipe\(microbatches=4\)"):
        check_loss_reductions(graph, policies.GPipe(4))
    check_loss_reductions(graph, policies.Sync())  # exact there: nothing said


_ROW_LOSSES = [
    nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"),
    nn.CrossEntropyLoss(weight=(1.0, 3.0, 0.5), label_smoothing=0.1),
    nn.CrossEntropyLoss(reduction="sum", weight=(1.0, 3.0, 0.5), ignore_index=2),
    nn.CrossEntropyLoss(ignore_index=0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("loss", "sequence"),
    [*((loss, False) for loss in [*_ROW_LOSSES, Hinge()]), *((loss, True) for loss in _ROW_LOSSES)],
    ids=str,
)
def test_builtin_and_custom_row_losses_pass_with_no_warning(loss: Any, sequence: bool) -> None:
    # (pytest turns any warning into an error)
    if sequence:  # (N, C, T) logits against (N, T) labels
        g = ann.Graph()
        x = g.input("x", shape=(None, 3, 5))
        y = g.input("y", shape=(None, 5), dtype="int64")
        g.loss("loss", loss, g.layer("m", nn.Identity(), x), y)
        graph = g
    else:
        graph = ann.Graph.sequential([nn.Linear(4, 3)], loss=loss, input_shape=(None, 4))
    validate(graph, "float32")
    # (found as what it is, not passed for want of an answer)
    behaves = _row_reduction(graph, graph.nodes["loss"], graph.shapes)
    assert behaves == getattr(loss, "reduction", "mean")
    for policy in [policies.Sync(), policies.GPipe(4), policies.PipeDream(2)]:
        check_loss_reductions(graph, policy)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse_passes_with_no_warning(reduction: str) -> None:
    graph = _regression(nn.MSELoss(reduction=reduction))
    for policy in [policies.Sync(), policies.GPipe(4)]:
        check_loss_reductions(graph, policy)


def test_a_replay_does_what_the_recorded_run_did() -> None:
    from asyncnn._runtime._wrapped import Replay

    check_loss_reductions(_regression(SumSquares()), Replay(recorded=policies.GPipe(4)))


def test_a_trainer_refuses_an_undeclared_sum_under_gpipe() -> None:
    # (the check runs as a run opens: Trainer.fit, open_run, a cluster's driver)
    graph = _regression(SumSquares())
    x = np.random.default_rng(0).standard_normal((32, 4))
    tr = ann.Trainer(graph, optimizer=optim.SGD(lr=0.01), policy=policies.GPipe(4))
    with pytest.raises(ann.GraphError, match=r"SumSquares\(\)\) .* sum of its rows' losses"):
        tr.fit({"x": x, "y": x[:, :2]}, batch_size=32)
