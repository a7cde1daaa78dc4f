"""Layer and group normalization."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import _ops as ops
from .. import _ops_nn as ops_nn
from .._optim_checks import _real
from ._args import as_int, store_sizes
from ._module import Initializer, Module, Shape, check_flags, check_params, float_input_error

__all__ = ["GroupNorm", "LayerNorm"]


def _store_eps(module: Any) -> None:
    """Checks a norm's ``eps`` and stores it as a Python float."""
    # a type first: a string failed comparing ('>' not supported), True was taken as 1
    name = type(module).__name__
    eps = _real(name, "eps", module.eps)
    if not eps > 0:  # written so that NaN fails too
        raise ValueError(f"{name}: eps must be > 0, got {module.eps!r}")
    object.__setattr__(module, "eps", eps)


def _affine_shapes(affine: bool, bias: bool, shape: Shape) -> dict[str, Shape]:
    """A norm's parameters: a ``weight`` of ``shape`` if ``affine``, and a ``bias`` too if
    ``bias``."""
    if not affine:
        return {}
    return {"weight": shape, "bias": shape} if bias else {"weight": shape}


def _affine_params(init: Initializer, shapes: dict[str, Shape]) -> dict[str, Any]:
    """The weight at ones and the bias at zeros, as torch's norms start."""
    return {
        name: (init.ones if name == "weight" else init.zeros)(shape)
        for name, shape in shapes.items()
    }


@dataclass(frozen=True)
class LayerNorm(Module):
    """Normalizes over the trailing ``normalized_shape`` axes, then scales and shifts (as torch).

    Params: ``{"weight": normalized_shape, "bias": normalized_shape}`` (ones and zeros); only
    ``weight`` when ``bias=False``; none when ``elementwise_affine=False``. ``normalized_shape`` is
    an int or a tuple of them (numpy integers too), stored as a tuple of plain ints.
    """

    normalized_shape: Any
    eps: float = 1e-5
    elementwise_affine: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        shape = self.normalized_shape
        one = as_int(shape)  # (a numpy integer too, np.prod(x.shape[1:]); stored as an int)
        dims: list[int | None] = [one] if one is not None else []
        if one is None and isinstance(shape, tuple | list):
            dims = [as_int(d) for d in shape]
        sizes = tuple(d for d in dims if d is not None and d >= 1)
        if not sizes or len(sizes) != len(dims):
            raise ValueError(
                f"LayerNorm: normalized_shape must be an int or a tuple of ints >= 1, got "
                f"{self.normalized_shape!r}"
            )
        object.__setattr__(self, "normalized_shape", sizes)
        check_flags(self, "elementwise_affine", "bias")
        _store_eps(self)

    def _expected(self) -> dict[str, Shape]:
        return _affine_shapes(self.elementwise_affine, self.bias, self.normalized_shape)

    def init_params(self, init: Initializer) -> Any:
        return _affine_params(init, self._expected())

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        check_params(self, params, self._expected())
        shape = tuple(getattr(x, "shape", ()))
        n = len(self.normalized_shape)
        if shape[len(shape) - n :] != self.normalized_shape or len(shape) < n:
            raise ValueError(
                f"{self!r} got input of shape {shape}: its trailing dimensions must be "
                f"{self.normalized_shape}"
            )
        if x.dtype.kind in "iub":  # ints, bools: numpy would promote them (int64 to float64)
            raise float_input_error(self, x, params.get("weight"))
        if self.elementwise_affine:
            return ops_nn.layer_norm(x, params["weight"], params.get("bias"), eps=self.eps)
        # Without a weight the op normalizes the last axis only: merge the normalized axes first.
        flat = ops.reshape(x, (*shape[: len(shape) - n], math.prod(self.normalized_shape)))
        return ops.reshape(ops_nn.layer_norm(flat, eps=self.eps), shape)

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        return input_shapes[0]


@dataclass(frozen=True)
class GroupNorm(Module):
    """Normalizes each sample's channels in ``num_groups`` groups, then scales and shifts each
    channel, as ``torch.nn.GroupNorm``: a normalization without batch statistics (unlike a batch
    norm, the same in training and evaluation) for conv nets.

    Input ``(N, num_channels, *)``; each group of ``num_channels // num_groups`` consecutive
    channels is normalized over its channels and positions with the biased variance. Params:
    ``{"weight": (num_channels,), "bias": (num_channels,)}`` (ones and zeros); only ``weight``
    when ``bias=False``; none when ``affine=False``. ``num_groups=1`` normalizes each sample
    whole (a layer norm over (C, *) with per-channel weights); ``num_groups=num_channels`` each
    channel alone (an instance norm).
    """

    num_groups: int
    num_channels: int
    eps: float = 1e-5
    affine: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        store_sizes(self, "num_groups", "num_channels")
        if self.num_channels % self.num_groups:
            # (torch's words)
            raise ValueError(
                f"GroupNorm: num_channels ({self.num_channels}) must be divisible by num_groups "
                f"({self.num_groups}): each group takes num_channels // num_groups channels"
            )
        check_flags(self, "affine", "bias")
        _store_eps(self)

    def _expected(self) -> dict[str, Shape]:
        return _affine_shapes(self.affine, self.bias, (self.num_channels,))

    def init_params(self, init: Initializer) -> Any:
        return _affine_params(init, self._expected())

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        check_params(self, params, self._expected())
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) < 2 or shape[1] != self.num_channels:
            raise ValueError(
                f"{self!r} got input of shape {shape}: it takes (N, {self.num_channels}, *), a "
                f"batch of {self.num_channels} channels then any spatial axes"
            )
        if x.dtype.kind in "iub":  # ints, bools: numpy would promote them (int64 to float64)
            raise float_input_error(self, x, params.get("weight"))
        return ops_nn.group_norm(
            x, self.num_groups, params.get("weight"), params.get("bias"), eps=self.eps
        )

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        return input_shapes[0]
