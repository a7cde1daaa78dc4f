"""The pools: max and average pooling over one or two spatial axes (with torch's
``return_indices``, ``ceil_mode``, ``count_include_pad`` and ``divisor_override``) and the max
unpools, their partial inverses. Each function checks its arguments before any compute, as
:mod:`._ops_nn`'s do, whose window checks it shares."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ._autodiff import Primitive
from ._ops import PRIMITIVES, as_array, raw
from ._ops import check_floating as _check_floating
from ._ops_nn import IntOrTuple, _check_fits, _check_input, _shape, _tuple, id_range
from ._rules_nn import max_pool_indices

__all__ = [
    "avg_pool1d", "avg_pool2d", "check_divisor_override", "max_pool1d", "max_pool2d",
    "max_unpool1d", "max_unpool2d", "unpool_size",
]  # fmt: skip

_P = PRIMITIVES


#: what :func:`_pool` is given for a pool that takes no dilation (None is a user's bad value)
_UNDILATED: Any = object()


def _pool(
    op: str,
    prim: str,
    spatial: int,
    x: Any,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None,
    padding: IntOrTuple,
    dilation: Any = _UNDILATED,
    divisor_override: Any = None,
    primitive: Primitive | None = None,
    **options: Any,
) -> Any:
    x = as_array(x, op)
    xs = _check_input(op, x, spatial)
    if prim == "avg_pool":
        _check_floating(x, op)
    k = _tuple(kernel_size, spatial, "kernel_size", op, 1)
    s = k if stride is None else _tuple(stride, spatial, "stride", op, 1)
    p = _tuple(padding, spatial, "padding", op, 0)
    dilated = dilation is not _UNDILATED  # (the average pool's primitive takes no dilation)
    d = _tuple(dilation, spatial, "dilation", op, 1) if dilated else (1,) * spatial
    for name, flag in options.items():
        if not isinstance(flag, bool | np.bool_):  # ("no" or 0 would be taken for its truth)
            raise TypeError(
                f"{op}: {name} must be True or False, got {type(flag).__name__} {flag!r}"
            )
        options[name] = bool(flag)
    if any(2 * pi > ki for pi, ki in zip(p, k, strict=True)):
        # torch's rule: a window made mostly of padding would have no input to pool (half of
        # the kernel's cells, not of its dilated span, as torch's).
        raise ValueError(f"{op}: padding {p} must be at most half of kernel_size {k}")
    ceil_mode = options.get("ceil_mode", False)
    _check_fits(op, xs, k, s, p, d, "pooling window", ceil_mode)
    if dilated:
        options["dilation"] = d
    divisor = check_divisor_override(op, divisor_override)
    if divisor is not None:  # (left out when not given: the primitive's arguments as before it)
        options["divisor_override"] = divisor
    return (primitive or _P[prim])(x, kernel=k, stride=s, padding=p, **options)


def _check_flag(op: str, name: str, flag: Any) -> bool:
    if not isinstance(flag, bool | np.bool_):  # ("no" or 0 would be taken for its truth)
        raise TypeError(f"{op}: {name} must be True or False, got {type(flag).__name__} {flag!r}")
    return bool(flag)


def _max_pool(
    op: str,
    spatial: int,
    x: Any,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None,
    padding: IntOrTuple,
    dilation: IntOrTuple,
    ceil_mode: bool,
    return_indices: bool,
) -> Any:
    if not _check_flag(op, "return_indices", return_indices):
        return _pool(
            op, "max_pool", spatial, x, kernel_size, stride, padding, dilation,
            ceil_mode=ceil_mode,
        )  # fmt: skip
    # The primitive's own rules, with its forward's residuals kept here: its offsets of each
    # window's maximum give the indices, without a second pass over the input. The values
    # are the primitive's output, traced as without indices; the indices are a raw integer
    # array, which no gradient reaches (torch's too).
    base = _P["max_pool"]
    kept: list[tuple[Any, Any]] = []

    def forward(*args: Any, **params: Any) -> tuple[Any, Any]:
        out, res = base.forward(*args, **params)
        kept.append((out, res))
        return out, res

    keeping = Primitive._builtin("max_pool", forward, base.vjp_rule)
    values = _pool(
        op, "max_pool", spatial, x, kernel_size, stride, padding, dilation, primitive=keeping,
        ceil_mode=ceil_mode,
    )  # fmt: skip
    return values, max_pool_indices(*kept[0])


def check_divisor_override(owner: str, value: Any) -> int | None:
    """``avg_pool2d``'s ``divisor_override`` as a plain int, or None: torch's rule, an int that
    is not 0 (a negative one is taken, as torch's).

    Raises:
        TypeError: when it is no int (a bool, a float, even a whole one: torch's too).
        ValueError: when it is 0.
    """
    if value is None:
        return None
    what = f"{owner}: divisor_override must be a nonzero int or None"
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what}, got {type(value).__name__} {value!r}")
    if value == 0:
        raise ValueError(f"{what}, got 0; None divides each window by its count of cells")
    return int(value)


def max_pool1d(
    x: Any,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None = None,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    """Max over windows of an (N, C, L) input, as ``torch.nn.functional.max_pool1d``.

    The gradient goes to the first maximum of each window, among its real entries (a window of
    -inf gives it to its first real entry, never the padding, as torch); a NaN in a window
    makes its maximum NaN (as torch and ``np.max``), and takes the gradient.

    Args:
        x: input of shape (N, C, L); integers and bools are taken (padded below every value).
        kernel_size: the window's length, in cells.
        stride: the step between windows; ``None`` (the default) is ``kernel_size``.
        padding: -inf added on both sides, at most half of ``kernel_size`` (of its cells, not
            of the dilated span, torch's rule).
        dilation: the step between a window's cells (1: adjacent).
        ceil_mode: round the number of windows up, not down: a last window that starts inside
            the input or its left padding and runs past the end is kept and takes the maximum
            of the cells it covers (torch's rule; one that would start in the right padding is
            dropped).
        return_indices: return ``(values, indices)``, as torch: ``indices`` (int64, the
            values' shape) holds for each window the position in the input's length of the
            entry it took (the one the gradient goes to), for :func:`max_unpool1d`. It is a
            plain array, with no gradient, whether ``x`` is traced or not.

    Returns:
        Shape (N, C, L_out), ``L_out = (L + 2*padding - dilation*(kernel_size - 1) - 1) //
        stride + 1`` (rounded up with ``ceil_mode``, less a window that would start in the
        right padding), or the pair ``(values, indices)`` with ``return_indices``. A dilated
        window that steps over every cell of the input is -inf, and passes no gradient on, as
        torch's (its index is torch's too: the first cell at or past 0 it would have read,
        past the end of the input).

    Raises:
        TypeError: when ``ceil_mode`` or ``return_indices`` is not a bool.
        ValueError: on sizes that are not ints (or below their minimum), padding above half
            the kernel, or a window larger than the padded input.
    """
    return _max_pool(
        "max_pool1d", 1, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices
    )


def max_pool2d(
    x: Any,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None = None,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Any:
    """Max over windows of an (N, C, H, W) input, as ``torch.nn.functional.max_pool2d``;
    sizes are ints or (height, width) pairs, and ``dilation``, ``ceil_mode`` and
    ``return_indices`` are :func:`max_pool1d`'s, along each axis: an index is flat in the
    input's plane, ``h * W + w``, as torch's (for :func:`max_unpool2d`)."""
    return _max_pool(
        "max_pool2d", 2, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices
    )


def unpool_size(
    op: str,
    x_shape: tuple[int, ...],
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None,
    padding: IntOrTuple,
    output_size: Any = None,
) -> tuple[int, ...]:
    """A max unpool's output plane (its spatial shape), torch's rule: by default ``(size - 1) *
    stride + kernel_size - 2 * padding`` along each axis, the largest input the pool maps to
    ``x``'s size; ``output_size`` (``spatial`` ints, or ``spatial + 2`` with N and C in front,
    as an input's whole shape) picks another of those, strictly within ``stride`` of it.

    Raises:
        ValueError: on sizes that are not ints (or below their minimum), an ``output_size`` of
            another length or out of that range, or a plane of a negative size.
    """
    spatial = len(x_shape) - 2
    k = _tuple(kernel_size, spatial, "kernel_size", op, 1)
    s = k if stride is None else _tuple(stride, spatial, "stride", op, 1)
    p = _tuple(padding, spatial, "padding", op, 0)
    default = tuple(
        (n - 1) * si + ki - 2 * pi for n, ki, si, pi in zip(x_shape[2:], k, s, p, strict=True)
    )
    if output_size is None:
        plane = default
    else:
        names = "L" if spatial == 1 else "height, width"
        given: tuple[Any, ...] = ()
        with contextlib.suppress(TypeError):  # (an int or None: the message below)
            given = tuple(output_size)
        if len(given) == spatial + 2:
            given = given[2:]
        if len(given) != spatial or not all(
            isinstance(v, int | np.integer) and not isinstance(v, bool) for v in given
        ):
            raise ValueError(
                f"{op}: output_size must be {spatial} ints ({names}) or {spatial + 2} (N, C, "
                f"{names}), got {output_size!r}"
            )
        plane = tuple(int(v) for v in given)
        for d, (want, si) in enumerate(zip(default, s, strict=True)):
            if not want - si < plane[d] < want + si:
                raise ValueError(
                    f"{op}: output_size {plane} is not one {op.replace('un', '')} (kernel {k}, "
                    f"stride {s}, padding {p}) maps to x of shape {x_shape}: its axis {d} must "
                    f"be between {want - si + 1} and {want + si - 1} (torch's rule), got "
                    f"{plane[d]}; pass the shape of the pool's input"
                )
    if any(v < 0 for v in plane):
        raise ValueError(
            f"{op}: the output plane {plane} of x of shape {x_shape} (kernel {k}, stride {s}, "
            f"padding {p}) has a negative size; use less padding"
        )
    return plane


def _unpool(
    op: str,
    spatial: int,
    x: Any,
    indices: Any,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None,
    padding: IntOrTuple,
    output_size: Any,
) -> Any:
    x = as_array(x, op)
    xs = _check_input(op, x, spatial)
    indices = as_array(raw(indices), op)
    dtype = getattr(indices, "dtype", None)
    if getattr(dtype, "kind", None) not in ("i", "u"):
        what = dtype if dtype is not None else type(indices).__name__
        raise TypeError(
            f"{op}: indices must be an integer array, as max_pool{spatial}d(..., "
            f"return_indices=True) gives, got {what} of shape {_shape(indices)}"
        )
    if _shape(indices) != xs:
        raise ValueError(
            f"{op}: indices of shape {_shape(indices)} do not match x of shape {xs}: pass the "
            f"indices max_pool{spatial}d(..., return_indices=True) gave with these values"
        )
    plane = unpool_size(op, xs, kernel_size, stride, padding, output_size)
    size = int(np.prod(plane))
    if indices.size:
        # (GPU indices too, read in one copy to the host: a wrong one would write elsewhere)
        lo, hi = id_range(indices)
        if lo < 0 or hi >= size:
            raise IndexError(
                f"{op}: index {lo if lo < 0 else hi} is outside [0, {size}), the output plane "
                f"{plane} of x of shape {xs}; the indices must come from max_pool{spatial}d(..., "
                "return_indices=True) of an input of that plane (else pass its output_size)"
            )
    return _P["max_unpool"](x, indices, plane=plane)


def max_unpool1d(
    x: Any,
    indices: Any,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None = None,
    padding: IntOrTuple = 0,
    output_size: Any = None,
) -> Any:
    """The partial inverse of :func:`max_pool1d`, as ``torch.nn.functional.max_unpool1d``:
    each entry of ``x`` written at its index into zeros of the pool's input length.

    The gradient of an entry is the output's gradient at its index (none to the indices). An
    index may repeat where windows overlap (stride below the kernel): the output keeps the
    last entry written there (the latest in ``x``'s plane), as torch 2.13's CPU kernel, on a
    GPU too, the same bits (torch's CUDA kernel keeps any one of them), and each entry gets
    the gradient at its index (torch's rule, though only one of them reaches the output).

    Args:
        x: the pooled values, (N, C, L_in).
        indices: integer, ``x``'s shape: positions in the output's length, as
            ``max_pool1d(..., return_indices=True)`` gives.
        kernel_size: the pool's window length.
        stride: the pool's step; ``None`` (the default) is ``kernel_size``.
        padding: the pool's padding.
        output_size: the output's length, as ``(L,)`` or the whole shape ``(N, C, L)``; by
            default ``(L_in - 1) * stride + kernel_size - 2 * padding``. A pool maps several
            lengths to ``L_in`` (those within ``stride`` of the default): pass the pool's input
            shape to get it back.

    Returns:
        Shape (N, C, L), ``x``'s dtype.

    Raises:
        TypeError: when ``indices`` are not integers.
        ValueError: on indices of another shape than ``x``, sizes that are not ints, or an
            ``output_size`` the pool could not have come from.
        IndexError: on an index outside the output's length (GPU indices are read back to
            the host to check them).
    """
    return _unpool("max_unpool1d", 1, x, indices, kernel_size, stride, padding, output_size)


def max_unpool2d(
    x: Any,
    indices: Any,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None = None,
    padding: IntOrTuple = 0,
    output_size: Any = None,
) -> Any:
    """The partial inverse of :func:`max_pool2d`, as ``torch.nn.functional.max_unpool2d``:
    :func:`max_unpool1d` on an (N, C, H_in, W_in) input, whose ``indices`` are flat in the
    output plane (``h * W + w``); sizes are ints or (height, width) pairs, and
    ``output_size`` is ``(H, W)`` or ``(N, C, H, W)``."""
    return _unpool("max_unpool2d", 2, x, indices, kernel_size, stride, padding, output_size)


def avg_pool1d(
    x: Any,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None = None,
    padding: IntOrTuple = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> Any:
    """Mean over windows of an (N, C, L) input, as ``torch.nn.functional.avg_pool1d``.

    Args:
        x: input of shape (N, C, L), floating point.
        kernel_size: the window's length.
        stride: the step between windows; ``None`` (the default) is ``kernel_size``.
        padding: zeros added on both sides, at most half of ``kernel_size``.
        ceil_mode: round the number of windows up, not down: a last window that starts inside
            the input or its left padding and runs past the end is kept (torch's rule).
        count_include_pad: divide each window's sum by the cells it covers in the input and
            its padding (torch's default; a ceil-mode window's cells past the padding do not
            count); ``False`` divides by its cells of the input only.

    Returns:
        Shape (N, C, L_out), ``L_out = (L + 2*padding - kernel_size) // stride + 1`` (rounded
        up with ``ceil_mode``, less a window that would start in the right padding).

    Raises:
        TypeError: when x is not floating point, or ``ceil_mode`` or ``count_include_pad`` is
            not a bool.
        ValueError: on padding above half the kernel, or a window larger than the padded input.
    """
    return _pool(
        "avg_pool1d", "avg_pool", 1, x, kernel_size, stride, padding,
        ceil_mode=ceil_mode, count_include_pad=count_include_pad,
    )  # fmt: skip


def avg_pool2d(
    x: Any,
    kernel_size: IntOrTuple,
    stride: IntOrTuple | None = None,
    padding: IntOrTuple = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    *,
    divisor_override: int | None = None,
) -> Any:
    """Mean over windows of an (N, C, H, W) input, as ``torch.nn.functional.avg_pool2d``;
    sizes are ints or (height, width) pairs, and ``ceil_mode`` and ``count_include_pad`` are
    :func:`avg_pool1d`'s, along each axis (a window's divisor is the product of its counts
    along the two).

    ``divisor_override`` (by name only; torch's last argument) divides every window's sum by
    it in place of its count of cells, ``ceil_mode``'s last windows and padded ones too
    (``count_include_pad`` then changes nothing), as torch's. It is an int that is not 0
    (a negative one is taken, as torch's); ``None``, the default, divides by the count.
    torch's ``avg_pool1d`` has none, nor has :func:`avg_pool1d`.

    Raises:
        TypeError: as :func:`avg_pool1d`, or when ``divisor_override`` is no int.
        ValueError: as :func:`avg_pool1d`, or when ``divisor_override`` is 0.
    """
    return _pool(
        "avg_pool2d", "avg_pool", 2, x, kernel_size, stride, padding,
        divisor_override=divisor_override, ceil_mode=ceil_mode,
        count_include_pad=count_include_pad,
    )  # fmt: skip
