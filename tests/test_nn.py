"""Tests of asyncnn.nn: layouts, initialization, forward passes, gradients, dropout, specs
(torch cross-checks: test_nn_torch.py; errors: test_nn_errors.py)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import msgpack
import numpy as np
import pytest
from scipy.special import erf

from asyncnn import dynamic, grad, nn, ops, vjp
from asyncnn._math._nn._module import shape_of
from asyncnn._math._ops import PRIMITIVES
from asyncnn.backends import Backend, to_numpy
from asyncnn.testing import check_grads

from _nn_cases import Scale, _np, _np_leaves


def _put(backend: Backend, tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _put(backend, v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_put(backend, v) for v in tree]
    return backend.asarray(tree)


def _shapes(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _shapes(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_shapes(v) for v in tree]
    return tuple(tree.shape)


# -- parameters: layouts, initialization, determinism --------------------------------------------
LAYOUTS = [
    (nn.Linear(3, 5), {"weight": (3, 5), "bias": (5,)}),
    (nn.Linear(3, 5, bias=False), {"weight": (3, 5)}),
    (nn.Conv1d(2, 4, 3), {"weight": (4, 2, 3), "bias": (4,)}),
    (nn.Conv2d(2, 4, (3, 2)), {"weight": (4, 2, 3, 2), "bias": (4,)}),
    (nn.LayerNorm(6), {"weight": (6,), "bias": (6,)}),
    (nn.LayerNorm(6, elementwise_affine=False), {}),
    (nn.GroupNorm(2, 6), {"weight": (6,), "bias": (6,)}),
    (nn.GroupNorm(3, 6, affine=False), {}),
    (nn.GroupNorm(1, 4, bias=False), {"weight": (4,)}),
    (nn.Embedding(10, 4), {"weight": (10, 4)}),
    (
        nn.MultiHeadAttention(8, 2),
        {"in_proj_weight": (8, 24), "in_proj_bias": (24,), "out_proj_weight": (8, 8),
         "out_proj_bias": (8,)},
    ),
    (nn.MultiHeadAttention(8, 2, bias=False),
     {"in_proj_weight": (8, 24), "out_proj_weight": (8, 8)}),
    (nn.Sequential(nn.Linear(2, 3), nn.ReLU()), [{"weight": (2, 3), "bias": (3,)}, {}]),
    (nn.Residual(nn.Linear(3, 3)), {"weight": (3, 3), "bias": (3,)}),
    (nn.CrossEntropyLoss(), {}),
]  # fmt: skip


@pytest.mark.parametrize(("module", "shapes"), LAYOUTS, ids=lambda v: type(v).__name__)
def test_param_layouts(backend: Backend, module: nn.Module, shapes: Any) -> None:
    params = module.init(0, backend=backend.name, dtype="float64")
    assert _shapes(params) == shapes
    for leaf in _np_leaves(params):
        assert leaf.dtype == np.float64


def _check_uniform(x: np.ndarray, bound: float) -> None:
    x = np.asarray(x, dtype=np.float64)
    assert np.all(np.abs(x) <= bound)
    assert np.abs(x).max() > 0.95 * bound  # the whole range is used
    assert abs(x.mean()) < 0.05 * bound
    assert abs(x.std() - bound / math.sqrt(3)) < 0.05 * bound


def test_init_distributions_match_torch_defaults() -> None:
    p = nn.Linear(200, 300).init(1)
    _check_uniform(p["weight"], 1 / math.sqrt(200))
    _check_uniform(np.tile(p["bias"], 20), 1 / math.sqrt(200))
    c = nn.Conv2d(6, 64, (3, 5)).init(2)
    _check_uniform(c["weight"], 1 / math.sqrt(6 * 15))
    assert np.all(np.abs(c["bias"]) <= 1 / math.sqrt(90))
    c1 = nn.Conv1d(4, 100, 7).init(2)
    _check_uniform(c1["weight"], 1 / math.sqrt(28))
    e = nn.Embedding(300, 100).init(3)["weight"]
    assert abs(e.mean()) < 0.02 and abs(e.std() - 1) < 0.02
    ln = nn.LayerNorm((3, 4)).init(0)
    assert np.array_equal(ln["weight"], np.ones((3, 4))) and not ln["bias"].any()
    gn = nn.GroupNorm(2, 6).init(0)
    assert np.array_equal(gn["weight"], np.ones(6)) and not gn["bias"].any()
    a = nn.MultiHeadAttention(64, 4).init(4)
    _check_uniform(a["in_proj_weight"], math.sqrt(6 / (64 + 192)))
    _check_uniform(a["out_proj_weight"], 1 / 8)
    assert not a["in_proj_bias"].any() and not a["out_proj_bias"].any()


def test_init_seed_determinism_and_independent_children() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    p1, p2, p3 = m.init(7), m.init(7), m.init(8)
    assert all(np.array_equal(p1[i]["weight"], p2[i]["weight"]) for i in range(2))
    assert not np.array_equal(p1[0]["weight"], p3[0]["weight"])
    assert not np.array_equal(p1[0]["weight"], p1[1]["weight"])  # children draw independently
    p64 = m.init(7, dtype="float64")
    assert np.array_equal(p64[0]["weight"].astype(np.float32), p1[0]["weight"])


def test_init_offset_seeds_a_slice_as_its_place_in_the_whole_chain() -> None:
    mods = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2)]
    whole = nn.Sequential(*mods).init(5, dtype="float64")
    for k in range(len(mods)):
        part = nn.Sequential(*mods[k:]).init(5, dtype="float64", offset=k)
        for a, b in zip(_np_leaves(whole[k:]), _np_leaves(part), strict=True):
            assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        nn.Sequential(*mods).init(5, offset=-1)


def test_init_identical_across_backends(backend: Backend) -> None:
    m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(6, 4), nn.LayerNorm(4))
    here = m.init(11, backend=backend.name)
    host = m.init(11, backend="cpu")
    assert type(here[0]["weight"]) is type(backend.xp.zeros(1))
    for a, b in zip(_np_leaves(_np(here)), _np_leaves(host), strict=True):
        assert np.array_equal(a, b)


# -- forward passes against plain numpy references ------------------------------------------------
def _conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int, dil: int) -> Any:
    """Direct NCHW cross-correlation with loops over output positions."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho = (h - dil * (kh - 1) - 1) // stride + 1
    wo = (wd - dil * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, :, i * stride : i * stride + dil * (kh - 1) + 1 : dil,
                      j * stride : j * stride + dil * (kw - 1) + 1 : dil]  # fmt: skip
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return out + b[None, :, None, None]


def test_linear_forward(backend: Backend) -> None:
    m = nn.Linear(4, 3)
    p = m.init(0, dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 5, 4))
    y = m(_put(backend, p), backend.asarray(x))
    np.testing.assert_allclose(to_numpy(y), x @ p["weight"] + p["bias"], rtol=1e-12)


def test_conv_forward(backend: Backend) -> None:
    rng = np.random.default_rng(1)
    m2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1)
    p2 = m2.init(0, dtype="float64")
    x2 = rng.standard_normal((2, 3, 7, 6))
    y2 = to_numpy(m2(_put(backend, p2), backend.asarray(x2)))
    np.testing.assert_allclose(y2, _conv_ref(x2, p2["weight"], p2["bias"], 2, 1, 1), rtol=1e-10)
    m1 = nn.Conv1d(2, 3, 3, padding=2, dilation=2)
    p1 = m1.init(0, dtype="float64")
    x1 = rng.standard_normal((2, 2, 9))
    y1 = to_numpy(m1(_put(backend, p1), backend.asarray(x1)))
    # 1-d padding pads the length only: compare with the 2-d reference padded by hand.
    x1p = np.pad(x1, ((0, 0), (0, 0), (2, 2)))[:, :, None, :]
    ref = _conv_ref(x1p, p1["weight"][:, :, None, :], p1["bias"], 1, 0, 2)[:, :, 0, :]
    assert y1.shape == (2, 3, 9) == m1._output_shape((2, 2, 9))
    np.testing.assert_allclose(y1, ref, rtol=1e-10)


def test_pools_forward(backend: Backend) -> None:
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 4))
    xb = backend.asarray(x)
    mx = to_numpy(nn.MaxPool2d(2)({}, xb))
    np.testing.assert_array_equal(mx, x.reshape(2, 3, 3, 2, 2, 2).max(axis=(3, 5)))
    av = to_numpy(nn.AvgPool2d((2, 1))({}, xb))
    np.testing.assert_allclose(av, x.reshape(2, 3, 3, 2, 4).mean(axis=3), rtol=1e-12)
    x1 = x[:, :, :, 0]
    m1 = to_numpy(nn.MaxPool1d(3, stride=1)({}, backend.asarray(x1)))
    np.testing.assert_array_equal(m1, np.stack([x1[..., i : i + 3].max(-1) for i in range(4)], -1))
    a1 = to_numpy(nn.AvgPool1d(2)({}, backend.asarray(x1)))
    np.testing.assert_allclose(a1, x1.reshape(2, 3, 3, 2).mean(-1), rtol=1e-12)
    assert nn.MaxPool2d(2)._output_shape((2, 3, 6, 4)) == (2, 3, 3, 2)


