"""asyncnn.nn against torch with the same weights: forward passes, gradients and init bounds of
the layers, attention, embeddings and containers."""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import pytest

from asyncnn import nn, ops, vjp

from _nn_cases import _np_leaves


# -- torch cross-checks (same weights) ------------------------------------------------------------
def test_against_torch() -> None:
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(7)
    t = torch.from_numpy

    x = rng.standard_normal((2, 3, 8, 7))
    c = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2))
    pc = c.init(0, dtype="float64")
    ref = f.conv2d(t(x), t(pc["weight"]), t(pc["bias"]), (2, 1), 1, (1, 2)).numpy()
    np.testing.assert_allclose(c(pc, x), ref, rtol=1e-10, atol=1e-12)
    c1 = nn.Conv1d(3, 2, 4, stride=2, padding=1)
    p1 = c1.init(0, dtype="float64")
    x1 = x[:, :, 0, :]
    ref1 = f.conv1d(t(x1), t(p1["weight"]), t(p1["bias"]), 2, 1).numpy()
    np.testing.assert_allclose(c1(p1, x1), ref1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        nn.MaxPool2d(3, stride=2, padding=1)({}, x), f.max_pool2d(t(x), 3, 2, 1).numpy()
    )
    np.testing.assert_allclose(
        nn.AvgPool1d(3, stride=2, padding=1)({}, x1), f.avg_pool1d(t(x1), 3, 2, 1).numpy(),
        rtol=1e-12,
    )  # fmt: skip
    lin = nn.Linear(7, 3)
    pl = lin.init(0, dtype="float64")
    np.testing.assert_allclose(
        lin(pl, x), f.linear(t(x), t(pl["weight"].T), t(pl["bias"])).numpy(), rtol=1e-10
    )
    np.testing.assert_allclose(
        nn.LayerNorm(7)(nn.LayerNorm(7).init(0, dtype="float64"), x),
        f.layer_norm(t(x), (7,)).numpy(),
        rtol=1e-10,
        atol=1e-12,
    )
    np.testing.assert_allclose(nn.GELU()({}, x), f.gelu(t(x)).numpy(), rtol=1e-10, atol=1e-14)
    logits, labels = rng.standard_normal((5, 4)), np.array([0, 3, 1, 1, 2])
    assert float(nn.CrossEntropyLoss()({}, logits, labels)) == pytest.approx(
        float(f.cross_entropy(t(logits), t(labels))), rel=1e-12
    )

    for causal in (False, True):
        m = nn.MultiHeadAttention(8, 2, causal=causal)
        p0 = m.init(1, "numpy", "float64")
        p = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in p0.items()}
        tm = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
        with torch.no_grad():
            tm.in_proj_weight.copy_(t(p["in_proj_weight"].T))
            tm.in_proj_bias.copy_(t(p["in_proj_bias"]))
            tm.out_proj.weight.copy_(t(p["out_proj_weight"].T))
            tm.out_proj.bias.copy_(t(p["out_proj_bias"]))
        xa = rng.standard_normal((2, 5, 8))
        mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1) if causal else None
        ref_a = tm(t(xa), t(xa), t(xa), attn_mask=mask, need_weights=False)[0].detach().numpy()
        np.testing.assert_allclose(m(p, xa), ref_a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kv_len", "causal", "bias"), [(None, False, True), (None, True, False), (3, True, True)]
)
def test_attention_gradients_against_torch(kv_len: int | None, causal: bool, bias: bool) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    m = nn.MultiHeadAttention(6, 3, bias=bias, causal=causal)
    p = {k: rng.standard_normal(v.shape) for k, v in m.init(0, dtype="float64").items()}
    x = rng.standard_normal((2, 4, 6))
    kv = () if kv_len is None else (rng.standard_normal((2, kv_len, 6)),) * 2
    out, pullback = vjp(lambda p, *xs: m(p, *xs), p, x, *kv)
    ct = rng.standard_normal(out.shape)
    grads = pullback(ct)

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    tx = [torch.tensor(a, requires_grad=True) for a in (x, *kv)]
    q, k, v = (tx * 3)[:3] if kv_len is None else tx
    lk = k.shape[1]
    mask = torch.triu(torch.ones(4, lk, dtype=torch.bool), 1) if causal else None
    w, b = tp["in_proj_weight"].T, tp.get("in_proj_bias")
    ref = torch.nn.functional.multi_head_attention_forward(
        *(t.transpose(0, 1) for t in (q, k, v)), 6, 3, w, b, None, None, False, 0.0,
        tp["out_proj_weight"].T, tp.get("out_proj_bias"), attn_mask=mask, need_weights=False,
    )[0].transpose(0, 1)  # fmt: skip
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    ref.backward(torch.tensor(ct))
    for key, g in grads[0].items():
        np.testing.assert_allclose(g, tp[key].grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=key)
    for g, t in zip(grads[1:], tx, strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-9, atol=1e-11)


