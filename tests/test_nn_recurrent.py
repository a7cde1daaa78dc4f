"""nn.LSTMCell, nn.GRUCell, nn.LSTM and nn.GRU: values and gradients against torch (float64 and
float32), finite differences, specs, torch state dicts, a graph under Sync and GPipe, loops
through ``loop_cell()``, dropout between layers, and the errors of bad input."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import dynamic, nn, ops, optim, policies
from asyncnn.interop import from_torch, to_torch, torch_names
from asyncnn.testing import check_grads

_TOL = {"float64": (1e-10, 1e-12), "float32": (2e-5, 1e-6)}


def _torch_module(m: Any, dtype: str) -> Any:
    """The torch module of ``m``, with random weights of ``dtype``."""
    torch = pytest.importorskip("torch")
    tn = torch.nn
    if isinstance(m, nn.LSTMCell | nn.GRUCell):
        cls = tn.LSTMCell if isinstance(m, nn.LSTMCell) else tn.GRUCell
        t = cls(m.input_size, m.hidden_size, bias=m.bias)
    else:
        cls = tn.LSTM if isinstance(m, nn.LSTM) else tn.GRU
        t = cls(m.input_size, m.hidden_size, num_layers=m.num_layers, bias=m.bias,
                batch_first=True, bidirectional=m.bidirectional)  # fmt: skip
    return t.to(getattr(torch, dtype))


def _state(m: Any, n: int, rng: np.random.Generator, dtype: str) -> Any:
    """A random initial state of ``m`` for a batch of ``n``, as numpy (torch's layout)."""
    if isinstance(m, nn.LSTMCell | nn.GRUCell):
        shape: tuple[int, ...] = (n, m.hidden_size)
    else:
        shape = (m.num_layers * (2 if m.bidirectional else 1), n, m.hidden_size)
    draw = lambda: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    return (draw(), draw()) if isinstance(m, nn.LSTMCell | nn.LSTM) else draw()


def _flat(out: Any) -> list[Any]:
    """An output (an array, a pair, or (output, state) with the state a pair) as a list."""
    if isinstance(out, tuple | list):
        return [a for o in out for a in _flat(o)]
    return [out]


def _ours(m: Any, p: Any, x: Any, state: Any) -> Any:
    if isinstance(m, nn.LSTMCell | nn.GRUCell):
        return m(p, x, state)
    return m(p, x, state=state)


CASES = [
    nn.LSTMCell(3, 5), nn.LSTMCell(4, 2, bias=False), nn.GRUCell(3, 5),
    nn.GRUCell(4, 4, bias=False),
    nn.LSTM(3, 5, return_state=True), nn.LSTM(3, 4, num_layers=2, return_state=True),
    nn.LSTM(2, 3, num_layers=2, bias=False, return_state=True),
    nn.LSTM(3, 4, num_layers=2, bidirectional=True, return_state=True),
    nn.GRU(3, 5, return_state=True), nn.GRU(3, 4, num_layers=2, return_state=True),
    nn.GRU(2, 3, num_layers=2, bias=False, return_state=True),
    nn.GRU(3, 4, num_layers=2, bidirectional=True, return_state=True),
]  # fmt: skip


def _id(m: Any) -> str:
    extra = [f"L{getattr(m, 'num_layers', 1)}"]
    if not m.bias:
        extra.append("nobias")
    if getattr(m, "bidirectional", False):
        extra.append("bi")
    return f"{type(m).__name__}-{m.input_size}-{m.hidden_size}-{'-'.join(extra)}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "state"])
@pytest.mark.parametrize("m", CASES, ids=_id)
def test_values_and_gradients_match_torch(m: Any, with_state: bool, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    t = _torch_module(m, dtype)
    p = from_torch(t.state_dict(), m)
    assert all(a.dtype == np.dtype(dtype) for a in p.values())
    cell = isinstance(m, nn.LSTMCell | nn.GRUCell)
    n, steps = 3, 4
    x = rng.standard_normal((n, m.input_size) if cell else (n, steps, m.input_size))
    x = x.astype(dtype)
    state = _state(m, n, rng, dtype) if with_state else None

    # torch: its outputs and the gradients of a random projection of them
    tx = torch.from_numpy(x).requires_grad_(True)
    tstate = None
    if state is not None:
        tstate = tuple(torch.from_numpy(s).requires_grad_(True) for s in _flat(state))
    arg = None if tstate is None else (tstate if len(tstate) == 2 else tstate[0])
    touts = _flat(t(tx, arg) if arg is not None else t(tx))
    cts = [rng.standard_normal(tuple(o.shape)).astype(dtype) for o in touts]
    total = sum((o * torch.from_numpy(c)).sum() for o, c in zip(touts, cts, strict=True))
    total.backward()

    outs = _flat(_ours(m, p, x, state))
    assert len(outs) == len(touts)
    rtol, atol = _TOL[dtype]
    for ours, theirs in zip(outs, touts, strict=True):
        assert ours.dtype == np.dtype(dtype)
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=rtol, atol=atol)

    def loss(p: Any, x: Any, state: Any) -> Any:
        got = _flat(_ours(m, p, x, state))
        return sum(ops.sum(ops.multiply(o, c)) for o, c in zip(got, cts, strict=True))

    gp, gx, gs = ann.grad(loss, argnums=(0, 1, 2))(p, x, state)
    tgrads = {k: v.grad for k, v in t.named_parameters()}
    for k, g in gp.items():
        want = tgrads[k].numpy()
        want = want.T if k.startswith("weight_") else want
        np.testing.assert_allclose(g, want, rtol=rtol, atol=atol, err_msg=k)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=rtol, atol=atol)
    if tstate is not None:
        for ours, theirs in zip(_flat(gs), tstate, strict=True):
            np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "m",
    [nn.LSTMCell(3, 4), nn.GRUCell(3, 4, bias=False), nn.LSTM(2, 3, num_layers=2),
     nn.GRU(2, 3, bidirectional=True), nn.LSTM(2, 3, bidirectional=True, bias=False)],
    ids=_id,
)  # fmt: skip
def test_gradients_against_finite_differences(m: Any) -> None:
    rng = np.random.default_rng(1)
    p = m.init(0, dtype="float64")
    if isinstance(m, nn.LSTMCell):
        x = rng.standard_normal((2, 3))
        state = (rng.standard_normal((2, 4)), rng.standard_normal((2, 4)))
        check_grads(lambda p, x, h, c: ops.concatenate(m(p, x, (h, c)), axis=1), p, x, *state)
    elif isinstance(m, nn.GRUCell):
        x, h = rng.standard_normal((2, 3)), rng.standard_normal((2, 4))
        check_grads(m, p, x, h)
    else:
        x = rng.standard_normal((2, 3, 2))
        check_grads(m, p, x)


