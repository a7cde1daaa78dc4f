"""``vjp_split`` (asyncnn/_math/_autodiff_split.py): a pullback in two halves, the inputs' cotangents and
then the parameters', from one set of residuals (zero-bubble schedules' B and W)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncnn import nn, ops
from asyncnn._math._autodiff import vjp
from asyncnn._math._autodiff_split import vjp_split
from asyncnn._math._nn._loops import RNNCell
from asyncnn._math._pytree import tree_flatten, tree_leaves, tree_unflatten


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
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (3, 4, 5)),
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


# -- bit for bit against vjp: every op, every module, random programs -----------------------------
# ZeroBubbleH1 equals 1F1B bit for bit (docs/policies.md) only if the halves give exactly what
# vjp's pullback gives: the same rules, called on the same cotangents, summed in the same order.


def _compare(make, params, *inputs, ct=None, seed=0):
    """vjp_split's halves against vjp's pullback of ``make()`` (a fresh function per call, so
    that one holding an rng draws the same numbers twice): outputs and every gradient leaf equal
    bit for bit, with equal dtypes and None at the same places. ``ct``: the output's cotangent
    (random by default). Returns vjp's gradients."""
    out, pullback = vjp(make(), params, *inputs)
    if ct is None:
        leaves, out_def = tree_flatten(out)
        rng = np.random.default_rng(seed)
        ct = tree_unflatten(
            out_def,
            [rng.standard_normal(np.shape(o)).astype(np.asarray(o).dtype) for o in leaves],
        )
    want = pullback(ct)
    out2, input_pullback = vjp_split(make(), params, *inputs)
    _identical(out2, out)
    input_grads, weight_pullback = input_pullback(ct)
    _identical((weight_pullback(), *input_grads), want)
    return want


def _identical(got, want):
    got_leaves, got_def = tree_flatten(got)
    want_leaves, want_def = tree_flatten(want)
    assert got_def == want_def
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert (g is None) == (w is None), (g, w)
        if w is not None:
            np.testing.assert_array_equal(g, w)
            assert np.asarray(g).dtype == np.asarray(w).dtype
            assert np.shape(g) == np.shape(w)


DTYPES = [np.float64, np.float32]
_IDS = np.array([0, 3, 3, 1])  # integer ids: embedding rows, take indices, class labels
_COND = np.arange(16).reshape(4, 4) % 3 == 0


def _other(x):
    return np.float32 if ops.raw(x).dtype == np.float64 else np.float64


def _scale_add(a, b):
    return a * 2.0 + b * 3.0, None


def _scale_add_vjp(g, res, needs):  # ignores ``needs``: a gradient for each argument, always
    return g * 2.0, g * 3.0


SCALE_ADD = ops.Primitive("scale_add", _scale_add, _scale_add_vjp)