#: AvgPool's options whose gradient is new: windows past the end (ceil_mode), divisors that
#: count the real entries only (count_include_pad=False), and both
AVG_POOL_OPTION_CASES = [
    (nn.AvgPool1d(3, 2, 1, ceil_mode=True), (2, 2, 6)),
    (nn.AvgPool1d(2, ceil_mode=True, count_include_pad=False), (1, 2, 7)),
    (nn.AvgPool1d(5, 3, 2, count_include_pad=False), (2, 1, 9)),
    (nn.AvgPool1d(4, 3, 2, True, False), (1, 2, 8)),
    (nn.AvgPool2d(3, 2, 1, ceil_mode=True), (1, 2, 6, 5)),
    (nn.AvgPool2d((3, 2), (2, 3), (1, 0), count_include_pad=False), (2, 1, 8, 7)),
    (nn.AvgPool2d((4, 3), (3, 2), (2, 1), True, False), (1, 2, 9, 8)),
]


@pytest.mark.parametrize(("module", "shape"), AVG_POOL_OPTION_CASES, ids=repr)
def test_avg_pool_options_gradients(backend: Backend, module: nn.Module, shape: Any) -> None:
    x = backend.asarray(np.random.default_rng(6).standard_normal(shape))
    check_grads(lambda x: module({}, x), x, rtol=1e-6, atol=1e-10)


def test_avg_pool_options_forward_by_hand(backend: Backend) -> None:
    x = backend.asarray(np.arange(1.0, 9.0).reshape(1, 1, 8))  # [1 .. 8]
    # padding 1, kernel 3, stride 2: windows [0 1 2] [2 3 4] [4 5 6] [6 7 8]; ceil_mode adds one
    # that starts at the 8 and runs past the right padding, whose divisor stops at the padding
    got = {
        (ceil, include): to_numpy(nn.AvgPool1d(3, 2, 1, ceil, include)({}, x))[0, 0].tolist()
        for ceil in (False, True)
        for include in (True, False)
    }
    assert got == {
        (False, True): [3 / 3, 9 / 3, 15 / 3, 21 / 3],
        (False, False): [3 / 2, 9 / 3, 15 / 3, 21 / 3],
        (True, True): [3 / 3, 9 / 3, 15 / 3, 21 / 3, 8 / 2],
        (True, False): [3 / 2, 9 / 3, 15 / 3, 21 / 3, 8 / 1],
    }
    assert nn.AvgPool1d(3, 2, 1, ceil_mode=True)._output_shape((1, 1, 8)) == (1, 1, 5)
    # a window rounded up that would start in the right padding is dropped, as torch's
    assert nn.AvgPool1d(3, 3, 1, ceil_mode=True)._output_shape((1, 1, 5)) == (1, 1, 2)


#: AvgPool2d's divisor_override: every window divided by it, a ceil-mode window past the end
#: and a padded one that count_include_pad=False would divide by less too
AVG_POOL_DIVISOR_CASES = [
    (nn.AvgPool2d(2, divisor_override=3), (1, 2, 4, 6)),
    (nn.AvgPool2d(3, 2, 1, True, False, divisor_override=2), (2, 1, 6, 5)),
    (nn.AvgPool2d((3, 2), (2, 3), (1, 0), ceil_mode=True, divisor_override=-4), (1, 2, 8, 7)),
]


@pytest.mark.parametrize(("module", "shape"), AVG_POOL_DIVISOR_CASES, ids=repr)
def test_avg_pool2d_divisor_override_gradients(
    backend: Backend, module: nn.Module, shape: Any
) -> None:
    x = backend.asarray(np.random.default_rng(6).standard_normal(shape))
    check_grads(lambda x: module({}, x), x, rtol=1e-6, atol=1e-10)