# -- Embedding, Linear, Flatten, Residual, Sequential against torch (float64) ---------------------
@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8"])
def test_embedding_forward_and_gradient_match_torch_with_repeated_ids(dtype: str) -> None:
    torch = pytest.importorskip("torch")
    emb = nn.Embedding(6, 4)
    params = emb.init(2, dtype="float64")
    ids = np.array([[5, 0, 5], [5, 2, 0]], dtype=dtype)  # row 5 three times, row 0 twice
    out, pullback = vjp(lambda p, i: emb(p, i), params, ids)
    ct = np.random.default_rng(9).standard_normal(out.shape)
    grads, gids = pullback(ct)
    tw = torch.tensor(params["weight"], requires_grad=True)
    ref = torch.nn.functional.embedding(torch.tensor(ids.astype(np.int64)), tw)
    ref.backward(torch.tensor(ct))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads["weight"], tw.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert gids is None  # integer ids get no gradient
    # a batch of no rows: an empty lookup, a zero gradient
    empty = np.zeros((0, 3), dtype=dtype)
    out0, pullback0 = vjp(lambda p: emb(p, empty), params)
    assert out0.shape == (0, 3, 4)
    assert not pullback0(np.zeros((0, 3, 4)))[0]["weight"].any()


@pytest.mark.parametrize(
    ("ids", "bad", "at"),
    [(np.array([[0, 1], [6, 2]]), 6, "ids[1, 0]"), (np.array([3, -1, 0]), -1, "ids[1]"),
     (np.array([9], dtype=np.uint8), 9, "ids[0]"),
     (np.int64(-1), -1, "ids (ids of shape ())")],  # numpy's take would read the last row
)  # fmt: skip
def test_embedding_names_itself_and_the_id_outside_its_table(ids: Any, bad: int, at: str) -> None:
    emb = nn.Embedding(6, 4)
    with pytest.raises(IndexError) as info:
        emb(emb.init(0), ids)
    msg = str(info.value)
    assert msg.startswith(f"Embedding(num_embeddings=6, embedding_dim=4) got id {bad} at {at}")
    assert "outside [0, 6)" in msg and "num_embeddings" in msg
    assert ("not counted from the end" in msg) == (bad < 0)


@pytest.mark.parametrize(
    ("ids", "got"),
    [(np.array([0.0, 1.0]), "dtype float64 and shape (2,)"), (np.array([True]), "dtype bool"),
     ([0, 1], "a value of type list")],
)  # fmt: skip
def test_embedding_refuses_ids_that_are_not_an_integer_array(ids: Any, got: str) -> None:
    emb = nn.Embedding(6, 4)
    with pytest.raises(TypeError, match=r"Embedding\(num_embeddings=6.* takes integer ids") as info:
        emb(emb.init(0), ids)
    assert got in str(info.value) and "np.int64" in str(info.value)


def test_dense_and_container_gradients_match_torch() -> None:
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(10)

    def linear(p: Any, x: Any) -> Any:
        return f.linear(x, p["weight"].T, p.get("bias"))

    cases = [
        (nn.Linear(4, 5), linear, (3, 4)),
        (nn.Linear(4, 5), linear, (2, 3, 4)),
        (nn.Linear(4, 5, bias=False), linear, (3, 4)),
        (nn.Linear(4, 5), linear, (0, 4)),
        (nn.Flatten(), lambda p, x: torch.flatten(x, 1), (2, 3, 4)),
        (nn.Flatten(0, -2), lambda p, x: torch.flatten(x, 0, -2), (2, 3, 4)),
        (nn.Residual(nn.Linear(4, 4)), lambda p, x: x + linear(p, x), (3, 4)),
        (nn.Residual(nn.Linear(4, 4)), lambda p, x: x + linear(p, x), (0, 4)),
        (
            nn.Sequential(
                nn.Linear(4, 6), nn.Tanh(), nn.Sequential(nn.Identity(), nn.Linear(6, 2))
            ),
            lambda p, x: linear(p[2][1], torch.tanh(linear(p[0], x))),
            (3, 4),
        ),
    ]
    for module, ref_fn, shape in cases:
        params = module.init(1, dtype="float64")
        x = rng.standard_normal(shape)
        out, pullback = vjp(lambda p, x: module(p, x), params, x)  # noqa: B023
        ct = rng.standard_normal(out.shape)
        grads, gx = pullback(ct)
        tp = _torch_tree(torch, params)
        tx = torch.tensor(x, requires_grad=True)
        ref = ref_fn(tp, tx)
        ref.backward(torch.tensor(ct))
        np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
        for ours, theirs in zip(_np_leaves(grads), _np_leaves(tp), strict=True):
            np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-10, atol=1e-12)


def _torch_tree(torch: Any, tree: Any) -> Any:
    # dicts rebuilt in sorted key order, the order a pullback returns them in
    if isinstance(tree, dict):
        return {k: _torch_tree(torch, tree[k]) for k in sorted(tree)}
    if isinstance(tree, list):
        return [_torch_tree(torch, v) for v in tree]
    return torch.tensor(tree, requires_grad=True)


