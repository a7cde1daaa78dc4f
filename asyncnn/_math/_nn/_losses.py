"""Losses: modules without parameters that reduce to a scalar by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _ops_nn as ops_nn
from ._module import Module, Shape

__all__ = ["CrossEntropyLoss", "MSELoss"]

_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class _Loss(Module):
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.reduction not in _REDUCTIONS:
            raise ValueError(
                f"{type(self).__name__}: reduction must be one of {_REDUCTIONS}, got "
                f"{self.reduction!r}"
            )

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        return input_shapes[0] if self.reduction == "none" else ()


@dataclass(frozen=True)
class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy of logits (N, C) or (N, C, d1, ...) against integer labels.

    ``loss(params, logits, labels)`` with ``params = {}``; the mean over samples by default.
    """

    def __call__(self, params: Any, logits: Any, labels: Any, *, rng: Any = None) -> Any:
        return ops_nn.cross_entropy(logits, labels, reduction=self.reduction)


@dataclass(frozen=True)
class MSELoss(_Loss):
    """Squared error between prediction and target of the same shape (mean by default)."""

    def __call__(self, params: Any, pred: Any, target: Any, *, rng: Any = None) -> Any:
        return ops_nn.mse_loss(pred, target, reduction=self.reduction)
