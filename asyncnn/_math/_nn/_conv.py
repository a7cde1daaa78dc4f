"""Convolutions and pools on channels-first input (NCL, NCHW), with torch's layouts."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from .. import _ops as ops
from .. import _ops_nn as ops_nn
from .. import _ops_pool as ops_pool
from .._ops_pool import check_divisor_override
from .._rules_nn import out_size
from ._args import as_int, store_sizes
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
    "AvgPool1d", "AvgPool2d", "Conv1d", "Conv2d", "MaxPool1d", "MaxPool2d", "MaxUnpool1d",
    "MaxUnpool2d",
]  # fmt: skip


def _ints(owner: str, name: str, value: Any, n: int, minimum: int) -> tuple[int, ...]:
    """``value`` (an int, or ``n`` of them) as ``n`` plain ints (numpy integers taken)."""
    one = as_int(value)
    if one is not None:
        vals: tuple[int | None, ...] = (one,) * n
    elif isinstance(value, tuple | list) and len(value) == n:
        vals = tuple(as_int(v) for v in value)
    else:
        vals = (None,)
    ints = tuple(v for v in vals if v is not None and v >= minimum)
    if len(ints) != n:
        what = "an int" if n == 1 else f"an int or {n} ints"
        raise ValueError(f"{owner}: {name} must be {what} >= {minimum}, got {value!r}")
    return ints


def _normalize(obj: Any, n: int, spec: dict[str, int]) -> None:
    """Stores sizes as plain ints (1-d) or pairs (2-d), so Conv2d(.., 3) == Conv2d(.., (3, 3))
    == Conv2d(.., np.int64(3))."""
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
    groups: int = 1

    _n = 0  # spatial dimensions (a class constant, not a field)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        store_sizes(self, "in_channels", "out_channels", "groups")
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % self.groups:
                raise ValueError(
                    f"{owner}: {name} {getattr(self, name)} is not divisible by groups "
                    f"{self.groups}: each of the groups convolves in_channels / groups input "
                    "channels into out_channels / groups outputs; give groups that divides "
                    f"both in_channels ({self.in_channels}) and out_channels "
                    f"({self.out_channels}) (groups=in_channels is a depthwise convolution)"
                )
        _normalize(self, self._n, {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1})
        check_flags(self, "bias")

    def _weight_shape(self) -> Shape:
        # torch's (out, in / groups, *kernel): each output channel sees its group's inputs only
        return (
            self.out_channels,
            self.in_channels // self.groups,
            *_tup(self.kernel_size, self._n),
        )

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
        if self.groups != 1:
            return self._grouped(params, x)
        conv = ops_nn.conv1d if self._n == 1 else ops_nn.conv2d
        return conv(
            x,
            params["weight"],
            params.get("bias"),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )

    def _grouped(self, params: Any, x: Any) -> Any:
        """A grouped convolution as one batched matrix product over the groups.

        The conv primitive takes no groups, and a loop of one conv per channel slice would make
        the backward quadratic in the groups (each slice's gradient is a zero array of the
        whole input's size). Here the input's windows are gathered once, per kernel offset
        (strided slices of the zero-padded input, as the primitive's own im2col), laid out
        ``(N, groups, in/groups * K, positions)``, and multiplied by the weight seen as
        ``(groups, out/groups, in/groups * K)``.
        """
        n = self._n
        sizes = (self.kernel_size, self.stride, self.padding, self.dilation)
        k, s, p, d = (_tup(v, n) for v in sizes)
        shape = tuple(ops.raw(x).shape)
        out = _out_sizes(shape[2:], k, s, p, d, n)
        if min(out) < 1:  # (the message the conv primitive gives for groups=1)
            raise ValueError(
                f"{self!r}: the kernel {k} (dilation {d}) is larger than the padded input: "
                f"input {shape} with padding {p}; use a smaller kernel or more padding"
            )
        xp, dtype = ops.namespace_of(x), ops.raw(x).dtype
        for axis, pad in enumerate(p, start=2):  # zeros on both sides, as the primitive's
            if pad:
                edge = list(ops.raw(x).shape)
                edge[axis] = pad
                zeros = xp.zeros(tuple(edge), dtype=dtype)
                x = ops.concatenate([zeros, x, zeros], axis=axis)
        windows = [
            ops.getitem(
                x,
                (slice(None), slice(None))
                + tuple(
                    slice(o * di, o * di + si * (m - 1) + 1, si)
                    for o, di, si, m in zip(offset, d, s, out, strict=True)
                ),
            )
            for offset in itertools.product(*(range(ki) for ki in k))
        ]
        g = self.groups
        batch, taps, positions = shape[0], math.prod(k), math.prod(out)
        cols = ops.reshape(
            ops.stack(windows, axis=2),  # (N, C, K, *out): C = group * in/g + channel
            (batch, g, self.in_channels // g * taps, positions),
        )
        w = ops.reshape(params["weight"], (g, self.out_channels // g, self.in_channels // g * taps))
        y = ops.reshape(ops.matmul(w, cols), (batch, self.out_channels, *out))
        if self.bias:
            y = ops.add(y, ops.reshape(params["bias"], (self.out_channels,) + (1,) * n))
        return y

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

    Params: ``{"weight": (out_channels, in_channels // groups, kernel_size),
    "bias": (out_channels,)}``, both ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
    ``fan_in = in_channels // groups * kernel_size``. Sizes are ints (a numpy integer is
    stored as a plain int); padding is zeros on both sides.

    Attributes:
        groups: as torch's: the channels split into ``groups`` blocks, and output block ``i``
            (``out_channels // groups`` channels) convolves input block ``i`` only;
            ``groups=in_channels`` is a depthwise convolution. Both channel counts must be
            divisible by it. Given after ``bias`` (so a positional ``bias`` keeps its place):
            pass it by name, ``Conv1d(8, 8, 3, groups=8)``.
    """

    _n = 1


@dataclass(frozen=True)
class Conv2d(_ConvNd):
    """2-D convolution (cross-correlation) on NCHW input, torch's layout and init.

    Params: ``{"weight": (out_channels, in_channels // groups, kh, kw),
    "bias": (out_channels,)}``, both ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with
    ``fan_in = in_channels // groups * kh * kw``. ``kernel_size``, ``stride``, ``padding`` and
    ``dilation`` are ints or (height, width) pairs (stored as pairs of plain ints, so
    ``Conv2d(1, 8, 3) == Conv2d(1, 8, (3, 3)) == Conv2d(1, 8, np.int64(3))``).

    Attributes:
        groups: as torch's: the channels split into ``groups`` blocks, and output block ``i``
            (``out_channels // groups`` channels) convolves input block ``i`` only;
            ``groups=in_channels`` is a depthwise convolution (MobileNet's). Both channel
            counts must be divisible by it. Given after ``bias`` (so a positional ``bias``
            keeps its place): pass it by name, ``Conv2d(32, 32, 3, padding=1, groups=32)``.
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

    def _options(self) -> dict[str, Any]:
        """The kind's own arguments of its op (``dilation``, ``ceil_mode``, ...)."""
        return {}

    def _check_input(self, x: Any) -> None:
        layout = "(N, C, L)" if self._n == 1 else "(N, C, H, W)"
        check_ndim(self, x, (self._n + 2,), layout)

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        self._check_input(x)
        fn = getattr(ops_pool, f"{self._kind}_pool{self._n}d")
        return fn(x, self.kernel_size, stride=self.stride, padding=self.padding, **self._options())

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        shape = input_shapes[0]
        _check_rank(self, shape)
        n, options = self._n, self._options()
        k, p = _tup(self.kernel_size, n), _tup(self.padding, n)
        s = k if self.stride is None else _tup(self.stride, n)
        d = _tup(options.get("dilation", 1), n)
        ceil = options.get("ceil_mode", False)
        sizes = (out_size(shape[2 + i], k[i], s[i], p[i], d[i], ceil) for i in range(n))
        return (*shape[:2], *sizes)


@dataclass(frozen=True)
class _MaxPoolNd(_PoolNd):
    dilation: Any = 1
    # torch's order: (kernel_size, stride, padding, dilation, return_indices, ceil_mode)
    return_indices: bool = False
    ceil_mode: bool = False

    _kind = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        _normalize(self, self._n, {"dilation": 1})
        check_flags(self, "return_indices", "ceil_mode")

    def _options(self) -> dict[str, Any]:
        options = {"dilation": self.dilation, "ceil_mode": self.ceil_mode}
        if self.return_indices:  # (left out when False: the op's arguments as before it)
            options["return_indices"] = True
        return options

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        if self.return_indices:
            # (a graph's layer, and a Sequential's module before another, passes on one array)
            raise ValueError(
                f"{self!r} returns (values, indices), two arrays, where one is passed on: a "
                "graph's layer gives one array, and so does a module inside nn.Sequential; use "
                "return_indices=False there, and return_indices=True where you call the pool "
                "yourself and pass the indices to nn.MaxUnpool on"
            )
        return super()._output_shape(*input_shapes)


@dataclass(frozen=True)
class MaxPool1d(_MaxPoolNd):
    """Max over windows of (N, C, L) input, as torch's ``MaxPool1d``; stride defaults to
    kernel_size.

    Attributes:
        dilation: the step between a window's cells (torch's default 1: adjacent).
        return_indices: return ``(values, indices)``, as torch's: the indices (int64, the
            values' shape, no gradient) of the entries taken, for :class:`MaxUnpool1d` (see
            :func:`asyncnn.ops.max_pool1d`). A call only: a graph's layer gives one array.
        ceil_mode: round the number of windows up (torch's rule: a last window that starts
            inside the input or its left padding and runs past the end is kept, and takes the
            maximum of the cells it covers).
    """

    _n = 1


@dataclass(frozen=True)
class MaxPool2d(_MaxPoolNd):
    """Max over windows of NCHW input, as torch's ``MaxPool2d``; sizes are ints or (height,
    width) pairs; stride defaults to kernel_size; ``dilation``, ``return_indices`` (flat
    indices in the input's plane, ``h * W + w``, for :class:`MaxUnpool2d`) and ``ceil_mode``
    are :class:`MaxPool1d`'s, along each axis, in torch's order."""

    _n = 2


@dataclass(frozen=True)
class _MaxUnpoolNd(_PoolNd):
    # (a pool's kernel_size, stride and padding, normalized as a pool's: those of the pool
    # whose indices it takes)

    def __call__(  # type: ignore[override]
        self, params: Any, x: Any, indices: Any, output_size: Any = None, *, rng: Any = None
    ) -> Any:
        self._check_input(x)
        fn = getattr(ops_pool, f"max_unpool{self._n}d")
        return fn(x, indices, self.kernel_size, self.stride, self.padding, output_size)

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        shape = input_shapes[0]
        _check_rank(self, shape)
        op = f"{type(self).__name__}"
        plane = ops_pool.unpool_size(op, tuple(shape), self.kernel_size, self.stride, self.padding)
        return (*shape[:2], *plane)


@dataclass(frozen=True)
class MaxUnpool1d(_MaxUnpoolNd):
    """The partial inverse of :class:`MaxPool1d`, as torch's ``MaxUnpool1d``: called as
    ``unpool(params, x, indices, output_size=None)`` with the values and indices of
    ``MaxPool1d(..., return_indices=True)`` (its ``kernel_size``, ``stride`` and ``padding``
    here), it writes each value at its index into zeros of the pool's input length; no
    parameters. See :func:`asyncnn.ops.max_unpool1d` (gradients, repeated indices,
    ``output_size``). In a graph, a layer of two inputs: ``g.layer(name, unpool, x,
    indices)``, the indices an integer input."""

    _n = 1


@dataclass(frozen=True)
class MaxUnpool2d(_MaxUnpoolNd):
    """The partial inverse of :class:`MaxPool2d`, as torch's ``MaxUnpool2d``: sizes are ints
    or (height, width) pairs, the indices flat in the output plane, ``output_size`` ``(H, W)``
    or ``(N, C, H, W)``; otherwise :class:`MaxUnpool1d`'s."""

    _n = 2


@dataclass(frozen=True)
class _AvgPoolNd(_PoolNd):
    ceil_mode: bool = False
    count_include_pad: bool = True

    _kind = "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_flags(self, "ceil_mode", "count_include_pad")

    def _options(self) -> dict[str, Any]:
        return {"ceil_mode": self.ceil_mode, "count_include_pad": self.count_include_pad}


@dataclass(frozen=True)
class AvgPool1d(_AvgPoolNd):
    """Mean over windows of (N, C, L) input, as torch's ``AvgPool1d``; stride defaults to
    kernel_size.

    Attributes:
        ceil_mode: round the number of windows up (torch's rule: a last window that starts
            inside the input or its left padding and runs past the end is kept).
        count_include_pad: divide by the window's cells in the input and its padding (torch's
            default; a ceil-mode window's cells past the padding do not count); ``False``
            divides by its cells of the input only.
    """

    _n = 1


@dataclass(frozen=True)
class AvgPool2d(_AvgPoolNd):
    """Mean over windows of NCHW input, as torch's ``AvgPool2d``; sizes are ints or (height,
    width) pairs; stride defaults to kernel_size; ``ceil_mode`` and ``count_include_pad`` are
    :class:`AvgPool1d`'s, along each axis.

    Attributes:
        divisor_override: divide every window's sum by this int in place of its count of
            cells (torch's rule: ``ceil_mode``'s last windows and padded ones too, so
            ``count_include_pad`` changes nothing; a negative one is taken, 0 refused);
            ``None``, the default, divides by the count. Given by name only (torch's last
            argument): ``AvgPool2d(2, divisor_override=1)`` sums each window. torch's
            ``AvgPool1d`` has none, nor has :class:`AvgPool1d`.
    """

    # (by name only, as ceil_mode of the max pools: after the two flags, a sixth positional
    # argument is easy to misread)
    divisor_override: int | None = field(default=None, kw_only=True)

    _n = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        divisor = check_divisor_override(type(self).__name__, self.divisor_override)
        object.__setattr__(self, "divisor_override", divisor)

    def _options(self) -> dict[str, Any]:
        options = super()._options()
        if self.divisor_override is not None:
            options["divisor_override"] = self.divisor_override
        return options