def test_init_bounds_are_torchs_own() -> None:
    # the bounds torch computes for its own layers, against ours: kaiming_uniform(a=sqrt(5))
    # is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the bias too; attention's in_proj Xavier-uniform
    torch = pytest.importorskip("torch")
    fan_in = torch.nn.init._calculate_fan_in_and_fan_out
    cases = [
        (nn.Linear(30, 20), torch.nn.Linear(30, 20), {"weight": "weight", "bias": "bias"}),
        (nn.Conv1d(3, 8, 5), torch.nn.Conv1d(3, 8, 5), {"weight": "weight", "bias": "bias"}),
        (nn.Conv2d(3, 8, (3, 2)), torch.nn.Conv2d(3, 8, (3, 2)),
         {"weight": "weight", "bias": "bias"}),
        (nn.MultiHeadAttention(12, 3), torch.nn.MultiheadAttention(12, 3, batch_first=True),
         {"in_proj_weight": "in_proj_weight", "out_proj_weight": "out_proj.weight"}),
    ]  # fmt: skip
    for ours, theirs, names in cases:
        tp = dict(theirs.named_parameters())
        for key, tkey in names.items():
            w = tp[tkey].detach()
            fi, fo = fan_in(w if w.ndim > 1 else tp["weight"].detach())
            if key == "in_proj_weight":
                bound = math.sqrt(6 / (fi + fo))
            else:
                bound = 1 / math.sqrt(fi)
            drawn = np.concatenate(
                [np.ravel(ours.init(s, dtype="float64")[key]) for s in range(20)]
            )
            assert np.abs(drawn).max() <= bound and np.abs(drawn).max() > 0.97 * bound, key
            assert abs(drawn.std() - bound / math.sqrt(3)) < 0.1 * bound, key
    emb = np.concatenate([np.ravel(nn.Embedding(50, 8).init(s)["weight"]) for s in range(10)])
    assert abs(emb.mean()) < 0.05 and abs(emb.std() - 1) < 0.05  # torch's N(0, 1)


# -- CrossEntropyLoss options and Embedding padding_idx against torch ----------------------------
_CE_OPTIONS = [
    pytest.param({"weight": (0.5, 2.0, 1.0, 3.0)}, 0, id="weight"),
    pytest.param({}, 2, id="default-ignore_index"),  # torch's default ignores -100 labels
    pytest.param({"ignore_index": 1}, 0, id="ignore_index-a-class"),
    pytest.param({"label_smoothing": 0.25}, 0, id="label_smoothing"),
    pytest.param({"weight": (0.5, 2.0, 1.0, 3.0), "label_smoothing": 0.3}, 0, id="weight-smooth"),
    pytest.param({"weight": (0.5, 2.0, 1.0, 3.0), "ignore_index": -1, "label_smoothing": 0.1}, 3,
                 id="all-three"),
    pytest.param({"weight": (1.5, 0.5, 1.0, 2.0), "label_smoothing": 1.0}, 1, id="smooth-1"),
    pytest.param({"weight": (0.5, 2.0, 1.0, 3.0), "label_smoothing": 0.2}, 99, id="all-ignored"),
    pytest.param({"ignore_index": 7}, 99, id="all-ignored-plain"),
]  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 2, 3)], ids=["NC", "NCd1d2"])
@pytest.mark.parametrize(("options", "ignored"), _CE_OPTIONS)
def test_cross_entropy_options_match_torch(
    options: dict[str, Any], ignored: int, shape: tuple[int, ...], dtype: str
) -> None:
    # every reduction, value and gradient, against torch.nn.functional.cross_entropy (weights
    # with label smoothing: torch's smoothing term is weighted per class and its mean divided
    # by the picked weights, as its plain term's)
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    logits = rng.standard_normal(shape).astype(dtype)
    labels = rng.integers(0, shape[1], (shape[0], *shape[2:]))
    ignore_index = options.get("ignore_index", -100)
    flat = labels.reshape(-1)
    flat[: min(ignored, flat.size)] = ignore_index  # the first positions ignored (all: 99)
    if ignore_index in range(shape[1]):
        flat[-1] = ignore_index  # a class that is the ignored index
    weight = options.get("weight")
    for reduction in ("mean", "sum", "none"):
        loss = nn.CrossEntropyLoss(reduction, **options)
        out, pullback = vjp(lambda x: loss({}, x, labels), logits)  # noqa: B023
        ct = rng.standard_normal(np.shape(out)).astype(dtype)
        (grad,) = pullback(ct)
        tx = torch.tensor(logits, requires_grad=True)
        ref = torch.nn.functional.cross_entropy(
            tx,
            torch.from_numpy(labels),
            weight=None if weight is None else torch.tensor(weight, dtype=tx.dtype),
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=options.get("label_smoothing", 0.0),
        )
        ref.backward(torch.tensor(ct))
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-11, "atol": 1e-13}
        assert np.asarray(out).dtype == np.dtype(dtype) and grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(out, ref.detach().numpy(), **tol, err_msg=reduction)
        np.testing.assert_allclose(grad, tx.grad.numpy(), **tol, err_msg=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", [0, 2, 6], ids=["none-ignored", "some", "all"])
def test_the_cross_entropy_op_ignores_as_torch(reduction: str, ignored: int) -> None:
    # the op's own ignore_index (what the GPU kernels of a loss at its defaults use), value and
    # gradient in float64, against torch; every label ignored: the mean NaN, the gradient 0
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((6, 4))
    labels = rng.integers(0, 4, 6)
    labels[:ignored] = -100
    out, pullback = vjp(lambda x: ops.cross_entropy(x, labels, reduction, -100), logits)
    ct = rng.standard_normal(np.shape(out))
    (grad,) = pullback(ct)
    tx = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(tx, torch.from_numpy(labels), reduction=reduction)
    ref.backward(torch.tensor(ct))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-12, atol=1e-14)
    if ignored == 6 and reduction == "mean":  # torch's gradient is NaN there; ours 0
        assert not grad.any()
    else:
        np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-12, atol=1e-14)
    assert not np.signbit(grad[:ignored]).any()  # an ignored row's gradient is +0, as torch's
    if not ignored:  # nothing ignored: the same bits as the op without ignore_index
        want, pull = vjp(lambda x: ops.cross_entropy(x, labels, reduction), logits)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(grad, pull(ct)[0])


