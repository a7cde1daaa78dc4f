"""Losses: modules without parameters that reduce to a scalar by default.

A loss refuses an integer or bool prediction (logits, ``pred``): it comes from no parameter, so
no gradient would reach the model. Integer labels are what ``CrossEntropyLoss`` takes, and an
integer or bool ``MSELoss`` target is cast to the prediction's dtype, as torch does (numpy would
promote the loss to float64 in a float32 model).
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncnn.backends import is_half, to_numpy

from .. import _ops as ops
from .. import _ops_nn as ops_nn
from .._ops import as_array, namespace_of, raw
from .._ops_nn import PrimitiveCall
from .._optim_checks import _real
from ._module import NO_DTYPE, Module, Shape, float_input_error

__all__ = ["CrossEntropyLoss", "MSELoss"]

_REDUCTIONS = ("mean", "sum", "none")
#: torch's default ignore_index: a label of -100 is no class
_IGNORE_INDEX = -100


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
    The options are torch's (``torch.nn.functional.cross_entropy`` with class-index targets),
    with its semantics, combinations included.

    With every option at its default the loss is one fused primitive
    (:meth:`primitive_call`); with any option set it is composed of ops (a log-softmax, a
    masked sum), a little slower. Labels equal to the default ``ignore_index`` (-100) are
    ignored as in torch: numpy labels holding one take the composed path for that call (found
    only when the fused path refuses them, so other calls pay nothing). Labels on a GPU are not
    read back (a round trip to the host every step): at the defaults the fused kernels skip
    -100 labels themselves (and count those kept for the mean on the device), and with any
    option set the composed ops ignore ``ignore_index``. There, a label outside ``[0, C)``
    that is not ``ignore_index`` makes its position's loss NaN, and so the reduced loss.
    (``Trainer.fit`` checks its labels before training, and names such a label.)

    A policy that splits a minibatch into microbatches (``GPipe(M)``, ``OneFOneB(M)``) weights
    each microbatch's mean by its labels' weight (:meth:`mean_weight`) where they are on the
    host, so that the minibatch's loss and gradient are those of all its rows at once, as
    under ``Sync``; labels on a GPU are weighted by their rows, as gradient accumulation over
    torch's mean losses does. ``Trainer.evaluate`` divides by the labels' weights over the
    whole data, as torch's loss of all of it at once.

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-position losses, in the
            labels' shape). The mean divides by the number of positions not ignored, or with
            ``weight`` by the sum of their classes' weights; with none left (every label
            ignored, or an empty batch) it is NaN, as in torch (its gradient zero).
        weight: one weight per class (C real numbers, any 1-D sequence or array; kept as a
            tuple of floats, so the loss stays hashable and a spec carries it), or None. Each
            position's loss is multiplied by its label's weight.
        ignore_index: a label value whose positions contribute 0 and are left out of the
            mean's denominator (torch's default, -100). It may also be a class in ``[0, C)``.
        label_smoothing: in ``[0, 1]``: the target is ``1 - label_smoothing`` on the label
            plus ``label_smoothing / C`` on every class, as in torch: the loss is
            ``(1 - s) * nll + (s / C) * smooth``, where ``smooth`` sums ``-log p`` over the
            classes (each weighted by its class's ``weight``), is 0 at ignored positions, and
            is reduced as ``nll`` is (the mean dividing by the same sum of label weights).

    Raises:
        TypeError: a ``weight`` that does not hold real numbers, a ``label_smoothing`` that is
            not a real number, an ``ignore_index`` that is not an int (all on construction);
            labels that are not integers, logits that are not floating point (on a call).
        ValueError: a ``weight`` that is not 1-D and non-empty or holds NaN or infinity, a
            ``label_smoothing`` outside ``[0, 1]`` (on construction); on a call, a ``weight``
            whose length is not the logits' number of classes, logits and labels of shapes that
            do not fit, or a label outside ``[0, C)`` that is not ``ignore_index`` (numpy
            labels), naming it and its position.
    """

    weight: tuple[float, ...] | None = None
    ignore_index: int = _IGNORE_INDEX
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.weight is not None:
            object.__setattr__(self, "weight", _class_weights(name, self.weight))
        index = self.ignore_index
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"{name}: ignore_index must be an int, got {index!r}")
        object.__setattr__(self, "ignore_index", int(index))
        smoothing = _real(name, "label_smoothing", self.label_smoothing)
        if not 0.0 <= smoothing <= 1.0:  # (NaN fails too)
            raise ValueError(
                f"{name}: label_smoothing must be in [0, 1], got {self.label_smoothing!r}"
            )
        object.__setattr__(self, "label_smoothing", smoothing)

    def __repr__(self) -> str:
        # the options only where set, so the default loss reads as it always has (messages
        # and tests name it "CrossEntropyLoss(reduction='mean')")
        shown = [f"reduction={self.reduction!r}"]
        if self.weight is not None:
            shown.append(f"weight={self.weight!r}")
        if self.ignore_index != _IGNORE_INDEX:
            shown.append(f"ignore_index={self.ignore_index!r}")
        if self.label_smoothing:
            shown.append(f"label_smoothing={self.label_smoothing!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def __call__(self, params: Any, logits: Any, labels: Any, *, rng: Any = None) -> Any:
        logits = self._floating(logits)
        if self._has_options():
            return self._composed(logits, labels)
        try:
            return ops_nn.cross_entropy(
                logits, labels, reduction=self.reduction, ignore_index=self._kernel_ignores(labels)
            )
        except ValueError:
            if not self._holds_ignored(labels):
                self._labels(logits, labels)  # (names a bad label's position, where it is one)
                raise
        return self._composed(logits, labels)

    def primitive_call(self, *inputs: Any) -> PrimitiveCall | None:
        if not self._calls_its_own(CrossEntropyLoss) or self._has_options():
            return None  # differentiated through the call, composed of ops
        logits, labels = inputs
        logits = self._floating(logits)
        try:
            return ops_nn.cross_entropy_call(
                logits, labels, self.reduction, self._kernel_ignores(labels)
            )
        except ValueError:
            if not self._holds_ignored(labels):
                self._labels(logits, labels)  # (names a bad label's position, where it is one)
                raise
        return None  # host labels holding the default ignore_index: the call ignores them

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        logits = input_shapes[0]  # per-position losses have the labels' shape: (N, d1, ...)
        return (*logits[:1], *logits[2:]) if self.reduction == "none" else ()

    def _floating(self, logits: Any) -> Any:
        if getattr(logits, "dtype", NO_DTYPE).kind in "iub":  # no gradient, float64 loss
            raise float_input_error(self, logits, None, "logits")
        return logits

    def mean_weight(self, labels: Any) -> float | None:
        """What this loss's mean divides by for ``labels`` (host integers): the number of
        labels it counts (those other than ``ignore_index``), or with ``weight`` the sum of
        their classes' weights; None where that cannot be read without a trip to the device
        (labels on a GPU) or this is no built-in mean (another reduction, a subclass with a
        call of its own). A run weights each microbatch's mean by it, and ``evaluate`` each
        batch's, so that their means come out as the mean of all of the rows at once."""
        if self.reduction != "mean" or not self._calls_its_own(CrossEntropyLoss):
            return None
        y = raw(labels)
        if type(y) is not np.ndarray or y.dtype.kind not in "iu":
            return None
        counted = y != self.ignore_index
        if self.weight is None:
            return float(np.count_nonzero(counted))
        w = np.asarray(self.weight, dtype=np.float64)
        picked = np.where(counted, y, 0).clip(0, len(w) - 1)
        return float(np.where(counted, w[picked], 0.0).sum())

    def _kernel_ignores(self, labels: Any) -> int | None:
        """What the op ignores: nothing for host labels (the op refuses one holding the default
        ``ignore_index``, and the call takes the composed path for it: other calls pay
        nothing), the default ``ignore_index`` for labels elsewhere (a GPU's, not read back:
        its kernels skip them)."""
        return None if ops_nn.ids_on_host(raw(labels)) else _IGNORE_INDEX

    def _has_options(self) -> bool:
        """Whether an option is set, so that the loss is composed of ops, not the primitive."""
        return (
            self.weight is not None
            or self.ignore_index != _IGNORE_INDEX
            or self.label_smoothing != 0.0
        )

    def _holds_ignored(self, labels: Any) -> bool:
        """Whether host ``labels`` hold ``ignore_index`` (asked only once the fused path has
        refused them: a second pass over the labels of every call otherwise)."""
        y = as_array(raw(labels), type(self).__name__)
        kind = getattr(getattr(y, "dtype", None), "kind", None)
        return ops_nn.ids_on_host(y) and kind in ("i", "u") and bool((y == self.ignore_index).any())

    def _labels(self, logits: Any, labels: Any) -> Any:
        """The raw labels after the checks of a call: integers of the logits' shape less the
        class axis, each in ``[0, C)`` or ``ignore_index`` (host labels)."""
        name = type(self).__name__
        y = ops_nn.label_array(name, logits, labels)
        xs = tuple(logits.shape)
        classes = xs[1]
        if self.weight is not None and len(self.weight) != classes:
            raise ValueError(
                f"{name}: weight has {len(self.weight)} entries but the logits of shape {xs} "
                f"have {classes} classes (axis 1); give one weight per class"
            )
        if ops_nn.ids_on_host(y) and y.size:
            bad = (y != self.ignore_index) & ((y < 0) | (y >= classes))
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(np.asarray(bad))[0])
                at = f"labels[{', '.join(map(str, where))}]" if where else "labels"
                raise ValueError(
                    f"{name}: label {int(y[where])} at {at} is outside [0, {classes}) for logits "
                    f"of shape {xs}, and is not the ignore_index ({self.ignore_index}); labels "
                    "must be class indices or ignore_index"
                )
        return y

    def _composed(self, logits: Any, labels: Any) -> Any:
        """The loss with its options, composed of ops in the steps of torch's
        ``cross_entropy`` (``nll_loss`` of the log-softmax, plus the smoothing term), so that
        every combination comes out as torch's."""
        logits = as_array(logits, type(self).__name__)
        y = self._labels(logits, labels)
        if is_half(raw(logits).dtype):
            # in float32, as the fused primitive computes 16-bit logits: the loss comes out
            # float32, the gradient goes back in the logits' dtype
            logits = ops.astype(logits, np.float32)
        xp = namespace_of(logits)
        dtype = raw(logits).dtype
        classes = logits.shape[1]
        spread = (1, classes) + (1,) * (logits.ndim - 2)  # a class vector against the logits
        ignored = y == self.ignore_index
        bad = ~ignored & ((y < 0) | (y >= classes))  # (device labels: host ones were refused)
        counted = ~ignored & ~bad
        safe = xp.where(counted, y, 0)
        picks = xp.expand_dims(safe, 1) == xp.arange(classes).reshape(spread)
        picks &= xp.expand_dims(counted, 1)  # (N, C, d1, ...): each counted label's class
        logp = ops_nn.log_softmax(logits, axis=1)
        # where, not a product with the one-hot: -inf at another class must not make NaN
        picked = ops.sum(ops.where(picks, logp, 0.0), axis=1)
        if self.weight is None:
            nll = ops.negative(picked)
            total = counted.sum().astype(dtype)
        else:
            device = getattr(getattr(raw(logits), "device", None), "id", None)
            w = _class_weight_array(self.weight, dtype, xp, device)
            label_w = xp.where(counted, w[safe], xp.zeros((), dtype))
            nll = ops.negative(ops.multiply(picked, label_w))
            total = label_w.sum()
        if not ops_nn.ids_on_host(y):  # a device label out of range: NaN, as the fused kernel
            nll = ops.where(bad, float("nan"), nll)
        loss = self._reduce(nll, total, xp)
        smoothing = self.label_smoothing
        if smoothing:
            terms = logp if self.weight is None else ops.multiply(logp, w.reshape(spread))
            smooth = ops.where(ignored, 0.0, ops.negative(ops.sum(terms, axis=1)))
            loss = ops.add(
                ops.multiply(loss, 1.0 - smoothing),
                ops.multiply(self._reduce(smooth, total, xp), smoothing / classes),
            )
        return loss

    def _reduce(self, losses: Any, total: Any, xp: Any) -> Any:
        """Per-position ``losses`` reduced; a mean divides by ``total`` (the positions counted,
        or their labels' weights)."""
        if self.reduction == "none":
            return losses
        summed = ops.sum(losses)
        if self.reduction == "sum":
            return summed
        # a total of 0 (every label ignored): torch's 0 / 0 = NaN with a zero gradient, made
        # without numpy's warning (the division by 0 kept out of the traced ops, whose
        # gradient would be NaN)
        nonzero = total != 0
        mean = ops.divide(summed, xp.where(nonzero, total, xp.ones_like(total)))
        with np.errstate(divide="ignore", invalid="ignore"):
            by_zero = raw(summed) / total
        return ops.where(nonzero, mean, xp.where(nonzero, xp.zeros_like(by_zero), by_zero))