def test_avg_pool2d_divisor_override_forward_by_hand(backend: Backend) -> None:
    x = backend.asarray(np.arange(1.0, 17.0).reshape(1, 1, 4, 4))  # rows [1 2 3 4] .. [13 .. 16]
    # windows of 2x2 summed [[14 22] [46 54]], each divided by 2 rather than its 4 cells
    got = to_numpy(nn.AvgPool2d(2, divisor_override=2)({}, x))
    assert got.tolist() == [[[[7.0, 11.0], [23.0, 27.0]]]]
    # kernel 3, stride 2, padding 1, ceil_mode, count_include_pad=False: the last corner
    # window starts at the 16 and runs past the padding, and would be divided by its 1 cell;
    # the override divides it, and the rest, by 3
    pooled = to_numpy(ops.avg_pool2d(x, 3, 2, 1, True, False, divisor_override=3))
    assert pooled.shape == (1, 1, 3, 3)
    assert pooled[0, 0, 2, 2] == 16 / 3
    assert pooled[0, 0, 0, 0] == (1 + 2 + 5 + 6) / 3  # (4 cells of the input)
    assert pooled[0, 0, 1, 1] == (6 + 7 + 8 + 10 + 11 + 12 + 14 + 15 + 16) / 3
    assert nn.AvgPool2d(2, divisor_override=np.int64(2)).divisor_override == 2  # a plain int
    assert nn.AvgPool2d(2) == nn.AvgPool2d(2, divisor_override=None)
    # by name only: torch's is its last argument, after the two flags
    with pytest.raises(TypeError, match="positional"):
        nn.AvgPool2d(2, 2, 0, False, True, 2)  # type: ignore[misc]
    # a spec written before the option loads with torch's default
    old = {"type": "AvgPool2d", "args": {"kernel_size": [2, 2], "stride": None, "padding": 0}}
    assert nn.from_spec(old) == nn.AvgPool2d(2)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: nn.AvgPool2d(2, divisor_override=0), ValueError,
         "AvgPool2d: divisor_override must be a nonzero int or None, got 0"),
        (lambda: nn.AvgPool2d(2, divisor_override=2.0), TypeError,
         "AvgPool2d: divisor_override must be a nonzero int or None, got float 2.0"),
        (lambda: nn.AvgPool2d(2, divisor_override=True), TypeError,
         "AvgPool2d: divisor_override must be a nonzero int or None, got bool True"),
        (lambda: ops.avg_pool2d(np.ones((1, 1, 4, 4)), 2, divisor_override=0), ValueError,
         "avg_pool2d: divisor_override must be a nonzero int or None, got 0"),
        (lambda: ops.avg_pool2d(np.ones((1, 1, 4, 4)), 2, divisor_override="4"), TypeError,
         "avg_pool2d: divisor_override must be a nonzero int or None, got str '4'"),
    ],
)  # fmt: skip
def test_avg_pool2d_divisor_override_refuses_0_and_what_is_not_an_int(
    make: Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


#: MaxPool's options whose gradient is new: windows past the end (ceil_mode), spread windows
#: (dilation), and both
MAX_POOL_OPTION_CASES = [
    (nn.MaxPool1d(3, 2, ceil_mode=True), (2, 2, 8)),
    (nn.MaxPool1d(3, 2, 1, ceil_mode=True), (1, 2, 8)),
    (nn.MaxPool1d(2, 3, 1, 3), (2, 1, 10)),
    (nn.MaxPool1d(3, 2, 1, 2, ceil_mode=True), (1, 2, 9)),
    (nn.MaxPool2d(3, 2, ceil_mode=True), (1, 2, 8, 6)),
    (nn.MaxPool2d((3, 2), (2, 3), (1, 0), ceil_mode=True), (2, 1, 8, 7)),
    (nn.MaxPool2d((2, 3), (3, 1), (1, 1), (3, 2), ceil_mode=True), (1, 2, 10, 9)),
]


@pytest.mark.parametrize(("module", "shape"), MAX_POOL_OPTION_CASES, ids=repr)
def test_max_pool_options_gradients(backend: Backend, module: nn.Module, shape: Any) -> None:
    # (random normal values: no ties, so the maximum is where finite differences see it)
    x = backend.asarray(np.random.default_rng(6).standard_normal(shape))
    check_grads(lambda x: module({}, x), x, rtol=1e-6, atol=1e-10)


def test_max_pool_options_forward_by_hand(backend: Backend) -> None:
    x = backend.asarray(np.array([[[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]]]))
    # kernel 3, stride 2: windows [3 1 4] [4 1 5] [5 9 2]; ceil_mode adds [2 6], past the end
    assert to_numpy(nn.MaxPool1d(3, 2)({}, x)).tolist() == [[[4.0, 5.0, 9.0]]]
    assert to_numpy(nn.MaxPool1d(3, 2, ceil_mode=True)({}, x)).tolist() == [[[4.0, 5.0, 9.0, 6.0]]]
    # dilation 2: windows of cells 0 2 4, 2 4 6: [3 4 5] [4 5 2]
    assert to_numpy(nn.MaxPool1d(3, 2, dilation=2)({}, x)).tolist() == [[[5.0, 5.0]]]
    assert nn.MaxPool1d(3, 2, ceil_mode=True)._output_shape((1, 1, 8)) == (1, 1, 4)
    assert nn.MaxPool2d(3, 2, ceil_mode=True)._output_shape((1, 1, 112, 112)) == (1, 1, 56, 56)
    assert nn.MaxPool2d(3, 2)._output_shape((1, 1, 112, 112)) == (1, 1, 55, 55)
    assert nn.MaxPool2d(2, dilation=(2, 1))._output_shape((1, 1, 7, 7)) == (1, 1, 3, 3)
    # a window rounded up that would start in the right padding is dropped, as torch's
    assert nn.MaxPool1d(3, 3, 1, ceil_mode=True)._output_shape((1, 1, 5)) == (1, 1, 2)
    # torch's order: the fifth positional argument is return_indices, the sixth ceil_mode
    assert nn.MaxPool1d(3, 2, 0, 1, True) == nn.MaxPool1d(3, 2, return_indices=True)
    assert nn.MaxPool1d(3, 2, 0, 1, False, True) == nn.MaxPool1d(3, 2, ceil_mode=True)
    assert nn.MaxPool2d(3) == nn.MaxPool2d(3, None, 0, 1, ceil_mode=False)
    # a spec written before the options loads with torch's defaults
    old = {"type": "MaxPool2d", "args": {"kernel_size": [3, 3], "stride": [2, 2], "padding": 1}}
    assert nn.from_spec(old) == nn.MaxPool2d(3, 2, 1, 1, ceil_mode=False)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: nn.MaxPool1d(2, ceil_mode=1), TypeError,
         "MaxPool1d: ceil_mode must be True or False, got int 1"),
        (lambda: nn.MaxPool2d(2, ceil_mode="yes"), TypeError,
         "MaxPool2d: ceil_mode must be True or False, got str 'yes'"),
        (lambda: nn.MaxPool2d(2, dilation=0), ValueError,
         r"MaxPool2d: dilation must be an int or 2 ints >= 1, got 0"),
        (lambda: nn.MaxPool1d(2, dilation=1.5), ValueError,
         r"MaxPool1d: dilation must be an int >= 1, got 1.5"),
        (lambda: ops.max_pool1d(np.ones((1, 1, 4)), 2, ceil_mode=None), TypeError,
         "max_pool1d: ceil_mode must be True or False, got NoneType None"),
        (lambda: ops.max_pool2d(np.ones((1, 1, 4, 4)), 2, ceil_mode=1), TypeError,
         "max_pool2d: ceil_mode must be True or False, got int 1"),
        (lambda: ops.max_pool2d(np.ones((1, 1, 4, 4)), 2, dilation=(1, 0)), ValueError,
         r"max_pool2d: dilation must be >= 1, got \(1, 0\)"),
        (lambda: ops.max_pool1d(np.ones((1, 1, 4)), 2, dilation=2.0), ValueError,
         r"max_pool1d: dilation must be an int or a tuple of 1 ints, got 2.0"),
        (lambda: ops.max_pool1d(np.ones((1, 1, 4)), 2, dilation=4), ValueError,
         r"max_pool1d: the pooling window \(kernel \(2,\), dilation \(4,\)\) is larger than"),
    ],
)  # fmt: skip
def test_max_pool_options_refuse_bad_values_naming_them(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()
    assert nn.MaxPool1d(2, ceil_mode=np.bool_(True)).ceil_mode is True  # a numpy bool taken
    assert nn.MaxPool2d(2, dilation=np.int64(2)).dilation == (2, 2)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: nn.AvgPool1d(2, ceil_mode=1), TypeError,
         "AvgPool1d: ceil_mode must be True or False, got int 1"),
        (lambda: nn.AvgPool2d(2, count_include_pad="no"), TypeError,
         "AvgPool2d: count_include_pad must be True or False, got str 'no'"),
        (lambda: ops.avg_pool1d(np.ones((1, 1, 4)), 2, ceil_mode=None), TypeError,
         "avg_pool1d: ceil_mode must be True or False, got NoneType None"),
        (lambda: ops.avg_pool2d(np.ones((1, 1, 4, 4)), 2, count_include_pad=0), TypeError,
         "avg_pool2d: count_include_pad must be True or False, got int 0"),
    ],
)  # fmt: skip
def test_avg_pool_options_refuse_what_is_not_a_bool(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()
    assert nn.AvgPool1d(2, ceil_mode=np.bool_(True)).ceil_mode is True  # a numpy bool taken


def test_layer_norm_embedding_activations_forward(backend: Backend) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 5))
    ln = nn.LayerNorm(5)
    p = {"weight": rng.standard_normal(5), "bias": rng.standard_normal(5)}
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    y = to_numpy(ln(_put(backend, p), backend.asarray(x)))
    np.testing.assert_allclose(y, ref * p["weight"] + p["bias"], rtol=1e-10)
    flat = x.reshape(3, 10)
    ref2 = (flat - flat.mean(-1, keepdims=True)) / np.sqrt(flat.var(-1, keepdims=True) + 1e-5)
    y2 = to_numpy(nn.LayerNorm((2, 5), elementwise_affine=False)({}, backend.asarray(x)))
    np.testing.assert_allclose(y2, ref2.reshape(3, 2, 5), rtol=1e-10)

    emb = nn.Embedding(7, 3)
    pe = emb.init(0, dtype="float64")
    ids = np.array([[0, 6, 2], [2, 2, 1]])
    out = to_numpy(emb(_put(backend, pe), backend.asarray(ids)))
    np.testing.assert_array_equal(out, pe["weight"][ids])

    xb = backend.asarray(x)
    gelu = x * 0.5 * (1 + erf(x / math.sqrt(2)))
    np.testing.assert_allclose(to_numpy(nn.GELU()({}, xb)), gelu, rtol=1e-10)
    tanh_gelu = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(to_numpy(nn.GELU("tanh")({}, xb)), tanh_gelu, rtol=1e-10)
    np.testing.assert_allclose(to_numpy(nn.Sigmoid()({}, xb)), 1 / (1 + np.exp(-x)), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(nn.Tanh()({}, xb)), np.tanh(x), rtol=1e-12)
    np.testing.assert_array_equal(to_numpy(nn.ReLU()({}, xb)), np.maximum(x, 0))
    np.testing.assert_array_equal(to_numpy(nn.LeakyReLU()({}, xb)), np.where(x > 0, x, 0.01 * x))
    np.testing.assert_array_equal(to_numpy(nn.LeakyReLU(0.3)({}, xb)), np.where(x > 0, x, 0.3 * x))
    np.testing.assert_allclose(to_numpy(nn.ELU(2.0)({}, xb)), np.where(x > 0, x, 2 * np.expm1(x)))
    np.testing.assert_allclose(to_numpy(nn.SiLU()({}, xb)), x / (1 + np.exp(-x)), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(nn.Softplus()({}, xb)), np.log1p(np.exp(x)), rtol=1e-12)
    soft = np.where(3 * x > 0.5, x, np.log1p(np.exp(3 * x)) / 3)
    np.testing.assert_allclose(to_numpy(nn.Softplus(3.0, 0.5)({}, xb)), soft, rtol=1e-12)
    np.testing.assert_array_equal(to_numpy(nn.Hardtanh()({}, xb)), np.clip(x, -1, 1))
    np.testing.assert_array_equal(to_numpy(nn.Hardtanh(-0.2, 0.5)({}, xb)), np.clip(x, -0.2, 0.5))
    assert nn.Flatten()({}, xb).shape == (3, 10)
    assert nn.Flatten(0, 1)({}, xb).shape == (6, 5)
    sm = to_numpy(nn.Softmax()({}, xb))
    np.testing.assert_allclose(sm, np.exp(x) / np.exp(x).sum(-1, keepdims=True), rtol=1e-10)