@pytest.mark.parametrize("padding_idx", [0, 3, -1, -6])
def test_embedding_padding_idx_matches_torch(padding_idx: int) -> None:
    # the padding row is initialised to zeros and gets no gradient; the forward is a lookup
    torch = pytest.importorskip("torch")
    emb = nn.Embedding(6, 4, padding_idx=padding_idx)
    params = emb.init(2, dtype="float64")
    row = padding_idx % 6
    assert emb.padding_idx == row and not params["weight"][row].any()
    others = np.delete(params["weight"], row, axis=0)
    # the other rows are the draws of an Embedding without padding_idx: only the row is zeroed
    np.testing.assert_array_equal(
        others, np.delete(nn.Embedding(6, 4).init(2, dtype="float64")["weight"], row, 0)
    )
    params = {"weight": np.random.default_rng(3).standard_normal((6, 4))}  # a trained table
    ids = np.array([[row, 1, 2], [5, row, row], [0, 3, 4]])
    out, pullback = vjp(lambda p: emb(p, ids), params)
    ct = np.random.default_rng(4).standard_normal(out.shape)
    (grads,) = pullback(ct)
    tw = torch.tensor(params["weight"], requires_grad=True)
    ref = torch.nn.functional.embedding(torch.from_numpy(ids), tw, padding_idx=row)
    ref.backward(torch.tensor(ct))
    np.testing.assert_array_equal(out, ref.detach().numpy())
    np.testing.assert_allclose(grads["weight"], tw.grad.numpy(), rtol=1e-12, atol=0)
    assert not grads["weight"][row].any()


def test_an_ignored_row_holding_inf_has_torchs_nan_gradient() -> None:
    # its softmax is NaN: torch's gradient there is NaN, as the composed loss's; an ignored
    # row of finite logits gets +0
    torch = pytest.importorskip("torch")
    z = np.array([[0.0, np.inf, 1.0], [0.5, -0.2, 0.1], [2.0, 0.3, -1.0]])
    y = np.array([-100, 2, -100])
    tz = torch.tensor(z, requires_grad=True)
    torch.nn.functional.cross_entropy(tz, torch.from_numpy(y)).backward()
    _, pullback = vjp(lambda x: ops.cross_entropy(x, y, ignore_index=-100), z)
    (grad,) = pullback(1.0)
    np.testing.assert_allclose(grad, tz.grad.numpy(), rtol=1e-12, atol=1e-15)  # (NaN as NaN)
    assert np.isnan(grad[0]).all() and not np.signbit(grad[2]).any()