def test_the_parameters_are_torchs_names_layouts_and_init() -> None:
    torch = pytest.importorskip("torch")
    m = nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    p = m.init(0)
    t = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True)
    assert list(p) == list(t.state_dict())  # names, in torch's order
    for k, v in t.state_dict().items():
        want = tuple(v.shape)[::-1] if k.startswith("weight_") else tuple(v.shape)
        assert p[k].shape == want, k
    # U(-1/sqrt(H), 1/sqrt(H)) for every one, as torch
    big = nn.GRUCell(4, 400).init(0, dtype="float64")
    bound = 1 / np.sqrt(400)
    for k, v in big.items():
        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.99 * bound, k
        assert abs(v.mean()) < 0.05 * bound, k
    assert list(big) == ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    assert list(nn.LSTMCell(2, 3, bias=False).init(0)) == ["weight_ih", "weight_hh"]
    assert big["weight_ih"].shape == (4, 1200) and big["weight_hh"].shape == (400, 1200)


SPEC_MODULES = [
    nn.LSTMCell(3, 4), nn.GRUCell(3, 4, bias=False),
    nn.LSTM(3, 4, num_layers=2, bias=False, dropout=0.25, bidirectional=True, return_state=True),
    nn.GRU(2, 3), nn.LSTMCell(2, 3).loop_cell(), nn.GRUCell(2, 3).loop_cell(),
    nn.GRU(2, 3, bidirectional=True, output="last"),
]  # fmt: skip