def _mha_ref(p: dict[str, np.ndarray], q: Any, k: Any, v: Any, heads: int, causal: bool) -> Any:
    """Attention head by head with explicit loops, from the documented parameter layout."""
    e = q.shape[-1]
    d = e // heads
    w, b = p["in_proj_weight"], p["in_proj_bias"]
    qp, kp, vp = (
        q @ w[:, :e] + b[:e],
        k @ w[:, e : 2 * e] + b[e : 2 * e],
        v @ w[:, 2 * e :] + b[2 * e :],
    )
    out = np.zeros(q.shape)
    for n in range(q.shape[0]):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            s = qp[n][:, cols] @ kp[n][:, cols].T / math.sqrt(d)
            if causal:
                s = np.where(np.tril(np.ones(s.shape, bool)), s, -np.inf)
            a = np.exp(s - s.max(-1, keepdims=True))
            out[n][:, cols] = (a / a.sum(-1, keepdims=True)) @ vp[n][:, cols]
    return out @ p["out_proj_weight"] + p["out_proj_bias"]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_forward(backend: Backend, causal: bool) -> None:
    rng = np.random.default_rng(4)
    m = nn.MultiHeadAttention(6, 3, causal=causal)
    p = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in m.init(0, dtype="float64").items()}
    x = rng.standard_normal((2, 4, 6))
    y = to_numpy(m(_put(backend, p), backend.asarray(x)))
    np.testing.assert_allclose(y, _mha_ref(p, x, x, x, 3, causal), rtol=1e-10, atol=1e-12)
    kv = rng.standard_normal((2, 5, 6))
    y2 = to_numpy(m(_put(backend, p), backend.asarray(x), backend.asarray(kv), backend.asarray(kv)))
    np.testing.assert_allclose(y2, _mha_ref(p, x, kv, kv, 3, causal), rtol=1e-10, atol=1e-12)


def test_losses_forward(backend: Backend) -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 3))
    labels = np.array([0, 2, 1, 2])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    loss = nn.CrossEntropyLoss()({}, backend.asarray(logits), backend.asarray(labels))
    assert float(loss) == pytest.approx(-logp[np.arange(4), labels].mean(), rel=1e-12)
    per = nn.CrossEntropyLoss("none")({}, backend.asarray(logits), backend.asarray(labels))
    np.testing.assert_allclose(to_numpy(per), -logp[np.arange(4), labels], rtol=1e-12)
    target = rng.standard_normal((4, 3))
    mse = nn.MSELoss()({}, backend.asarray(logits), backend.asarray(target))
    assert float(mse) == pytest.approx(((logits - target) ** 2).mean(), rel=1e-12)


@pytest.mark.parametrize(
    ("reduction", "logits", "out"),
    [("none", (5, 4), (5,)), ("none", (2, 4, 3, 1), (2, 3, 1)), ("mean", (5, 4, 3), ())],
)
def test_cross_entropy_output_shape_is_the_labels(
    reduction: str, logits: tuple[int, ...], out: tuple[int, ...]
) -> None:
    loss = nn.CrossEntropyLoss(reduction)
    labels = np.zeros(logits[:1] + logits[2:], np.int64)
    assert loss({}, np.zeros(logits), labels).shape == out
    assert shape_of(loss, logits, labels.shape) == out  # not the logits' shape


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1e3, 1e4, 1e8, 1e17])
def test_cross_entropy_of_large_logits_keeps_its_small_loss(
    backend: Any, dtype: str, scale: float
) -> None:
    # logits [s, s, 0], label 0: the loss is log 2 whatever s. It was (log(sum) + max) - z[y],
    # where adding log 2 to a large max rounds it away: float32 gave 0.6933594 at 1e4 and 0 at
    # 1e8, float64 0 at 1e17 (torch, subtracting first: log 2); the gradient was right
    logits = np.array([[scale, scale, 0.0], [-1.0, 2.0, 0.5]], dtype=dtype)
    labels = np.array([0, 1])
    # (on a GPU, the one-kernel path: backends/_fused_nn.py computes it alike)
    loss = nn.CrossEntropyLoss("none")({}, backend.asarray(logits), backend.asarray(labels))
    want = [math.log(2.0), math.log(1 + math.exp(-3.0) + math.exp(-1.5))]
    rtol = 1e-6 if dtype == "float32" else 1e-13
    np.testing.assert_allclose(np.asarray(to_numpy(loss)), want, rtol=rtol)
    # rows of the most negative float: every class alike, log 3 (it was 0)
    tiny = np.full((1, 3), np.finfo(dtype).min, dtype=dtype)
    loss = nn.CrossEntropyLoss("none")({}, backend.asarray(tiny), backend.asarray(np.array([2])))
    np.testing.assert_allclose(np.asarray(to_numpy(loss)), [math.log(3.0)], rtol=1e-6)


# -- gradients of whole modules (float64, finite differences) -------------------------------------
GRAD_CASES = [
    (nn.Linear(3, 2), (2, 3)),
    (nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 2, 5)),
    (nn.Conv2d(2, 2, 2, padding=1), (1, 2, 3, 3)),
    (nn.LayerNorm(4), (2, 4)),
    (nn.GroupNorm(2, 4), (2, 4, 3, 2)),
    (nn.GroupNorm(3, 3, affine=False), (2, 3, 4)),
    (nn.MultiHeadAttention(4, 2, causal=True), (1, 3, 4)),
    (nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2), nn.Tanh()), (2, 3)),
    # (a Linear and its ReLU as one op: the bias add and the ReLU fused)
    (nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2), nn.ReLU()), (4, 3)),
    (nn.Residual(nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 3), nn.Sigmoid())), (2, 3)),
    (nn.Sequential(nn.Conv2d(1, 2, 2), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)),
     (2, 1, 5, 4)),
]  # fmt: skip


@pytest.mark.parametrize(("module", "shape"), GRAD_CASES, ids=lambda v: type(v).__name__)
def test_module_gradients(backend: Backend, module: nn.Module, shape: tuple[int, ...]) -> None:
    params = module.init(0, backend=backend.name, dtype="float64")
    x = backend.asarray(np.random.default_rng(6).standard_normal(shape))
    check_grads(lambda p, x: module(p, x), params, x, rtol=1e-5, atol=1e-8)


# -- a Linear with the ReLU after it, applied as one op by Sequential ------------------------------
def test_sequential_takes_each_linear_with_a_bias_and_the_relu_after_it_as_one_op() -> None:
    class MyReLU(nn.ReLU):
        pass

    lin, relu = nn.Linear(2, 2), nn.ReLU()
    layouts = {
        (lin, relu, lin, relu, lin): {0, 2},
        (lin, lin, relu, relu): {1},  # (a ReLU after a ReLU: only the first pairs)
        (nn.Linear(2, 2, bias=False), relu, lin): set(),  # no bias to add
        (lin, MyReLU(), lin, nn.Tanh()): set(),  # exact types only: a subclass may differ
        (relu, lin): set(),
    }
    for modules, fused in layouts.items():
        assert nn.Sequential(*modules)._bias_relus == fused
    # one node of the trace for the pair (the product, then the bias add and the ReLU)
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    params = seq.init(0, dtype="float64")
    x = np.random.default_rng(0).standard_normal((2, 3))
    calls: list[str] = []
    original = PRIMITIVES["bias_relu"].forward
    try:
        PRIMITIVES["bias_relu"].forward = lambda *a, **k: (
            calls.append("bias_relu") or original(*a, **k)
        )
        vjp(lambda p: seq(p, x), params)
    finally:
        PRIMITIVES["bias_relu"].forward = original
    assert calls == ["bias_relu"]


_FUSED_DTYPES = ["float64", "float32", "float16", "bfloat16"]


