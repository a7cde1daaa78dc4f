"""The neural-network operations: softmax family, convolutions, norms, dropout, losses (the
pools are :mod:`._ops_pool`'s).

Importing this module adds the nn primitives to :data:`asyncnn._math._ops.PRIMITIVES`. Every
function checks its arguments here, before any compute, so a wrong shape or dtype fails with a
message that names the shapes and says what to pass instead.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from asyncnn.backends import array_namespace, is_cupy_array, is_floating, to_numpy

from ._autodiff import Primitive
from ._autodiff_args import COMPLEX_REFUSED
from ._ops import PRIMITIVES, as_array, checked_axis, raw
from ._ops import check_floating as _check_floating
from ._rules_array import check_axis
from ._rules_nn import RULES, out_size

__all__ = [
    "conv1d", "conv2d", "cross_entropy", "dropout", "embedding", "group_norm", "layer_norm",
    "log_softmax", "logsumexp", "mse_loss", "softmax",
]  # fmt: skip

PRIMITIVES.update(
    {name: Primitive._builtin(name, fwd, rule) for name, (fwd, rule) in RULES.items()}
)
_P = PRIMITIVES

IntOrTuple = int | Sequence[int]
#: one primitive call: ``(primitive, positional args, keyword params)``
PrimitiveCall = tuple[Primitive, tuple[Any, ...], dict[str, Any]]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def _softmax_axis(x: Any, axis: int, name: str) -> int:
    """The softmax family's one axis, made non-negative, after checking that ``x`` is floating."""
    if not isinstance(axis, int | np.integer):  # a sequence: one axis only (check_axis says int)
        raise TypeError(f"{name}: axis must be one int, got {axis!r}")
    _check_floating(x, name)
    return checked_axis(check_axis, axis, x, name)  # (its error names x's shape)


# -- softmax family -------------------------------------------------------------------------------
def softmax(x: Any, axis: int = -1) -> Any:
    """``exp(x) / sum(exp(x))`` along ``axis``, computed after subtracting the maximum.

    A row of -inf gives NaN, and so does a row holding +inf (as torch, and as
    :func:`cross_entropy`'s loss).
    """
    x = as_array(x, "softmax")
    return _P["softmax"](x, axis=_softmax_axis(x, axis, "softmax"))


def log_softmax(x: Any, axis: int = -1) -> Any:
    """``x - logsumexp(x)`` along ``axis``, computed without overflow; a row of -inf or one
    holding +inf gives NaN, as torch."""
    x = as_array(x, "log_softmax")
    return _P["log_softmax"](x, axis=_softmax_axis(x, axis, "log_softmax"))


def logsumexp(x: Any, axis: int = -1, keepdims: bool = False) -> Any:
    """``log(sum(exp(x)))`` along ``axis``, computed as ``max + log(sum(exp(x - max)))``.

    A row of -inf gives -inf (its gradient is NaN, as in torch), and so does an empty axis.
    """
    x = as_array(x, "logsumexp")
    return _P["logsumexp"](x, axis=_softmax_axis(x, axis, "logsumexp"), keepdims=keepdims)