# Each op of asyncnn.ops on (4, 4) arrays ``a``, ``b`` (and the ids), giving a (4, 4) result, in
# forms that keep the values bounded through a chain of them.
OPS = {
    "abs": (1, lambda a, ids: ops.abs(a)),
    "clip": (1, lambda a, ids: ops.clip(a, -0.5, 0.75) + ops.clip(a, min=0.1)),
    "cos": (1, lambda a, ids: ops.cos(a)),
    "elu": (1, lambda a, ids: ops.elu(a, 0.5)),
    "expm1": (1, lambda a, ids: ops.expm1(a)),
    "leaky_relu": (1, lambda a, ids: ops.leaky_relu(a, 0.2)),
    "log1p": (1, lambda a, ids: ops.log1p(ops.abs(a))),
    "silu": (1, lambda a, ids: ops.silu(a)),
    "sin": (1, lambda a, ids: ops.sin(a)),
    "softplus": (1, lambda a, ids: ops.softplus(a, 2.0, 1.0)),
    "add": (2, lambda a, b, ids: ops.add(a, b)),
    "astype": (1, lambda a, ids: ops.astype(ops.astype(a, _other(a)), ops.raw(a).dtype)),
    "avg_pool1d": (1, lambda a, ids: ops.reshape(ops.avg_pool1d(ops.reshape(a, (1, 4, 4)), 3, 1, 1), (4, 4))),
    "avg_pool2d": (1, lambda a, ids: ops.reshape(ops.avg_pool2d(ops.reshape(a, (1, 1, 4, 4)), 3, 1, 1), (4, 4))),
    "broadcast_to": (1, lambda a, ids: ops.broadcast_to(ops.mean(a, axis=0, keepdims=True), (4, 4))),
    "concatenate": (2, lambda a, b, ids: ops.getitem(ops.concatenate([a, b, a], axis=1), (slice(None), slice(3, 7)))),
    "conv1d": (2, lambda a, b, ids: ops.reshape(
        ops.conv1d(ops.reshape(a, (2, 2, 4)), ops.reshape(b, (4, 2, 2)) * 0.5, ops.mean(b, axis=0), padding=1)[..., :2], (4, 4))),
    "conv2d": (2, lambda a, b, ids: ops.reshape(
        ops.conv2d(ops.reshape(a, (1, 1, 4, 4)), ops.reshape(b[:3, :3], (1, 1, 3, 3)) * 0.3, b[0, :1], padding=1), (4, 4))),
    "cross_entropy": (2, lambda a, b, ids: b * ops.reshape(ops.cross_entropy(a, ids, reduction="none"), (4, 1)) + ops.cross_entropy(a, ids)),
    "cumprod": (2, lambda a, b, ids: a * ops.cumprod(ops.tanh(b), axis=1) + ops.reshape(ops.cumprod(ops.tanh(b)), (4, 4))),
    "cumsum": (2, lambda a, b, ids: a * ops.cumsum(b, axis=1) + ops.reshape(ops.cumsum(b), (4, 4))),
    "divide": (2, lambda a, b, ids: ops.divide(a, ops.abs(b) + 1.0)),
    "dropout": (1, lambda a, ids: ops.dropout(a, 0.25, np.random.default_rng(7))),
    "embedding": (1, lambda a, ids: ops.embedding(a, ids)),
    "exp": (1, lambda a, ids: ops.exp(ops.tanh(a))),
    "expand_dims": (1, lambda a, ids: ops.squeeze(ops.expand_dims(a, 1), 1)),
    "flip": (1, lambda a, ids: ops.flip(a, 1) + ops.flip(a)),
    "gelu": (1, lambda a, ids: ops.gelu(a) + ops.gelu(a, approximate="tanh")),
    "getitem": (1, lambda a, ids: ops.getitem(a, (slice(None, None, -1), ids))),
    "group_norm": (2, lambda a, b, ids: ops.reshape(ops.group_norm(ops.reshape(a, (2, 4, 2)), 2, b[0], ops.mean(b, axis=0)), (4, 4))),
    "layer_norm": (2, lambda a, b, ids: ops.layer_norm(a, ops.mean(b, axis=0), ops.sum(b, axis=1))),
    "log": (1, lambda a, ids: ops.log(ops.abs(a) + 1.0)),
    "log_softmax": (1, lambda a, ids: ops.log_softmax(a, axis=0)),
    "logsumexp": (2, lambda a, b, ids: b - ops.logsumexp(a, axis=-1, keepdims=True)),
    "matmul": (2, lambda a, b, ids: ops.matmul(a, b) * 0.5 + ops.matmul(a, b[0]) + ops.matmul(a[1], b)),
    "max": (2, lambda a, b, ids: a * ops.max(b, axis=1, keepdims=True) + ops.max(b)),
    "max_pool1d": (1, lambda a, ids: ops.reshape(ops.max_pool1d(ops.reshape(a, (1, 4, 4)), 3, 1, 1), (4, 4))),
    "max_pool2d": (1, lambda a, ids: ops.reshape(ops.max_pool2d(ops.reshape(a, (1, 1, 4, 4)), 3, 1, 1), (4, 4))),
    "max_unpool1d": (1, lambda a, ids: ops.reshape(ops.max_unpool1d(*ops.max_pool1d(ops.reshape(a, (1, 4, 4)), 2, return_indices=True), 2), (4, 4))),
    "max_unpool2d": (1, lambda a, ids: ops.reshape(ops.max_unpool2d(*ops.max_pool2d(ops.reshape(a, (1, 1, 4, 4)), 2, return_indices=True), 2), (4, 4))),
    "maximum": (2, lambda a, b, ids: ops.maximum(a, b)),
    "mean": (2, lambda a, b, ids: a + ops.mean(b, axis=0) + ops.mean(b)),
    "min": (2, lambda a, b, ids: a * ops.min(b, axis=0) - ops.min(b)),
    "minimum": (2, lambda a, b, ids: ops.minimum(a, b)),
    "mse_loss": (2, lambda a, b, ids: ops.mse_loss(a, b, reduction="none") * 0.1 + ops.mse_loss(a, b) + ops.mse_loss(b, a, reduction="sum")),
    "multiply": (2, lambda a, b, ids: ops.multiply(a, ops.tanh(b))),
    "negative": (1, lambda a, ids: ops.negative(a)),
    "pad": (1, lambda a, ids: ops.pad(a, ((1, 0), (0, 2)), "reflect")[:4, 1:5] + ops.pad(a[:3], ((1, 0), (0, 0)), "edge") + ops.pad(a[:, 1:], ((0, 0), (1, 0)), constant_values=0.5)),
    "power": (2, lambda a, b, ids: ops.power(ops.abs(a) + 0.5, ops.tanh(b)) + a**2.0 + 2.0**ops.tanh(b)),
    "raw": (2, lambda a, b, ids: ops.add(b, ops.raw(a))),
    "prod": (2, lambda a, b, ids: a * ops.prod(ops.tanh(b), axis=0, keepdims=True) + ops.prod(ops.tanh(a) + 1.0, (0, 1))),
    "relu": (1, lambda a, ids: ops.relu(a)),
    "repeat": (1, lambda a, ids: ops.repeat(a[:, 1:3], 2, axis=1) + ops.repeat(a[:3], [0, 3, 1], axis=0)),
    "reshape": (1, lambda a, ids: ops.reshape(ops.transpose(ops.reshape(a, (2, 8))), (4, 4))),
    "sigmoid": (1, lambda a, ids: ops.sigmoid(a)),
    "softmax": (1, lambda a, ids: ops.softmax(a)),
    "sqrt": (1, lambda a, ids: ops.sqrt(ops.abs(a) + 0.1)),
    "square": (1, lambda a, ids: ops.square(ops.tanh(a))),
    "squeeze": (1, lambda a, ids: ops.squeeze(ops.reshape(a, (1, 4, 1, 4)))),
    "std": (2, lambda a, b, ids: a * ops.std(b, axis=0) + ops.std(b, ddof=1)),
    "stack": (2, lambda a, b, ids: ops.sum(ops.stack([a, b, a], axis=2), axis=2)),
    "subtract": (2, lambda a, b, ids: ops.subtract(a, b)),
    "sum": (2, lambda a, b, ids: a + ops.sum(b, axis=1, keepdims=True) * 0.25 + ops.sum(b)),
    "take": (1, lambda a, ids: ops.take(a, ids, axis=1)),
    "take_along_axis": (1, lambda a, ids: ops.take_along_axis(a, np.array([[0, 3, 3, 1]] * 4), 1)),
    "tanh": (1, lambda a, ids: ops.tanh(a)),
    "tile": (1, lambda a, ids: ops.tile(a[:2, :2], (2, 2)) + ops.tile(a[0], (4, 1))),
    "transpose": (1, lambda a, ids: ops.transpose(a) + a.T),
    "unstack": (1, lambda a, ids: ops.stack([*ops.unstack(a, axis=1)[:0:-1], a[:, 0]], axis=1)),
    "var": (2, lambda a, b, ids: a * ops.var(b, axis=1, keepdims=True) - ops.var(b, ddof=1)),
    "where": (2, lambda a, b, ids: ops.where(_COND, a, b)),
    "Primitive": (2, lambda a, b, ids: SCALE_ADD(a, b) * 0.2),
}  # fmt: skip


