"""Forward and VJP rules of the elementwise primitives (numpy broadcasting throughout)."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncnn.backends import acc_sum, elementwise, fused_nn_kernels_of, is_floating
from asyncnn.backends import array_namespace as ns

from ._autodiff import Forward, VjpRule


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def unbroadcast(g: Any, shape: tuple[int, ...]) -> Any:
    """Sums ``g`` over the axes that broadcasting added or stretched to reach ``g.shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1
    )
    if axes:
        g = acc_sum(g, axes)
    return g.reshape(shape)


def like(x: Any) -> tuple[tuple[int, ...], Any]:
    """What a gradient for ``x`` must look like: its shape and dtype (None for Python scalars)."""
    if type(x) is np.ndarray:  # (every traced op of a CPU layer asks: the common case first)
        return x.shape, x.dtype
    return shape_of(x), getattr(x, "dtype", None)


def grad_like(g: Any, target: tuple[tuple[int, ...], Any]) -> Any:
    """``g`` unbroadcast to ``target``'s shape, in its dtype: a float32 input mixed with float64
    gets a float32 gradient, as in torch."""
    shape, dtype = target
    if g.shape != shape:
        g = unbroadcast(g, shape)
    if g.dtype is not dtype and dtype is not None and g.dtype != dtype:
        g = g.astype(dtype)
    return g


# Each forward returns (out, residuals); each rule returns one gradient per argument.


# The large passes of dense layers (bias add, ReLU and its gradient) go through the backend's
# ``elementwise``: on a thread of a CPU compute team they are split by rows across its workers.


def _add(a: Any, b: Any) -> tuple[Any, Any]:
    return elementwise(operator.add, a, b), (like(a), like(b))


def _add_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
    sa, sb = res
    return (grad_like(g, sa) if needs[0] else None, grad_like(g, sb) if needs[1] else None)


def _subtract(a: Any, b: Any) -> tuple[Any, Any]:
    return a - b, (like(a), like(b))


def _subtract_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
    sa, sb = res
    return (grad_like(g, sa) if needs[0] else None, grad_like(-g, sb) if needs[1] else None)


def _multiply(a: Any, b: Any) -> tuple[Any, Any]:
    return a * b, (a, b)


def _multiply_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
    a, b = res
    return (
        grad_like(g * b, like(a)) if needs[0] else None,
        grad_like(g * a, like(b)) if needs[1] else None,
    )


def _divide(a: Any, b: Any) -> tuple[Any, Any]:
    return a / b, (a, b)


def _divide_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
    a, b = res
    ga = g / b
    return (
        grad_like(ga, like(a)) if needs[0] else None,
        grad_like(-ga * a / b, like(b)) if needs[1] else None,
    )


def _negative(a: Any) -> tuple[Any, Any]:
    return -a, None


def _negative_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (-g,)


#: the dtypes whose a ** -0.5 torch computes as 1 / sqrt(a); float16's is pow, as numpy's (and
#: bfloat16's 1 / sqrt in float32, rounded once, which numpy's bfloat16 ops would round twice)
_RSQRT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _rsqrt_dtype(a: Any, b: Any) -> np.dtype[Any] | None:
    """The dtype in which ``a ** b``, ``b`` a scalar +-0.5, is torch's rsqrt (see
    :func:`_power`), or None: a float32 or float64 base and a Python float (the base's dtype),
    or a numpy floating scalar, as torch takes any scalar exponent (the dtype numpy's promotion
    gives, where float32 or float64: a float32 base and a float64 scalar make float64)."""
    dtype = getattr(a, "dtype", None)
    if dtype not in _RSQRT_DTYPES:
        return None
    if type(b) is float:
        return dtype
    if not isinstance(b, np.floating):
        return None
    out = np.result_type(dtype, b)
    return out if out in _RSQRT_DTYPES else None


def _power(a: Any, b: Any) -> tuple[Any, Any]:
    dtype = _rsqrt_dtype(a, b)
    if dtype is not None and (b == -0.5 or b == 0.5):
        # torch's a ** -0.5 is 1 / sqrt(a) (rsqrt), where pow gives 0 at -inf (torch: NaN) and
        # +inf at -0.0 (torch: -inf); a ** 0.5 is sqrt(a), as torch's (numpy's own is, for any
        # scalar 0.5; cupy's only for a Python one: a numpy 0.5 took pow, +inf at -inf)
        root = ns(a).sqrt(a if a.dtype == dtype else a.astype(dtype))
        out = root if b == 0.5 else 1 / root
    else:
        out = a**b
    return out, (a, b, out)


