"""Forward values of the ops in asyncnn.ops against plain numpy references, and values and
gradients against torch where installed, edge values (ties, infinities, NaN, empty axes) included."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import ops
from asyncnn.backends import BFLOAT16, array_namespace, to_numpy

from _ops_cases import ref_conv, ref_log_softmax, ref_pool
from conftest import HAS_CUDA

# -- forward values against plain numpy references ------------------------------------------------


_SQRT2 = math.sqrt(2)
_erf = np.vectorize(math.erf)
_R = np.random.default_rng(7)
_X = _R.standard_normal((2, 3, 4))


def _G(*shape: int) -> np.ndarray:  # noqa: N802
    return _R.standard_normal(shape)


FORWARD_CASES = [
    # (name, op on the inputs, numpy reference, inputs)
    ("exp", ops.exp, np.exp, [_X]),
    ("log", ops.log, np.log, [np.abs(_X) + 0.1]),
    ("tanh", ops.tanh, np.tanh, [_X]),
    ("sigmoid", ops.sigmoid, lambda x: 1 / (1 + np.exp(-x)), [_X * 10]),
    ("relu", ops.relu, lambda x: x * (x > 0), [_X]),
    ("gelu", ops.gelu, lambda x: 0.5 * x * (1 + _erf(x / _SQRT2)), [_X]),
    ("gelu-tanh", lambda x: ops.gelu(x, "tanh"),
     lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))), [_X]),
    ("sqrt", ops.sqrt, np.sqrt, [np.abs(_X)]),
    ("abs", ops.abs, np.abs, [_X]),
    ("log1p", ops.log1p, np.log1p, [np.abs(_X) - 0.5]),
    ("expm1", ops.expm1, np.expm1, [_X]),
    ("sin", ops.sin, np.sin, [_X * 3]),
    ("cos", ops.cos, np.cos, [_X * 3]),
    ("clip", lambda x: ops.clip(x, -0.5, 1.0), lambda x: np.clip(x, -0.5, 1.0), [_X]),
    ("clip-min", lambda x: ops.clip(x, min=0.25), lambda x: np.maximum(x, 0.25), [_X]),
    ("clip-max", lambda x: ops.clip(x, max=-0.25), lambda x: np.minimum(x, -0.25), [_X]),
    ("leaky_relu", ops.leaky_relu, lambda x: np.where(x > 0, x, 0.01 * x), [_X]),
    ("leaky_relu-0.3", lambda x: ops.leaky_relu(x, 0.3), lambda x: np.where(x > 0, x, 0.3 * x),
     [_X]),
    ("elu", ops.elu, lambda x: np.where(x > 0, x, np.expm1(x)), [_X]),
    ("elu-2", lambda x: ops.elu(x, 2.0), lambda x: np.where(x > 0, x, 2.0 * np.expm1(x)), [_X]),
    ("silu", ops.silu, lambda x: x / (1 + np.exp(-x)), [_X * 10]),
    ("softplus", ops.softplus, lambda x: np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))),
     [_X * 15]),
    ("softplus-beta", lambda x: ops.softplus(x, 2.0, 5.0),
     lambda x: np.where(2 * x > 5, x, np.log1p(np.exp(np.minimum(2 * x, 5))) / 2), [_X * 3]),
    ("power", ops.power, np.power, [np.abs(_X) + 0.5, _X]),
    ("maximum", ops.maximum, np.maximum, [_X, _X[0]]),
    ("minimum", ops.minimum, np.minimum, [_X, _X[0]]),
    ("max", lambda x: ops.max(x, (0, 2)), lambda x: x.max((0, 2)), [_X]),
    ("min", lambda x: ops.min(x, 1, True), lambda x: x.min(1, keepdims=True), [_X]),
    ("softmax", ops.softmax, lambda x: np.exp(ref_log_softmax(x)), [_X]),
    ("softmax-big", ops.softmax, lambda x: np.exp(ref_log_softmax(x - 1000)), [_X + 1000]),
    ("log_softmax", lambda x: ops.log_softmax(x, 1), lambda x: ref_log_softmax(x, 1), [_X]),
    ("logsumexp", ops.logsumexp, lambda x: np.log(np.exp(x).sum(-1)), [_X]),
    ("logsumexp-big", lambda x: ops.logsumexp(x, 0, True),
     lambda x: 800 + np.log(np.exp(x - 800).sum(0, keepdims=True)), [_X * 5 + 800]),
    ("conv1d", lambda x, w, b: ops.conv1d(x, w, b, 2, 1, 2),
     lambda x, w, b: ref_conv(x, w, b, (2,), (1,), (2,)), [_G(2, 3, 9), _G(4, 3, 3), _G(4)]),
    ("conv2d", lambda x, w: ops.conv2d(x, w, None, (2, 1), (1, 2), (1, 2)),
     lambda x, w: ref_conv(x, w, None, (2, 1), (1, 2), (1, 2)), [_G(2, 3, 6, 5), _G(2, 3, 3, 2)]),
    ("max_pool1d", lambda x: ops.max_pool1d(x, 3, 2, 1),
     lambda x: ref_pool(x, (3,), (2,), (1,), "max"), [_X]),
    ("max_pool2d", lambda x: ops.max_pool2d(x, (2, 3), 1, (1, 1)),
     lambda x: ref_pool(x, (2, 3), (1, 1), (1, 1), "max"), [_G(2, 2, 4, 5)]),
    ("avg_pool1d", lambda x: ops.avg_pool1d(x, 2, 1, 1),
     lambda x: ref_pool(x, (2,), (1,), (1,), "avg"), [_X]),
    ("avg_pool2d", lambda x: ops.avg_pool2d(x, 3, 2, 1),
     lambda x: ref_pool(x, (3, 3), (2, 2), (1, 1), "avg"), [_G(1, 2, 5, 6)]),
    ("layer_norm", ops.layer_norm,
     lambda x, w, b: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
     * w + b, [_X, _X[0, 0], _X[1, 1]]),
    ("layer_norm-2d", lambda x: ops.layer_norm(x, x[0] * 0 + 1),  # ones, on x's backend
     lambda x: (x - x.mean((1, 2), keepdims=True)) / np.sqrt(x.var((1, 2), keepdims=True) + 1e-5),
     [_X]),
    ("group_norm", lambda x, w, b: ops.group_norm(x, 2, w, b),
     lambda x, w, b: ((x.reshape(2, 2, 6) - x.reshape(2, 2, 6).mean(-1, keepdims=True))
                      / np.sqrt(x.reshape(2, 2, 6).var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
     * w[:, None, None] + b[:, None, None], [_G(2, 4, 3, 1), _G(4), _G(4)]),
    ("var", lambda x: ops.var(x, (0, 2), ddof=1), lambda x: x.var((0, 2), ddof=1), [_X]),
    ("var-all-keepdims", lambda x: ops.var(x, keepdims=True), lambda x: x.var(keepdims=True),
     [_X]),
    ("std", lambda x: ops.std(x, 1), lambda x: x.std(1), [_X * 1e3 + 1e4]),
    ("std-ddof-float", lambda x: ops.std(x, -1, 1.5, True),
     lambda x: x.std(-1, ddof=1.5, keepdims=True), [_X]),
    ("cross_entropy", ops.cross_entropy,
     lambda x, y: -ref_log_softmax(x)[np.arange(2), y].mean(), [_X[:, 0], np.array([2, 0])]),
    ("cross_entropy-spatial", lambda x, y: ops.cross_entropy(x, y, "none"),
     lambda x, y: -np.take_along_axis(ref_log_softmax(x, 1), y[:, None], 1)[:, 0],
     [_X, np.array([[0, 1, 2, 0], [2, 2, 1, 0]])]),
    ("mse_loss", ops.mse_loss, lambda a, b: ((a - b) ** 2).mean(), [_X, _X[::-1]]),
    ("mse_loss-sum", lambda a, b: ops.mse_loss(a, b, "sum"), lambda a, b: ((a - b) ** 2).sum(),
     [_X, _X[::-1]]),
    ("embedding", ops.embedding, lambda w, i: w[i], [_X[0], np.array([[2, 0], [1, 1]])]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("op", "ref", "inputs"), [pytest.param(*c[1:], id=c[0]) for c in FORWARD_CASES]
)
def test_forward_matches_numpy_reference(
    backend: Any, op: Callable[..., Any], ref: Callable[..., Any], inputs: list[np.ndarray]
) -> None:
    got = to_numpy(op(*(backend.asarray(a) for a in inputs)))
    np.testing.assert_allclose(got, ref(*inputs), rtol=1e-10, atol=1e-12)


_TAILS = np.array([-745.0, -700.0, -100.0, -40.0, -37.0, -30.0, -20.0, -10.0, -1e-3, 0.0, 1e-3,
                   10.0, 20.0, 40.0, 700.0, 1000.0])  # fmt: skip


def _logistic(x: float) -> float:
    # in double precision, each side in the form that does not cancel
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@pytest.mark.parametrize(("dtype", "rtol"), [(np.float64, 1e-15), (np.float32, 1e-6)])
def test_sigmoid_keeps_its_relative_precision_in_both_tails(
    backend: Any, dtype: Any, rtol: float
) -> None:
    x = _TAILS.astype(dtype)
    want = np.array([_logistic(float(v)) for v in x])
    got = to_numpy(ops.sigmoid(backend.asarray(x))).astype(np.float64)
    tiny = np.finfo(dtype).tiny  # below it a float32 result is subnormal or 0, as in torch
    np.testing.assert_allclose(got, np.where(want < tiny, got, want), rtol=rtol, atol=0)
    assert np.all(got[want < tiny] <= tiny)
    g = to_numpy(ann.grad(lambda x: ops.sum(ops.sigmoid(x)))(backend.asarray(x))).astype(float)
    # the derivative out * (1 - out), checked where it does not cancel (as in torch, 1 - out
    # loses digits for large positive x)
    dwant = want * (1 - want)
    keep = (x <= 0) & (dwant > tiny)
    np.testing.assert_allclose(g[keep], dwant[keep], rtol=10 * rtol, atol=0)


def test_max_pool_gradient_goes_to_the_first_maximum(backend: Any) -> None:
    x = backend.asarray(np.array([[[1.0, 3.0, 3.0, 0.0, 2.0, 2.0]]]))
    g = ann.grad(lambda x: ops.sum(ops.max_pool1d(x, 3, stride=1)))(x)
    # windows at 0..3: [1,3,3] [3,3,0] [3,0,2] [0,2,2]; the tied ones pick their first maximum
    np.testing.assert_array_equal(to_numpy(g), [[[0.0, 2.0, 1.0, 0.0, 1.0, 0.0]]])


_NAN = np.nan


@pytest.mark.parametrize(
    ("row", "grad"),
    [  # windows of 3 at stride 1; a NaN wins its windows, the last NaN of a window as in torch
        ([1.0, _NAN, 2.0, 0.0, 5.0, 3.0], [0.0, 2.0, 0.0, 0.0, 2.0, 0.0]),
        ([_NAN, 1.0, 2.0, 0.0, 5.0, 3.0], [1.0, 0.0, 1.0, 0.0, 2.0, 0.0]),
        ([1.0, _NAN, 2.0, _NAN, 5.0, 3.0], [0.0, 1.0, 0.0, 3.0, 0.0, 0.0]),
    ],
)
def test_max_pool_propagates_nan(backend: Any, row: list[float], grad: list[float]) -> None:
    x = np.array([[row]])
    y, pullback = ann.vjp(lambda x: ops.max_pool1d(x, 3, stride=1), backend.asarray(x))
    np.testing.assert_array_equal(to_numpy(y), ref_pool(x, (3,), (1,), (0,), "max"))
    g = backend.asarray(np.ones((1, 1, 4)))  # (the cotangent on the primal's device)
    np.testing.assert_array_equal(to_numpy(pullback(g)[0]), [[grad]])
    x2 = np.stack([x, x], axis=3)  # (1, 1, 6, 2): the same windows in two dimensions
    got = to_numpy(ops.max_pool2d(backend.asarray(x2), (3, 2), stride=1))
    np.testing.assert_array_equal(got, ref_pool(x2, (3, 2), (1, 1), (0, 0), "max"))


def test_max_pool_propagates_nan_as_torch() -> None:
    torch = pytest.importorskip("torch")
    x = np.array([[[1.0, _NAN, 2.0, _NAN, 5.0, 3.0, 1.0, _NAN]]])
    ct = np.arange(1.0, 5.0).reshape(1, 1, 4)
    y, pullback = ann.vjp(lambda x: ops.max_pool1d(x, 3, stride=2, padding=1), x)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool1d(tx, 3, 2, 1)
    (ty * torch.tensor(ct)).sum().backward()
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_array_equal(pullback(ct)[0], tx.grad.numpy())


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "bool"])
def test_max_pool_pads_integers_below_every_value(backend: Any, dtype: str) -> None:
    # The padding must never win: -inf cast to int8 or int16 is 0 and to bool True.
    lo = False if dtype == "bool" else np.iinfo(dtype).min
    x = np.array([[[lo, 1, lo, lo]]] if dtype != "bool" else [[[False, True, False, False]]], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns on the cast of -inf
        got = to_numpy(ops.max_pool1d(backend.asarray(x), 2, padding=1))
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, np.array([[[lo, 1, lo]]], dtype))


_FLOATS = ["float64", "float32", "float16", "bfloat16"]


def _float_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype ``name``; bfloat16 skips where ml_dtypes (optional) is not installed."""
    if name == "bfloat16":
        if BFLOAT16 is None:
            pytest.skip("bfloat16 needs the optional ml_dtypes package")
        return BFLOAT16
    return np.dtype(name)


