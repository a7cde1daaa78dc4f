"""Losses: modules without parameters that reduce to a scalar by default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _ops_nn as ops_nn
from .._ops_nn import PrimitiveCall
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

    def primitive_call(self, *inputs: Any) -> PrimitiveCall | None:
        """This loss of ``inputs`` as one primitive call, ``(primitive, args, params)``, after
        the checks a call makes (raising as it would); None where it is more than one (then
        differentiate the call itself). A loss actor differentiates it without a trace
        (``primitive_vjp``)."""
        return None

    def _calls_its_own(self, cls: type) -> bool:
        # a subclass that changes the call (label smoothing, a weighting) is differentiated
        # through its call, never as the primitive of the class it came from
        return type(self).__call__ is cls.__call__


@dataclass(frozen=True)
class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy of logits (N, C) or (N, C, d1, ...) against integer labels.

    ``loss(params, logits, labels)`` with ``params = {}``; the mean over samples by default.
    """

    def __call__(self, params: Any, logits: Any, labels: Any, *, rng: Any = None) -> Any:
        return ops_nn.cross_entropy(logits, labels, reduction=self.reduction)

    def primitive_call(self, *inputs: Any) -> PrimitiveCall | None:
        if not self._calls_its_own(CrossEntropyLoss):
            return None
        logits, labels = inputs
        return ops_nn.cross_entropy_call(logits, labels, self.reduction)


@dataclass(frozen=True)
class MSELoss(_Loss):
    """Squared error between prediction and target of the same shape (mean by default)."""

    def __call__(self, params: Any, pred: Any, target: Any, *, rng: Any = None) -> Any:
        return ops_nn.mse_loss(pred, target, reduction=self.reduction)

    def primitive_call(self, *inputs: Any) -> PrimitiveCall | None:
        if not self._calls_its_own(MSELoss):
            return None
        pred, target = inputs
        return ops_nn.mse_loss_call(pred, target, self.reduction)
