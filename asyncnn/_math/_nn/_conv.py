"""Convolutions and pools on channels-first input (NCL, NCHW), with torch's layouts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import _ops_nn as ops_nn
from ._module import (
    Initializer,
    Module,
    Shape,
    check_flags,
    check_ndim,
    check_params,
    fan_in_bound,
    float_input_error,
)

__all__ = [
    "AvgPool1d", "AvgPool2d", "Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d",
]  # fmt: skip


def _ints(owner: str, name: str, value: Any, n: int, minimum: int) -> tuple[int, ...]:
    vals = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(vals, tuple | list)
        or len(vals) != n
        or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in vals)
    ):
        what = "an int" if n == 1 else f"an int or {n} ints"
        raise ValueError(f"{owner}: {name} must be {what} >= {minimum}, got {value!r}")
    return tuple(vals)


def _normalize(obj: Any, n: int, spec: dict[str, int]) -> None:
    """Stores sizes as ints (1-d) or pairs (2-d), so Conv2d(.., 3) == Conv2d(.., (3, 3))."""
    for name, minimum in spec.items():
        value = getattr(obj, name)
        if value is None:
            continue
        vals = _ints(type(obj).__name__, name, value, n, minimum)
        object.__setattr__(obj, name, vals[0] if n == 1 else vals)


def _tup(value: Any, n: int) -> tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


def _check_rank(module: Any, shape: Shape) -> None:
    # (a shape of another rank would fail below with a bare IndexError)
    if len(shape) != module._n + 2:
        layout = "(N, C, L)" if module._n == 1 else "(N, C, H, W)"
        raise ValueError(
            f"{module!r} takes {layout} input, {module._n + 2} dimensions; got the shape "
            f"{tuple(shape)}"
        )


def _out_sizes(
    sizes: Shape, kernel: Any, stride: Any, padding: Any, dilation: Any, n: int
) -> tuple[int, ...]:
    k, s, p, d = (_tup(v, n) for v in (kernel, stride, padding, dilation))
    return tuple((sizes[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(n))


@dataclass(frozen=True)
class _ConvNd(Module):
    in_channels: int
    out_channels: int
    kernel_size: Any
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    bias: bool = True

    _n = 0  # spatial dimensions (a class constant, not a field)

    def __post_init__(self) -> None:
        _ints(type(self).__name__, "in_channels", self.in_channels, 1, 1)
        _ints(type(self).__name__, "out_channels", self.out_channels, 1, 1)
        _normalize(self, self._n, {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1})
        check_flags(self, "bias")

    def _weight_shape(self) -> Shape:
        return (self.out_channels, self.in_channels, *_tup(self.kernel_size, self._n))

    def _expected(self) -> dict[str, Shape]:
        shapes = {"weight": self._weight_shape()}
        if self.bias:
            shapes["bias"] = (self.out_channels,)
        return shapes

    def init_params(self, init: Initializer) -> Any:
        shape = self._weight_shape()
        bound = fan_in_bound(math.prod(shape[1:]))
        params = {"weight": init.uniform(shape, bound)}
        if self.bias:
            params["bias"] = init.uniform((self.out_channels,), bound)
        return params

    def _check_input(self, x: Any) -> Shape:
        layout = "(N, C, L)" if self._n == 1 else "(N, C, H, W)"
        shape = check_ndim(self, x, (self._n + 2,), layout)
        if shape[1] != self.in_channels:
            raise ValueError(
                f"{self!r} got input of shape {shape}: dimension 1 (channels) must be "
                f"{self.in_channels}"
            )
        return shape

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        check_params(self, params, self._expected())
        self._check_input(x)
        if x.dtype.kind in "iub":  # ints, bools: numpy would promote them (int64 to float64)
            raise float_input_error(self, x, params["weight"])
        conv = ops_nn.conv1d if self._n == 1 else ops_nn.conv2d
        return conv(
            x,
            params["weight"],
            params.get("bias"),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        shape = input_shapes[0]
        _check_rank(self, shape)
        sizes = _out_sizes(
            shape[2:], self.kernel_size, self.stride, self.padding, self.dilation, self._n
        )
        return (shape[0], self.out_channels, *sizes)

    def flops(self, *input_shapes: Any) -> int:
        shape = tuple(1 if d is None else int(d) for d in input_shapes[0])
        out = self._output_shape(shape)
        assert out is not None
        per_output = math.prod(self._weight_shape()[1:])
        return 2 * per_output * math.prod(out[1:])


@dataclass(frozen=True)
class Conv1d(_ConvNd):
    """1-D convolution (cross-correlation) on (N, C, L) input, torch's layout and init.

    Params: ``{"weight": (out_channels, in_channels, kernel_size), "bias": (out_channels,)}``,
    both ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = in_channels * kernel_size``.
    Sizes are ints; padding is zeros on both sides.
    """

    _n = 1


@dataclass(frozen=True)
class Conv2d(_ConvNd):
    """2-D convolution (cross-correlation) on NCHW input, torch's layout and init.

    Params: ``{"weight": (out_channels, in_channels, kh, kw), "bias": (out_channels,)}``.
    ``kernel_size``, ``stride``, ``padding`` and ``dilation`` are ints or (height, width) pairs
    (stored as pairs, so ``Conv2d(1, 8, 3) == Conv2d(1, 8, (3, 3))``).
    """

    _n = 2


@dataclass(frozen=True)
class _PoolNd(Module):
    kernel_size: Any
    stride: Any = None
    padding: Any = 0

    _n = 0
    _kind = ""

    def __post_init__(self) -> None:
        _normalize(self, self._n, {"kernel_size": 1, "stride": 1, "padding": 0})

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        layout = "(N, C, L)" if self._n == 1 else "(N, C, H, W)"
        check_ndim(self, x, (self._n + 2,), layout)
        fn = getattr(ops_nn, f"{self._kind}_pool{self._n}d")
        return fn(x, self.kernel_size, stride=self.stride, padding=self.padding)

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        shape = input_shapes[0]
        _check_rank(self, shape)
        stride = self.kernel_size if self.stride is None else self.stride
        sizes = _out_sizes(shape[2:], self.kernel_size, stride, self.padding, 1, self._n)
        return (*shape[:2], *sizes)


@dataclass(frozen=True)
class MaxPool1d(_PoolNd):
    """Max over windows of (N, C, L) input; stride defaults to kernel_size (as torch)."""

    _n = 1
    _kind = "max"


@dataclass(frozen=True)
class MaxPool2d(_PoolNd):
    """Max over windows of NCHW input; sizes are ints or pairs; stride defaults to kernel_size."""

    _n = 2
    _kind = "max"


@dataclass(frozen=True)
class AvgPool1d(_PoolNd):
    """Mean over windows of (N, C, L) input; padded zeros count (torch's default)."""

    _n = 1
    _kind = "avg"


@dataclass(frozen=True)
class AvgPool2d(_PoolNd):
    """Mean over windows of NCHW input; padded zeros count (torch's default)."""

    _n = 2
    _kind = "avg"
