"""nn.MultiHeadAttention's masks (``attn_mask``, ``key_padding_mask``, ``causal``, and masks as
graph inputs through ``mask_inputs``): values and gradients against a numpy reference and finite
differences (float64), against torch where installed, fully masked rows, errors, specs."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies, vjp
from asyncnn.backends import Backend, to_numpy
from asyncnn.testing import check_grads

NEG = -np.inf


def _params(m: Any, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # (biases of nonzero values: zeros would hide their place)
    return {k: 0.5 * rng.standard_normal(v.shape) for k, v in m.init(0, dtype="float64").items()}


def _ref(p: Any, q: Any, k: Any, v: Any, heads: int, add: np.ndarray) -> np.ndarray:
    """Attention with ``add`` (b, h, lq, lk) added to the scores; a row of only -inf gets zero
    weights (torch's scaled_dot_product_attention)."""
    e = q.shape[-1]
    d = e // heads
    w, b = p["in_proj_weight"], p.get("in_proj_bias", np.zeros(3 * e))
    qp, kp, vp = (
        q @ w[:, :e] + b[:e],
        k @ w[:, e : 2 * e] + b[e : 2 * e],
        v @ w[:, 2 * e :] + b[2 * e :],
    )
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    s = split(qp) @ split(kp).transpose(0, 1, 3, 2) / math.sqrt(d) + add
    dead = np.all(s == NEG, axis=-1, keepdims=True)
    s = np.where(dead, 0.0, s)
    wts = np.exp(s - s.max(-1, keepdims=True))
    wts = np.where(dead, 0.0, wts / wts.sum(-1, keepdims=True))
    out = (wts @ split(vp)).transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], e)
    return out @ p["out_proj_weight"] + p.get("out_proj_bias", 0.0)


def _as_add(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, NEG, 0.0) if mask.dtype == bool else mask


def test_key_padding_mask_and_attn_mask_match_the_reference(backend: Backend) -> None:
    rng = np.random.default_rng(0)
    m = nn.MultiHeadAttention(6, 3)
    p = _params(m)
    q, kv = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 5, 6))
    kpm = np.array([[False, False, True, False, True], [True, False, False, False, False]])
    attn = rng.random((4, 5)) < 0.3
    attn[:, 1] = False  # (every row keeps key 1)
    put = backend.asarray
    out = m({k: put(v) for k, v in p.items()}, put(q), put(kv), put(kv),
            key_padding_mask=put(kpm), attn_mask=put(attn))  # fmt: skip
    add = _as_add(kpm)[:, None, None, :] + _as_add(attn)
    np.testing.assert_allclose(to_numpy(out), _ref(p, q, kv, kv, 3, add), rtol=1e-10, atol=1e-12)
    # a float mask is added to the scores, per head and sample when it is (b * heads, L, S)
    fmask = rng.standard_normal((2 * 3, 4, 5))
    out = m({k: put(v) for k, v in p.items()}, put(q), put(kv), put(kv), attn_mask=put(fmask))
    add = fmask.reshape(2, 3, 4, 5)
    np.testing.assert_allclose(to_numpy(out), _ref(p, q, kv, kv, 3, add), rtol=1e-10, atol=1e-12)


def test_masks_combine_with_causal_and_4d_masks_broadcast_over_heads() -> None:
    rng = np.random.default_rng(1)
    m = nn.MultiHeadAttention(4, 2, causal=True)
    p = _params(m, 1)
    x = rng.standard_normal((2, 4, 4))
    kpm = np.array([[False, False, False, True], [False, True, False, False]])
    per_sample = rng.standard_normal((2, 1, 4, 4))  # (batch, 1, L, S): one mask for every head
    out = m(p, x, key_padding_mask=kpm, attn_mask=per_sample)
    causal = np.triu(np.full((4, 4), NEG), 1)
    add = causal + _as_add(kpm)[:, None, None, :] + per_sample
    np.testing.assert_allclose(out, _ref(p, x, x, x, 2, add), rtol=1e-10, atol=1e-12)


def test_a_fully_masked_row_gets_zero_weights_and_finite_gradients() -> None:
    m = nn.MultiHeadAttention(4, 2)
    p = _params(m, 2)
    x = np.random.default_rng(2).standard_normal((2, 3, 4))
    kpm = np.array([[False, True, False], [True, True, True]])  # sample 1: every key padded
    out, pullback = vjp(lambda p, x: m(p, x, key_padding_mask=kpm), p, x)
    # (as torch's scaled_dot_product_attention: the attention is 0, the output the out bias)
    np.testing.assert_allclose(out[1], np.broadcast_to(p["out_proj_bias"], (3, 4)), rtol=1e-12)
    gp, gx = pullback(np.ones_like(out))
    assert all(np.isfinite(g).all() for g in (*gp.values(), gx))
    np.testing.assert_array_equal(gx[1], 0.0)  # no key of sample 1 reaches its output
    # an attn_mask row of all True (or all -inf) is the same
    rows = np.zeros((3, 3), dtype=bool)
    rows[1] = True
    out = m(p, x, attn_mask=rows)
    np.testing.assert_allclose(out[:, 1], np.broadcast_to(p["out_proj_bias"], (2, 4)))
    np.testing.assert_array_equal(m(p, x, attn_mask=np.where(rows, NEG, 0.0)), out)