def _power_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
    a, b, out = res
    ga = None
    if needs[0]:
        # d(a**b)/da = b * a**(b - 1), and 0 where b == 0 (a**0 is constant), masked as torch
        # masks it: at an infinite or NaN base 0 * a**(b - 1) is NaN. Where b == 0 the power
        # takes 1 instead, so that a == 0 raises no 0**-1 warning. A Python exponent stays a
        # Python number, so that a float16 or float32 base keeps its dtype.
        if _rsqrt_dtype(a, b) is not None and b == 0.5:
            # torch's b * a**(b - 1) with a ** -0.5 as 1 / sqrt(a): NaN at -inf and -inf at
            # -0.0, where pow gives 0 and +inf (see _power)
            da = g * (0.5 * (1 / ns(a).sqrt(a)))
        elif isinstance(b, int | float | np.number):  # (a numpy scalar too: cupy takes one)
            da = g * b * a ** (1 if b == 0 else b - 1)
            if b == 0:
                da = ns(da).zeros_like(da)
        else:
            zero = b == 0
            da = g * b * a ** ns(b).where(zero, 1, b - 1)
            xp = ns(da, b)
            da = xp.where(zero, xp.zeros((), da.dtype), da)
        ga = grad_like(da, like(a))
    gb = None
    if needs[1]:
        xp = ns(a, b)
        # d(a**b)/db = out * log(a); where a == 0 the limit is 0 (for b > 0).
        a_arr = xp.asarray(a)  # a may be a Python number (2.0 ** x)
        safe = xp.where(a_arr == 0, 1, a_arr)
        gb = grad_like(g * out * xp.log(safe), like(b))
    return ga, gb


def _exp(x: Any) -> tuple[Any, Any]:
    out = ns(x).exp(x)
    return out, out


def _exp_vjp(g: Any, out: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g * out,)


def _log(x: Any) -> tuple[Any, Any]:
    return ns(x).log(x), x


def _log_vjp(g: Any, x: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g / x,)


def _tanh(x: Any) -> tuple[Any, Any]:
    out = ns(x).tanh(x)
    return out, out


def _tanh_vjp(g: Any, out: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g * (1 - out * out),)


def _sigmoid(x: Any) -> tuple[Any, Any]:
    # exp(min(x, 0)) / (1 + exp(-|x|)), both parts <= 1 (no overflow), each side of 0 to full
    # relative precision: 0.5 * (1 + tanh(x / 2)) cancels for x < 0 (3e-4 off at x = -10 in
    # float32, 0 from x = -20, where the logistic is 2e-9). The numerator is max(e, x >= 0):
    # one exp, and no select (np.where with a mixed mask is 5x slower than the rest).
    xp = ns(x)
    if x.dtype.kind in "biu":
        # -|x| wraps around for unsigned ints (3 -> 253 in uint8: NaN out) and is refused for
        # bools: compute in the float numpy's promotion gives, the dtype of tanh's and exp's
        x = x.astype(np.result_type(x.dtype, np.float16))
    e = xp.exp(-xp.abs(x))
    pos = x >= 0
    one: Any = 1
    if e.dtype.kind == "V":  # cupy promotes bfloat16 with a Python scalar or bool to float32
        pos, one = pos.astype(e.dtype), xp.ones((), e.dtype)
    out = xp.maximum(e, pos) / (one + e)
    return out, out


def _sigmoid_vjp(g: Any, out: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g * out * (1 - out),)


def _relu(x: Any) -> tuple[Any, Any]:
    fused = fused_nn_kernels_of(x)
    if fused is not None and is_floating(x.dtype):
        out = fused.relu(x)  # one kernel on a GPU, and no zero array to make for 16 bits
        return out, out
    xp = ns(x)
    out = elementwise(xp.maximum, x, _relu_floor(xp, x))
    return out, out


