"""Parameterless elementwise layers: activations, softmax, Identity.

Those that compute in floating point (Tanh, Sigmoid, GELU, Softmax, LogSoftmax) refuse integer
and bool input, as the layers with parameters do (numpy would promote it: tanh of int64 is
float64, of uint8 float16, in a float32 model); Identity and ReLU are exact on integers and keep
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _ops as ops
from .. import _ops_nn as ops_nn
from ._args import as_int
from ._module import NO_DTYPE, Module, Shape, float_input_error

__all__ = ["GELU", "Identity", "LogSoftmax", "ReLU", "Sigmoid", "Softmax", "Tanh"]


def _plain_dim(module: Any) -> None:
    # a numpy integer axis (x.ndim - 1) kept as a plain int, which a spec can carry; anything
    # else is left as it was, for the op to refuse at the call
    dim = as_int(module.dim)
    if dim is not None:
        object.__setattr__(module, "dim", dim)


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