@pytest.mark.parametrize("module", SPEC_MODULES, ids=lambda m: type(m).__name__)
def test_spec_round_trip(module: nn.Module) -> None:
    spec = nn.to_spec(module)
    assert ":" not in spec["type"]  # a built-in, by name
    rebuilt = nn.from_spec(msgpack.unpackb(msgpack.packb(spec)))
    assert rebuilt == module and type(rebuilt) is type(module)


@pytest.mark.parametrize(
    "m",
    [nn.LSTM(3, 4, num_layers=2), nn.GRU(3, 4, bidirectional=True, bias=False),
     nn.LSTMCell(3, 4), nn.GRUCell(3, 4)],
    ids=_id,
)  # fmt: skip
def test_state_dicts_round_trip_with_torch(m: Any) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    t = _torch_module(m, "float64")
    p = from_torch(t.state_dict(), m)
    assert torch_names(m) == list(t.state_dict())
    back = to_torch(p, m, tensors=True)
    for k, v in t.state_dict().items():
        assert torch.equal(back[k], v), k
    t2 = _torch_module(m, "float64")
    t2.load_state_dict(back)  # (shapes and names torch accepts)
    # and asyncnn's own weights through torch and back
    mine = m.init(3, dtype="float64")
    again = from_torch(to_torch(mine, m), m)
    for k in mine:
        np.testing.assert_array_equal(again[k], mine[k])


def _lstm_graph() -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 5, 3))
    y = g.input("y", shape=(None, 5, 2))
    h = g.layer("lstm", nn.LSTM(3, 4, num_layers=2), x)
    out = g.layer("head", nn.Linear(4, 2), h)
    g.loss("loss", nn.MSELoss(), out, y)
    g.output("out", out)
    return g


def test_a_graph_with_an_lstm_trains_the_same_under_sync_and_gpipe() -> None:
    rng = np.random.default_rng(2)
    data = {"x": rng.standard_normal((8, 5, 3)), "y": rng.standard_normal((8, 5, 2))}
    runs = {}
    for name, policy in (("sync", policies.Sync()), ("gpipe", policies.GPipe(2))):
        tr = ann.Trainer(_lstm_graph(), optimizer=optim.SGD(lr=0.1), policy=policy, seed=0,
                         dtype="float64")  # fmt: skip
        p0 = {k: dict(v) for k, v in tr.params.items()}
        tr.fit(data, epochs=2, batch_size=8)
        runs[name] = (p0, tr.params)
    p0, sync = runs["sync"]
    _, gpipe = runs["gpipe"]
    for layer in sync:
        for k in sync[layer]:
            np.testing.assert_allclose(gpipe[layer][k], sync[layer][k], rtol=1e-10, atol=1e-12)
    # and both are plain minibatch SGD on the composed model
    lstm, head = nn.LSTM(3, 4, num_layers=2), nn.Linear(4, 2)

    def loss(p: Any) -> Any:
        return nn.MSELoss()({}, head(p["head"], lstm(p["lstm"], data["x"])), data["y"])

    p = p0
    for _ in range(2):
        g = ann.grad(loss)(p)
        p = {n: {k: v - 0.1 * g[n][k] for k, v in p[n].items()} for n in p}
    for layer in p:
        for k in p[layer]:
            np.testing.assert_allclose(sync[layer][k], p[layer][k], rtol=1e-10, atol=1e-12)


def test_graph_weights_map_to_a_torch_sequential_by_name() -> None:
    pytest.importorskip("torch")  # (to_torch(tensors=True))
    g = _lstm_graph()
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=0,
                     dtype="float64")  # fmt: skip
    names = torch_names(g)
    assert names[:2] == ["0.weight_ih_l0", "0.weight_hh_l0"] and names[-2:] == ["1.weight",
                                                                             "1.bias"]  # fmt: skip
    state = to_torch(tr.params, g, tensors=True)
    again = from_torch(state, g)
    for k, v in tr.params["lstm"].items():
        np.testing.assert_array_equal(again["lstm"][k], v)