def _relu_floor(xp: Any, x: Any) -> Any:
    """The 0 that ReLU takes the maximum of ``x`` (of array module ``xp``) with: cupy promotes
    bfloat16 with a Python scalar to float32, so a 0 of ``x``'s dtype there."""
    return xp.zeros((), x.dtype) if x.dtype.kind == "V" else 0


def _bias_relu(y: Any, b: Any) -> tuple[Any, Any]:
    """``relu(y + b)`` in one primitive (a Linear's product, its bias and the ReLU after it:
    ``nn.Sequential`` calls it for a Linear with a bias followed by a ReLU): one node of the
    trace instead of two, for an eager step bound by its Python, and on the CPU one hand-over
    to a team's workers instead of two; bit for bit the add and the ReLU (``y`` and ``b`` of one
    floating dtype)."""
    fused = fused_nn_kernels_of(y)
    if fused is not None and is_floating(y.dtype):  # (the add's kernel, then the ReLU's)
        out = fused.relu(y + b)
    else:
        out = elementwise(_np_bias_relu, y, b)
    return out, (out, like(b))


def _np_bias_relu(y: Any, b: Any) -> Any:
    s = y + b  # (a fresh array: the ReLU writes over it)
    xp = ns(s)
    return xp.maximum(s, _relu_floor(xp, s), out=s)


def _bias_relu_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
    out, b_like = res
    (gz,) = _relu_vjp(g, out, (True,))  # (the add's gradient passes it on to y as it is)
    return gz if needs[0] else None, grad_like(gz, b_like) if needs[1] else None


#: up to this many elements a select is numpy's where (at 4096 the bits are as quick; past it
#: the where's branch on each element costs more, 16x at 65536)
_SMALL_SELECT = 2048
#: a 0-d zero of each dtype, for the small selects (read only)
_ZEROS: dict[Any, Any] = {}


def _select_bits(g: Any, mask: Any, keep: bool) -> Any:
    """``g`` where ``mask == keep``, else +0, whatever ``g`` holds there (an infinite or NaN
    cotangent included: a product with a 0/1 mask gave NaN there, and -0 for a negative one),
    as torch's selects (``threshold_backward``, ``masked_fill``). ``mask`` is boolean, of
    ``g``'s shape or broadcasting to it.

    The select is a bitwise and of g's bits with an all-ones or all-zeros mask: branch-free,
    within 15% of the product (numpy's where, which branches per element, took 20x as long on
    a random mask), and on a GPU bfloat16 too (cupy's where has no bfloat16 kernel).
    """
    if type(g) is np.ndarray and g.size <= _SMALL_SELECT:  # (the small arrays, answered first)
        zero = _ZEROS.get(g.dtype)
        if zero is None:
            zero = _ZEROS[g.dtype] = np.zeros((), g.dtype)  # (a scalar: where took 1.6x as long)
        return np.where(mask if keep else ~mask, g, zero)
    xp = ns(g)
    if g.size <= _SMALL_SELECT or g.dtype.kind not in "fV" or g.dtype.itemsize not in (2, 4, 8):
        # one call where the branches cost less than the calls (a (4, 8) array: 0.8 µs
        # against 1.9 for the bits); also a 0-d one, whose mask's astype is a numpy scalar,
        # which takes no out= (cupy's where computes bfloat16 in float32, the cast back exact)
        zero = g.dtype.type(0) if xp is np else xp.zeros((), g.dtype)
        out = xp.where(mask if keep else ~mask, g, zero)
        return out if out.dtype == g.dtype else out.astype(g.dtype)
    bits = np.dtype(f"i{g.dtype.itemsize}")
    ones = mask.astype(bits)
    if keep:
        xp.negative(ones, out=ones)  # 1 -> all ones, 0 -> 0
    else:
        ones -= 1  # 0 -> all ones, 1 -> 0
    if ones.shape == g.shape:
        ones &= g.view(bits)
        return ones.view(g.dtype)
    return (ones & g.view(bits)).view(g.dtype)


def _relu_grad(g: Any, out: Any) -> Any:
    # torch selects g where not (out <= 0) (threshold_backward): out is 0, positive or NaN, so
    # out != 0 is that test in one compare (a NaN input's NaN output passes g), and elsewhere
    # the gradient is +0 whatever g, an infinite or NaN one included; the GPU's fused kernel
    # selects the same bits.
    return _select_bits(g, out != 0, True)