@pytest.mark.parametrize("kv_len", [None, 3])
def test_mask_gradients_against_finite_differences(backend: Backend, kv_len: Any) -> None:
    rng = np.random.default_rng(3)
    m = nn.MultiHeadAttention(4, 2, causal=kv_len is None)
    put = backend.asarray
    p = {k: put(v) for k, v in _params(m, 3).items()}
    x = put(rng.standard_normal((2, 3, 4)))
    kv = () if kv_len is None else (put(rng.standard_normal((2, kv_len, 4))),) * 2
    s = kv_len or 3
    kpm = put(np.array([[False] * (s - 1) + [True], [True] + [False] * (s - 1)]))
    fmask = put(rng.standard_normal((3, s)))  # a float attn_mask gets its gradient too
    check_grads(
        lambda p, x, fmask: m(p, x, *kv, attn_mask=fmask, key_padding_mask=kpm),
        p, x, fmask, rtol=1e-5, atol=1e-8,
    )  # fmt: skip


@pytest.mark.parametrize("case", ["kpm-bool", "attn-bool-2d", "attn-float-3d", "all-masked"])
def test_masks_match_torch_values_and_gradients(case: str) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    m = nn.MultiHeadAttention(6, 3, causal=case == "attn-bool-2d")
    p = _params(m, 4)
    q, kv = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 5, 6))
    kpm = attn = None
    if case == "kpm-bool":
        kpm = np.array([[False, True, False, False, True], [False] * 4 + [True]])
    elif case == "attn-bool-2d":
        attn = rng.random((4, 5)) < 0.4
        attn[:, 0] = False
    elif case == "attn-float-3d":
        attn = rng.standard_normal((2 * 3, 4, 5))
    else:  # sample 0 wholly padded, and one query row of sample 1 masked by attn_mask
        kpm = np.array([[True] * 5, [False, False, True, False, False]])
        attn = np.zeros((4, 5), dtype=bool)
        attn[2] = True
    out, pullback = vjp(
        lambda p, q, kv: m(p, q, kv, kv, attn_mask=attn, key_padding_mask=kpm), p, q, kv
    )
    ct = rng.standard_normal(out.shape)
    gp, gq, gkv = pullback(ct)

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    tq, tkv = (torch.tensor(a, requires_grad=True) for a in (q, kv))
    tattn = None if attn is None else torch.tensor(attn)
    if m.causal:
        tattn = tattn | torch.triu(torch.ones(4, 5, dtype=torch.bool), 1)
    ref = torch.nn.functional.multi_head_attention_forward(
        tq.transpose(0, 1), tkv.transpose(0, 1), tkv.transpose(0, 1), 6, 3,
        tp["in_proj_weight"].T, tp["in_proj_bias"], None, None, False, 0.0,
        tp["out_proj_weight"].T, tp["out_proj_bias"], need_weights=False,
        key_padding_mask=None if kpm is None else torch.tensor(kpm), attn_mask=tattn,
    )[0].transpose(0, 1)  # fmt: skip
    ref.backward(torch.tensor(ct))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    for k, g in gp.items():
        np.testing.assert_allclose(g, tp[k].grad.numpy(), rtol=1e-9, atol=1e-11, err_msg=k)
    np.testing.assert_allclose(gq, tq.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(gkv, tkv.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_mask_inputs_take_masks_as_positional_inputs() -> None:
    rng = np.random.default_rng(5)
    m = nn.MultiHeadAttention(4, 2, mask_inputs=("key_padding_mask", "attn_mask"))
    plain = nn.MultiHeadAttention(4, 2)
    p = _params(m, 5)
    x, kv = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    kpm = np.array([[False, False, True], [False, False, False]])
    attn = rng.standard_normal((2, 1, 3, 3))
    np.testing.assert_array_equal(
        m(p, x, kpm, attn), plain(p, x, key_padding_mask=kpm, attn_mask=attn)
    )
    kpm5 = np.zeros((2, 5), dtype=bool)
    kpm5[0, 4] = True
    attn5 = rng.standard_normal((2, 1, 3, 5))
    np.testing.assert_array_equal(
        m(p, x, kv, kv, kpm5, attn5), plain(p, x, kv, kv, key_padding_mask=kpm5, attn_mask=attn5)
    )
    assert m.flops((None, 3, 4), (None, 3), (None, 1, 3, 3)) == plain.flops((None, 3, 4))
    assert m.flops((None, 3, 4), (None, 5, 4), (None, 5, 4), (None, 5), (None, 1, 3, 5)) == (
        plain.flops((None, 3, 4), (None, 5, 4), (None, 5, 4))
    )
    assert nn.from_spec(nn.to_spec(m)) == m
    assert nn.MultiHeadAttention(4, 2, mask_inputs=["attn_mask"]).mask_inputs == ("attn_mask",)


def test_a_key_padding_mask_from_a_graph_input_trains() -> None:
    """In a graph the mask is an input of its own (bool, batch first), split with the batch."""
    g = ann.Graph()
    x = g.input("x", shape=(None, 3, 4))
    pad = g.input("pad", shape=(None, 3), dtype="bool")
    y = g.input("y", shape=(None, 3, 4))
    m = nn.MultiHeadAttention(4, 2, mask_inputs=("key_padding_mask",))
    out = g.layer("attn", m, x, pad)
    g.loss("loss", nn.MSELoss(), out, y)
    g.output("out", out)
    rng = np.random.default_rng(6)
    xs, ys = rng.standard_normal((8, 3, 4)), rng.standard_normal((8, 3, 4))
    pads = np.zeros((8, 3), dtype=bool)
    pads[::2, 2] = True
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(microbatches=2),
                     seed=0, dtype="float64")  # fmt: skip
    p0 = tr.params["attn"]
    want = m(p0, xs, pads)
    np.testing.assert_allclose(tr.predict({"x": xs, "pad": pads})["out"], want, rtol=1e-12)

    def loss(p: Any) -> Any:
        return nn.MSELoss()({}, m(p, xs, pads), ys)

    _, pullback = vjp(loss, p0)
    (grads,) = pullback(np.float64(1.0))
    tr.fit({"x": xs, "pad": pads, "y": ys}, epochs=1, batch_size=8)
    for k, v in tr.params["attn"].items():
        np.testing.assert_allclose(v, p0[k] - 0.1 * grads[k], rtol=1e-10, atol=1e-12)


_M = nn.MultiHeadAttention(4, 2)
_X = np.zeros((2, 3, 4))


@pytest.mark.parametrize(
    ("call", "err", "match"),
    [
        (lambda p: _M(p, _X, key_padding_mask=np.zeros((2, 4), bool)), ValueError,
         r"key_padding_mask has shape \(2, 4\), expected \(2, 3\) \(batch, key length\)"),
        (lambda p: _M(p, _X, attn_mask=np.zeros((3, 4), bool)), ValueError,
         r"attn_mask has shape \(3, 4\), expected \(3, 3\), \(4, 3, 3\) \(batch \* heads, L, "
         r"S\) or \(2, 2, 3, 3\) or \(2, 1, 3, 3\)"),
        (lambda p: _M(p, _X, attn_mask=np.zeros((3, 3), int)), TypeError,
         r"attn_mask of dtype int64.*bool \(True: masked, as torch\) or float"),
        (lambda p: _M(p, _X, key_padding_mask=np.zeros((2, 3), np.float32)), TypeError,
         r"key_padding_mask of dtype float32.*the attention computes in float64"),
        (lambda p: _M(p, _X, _X, _X, np.zeros((2, 3), bool)), ValueError,
         r"got 4 inputs.*mask_inputs=\('key_padding_mask',\)"),
        (lambda p: _M(p, _X, _X), ValueError, r"pass both key and value, or neither"),
        (lambda p: nn.MultiHeadAttention(4, 2, mask_inputs=("key_padding_mask",))(
            p, _X, np.zeros((2, 3), bool), key_padding_mask=np.zeros((2, 3), bool)),
         ValueError, r"key_padding_mask given twice"),
    ],
    ids=["kpm-shape", "attn-shape", "int-mask", "float-dtype", "no-mask-inputs", "key-only",
         "twice"],
)  # fmt: skip
def test_mask_mistakes_are_named(call: Any, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        call(_M.init(0, dtype="float64"))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (
            ("padding",),
            r"mask_inputs entries must be 'key_padding_mask' or 'attn_mask', got "
            r"'padding'",
        ),
        (("attn_mask", "attn_mask"), r"mask_inputs names 'attn_mask' twice"),
        ("key_padding_mask", r"mask_inputs must be a tuple of names.*\('key_padding_mask',\)"),
    ],
)
def test_bad_mask_inputs_are_refused(value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        nn.MultiHeadAttention(4, 2, mask_inputs=value)


def test_a_mask_given_as_a_nested_list_is_read_as_the_array_it_spells() -> None:
    # (it was said to have shape (), whatever it held)
    m = nn.MultiHeadAttention(4, 2)
    p = m.init(0, dtype="float64")
    q = np.random.default_rng(0).standard_normal((2, 3, 4))
    pad = [[False, False, True], [False, True, True]]
    np.testing.assert_array_equal(
        m(p, q, key_padding_mask=pad), m(p, q, key_padding_mask=np.array(pad))
    )
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(3,\), expected \(2, 3\)"):
        m(p, q, key_padding_mask=[False, False, True])
