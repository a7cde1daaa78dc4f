"""Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019) on the :class:`Optimizer` base:
torch's update, step count and bias corrections, with the decoupled weight decay of AdamW."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._optim import Optimizer
from ._optim_checks import (
    _check_clip_norm,
    _non_negative,
    _real,
)
from ._optim_leaf import (
    BuiltinLeafUpdate,
    _fresh,
    _many_kernels,
    _numpy_many,
    _with_decay,
)
from ._schedules import (
    Schedule,
    check_lr,
)

__all__ = ["Adam", "AdamW"]

_FLOAT32 = np.dtype(np.float32)


def _check_adam(owner: str, opt: Adam) -> None:
    object.__setattr__(opt, "lr", check_lr(owner, opt.lr))
    object.__setattr__(opt, "eps", _non_negative(owner, "eps", opt.eps))
    betas = opt.betas
    if isinstance(betas, np.ndarray) and betas.shape == (2,):
        betas = tuple(betas.tolist())  # (a numpy pair, as a config loader may give it)
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise TypeError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
    checked = []
    for i, beta in enumerate(betas):
        b = _real(owner, f"betas[{i}]", beta)
        if not 0.0 <= b < 1.0:
            raise ValueError(
                f"{owner}: invalid beta parameter at index {i}: {beta!r}; it must lie in [0, 1)"
            )
        checked.append(b)
    object.__setattr__(opt, "betas", (checked[0], checked[1]))
    object.__setattr__(opt, "weight_decay", _non_negative(owner, "weight_decay", opt.weight_decay))
    if not isinstance(opt.amsgrad, bool):
        raise TypeError(f"{owner}: amsgrad must be a bool, got {opt.amsgrad!r}")
    object.__setattr__(opt, "clip_norm", _check_clip_norm(owner, opt.clip_norm))


@dataclass(frozen=True)
class Adam(BuiltinLeafUpdate, Optimizer):
    """Adam, as torch.optim.Adam (weight decay added to the gradient, as an L2 penalty).

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2`` (``v_max = max(v_max, v)`` with
    amsgrad), ``p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    With float16 parameters the moments (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) are
    float32, as AMP, apex and DeepSpeed keep them: ``(1 - b2) g^2`` underflows float16 for
    ``|g|`` below about 5e-3, the usual gradient size, and a second moment stored as 0 made the
    next step with a small or no gradient (an embedding row not in the batch) ``lr * m / eps``,
    up to ``1e5 * lr``, finite, so no ``check_finite`` saw it (torch's float16 Adam gives -inf
    there). The update computes in float32 and rounds the parameter to float16 once. A state
    with float16 moments (made by an asyncnn before, or cast to a float16 run's dtype) is taken
    too, and the moments are float32 from its update on. bfloat16, whose range is float32's,
    keeps bfloat16 moments, as torch does; other dtypes keep their own.

    Args:
        lr: learning rate, a float or a :class:`Schedule`.
        betas: decay rates of the first and second moment estimates, each in ``[0, 1)``.
        eps: added to the denominator, after the square root.
        weight_decay: L2 penalty added to the gradient.
        amsgrad: use the running maximum of the second moment (AMSGrad).
        clip_norm: if set, gradients are clipped to this global norm before the update: the
            norm of the whole tree ``update`` is given, which in a run is one layer's (each
            layer actor updates its own parameters), not the model's.
    """

    lr: float | Schedule = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    clip_norm: float | None = None

    #: AdamW sets this: weight decay applied to the parameter, not added to the gradient
    _decoupled = False
    elementwise_update = True

    def __post_init__(self) -> None:
        _check_adam(type(self).__name__, self)

    def buffer_names(self) -> tuple[str, ...]:
        names = ("exp_avg", "exp_avg_sq")
        return (*names, "max_exp_avg_sq") if self.amsgrad else names

    def _state_dtype(self, dtype: Any) -> Any:
        # float16 (kind "f", 2 bytes; bfloat16 is kind "V", and has float32's range): its
        # (1 - beta2) * g**2 underflows to 0 for |g| < ~5e-3, and the next step then divides by
        # eps; AMP, apex and DeepSpeed keep these moments in float32 too
        if dtype.kind == "f" and dtype.itemsize == 2:
            return _FLOAT32
        return dtype

    def _update_many(
        self, ps: list[Any], gs: list[Any], buffers: list[list[Any]], step: int, lr: float
    ) -> tuple[list[Any], list[list[Any]]] | None:
        fused = _many_kernels(self, Adam, ps)
        if fused is None:
            return _numpy_many(self, Adam, ps, gs, buffers, step, lr)
        return fused.adam_many(
            ps, gs, buffers, step, lr, self.betas, self.eps, self.weight_decay, self.amsgrad,
            self._decoupled,
        )  # fmt: skip

    def _fused_leaf(
        self, fused: Any, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        return fused.adam_leaf(
            p,
            g,
            buffers,
            step,
            lr,
            self.betas,
            self.eps,
            self.weight_decay,
            self.amsgrad,
            self._decoupled,
        )

    def _update_array(
        self, xp: Any, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        """:meth:`update_leaf`'s arithmetic on one float32 or float64 leaf of ``xp``."""
        beta1, beta2 = self.betas
        t = step + 1
        decay = 1.0
        if self._decoupled:
            decay = 1.0 - lr * self.weight_decay
        else:
            g = _with_decay(xp, p, g, self.weight_decay)
        scratch = _fresh(xp, xp.multiply, g, 1.0 - beta1)
        exp_avg = _fresh(xp, xp.multiply, buffers[0], beta1)
        exp_avg += scratch
        xp.multiply(g, g, out=scratch)
        scratch *= 1.0 - beta2
        exp_avg_sq = _fresh(xp, xp.multiply, buffers[1], beta2)
        exp_avg_sq += scratch
        new_buffers: tuple[Any, ...] = (exp_avg, exp_avg_sq)
        second = exp_avg_sq
        if self.amsgrad:
            second = _fresh(xp, xp.maximum, buffers[2], exp_avg_sq)
            new_buffers = (exp_avg, exp_avg_sq, second)
        step_size = lr / (1.0 - beta1**t)
        denom = xp.sqrt(second, out=scratch)
        denom /= math.sqrt(1.0 - beta2**t)
        denom += self.eps
        delta = xp.divide(exp_avg, denom, out=denom)
        delta *= -step_size
        if decay != 1.0:
            # AdamW: p * (1 - lr * wd) first, then the Adam step, as torch does
            new = _fresh(xp, xp.multiply, p, decay)
            new += delta
            return new, new_buffers
        delta += p
        return delta, new_buffers


@dataclass(frozen=True)
class AdamW(Adam):
    """AdamW, as torch.optim.AdamW: Adam with decoupled weight decay.

    Each update first multiplies the parameters by ``1 - lr * weight_decay``, then applies the
    Adam step computed from the raw gradient. As :class:`Adam`, it keeps the moments of float16
    parameters in float32.

    Args:
        lr: learning rate, a float or a :class:`Schedule`.
        betas: decay rates of the first and second moment estimates, each in ``[0, 1)``.
        eps: added to the denominator, after the square root.
        weight_decay: decoupled weight decay coefficient.
        amsgrad: use the running maximum of the second moment (AMSGrad).
        clip_norm: if set, gradients are clipped to this global norm before the update: the
            norm of the whole tree ``update`` is given, which in a run is one layer's (each
            layer actor updates its own parameters), not the model's.
    """

    weight_decay: float = 1e-2
    _decoupled = True
