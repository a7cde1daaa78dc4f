"""Graph building and validation: every wiring mistake is a GraphError naming the node; graphs of
several inputs, branches, losses and local (stop_gradient) layers train as the plain loop.
(Graph.sequential is in test_graph_sequential.py, specs in test_graph_spec.py.)"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

from _graph_cases import Add, _base
from _reference import assert_params_close


def test_wiring_errors_name_the_node():
    g = ann.Graph()
    x = g.input("x", shape=(None, 4))
    with pytest.raises(ann.GraphError, match="already exists"):
        g.input("x", shape=(None, 4))
    with pytest.raises(ann.GraphError, match="unknown node 'nope'"):
        g.layer("a", nn.Linear(4, 2), "nope")
    with pytest.raises(ann.GraphError, match="start with None"):
        g.input("z", shape=(4,))
    other = ann.Graph().input("x", shape=(None, 4))
    with pytest.raises(ann.GraphError, match="another graph"):
        g.layer("a", nn.Linear(4, 2), other)
    with pytest.raises(ann.GraphError, match="not an asyncnn module"):
        g.layer("a", lambda p, x: x, x)
    with pytest.raises(ann.GraphError, match="unknown device"):
        g.layer("a", nn.Linear(4, 2), x, device="tpu:0")


def test_layer_reaching_no_loss_and_missing_loss():
    g = ann.Graph()
    x = g.input("x", shape=(None, 4))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("a", nn.Linear(4, 3), x)
    g.layer("dangling", nn.Linear(4, 3), x)
    with pytest.raises(ann.GraphError, match="no loss node"):
        g.check_structure()
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    with pytest.raises(ann.GraphError, match="'dangling' reaches no loss"):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def test_shape_mismatch_found_before_compute():
    g = ann.Graph()
    x = g.input("x", shape=(None, 40))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("stage0", nn.Linear(40, 64), x)
    out = g.layer("stage1", nn.Linear(32, 10), h)  # wrong: expects 32 features, gets 64
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    with pytest.raises(ann.GraphError) as info:
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    msg = str(info.value)
    assert "'stage1'" in msg and "(2, 64)" in msg


def test_input_dimensions_must_be_ints_and_errors_name_the_input():
    g = ann.Graph()
    for shape, bad in [((None, -4), "-4"), ((None, 4.5), "4.5"), ((None, "4"), "'4'")]:
        with pytest.raises(ann.GraphError, match=rf"input 'x': shape .* has dimension {bad}"):
            g.input("x", shape=shape)
    with pytest.raises(ann.GraphError, match="input 'x': shape 4 is not a tuple"):
        g.input("x", shape=4)
    assert g.nodes == {}
    g.input("x", shape=(None, np.int64(4)))
    assert g.nodes["x"].shape == (None, 4) and type(g.nodes["x"].shape[1]) is int
    mods = [nn.Linear(4, 3)]
    with pytest.raises(ann.GraphError, match=r"input 'y': shape \(None, -1\) has dimension -1"):
        ann.Graph.sequential(mods, nn.CrossEntropyLoss(), label_shape=(None, -1))
    with pytest.raises(ann.GraphError, match=r"input 'x': shape \(None, -3\) has dimension -3"):
        ann.Graph.sequential(mods, nn.CrossEntropyLoss(), stages=1, input_shape=(None, -3))


def test_a_numpy_integer_is_a_worker_number_stored_as_a_python_int():
    mods = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)]
    g = ann.Graph.sequential(mods, nn.CrossEntropyLoss(), stages=2, workers=np.arange(2))
    assert [g.nodes[n].worker for n in g.layers] == [0, 1]
    assert all(type(g.nodes[n].worker) is int for n in g.layers)
    json.dumps(g.to_spec())  # plain JSON: no numpy scalar in the spec
    h = ann.Graph()
    x, y = h.input("x", (None, 4)), h.input("y", (None,), "int64")
    h.loss("loss", nn.CrossEntropyLoss(), h.layer("a", nn.Linear(4, 3), x), y, worker=np.int32(2))
    assert type(h.nodes["loss"].worker) is int and h.nodes["loss"].worker == 2


def _two_input_graph():
    g = ann.Graph()
    a = g.input("a", shape=(None, 3))
    b = g.input("b", shape=(None, 3))
    y = g.input("y", shape=(None,), dtype="int64")
    ha = g.layer("enc_a", nn.Linear(3, 4), a)
    hb = g.layer("enc_b", nn.Linear(3, 4), b)
    s = g.layer("sum", Add(), ha, hb)
    t = g.layer("act", nn.Tanh(), s)
    r = g.layer("res", Add(), t, s)  # s fans out to act and res: a residual branch
    out = g.layer("head", nn.Linear(4, 2), r)
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    return g


@pytest.mark.parametrize("policy", [policies.Sync(), policies.GPipe(3), policies.OneFOneB(2)])
def test_residual_and_two_input_graph_gradients(policy):
    g = _two_input_graph()
    rng = np.random.default_rng(0)
    data = {
        "a": rng.standard_normal((12, 3)),
        "b": rng.standard_normal((12, 3)),
        "y": rng.integers(0, 2, 12),
    }
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.5), policy=policy, dtype="float64")
    p0 = tr.params

    def loss(p):
        ha = g.nodes["enc_a"].module(p["enc_a"], data["a"])
        hb = g.nodes["enc_b"].module(p["enc_b"], data["b"])
        s = ha + hb
        r = ops.tanh(s) + s
        return nn.CrossEntropyLoss()({}, g.nodes["head"].module(p["head"], r), data["y"])

    grads = ann.grad(loss)(p0)
    tr.fit(data, epochs=1, batch_size=12)
    for name in ["enc_a", "enc_b", "head"]:
        for key in p0[name]:
            expected = p0[name][key] - 0.5 * grads[name][key]
            np.testing.assert_allclose(tr.params[name][key], expected, rtol=1e-10, atol=1e-12)


def _local_graph(stop: bool) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h0 = g.layer("block0", nn.Sequential(nn.Linear(5, 8), nn.Tanh()), x)
    g.loss("loss0", nn.CrossEntropyLoss(), g.layer("head0", nn.Linear(8, 3), h0), y)
    h1 = g.layer("block1", nn.Sequential(nn.Linear(8, 8), nn.Tanh()), h0, stop_gradient=stop)
    g.loss("loss1", nn.CrossEntropyLoss(), g.layer("head1", nn.Linear(8, 3), h1), y)
    return g


@pytest.mark.parametrize("policy", [policies.Sync(), policies.OneFOneB(2), policies.Async(3)])
def test_stop_gradient_layers_train_locally(policy):
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((24, 5)), "y": rng.integers(0, 3, 24)}
    local = ann.Trainer(
        _local_graph(True), optimizer=optim.SGD(lr=0.3), policy=policy, dtype="float64"
    )
    start = local.params
    hist = local.fit(data, epochs=2, batch_size=8)
    # no backward message from block1 reaches block0: only head0's (+ stop, + end of stream)
    st = hist.statistics["block0"]
    assert st.messages_in == st.forwards + st.backwards + (1 if policy.flush else 2)
    if isinstance(policy, policies.Async):
        return  # its update order depends on timing; the rest is checked under Sync and 1F1B
    # block0 learns from head0 alone: exactly what training block0 + head0 by themselves gives
    alone = ann.Graph()
    x = alone.input("x", shape=(None, 5))
    y = alone.input("y", shape=(None,), dtype="int64")
    h0 = alone.layer("block0", nn.Sequential(nn.Linear(5, 8), nn.Tanh()), x)
    alone.loss("loss0", nn.CrossEntropyLoss(), alone.layer("head0", nn.Linear(8, 3), h0), y)
    ref = ann.Trainer(alone, optimizer=optim.SGD(lr=0.3), policy=policies.Sync(), dtype="float64")
    ref.params = {"block0": start["block0"], "head0": start["head0"]}
    ref.fit(data, epochs=2, batch_size=8)
    assert_params_close(
        {"block0": ref.params["block0"]}, {"block0": local.params["block0"]}, rtol=1e-12
    )


def test_stop_gradient_needs_another_path_to_a_loss():
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h0 = g.layer("block0", nn.Linear(5, 8), x)
    h1 = g.layer("block1", nn.Linear(8, 3), h0, stop_gradient=True)
    g.loss("loss", nn.CrossEntropyLoss(), h1, y)
    with pytest.raises(ann.GraphError, match="'block0' reaches no loss through layers that send"):
        g.check_structure()
    spec = ann.Graph.from_spec(_local_graph(True).to_spec())
    assert spec.nodes["block1"].stop_gradient and not spec.nodes["block0"].stop_gradient


@pytest.mark.parametrize("dtype", ["O", "U3", "datetime64[s]"])
def test_an_input_of_a_dtype_that_is_not_numbers_is_refused(dtype):
    # (accepted before: the run failed later, on the first batch, far from the declaration)
    g = ann.Graph()
    with pytest.raises(ann.GraphError, match=f"input 'x': dtype '{re.escape(dtype)}' is not num"):
        g.input("x", (None, 3), dtype)


def test_a_graph_without_a_layer_is_refused_not_left_to_stall():
    # (its loss waited for a layer's output until stall_timeout, 60 s by default)
    g = ann.Graph()
    g.loss("loss", nn.MSELoss(), g.input("x", (None, 4)), g.input("t", (None, 4)))
    with pytest.raises(ann.GraphError, match=r"no layer, so nothing to train: its losses \['loss'"):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), stall_timeout=5)


@pytest.mark.parametrize(
    ("add", "said"),
    [
        (lambda g, x, y: g.layer("a", nn.Linear, x), r"layer 'a': got the class Linear, not a mod"),
        (lambda g, x, y: g.layer("a", nn.Linear(4, 3), x, stop_gradient="no"),
         r"layer 'a': stop_gradient='no'; give True or False"),
        (lambda g, x, y: g.layer("a", nn.Linear(4, 3), x, worker=-1),
         r"layer 'a' is placed on worker=-1 \(of type int\): worker= takes an int >= 0"),
        (lambda g, x, y: g.layer("a", nn.Linear(4, 3), x, worker=np.int64(-1)),
         r"layer 'a' is placed on worker=np.int64\(-1\) \(of type int64\)"),
        (lambda g, x, y: g.layer("a", nn.Linear(4, 3), x, worker=np.bool_(True)),
         r"layer 'a' is placed on worker=np.True_ \(of type bool"),
        (lambda g, x, y: g.layer("a", nn.Linear(4, 3), x, worker="1"),
         r"layer 'a' is placed on worker='1' \(of type str\)"),
        (lambda g, x, y: g.layer("a", nn.Linear(4, 3), x, actor="mylab:Actor"),
         r"layer 'a': actor='mylab:Actor' is not a LayerActor subclass"),
        (lambda g, x, y: g.layer("a", nn.Linear(4, 3), x, actor=int),
         r"layer 'a': actor=the class int is not a LayerActor subclass"),
        (lambda g, x, y: g.loss("loss", None, x, y), r"loss 'loss': None is not a loss module"),
        (lambda g, x, y: g.loss("loss", nn.CrossEntropyLoss, x, y),
         r"loss 'loss': got the class CrossEntropyLoss, not a module"),
        (lambda g, x, y: g.loss("loss", nn.MSELoss(), x, x, worker=True),
         r"loss 'loss' is placed on worker=True \(of type bool\)"),
        (lambda g, x, y: g.output("", x), "output name '' is not valid"),
        (lambda g, x, y: g.output(3, x), "output name 3 is not valid"),
        (lambda g, x, y: g.input("z", (None, 2), None), "input 'z': dtype None; give one"),
    ],
    ids=["module-class", "stop_gradient-str", "worker-negative", "worker-numpy-negative",
         "worker-numpy-bool", "worker-str", "actor-str",
         "actor-not-an-actor", "loss-None", "loss-class", "loss-worker-bool", "output-empty",
         "output-int", "dtype-None"],
)  # fmt: skip
def test_a_node_argument_of_the_wrong_kind_is_refused_as_the_node_is_added(add, said):
    # (each was taken: stop_gradient="no" read as True, dtype None as float64, worker= was
    # ignored without a cluster, the others failed at fit or at save, without naming the node)
    g, x, y = _base()
    before = dict(g.nodes)
    with pytest.raises(ann.GraphError, match=said):
        add(g, x, y)
    assert g.nodes == before and g.outputs == {}


def test_a_loss_with_parameters_or_no_reduction_says_what_to_change():
    g, x, y = _base()
    h = g.layer("a", nn.Linear(4, 3), x)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    g.loss("head", nn.Linear(3, 1), h)  # a layer's module given to g.loss
    with pytest.raises(ann.GraphError, match=r"loss 'head': its module Linear.* has parameters, "
                       r"but a loss node trains none .*put that module in a layer"):  # fmt: skip
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    g, x, y = _base()
    g.loss("loss", nn.CrossEntropyLoss(reduction="none"), g.layer("a", nn.Linear(4, 3), x), y)
    with pytest.raises(ann.GraphError, match=r"scalar, got shape \(2,\) \(its reduction is 'none"):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def test_a_dtype_error_points_at_the_declared_dtype_not_at_features():
    # (the hint said to declare the features of a (None,) input, whatever the error)
    g = ann.Graph()
    x, y = g.input("x", (None, 4)), g.input("labels", (None,), dtype="float32")
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("a", nn.Linear(4, 3), x), y)
    with pytest.raises(ann.GraphError) as info:
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    said = str(info.value)
    assert "declared as shape (None,)" not in said
    assert "input 'labels' is declared float32: if it holds integers, declare it so" in said
    ids = ann.Graph.sequential([nn.Embedding(5, 3), nn.Flatten(), nn.Linear(3, 2)],
                               nn.CrossEntropyLoss(), input_shape=(None, 1))  # fmt: skip
    with pytest.raises(ann.GraphError, match="input 'x' is declared float32: if it holds integ"):
        ann.Trainer(ids, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


@dataclass(frozen=True)
class Cat(nn.Module):
    """Concatenates two inputs on the feature axis (a merge of two branches)."""

    def __call__(self, params: Any, a: Any, b: Any, *, rng: Any = None) -> Any:
        return ops.concatenate([a, b], axis=1)


@pytest.mark.parametrize("policy", [policies.Sync(), policies.GPipe(3)])
def test_a_branching_graph_with_two_losses_is_the_plain_loop(policy):
    # a shared input, a merge of two branches, a residual across stages, a tensor read twice by
    # one layer and a loss reading an input directly: the runtime is value_and_grad on the sum
    def build() -> ann.Graph:
        g, x, y = _base()
        t = g.input("t", (None, 4))
        a = g.layer("a", nn.Linear(4, 5), x)
        b = g.layer("b", nn.Sequential(nn.Linear(4, 5), nn.Tanh()), x)
        d = g.layer("d", Add(), g.layer("c", nn.Linear(10, 5), g.layer("m", Cat(), a, b)), a)
        out = g.layer("o", nn.Linear(5, 3), g.layer("dd", Add(), d, d))  # d read twice
        g.loss("ce", nn.CrossEntropyLoss(), out, y)
        g.loss("mse", nn.MSELoss(), g.layer("rec", nn.Linear(5, 4), d), t)
        return g

    def loss(g: ann.Graph, p: dict[str, Any], b: dict[str, Any]) -> Any:
        m = {n: g.nodes[n].module for n in g.layers}
        a, h = m["a"](p["a"], b["x"]), m["b"](p["b"], b["x"])
        d = m["c"](p["c"], ops.concatenate([a, h], axis=1)) + a
        ce = nn.CrossEntropyLoss()({}, m["o"](p["o"], d + d), b["y"])
        return ce + nn.MSELoss()({}, m["rec"](p["rec"], d), b["t"])

    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((12, 4)), "y": rng.integers(0, 3, 12),
            "t": rng.standard_normal((12, 4))}  # fmt: skip
    g = build()
    tr = ann.Trainer(g, optimizer=optim.Adam(lr=0.01), policy=policy, dtype="float64", seed=1)
    params, opt = tr.params, optim.Adam(lr=0.01)
    state, losses = opt.init(params), []
    for i in range(0, 12, 6):
        batch = {k: v[i : i + 6] for k, v in data.items()}
        value, grads = ann.value_and_grad(lambda p, b=batch: loss(g, p, b))(params)
        params, state = opt.update(params, grads, state)
        losses.append(float(value))
    hist = tr.fit(data, epochs=1, batch_size=6)
    np.testing.assert_allclose(hist.losses, losses, rtol=1e-10)
    assert_params_close(tr.params, params, rtol=1e-10, atol=1e-12)


def test_a_complex_input_is_refused_naming_it():
    # (it was taken, a Linear computed on it, and the loss failed, naming the loss)
    g = ann.Graph()
    with pytest.raises(
        ann.GraphError,
        match=r"input 'x': dtype 'complex64' is complex numbers; an input takes floats",
    ):
        g.input("x", (None, 4), "complex64")
