"""RMSprop (Hinton's lecture 6e; Graves 2013 for the centered form) and Adagrad (Duchi et al.
2011) on the :class:`Optimizer` base: torch's updates, defaults and state buffers' names.

Neither has a fused kernel: their array code runs on numpy's and cupy's arrays alike, and a GPU
run updates them eagerly, outside the CUDA graphs it captures (``_capture_update`` captures the
built-in SGD, Adam and AdamW only). The buffers of a float16 parameter are float32, as Adam's
moments are: a square of a float16 gradient underflows to 0 for ``|g|`` below about 2.4e-4, and
a running average or sum of squares stored as 0 makes the next step divide by ``eps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._optim import Optimizer
from ._optim_checks import _check_clip_norm, _non_negative
from ._optim_leaf import BuiltinLeafUpdate, _fresh, _numpy_many, _with_decay
from ._schedules import Schedule, check_lr

__all__ = ["Adagrad", "RMSprop"]

_FLOAT32 = np.dtype(np.float32)


def _float32_for_float16(dtype: Any) -> Any:
    """The dtype the buffers of a parameter of ``dtype`` are kept in: float32 for float16 (kind
    "f", 2 bytes; bfloat16, kind "V", has float32's range and keeps its own), else ``dtype``."""
    if dtype.kind == "f" and dtype.itemsize == 2:
        return _FLOAT32
    return dtype


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class RMSprop(BuiltinLeafUpdate, Optimizer):
    """RMSprop, as torch.optim.RMSprop (with torch's defaults).

    With ``g = g + weight_decay * p``: ``v = alpha v + (1 - alpha) g^2`` (``"square_avg"``);
    centered, ``a = a + (1 - alpha) (g - a)`` (``"grad_avg"``, torch's ``lerp``) and
    ``d = sqrt(v - a^2) + eps``, else ``d = sqrt(v) + eps``; with momentum
    ``b = momentum b + g / d`` (``"momentum_buffer"``, starting at 0) and ``p = p - lr b``,
    else ``p = p - lr g / d``. The buffers of a float16 parameter are float32 (see the module).

    Args:
        lr: learning rate, a float or a :class:`Schedule`.
        alpha: smoothing constant of the squared gradients' average, in ``[0, 1]``.
        eps: added to the denominator, after the square root.
        weight_decay: L2 penalty added to the gradient.
        momentum: momentum factor (0 for none).
        centered: divide by the gradient's estimated variance (``v - a^2``) rather than its
            second moment.
        clip_norm: if set, gradients are clipped to this global norm before the update: the
            norm of the whole tree ``update`` is given, which in a run is one layer's (each
            layer actor updates its own parameters), not the model's.
    """

    lr: float | Schedule = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    clip_norm: float | None = None
    elementwise_update = True
    _fused_update = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "lr", check_lr(owner, self.lr))
        alpha = _non_negative(owner, "alpha", self.alpha)
        if alpha > 1.0:
            # torch takes it, and its (1 - alpha) g^2 < 0 turns the average negative: NaN steps
            raise ValueError(
                f"{owner}: invalid alpha value {self.alpha!r}: it must lie in [0, 1] (the "
                "weight of the past squared gradients; torch's default is 0.99)"
            )
        object.__setattr__(self, "alpha", alpha)
        for name in ("eps", "weight_decay", "momentum"):
            object.__setattr__(self, name, _non_negative(owner, name, getattr(self, name)))
        _check_bool(owner, "centered", self.centered)
        object.__setattr__(self, "clip_norm", _check_clip_norm(owner, self.clip_norm))

    def buffer_names(self) -> tuple[str, ...]:
        names: tuple[str, ...] = ("square_avg",)
        if self.momentum > 0.0:
            names += ("momentum_buffer",)
        return (*names, "grad_avg") if self.centered else names

    def _state_dtype(self, dtype: Any) -> Any:
        return _float32_for_float16(dtype)

    def _update_many(
        self, ps: list[Any], gs: list[Any], buffers: list[list[Any]], step: int, lr: float
    ) -> tuple[list[Any], list[list[Any]]] | None:
        return _numpy_many(self, RMSprop, ps, gs, buffers, step, lr)

    def _update_array(
        self, xp: Any, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        """:meth:`update_leaf`'s arithmetic on one float32 or float64 leaf of ``xp``."""
        alpha = self.alpha
        g = _with_decay(xp, p, g, self.weight_decay)
        scratch = _fresh(xp, xp.multiply, g, g)
        scratch *= 1.0 - alpha
        square_avg = _fresh(xp, xp.multiply, buffers[0], alpha)
        square_avg += scratch
        new_buffers: tuple[Any, ...] = (square_avg,)
        if self.centered:
            grad_avg = _fresh(xp, xp.subtract, g, buffers[-1])
            grad_avg *= 1.0 - alpha
            grad_avg += buffers[-1]
            xp.multiply(grad_avg, grad_avg, out=scratch)
            xp.subtract(square_avg, scratch, out=scratch)
            xp.sqrt(scratch, out=scratch)
        else:
            xp.sqrt(square_avg, out=scratch)
        scratch += self.eps
        xp.divide(g, scratch, out=scratch)  # g / d
        if self.momentum > 0.0:
            buf = _fresh(xp, xp.multiply, buffers[1], self.momentum)
            buf += scratch
            new_buffers += (buf,)
            xp.multiply(buf, -lr, out=scratch)
        else:
            scratch *= -lr
        scratch += p
        if self.centered:
            new_buffers += (grad_avg,)
        return scratch, new_buffers


@dataclass(frozen=True)
class Adagrad(BuiltinLeafUpdate, Optimizer):
    """Adagrad, as torch.optim.Adagrad (with torch's defaults).

    With ``g = g + weight_decay * p``, at the update after ``step`` updates (the state's
    ``"step"``, which torch keeps per parameter): ``s = s + g^2`` (``"sum"``, starting at
    ``initial_accumulator_value``) and ``p = p - lr / (1 + step * lr_decay) * g / (sqrt(s) +
    eps)``. The sum of a float16 parameter is float32 (see the module).

    Args:
        lr: learning rate, a float or a :class:`Schedule` (``lr_decay`` divides what it gives).
        lr_decay: the learning rate's decay: the update after ``step`` updates takes
            ``lr / (1 + step * lr_decay)``.
        weight_decay: L2 penalty added to the gradient.
        initial_accumulator_value: the value the sum of squared gradients starts at.
        eps: added to the denominator, after the square root.
        clip_norm: if set, gradients are clipped to this global norm before the update: the
            norm of the whole tree ``update`` is given, which in a run is one layer's (each
            layer actor updates its own parameters), not the model's.
    """

    lr: float | Schedule = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    clip_norm: float | None = None
    elementwise_update = True
    _fused_update = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "lr", check_lr(owner, self.lr))
        for name in ("lr_decay", "weight_decay", "initial_accumulator_value", "eps"):
            object.__setattr__(self, name, _non_negative(owner, name, getattr(self, name)))
        object.__setattr__(self, "clip_norm", _check_clip_norm(owner, self.clip_norm))

    def buffer_names(self) -> tuple[str, ...]:
        return ("sum",)

    def _buffer_start(self, name: str) -> float:
        return self.initial_accumulator_value

    def _state_dtype(self, dtype: Any) -> Any:
        return _float32_for_float16(dtype)

    def _update_many(
        self, ps: list[Any], gs: list[Any], buffers: list[list[Any]], step: int, lr: float
    ) -> tuple[list[Any], list[list[Any]]] | None:
        return _numpy_many(self, Adagrad, ps, gs, buffers, step, lr)

    def _update_array(
        self, xp: Any, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        """:meth:`update_leaf`'s arithmetic on one float32 or float64 leaf of ``xp``."""
        g = _with_decay(xp, p, g, self.weight_decay)
        # (torch counts its step from 1 and divides by 1 + (step - 1) * lr_decay)
        clr = lr / (1.0 + step * self.lr_decay)
        scratch = _fresh(xp, xp.multiply, g, g)
        total = _fresh(xp, xp.add, buffers[0], scratch)
        xp.sqrt(total, out=scratch)
        scratch += self.eps
        xp.divide(g, scratch, out=scratch)
        scratch *= -clr
        scratch += p
        return scratch, (total,)