@pytest.mark.parametrize("dtype", _FUSED_DTYPES)
def test_a_fused_linear_and_relu_give_the_two_ops_bits(backend: Backend, dtype: str) -> None:
    # forward and every gradient bit for bit as the modules one by one, with pre-activations
    # of exactly +0 and -0, a NaN and an infinity among them
    try:
        backend.dtype(dtype)
    except ValueError as exc:  # (bfloat16 without ml_dtypes)
        pytest.skip(str(exc))
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    params = seq.init(0, backend=backend.name, dtype=dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 3))
    x[1] = 0.0  # y = 0 + b: the bias itself
    x[2, 0] = np.nan
    x[3, 1] = np.inf
    x = backend.asarray(x.astype(np.float32)).astype(backend.dtype(dtype))
    p0 = dict(params[0])
    p0["bias"] = backend.asarray(np.array([0.0, -0.0, 1.0, -1.0], np.float32)).astype(
        backend.dtype(dtype)
    )
    params = [p0, {}, params[2], {}]
    ct = backend.asarray(rng.standard_normal((6, 2)).astype(np.float32)).astype(x.dtype)

    def one_by_one(p: Any, x: Any) -> Any:
        for m, q in zip(seq.modules, p, strict=True):
            x = m(q, x)
        return x

    with np.errstate(invalid="ignore"):  # (inf * 0 in the products: NaN, on purpose)
        fused_out, fused_pb = vjp(lambda p, x: seq(p, x), params, x)
        plain_out, plain_pb = vjp(one_by_one, params, x)
        fused_grads, plain_grads = _np_leaves(list(fused_pb(ct))), _np_leaves(list(plain_pb(ct)))
    assert fused_out.dtype == plain_out.dtype == x.dtype
    np.testing.assert_array_equal(_bits(fused_out), _bits(plain_out))
    for got, want in zip(fused_grads, plain_grads, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(_bits(got), _bits(want))


def _bits(a: Any) -> np.ndarray:
    """An array's bytes as unsigned ints: equal only where every bit is (NaNs, -0 included)."""
    a = np.ascontiguousarray(to_numpy(a))
    return a.view(f"u{a.dtype.itemsize}")


def test_a_fused_linear_and_relu_of_mixed_dtypes_give_the_two_ops_result() -> None:
    # a float64 bias beside a float32 weight: the sum is float64, as the add's promotion gives
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    params = seq.init(0, dtype="float32")
    params = [{"weight": params[0]["weight"], "bias": params[0]["bias"].astype(np.float64)}, {}]
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    out = seq(params, x)
    want = nn.ReLU()({}, nn.Linear(3, 4)(params[0], x))
    assert out.dtype == want.dtype == np.float64
    np.testing.assert_array_equal(out, want)


def test_a_fused_linear_and_relu_refuse_bad_input_as_the_linear_does() -> None:
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    params = seq.init(0)
    with pytest.raises(ValueError, match=r"Linear\(3 -> 4\) got input of shape \(2, 5\)"):
        seq(params, np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError):
        seq(params, np.zeros((2, 3), np.int64))


def test_a_fused_linear_and_relu_name_the_add_in_its_errors_as_the_linear_does() -> None:
    # a bias traced by an outer grad and a weight by an inner one: the op that meets both is the
    # add, which the error names (not bias_relu, an op the user never called)
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    p = seq.init(0)
    x = np.ones((2, 3), np.float32)

    def outer(b: Any) -> Any:
        def inner(w: Any) -> Any:
            return seq([{"weight": w, "bias": b}, {}], x).sum()

        return grad(inner)(p[0]["weight"]).sum()

    with pytest.raises(ValueError, match=r"^add: its inputs come from two different vjp calls"):
        grad(outer)(p[0]["bias"])


def test_loss_and_embedding_gradients(backend: Backend) -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 4))
    params = model.init(1, backend=backend.name, dtype="float64")
    ids = backend.asarray(np.array([[0, 4], [4, 4], [2, 1]]))
    labels = backend.asarray(np.array([3, 0, 1]))
    loss = nn.CrossEntropyLoss()
    check_grads(lambda p: loss({}, model(p, ids), labels), params, rtol=1e-5, atol=1e-8)
    target = backend.asarray(np.zeros((3, 4)))
    check_grads(lambda p: nn.MSELoss()({}, model(p, ids), target), params, rtol=1e-5, atol=1e-8)


# -- dropout --------------------------------------------------------------------------------------
def test_dropout(backend: Backend) -> None:
    m = nn.Sequential(nn.Dropout(0.25))
    x = backend.asarray(np.ones((200, 50)))
    assert m([{}], x) is x  # evaluation: the identity
    y1 = to_numpy(m([{}], x, rng=backend.rng(3)))
    y2 = to_numpy(m([{}], x, rng=backend.rng(3)))
    np.testing.assert_array_equal(y1, y2)
    assert set(np.unique(y1)) == {0.0, 1 / 0.75}
    assert abs((y1 == 0).mean() - 0.25) < 0.02
    assert not np.array_equal(y1, to_numpy(m([{}], x, rng=backend.rng(4))))


def test_sequential_draws_each_module_from_its_own_rng_of_a_list(backend: Backend) -> None:
    m = nn.Sequential(nn.Dropout(0.5), nn.Tanh(), nn.Dropout(0.25))
    x = backend.asarray(np.ones((40, 30)))
    y = to_numpy(m([{}, {}, {}], x, rng=[backend.rng(1), None, backend.rng(2)]))
    # the same as calling the modules one by one, each with its own generator
    h = m.modules[0]({}, x, rng=backend.rng(1))
    h = m.modules[2]({}, m.modules[1]({}, h), rng=backend.rng(2))
    np.testing.assert_array_equal(y, to_numpy(h))
    # and not what one generator shared in turn gives
    assert not np.array_equal(y, to_numpy(m([{}, {}, {}], x, rng=backend.rng(1))))


def test_sequential_refuses_a_list_of_rngs_of_another_length(backend: Backend) -> None:
    m = nn.Sequential(nn.Dropout(0.5), nn.Tanh(), nn.Dropout(0.25))
    x = backend.asarray(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"Sequential of 3 modules .* tuple of length 2"):
        m([{}, {}, {}], x, rng=(backend.rng(1), None))


# -- specs, equality, flops -----------------------------------------------------------------------
SPEC_MODULES = [
    nn.Linear(3, 4, bias=False), nn.Conv1d(2, 3, 5, stride=2, padding=1, dilation=2),
    nn.Conv2d(1, 8, (3, 5), padding=(1, 2)), nn.MaxPool1d(2), nn.MaxPool2d(2, stride=1),
    nn.MaxUnpool1d(3, stride=2, padding=1), nn.MaxUnpool2d((2, 3)),
    nn.AvgPool1d(3, padding=1), nn.AvgPool2d((2, 3)), nn.LayerNorm((4, 5), eps=1e-6),
    nn.GroupNorm(2, 6, eps=1e-3),
    nn.Embedding(10, 3), nn.MultiHeadAttention(8, 4, bias=False, causal=True, dropout=0.1),
    nn.ReLU(), nn.Tanh(), nn.GELU("tanh"), nn.Sigmoid(), nn.Identity(), nn.Softmax(1),
    nn.LogSoftmax(), nn.Flatten(2), nn.Dropout(0.3), nn.CrossEntropyLoss("sum"), nn.MSELoss(),
    nn.LeakyReLU(0.2), nn.ELU(alpha=0.5), nn.SiLU(), nn.Softplus(beta=2.0, threshold=10.0),
    nn.Hardtanh(-2.0, 3.0), nn.LeakyReLU(), nn.Softplus(), nn.Hardtanh(),
    nn.CrossEntropyLoss(weight=(1.0, 0.25, 3.0), ignore_index=0, label_smoothing=0.1),
    nn.Embedding(10, 3, padding_idx=9),
    nn.Residual(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU())),
    Scale(3, inner=nn.Tanh()),
    # the pure modules of dynamic graphs, with the math since the runtime only runs them
    dynamic.Router(nn.Linear(4, 3), experts=3, k=2, capacity_factor=1.5),
    dynamic.Merge(3), dynamic.RNNCell(2, 5),
    dynamic.Loop(dynamic.RNNCell(2, 5), has_xs=True, has_lengths=True, output="all"),
    nn.LSTMCell(3, 4), nn.GRUCell(3, 4, bias=False),
    nn.LSTM(3, 4, num_layers=2, dropout=0.25, bidirectional=True, return_state=True),
    nn.GRU(2, 3), nn.LSTMCell(2, 3).loop_cell(),
]  # fmt: skip


@pytest.mark.parametrize("module", SPEC_MODULES, ids=lambda m: type(m).__name__)
def test_spec_round_trip(module: nn.Module) -> None:
    spec = nn.to_spec(module)
    wire = msgpack.unpackb(msgpack.packb(spec))
    rebuilt = nn.from_spec(wire)
    assert rebuilt == module and hash(rebuilt) == hash(module) and type(rebuilt) is type(module)