# Inputs at the kinks of relu and abs: NaN, both zeros, the infinities; each exact in 16 bits.
_KINKS = np.array([_NAN, -1.5, -0.0, 0.0, 2.0, math.inf, -math.inf, _NAN])


def _against_torch(
    backend: Any,
    op: Any,
    torch_op: Any,
    dtype: str,
    cotangent: Any = None,
    signs: bool = False,
    rtol: float = 0.0,
) -> None:
    """``op``'s output and gradient at :data:`_KINKS` (cotangent: finite and nonzero unless
    given) equal torch's in ``dtype`` (NaN where torch's is; a zero's sign compared where
    ``signs``; within ``rtol`` where given)."""
    torch = pytest.importorskip("torch")
    dt = _float_dtype(dtype)
    x = _KINKS.astype(dt)
    if cotangent is None:
        cotangent = [0.75, -1.25, 3.0, -2.0, 0.5, 1.5, -0.25, -3.5]
    ct = np.array(cotangent).astype(dt)
    out, pullback = ann.vjp(op, backend.asarray(x))
    (g,) = pullback(backend.asarray(ct))
    assert out.dtype == g.dtype == dt
    tdtype = getattr(torch, dtype)
    tx = torch.tensor(x.astype(np.float64)).to(tdtype).requires_grad_()
    tout = torch_op(tx)
    (tg,) = torch.autograd.grad(tout, tx, torch.tensor(ct.astype(np.float64)).to(tdtype))
    np.testing.assert_allclose(
        to_numpy(out).astype(np.float64), tout.detach().double().numpy(), rtol, 0, err_msg="output"
    )
    np.testing.assert_allclose(
        to_numpy(g).astype(np.float64), tg.double().numpy(), rtol, 0, err_msg="gradient"
    )
    if signs:
        np.testing.assert_array_equal(
            np.signbit(to_numpy(g).astype(np.float64)), np.signbit(tg.double().numpy()),
            err_msg="the gradient's signs",
        )  # fmt: skip