# -- convolution ----------------------------------------------------------------------------------
def _tuple(value: IntOrTuple, n: int, what: str, op: str, minimum: int) -> tuple[int, ...]:
    items: tuple[Any, ...] = ()
    if isinstance(value, int | np.integer):
        items = (value,) * n
    else:
        # a float such as 2.0, None or a 0-d array is not iterable: it gets the message below,
        # not tuple()'s, which names neither the op nor the argument
        with contextlib.suppress(TypeError):
            items = tuple(value)
    if len(items) != n or not all(isinstance(v, int | np.integer) for v in items):
        raise ValueError(f"{op}: {what} must be an int or a tuple of {n} ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{op}: {what} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in items)


def _check_input(op: str, x: Any, spatial: int) -> tuple[int, ...]:
    shape = _shape(x)
    if len(shape) != spatial + 2:
        layout = "(N, C, L)" if spatial == 1 else "(N, C, H, W)"
        raise ValueError(
            f"{op}: input must have shape {layout}, got {shape}; add a batch axis with "
            "ops.expand_dims(x, 0) for a single sample"
        )
    return shape


def _check_fits(
    op: str,
    shape: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    what: str,
    ceil_mode: bool = False,
) -> None:
    for n, k, s, p, d in zip(shape[2:], kernel, stride, padding, dilation, strict=True):
        if out_size(n, k, s, p, d, ceil_mode) < 1:
            raise ValueError(
                f"{op}: the {what} (kernel {kernel}, dilation {dilation}) is larger than the "
                f"padded input: input {shape} with padding {padding}; use a smaller kernel or "
                "more padding"
            )


def _conv(
    op: str,
    spatial: int,
    x: Any,
    weight: Any,
    bias: Any,
    stride: IntOrTuple,
    padding: IntOrTuple,
    dilation: IntOrTuple,
) -> Any:
    x, weight, bias = (as_array(a, op) for a in (x, weight, bias))
    xs = _check_input(op, x, spatial)
    _check_floating(x, op, "x", weight, bias)
    _check_floating(weight, op, "weight", x, bias)
    if bias is not None:
        _check_floating(bias, op, "bias", weight, x)
    ws = _shape(weight)
    if len(ws) != spatial + 2:
        layout = "(O, C, K)" if spatial == 1 else "(O, C, kh, kw)"
        raise ValueError(f"{op}: weight must have shape {layout}, got {ws}")
    if ws[0] == 0:  # (torch refuses it too; the output would have no channels)
        raise ValueError(
            f"{op}: weight of shape {ws} has 0 output channels (its first axis); a convolution "
            "needs at least one kernel: weight is (out_channels, in_channels, *kernel)"
        )
    if ws[1] != xs[1]:
        raise ValueError(
            f"{op}: input of shape {xs} has {xs[1]} channels but weight of shape {ws} expects "
            f"{ws[1]} (weight is (out_channels, in_channels, *kernel))"
        )
    if bias is not None and _shape(bias) != (ws[0],):
        raise ValueError(f"{op}: bias must have shape ({ws[0]},), got {_shape(bias)}")
    s = _tuple(stride, spatial, "stride", op, 1)
    p = _tuple(padding, spatial, "padding", op, 0)
    d = _tuple(dilation, spatial, "dilation", op, 1)
    _check_fits(op, xs, ws[2:], s, p, d, "kernel")
    return _P["conv"](x, weight, bias, stride=s, padding=p, dilation=d)


def conv1d(
    x: Any,
    weight: Any,
    bias: Any = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
) -> Any:
    """1-D cross-correlation, as ``torch.nn.functional.conv1d``.

    Args:
        x: input of shape (N, C, L).
        weight: kernels of shape (O, C, K).
        bias: optional, shape (O,).
        stride: the step between windows.
        padding: zeros added on both sides.
        dilation: the spacing of the kernel's taps.

    Returns:
        Shape (N, O, L_out), ``L_out = (L + 2*padding - dilation*(K-1) - 1) // stride + 1``.

    Raises:
        TypeError: when x, weight or bias is not floating point (integers or bools).
        ValueError: on a channel mismatch, a weight of 0 output channels, or a kernel larger
            than the padded input.
    """
    return _conv("conv1d", 1, x, weight, bias, stride, padding, dilation)


def conv2d(
    x: Any,
    weight: Any,
    bias: Any = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
) -> Any:
    """2-D cross-correlation on NCHW input, as ``torch.nn.functional.conv2d``.

    Args:
        x: input of shape (N, C, H, W).
        weight: kernels of shape (O, C, kh, kw).
        bias: optional, shape (O,).
        stride: the step between windows, an int or a pair (height, width).
        padding: zeros added on both sides, an int or a pair.
        dilation: the spacing of the kernel's taps, an int or a pair.

    Returns:
        Shape (N, O, H_out, W_out).

    Raises:
        TypeError: when x, weight or bias is not floating point (integers or bools).
        ValueError: on a channel mismatch, a weight of 0 output channels, or a kernel larger
            than the padded input.
    """
    return _conv("conv2d", 2, x, weight, bias, stride, padding, dilation)


# -- normalization, dropout -----------------------------------------------------------------------
def layer_norm(x: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    """Layer normalization over the trailing ``weight.ndim`` axes (the last axis without weight).

    ``(x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance, as torch.

    Raises:
        TypeError: when x, weight or bias is not floating point (integers or bools).
        ValueError: when weight's or bias's shape is not the trailing part of x's shape.
    """
    x, weight, bias = (as_array(a, "layer_norm") for a in (x, weight, bias))
    _check_floating(x, "layer_norm", "x", weight, bias)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_floating(p, "layer_norm", name, x)
    xs = _shape(x)
    ndim = len(_shape(weight)) if weight is not None else 1
    if ndim == 0 or ndim > len(xs):
        raise ValueError(f"layer_norm: cannot normalize x of shape {xs} over {ndim} axes")
    normalized = xs[len(xs) - ndim :]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and _shape(p) != normalized:
            raise ValueError(
                f"layer_norm: {name} of shape {_shape(p)} must match the normalized (trailing) "
                f"axes of x, {normalized} (x has shape {xs})"
            )
    return _P["layer_norm"](x, weight, bias, ndim=ndim, eps=float(eps))


def group_norm(
    x: Any, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5
) -> Any:
    """Group normalization, as ``torch.nn.functional.group_norm``: the C channels of an
    ``(N, C, *)`` input in ``num_groups`` groups of consecutive channels, each sample's group
    normalized over its channels and spatial positions with the biased variance, then
    ``* weight + bias`` per channel (both of shape ``(C,)``). No batch statistics: a sample's
    output does not depend on the others in its batch. float16 and bfloat16 compute in float32
    and round once, as :func:`layer_norm` (and torch).

    Raises:
        TypeError: when x, weight or bias is not floating point (integers or bools).
        ValueError: when x has fewer than 2 axes, ``num_groups`` is no int >= 1 or does not
            divide C, or weight's or bias's shape is not ``(C,)``.
    """
    x, weight, bias = (as_array(a, "group_norm") for a in (x, weight, bias))
    _check_floating(x, "group_norm", "x", weight, bias)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_floating(p, "group_norm", name, x)
    if (
        isinstance(num_groups, bool)
        or not isinstance(num_groups, int | np.integer)
        or num_groups < 1
    ):
        raise ValueError(f"group_norm: num_groups must be an int >= 1, got {num_groups!r}")
    groups = int(num_groups)
    xs = _shape(x)
    if len(xs) < 2:
        raise ValueError(
            f"group_norm: x must have shape (N, C, *) (a batch of C channels, then any spatial "
            f"axes), got {xs}; add the batch axis first (x[None])"
        )
    channels = xs[1]
    if channels % groups:
        raise ValueError(
            f"group_norm: x of shape {xs} has {channels} channels (axis 1), which "
            f"num_groups={groups} does not divide; each group takes C // num_groups channels"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and _shape(p) != (channels,):
            raise ValueError(
                f"group_norm: {name} of shape {_shape(p)} must have shape ({channels},), one "
                f"per channel of x (shape {xs})"
            )
    return _P["group_norm"](x, weight, bias, groups=groups, eps=float(eps))


def dropout(x: Any, p: float, rng: Any) -> Any:
    """Zeroes each entry with probability ``p`` and scales the rest by ``1 / (1 - p)``.

    Args:
        x: the input.
        p: drop probability in [0, 1]; ``p=1`` zeroes every entry in training (its gradient
            too), as torch's.
        rng: a numpy or cupy ``Generator`` on x's device (numpy's for a numpy ``x``, cupy's for
            a cupy one); ``None`` means evaluation (identity).

    Raises:
        ValueError: when ``p`` is outside [0, 1].
        TypeError: when ``p`` is not a number, or ``x`` is not floating point (its dtype could
            not hold the scale ``1 / (1 - p)``), in evaluation too, as ``nn.Dropout``; or
            ``rng`` is on another device than ``x``.
    """
    if type(p) is not float:  # (nn.Dropout and attention pass a float, checked when made)
        if getattr(p, "ndim", None) == 0 and not isinstance(p, np.generic):
            p = cast(Any, p).item()  # a 0-d array (numpy's or cupy's) as its number
        if isinstance(p, bool | np.bool_) or not isinstance(p, numbers.Real):
            # (a string failed in the comparison below with a bare TypeError naming no op)
            raise TypeError(f"dropout: p must be a number in [0, 1], got {p!r}")
    if not 0 <= p <= 1:
        raise ValueError(f"dropout: p must be in [0, 1], got {p!r}")
    x = as_array(x, "dropout")
    _check_floating(x, "dropout")
    if rng is None or p == 0:
        return x
    value = raw(x)
    # (at p=1 no draw of [0, 1) is kept; drawn still, so that the generator moves on as at any
    # other p and the device check below holds)
    keep = rng.random(value.shape) >= p
    if is_cupy_array(keep) != is_cupy_array(value):
        # (the product with the mask would fail with a bare error, or leave x's device)
        where = f"cuda:{value.device.id}" if is_cupy_array(value) else "the host"
        made = "cupy.random.default_rng(seed)" if is_cupy_array(value) else "numpy's"
        raise TypeError(
            f"dropout: rng ({type(rng).__name__}) draws on another device than x "
            f"{tuple(value.shape)}, which is on {where}: pass a generator on x's device "
            f"({made}), as a run gives its modules"
        )
    # p=1 keeps nothing: a scale of 0, as torch's (1 / (1 - p) would divide by zero)
    # (float64: the factor is cast to x's dtype once, where the mask is applied)
    scale = np.float64(1 / (1 - p) if p < 1 else 0.0)
    return _P["dropout"](x, keep=keep, scale=scale)


# -- losses and lookups ---------------------------------------------------------------------------
_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def cross_entropy_call(
    logits: Any, labels: Any, reduction: str = "mean", ignore_index: int | None = None
) -> PrimitiveCall:
    """:func:`cross_entropy` as ``(primitive, args, params)`` after its checks (labels on a GPU
    are checked by the op's kernels instead, as :func:`cross_entropy` says); never None."""
    logits = as_array(logits, "cross_entropy")
    labels, _ = _checked_labels(logits, labels, reduction, ignore_index)
    return _P["cross_entropy"], (logits, labels), _ce_params(reduction, ignore_index)


def _ce_params(reduction: str, ignore_index: int | None) -> dict[str, Any]:
    # (no ignore_index, no key: the op's parameters, and so a trace's, read as they always have)
    if ignore_index is None:
        return {"reduction": reduction}
    return {"reduction": reduction, "ignore_index": ignore_index}


def mse_loss_call(pred: Any, target: Any, reduction: str = "mean") -> PrimitiveCall:
    """:func:`mse_loss` as ``(primitive, args, params)`` after its checks."""
    pred, target = as_array(pred, "mse_loss"), as_array(target, "mse_loss")
    _check_mse(pred, target, reduction)
    return _P["mse_loss"], (pred, target), {"reduction": reduction}


def cross_entropy(
    logits: Any, labels: Any, reduction: str = "mean", ignore_index: int | None = None
) -> Any:
    """Softmax cross-entropy of ``logits`` against integer class ``labels`` (torch semantics).

    Args:
        logits: shape (N, C) or (N, C, d1, ...).
        labels: integer class indices in [0, C), shape (N,) or (N, d1, ...).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-position losses). The
            mean over no positions (an empty batch) is NaN, as in torch.
        ignore_index: a label value whose positions have a loss and a gradient of 0 and are
            left out of the mean's count (torch's ``ignore_index``; every position ignored
            makes the mean NaN, its gradient 0), or None (default here; torch's is -100, which
            :class:`~asyncnn.nn.CrossEntropyLoss` passes): every label must be a class.

    Raises:
        TypeError: when labels are not integers, or logits not floating point.
        ValueError: on a shape mismatch, a label outside [0, C) that is not ``ignore_index``
            (numpy labels; on a GPU such a label makes the loss NaN instead, as a check would
            stop the host every step), or an unknown reduction.
    """
    # labels on a GPU are not checked here (that would stop the host every step): the op
    # makes the loss NaN where a label is outside [0, C)
    logits = as_array(logits, "cross_entropy")
    labels, _ = _checked_labels(logits, labels, reduction, ignore_index)
    return _P["cross_entropy"](logits, labels, **_ce_params(reduction, ignore_index))


def label_array(who: str, logits: Any, labels: Any) -> Any:
    """``labels`` as a raw array of integer class indices in the shape of ``logits`` less its
    class axis (axis 1); ``who`` names the caller in the errors.

    Raises:
        TypeError: labels that are not integers (one-hot or float labels).
        ValueError: labels whose shape does not fit the logits'.
    """
    labels = as_array(raw(labels), who)
    ls = _shape(labels)
    kind = getattr(getattr(labels, "dtype", None), "kind", None)
    if kind not in ("i", "u"):
        raise TypeError(
            f"{who}: labels must be integer class indices, got dtype "
            f"{getattr(labels, 'dtype', type(labels).__name__)}; pass integer class indices "
            "(e.g. y.astype(np.int64)), not one-hot or float labels"
        )
    xs = _shape(logits)
    if len(xs) < 2 or ls != xs[:1] + xs[2:]:
        hint = ""
        if len(xs) == 3 and ls in (xs[:1], xs[:2]):  # (N, T, C) from a sequence layer
            hint = (
                "; logits of shape (N, T, C) from a sequence layer? For one label per sequence "
                'take its last step (nn.LSTM/nn.GRU(..., output="last")); for one label per '
                "step, put the classes on axis 1, (N, C, T), as torch's cross_entropy wants"
            )
        raise ValueError(
            f"{who}: logits of shape {xs} and labels of shape {ls} do not match; logits "
            f"must be (N, C) or (N, C, d1, ...) and labels (N,) or (N, d1, ...){hint}"
        )
    return labels


def _checked_labels(
    logits: Any, labels: Any, reduction: str, ignore_index: int | None = None
) -> tuple[Any, int]:
    """:func:`cross_entropy`'s checks: the raw labels and the number of classes."""
    _check_reduction("cross_entropy", reduction)
    _check_floating(logits, "cross_entropy", "logits")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
    ):
        raise TypeError(f"cross_entropy: ignore_index must be an int or None, got {ignore_index!r}")
    if ignore_index is not None and not -(2**63) <= ignore_index < 2**63:
        raise ValueError(
            f"cross_entropy: ignore_index {ignore_index} does not fit in int64, as labels do; "
            "pass a label value in [-2**63, 2**63)"
        )
    labels = label_array("cross_entropy", logits, labels)
    xs = _shape(logits)
    n_classes = xs[1]
    if isinstance(labels, np.ndarray) and labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            bad_at = (labels < 0) | (labels >= n_classes)
            if ignore_index is not None:
                bad_at &= labels != ignore_index
            if bad_at.any():
                outside = labels[bad_at]
                low = int(outside.min())
                bad = low if low < 0 else int(outside.max())
                raise ValueError(
                    f"cross_entropy: label {bad} is outside [0, {n_classes}) for logits of "
                    f"shape {xs}"
                    + ("" if ignore_index is None else f" and is not ignore_index ({ignore_index})")
                )
    return labels, n_classes


def mse_loss(pred: Any, target: Any, reduction: str = "mean") -> Any:
    """Mean (or summed, or per-entry) squared error between ``pred`` and ``target``.

    An integer or bool ``target`` (counts, ratings) is promoted with ``pred`` as numpy
    promotes it (``nn.MSELoss`` casts it to ``pred``'s dtype first).

    Raises:
        TypeError: when ``pred`` is not floating point (integers or bools).
        ValueError: when the shapes differ (no silent broadcasting of (N, 1) against (N,)).
    """
    pred, target = as_array(pred, "mse_loss"), as_array(target, "mse_loss")
    _check_mse(pred, target, reduction)
    return _P["mse_loss"](pred, target, reduction=reduction)


def _check_mse(pred: Any, target: Any, reduction: str) -> None:
    _check_reduction("mse_loss", reduction)
    # (an integer target, counts or ratings, is numpy's to promote: nn.MSELoss casts it first)
    _check_floating(pred, "mse_loss", "pred", target)
    dtype = getattr(target, "dtype", None)  # (a tracer's too; a list or a number: none)
    if dtype is None:
        dtype = np.asarray(target).dtype
    if dtype.kind == "c":  # (a complex "loss", and a real gradient of its real part)
        raise TypeError(
            f"mse_loss: target is complex ({dtype}), and {COMPLEX_REFUSED}; for a squared "
            "distance of complex values, give mse_loss their real parts and imaginary parts as "
            "two pairs and add the losses"
        )
    if _shape(pred) != _shape(target):
        raise ValueError(
            f"mse_loss: pred of shape {_shape(pred)} and target of shape {_shape(target)} differ; "
            "reshape one of them (broadcasting here is almost always a bug)"
        )


def ids_on_host(ids: Any) -> bool:
    """Whether integer ``ids`` are read on the host (numpy arrays and scalars), where a range
    check costs no device round trip; GPU ids are guarded on the device instead."""
    return isinstance(ids, np.ndarray | np.generic)


def embedding(weight: Any, ids: Any) -> Any:
    """Rows of ``weight`` (n, d) at integer ``ids`` of any shape: the result is ids.shape + (d,).

    As in torch, a negative id is not counted from the end: every id must be in ``[0, n)``.
    numpy ids are checked on the host. GPU ids are not read back (a round trip to the host on
    every step, which a CUDA graph cannot capture): the row of an id outside ``[0, n)`` comes
    out NaN, so the loss does too (``check_finite=True`` names the layer and the ids), and its
    gradient reaches no row of ``weight``; an integer ``weight`` has no NaN, so its GPU ids are
    checked on the host.

    Raises:
        TypeError: when ids are not integers.
        ValueError: when weight is not 2-D.
        IndexError: when an id is outside [0, n) (numpy ids, arrays or scalars, or GPU ids of
            an integer ``weight``).
    """
    weight, ids = as_array(weight, "embedding"), raw(ids)
    if isinstance(ids, list | tuple):
        ids = as_array(ids, "embedding")
        if ids.size == 0:
            ids = ids.astype(np.intp)  # (numpy makes [] float64: "ids must be integers")
    kind = getattr(getattr(ids, "dtype", None), "kind", None)
    if kind not in ("i", "u"):
        raise TypeError(
            f"embedding: ids must be an integer array, got "
            f"{getattr(ids, 'dtype', type(ids).__name__)}; use ids.astype(np.int64)"
        )
    ws = _shape(weight)
    if len(ws) != 2:
        raise ValueError(f"embedding: weight must have shape (n, d), got {ws}")
    guard = not ids_on_host(ids) and is_floating(getattr(raw(weight), "dtype", None))
    if not guard and ids.size:
        # (a numpy scalar id too: np.int64(-1) read the last row without a word)
        lo, hi = id_range(ids)
        if lo < 0 or hi >= ws[0]:
            raise IndexError(
                f"embedding: id {lo if lo < 0 else hi} is outside [0, {ws[0]}) for a weight of "
                f"shape {ws}"
            )
    return _P["embedding"](weight, ids, guard=guard)


def id_range(ids: Any) -> tuple[int, int]:
    """``(min, max)`` of non-empty integer ``ids`` as Python ints, read in one copy to the host
    for GPU ids."""
    if ids_on_host(ids):
        return int(ids.min()), int(ids.max())
    lo, hi = (int(v) for v in to_numpy(array_namespace(ids).stack([ids.min(), ids.max()])))
    return lo, hi
