"""Losses: modules without parameters that reduce to a scalar by default.

A loss refuses an integer or bool prediction (logits, ``pred``): it comes from no parameter, so
no gradient would reach the model. Integer labels are what ``CrossEntropyLoss`` takes, and an
integer or bool ``MSELoss`` target is cast to the prediction's dtype, as torch does (numpy would
promote the loss to float64 in a float32 model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _ops_nn as ops_nn
from .._ops import raw
from .._ops_nn import PrimitiveCall
from ._module import NO_DTYPE, Module, Shape, float_input_error

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
        return ops_nn.cross_entropy(self._floating(logits), labels, reduction=self.reduction)

    def primitive_call(self, *inputs: Any) -> PrimitiveCall | None:
        if not self._calls_its_own(CrossEntropyLoss):
            return None
        logits, labels = inputs
        return ops_nn.cross_entropy_call(self._floating(logits), labels, self.reduction)

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        logits = input_shapes[0]  # per-position losses have the labels' shape: (N, d1, ...)
        return (*logits[:1], *logits[2:]) if self.reduction == "none" else ()

    def _floating(self, logits: Any) -> Any:
        if getattr(logits, "dtype", NO_DTYPE).kind in "iub":  # no gradient, float64 loss
            raise float_input_error(self, logits, None, "logits")
        return logits


@dataclass(frozen=True)
class MSELoss(_Loss):
    """Squared error between prediction and target of the same shape (mean by default).

    The prediction is floating point; an integer or bool target (counts, ratings) is cast to
    its dtype, so the loss comes out in the prediction's dtype (as in torch). A float target of
    another dtype follows numpy's promotion (float64 with float32 gives float64, as in torch).
    """

    def __call__(self, params: Any, pred: Any, target: Any, *, rng: Any = None) -> Any:
        return ops_nn.mse_loss(pred, self._target(pred, target), reduction=self.reduction)

    def primitive_call(self, *inputs: Any) -> PrimitiveCall | None:
        if not self._calls_its_own(MSELoss):
            return None
        pred, target = inputs
        return ops_nn.mse_loss_call(pred, self._target(pred, target), self.reduction)

    def _target(self, pred: Any, target: Any) -> Any:
        """``target`` after the checks of the prediction: cast to its dtype if integral."""
        dtype = getattr(pred, "dtype", NO_DTYPE)
        if dtype.kind in "iub":  # no gradient, and a float64 loss
            raise float_input_error(self, pred, None, "pred")
        if getattr(target, "dtype", NO_DTYPE).kind in "iub":  # a label: no gradient to lose
            return raw(target).astype(dtype)
        return target