# -- AvgPool's ceil_mode and count_include_pad, Dropout(p=1), against torch (float64) -------------
#: (spatial dimensions, kernel_size, stride, padding, input size): ceil_mode adds a last window
#: that runs past the end in some (size 7, kernel 2), and in one (size 5, kernel 3, stride 3,
#: padding 1) the rounded-up window would start in the right padding and is dropped, as torch's
AVG_POOL_GEOMETRIES = [
    (1, 3, 2, 1, 6),
    (1, 3, 2, 0, 7),
    (1, 2, 2, 0, 7),
    (1, 4, 3, 2, 8),
    (1, 3, 1, 1, 5),
    (1, 3, 3, 1, 5),
    (1, 5, 3, 2, 9),
    (1, 2, None, 1, 5),
    (2, 3, 2, 1, (7, 6)),
    (2, (3, 2), (2, 3), (1, 0), (8, 7)),
    (2, 2, None, 0, (5, 5)),
    (2, (4, 3), (3, 2), (2, 1), (9, 8)),
    (2, 3, 3, 1, (5, 6)),
]


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["include-pad", "exclude-pad"])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize(("n", "kernel", "stride", "padding", "size"), AVG_POOL_GEOMETRIES)
def test_avg_pool_ceil_mode_and_count_include_pad_match_torch(
    n: int, kernel: Any, stride: Any, padding: Any, size: Any, ceil_mode: bool,
    count_include_pad: bool,
) -> None:  # fmt: skip
    torch = pytest.importorskip("torch")
    sizes = (size,) if n == 1 else size
    x = np.random.default_rng(11).standard_normal((2, 3, *sizes))
    options = {"ceil_mode": ceil_mode, "count_include_pad": count_include_pad}
    module = (nn.AvgPool1d if n == 1 else nn.AvgPool2d)(kernel, stride, padding, **options)
    tm = (torch.nn.AvgPool1d if n == 1 else torch.nn.AvgPool2d)(kernel, stride, padding, **options)
    _assert_pool_is_torchs(module, tm, x, seed=12)
    # the op takes torch's functional arguments, in torch's order
    pool = ops.avg_pool1d if n == 1 else ops.avg_pool2d
    ref_f = (torch.nn.functional.avg_pool1d if n == 1 else torch.nn.functional.avg_pool2d)(
        torch.tensor(x), kernel, stride, padding, ceil_mode, count_include_pad
    )
    np.testing.assert_allclose(
        pool(x, kernel, stride, padding, ceil_mode, count_include_pad), ref_f.numpy(),
        rtol=1e-12, atol=1e-14,
    )  # fmt: skip


def _assert_pool_is_torchs(module: nn.Module, tm: Any, x: np.ndarray, seed: int) -> None:
    """``module``'s output, shape and input gradient (for a seeded cotangent) are torch
    module ``tm``'s, to float64 rounding."""
    import torch

    out, pullback = vjp(lambda x: module({}, x), x)
    ct = np.random.default_rng(seed).standard_normal(out.shape)
    (gx,) = pullback(ct)
    tx = torch.tensor(x, requires_grad=True)
    ref = tm(tx)
    ref.backward(torch.tensor(ct))
    assert out.shape == tuple(ref.shape) == module._output_shape(x.shape)
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-12, atol=1e-14)


#: AvgPool2d's divisor_override, against torch: (kernel_size, stride, padding, input size,
#: ceil_mode, count_include_pad, divisor): the override divides every window, a ceil-mode
#: window past the end and a padded one with count_include_pad=False too, and a negative one
#: (torch refuses only 0)
AVG_POOL_DIVISOR_CASES = [
    (2, None, 0, (4, 6), False, True, 3),
    (3, 2, 1, (7, 6), True, False, 3),
    ((3, 2), (2, 3), (1, 0), (8, 7), True, True, 5),
    ((4, 3), (3, 2), (2, 1), (9, 8), False, False, 1),
    (2, 1, 1, (5, 5), True, True, -2),
]


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size", "ceil_mode", "count_include_pad", "divisor"),
    AVG_POOL_DIVISOR_CASES,
)
def test_avg_pool2d_divisor_override_matches_torch(
    kernel: Any, stride: Any, padding: Any, size: Any, ceil_mode: bool, count_include_pad: bool,
    divisor: int,
) -> None:  # fmt: skip
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(14).standard_normal((2, 3, *size))
    options = {"ceil_mode": ceil_mode, "count_include_pad": count_include_pad}
    module = nn.AvgPool2d(kernel, stride, padding, **options, divisor_override=divisor)
    tm = torch.nn.AvgPool2d(kernel, stride, padding, **options, divisor_override=divisor)
    _assert_pool_is_torchs(module, tm, x, seed=15)
    # the op takes it as torch's functional does, after count_include_pad (here by name only)
    ref_f = torch.nn.functional.avg_pool2d(
        torch.tensor(x), kernel, stride, padding, ceil_mode, count_include_pad, divisor
    )
    got = ops.avg_pool2d(
        x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override=divisor
    )
    np.testing.assert_allclose(got, ref_f.numpy(), rtol=1e-12, atol=1e-14)


def test_avg_pool_divisor_override_is_2d_only_and_refuses_0_as_torch() -> None:
    torch = pytest.importorskip("torch")
    x = np.ones((1, 1, 4, 4))
    # torch's avg_pool1d and AvgPool1d take no divisor_override: neither do these
    with pytest.raises(TypeError, match="divisor_override"):
        torch.nn.functional.avg_pool1d(torch.tensor(x[0]), 2, divisor_override=2)
    with pytest.raises(TypeError, match="divisor_override"):
        ops.avg_pool1d(x[0], 2, divisor_override=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="divisor_override"):
        nn.AvgPool1d(2, divisor_override=2)  # type: ignore[call-arg]
    # torch refuses 0 (when called); here it is refused as the module is made, or by the op
    with pytest.raises(RuntimeError, match="divisor must be not zero"):
        torch.nn.AvgPool2d(2, divisor_override=0)(torch.tensor(x))
    with pytest.raises(ValueError, match="divisor_override must be a nonzero int"):
        nn.AvgPool2d(2, divisor_override=0)
    with pytest.raises(ValueError, match="divisor_override must be a nonzero int"):
        ops.avg_pool2d(x, 2, divisor_override=0)


