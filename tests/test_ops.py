"""Every op in asyncnn.ops: gradients against finite differences, forward values against numpy
references (and torch where installed), hypothesis properties, dtypes and error messages."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import asyncnn as ann
from asyncnn import ops
from asyncnn.backends import to_numpy
from asyncnn.testing import check_grads


# -- input specs: how each argument of a case is made ---------------------------------------------
class Spec:
    """A float64 input: standard normal, positive (for log/sqrt/pow), or away from 0 (kinks)."""

    def __init__(self, shape: tuple[int, ...], kind: str = "normal") -> None:
        self.shape = shape
        self.kind = kind

    def make(self, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "pos":
            return rng.uniform(0.5, 2.0, self.shape)
        if self.kind == "away":  # |x| >= 0.2: keeps relu/abs/division off their kinks
            return rng.choice([-1.0, 1.0], self.shape) * rng.uniform(0.2, 2.0, self.shape)
        return rng.standard_normal(self.shape)

    def __repr__(self) -> str:
        return f"{self.kind}{self.shape}"


def N(*shape: int) -> Spec:  # noqa: N802 - short names keep each case on one line
    return Spec(shape)


def P(*shape: int) -> Spec:  # noqa: N802
    return Spec(shape, "pos")


def A(*shape: int) -> Spec:  # noqa: N802
    return Spec(shape, "away")


def build(backend: Any, specs: tuple[Any, ...], seed: int = 0, dtype: Any = np.float64) -> list:
    """Backend arrays for the specs; numpy constants (int labels, masks) pass through as given."""
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        if isinstance(s, Spec):
            out.append(backend.asarray(s.make(rng).astype(dtype)))
        elif isinstance(s, np.ndarray):
            out.append(backend.asarray(s))
        else:
            out.append(s)
    return out


I = np.array  # integer / boolean constants  # noqa: E741


def case(name: str, fn: Callable[..., Any], *specs: Any) -> Any:
    return pytest.param(fn, specs, id=name)


# -- one line per op and variant ------------------------------------------------------------------
GRAD_CASES = [
    # elementwise binary, with broadcasting and scalars
    case("add", ops.add, N(3, 4), N(3, 4)),
    case("add-bcast-3x1-1x4", ops.add, N(3, 1), N(1, 4)),
    case("add-bcast-4-234", ops.add, N(4), N(2, 3, 4)),
    case("add-0d", ops.add, N(2, 3), N()),
    case("add-pyscalar", lambda a: ops.add(a, 2.5), N(2, 3)),
    case("radd-operator", lambda a: 1.5 + a, N(3)),
    case("subtract", ops.subtract, N(3, 1), N(1, 4)),
    case("subtract-4-234", ops.subtract, N(2, 3, 4), N(4)),
    case("rsub-operator", lambda a: 2.0 - a, N(3)),
    case("multiply", ops.multiply, N(3, 1), N(1, 4)),
    case("multiply-4-234", ops.multiply, N(4), N(2, 3, 4)),
    case("multiply-0d", ops.multiply, N(), N(2, 3)),
    case("multiply-pyscalar", lambda a: a * 3.0, N(2, 2)),
    case("divide", ops.divide, N(3, 1), A(1, 4)),
    case("divide-4-234", ops.divide, N(2, 3, 4), A(4)),
    case("rdivide-pyscalar", lambda b: 2.0 / b, A(3)),
    case("negative", ops.negative, N(2, 3)),
    case("square", ops.square, N(2, 3)),
    case("power", ops.power, P(3, 4), N(3, 4)),
    case("power-bcast", ops.power, P(3, 1), N(4)),
    case("power-int-exponent", lambda a: ops.power(a, 3), N(2, 3)),
    case("power-operator-float", lambda a: a**2.5, P(2, 3)),
    case("rpow", lambda b: 2.0**b, N(3)),
    case("power-0-to-the-0", lambda a: (a * 0) ** 0 + a, N(3)),  # d/da a**0 is 0 at a == 0 too
    case("power-0-to-array-0", lambda a: ops.power(a * 0, ops.raw(a) * 0) + a, N(3)),
    # elementwise unary
    case("exp", ops.exp, N(2, 3)),
    case("log", ops.log, P(2, 3)),
    case("tanh", ops.tanh, N(2, 3)),
    case("sigmoid", ops.sigmoid, N(2, 3)),
    case("relu", ops.relu, A(3, 4)),
    case("gelu", ops.gelu, N(3, 4)),
    case("gelu-tanh", lambda x: ops.gelu(x, approximate="tanh"), N(3, 4)),
    case("sqrt", ops.sqrt, P(2, 3)),
    case("abs", ops.abs, A(2, 3)),
    case("maximum", ops.maximum, N(3, 1), N(1, 4)),
    case("minimum", ops.minimum, N(2, 3, 4), N(4)),
    case("where", lambda c, a, b: ops.where(c, a, b), I([[True], [False]]), N(2, 3), N(3)),
    # reductions
    case("sum-all", ops.sum, N(2, 3, 4)),
    case("sum-axis0", lambda x: ops.sum(x, axis=0), N(2, 3, 4)),
    case("sum-axis-1-keepdims", lambda x: ops.sum(x, axis=-1, keepdims=True), N(2, 3, 4)),
    case("sum-tuple", lambda x: ops.sum(x, axis=(0, 2)), N(2, 3, 4)),
    case("sum-method", lambda x: x.sum(axis=1), N(2, 3)),
    case("sum-numpy-function", lambda x: np.sum(x, axis=0), N(2, 3)),
    case("mean-numpy-function", lambda x: np.mean(x, axis=(0, 1), keepdims=True), N(2, 3)),
    case("max-numpy-function", lambda x: np.max(x, axis=1), N(2, 3)),
    case("min-method", lambda x: x.min(axis=0), N(2, 3)),
    case("mean-all", ops.mean, N(2, 3, 4)),
    case("mean-axis1", lambda x: ops.mean(x, axis=1), N(2, 3, 4)),
    case("mean-tuple-keepdims", lambda x: ops.mean(x, (0, 2), keepdims=True), N(2, 3, 4)),
    case("max-all", ops.max, N(2, 3, 4)),
    case("max-axis1", lambda x: ops.max(x, axis=1), N(2, 3, 4)),
    case("max-tuple-keepdims", lambda x: ops.max(x, (0, 2), keepdims=True), N(2, 3, 4)),
    case("min-all", ops.min, N(2, 3, 4)),
    case("min-axis-1", lambda x: ops.min(x, axis=-1), N(2, 3, 4)),
    case("min-tuple", lambda x: ops.min(x, axis=(1, 2), keepdims=True), N(2, 3, 4)),
    # shapes and indexing
    case("reshape", lambda x: ops.reshape(x, (6, 4)), N(2, 3, 4)),
    case("reshape-minus1", lambda x: x.reshape(-1), N(2, 3, 4)),
    case("transpose", ops.transpose, N(2, 3, 4)),
    case("transpose-axes", lambda x: ops.transpose(x, (1, 0, 2)), N(2, 3, 4)),
    case("transpose-T", lambda x: x.T, N(2, 3)),
    case("getitem-slices", lambda x: x[1:, ::2], N(3, 5)),
    case("getitem-int", lambda x: x[1], N(3, 4)),
    case("getitem-ellipsis-none", lambda x: x[..., None, 1:3], N(2, 3, 4)),
    case("getitem-int-array-repeats", lambda x, i: x[i], N(3, 4), I([0, 2, 0, 0])),
    case("getitem-2d-int-array", lambda x, i: ops.getitem(x, i), N(4, 2), I([[0, 3], [3, 3]])),
    case("getitem-array-pair", lambda x, i, j: x[i, j], N(3, 4), I([0, 1, 0]), I([2, 2, 2])),
    case("getitem-bool-mask", lambda x, m: x[m], N(2, 3),
         I([[True, False, True], [0, 1, 1]], bool) ),
    case("take-axis0", lambda x, i: ops.take(x, i), N(4, 3), I([3, 0, 3])),
    case("take-axis1-2d", lambda x, i: ops.take(x, i, axis=1), N(2, 4, 3), I([[1, 1], [0, 3]])),
    case("take-list", lambda x: ops.take(x, [2, -1, 0], axis=1), N(2, 3)),
    case("take-int", lambda x: ops.take(x, 1), N(3, 2)),
    case("concatenate-axis0", lambda a, b: ops.concatenate([a, b]), N(2, 3), N(1, 3)),
    case("concatenate-axis-1", lambda a, b, c: ops.concatenate([a, b, c], -1), N(2, 1), N(2, 3),
         N(2, 2)),
    case("stack-axis0", lambda a, b: ops.stack([a, b]), N(2, 3), N(2, 3)),
    case("stack-axis-1", lambda a, b: ops.stack([a, b], axis=-1), N(2, 3), N(2, 3)),
    case("squeeze", ops.squeeze, N(2, 1, 3, 1)),
    case("squeeze-axis", lambda x: ops.squeeze(x, 1), N(2, 1, 3)),
    case("expand_dims", lambda x: ops.expand_dims(x, 1), N(2, 3)),
    case("expand_dims-last", lambda x: ops.expand_dims(x, -1), N(2, 3)),
    case("broadcast_to", lambda x: ops.broadcast_to(x, (2, 3, 4)), N(3, 1)),
    # matrix products
    case("matmul-2d", ops.matmul, N(3, 4), N(4, 5)),
    case("matmul-batched", ops.matmul, N(2, 3, 4), N(2, 4, 5)),
    case("matmul-bcast-batch", ops.matmul, N(2, 1, 3, 4), N(3, 4, 2)),
    case("matmul-matrix-batch", ops.matmul, N(3, 4), N(2, 4, 2)),
    case("matmul-vec-vec", ops.matmul, N(4), N(4)),
    case("matmul-vec-mat", ops.matmul, N(4), N(4, 5)),
    case("matmul-mat-vec", ops.matmul, N(3, 4), N(4)),
    case("matmul-batch-vec", ops.matmul, N(2, 3, 4), N(4)),
    case("matmul-operator", lambda a, b: a @ b, N(2, 3), N(3, 2)),
    # softmax family
    case("softmax", ops.softmax, N(3, 5)),
    case("softmax-axis0", lambda x: ops.softmax(x, axis=0), N(3, 4)),
    case("log_softmax", ops.log_softmax, N(3, 5)),
    case("log_softmax-axis1", lambda x: ops.log_softmax(x, axis=1), N(2, 3, 4)),
    case("logsumexp", ops.logsumexp, N(3, 5)),
    case("logsumexp-keepdims", lambda x: ops.logsumexp(x, axis=1, keepdims=True), N(2, 3, 4)),
    # convolutions: (x, weight, bias)
    case("conv1d", ops.conv1d, N(2, 3, 7), N(4, 3, 3), N(4)),
    case("conv1d-nobias", ops.conv1d, N(2, 3, 7), N(4, 3, 3)),
    case("conv1d-s2-p1", lambda x, w, b: ops.conv1d(x, w, b, stride=2, padding=1), N(2, 2, 8),
         N(3, 2, 3), N(3)),
    case("conv1d-p2-d2", lambda x, w: ops.conv1d(x, w, padding=2, dilation=2), N(1, 2, 6),
         N(3, 2, 3) ),
    case("conv1d-s3-d2", lambda x, w: ops.conv1d(x, w, stride=3, dilation=2), N(2, 1, 11),
         N(2, 1, 2) ),
    case("conv2d", ops.conv2d, N(2, 2, 5, 4), N(3, 2, 3, 2), N(3)),
    case("conv2d-s2-p1", lambda x, w, b: ops.conv2d(x, w, b, 2, 1), N(1, 2, 5, 5), N(2, 2, 3, 3),
         N(2)),
    case("conv2d-pairs", lambda x, w: ops.conv2d(x, w, None, (1, 2), (2, 0), (2, 1)),
         N(2, 1, 4, 6), N(2, 1, 2, 3)),
    case("conv2d-empty-batch", ops.conv2d, N(0, 2, 4, 4), N(3, 2, 2, 2), N(3)),
    # pools
    case("max_pool1d", lambda x: ops.max_pool1d(x, 2), N(2, 3, 8)),
    case("max_pool1d-s1-p1", lambda x: ops.max_pool1d(x, 3, stride=1, padding=1), N(2, 2, 5)),
    case("max_pool2d", lambda x: ops.max_pool2d(x, 2), N(2, 2, 4, 5)),
    case("max_pool2d-overlap-pad", lambda x: ops.max_pool2d(x, 3, 2, 1), N(1, 2, 5, 6)),
    case("avg_pool1d", lambda x: ops.avg_pool1d(x, 3), N(2, 3, 7)),
    case("avg_pool1d-s2-p1", lambda x: ops.avg_pool1d(x, 3, 2, 1), N(2, 2, 6)),
    case("avg_pool2d", lambda x: ops.avg_pool2d(x, (2, 3)), N(1, 2, 4, 6)),
    case("avg_pool2d-pad", lambda x: ops.avg_pool2d(x, 3, (2, 1), (1, 0)), N(2, 1, 5, 4)),
    # normalization, losses, lookups
    case("layer_norm-plain", ops.layer_norm, N(3, 5)),
    case("layer_norm", ops.layer_norm, N(2, 3, 4), N(4), N(4)),
    case("layer_norm-2d-weight", lambda x, w: ops.layer_norm(x, w), N(2, 3, 4), N(3, 4)),
    case("layer_norm-bias-only", lambda x, b: ops.layer_norm(x, None, b, eps=0.1), N(2, 4), N(4)),
    case("cross_entropy", ops.cross_entropy, N(4, 3), I([0, 2, 1, 2])),
    case("cross_entropy-sum", lambda x, y: ops.cross_entropy(x, y, "sum"), N(3, 4), I([3, 0, 1])),
    case("cross_entropy-none", lambda x, y: ops.cross_entropy(x, y, "none"), N(3, 4), I([3, 0, 0])),
    case("cross_entropy-spatial", ops.cross_entropy, N(2, 3, 4), I([[0, 1, 2, 2], [1, 1, 0, 2]])),
    case("cross_entropy-2x-none", lambda x, y: ops.cross_entropy(x, y, reduction="none"),
         N(2, 3, 2, 2), I([[[0, 1], [2, 2]], [[1, 1], [0, 2]]])),
    case("mse_loss", ops.mse_loss, N(3, 4), N(3, 4)),
    case("mse_loss-sum", lambda a, b: ops.mse_loss(a, b, "sum"), N(5), N(5)),
    case("mse_loss-none", lambda a, b: ops.mse_loss(a, b, reduction="none"), N(2, 3), N(2, 3)),
    case("embedding", ops.embedding, N(5, 3), I([[0, 4, 4], [2, 0, 4]])),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "specs"), GRAD_CASES)
def test_grad(backend: Any, fn: Callable[..., Any], specs: tuple[Any, ...]) -> None:
    check_grads(fn, *build(backend, specs), rtol=1e-6)


@pytest.mark.parametrize(("fn", "specs"), GRAD_CASES)
def test_float32_gives_float32_gradients(
    backend: Any, fn: Callable[..., Any], specs: tuple[Any, ...]
) -> None:
    args = build(backend, specs, dtype=np.float32)
    out, pullback = ann.vjp(fn, *args)
    assert out.dtype == np.float32
    grads = pullback(backend.xp.ones(out.shape, dtype=np.float32))
    for a, g in zip(args, grads, strict=True):
        if isinstance(a, float) or getattr(a, "dtype", None) == np.float32:
            assert g.dtype == np.float32 and g.shape == a.shape
        else:
            assert g is None  # integer and boolean inputs get no gradient


def test_every_public_op_has_a_gradient_case() -> None:
    tested = set()
    for p in GRAD_CASES:
        fn = p.values[0]
        tested.add(fn.__name__ if fn.__name__ != "<lambda>" else p.id.split("-")[0])
    # raw, astype, dropout have their own tests below; Primitive is the class ops are made of
    missing = set(ops.__all__) - tested - {"raw", "astype", "dropout", "Primitive"}
    assert not missing, f"no gradient case for {sorted(missing)}"


def test_astype_gradient_comes_back_in_the_input_dtype(backend: Any) -> None:
    x = backend.asarray(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    w = backend.asarray(np.array([0.5, -1.0, 2.0]))
    out, pullback = ann.vjp(lambda x: ops.sum(ops.astype(x, np.float64) * w), x)
    assert out.dtype == np.float64
    (g,) = pullback(1.0)
    assert g.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(g), [0.5, -1.0, 2.0])
    # and down: a float64 input cast to float32 gets a float64 gradient
    x64 = backend.asarray(np.array([1.0, 2.0]))
    (g64,) = ann.vjp(lambda x: ops.astype(x, np.float32) * 3.0, x64)[1](np.ones(2, np.float32))
    assert g64.dtype == np.float64
    np.testing.assert_array_equal(to_numpy(g64), [3.0, 3.0])
    assert ops.astype(x64, np.float64) is x64  # no-op casts record nothing


@pytest.mark.parametrize("join", [ops.concatenate, ops.stack])
def test_joined_float32_and_float64_get_gradients_of_their_dtypes(backend: Any, join: Any) -> None:
    a32, a64 = backend.asarray(np.ones((2, 3), np.float32)), backend.asarray(np.ones((2, 3)))
    grads = ann.grad(lambda a, b: ops.sum(join([a, b, a])), argnums=(0, 1))(a32, a64)
    assert [g.dtype for g in grads] == [np.float32, np.float64]  # as in torch


@pytest.mark.parametrize("dtype", [np.int64, np.int8, bool])
def test_astype_to_integers_or_bools_is_a_constant(backend: Any, dtype: Any) -> None:
    x = backend.asarray(np.array([0.3, 1.7, -2.2]))  # a step function: no gradient, as in torch
    np.testing.assert_array_equal(to_numpy(ann.grad(lambda x: ops.sum(x.astype(dtype) * x))(x)),
                                  to_numpy(x.astype(dtype)).astype(float))  # fmt: skip


def test_dropout(backend: Any) -> None:
    x = backend.asarray(np.random.default_rng(1).standard_normal((4, 50)))
    check_grads(lambda x: ops.dropout(x, 0.3, backend.rng(0)), x)
    out = to_numpy(ops.dropout(x, 0.3, backend.rng(0)))
    keep = to_numpy(backend.rng(0).random(x.shape)) >= 0.3
    np.testing.assert_allclose(out, np.where(keep, to_numpy(x) / 0.7, 0.0), rtol=1e-15)
    assert 0.5 < keep.mean() < 0.9
    assert ops.dropout(x, 0.3, None) is x and ops.dropout(x, 0.0, backend.rng(0)) is x
    x32 = x.astype(np.float32)
    out32, pullback = ann.vjp(lambda x: ops.dropout(x, 0.5, backend.rng(2)), x32)
    assert out32.dtype == np.float32 and pullback(out32)[0].dtype == np.float32
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
            ops.dropout(x, p, backend.rng(0))
    ints = backend.asarray(np.arange(8).reshape(2, 4))  # 1 / 0.7 would be truncated to 1
    for rng in (backend.rng(0), None):
        with pytest.raises(TypeError, match="dropout: x must be floating point, got dtype int64"):
            ops.dropout(ints, 0.3, rng)


def test_integer_inputs_get_no_gradient(backend: Any) -> None:
    logits = backend.asarray(np.random.default_rng(0).standard_normal((3, 4)))
    labels = backend.asarray(np.array([1, 0, 3]))
    g_logits, g_labels = ann.vjp(ops.cross_entropy, logits, labels)[1](1.0)
    assert g_labels is None and g_logits.shape == (3, 4)
    # the gradient of the mean cross-entropy is (softmax - onehot) / N
    p = to_numpy(ops.softmax(logits))
    p[np.arange(3), [1, 0, 3]] -= 1
    np.testing.assert_allclose(to_numpy(g_logits), p / 3, rtol=1e-12)


# -- forward values against plain numpy references ------------------------------------------------
Ints = tuple[int, ...]


def ref_conv(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: Ints, padding: Ints, dilation: Ints
) -> np.ndarray:
    """Direct cross-correlation over every output position (any number of spatial axes)."""
    sp = x.ndim - 2
    xp_ = np.pad(x, [(0, 0), (0, 0)] + [(padding[i], padding[i]) for i in range(sp)])
    k = w.shape[2:]
    out_shape = [
        (xp_.shape[2 + i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(sp)
    ]
    out = np.zeros((x.shape[0], w.shape[0], *out_shape))
    for pos in np.ndindex(*out_shape):
        idx = tuple(
            slice(
                pos[i] * stride[i], pos[i] * stride[i] + dilation[i] * (k[i] - 1) + 1, dilation[i]
            )
            for i in range(sp)
        )
        patch = xp_[(slice(None), slice(None), *idx)]  # (N, C, *k)
        out[(slice(None), slice(None), *pos)] = np.tensordot(
            patch, w, axes=(range(1, 2 + sp), range(1, 2 + sp))
        )
    if b is not None:
        out += b.reshape((-1,) + (1,) * sp)
    return out


def ref_pool(x: np.ndarray, k: Ints, s: Ints, p: Ints, how: str) -> np.ndarray:
    sp = x.ndim - 2
    fill = -np.inf if how == "max" else 0.0
    xp_ = np.pad(x, [(0, 0), (0, 0)] + [(p[i], p[i]) for i in range(sp)], constant_values=fill)
    out_shape = [(xp_.shape[2 + i] - k[i]) // s[i] + 1 for i in range(sp)]
    out = np.zeros((*x.shape[:2], *out_shape))
    for pos in np.ndindex(*out_shape):
        idx = tuple(slice(pos[i] * s[i], pos[i] * s[i] + k[i]) for i in range(sp))
        win = xp_[(slice(None), slice(None), *idx)].reshape(*x.shape[:2], -1)
        out[(slice(None), slice(None), *pos)] = win.max(-1) if how == "max" else win.mean(-1)
    return out


def ref_log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))


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
    same("gelu", [(3, 4)]),
    same("gelu", [(3, 4)], approximate="tanh"),
    same("conv1d", [(2, 3, 10), (4, 3, 3), (4,)], 2, 3, 2),
    same("conv2d", [(2, 3, 7, 6), (5, 3, 3, 2), (5,)], (2, 1), (1, 2), (1, 2)),
    same("conv2d", [(1, 2, 5, 5), (3, 2, 2, 2)]),
    same("max_pool1d", [(2, 3, 9)], 3, 2, 1),
    same("max_pool2d", [(2, 3, 6, 5)], 2),
    same("max_pool2d", [(1, 2, 7, 5)], (3, 2), (2, 1), (1, 1)),
    same("avg_pool1d", [(2, 3, 9)], 4, 2, 2),
    same("avg_pool2d", [(2, 2, 7, 6)], 3, 2, 1),
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


# -- properties over random shapes ----------------------------------------------------------------
PROPS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
BINARY = {
    "add": (ops.add, "normal"),
    "subtract": (ops.subtract, "normal"),
    "multiply": (ops.multiply, "normal"),
    "divide": (ops.divide, "away"),
    "maximum": (ops.maximum, "normal"),
    "minimum": (ops.minimum, "normal"),
    "power": (ops.power, "pos"),
}
UNARY = {
    "exp": (ops.exp, "normal"),
    "log": (ops.log, "pos"),
    "tanh": (ops.tanh, "normal"),
    "sigmoid": (ops.sigmoid, "normal"),
    "relu": (ops.relu, "away"),
    "gelu": (ops.gelu, "normal"),
    "sqrt": (ops.sqrt, "pos"),
    "abs": (ops.abs, "away"),
    "softmax": (ops.softmax, "normal"),
    "log_softmax": (ops.log_softmax, "normal"),
}


@PROPS
@given(
    name=st.sampled_from(sorted(BINARY)),
    shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3),
    seed=st.integers(0, 2**16),
)
def test_binary_ops_broadcast_gradients(backend: Any, name: str, shapes: Any, seed: int) -> None:
    fn, kind = BINARY[name]
    a, b = shapes.input_shapes
    first = Spec(a, "pos" if kind == "pos" else "normal")
    second = Spec(b, "normal" if kind == "pos" else kind)
    x, y = build(backend, (first, second), seed)
    out = fn(x, y)
    assert out.shape == shapes.result_shape
    check_grads(fn, x, y)


@PROPS
@given(
    name=st.sampled_from(sorted(UNARY)),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
    seed=st.integers(0, 2**16),
)
def test_unary_ops_gradients(backend: Any, name: str, shape: Any, seed: int) -> None:
    fn, kind = UNARY[name]
    (x,) = build(backend, (Spec(shape, kind),), seed)
    assert fn(x).shape == shape
    check_grads(fn, x)


@PROPS
@given(
    data=st.data(),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=3),
    keepdims=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reductions_match_numpy_and_gradient_identities(
    backend: Any, data: Any, shape: Any, keepdims: bool, seed: int
) -> None:
    axes = data.draw(st.none() | st.lists(st.integers(0, len(shape) - 1), unique=True, min_size=1))
    axis = None if axes is None else tuple(axes)
    (x,) = build(backend, (N(*shape),), seed)
    host = to_numpy(x)
    count = host.size if axis is None else int(np.prod([shape[a] for a in axis]))
    for op, ref in ((ops.sum, np.sum), (ops.mean, np.mean), (ops.max, np.max), (ops.min, np.min)):
        out, pullback = ann.vjp(lambda x, op=op: op(x, axis=axis, keepdims=keepdims), x)
        expected = ref(host, axis=axis, keepdims=keepdims)
        np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-12)
        (g,) = pullback(backend.xp.ones(out.shape))
        g = to_numpy(g)
        if op is ops.sum:  # d sum / dx = 1, d mean / dx = 1 / count
            np.testing.assert_allclose(g, np.ones(shape))
        elif op is ops.mean:
            np.testing.assert_allclose(g, np.full(shape, 1 / count))
        else:  # one 1 per reduced group, at the extremum
            np.testing.assert_allclose(g, host == ref(host, axis=axis, keepdims=True))
    check_grads(lambda x: ops.max(x, axis=axis, keepdims=keepdims), x)


@PROPS
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    o=st.integers(1, 3),
    length=st.integers(1, 9),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_conv1d_matches_direct_reference(
    backend: Any, n: int, c: int, o: int, length: int, k: int, stride: int, padding: int,
    dilation: int, seed: int,
) -> None:  # fmt: skip
    x, w, b = build(backend, (N(n, c, length), N(o, c, k), N(o)), seed)
    if length + 2 * padding < dilation * (k - 1) + 1:
        with pytest.raises(ValueError, match="larger than the padded input"):
            ops.conv1d(x, w, b, stride, padding, dilation)
        return
    got = ops.conv1d(x, w, b, stride, padding, dilation)
    host = [to_numpy(a) for a in (x, w, b)]
    ref = ref_conv(host[0], host[1], host[2], (stride,), (padding,), (dilation,))
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-10, atol=1e-12)


# -- errors that say what to fix ------------------------------------------------------------------
def test_conv_errors_name_the_shapes() -> None:
    x, w = np.zeros((2, 3, 8)), np.zeros((4, 2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3, 8\) has 3 channels.*\(4, 2, 3\) expects 2"):
        ops.conv1d(x, w)
    with pytest.raises(ValueError, match=r"larger than the padded input.*\(2, 3, 8\)"):
        ops.conv1d(x, np.zeros((4, 3, 9)))
    with pytest.raises(ValueError, match="larger than the padded input"):
        ops.conv2d(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3)), dilation=2)
    with pytest.raises(ValueError, match=r"input must have shape \(N, C, H, W\), got \(3, 4, 4\)"):
        ops.conv2d(np.zeros((3, 4, 4)), np.zeros((1, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        ops.conv1d(x, np.zeros((4, 3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ops.conv1d(x, np.zeros((4, 3, 3)), stride=0)
    with pytest.raises(ValueError, match="tuple of 2 ints"):
        ops.conv2d(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 2, 2)), padding=(1, 1, 1))


def test_pool_errors() -> None:
    with pytest.raises(ValueError, match="padding .* at most half"):
        ops.max_pool1d(np.zeros((1, 1, 8)), 2, padding=2)
    with pytest.raises(ValueError, match="pooling window .* larger than the padded input"):
        ops.avg_pool2d(np.zeros((1, 1, 2, 8)), 3)
    with pytest.raises(ValueError, match=r"\(N, C, L\)"):
        ops.max_pool1d(np.zeros((4, 8)), 2)


def test_cross_entropy_errors_say_what_to_pass() -> None:
    logits = np.zeros((3, 4))
    with pytest.raises(TypeError, match=r"integer class indices.*astype\(np.int64\)"):
        ops.cross_entropy(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"label 4 is outside \[0, 4\)"):
        ops.cross_entropy(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"label -1 is outside"):
        ops.cross_entropy(logits, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match=r"\(3, 4\) and labels of shape \(3, 1\)"):
        ops.cross_entropy(logits, np.zeros((3, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.cross_entropy(logits, np.array([0, 1, 2]), reduction="avg")


def test_cross_entropy_takes_labels_of_an_ndarray_subclass(tmp_path: Any) -> None:
    # a memory-mapped dataset's labels are an np.memmap: checked on the host as numpy labels
    # are, and never taken for a GPU's (whose range check is a kernel of the cupy backend)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 4))
    labels = np.array([0, 3, 1, 2, 2, 0])
    path = tmp_path / "labels.npy"
    np.save(path, labels)
    mapped = np.load(path, mmap_mode="r")
    assert type(mapped) is np.memmap
    for reduction in ("mean", "sum", "none"):
        want = ops.cross_entropy(logits, labels, reduction)
        np.testing.assert_array_equal(ops.cross_entropy(logits, mapped, reduction), want)
        np.testing.assert_array_equal(
            ops.cross_entropy(logits[1:], mapped[1:], reduction)[...],
            ops.cross_entropy(logits[1:], labels[1:], reduction)[...],
        )
    value, pullback = ann.vjp(lambda z: ops.cross_entropy(z, mapped), logits)
    _, want_pullback = ann.vjp(lambda z: ops.cross_entropy(z, labels), logits)
    np.testing.assert_array_equal(pullback(1.0)[0], want_pullback(1.0)[0])
    with pytest.raises(ValueError, match=r"label 4 is outside \[0, 4\)"):
        bad = np.load(path, mmap_mode="r+")
        bad[1] = 4
        ops.cross_entropy(logits, bad)


def test_other_errors() -> None:
    with pytest.raises(ValueError, match=r"mse_loss: pred of shape \(3, 1\) and target of shape"):
        ops.mse_loss(np.zeros((3, 1)), np.zeros(3))
    with pytest.raises(ValueError, match=r"weight of shape \(3,\) must match .* \(4,\)"):
        ops.layer_norm(np.zeros((2, 4)), np.ones(3))
    with pytest.raises(TypeError, match="ids must be an integer array"):
        ops.embedding(np.zeros((5, 2)), np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="axis must be one int"):
        ops.softmax(np.zeros((2, 2)), axis=(0, 1))  # type: ignore[arg-type]


def test_an_axis_out_of_range_is_refused_not_wrapped_around() -> None:
    x = np.arange(6.0).reshape(2, 3)
    for call, op, axis in [
        (lambda: ops.take(x, np.array([0]), axis=2), "take", 2),
        (lambda: ops.concatenate([x, x], axis=2), "concatenate", 2),
        (lambda: ops.stack([x, x], axis=-4), "stack", -4),
        (lambda: ops.expand_dims(x, 3), "expand_dims", 3),
        (lambda: ops.sum(x, axis=(0, 2)), "sum", 2),
        (lambda: ops.max(x, axis=-3), "max", -3),
        (lambda: ops.softmax(x, axis=2), "softmax", 2),
    ]:
        with pytest.raises(ValueError, match=rf"{op}: axis {axis} is out of range"):
            call()
    with pytest.raises(TypeError, match=r"mean: axis must be an int, got 1.0"):
        ops.mean(x, axis=1.0)  # type: ignore[arg-type]
    # numpy integers are axes, as in numpy
    np.testing.assert_array_equal(ops.mean(x, axis=np.int64(1)), x.mean(axis=1))
    np.testing.assert_array_equal(ops.sum(x, axis=(np.int64(0), -1)), x.sum())
    np.testing.assert_array_equal(ops.take(x, np.array([2]), axis=np.int64(-1)), x[:, 2:])
    # an axis named twice is a mistake, as in numpy (it was silently one axis)
    with pytest.raises(ValueError, match=r"sum: axis \(1, -1\) names an axis twice"):
        ops.sum(x, axis=(1, -1))


def test_broadcast_errors_name_the_op_and_the_shapes() -> None:
    a, b = np.zeros((3, 4)), np.zeros(3)
    for name in ("add", "subtract", "multiply", "divide", "power", "maximum", "minimum"):
        with pytest.raises(ValueError, match=rf"{name}: shapes \(3, 4\) and \(3,\) do not broad"):
            getattr(ops, name)(a, b)
    with pytest.raises(ValueError, match=r"add: shapes \(3, 4\) and \(3,\) do not broadcast"):
        ann.vjp(lambda a: a + b, a)  # traced, through the operator
    with pytest.raises(ValueError, match=r"where: shapes \(2,\) and \(3, 4\) and \(3, 4\)"):
        ops.where(np.array([True, False]), a, a)
    with pytest.raises(ValueError, match=r"matmul: .* batch dimensions \(2,\) and \(3,\)"):
        ops.matmul(np.zeros((2, 3, 4)), np.zeros((3, 4, 2)))


def test_shape_errors_name_the_op_and_the_shapes() -> None:
    x = np.zeros((2, 3))
    for call, said in [
        (lambda: ops.reshape(x, (4, 2)),
         r"reshape: x of shape \(2, 3\) \(size 6\) cannot take shape \(4, 2\)"),
        (lambda: ops.reshape(x, (-1, -1)), r"reshape: .* one entry may be -1"),
        (lambda: ops.transpose(x, (0, 0)),
         r"transpose: axes \(0, 0\) are not a permutation .* \(2, 3\)"),
        (lambda: ops.transpose(x, (0, 1, 2)), r"transpose: axes \(0, 1, 2\) are not"),
        (lambda: ops.broadcast_to(x, (4, 3)),
         r"broadcast_to: x of shape \(2, 3\) cannot be broadcast to \(4, 3\)"),
        (lambda: ops.broadcast_to(x, (3,)), r"broadcast_to: x of shape \(2, 3\) cannot"),
        (lambda: ops.concatenate([x, np.zeros((2, 2))]),
         r"concatenate: shapes \(2, 3\), \(2, 2\) differ outside axis 0"),
        (lambda: ops.concatenate([x, np.zeros(3)]), r"concatenate: shapes \(2, 3\), \(3,\) differ"),
        (lambda: ops.stack([x, x, np.zeros((3, 2))]),
         r"stack: shapes \(2, 3\), \(2, 3\), \(3, 2\) differ"),
        (lambda: ops.max(np.zeros((0, 3)), axis=0),
         r"max: axis 0 of x \(shape \(0, 3\)\) has length 0"),
        (lambda: ops.min(np.zeros((2, 0))), r"min: axis 1 of x \(shape \(2, 0\)\) has length 0"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=said):
            call()
    with pytest.raises(ValueError, match=r"concatenate: shapes \(2, 3\), \(2, 2\) differ"):
        ann.vjp(lambda a: ops.concatenate([a, np.zeros((2, 2))]), x)  # traced, too
    assert ops.max(np.zeros((0, 3)), axis=1).shape == (0,)  # no rows: nothing to refuse
    assert ops.transpose(np.zeros((2, 3, 4)), (-1, 0, 1)).shape == (4, 2, 3)  # as numpy


def test_integer_input_to_a_float_op_says_to_convert() -> None:
    ints = np.arange(6).reshape(2, 3)
    for name in ("softmax", "log_softmax", "logsumexp"):
        with pytest.raises(TypeError, match=rf"{name}: x must be floating point, got dtype int64"):
            getattr(ops, name)(ints)
    with pytest.raises(TypeError, match="avg_pool1d: x must be floating point"):
        ops.avg_pool1d(ints[None], 2)


def test_embedding_ids_out_of_range_are_refused() -> None:
    weight = np.arange(10.0).reshape(5, 2)
    with pytest.raises(IndexError, match=r"embedding: id 5 is outside \[0, 5\) .* \(5, 2\)"):
        ops.embedding(weight, np.array([0, 5]))
    with pytest.raises(IndexError, match=r"id -1 is outside"):  # not the last row, as in torch
        ops.embedding(weight, np.array([[-1, 2]]))
    with pytest.raises(ValueError, match=r"weight must have shape \(n, d\), got \(5,\)"):
        ops.embedding(np.zeros(5), np.array([1]))


@pytest.mark.parametrize(("bad", "said"), [(-1, "-1"), (5, "5")])
def test_a_numpy_scalar_embedding_id_out_of_range_is_refused(bad: int, said: str) -> None:
    # (np.int64(-1) read the last row without a word, as an array of ids does not)
    weight = np.arange(10.0).reshape(5, 2)
    with pytest.raises(IndexError, match=rf"embedding: id {said} is outside \[0, 5\)"):
        ops.embedding(weight, np.int64(bad))
    np.testing.assert_array_equal(ops.embedding(weight, np.int64(4)), weight[4])


def _ids_as_on_a_gpu(monkeypatch: Any) -> None:
    """In ``monkeypatch``'s context numpy ids take the path of GPU ids, not read back to the
    host: the array code that cupy runs without its fused kernels."""
    from asyncnn._math import _ops_nn

    monkeypatch.setattr(_ops_nn, "ids_on_host", lambda ids: False)


@pytest.mark.parametrize(
    ("dtype", "big"), [("int64", 5), ("int32", 7), ("uint8", 255), ("uint64", 2**63 + 4)]
)
def test_embedding_gives_gpu_ids_outside_the_table_nan_rows_and_no_gradient(
    dtype: str, big: int, monkeypatch: Any
) -> None:
    # cupy's take wraps an id: 5 read row 0 and -1 row 4 of five, and the gradient went there
    _ids_as_on_a_gpu(monkeypatch)
    weight = np.arange(10.0).reshape(5, 2)
    neg = 0 if dtype.startswith("u") else -1  # (no negative unsigned id)
    ids = np.array([[0, big, 4], [neg, 4, 2]], dtype=dtype)
    out, pullback = ann.vjp(lambda w: ops.embedding(w, ids), weight)
    good = (ids >= 0) & (ids < 5)
    assert np.isnan(out[~good]).all() and out.shape == (2, 3, 2)
    np.testing.assert_array_equal(out[good], weight[ids[good]])
    (grad,) = pullback(np.ones_like(out))
    want = np.zeros_like(weight)
    np.add.at(want, ids[good], 1.0)  # each good id's row once per use; the bad ones nowhere
    np.testing.assert_array_equal(grad, want)
    assert ann.vjp(lambda w: ops.embedding(w, ids[:0]), weight)[0].shape == (0, 3, 2)


def test_embedding_of_gpu_ids_into_an_integer_table_checks_them_on_the_host(
    monkeypatch: Any,
) -> None:
    # an integer row has no NaN to mark a bad id with: it would come out as another row's ints
    _ids_as_on_a_gpu(monkeypatch)
    table = np.arange(10).reshape(5, 2)
    for bad in (5, -1):
        with pytest.raises(IndexError, match=rf"embedding: id {bad} is outside \[0, 5\)"):
            ops.embedding(table, np.array([0, bad, 2]))
    np.testing.assert_array_equal(ops.embedding(table, np.array([4, 0])), table[[4, 0]])