def test_spec_covers_every_builtin_and_names_user_classes() -> None:
    from asyncnn._math._nn._spec import BUILTINS

    assert {type(m).__name__ for m in SPEC_MODULES} >= set(BUILTINS)
    assert nn.to_spec(Scale(2))["type"] == f"{Scale.__module__}:Scale"
    # every module class asyncnn.nn offers is a built-in: a spec names it short, not by a path
    # into asyncnn's private modules (MaxUnpool2d was named "asyncnn._math._nn._conv:...")
    offered = {
        name for name in nn.__all__
        if isinstance(getattr(nn, name), type) and issubclass(getattr(nn, name), nn.Module)
    }  # fmt: skip
    assert offered - {"Module"} <= set(BUILTINS)
    assert nn.to_spec(nn.Linear(2, 3)) == {
        "type": "Linear", "args": {"in_features": 2, "out_features": 3, "bias": True}
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown module type 'Nope'"):
        nn.from_spec({"type": "Nope", "args": {}})
    with pytest.raises(ValueError, match="cannot import"):
        nn.from_spec({"type": "no_such_pkg.x:Y", "args": {}})


def test_modules_compare_and_hash_by_value() -> None:
    assert nn.Conv2d(1, 8, 3) == nn.Conv2d(1, 8, (3, 3))
    assert nn.LayerNorm(4) == nn.LayerNorm((4,))
    assert len({nn.Linear(2, 3), nn.Linear(2, 3), nn.Linear(3, 2)}) == 2
    assert nn.Sequential(nn.ReLU()) != nn.Sequential(nn.Tanh())
    with pytest.raises(dataclasses.FrozenInstanceError):
        nn.Linear(2, 3).in_features = 4  # type: ignore[misc]


#: each module's integer arguments given through ``i``: ``int`` for the reference, a numpy
#: integer type for the module under test (``nn.Linear(np.prod(shape), k)`` after a Flatten)
INT_ARG_MODULES: list[Any] = [
    lambda i: nn.Linear(i(16), i(10)),
    lambda i: nn.Embedding(i(10), i(4), padding_idx=i(-1)),
    lambda i: nn.Conv1d(i(2), i(4), i(3), stride=i(2), padding=i(1), dilation=i(2), groups=i(2)),
    lambda i: nn.Conv2d(i(3), i(8), (i(3), 3), stride=(1, i(2)), padding=i(1), dilation=[i(2), 1]),
    lambda i: nn.MaxPool1d(i(2)),
    lambda i: nn.MaxPool2d((i(2), i(3)), stride=i(1), padding=(i(1), 0)),
    lambda i: nn.AvgPool1d(i(3), stride=i(2), padding=i(1)),
    lambda i: nn.AvgPool2d(i(2), stride=(i(1), i(2))),
    lambda i: nn.LayerNorm(i(16)),
    lambda i: nn.LayerNorm((i(4), 5)),
    lambda i: nn.GroupNorm(i(2), i(6)),
    lambda i: nn.MultiHeadAttention(i(8), i(2)),
    lambda i: nn.LSTMCell(i(3), i(4)),
    lambda i: nn.GRUCell(i(3), i(4), bias=False),
    lambda i: nn.LSTM(i(3), i(4), num_layers=i(2), bidirectional=True),
    lambda i: nn.GRU(i(3), i(4), num_layers=i(2)),
    lambda i: nn.LSTMCell(i(3), i(4)).loop_cell(),
    lambda i: nn.Flatten(i(1), i(-1)),
    lambda i: nn.Softmax(i(1)),
    lambda i: nn.LogSoftmax(i(-1)),
    lambda i: nn.CrossEntropyLoss(ignore_index=i(0)),
    lambda i: dynamic.RNNCell(i(2), i(5)),
    lambda i: dynamic.Loop(dynamic.RNNCell(i(2), i(5)), has_xs=True, max_steps=i(4)),
    lambda i: dynamic.Router(nn.Linear(i(4), i(3)), experts=i(3), k=i(2), capacity=i(5)),
    lambda i: dynamic.Merge(i(3)),
    lambda i: nn.Sequential(nn.Flatten(), nn.Linear(i(16), i(10)), nn.Residual(nn.Linear(10, 10))),
]


def _numpy_scalars(value: Any, where: str) -> list[str]:
    """The places in a module's fields (nested modules and tuples too) that hold a numpy scalar."""
    if isinstance(value, nn.Module):
        return [
            p
            for f in dataclasses.fields(value)
            for p in _numpy_scalars(getattr(value, f.name), f"{where}.{f.name}")
        ]
    if isinstance(value, tuple | list):
        return [p for k, v in enumerate(value) for p in _numpy_scalars(v, f"{where}[{k}]")]
    return [where] if isinstance(value, np.generic) else []


@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint16], ids=lambda t: t.__name__)
@pytest.mark.parametrize("make", INT_ARG_MODULES, ids=lambda f: f(int).__class__.__name__)
def test_modules_take_numpy_integer_sizes_and_keep_plain_ints(make: Any, integer: Any) -> None:
    # nn.Linear(np.prod((4, 4)), 10) said "in_features must be an int >= 1, got np.int64(16)";
    # torch takes it, as asyncnn's ops did. (np.uint16 wraps -1 round: it stays a Python int)
    cast = (lambda v: integer(v) if v >= 0 else int(v)) if integer is np.uint16 else integer
    module, reference = make(cast), make(int)
    assert module == reference and hash(module) == hash(reference)
    assert repr(module) == repr(reference)
    assert not _numpy_scalars(module, type(module).__name__)
    spec = nn.to_spec(module)
    assert spec == nn.to_spec(reference)
    rebuilt = nn.from_spec(msgpack.unpackb(msgpack.packb(spec)))
    assert rebuilt == reference and not _numpy_scalars(rebuilt, type(rebuilt).__name__)


def test_a_module_of_numpy_sizes_initializes_and_runs_as_one_of_ints() -> None:
    n = np.prod((4, 4))  # np.int64(16), a flattened size as a user computes it
    model = nn.Sequential(nn.Flatten(), nn.Linear(n, np.int32(3)))
    x = np.random.default_rng(0).standard_normal((2, 4, 4)).astype(np.float32)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    p = model.init(0, offset=np.int64(0))
    assert p[1]["weight"].shape == (16, 3)
    np.testing.assert_array_equal(model(p, x), reference(reference.init(0), x))
    assert model.flops((None, 4, 4)) == reference.flops((None, 4, 4))


def test_flops_and_num_params() -> None:
    mlp = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    assert mlp.flops((None, 40)) == 2 * (40 * 64 + 64 * 10)
    assert mlp.num_params(mlp.init(0)) == 40 * 64 + 64 + 64 * 10 + 10
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 10))
    assert cnn.flops((None, 1, 8, 8)) == 2 * 4 * 9 * 36 + 2 * 36 * 10
    assert nn.Sequential(Scale(3), nn.Linear(3, 2)).flops((None, 3)) == 12  # Scale: run to see


@dataclasses.dataclass(frozen=True)
class L2Normalized(nn.Module):
    """Rows scaled to unit length: NaN for a row of zeros (the data has none). No shape rule."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        L2_CALLS.append(tuple(x.shape))
        return x / ops.sqrt(ops.sum(x * x, axis=1, keepdims=True))


#: the input shape of each call of L2Normalized
L2_CALLS: list[tuple[int, ...]] = []


def test_shape_of_runs_a_module_on_zeros_quietly_and_once_per_shape() -> None:
    # a run's set-up (flops_per_sample, through Sequential.flops) ran the module on zeros: its
    # 0/0 printed "RuntimeWarning: invalid value encountered in divide" on every fit (and under
    # np.errstate(all="raise") failed, the FLOPs estimate falling back to 0), and each actor's
    # set-up re-initialized and re-ran it
    stage = nn.Sequential(L2Normalized(), nn.Linear(6, 3))
    L2_CALLS.clear()
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        for _ in range(3):
            assert stage.flops((None, 6)) == 2 * 6 * 3
            assert shape_of(stage, (None, 6)) == (1, 3)
        assert shape_of(stage.modules[0], (None, 5)) == (1, 5)  # another shape: run again
    assert L2_CALLS == [(1, 6), (1, 5)]
    # an equal module of its own is run for itself (an identity cache, not one by value)
    assert shape_of(L2Normalized(), (None, 6)) == (1, 6) and len(L2_CALLS) == 3


# -- Dropout: train and eval, the mask the backward uses --------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.2, 0.9])
def test_dropout_backward_uses_the_forwards_mask(backend: Backend, p: float) -> None:
    x = backend.asarray(np.random.default_rng(4).standard_normal((400, 30)) + 5.0)  # no zeros
    drop = nn.Dropout(p)
    out, pullback = vjp(lambda x: drop({}, x, rng=backend.rng(6)), x)
    mask = to_numpy(out) / to_numpy(x)
    kept = 1 / (1 - p)
    assert set(np.round(np.unique(mask), 12)) <= {0.0, round(kept, 12)}
    assert abs((mask == 0).mean() - p) < 0.02
    ct = backend.asarray(np.random.default_rng(5).standard_normal((400, 30)))
    (gx,) = pullback(ct)
    np.testing.assert_allclose(to_numpy(gx), to_numpy(ct) * mask, rtol=1e-13)
    # the expectation is kept, E[out] = x, to 4 standard deviations of the mask's mean
    assert abs(mask.mean() - 1) <= 4 * math.sqrt(p / (1 - p) / mask.size)
    # evaluation: the identity, itself
    assert drop({}, x) is x


@pytest.mark.parametrize("rng", [0, [np.random.default_rng(0)], "seed"])
def test_dropout_refuses_an_rng_that_is_not_a_generator(rng: Any) -> None:
    with pytest.raises(TypeError, match=r"Dropout\(p=0.5\) got rng=\w+, not a Generator"):
        nn.Dropout(0.5)({}, np.ones((2, 3)), rng=rng)
    # a list given to a Residual around a Dropout, rather than to a Sequential
    with pytest.raises(TypeError, match="is for nn.Sequential only"):
        nn.Residual(nn.Dropout(0.5))({}, np.ones((2, 3)), rng=[np.random.default_rng(0)])


def test_dropout_p_of_another_type_is_named() -> None:
    with pytest.raises(ValueError, match=r"Python float in \[0, 1\], got np.float32\(0.5\)"):
        nn.Dropout(np.float32(0.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"probability in \[0, 1\], got 1.5"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match=r"probability in \[0, 1\], got -0.1"):
        nn.Dropout(-0.1)
    with pytest.raises(ValueError, match=r"^dropout: p must be in \[0, 1\], got 1.5"):
        ops.dropout(np.ones(3), 1.5, np.random.default_rng(0))


@pytest.mark.parametrize("p", [1, 1.0])
def test_dropout_of_p_1_drops_everything_in_training_only(backend: Backend, p: float) -> None:
    # torch's Dropout(p=1): zeros and a zero gradient in training (never 1 / (1 - p), which
    # would be a ZeroDivisionError, or 0 * inf = NaN), the identity in evaluation
    x = backend.asarray(np.random.default_rng(4).standard_normal((6, 5)))
    drop = nn.Dropout(p)
    out, pullback = vjp(lambda x: drop({}, x, rng=backend.rng(6)), x)
    (gx,) = pullback(backend.asarray(np.ones((6, 5))))
    for a in (to_numpy(out), to_numpy(gx)):  # (x * 0: -0.0 where x < 0, as torch's)
        np.testing.assert_array_equal(a, np.zeros((6, 5)))
        assert a.dtype == np.float64
    assert drop({}, x) is x
    op_out = ops.dropout(x, float(p), backend.rng(7))
    np.testing.assert_array_equal(to_numpy(op_out), np.zeros((6, 5)))
    assert nn.from_spec(nn.to_spec(drop)) == drop


def _dropout_before(x: Any, p: float, rng: Any) -> tuple[Any, Any]:
    """Dropout as it was computed before it kept its mask as a bool array (the reference): the
    forward's output, and the factor its backward multiplies the cotangent by."""
    keep = rng.random(x.shape) >= p
    scale = (keep * (1 / (1 - p) if p < 1 else 0.0)).astype(x.dtype)
    return x * scale, scale