def test_dropout_of_p_1_matches_torch() -> None:
    # torch's Dropout(p=1) zeroes everything in training, gradient too, and is the identity in
    # evaluation
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(13).standard_normal((4, 5)) + 3.0
    drop, td = nn.Dropout(1.0), torch.nn.Dropout(1.0)
    out, pullback = vjp(lambda x: drop({}, x, rng=np.random.default_rng(0)), x)
    (gx,) = pullback(np.ones_like(x))
    tx = torch.tensor(x, requires_grad=True)
    ref = td(tx)
    ref.backward(torch.ones_like(tx))
    np.testing.assert_array_equal(out, ref.detach().numpy())
    np.testing.assert_array_equal(gx, tx.grad.numpy())
    assert not out.any() and not gx.any() and np.isfinite(out).all()
    td.eval()
    np.testing.assert_array_equal(drop({}, x), td(torch.tensor(x)).numpy())


def test_avg_pool_ceil_mode_takes_a_kernel_past_the_input_as_torch() -> None:
    # torch's ceil_mode keeps a window that starts in the input and runs past its end, even one
    # longer than the input; floor mode refuses it (no window fits), in torch and here
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(14).standard_normal((1, 2, 2))
    for kernel, include in ((3, True), (4, False)):
        ref = torch.nn.functional.avg_pool1d(torch.tensor(x), kernel, None, 0, True, include)
        got = nn.AvgPool1d(kernel, ceil_mode=True, count_include_pad=include)({}, x)
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"avg_pool1d: the pooling window .* is larger than"):
        nn.AvgPool1d(3)({}, x)


def test_attention_dropout_of_1_matches_torch_in_training() -> None:
    # p=1 drops every attention weight (deterministically, so torch's training mode can be
    # compared): the output is the output projection's bias, in torch as here
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    m = nn.MultiHeadAttention(6, 3, dropout=1.0)
    p = {k: rng.standard_normal(v.shape) for k, v in m.init(0, dtype="float64").items()}
    x = rng.standard_normal((2, 4, 6))
    out, pullback = vjp(lambda p, x: m(p, x, rng=np.random.default_rng(0)), p, x)
    grads = pullback(np.ones_like(out))
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    tx = torch.tensor(x, requires_grad=True).transpose(0, 1)
    ref = torch.nn.functional.multi_head_attention_forward(
        tx, tx, tx, 6, 3, tp["in_proj_weight"].T, tp["in_proj_bias"], None, None, False, 1.0,
        tp["out_proj_weight"].T, tp["out_proj_bias"], training=True, need_weights=False,
    )[0].transpose(0, 1)  # fmt: skip
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out, np.broadcast_to(p["out_proj_bias"], out.shape), rtol=1e-12)
    ref.backward(torch.ones_like(ref))
    for key, g in grads[0].items():
        np.testing.assert_allclose(g, tp[key].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=key)


