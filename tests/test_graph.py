"""Graph building and validation: every wiring mistake is a GraphError naming the node."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

from _reference import assert_params_close, fresh_params


@dataclass(frozen=True)
class Add(nn.Module):
    """Sums two inputs (a test helper for two-input nodes)."""

    def __call__(self, params: Any, a: Any, b: Any, *, rng: Any = None) -> Any:
        return ops.add(a, b)


def test_sequential_names_and_stage_sizes():
    mods = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)]
    g = ann.Graph.sequential(
        mods, loss=nn.CrossEntropyLoss(), stages=[2, 2, 1], input_shape=(None, 4)
    )
    assert g.layers == ["stage0", "stage1", "stage2"]
    assert g.inputs == ["x", "y"] and g.losses == ["loss"] and g.outputs == {"logits": "stage2"}
    assert [len(g.nodes[n].module) for n in g.layers] == [2, 2, 1]


def test_sequential_balances_by_parameter_count():
    mods = [
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
        nn.ReLU(),
        nn.Linear(10, 10),
        nn.Linear(10, 2),
    ]
    g = ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 100))
    # the big first Linear alone outweighs everything after it
    assert [len(g.nodes[n].module) for n in g.layers] == [1, 5]
    with pytest.raises(ann.GraphError, match="add up"):
        ann.Graph.sequential(
            mods, loss=nn.CrossEntropyLoss(), stages=[2, 2], input_shape=(None, 100)
        )
    with pytest.raises(ann.GraphError, match="stages=9"):
        ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=9, input_shape=(None, 100))


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


def test_spec_round_trip():
    g = ann.Graph.sequential(
        [nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)],
        loss=nn.CrossEntropyLoss(),
        stages=2,
        input_shape=(None, 4),
    )
    import msgpack

    spec = msgpack.unpackb(msgpack.packb(g.to_spec()))
    g2 = ann.Graph.from_spec(spec)
    assert g2.to_spec() == g.to_spec()


def test_a_spec_with_two_nodes_of_one_name_says_so_not_a_cycle():
    g = ann.Graph.sequential([nn.Linear(4, 8), nn.Linear(8, 3)], nn.CrossEntropyLoss(), stages=2)
    spec = g.to_spec()
    again = dict(spec, nodes=spec["nodes"] + [dict(spec["nodes"][2])])  # stage0 twice
    with pytest.raises(ann.GraphError, match=r"nodes 2 and 5 are both named 'stage0'"):
        ann.Graph.from_spec(again)
    renamed = dict(spec, nodes=[dict(e) for e in spec["nodes"]])
    renamed["nodes"][3]["name"] = "stage0"  # stage1 renamed: it reads a node of its own name
    with pytest.raises(ann.GraphError, match=r"nodes 2 and 3 are both named 'stage0'"):
        ann.Graph.from_spec(renamed)


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


def test_sequential_checks_its_stages_devices_and_workers_arguments():
    mods = [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)]
    loss = nn.CrossEntropyLoss()
    assert ann.Graph.sequential(mods, loss, stages=np.int64(2)).layers == ["stage0", "stage1"]
    assert len(ann.Graph.sequential(mods, loss, stages=np.array([1, 2])).layers) == 2
    for stages in (True, [1.5, 1.5], "2", 2.0):
        with pytest.raises(ann.GraphError, match=r"sequential: stages=.*give the number"):
            ann.Graph.sequential(mods, loss, stages=stages)
    with pytest.raises(ann.GraphError, match=r"devices='cpu'; give a list .* \(2 stages\)"):
        ann.Graph.sequential(mods, loss, stages=2, devices="cpu")
    with pytest.raises(ann.GraphError, match=r"workers=0; give a list .* \(2 stages\)"):
        ann.Graph.sequential(mods, loss, stages=2, workers=0)
    with pytest.raises(ann.GraphError, match="2 stages but 1 devices"):
        ann.Graph.sequential(mods, loss, stages=2, devices=["cpu"])


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


def test_sequential_balances_by_flops():
    from asyncnn._runtime._balance import balanced_partition as _balanced_partition
    from asyncnn._runtime._balance import module_costs as _module_costs

    # A conv with few parameters but many FLOPs per sample, then a dense layer.
    mods = [nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)]
    assert _module_costs(mods, "params", (None, 1, 64)) == [48, 0, 0, 2052]
    assert _module_costs(mods, "flops", (None, 1, 64)) == [
        mods[0].flops((None, 1, 64)),
        0,
        0,
        mods[3].flops((None, 512)),
    ]
    assert _balanced_partition([1.0, 1.0, 1.0, 1.0, 4.0], 2) == [4, 1]
    with pytest.raises(ann.GraphError, match="balance"):
        ann.Graph.sequential(
            mods, loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 1, 64), balance="x"
        )


@pytest.mark.parametrize("balance", ["params", "flops", "time"])
def test_sequential_balances_a_chain_of_token_ids(balance):
    # an Embedding first reads integer ids: the modules are run on ids of the input's dtype
    mods = [nn.Embedding(50, 8), nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 4)]
    g = ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, 6),
                             input_dtype="int64", balance=balance, balance_rows=8)  # fmt: skip
    assert sum(len(g.nodes[n].module.modules) for n in g.layers) == len(mods) == 5


def test_sequential_checks_balance_and_measures_nothing_when_the_cut_is_given():
    conv = [nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(152, 10)]
    for balance in ("flops", "time"):  # one stage, or one module a stage: no input is guessed
        for stages in (1, 3):
            g = ann.Graph.sequential(conv, loss=nn.CrossEntropyLoss(), stages=stages,
                                     balance=balance)  # fmt: skip
            assert len(g.layers) == stages
    with pytest.raises(ann.GraphError, match="'params', 'flops' or 'time', got 'speed'"):
        ann.Graph.sequential(conv, loss=nn.CrossEntropyLoss(), stages=[1, 2], balance="speed")
    with pytest.raises(ann.GraphError, match=r"stages=4 but there are 3 modules.*between 1 and 3"):
        ann.Graph.sequential(conv, loss=nn.CrossEntropyLoss(), stages=4)


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


def test_sequential_weights_do_not_depend_on_the_stage_cut():
    # a chain's modules are seeded by their place in the whole chain: a balance that cuts it
    # elsewhere (by measured time, which varies from run to run) starts from the same weights
    mods = [nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    flat = []
    for stages in ([5], [1, 4], [2, 2, 1], [3, 1, 1]):
        g = ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=stages)
        params = fresh_params(g)
        flat.append([x for n in g.layers for x in ann._math._pytree.tree_leaves(params[n])])
    for other in flat[1:]:
        assert len(other) == len(flat[0])
        for a, b in zip(flat[0], other, strict=True):
            assert np.array_equal(a, b)
    # and one stage is the whole Sequential's own init, at the first layer's seed
    one = ann.Graph.sequential(mods, loss=nn.CrossEntropyLoss(), stages=1)
    g2 = ann.Graph.from_spec(one.to_spec())
    assert g2.nodes["stage0"].init_offset == 0
    bad = one.to_spec()
    bad["nodes"][2]["init_offset"] = -2
    with pytest.raises(ann.GraphError, match="init_offset"):
        ann.Graph.from_spec(bad)


def _dropout_chain(chain: str, p: float) -> list[Any]:
    """A chain with dropout: one between Linear layers, or two that a cut may keep together."""
    if chain == "two in a stage":
        return [nn.Linear(5, 8), nn.Dropout(p), nn.Tanh(), nn.Dropout(p), nn.Linear(8, 3)]
    return [nn.Linear(5, 8), nn.ReLU(), nn.Dropout(p), nn.Linear(8, 8), nn.Linear(8, 3)]


@pytest.mark.anyio
@pytest.mark.parametrize("chain", ["one", "two in a stage"])
async def test_sequential_dropout_masks_do_not_depend_on_the_stage_cut(chain):
    # each module draws its masks by its place in the whole chain (as its weights are seeded):
    # a cut elsewhere (balance="time" varies from run to run) trains to the same bits
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((8, 5)), "y": rng.integers(0, 3, 8)} for _ in range(3)]

    async def train(p, stages):
        g = ann.Graph.sequential(_dropout_chain(chain, p), nn.CrossEntropyLoss(), stages)
        async with ann.open_run(
            g, optimizer=optim.SGD(lr=0.5), policy=policies.Sync(), seed=3, dtype="float64"
        ) as run:
            for batch in batches:
                await run.step(batch)
            await run.drain()
        return [x for n in g.layers for x in ann._math._pytree.tree_leaves(run.params[n])]

    whole = await train(0.5, 1)
    for stages in ([1, 4], [3, 2], 2, 4):
        cut = await train(0.5, stages)
        assert len(cut) == len(whole)
        for a, b in zip(whole, cut, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"stages={stages}")
    # the masks took effect: at p=0 the weights end elsewhere
    plain = await train(0.0, 1)
    assert any(not np.array_equal(a, b) for a, b in zip(whole, plain, strict=True))


def test_sequential_balances_stages_by_measured_time():
    from asyncnn._runtime._balance import module_times as _module_times

    heavy, light = nn.Linear(512, 512), nn.ReLU()
    times = _module_times([heavy, light], (None, 512), "float32", 256)
    assert all(t > 0 for t in times) and times[0] > times[1]  # a product against one pass
    modules = [nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4)]
    g = ann.Graph.sequential(
        modules, loss=nn.CrossEntropyLoss(), stages=3, input_shape=(None, 32), balance="time"
    )
    stages = [g.nodes[n].module for n in g.layers]
    assert len(stages) == 3 and sum(len(s.modules) for s in stages) == len(modules)
    with pytest.raises(ann.GraphError, match="balance_rows must be an int >= 1"):
        ann.Graph.sequential(modules, loss=nn.CrossEntropyLoss(), stages=2,
                             input_shape=(None, 32), balance="time", balance_rows=0)  # fmt: skip
    with pytest.raises(ann.GraphError, match="'params', 'flops' or 'time'"):
        ann.Graph.sequential(modules, loss=nn.CrossEntropyLoss(), stages=2,
                             input_shape=(None, 32), balance="speed")  # fmt: skip


def test_sequential_measures_time_with_one_blas_thread_whichever_thread_set_blas(
    monkeypatch: Any,
) -> None:
    # threadpoolctl (3.8) lets only the thread that first set a pthreads OpenBLAS's count set
    # it while that thread lives: the measurement's threadpool_limits(1) then did nothing, and
    # the modules were timed with that thread's count (2 here)
    import threading

    import threadpoolctl
    from threadpoolctl import threadpool_info, threadpool_limits

    from asyncnn._runtime import _balance

    def blas_threads() -> int:
        return int(
            next(lib for lib in threadpool_info() if lib["user_api"] == "blas")["num_threads"]
        )

    if blas_threads() < 2:
        pytest.skip("needs a BLAS that may take 2 threads")
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:  # sets BLAS's count, so holds threadpoolctl's control while it lives
        controller = getattr(threadpoolctl, "OpenBLASController", None)
        getattr(controller, "clear_controlling_thread", lambda force: None)(force=True)
        limiter = threadpool_limits(2, user_api="blas")
        holding.set()
        done.wait(10)
        limiter.restore_original_limits()

    holder = threading.Thread(target=hold)
    holder.start()
    seen: list[int] = []
    real_vjp = _balance.vjp

    def vjp(*args: Any) -> Any:
        seen.append(blas_threads())
        return real_vjp(*args)

    monkeypatch.setattr(_balance, "vjp", vjp)
    try:
        assert holding.wait(10)
        _balance.module_times([nn.Linear(8, 8), nn.ReLU()], (None, 8), "float32", 4)
        after = blas_threads()
    finally:
        done.set()
        holder.join(10)
    assert seen and set(seen) == {1}
    assert after == 2  # the count from before the measurement


def test_sequential_infers_a_linear_input_and_says_how_to_declare_others():
    g = ann.Graph.sequential([nn.Linear(64, 10)], loss=nn.CrossEntropyLoss())
    assert g.nodes["x"].shape == (None, 64)
    conv = ann.Graph.sequential(
        [nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(152, 10)], loss=nn.CrossEntropyLoss()
    )
    with pytest.raises(
        ann.GraphError,
        match=r"input 'x' is declared as shape \(None,\).*input_shape=\(None, \.\.\.\)",
    ):
        ann.Trainer(conv, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


@pytest.mark.parametrize("dtype", ["O", "U3", "datetime64[s]"])
def test_an_input_of_a_dtype_that_is_not_numbers_is_refused(dtype):
    # (accepted before: the run failed later, on the first batch, far from the declaration)
    g = ann.Graph()
    with pytest.raises(ann.GraphError, match=f"input 'x': dtype '{re.escape(dtype)}' is not num"):
        g.input("x", (None, 3), dtype)


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ([], "expected a dict with a list of 'nodes'"),
        ({"nodes": "x"}, "expected a dict with a list of 'nodes'"),
        ({"nodes": [1]}, "node 0 is 1, not a dict"),
        (
            {"nodes": [{"kind": "input", "name": "x", "shape": [None, 2], "dtype": "float32"},
                       {"kind": "layer", "name": "l", "inputs": "x", "module": {}}]},
            "node 'l' has inputs 'x'; expected a list of node names",
        ),
        ({"nodes": [], "outputs": []}, "outputs \\[\\]; expected a dict"),
    ],
    ids=["not-a-dict", "nodes-not-a-list", "node-not-a-dict", "inputs-a-string", "outputs-a-list"],
)  # fmt: skip
def test_a_damaged_spec_is_a_graph_error_naming_what(spec, said):
    # (a string of inputs was split into one-letter node names; the others raised TypeError)
    with pytest.raises(ann.GraphError, match=said):
        ann.Graph.from_spec(spec)


class Scaled(ann.LayerActor):
    """A custom actor with a setup argument (for the spec round trip)."""

    def setup(self, scale: float = 1.0, tags: Any = None) -> None:
        self.scale = scale


def _base() -> tuple[ann.Graph, Any, Any]:
    g = ann.Graph()
    return g, g.input("x", (None, 4)), g.input("y", (None,), dtype="int64")


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


def _full_graph() -> ann.Graph:
    g, x, y = _base()
    h = g.layer("a", nn.Linear(4, 3), x, worker=1, actor=Scaled,
                actor_args={"scale": 2.0, "tags": ["t", {"k": 1}]})  # fmt: skip
    h2 = g.layer("b", nn.Linear(3, 3), h, device="cpu", stop_gradient=True)
    g.loss("loss", nn.CrossEntropyLoss(), h, y, worker=0)
    g.loss("loss2", nn.CrossEntropyLoss(), h2, y)
    g.output("logits", h)
    return g


def test_a_spec_round_trip_keeps_every_node_option():
    import msgpack

    g = _full_graph()
    spec = msgpack.unpackb(msgpack.packb(g.to_spec()))
    again = ann.Graph.from_spec(spec)
    assert again.to_spec() == g.to_spec() and again.outputs == g.outputs
    for name, node in g.nodes.items():
        other = again.nodes[name]
        for field in ("kind", "module", "inputs", "shape", "dtype", "device", "worker",
                      "custom_actor", "actor_args", "stop_gradient", "consumers"):  # fmt: skip
            assert getattr(other, field) == getattr(node, field), (name, field)
    chain = ann.Graph.sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)],
                                 nn.CrossEntropyLoss(), stages=2, workers=[0, 1])  # fmt: skip
    again = ann.Graph.from_spec(chain.to_spec())
    assert [again.nodes[n].init_offset for n in again.layers] == [0, 1]
    assert [again.nodes[n].worker for n in again.layers] == [0, 1]


def _loop_graph() -> ann.Graph:
    g = ann.Graph()
    h0 = g.input("h0", shape=(None, 3))
    xs = g.input("xs", shape=(None, 4, 3))
    n = g.input("n", shape=(None,), dtype="int64")
    h = g.loop("cell", Add(), h0, xs, n)  # h <- h + x_t
    g.output("h", g.layer("head", nn.Linear(3, 2), h))
    return g


@pytest.mark.parametrize("mark", ["written", "absent", "false"])
def test_a_loop_is_recurrent_after_a_spec_round_trip_with_or_without_the_mark(mark):
    # (a spec without "recurrent", as older ones, rebuilt the loop unmarked: its next spec
    # differed from the one it was read from)
    import msgpack

    spec = msgpack.unpackb(msgpack.packb(_loop_graph().to_spec()))
    assert _entry(spec, "cell")["recurrent"] is True
    if mark == "absent":
        del _entry(spec, "cell")["recurrent"]
    elif mark == "false":
        _entry(spec, "cell")["recurrent"] = False
    again = ann.Graph.from_spec(spec)
    assert again.nodes["cell"].recurrent and not again.nodes["head"].recurrent
    assert again.to_spec() == _loop_graph().to_spec()
    assert ann.Graph.from_spec(again.to_spec()).nodes["cell"].recurrent


def _entry(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in spec["nodes"] if e.get("name") == name)


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda s: _entry(s, "b").__setitem__("stop_gradiant", True),
         r"layer 'b' has the unknown field 'stop_gradiant'; a layer node has 'name'"),
        (lambda s: s.__setitem__("extra", 1), r"unknown field 'extra'; a graph spec has 'nodes'"),
        (lambda s: _entry(s, "b").__setitem__("stop_gradient", "false"),
         r"layer 'b' has stop_gradient 'false' \(a str\); expected true or false"),
        (lambda s: _entry(s, "a").__setitem__("worker", "1"),
         r"layer 'a' has worker '1' \(a str\); expected an int >= 0 or None"),
        (lambda s: _entry(s, "loss").__setitem__("worker", -1), r"loss 'loss' has worker -1"),
        (lambda s: _entry(s, "loss").__setitem__("device", "cpu"),
         r"loss 'loss' has the unknown field 'device'"),
        (lambda s: _entry(s, "x").__setitem__("shape", 4), r"input 'x' has shape 4 \(a int\)"),
        (lambda s: _entry(s, "x").__setitem__("dtype", None), r"input 'x' has dtype None"),
        (lambda s: _entry(s, "x").__setitem__("inputs", ["y"]), r"input 'x' has inputs \['y'\]"),
        (lambda s: _entry(s, "a").__setitem__("actor", 3), r"layer 'a' has actor 3 \(a int\)"),
        (lambda s: _entry(s, "a").__setitem__("actor", "collections:OrderedDict"),
         r"layer 'a': 'collections:OrderedDict' is not a LayerActor subclass"),
        (lambda s: _entry(s, "a").pop("module"), r"layer 'a' is missing the field 'module'"),
        (lambda s: _entry(s, "a").pop("name"), r"node 2 is missing the field 'name'"),
        (lambda s: _entry(s, "a").__setitem__("module", {"type": "Linear", "args": {"bias": 1}}),
         r"layer 'a' has a module that cannot be rebuilt: .*in_features"),
        (lambda s: s.__setitem__("outputs", {"logits": 3}), r"output 'logits': 3; expected a nam"),
    ],
    ids=["typo", "top-level-extra", "bool-as-str", "worker-str", "loss-worker-negative",
         "field-of-another-kind", "shape-int", "dtype-None", "input-reads", "actor-int",
         "actor-not-an-actor", "no-module", "no-name", "module-args", "output-not-a-name"],
)  # fmt: skip
def test_a_spec_field_missing_unknown_or_mistyped_is_named(damage, said):
    # (a typo's field was dropped without a word, "false" read as True, a worker "1" or a
    # shape 4 taken or a TypeError, a missing field or a module's bad args named no node)
    import copy

    spec = copy.deepcopy(_full_graph().to_spec())
    damage(spec)
    with pytest.raises(ann.GraphError, match=said):
        ann.Graph.from_spec(spec)


def test_a_spec_naming_an_untrusted_module_is_refused_without_importing_it(tmp_path, monkeypatch):
    import sys

    from asyncnn._math._imports import UntrustedModuleError, untrusted_cause

    (tmp_path / "graphmod_untrusted.py").write_text(
        "import pathlib\npathlib.Path('ran').touch()\nfrom asyncnn import nn\nLayer = nn.Linear\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    spec = _full_graph().to_spec()
    _entry(spec, "b")["module"] = {"type": "graphmod_untrusted:Layer", "args": {}}
    with pytest.raises(ann.GraphError, match="layer 'b' has a module that cannot be rebuilt: "
                       ".*pass trusted_modules=") as info:  # fmt: skip
        ann.Graph.from_spec(spec)
    assert isinstance(untrusted_cause(info.value), UntrustedModuleError)
    _entry(spec, "b")["module"] = nn.to_spec(nn.Linear(3, 3))
    _entry(spec, "a")["actor"] = "graphmod_untrusted:Actor"
    with pytest.raises(UntrustedModuleError, match="graphmod_untrusted"):
        ann.Graph.from_spec(spec)
    assert "graphmod_untrusted" not in sys.modules and not (tmp_path / "ran").exists()


@dataclass(frozen=True)
class Holding(nn.Module):
    """A module holding any value (an array cannot be in a spec)."""

    factor: Any = None

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return x


def test_a_node_that_cannot_be_in_a_spec_is_named():
    def local_actor() -> type:
        class Local(ann.LayerActor):
            pass

        return Local

    g, x, y = _base()
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("held", Holding(np.ones(3)), x), y)
    with pytest.raises(TypeError, match=r"layer 'held': its module cannot be in a spec: .*ndarr"):
        g.to_spec()
    g, x, y = _base()
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("a", nn.Linear(4, 3), x, actor=local_actor()), y)
    with pytest.raises(ValueError, match=r"layer 'a': its actor cannot be in a spec: .*<locals>"):
        g.to_spec()


def test_sequential_names_a_module_that_is_not_one_and_a_shape_it_cannot_measure():
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ann.GraphError, match=r"modules\[1\] is the class ReLU, not a module"):
        ann.Graph.sequential([nn.Linear(4, 3), nn.ReLU, nn.Linear(3, 2)], loss, stages=2)
    with pytest.raises(ann.GraphError, match=r"modules\[1\] is int \(3\), not an nn.Module"):
        ann.Graph.sequential([nn.Linear(4, 3), 3], loss)
    with pytest.raises(ann.GraphError, match=r"modules=Linear.*; give a list of modules"):
        ann.Graph.sequential(nn.Linear(4, 3), loss)
    # (flops on a convolution given the default (None,) input: an IndexError from its flops)
    conv = [nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(152, 10)]
    for balance in ("flops", "time"):
        with pytest.raises(ann.GraphError, match=r"Conv1d.* expects \(N, C, L\) input.*declared "
                           r"\(None,\): give Graph.sequential the input_shape"):  # fmt: skip
            ann.Graph.sequential(conv, loss, stages=2, balance=balance, balance_rows=4)
    with pytest.raises(ann.GraphError, match="balance_rows must be an int >= 1, got 0"):
        ann.Graph.sequential(conv, loss, stages=2, balance="params", balance_rows=0)


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
