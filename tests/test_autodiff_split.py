"""``vjp_split`` (asyncnn/_math/_autodiff_split.py): a pullback in two halves, the inputs' cotangents and
then the parameters', from one set of residuals (zero-bubble schedules' B and W)."""

from __future__ import annotations

import numpy as np
import pytest

from asyncnn import nn, ops
from asyncnn._math._autodiff import vjp
from asyncnn._math._autodiff_split import vjp_split
from asyncnn._math._pytree import tree_leaves


def _init(module, seed=0):
    return module.init(seed, "numpy", "float64")


def _same(a, b):
    la, lb = tree_leaves(a), tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


MODULES = {
    "linear": (lambda: nn.Linear(5, 4), (6, 5)),
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), (6, 5)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (4, 2, 9)),
    "layernorm": (lambda: nn.LayerNorm(7), (3, 7)),
    "attention": (lambda: nn.MultiHeadAttention(8, 2), (2, 5, 8)),
    "residual": (lambda: nn.Residual(nn.Sequential(nn.Linear(4, 4), nn.GELU())), (3, 4)),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_split_pullback_equals_the_fused_one_bit_for_bit(name):
    make, shape = MODULES[name]
    module = make()
    params = _init(module)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    out, pb = vjp(lambda p, x: module(p, x), params, x)
    ct = rng.standard_normal(np.shape(out))
    want_p, want_x = pb(ct)
    out2, input_pullback = vjp_split(lambda p, x: module(p, x), params, x)
    np.testing.assert_array_equal(out, out2)
    (gx,), weight_pullback = input_pullback(ct)
    np.testing.assert_array_equal(gx, want_x)
    _same(weight_pullback(), want_p)


def _fd_check(f, params, xs, ct, eps=1e-6):
    """Central differences of <ct, f> against the split halves, float64."""
    _, input_pullback = vjp_split(f, params, *xs)
    gxs, weight_pullback = input_pullback(ct)
    gp = weight_pullback()

    def scalar(p, *xs):
        return float(np.sum(np.asarray(f(p, *xs)) * ct))

    for j, x in enumerate(xs):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            up, dn = x.copy(), x.copy()
            up[idx] += eps
            dn[idx] -= eps
            a = [*xs[:j], up, *xs[j + 1 :]]
            b = [*xs[:j], dn, *xs[j + 1 :]]
            num[idx] = (scalar(params, *a) - scalar(params, *b)) / (2 * eps)
        np.testing.assert_allclose(gxs[j], num, rtol=1e-6, atol=1e-8)
    for key in params:
        w = params[key]
        num = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            up = {**params, key: w.copy()}
            dn = {**params, key: w.copy()}
            up[key][idx] += eps
            dn[key][idx] -= eps
            num[idx] = (scalar(up, *xs) - scalar(dn, *xs)) / (2 * eps)
        np.testing.assert_allclose(gp[key], num, rtol=1e-6, atol=1e-8)


def test_split_halves_match_finite_differences_with_parameter_only_subgraphs():
    rng = np.random.default_rng(2)
    params = {"w": rng.standard_normal((3, 4)), "s": rng.standard_normal((4,))}

    def f(p, x, z):
        w = p["w"] * ops.exp(p["s"])  # a parameter-only chain, walked by the weight half
        h = ops.tanh(x @ w) * z  # two inputs, one node reading both kinds
        return h + ops.sum(w * w)  # a parameter-only value in the output too

    x, z = rng.standard_normal((5, 3)), rng.standard_normal((5, 4))
    _fd_check(f, params, [x, z], rng.standard_normal((5, 4)))


def test_split_halves_are_single_use():
    rng = np.random.default_rng(3)
    w, x = rng.standard_normal((3, 2)), rng.standard_normal((4, 3))

    def f(p, x):
        return x @ p["w"]

    _, input_pullback = vjp_split(f, {"w": w}, x)
    (gx,), weight_pullback = input_pullback(np.ones((4, 2)))
    np.testing.assert_allclose(gx, np.ones((4, 2)) @ w.T)
    with pytest.raises(RuntimeError, match="input half has already run"):
        input_pullback(np.ones((4, 2)))
    np.testing.assert_allclose(weight_pullback()["w"], x.T @ np.ones((4, 2)))
    with pytest.raises(RuntimeError, match="weight half has already run"):
        weight_pullback()