# -- MaxPool's ceil_mode and dilation, against torch (float64) ------------------------------------
#: (spatial dimensions, kernel_size, stride, padding, dilation, input size): ceil_mode adds a last
#: window that runs past the end in most (GoogLeNet's MaxPool2d(3, 2, ceil_mode=True) of 8 gives
#: 4, not 3); in (5, kernel 3, stride 3, padding 1) the rounded-up window would start in the right
#: padding and is dropped, as torch's; dilation spreads a window's cells (its padding is still at
#: most half the kernel, not of the dilated span, torch's rule)
MAX_POOL_GEOMETRIES = [
    (1, 3, 2, 0, 1, 8),
    (1, 3, 2, 1, 1, 6),
    (1, 2, 2, 0, 1, 7),
    (1, 4, 3, 2, 1, 8),
    (1, 3, 3, 1, 1, 5),
    (1, 2, None, 1, 1, 5),
    (1, 3, 2, 1, 2, 10),
    (1, 2, 3, 1, 3, 10),
    (2, 3, 2, 0, 1, (8, 7)),
    (2, 3, 2, 1, 1, (7, 6)),
    (2, (3, 2), (2, 3), (1, 0), 1, (8, 7)),
    (2, (4, 3), (3, 2), (2, 1), 1, (9, 8)),
    (2, 3, 3, 1, 1, (5, 6)),
    (2, 3, 2, 1, (2, 1), (9, 8)),
    (2, (2, 3), (3, 1), (1, 1), (3, 2), (10, 9)),
]


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize(
    ("n", "kernel", "stride", "padding", "dilation", "size"), MAX_POOL_GEOMETRIES
)
def test_max_pool_ceil_mode_and_dilation_match_torch(
    n: int, kernel: Any, stride: Any, padding: Any, dilation: Any, size: Any, ceil_mode: bool
) -> None:
    torch = pytest.importorskip("torch")
    sizes = (size,) if n == 1 else size
    # ties (values of a few levels) and -inf, as a ReLU's zeros and a mask's give a pool
    rng = np.random.default_rng(21)
    x = rng.integers(0, 4, (2, 3, *sizes)).astype(np.float64)
    x[0, 0] = rng.standard_normal(sizes)
    x[1, 2][rng.random(sizes) < 0.5] = -np.inf
    module = (nn.MaxPool1d if n == 1 else nn.MaxPool2d)(
        kernel, stride, padding, dilation, ceil_mode=ceil_mode
    )
    tm = (torch.nn.MaxPool1d if n == 1 else torch.nn.MaxPool2d)(
        kernel, stride, padding, dilation, ceil_mode=ceil_mode
    )
    out, pullback = vjp(lambda x: module({}, x), x)
    ct = rng.uniform(1.0, 2.0, out.shape)
    (gx,) = pullback(ct)
    tx = torch.tensor(x, requires_grad=True)
    ref = tm(tx)
    ref.backward(torch.tensor(ct))
    assert out.shape == tuple(ref.shape) == module._output_shape(x.shape)
    np.testing.assert_array_equal(out, ref.detach().numpy())
    # (overlapping windows add up in another order than torch's)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-15, atol=0)
    # the op takes torch's functional arguments, in torch's order
    pool = ops.max_pool1d if n == 1 else ops.max_pool2d
    ref_f = (torch.nn.functional.max_pool1d if n == 1 else torch.nn.functional.max_pool2d)(
        torch.tensor(x), kernel, stride, padding, dilation, ceil_mode
    )
    np.testing.assert_array_equal(pool(x, kernel, stride, padding, dilation, ceil_mode), ref_f)


def test_max_pool_ceil_mode_keeps_nan_and_the_first_maximum_as_torch() -> None:
    # the window rounded up past the end sees its own cells only: the -inf of the overhang is
    # never its maximum, a NaN in it still wins, and ties give the gradient to the first
    torch = pytest.importorskip("torch")
    rows = [
        [1.0, 3.0, 2.0, 0.0, 5.0, 5.0, 4.0, 4.0],
        [1.0, np.nan, 2.0, 0.0, 5.0, 4.0, 3.0, np.nan],
        [-np.inf, -np.inf, 2.0, 2.0, -np.inf, -np.inf, -np.inf, -np.inf],
    ]
    x = np.array(rows)[None]  # (1, 3, 8)
    ct = np.arange(1.0, 1.0 + 3 * 5).reshape(1, 3, 5)
    for padding in (0, 1):
        out, pullback = vjp(lambda x: ops.max_pool1d(x, 3, 2, padding, ceil_mode=True), x)  # noqa: B023
        tx = torch.tensor(x, requires_grad=True)
        ref = torch.nn.functional.max_pool1d(tx, 3, 2, padding, ceil_mode=True)
        ref.backward(torch.tensor(ct[..., : ref.shape[-1]]))
        np.testing.assert_array_equal(out, ref.detach().numpy())
        np.testing.assert_array_equal(pullback(ct[..., : out.shape[-1]])[0], tx.grad.numpy())
        # (the window past the end is there: one more than floor mode's)
        assert out.shape[-1] == ops.max_pool1d(x, 3, 2, padding).shape[-1] + 1