@pytest.mark.parametrize("dtype", _FLOATS)
def test_relu_gradient_at_nan_passes_the_cotangent_as_torch(
    backend: Any, dtype: str, monkeypatch: Any
) -> None:
    # torch's rule is threshold_backward: the cotangent where not (out <= 0), so a NaN input
    # (a NaN output) passes it; ours masked with out > 0 and gave 0 there. The array code on
    # both backends (the GPU's fused kernel: test_the_fused_relu_gradient_at_nan_...)
    monkeypatch.setattr(type(backend), "fused_nn_kernels", lambda self: None)
    _against_torch(backend, ops.relu, lambda t: t.relu(), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")
@pytest.mark.parametrize("dtype", _FLOATS)
def test_the_fused_relu_gradient_at_nan_passes_the_cotangent_as_torch(dtype: str) -> None:
    from asyncnn.backends import get_backend

    _against_torch(get_backend("cupy"), ops.relu, lambda t: t.relu(), dtype)


# Infinite and NaN cotangents where the output is 0 (negative inputs, both zeros) and where it
# is not; a negative cotangent at a zero output
_WILD_COTANGENT = [_NAN, math.inf, -math.inf, -2.0, math.inf, -math.inf, _NAN, 1.0]


@pytest.mark.parametrize("dtype", _FLOATS)
def test_relu_gradient_drops_an_infinite_or_nan_cotangent_where_the_output_is_zero(
    backend: Any, dtype: str, monkeypatch: Any
) -> None:
    # torch selects the cotangent (threshold_backward): +0 where the output is 0, whatever the
    # cotangent; a product with the 0/1 mask gave NaN for an infinite or NaN one there (a
    # single overflowing unit then made NaN every gradient upstream), and -0 for a negative one
    monkeypatch.setattr(type(backend), "fused_nn_kernels", lambda self: None)
    _against_torch(backend, ops.relu, lambda t: t.relu(), dtype, _WILD_COTANGENT, signs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")
@pytest.mark.parametrize("dtype", _FLOATS)
def test_the_fused_relu_gradient_drops_an_infinite_cotangent_where_the_output_is_zero(
    dtype: str,
) -> None:
    from asyncnn.backends import get_backend

    _against_torch(
        get_backend("cupy"), ops.relu, lambda t: t.relu(), dtype, _WILD_COTANGENT, signs=True
    )


@pytest.mark.parametrize("dtype", _FLOATS)
def test_abs_gradient_at_nan_is_zero_as_torch(backend: Any, dtype: str) -> None:
    # torch's rule is g * sgn(x), and sgn(NaN) is 0; numpy's sign(NaN) is NaN, which made the
    # gradient NaN there
    _against_torch(backend, ops.abs, lambda t: t.abs(), dtype)
    for v, want in ((_NAN, 0.0), (-2.0, -1.0)):  # and of a 0-d array (numpy's sign: a scalar)
        x = backend.asarray(np.array(v).astype(_float_dtype(dtype)))
        assert float(to_numpy(ann.grad(ops.abs)(x))) == want


def _tf() -> Any:
    """torch.nn.functional (imported by the tests that skip without torch)."""
    import torch

    return torch.nn.functional


def _in_bulk(torch_op: Any, t: Any) -> Any:
    """``torch_op(t)`` computed among 64 entries: torch's CPU hardtanh gradient at NaN is 0 in
    its vectorized loop and the cotangent in its scalar tail (an 8-entry float32 tensor is all
    tail with AVX-512), so the rule most entries see is the one compared."""
    import torch

    return torch_op(torch.cat([t, t.new_zeros(64)]))[: len(t)]


# The new activations and clip at the kinks (NaN, both zeros, the infinities, a bound itself),
# against torch in every float dtype: values and gradients, bit for bit, the zeros' signs too.
_KINK_OPS = {
    "clip": (lambda x: ops.clip(x, 0.0, 2.0), lambda t: t.clamp(0.0, 2.0)),
    "clip-min": (lambda x: ops.clip(x, min=-1.5), lambda t: t.clamp(min=-1.5)),
    "clip-max": (lambda x: ops.clip(x, max=0.0), lambda t: t.clamp(max=0.0)),
    "clip-int-bounds": (lambda x: ops.clip(x, -1, 2), lambda t: t.clamp(-1, 2)),
    "clip-min-above-max": (lambda x: ops.clip(x, 2.0, -1.5), lambda t: t.clamp(2.0, -1.5)),
    "Hardtanh": (
        lambda x: ann.nn.Hardtanh(0.0, 2.0)({}, x),
        lambda t: _in_bulk(lambda t: _tf().hardtanh(t, 0.0, 2.0), t),
    ),
    "Hardtanh-default": (lambda x: ann.nn.Hardtanh()({}, x), lambda t: _in_bulk(_tf().hardtanh, t)),
    "leaky_relu": (ops.leaky_relu, lambda t: _tf().leaky_relu(t)),
    "leaky_relu-0.2": (lambda x: ops.leaky_relu(x, 0.2), lambda t: _tf().leaky_relu(t, 0.2)),
    "elu": (ops.elu, lambda t: _tf().elu(t)),
    "elu-0.5": (lambda x: ops.elu(x, alpha=0.5), lambda t: _tf().elu(t, 0.5)),
}

# (the torch functions of these compute with exp and log in other libraries' code: equal to a
# unit in the last place in float32 and float64; in 16 bits, computed in float32 and rounded
# once as torch does, they are equal)
_SMOOTH_OPS = {
    "silu": (ops.silu, lambda t: _tf().silu(t)),
    "softplus": (ops.softplus, lambda t: _tf().softplus(t)),
    "softplus-beta": (
        lambda x: ops.softplus(x, beta=0.5, threshold=1.0),
        lambda t: _tf().softplus(t, 0.5, 1.0),
    ),
    "log1p": (ops.log1p, lambda t: t.log1p()),
    "expm1": (ops.expm1, lambda t: t.expm1()),
    "sin": (ops.sin, lambda t: t.sin()),
    "cos": (ops.cos, lambda t: t.cos()),
}


@pytest.mark.parametrize("dtype", _FLOATS)
@pytest.mark.parametrize("name", sorted(_KINK_OPS))
def test_clip_and_the_activations_at_their_kinks_are_torch_s(
    backend: Any, name: str, dtype: str
) -> None:
    # clamp passes the gradient at a bound (x == min or max) and hardtanh does not; both give 0
    # at NaN; leaky_relu and elu give the negative side's slope at 0 and the positive's at NaN
    op, torch_op = _KINK_OPS[name]
    # (elu's exp(-1.5) is another library's in torch: a unit of float32's last place apart)
    rtol = 2.5e-7 if name.startswith("elu") and dtype == "float32" else 0.0
    _against_torch(backend, op, lambda t: torch_op(t), dtype, signs=True, rtol=rtol)
    _against_torch(
        backend, op, lambda t: torch_op(t), dtype, _WILD_COTANGENT, signs=True, rtol=rtol
    )


@pytest.mark.parametrize("dtype", _FLOATS)
def test_clip_takes_its_bounds_in_the_input_s_dtype_as_torch(backend: Any, dtype: str) -> None:
    # torch rounds a scalar bound to the input's dtype: an input equal to the rounded bound is
    # at the bound (gradient 1, value kept), where bfloat16 computed in float32 against the
    # bound itself took it for below it (gradient 0, the value rounded up to the next one)
    torch = pytest.importorskip("torch")
    dt = _float_dtype(dtype)
    lo, hi = 0.1001, 0.4999
    x = np.array([lo, hi, 0.09, 0.7, 0.3]).astype(dt)
    out, pullback = ann.vjp(lambda x: ops.clip(x, lo, hi), backend.asarray(x))
    (g,) = pullback(backend.asarray(np.ones(5, dt)))
    tx = torch.tensor(x.astype(np.float64)).to(getattr(torch, dtype)).requires_grad_()
    tout = tx.clamp(lo, hi)
    (tg,) = torch.autograd.grad(tout, tx, torch.ones_like(tout))
    assert out.dtype == g.dtype == dt
    np.testing.assert_array_equal(to_numpy(out).astype(np.float64), tout.detach().double())
    np.testing.assert_array_equal(to_numpy(g).astype(np.float64), tg.double().numpy())
    np.testing.assert_array_equal(to_numpy(g).astype(np.float64), [1, 1, 0, 0, 1])


@pytest.mark.parametrize("dtype", _FLOATS)
@pytest.mark.parametrize("name", sorted(_SMOOTH_OPS))
def test_the_smooth_new_ops_at_special_values_are_torch_s(
    backend: Any, name: str, dtype: str
) -> None:
    op, torch_op = _SMOOTH_OPS[name]
    # (torch's bfloat16 gradients of expm1 and cos round twice, the derivative and then the
    # product, where ours are computed in float32 and rounded once: a unit of the last place)
    rtol = {"float64": 1e-15, "float32": 1e-6, "bfloat16": 8e-3}.get(dtype, 0.0)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")  # (numpy's words on log1p(-1.5) and sin(inf))
        _against_torch(backend, op, lambda t: torch_op(t), dtype, rtol=rtol)


@pytest.mark.parametrize("name", ["silu", "softplus", "leaky_relu", "elu"])
def test_the_activations_of_integers_are_refused_as_torch_s(name: str) -> None:
    fn = {**_KINK_OPS, **_SMOOTH_OPS}[name][0]
    with pytest.raises(TypeError, match=r"must be floating point, got dtype int64"):
        fn(np.arange(3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_max_pool_adds_overlapping_gradients_in_float32(backend: Any, dtype: str) -> None:
    # overlapping windows (stride < kernel) send an entry the gradients of every window whose
    # maximum it is; added in 16 bits, 2048 + 1 + 1 stayed 2048 in float16 (256 + 1 + 1 stayed
    # 256 in bfloat16). They add up in float32 and are rounded once, as the average pool's
    dt = _float_dtype(dtype)
    big = 2048.0 if dtype == "float16" else 256.0
    x = np.array([[[0.0, 1.0, 9.0, 1.0, 0.0]]]).astype(dt)  # 9 is the maximum of all 3 windows
    ct = np.array([[[1.0, 1.0, big]]]).astype(dt)
    y, pullback = ann.vjp(lambda x: ops.max_pool1d(x, 3, stride=1), backend.asarray(x))
    (g,) = pullback(backend.asarray(ct))
    assert y.dtype == g.dtype == dt  # (cupy's where made a bfloat16 maximum float32)
    np.testing.assert_array_equal(to_numpy(g).astype(np.float32), [[[0, 0, big + 2, 0, 0]]])
    # and in two dimensions, with padding: each entry's sum of up to 9 window gradients, from
    # float32 rounded once
    rng = np.random.default_rng(0)
    x2 = rng.permutation(64 * 2).reshape(1, 2, 8, 8).astype(dt)  # distinct: one maximum each
    y2, pullback2 = ann.vjp(lambda x: ops.max_pool2d(x, 3, 1, 1), backend.asarray(x2))
    ct2 = (rng.standard_normal(y2.shape) * 100).astype(dt)
    (g2,) = pullback2(backend.asarray(ct2))
    _, pullback32 = ann.vjp(lambda x: ops.max_pool2d(x, 3, 1, 1), x2.astype(np.float32))
    (want,) = pullback32(ct2.astype(np.float32))
    assert g2.dtype == dt
    np.testing.assert_array_equal(
        to_numpy(g2).astype(np.float32), want.astype(dt).astype(np.float32)
    )


def test_softmax_handles_rows_of_minus_infinity(backend: Any) -> None:
    x = backend.asarray(np.array([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf]]))
    lse = to_numpy(ops.logsumexp(x))
    assert lse[1] == -np.inf and np.isclose(lse[0], np.log(1 + np.e))
    p = to_numpy(ops.softmax(x))
    np.testing.assert_allclose(p[0], [1 / (1 + np.e), 0, np.e / (1 + np.e)])
    assert np.isnan(p[1]).all()  # as torch: a row with nothing to normalize has no softmax
    np.testing.assert_allclose(np.exp(to_numpy(ops.log_softmax(x))[0]), p[0])
    assert np.isnan(to_numpy(ops.log_softmax(x))[1]).all()


# -- torch as the second reference ----------------------------------------------------------------
def same(name: str, shapes: list[Any], *params: Any, **kw: Any) -> Any:
    """A case where our op and torch.nn.functional's share name and signature."""
    return pytest.param(
        lambda *a: getattr(ops, name)(*a, *params, **kw),
        lambda F, *a: getattr(F, name)(*a, *params, **kw),  # noqa: N803
        shapes,
        id=f"{name}{params or ''}{kw or ''}",
    )


def other(name: str, op: Any, torch_op: Any, shapes: list[Any]) -> Any:
    return pytest.param(op, torch_op, shapes, id=name)


# shapes: float inputs; an int n stands for integer labels/ids in [0, n)
TORCH_CASES = [
    other("softmax", lambda x: ops.softmax(x, 1), lambda F, x: F.softmax(x, 1), [(2, 3, 4)]),
    other("log_softmax", ops.log_softmax, lambda F, x: F.log_softmax(x, -1), [(3, 5)]),
    other("logsumexp", lambda x: ops.logsumexp(x, 0, True),
          lambda F, x: x.logsumexp(0, True), [(3, 4)]),
    other("layer_norm", ops.layer_norm, lambda F, x, w, b: F.layer_norm(x, w.shape, w, b),
          [(2, 3, 4), (3, 4), (3, 4)]),
    other("embedding", ops.embedding, lambda F, w, i: F.embedding(i, w), [(6, 3), 6]),
    other("group_norm", lambda x, w, b: ops.group_norm(x, 3, w, b),
          lambda F, x, w, b: F.group_norm(x, 3, w, b), [(2, 6, 4, 3), (6,), (6,)]),
    other("group_norm-plain-3d", lambda x: ops.group_norm(x, 2, eps=1e-3),
          lambda F, x: F.group_norm(x, 2, eps=1e-3), [(3, 4, 5)]),
    other("group_norm-2d-input", lambda x, w: ops.group_norm(x, 4, w),
          lambda F, x, w: F.group_norm(x, 4, w), [(3, 8), (8,)]),
    other("var", ops.var, lambda F, x: x.var(correction=0), [(3, 4)]),
    other("var-axis-ddof1", lambda x: ops.var(x, 1, ddof=1),
          lambda F, x: x.var(1, correction=1), [(2, 5, 3)]),
    other("var-tuple-keepdims", lambda x: ops.var(x, (0, -1), 2, True),
          lambda F, x: x.var((0, -1), correction=2, keepdim=True), [(2, 5, 3)]),
    other("std", ops.std, lambda F, x: x.std(correction=0), [(3, 4)]),
    other("std-axis-ddof1", lambda x: ops.std(x, 0, ddof=1),
          lambda F, x: x.std(0, correction=1), [(4, 3)]),
    other("std-tuple-keepdims", lambda x: ops.std(x, (1, 2), keepdims=True),
          lambda F, x: x.std((1, 2), correction=0, keepdim=True), [(2, 5, 3)]),
    same("gelu", [(3, 4)]),
    same("leaky_relu", [(3, 4)]),
    same("leaky_relu", [(3, 4)], 0.2),
    same("leaky_relu", [(3, 4)], negative_slope=-0.5),
    same("elu", [(3, 4)]),
    same("elu", [(3, 4)], 0.5),
    same("elu", [(3, 4)], alpha=2.0),
    same("silu", [(3, 4)]),
    same("softplus", [(3, 4)]),
    same("softplus", [(3, 4)], 2.0),
    same("softplus", [(3, 4)], beta=3.0, threshold=1.0),
    other("Hardtanh", lambda x: ann.nn.Hardtanh()({}, x), lambda F, x: F.hardtanh(x), [(3, 4)]),
    other("Hardtanh(-0.5, 0.75)", lambda x: ann.nn.Hardtanh(-0.5, 0.75)({}, x),
          lambda F, x: F.hardtanh(x, -0.5, 0.75), [(3, 4)]),
    other("clip", lambda x: ops.clip(x, -0.5, 0.75), lambda F, x: x.clamp(-0.5, 0.75), [(3, 4)]),
    other("clip-min", lambda x: ops.clip(x, min=0.1), lambda F, x: x.clamp(min=0.1), [(3, 4)]),
    other("clip-max", lambda x: ops.clip(x, max=0.1), lambda F, x: x.clamp(max=0.1), [(3, 4)]),
    other("log1p", lambda x: ops.log1p(ops.abs(x)), lambda F, x: x.abs().log1p(), [(3, 4)]),
    other("expm1", ops.expm1, lambda F, x: x.expm1(), [(3, 4)]),
    other("sin", ops.sin, lambda F, x: x.sin(), [(3, 4)]),
    other("cos", ops.cos, lambda F, x: x.cos(), [(3, 4)]),
    same("gelu", [(3, 4)], approximate="tanh"),
    same("conv1d", [(2, 3, 10), (4, 3, 3), (4,)], 2, 3, 2),
    same("conv2d", [(2, 3, 7, 6), (5, 3, 3, 2), (5,)], (2, 1), (1, 2), (1, 2)),
    same("conv2d", [(1, 2, 5, 5), (3, 2, 2, 2)]),
    same("max_pool1d", [(2, 3, 9)], 3, 2, 1),
    same("max_pool2d", [(2, 3, 6, 5)], 2),
    same("max_pool2d", [(1, 2, 7, 5)], (3, 2), (2, 1), (1, 1)),
    same("max_pool2d", [(1, 2, 8, 6)], 3, 2, ceil_mode=True),
    same("max_pool2d", [(2, 2, 8, 7)], (3, 2), (2, 3), (1, 0), ceil_mode=True),
    same("max_pool1d", [(2, 3, 10)], 3, 2, 1, 2, True),
    same("avg_pool1d", [(2, 3, 9)], 4, 2, 2),
    same("avg_pool2d", [(2, 2, 7, 6)], 3, 2, 1),
    same("avg_pool1d", [(2, 3, 8)], 3, 2, 1, ceil_mode=True),
    same("avg_pool1d", [(2, 3, 9)], 4, 2, 2, count_include_pad=False),
    same("avg_pool2d", [(2, 2, 7, 6)], 3, 2, 1, ceil_mode=True, count_include_pad=False),
    same("avg_pool2d", [(1, 2, 6, 5)], (3, 2), (2, 3), (1, 0), ceil_mode=True),
    same("cross_entropy", [(5, 4), 4]),
    same("cross_entropy", [(2, 4, 3, 2), 4], reduction="sum"),
    same("cross_entropy", [(5, 3), 3], reduction="none"),
    same("mse_loss", [(3, 4), (3, 4)]),
]  # fmt: skip


@pytest.mark.parametrize(("op", "torch_op", "specs"), TORCH_CASES)
def test_matches_torch(
    backend: Any, op: Callable[..., Any], torch_op: Callable[..., Any], specs: list[Any]
) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    host: list[np.ndarray] = []
    for s in specs:
        if isinstance(s, int):  # integer labels/ids below s, shaped like the previous input
            prev = host[0].shape  # labels (N, d...) for logits (N, C, d...); ids (n,) for (n, d)
            shape = prev[:1] + prev[2:]
            host.append(rng.integers(0, s, shape))
        else:
            host.append(rng.standard_normal(s))
    ours, pullback = ann.vjp(op, *(backend.asarray(h) for h in host))
    tins = [torch.tensor(h, requires_grad=h.dtype.kind == "f") for h in host]
    tout = torch_op(torch.nn.functional, *tins)
    np.testing.assert_allclose(to_numpy(ours), tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    ct = rng.standard_normal(tout.shape)
    grads = pullback(backend.asarray(ct))
    tgrads = torch.autograd.grad(tout, [t for t in tins if t.requires_grad], torch.tensor(ct))
    floats = [g for g, h in zip(grads, host, strict=True) if h.dtype.kind == "f"]
    for g, tg in zip(floats, tgrads, strict=True):
        np.testing.assert_allclose(to_numpy(g), tg.numpy(), rtol=1e-10, atol=1e-12)


# Values a user hits at the edges (ties, zeros, infinities, NaN, empty axes), forward and gradient
# against torch in float64, NaN where torch gives NaN. Each input is given as its values.
def edge(name: str, op: Any, torch_op: Any, *inputs: Any) -> Any:
    return pytest.param(op, torch_op, [np.asarray(x, dtype=float) for x in inputs], id=name)


NAN, INF = math.nan, math.inf


def _labels_on(x: Any, labels: list[int]) -> Any:
    """int64 ``labels`` on the device of ``x`` (traced: of its value; a GPU case's are cupy's)."""
    return array_namespace(ops.raw(x)).asarray(np.array(labels, dtype=np.int64))


TIES = [[1.0, 3.0, 3.0], [3.0, 0.0, 2.0]]
GRID = np.arange(24.0).reshape(2, 3, 4) % 5  # repeated values: ties in every reduction
MASK = np.array([True, False, True, True])
EDGE_CASES = [
    edge("abs-at-0", ops.abs, lambda t, x: x.abs(), [0.0, -1.5, 2.0]),
    edge("sqrt-at-0", ops.sqrt, lambda t, x: x.sqrt(), [0.0, 4.0]),
    edge("log-at-0", ops.log, lambda t, x: x.log(), [0.0, 4.0, -1.0]),
    edge("exp-overflow", ops.exp, lambda t, x: x.exp(), [800.0, -800.0, 0.0]),
    edge("power-negative-base-int", lambda a: a**3, lambda t, a: a**3, [-2.0, -0.5, 0.0, 1.5]),
    edge("power-negative-int", lambda a: ops.power(a, -2), lambda t, a: a**-2, [-2.0, -0.5, 1.5]),
    edge("power-negative-base-array", ops.power, lambda t, a, b: a**b,
         [-2.0, -0.5, 0.0, 0.0, 0.0], [2.0, 3.0, 2.0, 0.0, 0.5]),
    # d/da a**0 is 0 at an infinite or NaN base too (it was 0 * inf = NaN)
    edge("power-0-exponent-nonfinite-base", ops.power, lambda t, a, b: a**b,
         [INF, -INF, NAN, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]),
    edge("power-int-0-nonfinite-base", lambda a: a**0, lambda t, a: a**0, [INF, -INF, NAN, 2.0]),
    edge("power-0-exponent-broadcast", ops.power, lambda t, a, b: a**b, [[INF], [NAN]],
         [0.0, 2.0, 0.0]),
    edge("divide-by-0", ops.divide, lambda t, a, b: a / b, [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]),
    edge("maximum-ties-and-nan", ops.maximum, lambda t, a, b: a.maximum(b),
         [1.0, 2.0, 3.0, NAN, 2.0], [1.0, 1.0, 4.0, 1.0, NAN]),
    edge("minimum-ties-and-nan", ops.minimum, lambda t, a, b: a.minimum(b),
         [1.0, 2.0, 3.0, NAN, 2.0], [1.0, 1.0, 4.0, 1.0, NAN]),
    edge("maximum-ties-broadcast", ops.maximum, lambda t, a, b: a.maximum(b), [[1.0], [2.0]],
         [1.0, 2.0, 3.0]),
    edge("max-all-ties", ops.max, lambda t, x: x.max(), TIES),
    edge("max-axis-ties", lambda x: ops.max(x, axis=1), lambda t, x: x.amax(1), TIES),
    edge("max-neg-axis-ties", lambda x: ops.max(x, -2), lambda t, x: x.amax(-2), GRID),
    edge("min-tuple-keepdims-ties", lambda x: ops.min(x, (0, -1), keepdims=True),
         lambda t, x: x.amin((0, -1), keepdim=True), GRID),
    edge("max-nan-inf", lambda x: ops.max(x, 1), lambda t, x: x.amax(1),
         [[1.0, NAN, 3.0], [-INF, -INF, -INF], [1.0, INF, INF]]),
    edge("max-0d", ops.max, lambda t, x: x.amax(), 2.0),
    edge("logsumexp-inf", lambda x: ops.logsumexp(x, 1), lambda t, x: x.logsumexp(1),
         [[0.0, -INF, 1.0], [-INF, -INF, -INF], [0.0, INF, 1.0], [1000.0, 1000.0, -1000.0]]),
    edge("logsumexp-nan", ops.logsumexp, lambda t, x: x.logsumexp(-1), [[0.0, NAN], [1.0, 2.0]]),
    edge("logsumexp-empty-axis", lambda x: ops.logsumexp(x, 1), lambda t, x: x.logsumexp(1),
         np.zeros((3, 0))),
    edge("logsumexp-empty-axis-keepdims", lambda x: ops.logsumexp(x, 0, keepdims=True),
         lambda t, x: x.logsumexp(0, keepdim=True), np.zeros((0, 2))),
    edge("logsumexp-no-rows", ops.logsumexp, lambda t, x: x.logsumexp(-1), np.zeros((0, 3))),
    # a row holding +inf: NaN throughout, as torch and as ops.cross_entropy (its max was taken
    # for a row of -inf and shifted by 0, which gave [nan, 0, 0])
    edge("softmax-posinf", ops.softmax, lambda t, x: x.softmax(-1),
         [[INF, 0.0, 1.0], [1.0, 2.0, 3.0], [-INF, INF, -INF]]),
    edge("log_softmax-posinf", lambda x: ops.log_softmax(x, 0), lambda t, x: x.log_softmax(0),
         [[INF, 0.0, -INF], [1.0, 2.0, -INF]]),
    edge("cross_entropy-posinf", lambda x: ops.cross_entropy(x, _labels_on(x, [0, 2])),
         lambda t, x: _tf().cross_entropy(x, t.tensor([0, 2])),
         [[INF, 0.0, 1.0], [1.0, 2.0, 3.0]]),
    edge("cross_entropy-no-rows", lambda x: ops.cross_entropy(x, _labels_on(x, [])),
         lambda t, x: _tf().cross_entropy(x, t.zeros(0, dtype=t.int64)),
         np.zeros((0, 3))),
    edge("softmax-empty-axis", ops.softmax, lambda t, x: x.softmax(-1), np.zeros((2, 0))),
    edge("log_softmax-empty-axis", ops.log_softmax, lambda t, x: x.log_softmax(-1),
         np.zeros((2, 0))),
    edge("sum-none", ops.sum, lambda t, x: x.sum(), GRID),
    edge("sum-none-keepdims", lambda x: ops.sum(x, keepdims=True),
         lambda t, x: x.sum((0, 1, 2), keepdim=True), GRID),
    edge("sum-negative-tuple-keepdims", lambda x: ops.sum(x, (-1, 0), keepdims=True),
         lambda t, x: x.sum((-1, 0), keepdim=True), GRID),
    edge("mean-negative-tuple", lambda x: ops.mean(x, (-1, 1)), lambda t, x: x.mean((-1, 1)),
         GRID),
    edge("mean-none-keepdims", lambda x: ops.mean(x, None, True),
         lambda t, x: x.mean((0, 1, 2), keepdim=True), GRID),
    edge("sum-no-rows", lambda x: ops.sum(x, 0), lambda t, x: x.sum(0), np.zeros((0, 3))),
    edge("mean-over-rows-of-none", lambda x: ops.mean(x, 1), lambda t, x: x.mean(1),
         np.zeros((0, 3))),
    # torch's std gradient is 0 at zero variance (a constant group), not 0/0; with one entry
    # and ddof=1 both are NaN (tests/test_ops_errors.py); var's gradient at zero variance is 0 (2 * g * 0 / n)
    edge("std-constant-rows", lambda x: ops.std(x, 1), lambda t, x: x.std(1, correction=0),
         [[2.0, 2.0, 2.0], [1.0, 2.0, 4.0]]),
    edge("std-constant-rows-ddof1-keepdims", lambda x: ops.std(x, 0, 1, True),
         lambda t, x: x.std(0, correction=1, keepdim=True), [[3.0, 1.0], [3.0, 2.0]]),
    edge("var-constant", ops.var, lambda t, x: x.var(correction=0), [[7.0, 7.0], [7.0, 7.0]]),
    edge("std-inf", lambda x: ops.std(x, 1), lambda t, x: x.std(1, correction=0),
         [[1.0, INF], [1.0, NAN], [0.0, 1.0]]),
    edge("var-0d", ops.var, lambda t, x: x.var(correction=0), 3.0),
    edge("group_norm-constant-group", lambda x: ops.group_norm(x, 2),
         lambda t, x: _tf().group_norm(x, 2), [[[1.0], [1.0], [0.0], [3.0]]]),
    edge("sum-0d", ops.sum, lambda t, x: x.sum(), 3.0),
    edge("mean-0d", ops.mean, lambda t, x: x.mean(), 3.0),
    edge("matmul-vec-vec", ops.matmul, lambda t, a, b: a @ b, [1.0, 2.0, 3.0], [0.5, -1.0, 2.0]),
    edge("matmul-vec-batch", ops.matmul, lambda t, a, b: a @ b, GRID[0, :, 0], GRID[:, :, :2]),
    edge("matmul-batch-vec", ops.matmul, lambda t, a, b: a @ b, GRID, GRID[0, 0]),
    edge("matmul-broadcast-batch", ops.matmul, lambda t, a, b: a @ b, GRID[:, None],
         np.repeat(GRID[0].T[None] - 2, 3, 0)),
    edge("matmul-no-rows", ops.matmul, lambda t, a, b: a @ b, np.zeros((0, 4)), GRID[0].T),
    edge("matmul-empty-inner", ops.matmul, lambda t, a, b: a @ b, np.zeros((3, 0)),
         np.zeros((0, 2))),
    edge("getitem-negative-steps", lambda x: x[::-1, ::-2], lambda t, x: x.flip(0)[:, [3, 1]],
         GRID[0]),
    edge("getitem-repeats", lambda x: x[np.array([0, 0, 2, -1])], lambda t, x: x[[0, 0, 2, -1]],
         GRID[0]),
    edge("getitem-mixed", lambda x: x[1:, np.array([1, 1, 0])], lambda t, x: x[1:, [1, 1, 0]],
         GRID[0]),
    edge("getitem-split-arrays", lambda x: x[np.array([0, 0]), :, np.array([1, 1])],
         lambda t, x: x[[0, 0], :, [1, 1]], GRID),
    edge("getitem-mask", lambda x: x[MASK[:3], 1], lambda t, x: x[t.tensor(MASK[:3]), 1],
         GRID[0]),
    edge("getitem-mask-columns", lambda x: x[:, MASK], lambda t, x: x[:, t.tensor(MASK)], GRID[0]),
    edge("getitem-mask-2d", lambda x: x[GRID[0] > 2], lambda t, x: x[x > 2], GRID[0]),
    edge("take-repeats-negative", lambda x: ops.take(x, np.array([[3, 3], [-1, 0]]), axis=-1),
         lambda t, x: x[:, :, [[3, 3], [3, 0]]], GRID),
    edge("where-scalar-broadcast", lambda x: ops.where(MASK[:3, None], x, 0.0),
         lambda t, x: t.where(t.tensor(MASK[:3, None]), x, 0.0), GRID[0]),
    edge("divide-broadcast", ops.divide, lambda t, a, b: a / b, GRID[:, None, :1, :3] - 2.5,
         GRID[0, :, :1] + 1),
    edge("multiply-to-no-rows", ops.multiply, lambda t, a, b: a * b, [[1.0, 2.0, 3.0]],
         np.zeros((0, 3))),
    edge("concatenate-no-rows", lambda a, b: ops.concatenate([a, b]), lambda t, a, b: t.cat([a, b]),
         np.zeros((0, 3)), GRID[0, :, :3]),
    edge("stack-negative-axis", lambda a, b: ops.stack([a, b], -2),
         lambda t, a, b: t.stack([a, b], -2), GRID[0], GRID[1]),
    edge("unstack-middle-axis", lambda x: ops.stack(ops.unstack(x, 1)[::-2], axis=-1),
         lambda t, x: t.stack(x.unbind(1)[::-2], -1), GRID),
    edge("broadcast_to-no-rows", lambda x: ops.broadcast_to(x, (0, 3)),
         lambda t, x: x.broadcast_to((0, 3)), [[1.0, 2.0, 3.0]]),
]  # fmt: skip


@pytest.mark.parametrize(("op", "torch_op", "inputs"), EDGE_CASES)
def test_edge_values_match_torch(
    backend: Any, op: Callable[..., Any], torch_op: Callable[..., Any], inputs: list[np.ndarray]
) -> None:
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # numpy's words on log(0) and the mean of nothing
        ours, pullback = ann.vjp(op, *(backend.asarray(h) for h in inputs))
        ct = np.random.default_rng(5).standard_normal(np.shape(ours))
        grads = pullback(backend.asarray(ct))
    tins = [torch.tensor(h, requires_grad=True) for h in inputs]
    tout = torch_op(torch, *tins)
    assert ours.shape == tuple(tout.shape)
    np.testing.assert_allclose(to_numpy(ours), tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    tgrads = torch.autograd.grad(tout, tins, torch.tensor(ct), allow_unused=True)
    for i, (g, tg) in enumerate(zip(grads, tgrads, strict=True)):
        want = np.zeros(inputs[i].shape) if tg is None else tg.numpy()
        assert g.shape == want.shape, f"input {i}"
        np.testing.assert_allclose(to_numpy(g), want, rtol=1e-10, atol=1e-12, err_msg=f"input {i}")


def test_cross_entropy_gives_torchs_nan_without_numpys_warnings() -> None:
    # (a row holding +inf warned of an invalid subtraction, and the mean over no rows of an
    # empty slice and, in its gradient, of a division by zero: the answers, as torch's, are no
    # accident; tests turn warnings into errors)
    loss, pullback = ann.vjp(lambda x: ops.cross_entropy(x, np.array([0])), np.array([[INF, 0.0]]))
    assert np.isnan(loss) and np.isnan(pullback(1.0)[0]).all()
    loss, pullback = ann.vjp(lambda x: ops.cross_entropy(x, np.zeros(0, int)), np.zeros((0, 3)))
    assert np.isnan(loss) and pullback(1.0)[0].shape == (0, 3)


#: the values where libraries part ways: signed zeros, infinities, a negative base, NaN
_SPECIAL = [-math.inf, -2.0, -1.0, -0.0, 0.0, 1.0, math.inf, math.nan]


def _bits_differ(ours: np.ndarray, theirs: np.ndarray) -> list[int]:
    """Where two float arrays differ in their bits, any NaN equal to any other (its sign and
    payload are no library's promise)."""
    same = (ours.view(f"u{ours.itemsize}") == theirs.view(f"u{theirs.itemsize}")) | (
        np.isnan(ours) & np.isnan(theirs)
    )
    return [i for i in range(ours.size) if not same[i]]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "exponent", [0.5, -0.5, 1.5, -1.5, 2.0, 3, -1, -2.0, 0, 1.0, 2.5, 1 / 3, "sqrt"], ids=str
)
def test_power_and_sqrt_match_torch_bit_for_bit_at_special_values(
    backend: Any, dtype: str, exponent: Any
) -> None:
    # (x ** 0.5 had the gradient 0 at -inf where torch's is NaN, and +inf at -0.0 where torch's
    # is -inf: torch takes a ** -0.5 as 1 / sqrt(a), numpy's pow gives 0 and +inf there; so did
    # the value of x ** -0.5. float16 is left out: torch's CPU float16 a ** 0.5 is pow, not
    # sqrt, so +inf at -inf)
    torch = pytest.importorskip("torch")
    x = np.array(_SPECIAL, dtype=dtype)
    if exponent == "sqrt":
        op, torch_op = ops.sqrt, torch.sqrt
    else:
        op, torch_op = (lambda a: a**exponent), (lambda t: t**exponent)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        ours, pullback = ann.vjp(op, backend.asarray(x))
        (grad,) = pullback(backend.asarray(np.ones_like(x)))
    t = torch.tensor(x, requires_grad=True)
    out = torch_op(t)
    (t_grad,) = torch.autograd.grad(out, [t], torch.ones_like(out))
    ours, grad = to_numpy(ours), to_numpy(grad)
    assert ours.dtype == grad.dtype == np.dtype(dtype)
    wrong = _bits_differ(ours, out.detach().numpy())
    assert not wrong, f"values at {x[wrong]}: {ours[wrong]}, torch {out.detach().numpy()[wrong]}"
    wrong = _bits_differ(grad, t_grad.numpy())
    assert not wrong, f"gradients at {x[wrong]}: {grad[wrong]}, torch {t_grad.numpy()[wrong]}"


@pytest.mark.parametrize("base", ["float64", "float32"])
@pytest.mark.parametrize("scalar", [np.float64, np.float32])
def test_a_numpy_scalar_exponent_powers_as_torchs_rsqrt(
    backend: Any, base: str, scalar: Any
) -> None:
    # (np.float64(-0.5) and np.float32(-0.5) took numpy's pow, where -0.5 takes torch's
    # 1 / sqrt, as torch does for any scalar exponent: 0 and +inf at -inf and -0.0 where torch
    # gives NaN and -inf, in the value of x ** -0.5 and the gradient of x ** 0.5; the dtype is
    # numpy's promotion, a float32 base and a float64 scalar making float64)
    def power(x: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            out, pullback = ann.vjp(lambda a: a**b, x)
            (grad,) = pullback(backend.xp.ones_like(out))
        return to_numpy(out), to_numpy(grad)

    x = backend.asarray(np.array(_SPECIAL, dtype=base))
    promoted = np.result_type(np.dtype(base), scalar(0.5))
    value, _ = power(x, scalar(-0.5))
    _, grad = power(x, scalar(0.5))
    assert value.dtype == promoted and grad.dtype == np.dtype(base)
    assert np.isnan(value[0]) and value[3] == -np.inf and np.signbit(value[3])  # at -inf, -0.0
    assert np.isnan(grad[0]) and grad[3] == -np.inf
    if promoted == np.dtype(base):  # the same bits as the Python number's everywhere
        for b in (-0.5, 0.5):
            (v, g), (nv, ng) = power(x, b), power(x, scalar(b))
            assert not _bits_differ(nv, v) and not _bits_differ(ng, g), b


def test_a_mean_over_nothing_has_a_quiet_gradient(backend: Any) -> None:
    x = backend.asarray(np.zeros((0, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's "Mean of empty slice", in the forward only
        out, pullback = ann.vjp(lambda x: ops.mean(x, axis=0), x)
    assert np.isnan(to_numpy(out)).all()
    (g,) = pullback(backend.xp.ones(3))  # warnings are errors here: no 0/0 warning for nothing
    assert g.shape == (0, 3)


def test_a_nan_extremum_gives_nan_gradients_quietly(backend: Any) -> None:
    x = backend.asarray(np.array([[1.0, np.nan, 3.0], [3.0, 0.0, 2.0]]))
    for op in (ops.max, ops.min):  # warnings are errors here, as in a user's strict test suite
        g = to_numpy(ann.grad(lambda x, op=op: ops.sum(op(x, axis=1)))(x))
        assert np.isnan(g[0]).all()  # as torch.amax: the NaN group's gradient is NaN
        np.testing.assert_array_equal(g[1], [1.0, 0.0, 0.0] if op is ops.max else [0.0, 1.0, 0.0])


def test_max_and_min_give_zero_away_from_the_extremum_whatever_the_cotangent(backend: Any) -> None:
    # torch's max and min select: the mask's 0 times an infinite cotangent gave NaN to every
    # entry but the extremum (ties still share; a NaN group's gradient stays NaN, above)
    x = backend.asarray(np.array([[-1.0, 2.0, 3.0], [5.0, 0.0, 5.0]]))
    for op, full, rows in (
        (ops.max, [[0, 0, 0], [math.inf, 0, math.inf]], [[0, 0, math.inf], [math.inf, 0, math.inf]]),
        (ops.min, [[math.inf, 0, 0], [0, 0, 0]], [[math.inf, 0, 0], [0, math.inf, 0]]),
    ):  # fmt: skip
        for axis, want in ((None, full), (1, rows)):
            out, pullback = ann.vjp(lambda x, op=op, axis=axis: op(x, axis=axis), x)
            (g,) = pullback(backend.asarray(np.full(np.shape(out), math.inf)))
            np.testing.assert_array_equal(to_numpy(g), want, err_msg=f"{op.__name__} {axis}")


# -- selects where torch selects: infinite cotangents, windows of -inf, rows holding +inf --------
def _binary_against_torch(
    backend: Any, op: Any, torch_op: Any, a: Any, b: Any, ct: Any, dtype: str
) -> None:
    """``op(a, b)``'s output and both gradients (zeros' signs too) equal torch's in ``dtype``."""
    torch = pytest.importorskip("torch")
    dt = _float_dtype(dtype)
    a, b, ct = (np.asarray(v, dtype=np.float64).astype(dt) for v in (a, b, ct))
    out, pullback = ann.vjp(op, backend.asarray(a), backend.asarray(b))
    grads = pullback(backend.asarray(ct))
    tdtype = getattr(torch, dtype)
    ta, tb = (torch.tensor(v.astype(np.float64)).to(tdtype).requires_grad_() for v in (a, b))
    tout = torch_op(ta, tb)
    tgrads = torch.autograd.grad(tout, (ta, tb), torch.tensor(ct.astype(np.float64)).to(tdtype))
    np.testing.assert_array_equal(to_numpy(out).astype(np.float64), tout.detach().double())
    for i, (g, tg) in enumerate(zip(grads, tgrads, strict=True)):
        assert g.dtype == dt
        got, want = to_numpy(g).astype(np.float64), tg.double().numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"gradient {i}")
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want), err_msg=f"signs {i}")


# a wins, b wins, a tie, a NaN on either side; each cotangent infinite or NaN somewhere
_EXTREMUM_A = [3.0, -1.0, 2.0, _NAN, 1.0, 4.0, -2.0, 0.0]
_EXTREMUM_B = [1.0, 5.0, 2.0, 1.0, _NAN, -4.0, 2.0, 0.0]
_EXTREMUM_CT = [math.inf, -math.inf, math.inf, _NAN, -math.inf, _NAN, _NAN, -2.0]


@pytest.mark.parametrize("dtype", _FLOATS)
@pytest.mark.parametrize("name", ["maximum", "minimum"])
def test_the_losing_side_of_maximum_and_minimum_gets_zero_whatever_the_cotangent(
    backend: Any, name: str, dtype: str
) -> None:
    # torch selects (masked_fill of the loser): g times the loser's 0 gave NaN for an infinite
    # cotangent, e.g. in maximum(x, 0), a hand-written clamp, after a loss overflowed
    op, torch_op = getattr(ops, name), lambda a, b: getattr(a, name)(b)
    _binary_against_torch(backend, op, torch_op, _EXTREMUM_A, _EXTREMUM_B, _EXTREMUM_CT, dtype)
    # broadcast against a row and a 0-d array: the loser's zeros, then summed
    a2 = np.array(_EXTREMUM_A).reshape(2, 4)
    ct2 = [[math.inf, -math.inf, math.inf, 1.0], [math.inf, 1.0, math.inf, -2.0]]
    _binary_against_torch(backend, op, torch_op, a2, [0.0, 1.0, -3.0, 0.0], ct2, dtype)
    _binary_against_torch(backend, op, torch_op, 2.0, 1.0, math.inf, dtype)


def test_maximum_with_a_python_zero_drops_an_infinite_cotangent(backend: Any) -> None:
    x = backend.asarray(np.array([-1.0, 2.0, 0.0]))
    _, pullback = ann.vjp(lambda x: ops.maximum(x, 0.0), x)
    (g,) = pullback(backend.asarray(np.array([math.inf, 1.0, math.inf])))
    np.testing.assert_array_equal(to_numpy(g), [0.0, 1.0, math.inf / 2])  # a tie halves it


def test_relu_and_maximum_of_a_0_d_array_have_gradients(backend: Any) -> None:
    # (a 0-d mask's astype is a numpy scalar, which the bitwise select wrote into with out=)
    for v, want in ((2.0, 1.0), (-2.0, 0.0)):
        x = backend.asarray(np.array(v))
        assert float(to_numpy(ann.grad(ops.relu)(x))) == want
        assert float(to_numpy(ann.grad(lambda x: ops.maximum(x, 0.0))(x))) == want


@pytest.mark.parametrize(
    ("spatial", "kernel", "stride", "padding"),
    [(1, 3, 1, 1), (1, 4, 2, 2), (2, (3, 2), (2, 1), (1, 1)), (2, 3, 1, (0, 1))],
)
def test_max_pool_gives_a_window_of_minus_infinity_s_gradient_to_its_first_real_entry(
    backend: Any, spatial: int, kernel: Any, stride: Any, padding: Any
) -> None:
    # torch looks at real entries only; ours started each window from its first offset, the
    # padding (-inf too) where a window hangs over the edge, and ">" never moved past it: the
    # gradient of a window whose real entries are all -inf went into the padding and was lost
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    shape = (2, 2, 7) if spatial == 1 else (1, 2, 5, 6)
    x = np.where(rng.random(shape) < 0.7, -np.inf, rng.standard_normal(shape))
    x[0, 0] = -np.inf  # a whole channel of -inf
    op = ops.max_pool1d if spatial == 1 else ops.max_pool2d
    out, pullback = ann.vjp(lambda x: op(x, kernel, stride, padding), backend.asarray(x))
    ct = rng.uniform(1.0, 2.0, out.shape)
    (g,) = pullback(backend.asarray(ct))
    tx = torch.tensor(x, requires_grad=True)
    torch_op = getattr(torch.nn.functional, f"max_pool{spatial}d")
    tout = torch_op(tx, kernel, stride, padding)
    (tg,) = torch.autograd.grad(tout, tx, torch.tensor(ct))
    np.testing.assert_array_equal(to_numpy(out), tout.detach().numpy())
    # (overlapping windows add up in another order than torch's)
    np.testing.assert_allclose(to_numpy(g), tg.numpy(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("dtype", _FLOATS)
def test_max_pool_of_minus_infinity_keeps_its_gradient_in_every_float_dtype(
    backend: Any, dtype: str
) -> None:
    dt = _float_dtype(dtype)
    x = np.array([[[-np.inf, -np.inf, -np.inf, 1.0]]]).astype(dt)
    y, pullback = ann.vjp(lambda x: ops.max_pool1d(x, 3, 1, 1), backend.asarray(x))
    (g,) = pullback(backend.asarray(np.array([[[1.0, 2.0, 4.0, 8.0]]]).astype(dt)))
    assert y.dtype == g.dtype == dt
    np.testing.assert_array_equal(to_numpy(y).astype(np.float64), [[[-np.inf, -np.inf, 1, 1]]])
    np.testing.assert_array_equal(to_numpy(g).astype(np.float64), [[[3.0, 0.0, 0.0, 12.0]]])


@pytest.mark.parametrize(
    "dtype", ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
)
def test_sigmoid_of_integers_is_scipy_s_expit_in_numpy_s_float_dtype(
    backend: Any, dtype: str
) -> None:
    # before: NaN for every non-zero unsigned int (-|x| wrapped around), numpy's "boolean
    # negative" error for bool (signed ints were right)
    special = pytest.importorskip("scipy.special")
    if dtype == "bool":
        values: list[Any] = [False, True]
    else:
        info = np.iinfo(dtype)
        values = [0, 1, 3, 100, info.max] + [-1, -3, -100, info.min] * (info.min < 0)
    x = np.array(values, dtype)
    got = ops.sigmoid(backend.asarray(x))
    # numpy's dtype, as tanh's and exp's (float16 for uint8 and bool); expit computes in float64
    assert got.dtype == ops.tanh(x).dtype == np.result_type(dtype, np.float16)
    tol = np.finfo(got.dtype)
    want = special.expit(x)  # (float64)
    np.testing.assert_allclose(to_numpy(got), want, rtol=2 * tol.eps, atol=tol.tiny)


# -- 16-bit means and scatter-adds over many entries ----------------------------------------------


def _torch_or_none() -> Any:
    """torch where installed (a comparison it adds), else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch


_MEANS: dict[str, Callable[[Any, Any], Any]] = {
    "ops.mean": lambda p, t: ops.mean(p),
    "ops.mean(axis=0)": lambda p, t: ops.mean(p.reshape(-1, 1), axis=0),
    "ops.mse_loss": lambda p, t: ops.mse_loss(p, t),
    "nn.MSELoss": lambda p, t: ann.nn.MSELoss()({}, p, t),
}


def _mean_reference(name: str, p: Any, t: Any, ct: Any) -> Any:
    """The float64 gradient of :data:`_MEANS`' ``name`` with respect to ``p`` at cotangent ``ct``."""
    if name.startswith("ops.mean"):
        return np.full(p.shape, ct / p.size)
    return 2 * (p - t) * ct / p.size


@pytest.mark.parametrize("dtype", _FLOATS)
@pytest.mark.parametrize("name", sorted(_MEANS))
def test_the_gradient_of_a_mean_over_more_entries_than_float16_holds_is_not_zero(
    backend: Any, name: str, dtype: str
) -> None:
    # a mean over 128 * 784 = 100,352 entries (an MNIST autoencoder's batch): the gradient
    # divided the 16-bit cotangent by the count, which NEP 50 cast to float16 (Inf past 65504),
    # so a float16 model trained on MSELoss had a gradient of exactly 0 (counts past 2048 were
    # rounded: 3001 divided as 3000). It divides in float32 and rounds once, as torch's does.
    dt = _float_dtype(dtype)
    rng = np.random.default_rng(3)
    p = rng.standard_normal((128, 784)).astype(dt)
    t = rng.standard_normal((128, 784)).astype(dt)
    ct = np.asarray(1.5, dt)
    fn = _MEANS[name]
    out, pullback = ann.vjp(lambda p: fn(p, backend.asarray(t)), backend.asarray(p))
    (g,) = pullback(backend.asarray(np.full(out.shape, ct)))
    assert g.dtype == dt
    got = to_numpy(g).astype(np.float64)
    want = _mean_reference(name, p.astype(np.float64), t.astype(np.float64), float(ct))
    if dtype in ("float32", "float64"):  # (as before: the cotangent divided in its own dtype)
        if name.startswith("ops.mean"):
            np.testing.assert_array_equal(to_numpy(g), np.full(p.shape, ct / p.size, dt))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
        return
    assert np.count_nonzero(got) > 0.99 * got.size, f"{name}: the gradient is {got[:1, :4]}"
    # a 16-bit gradient of 1e-5 entries: float16's subnormals hold them to a few parts in 1e3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max(), err_msg=name)
    torch = _torch_or_none()
    if torch is not None:
        tp = torch.tensor(p.astype(np.float32)).to(getattr(torch, dtype)).requires_grad_()
        tt = torch.tensor(t.astype(np.float32)).to(getattr(torch, dtype))
        tfn = {
            "ops.mean": lambda: tp.mean(),
            "ops.mean(axis=0)": lambda: tp.reshape(-1, 1).mean(0),
        }.get(name, lambda: torch.nn.functional.mse_loss(tp, tt))
        tout = tfn()
        tout.backward(torch.full(tout.shape, float(ct), dtype=tout.dtype))
        tg = tp.grad.double().numpy()
        # (torch's bfloat16 rounds each step: its gradient is 2 units off where ours is 1)
        tol = (3e-2 if dtype == "bfloat16" else 1e-2) * np.abs(tg).max()
        np.testing.assert_allclose(got, tg, rtol=0, atol=tol, err_msg=name)


def test_the_gradient_of_a_float16_mean_over_2049_entries_divides_by_2049() -> None:
    # float16 holds 2049 as 2048: the count was rounded before the division
    out, pullback = ann.vjp(ops.mean, np.ones(2049, np.float16))
    (g,) = pullback(np.ones((), np.float16))
    assert g.dtype == np.float16
    assert g[0] == np.float16(1 / 2049) != np.float16(1 / 2048)


_SCATTERS: dict[str, Callable[[Any, Any], Any]] = {
    "ops.take": lambda x, ids: ops.take(x, ids, axis=0),
    "ops.getitem": lambda x, ids: ops.getitem(x, ids),
    "ops.embedding": lambda x, ids: ops.embedding(x, ids),
}


@pytest.mark.parametrize("dtype", _FLOATS)
@pytest.mark.parametrize("name", sorted(_SCATTERS))
def test_a_16_bit_row_read_many_times_sums_its_gradients_in_float32(
    backend: Any, name: str, dtype: str
) -> None:
    # row 1 read 20,000 times, each with a cotangent of 1: added in 16 bits, the sum stalled at
    # 2048 in float16 (2048 + 1 rounds to 2048) and at 256 in bfloat16, where the GPU's
    # bfloat16 said 19,968 and every other 16-bit sum (a bias's) too. They add up in float32
    # and are rounded once (float16: 20000; bfloat16: 19968, as torch's index_select).
    dt = _float_dtype(dtype)
    ids = np.concatenate([np.ones(20000, np.int64), [0, 2]])
    x = np.arange(12.0).reshape(3, 4).astype(dt)
    out, pullback = ann.vjp(lambda x: _SCATTERS[name](x, backend.asarray(ids)), backend.asarray(x))
    ct = np.ones(out.shape, dt)
    ct[-2:] = 0.5  # (rows 0 and 2: read once)
    (g,) = pullback(backend.asarray(ct))
    assert g.dtype == dt
    want = np.array([[0.5] * 4, [20000.0] * 4, [0.5] * 4]).astype(dt)
    np.testing.assert_array_equal(to_numpy(g), want, err_msg=name)


def test_float16_mixed_with_bfloat16_arrays_promotes_as_numpy_in_every_rule() -> None:
    # numpy (with ml_dtypes) gives float32 for float16 with bfloat16, and ops.add did; the
    # rules that compute float16 in float32 (layer_norm) took the float16 input's dtype as the
    # result's and left a bfloat16 weight out of it: float16, a bfloat16 weight's precision lost
    if BFLOAT16 is None:
        pytest.skip("bfloat16 needs the optional ml_dtypes package")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4)).astype(np.float16)
    w = rng.uniform(0.5, 1.5, 4).astype(BFLOAT16)
    b = rng.standard_normal(4).astype(np.float16)
    assert (x + w).dtype == np.float32  # (numpy's)
    for kwargs in [{"weight": w}, {"weight": w, "bias": b}, {"bias": b.astype(BFLOAT16)}]:
        args = (x, *kwargs.values())
        names = list(kwargs)

        def norm(x: Any, *a: Any, names: list[str] = names) -> Any:
            return ops.layer_norm(x, **dict(zip(names, a, strict=True)))

        out, pullback = ann.vjp(norm, *args)
        assert out.dtype == np.float32, kwargs
        grads = pullback(np.ones_like(out))
        for g, a in zip(grads, args, strict=True):  # each gradient in its argument's dtype
            assert g.dtype == a.dtype
        wide = {k: v.astype(np.float32) for k, v in kwargs.items()}
        want = ops.layer_norm(x.astype(np.float32), **wide)
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    # scalars, numpy's too, and 0-d arrays leave bfloat16 as it is (as cupy does); float16
    # follows numpy there (a numpy float64 scalar gives float64): see docs/concepts.md
    xb = x.astype(BFLOAT16)
    for s in (0.5, np.float64(0.5), np.array(0.5, np.float32), np.ones((3, 4), np.int64)):
        assert ops.multiply(xb, s).dtype == BFLOAT16
    assert ops.multiply(x, np.float64(0.5)).dtype == np.float64
    assert ops.multiply(x, 0.5).dtype == np.float16


def test_softplus_of_a_product_past_the_range_is_the_input_without_a_warning() -> None:
    # beta * x overflows to inf, which takes the linear side: x itself, as torch's, and no
    # numpy warning on the way (an error under filterwarnings=error)
    x = np.array([1e308, -1e308, 3.0])
    out, pullback = ann.vjp(lambda x: ops.softplus(x, beta=2.0), x)
    np.testing.assert_array_equal(out[:2], [1e308, 0.0])
    np.testing.assert_allclose(out[2], np.log1p(np.exp(6.0)) / 2, rtol=1e-15)
    np.testing.assert_array_equal(pullback(np.ones(3))[0][:2], [1.0, 0.0])


# -- normalizations of mixed float dtypes ---------------------------------------------------------
_NORM_DTYPES = [np.float16, np.float32, np.float64]


@pytest.mark.parametrize("x_dtype", _NORM_DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("w_dtype", [*_NORM_DTYPES, None], ids=str)
@pytest.mark.parametrize("b_dtype", [*_NORM_DTYPES, None], ids=str)
def test_group_norm_promotes_mixed_dtypes_as_layer_norm_does(
    x_dtype: Any, w_dtype: Any, b_dtype: Any
) -> None:
    # numpy's promotion of arrays, as every op's direct call (docs/concepts.md, Dtypes): a
    # float32 input with float64 parameters gives float64, as layer_norm; each gradient comes
    # back in its argument's dtype
    x = np.random.default_rng(16).standard_normal((2, 4, 4)).astype(x_dtype)
    w = None if w_dtype is None else np.linspace(0.5, 2.0, 4).astype(w_dtype)
    b = None if b_dtype is None else np.linspace(-1.0, 1.0, 4).astype(b_dtype)
    want = np.result_type(*(a for a in (x, w, b) if a is not None))
    results = {}
    for name, norm in [
        ("layer_norm", lambda x, w, b: ops.layer_norm(x, w, b)),  # (over the last axis, of 4)
        ("group_norm", lambda x, w, b: ops.group_norm(x, 2, w, b)),
    ]:
        out, pullback = ann.vjp(norm, x, w, b)
        grads = pullback(np.ones(out.shape, out.dtype))
        results[name] = (out.dtype, [None if g is None else g.dtype for g in grads])
        assert out.dtype == want, name
    assert results["group_norm"] == results["layer_norm"]
    assert results["group_norm"][1] == [a if a is None else a.dtype for a in (x, w, b)]