def test_the_table_covers_every_op():
    assert sorted(OPS) == sorted(ops.__all__)


def _leaves(dtype, n, seed):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1.5, 1.5, (4, 4)).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_each_op_with_parameters_and_inputs_in_every_role(name, dtype):
    arity, op = OPS[name]
    # each argument a parameter (P) or an input (I), then a node reading both kinds
    for roles in itertools.product("PI", repeat=arity):
        p_vals, x_vals = _leaves(dtype, arity, 1), _leaves(dtype, 2, 2)
        params = {"a": [p_vals[0], {"b": p_vals[-1]}]}

        def make(roles=roles):
            def f(p, x, y, ids):
                pv, xv = [p["a"][0], p["a"][1]["b"]], [x, y]
                args = [pv[k] if r == "P" else xv[k] for k, r in enumerate(roles)]
                h = op(*args, ids)
                return ops.tanh(h) * x + h * p["a"][0]

            return f

        grads = _compare(make, params, x_vals[0], x_vals[1], _IDS)
        assert grads[-1] is None  # the integer ids: no gradient


def _make_module_case(name, dtype):
    rng = np.random.default_rng(3)

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    labels = np.array([2, 0, 1, 2])
    simple = {
        "linear": (nn.Linear(5, 3), (4, 5)),
        "linear_no_bias": (nn.Linear(5, 3, bias=False), (4, 5)),
        "conv1d": (nn.Conv1d(2, 3, 3, padding=1), (2, 2, 6)),
        "conv2d": (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 5, 5)),
        "maxpool1d": (nn.MaxPool1d(2), (2, 3, 6)),
        "maxpool2d": (nn.MaxPool2d(2), (2, 3, 4, 4)),
        "avgpool1d": (nn.AvgPool1d(3, 1, 1), (2, 3, 6)),
        "avgpool2d": (nn.AvgPool2d(2), (2, 3, 4, 4)),
        "layernorm": (nn.LayerNorm(6), (3, 6)),
        "layernorm_2d": (nn.LayerNorm((2, 3), bias=False), (3, 2, 3)),
        "groupnorm": (nn.GroupNorm(3, 6), (2, 6, 2, 2)),
        "groupnorm_no_affine": (nn.GroupNorm(2, 4, affine=False), (3, 4)),
        "attention": (nn.MultiHeadAttention(8, 2), (2, 5, 8)),
        "attention_causal": (nn.MultiHeadAttention(8, 2, bias=False, causal=True), (2, 5, 8)),
        "dropout": (nn.Dropout(0.3), (4, 6)),
        "flatten": (nn.Flatten(), (2, 3, 4)),
        "identity": (nn.Identity(), (2, 3)),
        "relu": (nn.ReLU(), (3, 4)),
        "tanh": (nn.Tanh(), (3, 4)),
        "sigmoid": (nn.Sigmoid(), (3, 4)),
        "gelu": (nn.GELU(), (3, 4)),
        "softmax": (nn.Softmax(), (3, 4)),
        "log_softmax": (nn.LogSoftmax(), (3, 4)),
        "sequential": (
            nn.Sequential(
                nn.Linear(6, 8),
                nn.ReLU(),
                nn.Dropout(0.2),
                nn.LayerNorm(8),
                nn.Linear(8, 8),
                nn.GELU(),
                nn.Linear(8, 3),
            ),
            (4, 6),
        ),
        "residual": (nn.Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh())), (3, 4)),
        "cnn": (
            nn.Sequential(
                nn.Conv2d(1, 2, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(8, 3),
            ),
            (2, 1, 4, 4),
        ),
        "transformer_block": (
            nn.Sequential(
                nn.Residual(
                    nn.Sequential(nn.LayerNorm(8), nn.MultiHeadAttention(8, 2, dropout=0.1))
                ),
                nn.Residual(
                    nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
                ),
            ),
            (2, 3, 8),
        ),
    }
    if name in simple:
        module, shape = simple[name]
        return (lambda: (lambda p, x: module(p, x, rng=np.random.default_rng(5))),
                module.init(0, "numpy", dtype), normal(*shape))  # fmt: skip
    if name == "cross_attention":
        module = nn.MultiHeadAttention(8, 2, dropout=0.2)
        return (lambda: (lambda p, q, kv: module(p, q, kv, kv, rng=np.random.default_rng(5))),
                module.init(0, "numpy", dtype), normal(2, 3, 8), normal(2, 5, 8))  # fmt: skip
    if name == "embedding":
        module = nn.Embedding(6, 4)
        head = nn.Linear(4, 2)

        def make():
            return lambda p, ids: head(p[1], module(p[0], ids))

        ids = np.array([[0, 5, 5], [1, 0, 2]])
        return make, [module.init(0, "numpy", dtype), head.init(1, "numpy", dtype)], ids
    if name == "rnn_cell":
        cell = RNNCell(3, 4)
        return (lambda: (lambda p, h, x: cell(p, h, x)),
                cell.init(0, "numpy", dtype), normal(2, 4), normal(2, 3))  # fmt: skip
    if name == "rnn_cell_two_steps":  # the weights fan out over two steps
        cell = RNNCell(3, 4)
        return (lambda: (lambda p, h, x: cell(p, cell(p, h, x), x * 0.5)),
                cell.init(0, "numpy", dtype), normal(2, 4), normal(2, 3))  # fmt: skip
    if name in ("cross_entropy", "cross_entropy_none", "mse", "mse_int_target"):
        head = nn.Linear(5, 3)
        if name.startswith("cross_entropy"):
            loss = nn.CrossEntropyLoss("none" if name.endswith("none") else "mean")
            target = labels
        else:
            loss = nn.MSELoss("sum")
            target = labels.reshape(4, 1) * np.ones((1, 3), labels.dtype)
            if name == "mse":
                target = target.astype(dtype)

        def make():
            return lambda p, x, t: loss({}, head(p, x), t)

        return make, head.init(0, "numpy", dtype), normal(4, 5), target
    raise KeyError(name)