def test_a_dilated_max_pool_window_of_padding_only_is_minus_infinity_as_torch() -> None:
    # a dilated window can step over the whole input: torch gives it -inf and no gradient
    torch = pytest.importorskip("torch")
    x = np.array([[[1.0, 2.0]]])
    for ceil_mode in (False, True):
        out, pullback = vjp(lambda x: ops.max_pool1d(x, 2, 1, 1, 3, ceil_mode), x)  # noqa: B023
        tx = torch.tensor(x, requires_grad=True)
        ref = torch.nn.functional.max_pool1d(tx, 2, 1, 1, 3, ceil_mode)
        ref.backward(torch.ones_like(ref))
        np.testing.assert_array_equal(out, ref.detach().numpy())
        np.testing.assert_array_equal(out, [[[-np.inf]]])
        np.testing.assert_array_equal(pullback(np.ones_like(out))[0], tx.grad.numpy())


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: nn.LeakyReLU(), lambda t: t.nn.LeakyReLU()),
        (lambda: nn.LeakyReLU(0.3), lambda t: t.nn.LeakyReLU(0.3)),
        (lambda: nn.ELU(), lambda t: t.nn.ELU()),
        (lambda: nn.ELU(alpha=0.25), lambda t: t.nn.ELU(alpha=0.25)),
        (lambda: nn.SiLU(), lambda t: t.nn.SiLU()),
        (lambda: nn.Softplus(), lambda t: t.nn.Softplus()),
        (lambda: nn.Softplus(beta=2.0, threshold=1.0), lambda t: t.nn.Softplus(2.0, 1.0)),
        (lambda: nn.Hardtanh(), lambda t: t.nn.Hardtanh()),
        (lambda: nn.Hardtanh(-0.5, 0.25), lambda t: t.nn.Hardtanh(-0.5, 0.25)),
    ],
)
def test_activation_modules_against_torch(ours: Any, theirs: Any) -> None:
    # each module's defaults and fields are torch's; values and gradients, the kinks included
    # (Hardtanh's bounds and the zeros among the inputs)
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.standard_normal(20) * 2, [0.0, -0.0, -1.0, 1.0, -0.5, 0.25, 30.0]])
    module, tmodule = ours(), theirs(torch)
    out, pullback = vjp(lambda x: module({}, x), x)
    ct = rng.standard_normal(x.shape)
    (g,) = pullback(ct)
    tx = torch.tensor(x, requires_grad=True)
    tout = tmodule(tx)
    (tg,) = torch.autograd.grad(tout, tx, torch.tensor(ct))
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(g, tg.numpy(), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("groups", "channels", "shape", "options"),
    [
        (3, 6, (2, 6, 4, 3), {}),
        (1, 4, (3, 4, 5), {"eps": 1e-3}),
        (4, 4, (5, 4), {}),
        (2, 4, (2, 4, 3, 2, 2), {"affine": False}),
        (2, 6, (2, 6, 7), {"bias": False}),
    ],
    ids=["2d", "one-group", "NC", "3d-no-affine", "no-bias"],
)
def test_group_norm_matches_torch(
    groups: int, channels: int, shape: tuple[int, ...], options: dict[str, Any], dtype: str
) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    module = nn.GroupNorm(groups, channels, **options)
    if (
        options.get("bias") is False
        and "bias" not in inspect.signature(torch.nn.GroupNorm).parameters
    ):
        # (an older torch, as on the GPU host, has no bias switch: its functional form takes none)
        tm = torch.nn.GroupNorm(
            groups, channels, **{k: v for k, v in options.items() if k != "bias"}
        )
        tm.register_parameter("bias", None)
    else:
        tm = torch.nn.GroupNorm(groups, channels, **options)
    tm = tm.to(getattr(torch, dtype))
    params = module.init(0, dtype=dtype)
    with torch.no_grad():  # the same affine weights on both sides, other than ones and zeros
        for k in params:
            params[k] = rng.uniform(0.5, 1.5, channels).astype(dtype)
            getattr(tm, k).copy_(torch.from_numpy(params[k]))
    out, pullback = vjp(lambda p, x: module(p, x), params, x)
    ct = rng.standard_normal(out.shape).astype(dtype)
    gp, gx = pullback(ct)
    tx = torch.tensor(x, requires_grad=True)
    ref = tm(tx)
    ref.backward(torch.from_numpy(ct))
    assert out.dtype == gx.dtype == np.dtype(dtype)
    assert out.shape == tuple(ref.shape) == module._output_shape(x.shape)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == "float64" else {"rtol": 1e-4, "atol": 1e-4}
    np.testing.assert_allclose(out, ref.detach().numpy(), **tol)
    np.testing.assert_allclose(gx, tx.grad.numpy(), **tol)
    for k in params:
        assert gp[k].dtype == np.dtype(dtype)
        np.testing.assert_allclose(gp[k], getattr(tm, k).grad.numpy(), **tol)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_hardtanh_gradient_at_a_bound_16_bits_cannot_hold_is_torchs(dtype: str) -> None:
    # torch compares a 16-bit input with the float32 bounds: a float16 0.09998 lies inside
    # Hardtanh(-0.1, 0.1) (gradient 1) though float16's 0.1 is that same value
    torch = pytest.importorskip("torch")
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    from asyncnn.backends import BFLOAT16

    np_dtype = np.dtype(BFLOAT16) if dtype == "bfloat16" else np.dtype(dtype)
    values = [-0.3, -0.1, 0.1, 2 / 3, 0.05, -1.0, 1.0]
    for lo, hi in ((-0.1, 0.1), (-0.3, 2 / 3), (-1.0, 1.0)):
        x = np.array(values, dtype=np.float32).astype(np_dtype)
        module = nn.Hardtanh(lo, hi)
        out, pullback = vjp(lambda x, m=module: m({}, x), x)
        (g,) = pullback(np.ones_like(x))
        tx = torch.tensor(x.astype(np.float32), dtype=getattr(torch, dtype), requires_grad=True)
        tout = torch.nn.Hardtanh(lo, hi)(tx)
        (tg,) = torch.autograd.grad(tout, tx, torch.ones_like(tx))
        np.testing.assert_array_equal(out.astype(np.float32), tout.detach().float().numpy())
        np.testing.assert_array_equal(g.astype(np.float32), tg.float().numpy(), err_msg=str(lo))