def _dropout_input(backend: Backend, dtype: Any, seed: int) -> Any:
    """(48, 40) values of ``dtype``: every special value (signed zeros, infinities, NaN, the
    smallest subnormal, the largest finite) many times over, so that each is kept and dropped,
    among ordinary values."""
    info = np.finfo(dtype)
    special = [
        0.0,
        -0.0,
        np.inf,
        -np.inf,
        np.nan,
        -np.nan,
        float(info.max),
        -float(info.max),
        float(info.smallest_subnormal),
        -float(info.smallest_subnormal),
        1.0,
        -3.5,
    ]
    values = np.random.default_rng(seed).standard_normal(48 * 40) * 10
    values[: 30 * len(special)] = np.tile(special, 30)
    return backend.asarray(values.astype(dtype).reshape(48, 40))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9, 0.99999, 1.0])
def test_dropout_keeps_a_bool_mask_and_gives_the_bits_it_gave_with_a_float_one(
    backend: Backend, dtype: str, p: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the mask the backward keeps is one byte an entry, not the input's width (8 in float64),
    # and the forward and the backward are bit for bit those of the float mask, over every
    # special value (x * 0 is -0.0 for x < 0, NaN for inf; at p = 0.99999 the scale 1e5 is inf
    # in float16, and a dropped entry stays x * 0, never 0 * inf)
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    try:
        dt = backend.dtype(dtype)
    except ValueError as exc:  # (a cupy before 14 has no bfloat16)
        pytest.skip(str(exc))
    x = _dropout_input(backend, dt, seed=0)
    ct = _dropout_input(backend, dt, seed=1)[::-1]
    calls: list[dict[str, Any]] = []
    prim = PRIMITIVES["dropout"]

    def spy(*args: Any, **params: Any) -> Any:
        calls.append(params)
        return prim(*args, **params)

    monkeypatch.setitem(PRIMITIVES, "dropout", spy)
    with np.errstate(over="ignore", invalid="ignore"):  # (max * 1.25, inf * 0: on purpose)
        out, pullback = vjp(lambda x: ops.dropout(x, p, backend.rng(6)), x)
        (gx,) = pullback(ct)
        expected, scale = _dropout_before(x, p, backend.rng(6))
        expected_gx = ct * scale
        rule_out, residual = prim.forward(x, **calls[0])
    assert out.dtype == gx.dtype == x.dtype
    assert to_numpy(out).tobytes() == to_numpy(expected).tobytes()
    assert to_numpy(gx).tobytes() == to_numpy(expected_gx).tobytes()
    # the rule's own forward, on the parameters the op gave it: its residual is the mask
    assert to_numpy(rule_out).tobytes() == to_numpy(expected).tobytes()
    kept = [a for a in (residual if isinstance(residual, tuple) else (residual,)) if a.ndim]
    assert [(a.dtype, a.shape) for a in kept] == [(np.dtype(bool), x.shape)]
    assert sum(a.nbytes for a in kept) == x.size  # (float64's scale was 8 * x.size)


# -- specs: more non-default options, malformed specs --------------------------------------------
MORE_SPEC_MODULES = [
    nn.Flatten(0, 2), nn.Flatten(-3, -2), nn.Dropout(0), nn.Dropout(0.999), nn.Dropout(1.0),
    nn.AvgPool1d(3, 2, 1, ceil_mode=True), nn.AvgPool2d((2, 3), padding=(1, 0),
                                                        count_include_pad=False),
    nn.AvgPool2d(3, 2, 1, True, False), nn.MaxPool1d(3, 2, 1, 2, ceil_mode=True),
    nn.AvgPool2d(3, 2, 1, True, False, divisor_override=4),
    nn.MaxPool2d((3, 2), (2, 1), dilation=(1, 2)), nn.MaxPool2d(3, 2, ceil_mode=True),
    nn.Sequential(),
    nn.Sequential(nn.Sequential()), nn.LayerNorm((2, 3), eps=1e-3, elementwise_affine=False),
    nn.LayerNorm(4, bias=False), nn.GroupNorm(4, 8, affine=False), nn.GroupNorm(1, 2, bias=False),
    nn.Conv2d(2, 3, (1, 2), stride=(2, 1), padding=(0, 1),
                                           dilation=(1, 3), bias=False),
    nn.Sequential(
        nn.Residual(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Residual(nn.Identity()))),
        nn.Sequential(nn.Flatten(0), nn.Sequential(nn.Embedding(3, 2))),
    ),
    nn.Residual(nn.Residual(nn.Sequential(nn.LayerNorm(3), nn.MultiHeadAttention(3, 1)))),
]  # fmt: skip


@pytest.mark.parametrize("module", MORE_SPEC_MODULES, ids=repr)
def test_spec_round_trip_keeps_every_field_of_nested_modules(module: nn.Module) -> None:
    spec = nn.to_spec(module)
    rebuilt = nn.from_spec(msgpack.unpackb(msgpack.packb(spec)))
    assert rebuilt == module and repr(rebuilt) == repr(module)
    assert nn.to_spec(rebuilt) == spec


@dataclasses.dataclass(frozen=True)
class Doubled(nn.Module):
    """A user module with a field its constructor does not take, derived from another."""

    n: int
    twice: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "twice", 2 * self.n)

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.multiply(x, float(self.twice))


def test_spec_leaves_out_fields_the_constructor_does_not_take() -> None:
    spec = nn.to_spec(Doubled(3))
    assert spec["args"] == {"n": 3}
    assert nn.from_spec(msgpack.unpackb(msgpack.packb(spec))) == Doubled(3)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"type": "Linear", "args": {"in_features": 3}},
         r"args of 'Linear' lack \['out_features'\]; it takes \['in_features', 'out_features', "
         r"'bias'\]"),
        ({"type": "Linear", "args": {"in_features": 3, "out_features": 2, "bogus": 1}},
         r"args of 'Linear' have unknown \['bogus'\]"),
        ({"type": "Sequential", "args": {}}, r"args of 'Sequential' lack \['modules'\]"),
        ({"type": "Sequential", "args": {"modules": [{"type": "Flatten", "args": {"dim": 1}}]}},
         r"args of 'Flatten' have unknown \['dim'\]"),
        ({"type": "Linear", "args": [3, 2]}, r"a module spec is \{'type': str, 'args'"),
        ({"type": 3, "args": {}}, r"a module spec is \{'type': str, 'args'"),
    ],
)  # fmt: skip
def test_from_spec_names_what_is_wrong_with_a_spec(spec: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nn.from_spec(spec)


def test_sequential_takes_its_field_by_name_so_dataclasses_replace_works() -> None:
    seq = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.1))
    swapped = dataclasses.replace(seq, modules=(nn.Linear(2, 3), nn.ReLU()))
    assert swapped == nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    assert nn.Sequential(modules=[nn.ReLU()]) == nn.Sequential(nn.ReLU())
    with pytest.raises(TypeError, match="not both"):
        nn.Sequential(nn.ReLU(), modules=[nn.Tanh()])
    with pytest.raises(TypeError, match="argument 1 is str, not an nn.Module"):
        nn.Sequential(modules=[nn.ReLU(), "relu"])  # type: ignore[list-item]