@functools.lru_cache(maxsize=32)
def _class_weight_array(weight: tuple[float, ...], dtype: Any, xp: Any, device: Any) -> Any:
    """``weight`` as an array of ``dtype`` on ``device`` (made on the current one), made once:
    a copy from the host at each call could not be captured into a CUDA graph."""
    return xp.asarray(weight, dtype=dtype)


def _class_weights(owner: str, weight: Any) -> tuple[float, ...]:
    """``weight`` checked as one finite real number per class, as a tuple of Python floats."""
    try:
        arr = np.asarray(to_numpy(weight))
    except (TypeError, ValueError, RuntimeError) as exc:  # ragged, or a tensor needing grad
        raise TypeError(
            f"{owner}: weight must be a 1-D sequence or array of real numbers, got "
            f"{type(weight).__name__} ({exc})"
        ) from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(
            f"{owner}: weight must hold real numbers, got dtype {arr.dtype}; pass one float "
            "per class, e.g. (1.0, 2.0, 0.5)"
        )
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{owner}: weight must be 1-D, one entry per class, got shape {arr.shape}")
    finite = np.isfinite(arr)
    if not finite.all():
        i = int(np.argmin(finite))
        raise ValueError(f"{owner}: weight must be finite, got {arr[i]} at weight[{i}]")
    return tuple(float(v) for v in arr.tolist())


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