def _relu_vjp(g: Any, out: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    fused = fused_nn_kernels_of(g)
    if (
        fused is not None and g.dtype == out.dtype and g.shape == out.shape and is_floating(g.dtype)
    ):  # one kernel on a GPU, where each launch costs host time
        return (fused.relu_grad(g, out),)
    return (elementwise(_relu_grad, g, out),)


_SQRT_HALF = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _erf(x: Any) -> Any:
    xp = ns(x)
    if xp.__name__ == "numpy":
        from scipy.special import erf
    else:
        from cupyx.scipy.special import erf
    # cupyx's erf answers float16 in float64
    return erf(x).astype(x.dtype, copy=False)


def _gelu(x: Any, approximate: str = "none") -> tuple[Any, Any]:
    xp = ns(x)
    if approximate == "tanh":
        t = xp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
        return 0.5 * x * (1 + t), (x, t, approximate)
    cdf = 0.5 * (1 + _erf(x * _SQRT_HALF))
    return x * cdf, (x, cdf, approximate)


def _gelu_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    x, c, approximate = res
    xp = ns(x)
    if approximate == "tanh":
        inner_d = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
        return (g * (0.5 * (1 + c) + 0.5 * x * (1 - c * c) * inner_d),)
    pdf = _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
    return (g * (c + x * pdf),)


def _log1p(x: Any) -> tuple[Any, Any]:
    return ns(x).log1p(x), x


def _log1p_vjp(g: Any, x: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g / (x + 1),)  # (torch's grad / (self + 1))


def _expm1(x: Any) -> tuple[Any, Any]:
    out = ns(x).expm1(x)
    return out, out


def _expm1_vjp(g: Any, out: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g * (out + 1),)


def _sin(x: Any) -> tuple[Any, Any]:
    return ns(x).sin(x), x


def _sin_vjp(g: Any, x: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g * ns(x).cos(x),)


def _cos(x: Any) -> tuple[Any, Any]:
    return ns(x).cos(x), x


def _cos_vjp(g: Any, x: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g * -ns(x).sin(x),)  # (-sin(x) first, as torch: the zeros' signs follow it)


def _clip(
    x: Any, lo: float | None = None, hi: float | None = None, inclusive: bool = True
) -> tuple[Any, Any]:
    # maximum, then minimum: a NaN input stays NaN, and min > max gives max everywhere (torch's
    # clamp and numpy's clip alike). The bounds come as Python numbers, a float input's already
    # rounded to its dtype (see ops.clip), so that the compares below are exact.
    xp = ns(x)
    out = x
    keep = None
    if lo is not None:
        out = xp.maximum(out, lo)
        keep = x >= lo if inclusive else x > lo
    if hi is not None:
        out = xp.minimum(out, hi)
        below = x <= hi if inclusive else x < hi
        keep = below if keep is None else keep & below
    return out, keep


def _clip_vjp(g: Any, keep: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    # torch's selects: clamp passes g where min <= x <= max (at a bound too), hardtanh where
    # min < x < max; both give +0 elsewhere (a NaN input included) whatever g
    return (_select_bits(g, keep, True),)


def _leaky_relu(x: Any, negative_slope: float = 0.01) -> tuple[Any, Any]:
    xp = ns(x)
    pos = x > 0  # (torch's test: a NaN input takes the negative side, NaN either way)
    return xp.where(pos, x, x * negative_slope), (pos, negative_slope)


def _leaky_relu_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    pos, negative_slope = res
    # g * slope at 0 and at a NaN input, as torch's leaky_relu_backward
    return (ns(g).where(pos, g, g * negative_slope),)


def _elu(x: Any, alpha: float = 1.0) -> tuple[Any, Any]:
    xp = ns(x)
    neg = x <= 0  # (torch's test: a NaN input takes the positive side)
    # expm1 of the negative side only: exp overflowed (a warning) where x > 709
    xn = xp.where(neg, x, xp.zeros((), x.dtype))
    return xp.where(neg, xp.expm1(xn) * alpha, x), (neg, xn, alpha)


def _elu_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    neg, xn, alpha = res
    xp = ns(g)
    # torch's elu_backward (not from the result): g * alpha * exp(x) where x <= 0, else g
    return (xp.where(neg, g * alpha * xp.exp(xn), g),)


def _silu(x: Any) -> tuple[Any, Any]:
    # torch's x / (1 + exp(-x)): exp overflows below -709 (-88 in float32) to inf, and the
    # quotient is -0, as torch's (NaN at -inf, inf / inf)
    xp = ns(x)
    with np.errstate(over="ignore", invalid="ignore"):
        d = 1 + xp.exp(-x)
        return x / d, (x, 1 / d)


def _silu_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    x, sig = res
    with np.errstate(invalid="ignore"):  # (NaN at +-inf, as torch's)
        return (g * sig * (1 + x * (1 - sig)),)


def _softplus(x: Any, beta: float = 1.0, threshold: float = 20.0) -> tuple[Any, Any]:
    # torch's: x where x * beta > threshold, else log1p(exp(x * beta)) / beta (exp overflows
    # where the other side is taken, quietly)
    xp = ns(x)
    with np.errstate(over="ignore"):  # (x * beta past the dtype's range takes the linear side)
        z = x * beta
        e = xp.exp(z)
    linear = z > threshold
    return xp.where(linear, x, xp.log1p(e) / beta), (linear, e)


def _softplus_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    linear, e = res
    with np.errstate(invalid="ignore"):  # (inf / inf where the linear side is taken)
        return (ns(g).where(linear, g, g * e / (e + 1)),)


def _sqrt(x: Any) -> tuple[Any, Any]:
    out = ns(x).sqrt(x)
    return out, out


def _sqrt_vjp(g: Any, out: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g / (2 * out),)


def _abs(x: Any) -> tuple[Any, Any]:
    xp = ns(x)
    return xp.abs(x), x


def _abs_vjp(g: Any, x: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    # g * sgn(x) as torch, whose sgn(NaN) is 0 where numpy's sign gives NaN: a NaN input had a
    # NaN gradient (g * 0 keeps a NaN or infinite g's NaN, as torch's product does)
    # (zeroed in place where x is NaN: a ``where`` into a new array took 2.45x as long)
    xp = ns(x)
    sign = xp.asarray(xp.sign(x))  # (numpy's sign of a 0-d array is a scalar)
    xp.copyto(sign, 0, where=xp.isnan(x))
    return (g * sign,)


def _extremum_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any]:
    # torch's rule: each side gets g unless it lost, halved at ties. Ties share the gradient
    # equally (torch.maximum and jax.numpy.maximum do too); where a NaN is compared neither
    # side lost, and both get g, as in torch (the NaN is the output, and may come from either).
    # The loser's 0 is selected, as torch's masked_fill does: g times a 0 gave NaN for an
    # infinite cotangent (maximum(x, 0), a hand-written clamp, after an overflowed loss).
    sa, sb, a_lost, b_lost, tie = res
    if needs[0] or needs[1]:
        # (the share is exact in every float dtype: 1 or 0.5)
        g = g * (1 - 0.5 * tie).astype(g.dtype, copy=False)
    return (
        grad_like(_select_bits(g, a_lost, False), sa) if needs[0] else None,
        grad_like(_select_bits(g, b_lost, False), sb) if needs[1] else None,
    )


def _compare(a: Any, b: Any) -> tuple[Any, Any, Any]:
    """``(a < b, a > b, a == b)``; a NaN compares False, quietly (ml_dtypes' bfloat16 warns of
    it with some numpy versions, an error under a strict test suite's filters)."""
    if _is_bf16(a) or _is_bf16(b):
        with np.errstate(invalid="ignore"):
            return a < b, a > b, a == b
    return a < b, a > b, a == b


def _maximum(a: Any, b: Any) -> tuple[Any, Any]:
    xp = ns(a, b)
    lt, gt, eq = _compare(a, b)
    return xp.maximum(a, b), (like(a), like(b), lt, gt, eq)


def _minimum(a: Any, b: Any) -> tuple[Any, Any]:
    xp = ns(a, b)
    lt, gt, eq = _compare(a, b)
    return xp.minimum(a, b), (like(a), like(b), gt, lt, eq)


def _where(cond: Any, a: Any, b: Any) -> tuple[Any, Any]:
    xp = ns(a, b, cond)
    # a host mask (a loop's rows still running) over a device's arrays: cupy takes only its own
    cond = xp.asarray(cond)
    out = xp.where(cond, a, b)
    if out.dtype.kind == "f" and (_is_bf16(a) or _is_bf16(b)):
        out = _bf16_where(out, a, b)
    return out, (cond, like(a), like(b))


def _is_bf16(x: Any) -> bool:
    return getattr(getattr(x, "dtype", None), "kind", None) == "V"


def _bf16_where(out: Any, a: Any, b: Any) -> Any:
    """``out``, a ``where`` of ``a`` and ``b`` of which one is bfloat16, back in bfloat16 where
    numpy gives bfloat16 (the other side bfloat16 too, or a Python scalar): cupy's ``where`` has
    no bfloat16 kernel and computes in float32 (the cast back is exact)."""
    dtypes = [x.dtype for x in (a, b) if hasattr(x, "dtype")]
    if all(d == dtypes[0] for d in dtypes):
        return out.astype(dtypes[0])
    return out


def _where_vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> tuple[Any, Any, Any]:
    cond, sa, sb = res
    xp = ns(g)
    zero = xp.zeros((), dtype=g.dtype)
    return (
        None,
        grad_like(xp.where(cond, g, zero), sa) if needs[1] else None,
        grad_like(xp.where(cond, zero, g), sb) if needs[2] else None,
    )


def _astype(x: Any, dtype: Any) -> tuple[Any, Any]:
    return x.astype(dtype), x.dtype


def _astype_vjp(g: Any, dtype: Any, needs: tuple[bool, ...]) -> tuple[Any]:
    return (g.astype(dtype),)


RULES: dict[str, tuple[Forward, VjpRule]] = {
    "add": (_add, _add_vjp),
    "subtract": (_subtract, _subtract_vjp),
    "multiply": (_multiply, _multiply_vjp),
    "divide": (_divide, _divide_vjp),
    "negative": (_negative, _negative_vjp),
    "power": (_power, _power_vjp),
    "exp": (_exp, _exp_vjp),
    "log": (_log, _log_vjp),
    "tanh": (_tanh, _tanh_vjp),
    "sigmoid": (_sigmoid, _sigmoid_vjp),
    "relu": (_relu, _relu_vjp),
    "bias_relu": (_bias_relu, _bias_relu_vjp),
    "gelu": (_gelu, _gelu_vjp),
    "log1p": (_log1p, _log1p_vjp),
    "expm1": (_expm1, _expm1_vjp),
    "sin": (_sin, _sin_vjp),
    "cos": (_cos, _cos_vjp),
    "clip": (_clip, _clip_vjp),
    "leaky_relu": (_leaky_relu, _leaky_relu_vjp),
    "elu": (_elu, _elu_vjp),
    "silu": (_silu, _silu_vjp),
    "softplus": (_softplus, _softplus_vjp),
    "sqrt": (_sqrt, _sqrt_vjp),
    "abs": (_abs, _abs_vjp),
    "maximum": (_maximum, _extremum_vjp),
    "minimum": (_minimum, _extremum_vjp),
    "where": (_where, _where_vjp),
    "astype": (_astype, _astype_vjp),
}


class _Widened:
    """Residuals of a rule computed in float32 for bfloat16 inputs, with each input's dtype (its
    gradient's)."""

    __slots__ = ("res", "dtypes")

    def __init__(self, res: Any, dtypes: list[Any]) -> None:
        self.res = res
        self.dtypes = dtypes


def _bf16_in_float32(
    fwd: Forward, rule: VjpRule, arrays_pass: bool = False, float16: bool = False
) -> tuple[Forward, VjpRule]:
    """The rule pair, computing in float32 when an input is bfloat16 (numpy's extension type).

    cupy promotes bfloat16 with a Python scalar (``0.5 * x``) to float32, so rules written with
    scalars would change the dtype; this runs them in float32 and rounds the results back.
    Other dtypes go straight through; with ``arrays_pass``, so do calls whose arguments are all
    bfloat16 arrays (``x + b`` of two bfloat16 arrays stays in bfloat16, with no extra pass).
    The result is rounded to bfloat16 (or float16) unless a floating array of another dtype,
    of one or more dimensions, takes part: the result then has numpy's promotion of the two (a
    bfloat16 input added to float32 values is float32, a float16 one with a bfloat16 weight
    float32). Scalars (Python's and numpy's) and 0-d arrays never change it, so that a call
    gives the same dtype on the CPU as on cupy, whose promotion of bfloat16 with a scalar is
    not numpy's (float32 for a Python float). Each gradient comes back in its input's dtype.

    Args:
        fwd: the forward rule.
        rule: its VJP rule.
        arrays_pass: whether a call on bfloat16 arrays alone runs in bfloat16.
        float16: whether float16 inputs compute in float32 too: for rules whose intermediates
            overflow float16 (a square from 256, a cube from 40) or that sum in it.
    """

    def forward(*args: Any, **params: Any) -> tuple[Any, Any]:
        dtype = None
        for a in args:
            dt = getattr(a, "dtype", None)
            if dt is not None and (dt.kind == "V" or (float16 and dt == np.float16)):
                dtype = dt
                break
        if dtype is None or (arrays_pass and all(getattr(a, "dtype", None) == dtype for a in args)):
            return fwd(*args, **params)
        target = dtype
        # Floating arrays only: a scalar, numpy's included, and a 0-d array keep bfloat16, the
        # same dtype on the CPU as on cupy; bfloat16 arrays count too, whose kind is "V" (a
        # float16 layer norm with a bfloat16 weight is float32, as numpy's promotion gives).
        for a in args:
            dt = getattr(a, "dtype", None)
            if dt is not None and dt != dtype and getattr(a, "ndim", 0) and is_floating(dt):
                target = _promoted(target, dt)
        wide = [a.astype("float32") if getattr(a, "dtype", None) == dtype else a for a in args]
        out, res = fwd(*wide, **params)
        return out.astype(target, copy=False), _Widened(
            res, [getattr(a, "dtype", None) for a in args]
        )

    def vjp(g: Any, res: Any, needs: tuple[bool, ...]) -> Sequence[Any]:
        if type(res) is not _Widened:
            return rule(g, res, needs)
        grads = rule(g.astype("float32"), res.res, needs)
        return [
            None if x is None else x.astype(d, copy=False) if is_floating(d) else x
            for x, d in zip(grads, res.dtypes, strict=False)
        ]

    return forward, vjp


# These keep bfloat16 as it is (no Python scalars in them; astype says its own dtype); the
# arithmetic widens only when mixed with a scalar or another dtype; the rest always widen.
_AS_IS = {"relu", "bias_relu", "maximum", "minimum", "where", "astype"}
_ARITHMETIC = {"add", "subtract", "multiply", "divide"}
# GELU cubes x (the tanh form) and squares it (both forms' gradients): float16 overflowed from
# |x| ~ 40, and its gradients were NaN from |x| ~ 700, where torch's are 1 and 0. The logistic
# rounds three times in float16 (exp, 1 + e, the quotient): 7e-4 off on [-8, 8], torch 2.4e-4.
# The other activations are one kernel in float32 in torch, rounded once: in float16 numpy
# rounds leaky_relu's slope itself, and each step of silu, elu and softplus. Hardtanh's clip
# compares float16 with its float32 bounds, as torch's kernel does.
_FLOAT16_TOO = {"gelu", "sigmoid", "leaky_relu", "elu", "silu", "softplus", "clip"}
RULES = {
    name: pair
    if name in _AS_IS
    else _bf16_in_float32(*pair, arrays_pass=name in _ARITHMETIC, float16=name in _FLOAT16_TOO)
    for name, pair in RULES.items()
}


def _promoted(a: np.dtype[Any], b: np.dtype[Any]) -> np.dtype[Any]:
    """numpy's promotion of two float dtypes; float16 with bfloat16 is float32 where the
    installed ml_dtypes registers no promotion between them (``np.result_type`` then raises,
    though ``float16 + bfloat16`` arrays add in float32)."""
    try:
        return np.result_type(a, b)
    except TypeError:  # (numpy's DTypePromotionError)
        return np.dtype(np.float32 if max(a.itemsize, b.itemsize) <= 4 else np.float64)