# -- CrossEntropyLoss options, Embedding padding_idx ----------------------------------------------
CE_GRAD_OPTIONS = [
    {"weight": (0.5, 2.0, 1.0)},
    {"ignore_index": 1},
    {"label_smoothing": 0.2},
    {"weight": (0.5, 2.0, 1.0), "label_smoothing": 0.4, "ignore_index": -1},
    {"weight": (0.5, 2.0, 1.0), "label_smoothing": 1.0},
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", CE_GRAD_OPTIONS, ids=lambda o: "-".join(o))
def test_cross_entropy_options_gradients(
    backend: Backend, options: dict[str, Any], reduction: str
) -> None:
    loss = nn.CrossEntropyLoss(reduction, **options)
    rng = np.random.default_rng(12)
    for shape, labels in [((5, 3), [0, 2, -1, 1, 2]), ((2, 3, 2, 2), [[[0, 1], [-1, 2]]] * 2)]:
        logits = backend.asarray(rng.standard_normal(shape))
        y = np.array(labels)
        y = backend.asarray(np.where(y == -1, loss.ignore_index, y))  # -1: an ignored position
        check_grads(lambda x: loss({}, x, y), logits, rtol=1e-6, atol=1e-9)  # noqa: B023


def test_cross_entropy_defaults_keep_the_fused_primitive_and_options_do_not() -> None:
    logits = np.random.default_rng(13).standard_normal((4, 3)).astype(np.float32)
    labels = np.array([0, 2, 1, 2])
    call = nn.CrossEntropyLoss().primitive_call(logits, labels)
    assert call is not None and call[0] is PRIMITIVES["cross_entropy"]
    np.testing.assert_array_equal(
        nn.CrossEntropyLoss()({}, logits, labels), ops.cross_entropy(logits, labels)
    )  # bit for bit: the same primitive
    for options in CE_GRAD_OPTIONS:
        assert nn.CrossEntropyLoss(**options).primitive_call(logits, labels) is None
    # torch's default ignore_index: a label -100 is ignored (it was refused as outside [0, 3))
    ignored = np.array([0, -100, 1, -100])
    assert nn.CrossEntropyLoss().primitive_call(logits, ignored) is None
    want = ops.cross_entropy(logits[[0, 2]], ignored[[0, 2]])
    np.testing.assert_allclose(nn.CrossEntropyLoss()({}, logits, ignored), want, rtol=1e-6)
    # any other is refused, naming its place (the fused op's message named none)
    said = r"label -1 at labels\[1\] is outside \[0, 3\) .* not the ignore_index \(-100\)"
    with pytest.raises(ValueError, match=said):
        nn.CrossEntropyLoss()({}, logits, np.array([0, -1, 1, 2]))
    with pytest.raises(ValueError, match=said):
        nn.CrossEntropyLoss().primitive_call(logits, np.array([0, -1, 1, 2]))


def test_cross_entropy_options_normalise_compare_hash_and_show() -> None:
    a = nn.CrossEntropyLoss(weight=[1, 2.5, np.float32(0.5)], ignore_index=np.int64(3))
    b = nn.CrossEntropyLoss(weight=np.array([1.0, 2.5, 0.5]), ignore_index=3)
    assert a == b and hash(a) == hash(b) and a.weight == (1.0, 2.5, 0.5)
    assert type(a.ignore_index) is int and type(a.label_smoothing) is float
    assert repr(nn.CrossEntropyLoss()) == "CrossEntropyLoss(reduction='mean')"
    assert repr(nn.CrossEntropyLoss("sum", weight=(1, 2), label_smoothing=0.1)) == (
        "CrossEntropyLoss(reduction='sum', weight=(1.0, 2.0), label_smoothing=0.1)"
    )
    assert repr(nn.CrossEntropyLoss(ignore_index=0)) == (
        "CrossEntropyLoss(reduction='mean', ignore_index=0)"
    )
    assert repr(nn.Embedding(5, 2)) == "Embedding(num_embeddings=5, embedding_dim=2)"
    assert repr(nn.Embedding(5, 2, padding_idx=-1)) == (
        "Embedding(num_embeddings=5, embedding_dim=2, padding_idx=4)"
    )
    assert nn.Embedding(5, 2, padding_idx=-1) == nn.Embedding(5, 2, padding_idx=4)
    assert nn.to_spec(a)["args"]["weight"] == [1.0, 2.5, 0.5]


def test_cross_entropy_options_poison_a_label_out_of_range_on_a_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # device labels are not read back: a label outside [0, C) that is not ignore_index makes
    # its loss NaN (so the mean's too), as the fused kernel does; here numpy labels stand in
    from asyncnn._math import _ops_nn

    monkeypatch.setattr(_ops_nn, "ids_on_host", lambda ids: False)
    logits = np.random.default_rng(14).standard_normal((3, 4))
    labels = np.array([1, 9, -100])
    per = nn.CrossEntropyLoss("none", label_smoothing=0.1)({}, logits, labels)
    assert np.isfinite(per[0]) and np.isnan(per[1]) and per[2] == 0
    assert np.isnan(nn.CrossEntropyLoss(weight=(1, 2, 3, 4))({}, logits, labels))


def test_embedding_padding_row_gets_no_gradient(backend: Backend) -> None:
    emb = nn.Embedding(5, 3, padding_idx=1)
    params = emb.init(0, backend=backend.name, dtype="float64")
    assert not to_numpy(params["weight"])[1].any()
    params = {"weight": backend.asarray(np.random.default_rng(15).standard_normal((5, 3)))}
    ids = backend.asarray(np.array([[1, 0], [4, 1], [1, 1]]))
    out, pullback = vjp(lambda p: emb(p, ids), params)
    np.testing.assert_array_equal(to_numpy(out), to_numpy(params["weight"])[to_numpy(ids)])
    (grads,) = pullback(backend.xp.ones(out.shape))
    np.testing.assert_array_equal(
        to_numpy(grads["weight"]), [[1] * 3, [0] * 3, [0] * 3, [0] * 3, [1] * 3]
    )
    # the other rows: the gradient of the lookup, against finite differences
    rest = backend.asarray(np.array([[0, 4], [3, 2]]))
    check_grads(lambda p: emb(p, rest), params, rtol=1e-6, atol=1e-9)


# -- group normalization --------------------------------------------------------------------------
def test_group_norm_forward_and_output_shape(backend: Backend) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 3, 2))
    gn = nn.GroupNorm(3, 6)
    p = {"weight": rng.standard_normal(6), "bias": rng.standard_normal(6)}
    g = x.reshape(2, 3, 12)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(
        x.shape
    )
    y = to_numpy(gn(_put(backend, p), backend.asarray(x)))
    np.testing.assert_allclose(y, ref * p["weight"][:, None, None] + p["bias"][:, None, None],
                               rtol=1e-10)  # fmt: skip
    plain = to_numpy(nn.GroupNorm(3, 6, affine=False)({}, backend.asarray(x)))
    np.testing.assert_allclose(plain, ref, rtol=1e-10)
    assert gn._output_shape((None, 6, 3, 2)) == (None, 6, 3, 2)
    assert gn._output_shape((2, 6, 3, 2)) == (2, 6, 3, 2)
    assert nn.GroupNorm(2, 4)._output_shape((5, 4)) == (5, 4)


def test_a_conv_and_group_norm_graph_trains_under_sync_as_a_plain_loop() -> None:
    import asyncnn as ann
    from asyncnn import optim, policies

    modules = [nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
               nn.Linear(4 * 4 * 4, 3)]  # fmt: skip
    g = ann.Graph.sequential(modules, loss=nn.CrossEntropyLoss(), stages=[2, 3],
                             input_shape=(None, 1, 4, 4))  # fmt: skip
    rng = np.random.default_rng(9)
    data = {"x": rng.standard_normal((8, 1, 4, 4)), "y": rng.integers(0, 3, 8)}
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=0,
                     dtype="float64")  # fmt: skip
    p = [*tr.params["stage0"], *tr.params["stage1"]]
    tr.fit(data, epochs=2, batch_size=4, shuffle=False)
    model, loss = nn.Sequential(*modules), nn.CrossEntropyLoss()
    for _ in range(2):
        for at in (slice(0, 4), slice(4, 8)):
            grads = ann.grad(lambda p, at=at: loss({}, model(p, data["x"][at]), data["y"][at]))(p)
            p = [{k: v - 0.1 * gr[k] for k, v in q.items()} for q, gr in zip(p, grads, strict=True)]
    trained = [*tr.params["stage0"], *tr.params["stage1"]]
    assert any(trained[1]["weight"] != 1.0)  # (the norm's own weight trained)
    for want, got in zip(p, trained, strict=True):
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12)


def test_hardtanh_of_integers_with_an_infinite_bound_bounds_that_side_not() -> None:
    # (int(inf) raised a bare OverflowError naming no module)
    x = np.arange(-3, 4)
    out = nn.Hardtanh(-np.inf, 2.0)({}, x)
    np.testing.assert_array_equal(out, np.minimum(x, 2))
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(nn.Hardtanh(-1.0, np.inf)({}, x), np.maximum(x, -1))
    np.testing.assert_array_equal(nn.Hardtanh(-np.inf, np.inf)({}, x), x)