def test_a_gru_cell_is_a_graph_layer_of_two_inputs() -> None:
    g = ann.Graph()
    x = g.input("x", shape=(None, 3))
    h = g.input("h", shape=(None, 4))
    y = g.input("y", shape=(None, 4))
    h2 = g.layer("gru", nn.GRUCell(3, 4), x, h)
    g.loss("loss", nn.MSELoss(), h2, y)
    g.output("h2", h2)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=0,
                     dtype="float64")  # fmt: skip
    rng = np.random.default_rng(4)
    xs, hs = rng.standard_normal((6, 3)), rng.standard_normal((6, 4))
    want = nn.GRUCell(3, 4)(tr.params["gru"], xs, hs)
    np.testing.assert_allclose(tr.predict({"x": xs, "h": hs})["h2"], want, rtol=1e-12)


def test_both_cells_take_their_state_by_the_keyword_the_docs_give() -> None:
    # docs/concepts.md: "The cells take torch's order, cell(params, x, state=None)"
    rng = np.random.default_rng(6)
    x, h, c = rng.standard_normal((2, 3)), rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    gru, lstm = nn.GRUCell(3, 4), nn.LSTMCell(3, 4)
    pg, pl = gru.init(0, dtype="float64"), lstm.init(0, dtype="float64")
    np.testing.assert_array_equal(gru(pg, x, state=h), gru(pg, x, h))
    for a, b in zip(lstm(pl, x, state=(h, c)), lstm(pl, x, (h, c)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_a_loop_over_a_loop_cell_is_the_sequence_module(kind: str) -> None:
    rng = np.random.default_rng(5)
    cell = nn.GRUCell(3, 4) if kind == "gru" else nn.LSTMCell(3, 4)
    seq = nn.GRU(3, 4) if kind == "gru" else nn.LSTM(3, 4)
    width = 4 if kind == "gru" else 8
    g = ann.Graph()
    xs = g.input("xs", shape=(None, 5, 3))
    h0 = g.input("h0", shape=(None, width))
    y = g.input("y", shape=(None, 5, width))
    hs = g.loop("rnn", cell.loop_cell(), h0, xs, output="all")
    g.loss("loss", nn.MSELoss(), hs, y)
    g.output("hs", hs)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=0,
                     dtype="float64")  # fmt: skip
    p = tr.params["rnn"]
    assert sorted(p) == ["bias_hh", "bias_ih", "weight_hh", "weight_ih"]
    x = rng.standard_normal((6, 5, 3))
    got = tr.predict({"xs": x, "h0": np.zeros((6, width))})["hs"][..., :4]
    want = seq({f"{k}_l0": v for k, v in p.items()}, x)  # (the layer's names: _l0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert torch_names(g) == ["0.weight_ih", "0.weight_hh", "0.bias_ih", "0.bias_hh"]


def test_dropout_between_layers_draws_only_in_training() -> None:
    m = nn.LSTM(3, 4, num_layers=2, dropout=0.5)
    with pytest.warns(UserWarning, match="does nothing with num_layers=1"):
        one_layer = nn.LSTM(3, 4, dropout=0.5)
    assert m.stochastic and not one_layer.stochastic
    assert not nn.GRU(3, 4, num_layers=2).stochastic
    p = m.init(0, dtype="float64")
    x = np.random.default_rng(6).standard_normal((2, 5, 3))
    plain = nn.LSTM(3, 4, num_layers=2)(p, x)
    np.testing.assert_array_equal(m(p, x), plain)  # evaluation: no rng, no dropout
    a = m(p, x, rng=np.random.default_rng(1))
    b = m(p, x, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_dropout_with_one_layer_warns_as_torch_does(cls: Any) -> None:
    # (taken silently: torch warns that its dropout needs num_layers greater than 1)
    name = cls.__name__
    with pytest.warns(UserWarning) as caught:
        cls(3, 4, dropout=0.5)
    assert [str(w.message) for w in caught] == [
        f"{name}: dropout=0.5 does nothing with num_layers=1: it drops each layer's output "
        "but the last's, between layers; give num_layers greater than 1 for dropout between "
        f"layers, or dropout=0.0 (an nn.Dropout after the {name} drops its output)"
    ]
    assert caught[0].filename == __file__  # (said at the line that builds it)
    # two layers, or no dropout: nothing to say (filterwarnings=error would fail on one)
    cls(3, 4, num_layers=2, dropout=0.5)
    cls(3, 4, dropout=0.0)
    cls(3, 4, dropout=0)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_dropout_with_one_layer_warns_once_not_again_on_every_rebuild(
    cls: Any, tmp_path: Any
) -> None:
    # (each rebuild from a spec warned again, at asyncnn's own line in from_spec: Trainer.load,
    # Graph.from_spec, replay, every LocalCluster worker; an error under filterwarnings=error,
    # as here. torch's load does not run __init__ again)
    with pytest.warns(UserWarning, match="does nothing with num_layers=1"):
        m = cls(3, 4, dropout=0.5)
    assert nn.from_spec(nn.to_spec(m)) == m
    nested = nn.Sequential(nn.Linear(2, 3), m)
    assert nn.from_spec(nn.to_spec(nested)) == nested
    g = ann.Graph.sequential(
        [nn.Linear(3, 3), m],
        loss=nn.MSELoss(),
        input_shape=(None, 5, 3),
        label_shape=(None, 5, 4),
        label_dtype="float32",
    )
    assert ann.Graph.from_spec(g.to_spec()).to_spec() == g.to_spec()
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=0)
    tr.save(tmp_path / "ckpt")
    back = ann.Trainer.load(tmp_path / "ckpt")
    assert back.graph.to_spec() == g.to_spec()
    with pytest.warns(UserWarning, match="does nothing with num_layers=1"):
        cls(3, 4, dropout=0.5)  # (a module the user builds still warns, after the rebuilds)


_LSTM = nn.LSTM(3, 4, num_layers=2)
_P = _LSTM.init(0, dtype="float64")
_CELL = nn.LSTMCell(3, 4)
_CP = _CELL.init(0, dtype="float64")
_GRU = nn.GRUCell(3, 4)
_GP = _GRU.init(0, dtype="float64")
_X = np.zeros((2, 5, 3))


@pytest.mark.parametrize(
    ("call", "err", "match"),
    [
        (lambda: _LSTM(_P, np.zeros((2, 5, 4))), ValueError,
         r"LSTM\(input_size=3, hidden_size=4.*got input of shape \(2, 5, 4\); expected "
         r"\(batch, seq, 3\) \(batch first\)"),
        (lambda: _LSTM(_P, np.zeros((2, 3))), ValueError, r"expected \(batch, seq, 3\)"),
        (lambda: _LSTM(_P, np.zeros((2, 0, 3))), ValueError, r"a sequence of no steps"),
        (lambda: _LSTM(_P, _X.astype(np.int64)), TypeError,
         r"LSTM\(.*got input of dtype int64 and shape \(2, 5, 3\).*float64"),
        (lambda: _LSTM(_P, _X, state=(np.zeros((2, 2, 4)), np.zeros((1, 2, 4)))), ValueError,
         r"initial state c0 has shape \(1, 2, 4\), expected \(2, 2, 4\) \(num_layers \* "
         r"directions, batch, hidden_size\)"),
        (lambda: _LSTM(_P, _X, state=np.zeros((2, 2, 4))), ValueError,
         r"state must be a pair \(h0, c0\)"),
        (lambda: _LSTM({"weight_ih_l0": _P["weight_ih_l0"]}, _X), ValueError,
         r"expects params \{'weight_ih_l0': \(3, 16\)"),
        (lambda: _CELL(_CP, np.zeros((2, 5))), ValueError,
         r"LSTMCell\(input_size=3, hidden_size=4, bias=True\) got input x of shape \(2, 5\); "
         r"expected \(batch, 3\)"),
        (lambda: _CELL(_CP, np.zeros((2, 3)), (np.zeros((2, 4)), np.zeros((3, 4)))), ValueError,
         r"LSTMCell\(.*state c has shape \(3, 4\), expected \(batch, hidden_size\) = \(2, 4\)"),
        (lambda: _CELL(_CP, np.zeros((2, 3)), np.zeros((2, 4))), ValueError,
         r"state must be a pair \(h, c\), each \(batch, 4\), or None for zeros, got ndarray "
         r"of shape \(2, 4\)"),
        (lambda: _CELL(_CP, np.zeros((2, 3), dtype=bool)), TypeError,
         r"LSTMCell\(.*got input of dtype bool and shape \(2, 3\)"),
        (lambda: _GRU(_GP, np.zeros((2, 3)), np.zeros((2, 5))), ValueError,
         r"GRUCell\(input_size=3, hidden_size=4, bias=True\): state h has shape \(2, 5\), "
         r"expected \(batch, hidden_size\) = \(2, 4\)"),
        (lambda: _GRU(_GP, np.zeros((2, 3), dtype=np.int32)), TypeError,
         r"GRUCell\(.*dtype int32"),
        (lambda: nn.GRUCell(3, 4).loop_cell()(_GP, np.zeros((2, 4)), np.zeros((2, 2))),
         ValueError, r"GRUCell\(.*got input x of shape \(2, 2\); expected \(batch, 3\)"),
        (lambda: nn.LSTMCell(3, 4).loop_cell()(_CP, np.zeros((2, 4)), np.zeros((2, 3))),
         ValueError, r"the loop's state has shape \(2, 4\), expected \(batch, 8\)"),
    ],
    ids=["lstm-width", "lstm-2d", "lstm-empty", "lstm-int", "lstm-state-shape",
         "lstm-state-not-pair", "lstm-params", "cell-width", "cell-state-shape",
         "cell-state-not-pair", "cell-bool", "gru-state-shape", "gru-int", "loop-gru",
         "loop-lstm-state"],
)  # fmt: skip
def test_bad_input_is_named(call: Any, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize(
    ("make", "err", "match"),
    [
        (lambda: nn.LSTM(3, 4, batch_first=False), ValueError,
         r"LSTM: batch_first=False is not supported.*x\.transpose\(1, 0, 2\)"),
        (lambda: nn.GRU(3, 0), ValueError, r"GRU: hidden_size must be an int >= 1, got 0"),
        (lambda: nn.LSTM(3, 4, num_layers=0), ValueError, r"num_layers must be an int >= 1"),
        (lambda: nn.LSTM(3, 4, dropout=1.5), ValueError, r"dropout must be in \[0, 1\]"),
        (lambda: nn.GRU(3, 4, dropout="x"), TypeError, r"GRU: dropout must be a real number"),
        (lambda: nn.LSTMCell(3.0, 4), ValueError, r"LSTMCell: input_size must be an int >= 1"),
        (lambda: nn.GRUCell(3, 4, bias="no"), TypeError, r"GRUCell: bias"),
        (lambda: nn.GRU(3, 4).loop_cell(), AttributeError, r"loop_cell"),
        (lambda: nn.LSTM(3, 4, output="first"), ValueError,
         r"LSTM: output must be 'all' \(every step's output, \(batch, seq, directions \* "
         r"hidden_size\)\) or 'last' \(.*\), got 'first'"),
        (lambda: nn.GRU(3, 4, output=None), ValueError, r"GRU: output must be 'all' .*got None"),
    ],
    ids=["batch-first", "hidden", "layers", "dropout", "dropout-type", "size-type", "bias",
         "no-loop-cell", "output", "output-none"],
)  # fmt: skip
def test_bad_settings_are_refused(make: Any, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        make()


def test_float_input_follows_numpys_promotion_and_the_parameters_keep_their_dtype() -> None:
    m = nn.GRU(3, 4)
    p = m.init(0, dtype="float32")
    x = np.random.default_rng(7).standard_normal((2, 3, 3))
    assert m(p, x.astype(np.float32)).dtype == np.float32
    assert m(p, x).dtype == np.float64  # (as Linear: float64 input to float32 parameters)


def test_a_loop_refuses_a_torch_order_cell_and_says_to_give_its_loop_form() -> None:
    # (GRUCell(4, 4) in a loop read h as x and x as h, and trained on without a word)
    with pytest.raises(
        TypeError, match=r"GRUCell takes torch's order.*GRUCell\(\.\.\.\)\.loop_cell"
    ):
        dynamic.Loop(nn.GRUCell(4, 4), has_xs=True)
    dynamic.Loop(nn.GRUCell(4, 4).loop_cell(), has_xs=True)  # its loop form is taken


def _rule_elements(monkeypatch: Any, m: Any, steps: int) -> int:
    """The elements of every gradient that the VJP rules of ``m``'s backward give, over a
    sequence of ``steps``: the work of the backward, counted instead of timed."""
    from asyncnn._math._ops import PRIMITIVES

    count = [0]

    def counted(rule: Any) -> Any:
        def rule_counted(g: Any, res: Any, needs: Any) -> Any:
            grads = rule(g, res, needs)
            count[0] += sum(int(getattr(a, "size", 0)) for a in grads if a is not None)
            return grads

        return rule_counted

    for prim in PRIMITIVES.values():
        monkeypatch.setattr(prim, "vjp_rule", counted(prim.vjp_rule))
    p = m.init(0, dtype="float64")
    x = np.random.default_rng(8).standard_normal((2, steps, m.input_size))
    ann.grad(lambda p, x: ops.sum(m(p, x)), argnums=(0, 1))(p, x)
    monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("m", [nn.LSTM(16, 2), nn.GRU(16, 2, num_layers=2, bidirectional=True)],
                         ids=_id)  # fmt: skip
def test_the_backward_grows_linearly_with_the_sequence(monkeypatch: Any, m: Any) -> None:
    # each step's slice of x gave back a gradient of x's whole shape, which the trace added up:
    # 4x the steps cost 16x on x's side (0.012 s backward at 50 steps, 0.064 s at 200)
    short, long = _rule_elements(monkeypatch, m, 10), _rule_elements(monkeypatch, m, 40)
    assert long <= 4.2 * short, (short, long)


_LAST_CASES = [
    nn.LSTM(3, 4, output="last"), nn.GRU(3, 4, num_layers=2, output="last"),
    nn.LSTM(3, 4, num_layers=2, bidirectional=True, output="last"),
    nn.GRU(2, 3, bidirectional=True, bias=False, output="last"),
]  # fmt: skip


@pytest.mark.parametrize("m", _LAST_CASES, ids=_id)
def test_output_last_is_the_top_layers_final_state_as_torchs_h_n(m: Any) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    t = _torch_module(m, "float64")
    p = from_torch(t.state_dict(), m)
    x = rng.standard_normal((3, 5, m.input_size))
    _, state = t(torch.from_numpy(x))
    h_n = (state[0] if isinstance(m, nn.LSTM) else state).detach().numpy()
    # torch's h_n: the forward direction's last step, the backward direction's step 0
    want = np.concatenate([h_n[-2], h_n[-1]], axis=1) if m.bidirectional else h_n[-1]
    got = m(p, x)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # of the whole output: the last step's forward half and the first step's backward half
    full = dataclasses.replace(m, output="all")
    seq, h = full(p, x), m.hidden_size
    np.testing.assert_array_equal(got[:, :h], seq[:, -1, :h])
    if m.bidirectional:
        np.testing.assert_array_equal(got[:, h:], seq[:, 0, h:])
    # the same gradients as the output sliced from the whole sequence
    ct = rng.standard_normal(got.shape)

    def sliced(p: Any, x: Any) -> Any:
        out = full(p, x)
        last = out[:, -1, :h]
        if m.bidirectional:
            last = ops.concatenate([last, out[:, 0, h:]], axis=1)
        return ops.sum(last * ct)

    want_g = ann.grad(sliced, argnums=(0, 1))(p, x)
    got_g = ann.grad(lambda p, x: ops.sum(m(p, x) * ct), argnums=(0, 1))(p, x)
    for k in want_g[0]:
        np.testing.assert_allclose(got_g[0][k], want_g[0][k], rtol=1e-10, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(got_g[1], want_g[1], rtol=1e-10, atol=1e-12)
    check_grads(m, p, x[:2, :3])
    # with return_state, the state comes after it as with the whole output
    last, state_n = dataclasses.replace(m, return_state=True)(p, x)
    np.testing.assert_array_equal(last, got)
    _, want_state = dataclasses.replace(full, return_state=True)(p, x)
    for ours, theirs in zip(_flat(state_n), _flat(want_state), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_output_last_in_a_graph_classifies_a_sequence_and_its_shape_and_flops_agree() -> None:
    lstm = nn.LSTM(3, 4, bidirectional=True, output="last")
    clf = nn.Sequential(lstm, nn.Linear(8, 2))
    assert lstm._output_shape((7, 5, 3)) == (7, 8) == lstm(lstm.init(0), np.zeros((7, 5, 3))).shape
    assert lstm.flops((None, 5, 3)) == dataclasses.replace(lstm, output="all").flops((None, 5, 3))
    assert clf.flops((None, 5, 3)) == lstm.flops((None, 5, 3)) + nn.Linear(8, 2).flops((1, 8))
    g = ann.Graph()
    x = g.input("x", shape=(None, 5, 3))
    y = g.input("y", shape=(None,), dtype="int64")
    logits = g.layer("clf", clf, x)
    g.loss("loss", nn.CrossEntropyLoss(), logits, y)
    g.output("logits", logits)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), seed=0,
                     dtype="float64")  # fmt: skip
    rng = np.random.default_rng(10)
    data = {"x": rng.standard_normal((8, 5, 3)), "y": rng.integers(0, 2, 8)}
    p0 = [dict(v) if isinstance(v, dict) else v for v in tr.params["clf"]]
    tr.fit(data, epochs=1, batch_size=8)
    got = tr.predict({"x": data["x"]})["logits"]
    assert got.shape == (8, 2)
    np.testing.assert_allclose(got, clf(tr.params["clf"], data["x"]), rtol=1e-12)

    def loss(p: Any) -> Any:
        return nn.CrossEntropyLoss()({}, clf(p, data["x"]), data["y"])

    grads = ann.grad(loss)(p0)
    for k, v in tr.params["clf"][0].items():
        np.testing.assert_allclose(v, p0[0][k] - 0.1 * grads[0][k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "module",
    [
        nn.LSTM(4, 8, return_state=True),
        nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 8, return_state=True, output="last")),
        nn.Residual(nn.Sequential(nn.LSTM(4, 4, return_state=True))),
    ],
    ids=["lstm", "in-sequential", "in-residual"],
)
def test_a_graph_refuses_a_recurrent_layer_that_gives_its_state_when_built(module: Any) -> None:
    # (it was taken, and the pair failed later in the module after it: "Linear(16 -> 5) got
    # input of shape ()", naming neither return_state nor the fix)
    g = ann.Graph()
    x = g.input("x", shape=(None, 5, 4))
    with pytest.raises(
        ann.GraphError,
        match=r"layer 'rnn': .*return_state=True.* gives a pair, "
        r"\(output, state\) .*drop return_state .*output=\"last\"",
    ):
        g.layer("rnn", module, x)
    with pytest.raises(ann.GraphError, match="gives a pair"):
        ann.Graph.sequential(
            [nn.LSTM(4, 8, return_state=True), nn.Linear(8, 2)],
            loss=nn.CrossEntropyLoss(),
            stages=1,
            input_shape=(None, 5, 4),
        )


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_dropout_of_1_between_layers_matches_torch_in_training(cls: Any) -> None:
    # p=1 drops every output of the first layer (deterministically, so torch's training mode
    # can be compared): the second layer reads zeros, in torch as here
    torch = pytest.importorskip("torch")
    m = cls(3, 4, num_layers=2, dropout=1.0)
    t = (torch.nn.LSTM if cls is nn.LSTM else torch.nn.GRU)(
        3, 4, num_layers=2, dropout=1.0, batch_first=True
    ).double()
    t.train()
    p = from_torch(t.state_dict(), m)
    x = np.random.default_rng(5).standard_normal((2, 5, 3))
    out = m(p, x, rng=np.random.default_rng(0))  # every step's output (torch's first)
    ref = _flat(t(torch.from_numpy(x)))[0].detach().numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    undropped = _flat(t.eval()(torch.from_numpy(x)))[0].detach().numpy()
    assert not np.allclose(ref, undropped)  # (the dropout did change the second layer's input)
    t.train()
    # evaluation (no rng) is the undropped network
    t.eval()
    ref_eval = _flat(t(torch.from_numpy(x)))
    np.testing.assert_allclose(_flat(m(p, x))[0], ref_eval[0].detach().numpy(), rtol=1e-12)