MODULE_CASES = [
    "linear", "linear_no_bias", "conv1d", "conv2d", "maxpool1d", "maxpool2d", "avgpool1d",
    "avgpool2d", "layernorm", "layernorm_2d", "attention", "attention_causal", "cross_attention",
    "dropout", "flatten", "identity", "relu", "tanh", "sigmoid", "gelu", "softmax", "log_softmax",
    "sequential", "residual", "cnn", "transformer_block", "embedding", "rnn_cell",
    "rnn_cell_two_steps", "cross_entropy", "cross_entropy_none", "mse", "mse_int_target",
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name", MODULE_CASES)
def test_each_module_bit_for_bit(name, dtype):
    make, params, *inputs = _make_module_case(name, dtype)
    grads = _compare(make, params, *inputs)
    for x, g in zip(inputs, grads[1:], strict=True):
        assert (g is None) == (x.dtype.kind in "iub")


# Random programs: a pool of values (parameter leaves, then inputs), each step an op of the table
# on values drawn from the pool (so values fan out, parameters meet inputs at any depth, and some
# parameters or inputs go unused), the output a tuple of pool values (leaves themselves included),
# some of whose cotangents may be None.
_N_PARAMS, _N_INPUTS = 4, 2


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(sorted(OPS)), st.integers(0, 10**6), st.integers(0, 10**6)),
        min_size=1,
        max_size=8,
    ),
    outputs=st.lists(st.tuples(st.integers(0, 10**6), st.booleans()), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_random_programs_bit_for_bit(steps, outputs, dtype, seed):
    vals = _leaves(dtype, _N_PARAMS + _N_INPUTS, seed)
    # a nested tree with a scalar leaf: a multiplier of every step's result
    params = {"layers": [vals[0], {"w": vals[1], "v": vals[2]}], "extra": [vals[3]],
              "scale": np.asarray(0.9, dtype)}  # fmt: skip

    def make():
        def f(p, x, y, ids):
            pool = [p["layers"][0], p["layers"][1]["w"], p["layers"][1]["v"], p["extra"][0], x, y]
            for name, i, j in steps:
                arity, op = OPS[name]
                args = [pool[i % len(pool)], pool[j % len(pool)]][:arity]
                pool.append(op(*args, ids) * p["scale"])
            chosen = [pool[-1]] + [pool[k % len(pool)] for k, _ in outputs[1:]]
            return tuple(chosen)

        return f

    inputs = (vals[4], vals[5], _IDS)
    out, _ = vjp(make(), params, *inputs)
    rng = np.random.default_rng(seed + 1)
    ct = tuple(
        None if skip and k else rng.standard_normal(np.shape(o)).astype(np.asarray(o).dtype)
        for k, (o, (_, skip)) in enumerate(zip(out, outputs, strict=True))
    )
    _compare(make, params, *inputs, ct=ct)


# -- edge cases -----------------------------------------------------------------------------------
def test_unused_parameters_and_inputs_get_zeros_as_vjp_gives_them():
    w, x, z = _leaves(np.float64, 3, 4)
    params = {"used": w, "unused": [np.ones(3), 2.0]}
    grads = _compare(lambda: lambda p, x, z: x @ p["used"], params, x, z)
    np.testing.assert_array_equal(grads[0]["unused"][0], np.zeros(3))
    np.testing.assert_array_equal(grads[0]["unused"][1], np.zeros(()))
    np.testing.assert_array_equal(grads[2], np.zeros((4, 4)))  # z: unused, zeros
    # nothing reads a parameter at all, or nothing reads an input
    _compare(lambda: lambda p, x: ops.tanh(x), {"w": w}, x)
    _compare(lambda: lambda p, x: ops.tanh(p["w"]), {"w": w}, x)
    _compare(lambda: lambda p, x: x * 2.0, {}, x)
    _compare(lambda: lambda p: p["w"] * 2.0, {"w": w})


def test_python_float_and_scalar_parameters():
    (x,) = _leaves(np.float64, 1, 5)
    grads = _compare(lambda: lambda p, x: x * p + p * p, 1.5, x)
    assert np.shape(grads[0]) == ()
    _compare(lambda: lambda p, x: x * p["s"] + ops.exp(p["s"]), {"s": np.asarray(0.5)}, x)
    _compare(lambda: lambda p, x: x * p[0] + p[1], [0.5, np.float64(2.0)], x)


def test_non_differentiable_inputs_get_none():
    (w,) = _leaves(np.float32, 1, 6)
    grads = _compare(
        lambda: lambda p, ids, mask, name, x: ops.where(mask, ops.take(p, ids, axis=0), x),
        w, _IDS, _COND, "label", np.ones((4, 4), np.float32),
    )  # fmt: skip
    assert grads[1] is None and grads[2] is None and grads[3] is None
    assert grads[4].dtype == np.float32


def test_outputs_that_are_leaves_or_constants_and_repeated_outputs():
    w, x = _leaves(np.float64, 2, 7)

    def make():
        # a parameter itself, an input itself, the same value twice, a constant
        return lambda p, x: (p["w"], x, ops.tanh(x @ p["w"]), p["w"], np.ones(2), x * p["w"])

    _compare(make, {"w": w}, x)
    out, _ = vjp(make(), {"w": w}, x)
    _compare(
        make, {"w": w}, x, ct=tuple(None if k % 2 else np.ones_like(o) for k, o in enumerate(out))
    )
    _compare(make, {"w": w}, x, ct=(None,) * 6)


def test_a_scalar_cotangent_broadcasts_as_in_vjp():
    w, x = _leaves(np.float32, 2, 8)
    _compare(lambda: lambda p, x: ops.tanh(x @ p) + p, w, x, ct=1.0)
    _compare(lambda: lambda p, x: ops.sum(ops.tanh(x @ p) * p), w, x, ct=np.float64(2.0))


def test_a_bad_cotangent_leaves_the_input_half_usable_as_vjp_leaves_its_pullback():
    w, x = _leaves(np.float64, 2, 9)

    def f(p, x):
        return x @ p["w"] + p["w"]

    _, pullback = vjp(f, {"w": w}, x)
    _, input_pullback = vjp_split(f, {"w": w}, x)
    for bad in (np.ones((5, 5)), (np.ones((4, 4)), np.ones((4, 4)))):
        with pytest.raises(ValueError, match="pullback: "):
            pullback(bad)
        with pytest.raises(ValueError, match="pullback: "):
            input_pullback(bad)
    ct = np.full((4, 4), 0.5)
    want = pullback(ct)
    input_grads, weight_pullback = input_pullback(ct)
    _identical((weight_pullback(), *input_grads), want)


def test_the_weight_half_runs_once_and_the_trace_is_closed_after_the_input_half():
    w, x = _leaves(np.float64, 2, 10)
    kept = []

    def f(p, x):
        kept.append(x)
        return ops.tanh(x @ p)

    _, input_pullback = vjp_split(f, w, x)
    (gx,), weight_pullback = input_pullback(np.ones((4, 4)))
    with pytest.raises(RuntimeError, match="already"):
        ops.tanh(kept[0])  # the trace is done: no new nodes
    gw = weight_pullback()
    with pytest.raises(RuntimeError, match="weight half has already run"):
        weight_pullback()
    with pytest.raises(RuntimeError, match="input half has already run"):
        input_pullback(np.ones((4, 4)))
    _, pullback = vjp(lambda p, x: ops.tanh(x @ p), w, x)
    _identical((gw, gx), pullback(np.ones((4, 4))))


def test_each_split_of_one_function_is_independent():
    # two splits alive at once (a pipeline stage holds several keys' weight halves), their
    # halves interleaved and run in the opposite order
    w, x1, x2 = _leaves(np.float64, 3, 11)
    f = lambda p, x: ops.tanh(x @ p["w"]) * p["w"]  # noqa: E731
    _, a = vjp_split(f, {"w": w}, x1)
    _, b = vjp_split(f, {"w": w}, x2)
    ga, wa = a(np.ones((4, 4)))
    gb, wb = b(np.full((4, 4), 2.0))
    got_b, got_a = wb(), wa()
    _identical((got_a, *ga), vjp(f, {"w": w}, x1)[1](np.ones((4, 4))))
    _identical((got_b, *gb), vjp(f, {"w": w}, x2)[1](np.full((4, 4), 2.0)))


def test_a_rule_that_raises_spends_the_input_half_as_it_spends_vjps_pullback():
    def boom(g, res, needs):
        raise FloatingPointError("boom")

    broken = ops.Primitive("broken", lambda a: (a * 1.0, None), boom)
    w, x = _leaves(np.float64, 2, 12)
    f = lambda p, x: broken(x @ p)  # noqa: E731
    _, pullback = vjp(f, w, x)
    _, input_pullback = vjp_split(f, w, x)
    for pb in (pullback, input_pullback):
        with pytest.raises(FloatingPointError, match="boom"):
            pb(np.ones((4, 4)))
        with pytest.raises(RuntimeError, match="already"):
            pb(np.ones((4, 4)))


class _Residual:
    """A residual whose release a weakref observes."""


def test_the_input_half_frees_the_residuals_the_weight_half_does_not_need():
    import gc
    import weakref

    kept: list[weakref.ref] = []

    def forward(a, b):
        res = _Residual()
        kept.append(weakref.ref(res))
        return a * b, (res, a, b)

    def rule(g, res, needs):
        return g * res[2], g * res[1]

    tagged = ops.Primitive("tagged", forward, rule)
    w, x = _leaves(np.float64, 2, 13)

    def f(p, x):
        h = tagged(x, x)  # reads an input only: its residuals are the input half's
        aux = tagged(ops.tanh(x), 2.0)  # its output's cotangent is None: no half needs it
        return tagged(h, p), aux  # reads a parameter: kept for the weight half

    _, input_pullback = vjp_split(f, w, x)
    _, weight_pullback = input_pullback((np.ones((4, 4)), None))
    gc.collect()
    assert [r() is None for r in kept] == [True, True, False]
    weight_pullback()
    gc.collect()
    assert all(r() is None for r in kept)


def test_a_primitive_whose_rule_breaks_its_contract_is_named_in_both_halves():
    # (the walks zipped a bare array with the arguments, and added a gradient of another shape
    # into the sum, broadcast: a wrong gradient without a word)
    bare = ops.Primitive("bare", lambda a, b: (a * b, (a, b)), lambda g, r, n: g * r[1])
    summed = ops.Primitive(
        "summed", lambda a, b: (a * b, (a, b)), lambda g, r, n: (g * r[1], (g * r[0]).sum(0))
    )
    w, x = _leaves(np.float64, 2, 14)
    _, input_pullback = vjp_split(lambda p, x: bare(x, p), w, x)
    with pytest.raises(ValueError, match=r"^bare: its VJP rule returned an ndarray of shape"):
        input_pullback(np.ones((4, 4)))
    _, input_pullback = vjp_split(lambda p, x: summed(x, p), w, x)
    (gx,), weight_pullback = input_pullback(np.ones((4, 4)))  # the input's gradient is right
    np.testing.assert_array_equal(gx, w)
    with pytest.raises(ValueError, match=r"^summed: .* argument 2 .* gradient shape \(4,\), "
                       r"argument shape \(4, 4\)"):  # fmt: skip
        weight_pullback()


def test_the_weight_half_does_not_keep_the_input_gradient_it_returned():
    # (the weight half closed over the input half's whole list of cotangents, which held the
    # input gradient too: under ZeroBubbleH1 each one, sent upstream and used there, stayed
    # alive until this stage's deferred weight half, an extra activation per deferred key)
    import gc
    import weakref

    module = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    params = _init(module)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5))
    ct = rng.standard_normal((6, 3))
    _, pb = vjp(lambda p, x: module(p, x), params, x)
    want_p, want_x = pb(ct)
    _, input_pullback = vjp_split(lambda p, x: module(p, x), params, x)
    (gx,), weight_pullback = input_pullback(ct)
    np.testing.assert_array_equal(gx, want_x)
    alive = weakref.ref(gx)
    del gx
    gc.collect()
    assert alive() is None  # the weight half, still to run, does not hold it
    _same(weight_pullback(), want_p)
