"""Parameterless elementwise layers: activations, softmax, Identity.

Those that compute in floating point (Tanh, Sigmoid, GELU, LeakyReLU, ELU, SiLU, Softplus,
Softmax, LogSoftmax) refuse integer and bool input, as the layers with parameters do (numpy would
promote it: tanh of int64 is float64, of uint8 float16, in a float32 model); Identity, ReLU and
Hardtanh are exact on integers and keep them (as torch's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _ops as ops
from .. import _ops_act as ops_act
from .. import _ops_nn as ops_nn
from ._args import as_int
from ._module import NO_DTYPE, Module, Shape, float_input_error

__all__ = [
    "ELU", "GELU", "Hardtanh", "Identity", "LeakyReLU", "LogSoftmax", "ReLU", "SiLU", "Sigmoid",
    "Softmax", "Softplus", "Tanh",
]  # fmt: skip


def _plain_dim(module: Any) -> None:
    # a numpy integer axis (x.ndim - 1) kept as a plain int, which a spec can carry; anything
    # else is left as it was, for the op to refuse at the call
    dim = as_int(module.dim)
    if dim is not None:
        object.__setattr__(module, "dim", dim)


def _plain_float(module: Any, name: str) -> None:
    """Keeps the field ``name`` of ``module`` as a Python float (a numpy scalar or an int made
    one, which a spec carries and which keeps a float32 input float32).

    Raises:
        TypeError: when the field is no real number (a bool, a string, None), naming the module.
        ValueError: when it is NaN.
    """
    value = getattr(module, name)
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise TypeError(
            f"{type(module).__name__}: {name} must be a number, got {type(value).__name__} "
            f"{value!r:.60}"
        )
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{type(module).__name__}: {name} is NaN; give a number")
    object.__setattr__(module, name, value)


@dataclass(frozen=True)
class _Elementwise(Module):
    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        return input_shapes[0]


@dataclass(frozen=True)
class Identity(_Elementwise):
    """Returns its input unchanged."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return x


@dataclass(frozen=True)
class ReLU(_Elementwise):
    """``max(x, 0)``."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.relu(x)


@dataclass(frozen=True)
class Tanh(_Elementwise):
    """Hyperbolic tangent."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if getattr(x, "dtype", NO_DTYPE).kind in "iub":  # numpy would promote ints, bools
            raise float_input_error(self, x)
        return ops.tanh(x)


@dataclass(frozen=True)
class Sigmoid(_Elementwise):
    """The logistic function ``1 / (1 + exp(-x))``."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if getattr(x, "dtype", NO_DTYPE).kind in "iub":  # numpy would promote ints, bools
            raise float_input_error(self, x)
        return ops.sigmoid(x)


@dataclass(frozen=True)
class GELU(_Elementwise):
    """GELU ``x * Phi(x)``; ``approximate="tanh"`` uses the tanh approximation (as torch)."""

    approximate: str = "none"

    def __post_init__(self) -> None:
        if self.approximate not in ("none", "tanh"):
            raise ValueError(
                f"GELU: approximate must be 'none' or 'tanh', got {self.approximate!r}"
            )

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if getattr(x, "dtype", NO_DTYPE).kind in "iub":  # numpy would promote ints, bools
            raise float_input_error(self, x)
        return ops.gelu(x, approximate=self.approximate)


@dataclass(frozen=True)
class LeakyReLU(_Elementwise):
    """``x`` where ``x > 0``, else ``negative_slope * x`` (torch's ``nn.LeakyReLU``)."""

    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        _plain_float(self, "negative_slope")

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if getattr(x, "dtype", NO_DTYPE).kind in "iub":  # numpy would promote ints, bools
            raise float_input_error(self, x)
        return ops_act.leaky_relu(x, self.negative_slope)


@dataclass(frozen=True)
class ELU(_Elementwise):
    """``x`` where ``x > 0``, else ``alpha * (exp(x) - 1)`` (torch's ``nn.ELU``)."""

    alpha: float = 1.0

    def __post_init__(self) -> None:
        _plain_float(self, "alpha")

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if getattr(x, "dtype", NO_DTYPE).kind in "iub":  # numpy would promote ints, bools
            raise float_input_error(self, x)
        return ops_act.elu(x, self.alpha)


@dataclass(frozen=True)
class SiLU(_Elementwise):
    """SiLU (swish), ``x * sigmoid(x)`` (torch's ``nn.SiLU``)."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if getattr(x, "dtype", NO_DTYPE).kind in "iub":  # numpy would promote ints, bools
            raise float_input_error(self, x)
        return ops_act.silu(x)


@dataclass(frozen=True)
class Softplus(_Elementwise):
    """``log(1 + exp(beta * x)) / beta``, and ``x`` where ``beta * x > threshold`` (torch's
    ``nn.Softplus``)."""

    beta: float = 1.0
    threshold: float = 20.0

    def __post_init__(self) -> None:
        _plain_float(self, "beta")
        _plain_float(self, "threshold")

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if getattr(x, "dtype", NO_DTYPE).kind in "iub":  # numpy would promote ints, bools
            raise float_input_error(self, x)
        return ops_act.softplus(x, self.beta, self.threshold)


@dataclass(frozen=True)
class Hardtanh(_Elementwise):
    """``x`` limited to ``[min_val, max_val]`` (torch's ``nn.Hardtanh``): :func:`ops.clip`'s
    values, with torch's hardtanh gradient, 0 at the bounds themselves (clip's passes the
    cotangent there). Integers stay integers, as in torch."""

    min_val: float = -1.0
    max_val: float = 1.0

    def __post_init__(self) -> None:
        _plain_float(self, "min_val")
        _plain_float(self, "max_val")
        if self.min_val >= self.max_val:  # (torch's nn.Hardtanh refuses it too)
            raise ValueError(
                f"Hardtanh: min_val ({self.min_val}) must be less than max_val ({self.max_val})"
            )

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops_act.hardtanh(x, self.min_val, self.max_val)


@dataclass(frozen=True)
class Softmax(_Elementwise):
    """Softmax along ``dim``."""

    dim: int = -1

    def __post_init__(self) -> None:
        _plain_dim(self)

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if getattr(x, "dtype", NO_DTYPE).kind in "iub":  # (the op refuses them, less clearly)
            raise float_input_error(self, x)
        return ops_nn.softmax(x, axis=self.dim)


@dataclass(frozen=True)
class LogSoftmax(_Elementwise):
    """Log-softmax along ``dim``."""

    dim: int = -1

    def __post_init__(self) -> None:
        _plain_dim(self)

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if getattr(x, "dtype", NO_DTYPE).kind in "iub":  # (the op refuses them, less clearly)
            raise float_input_error(self, x)
        return ops_nn.log_softmax(x, axis=self.dim)
