"""Routing (sparse experts, branches): gradients equal a plain loop over the rows one by one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

from _reference import (
    assert_params_close,
    assert_params_equal,
    forward_versions_1f1b,
    fresh_params,
    microbatched_sgd,
)

D, H, C = 5, 4, 3


def moe_graph(experts: int = 4, k: int = 2, **kw: Any) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", nn.Linear(D, experts), x, experts=experts, k=k, **kw)
    outs = [g.layer(f"e{i}", nn.Sequential(nn.Linear(D, H), nn.Tanh()), r) for i in range(experts)]
    m = g.merge("merge", r, *outs)
    o = g.layer("head", nn.Linear(H, C), m)
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    g.output("logits", o)
    return g


def _row_choices(scores: np.ndarray, k: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    return order[:k]


def reference_loss(
    graph: ann.Graph, p: dict[str, Any], x: Any, y: Any, k: int, gates: str, cap: int | None
) -> Any:
    """The mean loss of one key, each row through its own experts, one row at a time."""
    mods = {n: graph.nodes[n].module for n in graph.layers}
    gate = mods["gate"].gate
    experts = mods["gate"].experts
    rows = x.shape[0]
    chosen = []
    for i in range(rows):
        s = np.asarray(ops.raw(gate(p["gate"], x[i : i + 1])))[0]
        chosen.append(_row_choices(s, k))
    kept = [[True] * k for _ in range(rows)]
    if cap is not None:  # first choices of all rows first, then second choices
        load = [0] * experts
        for j in range(k):
            for i in range(rows):
                e = chosen[i][j]
                kept[i][j] = load[e] < cap
                load[e] += kept[i][j]
    total = 0.0
    for i in range(rows):
        xi = x[i : i + 1]
        s = gate(p["gate"], xi)
        idx = np.array(chosen[i])
        if gates == "softmax":
            w = ops.take(ops.softmax(s, axis=-1), idx, axis=1)
        elif gates == "normalized":
            w = ops.softmax(ops.take(s, idx, axis=1), axis=-1)
        else:
            w = None
        out = None
        for j, e in enumerate(chosen[i]):
            if not kept[i][j]:
                continue
            ye = mods[f"e{e}"](p[f"e{e}"], xi)
            term = ye if w is None else ye * w[:, j : j + 1]
            out = term if out is None else out + term
        if out is None:
            out = xi[:, :H] * 0
        logits = mods["head"](p["head"], out)
        total = total + nn.CrossEntropyLoss()({}, logits, y[i : i + 1])
    return total / rows


def reference_fit(graph, params, batches, k, gates, cap, microbatches, lr=0.1):
    """Plain SGD: one step per minibatch; the gradient of the minibatch mean loss, with the
    capacity applied per microbatch (the runtime's key), like numpy.array_split."""
    return microbatched_sgd(
        params, batches, microbatches,
        lambda q, b, lo, hi: reference_loss(graph, q, b["x"][lo:hi], b["y"][lo:hi], k, gates, cap),
        lr,
    )  # fmt: skip


def _data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, D)), "y": rng.integers(0, C, n)}


POLICIES = [
    pytest.param(policies.Sync(), 1, 2, id="Sync"),
    pytest.param(policies.GPipe(3), 3, 2, id="GPipe3"),
    pytest.param(policies.OneFOneB(2), 2, 2, id="1F1B2"),
    pytest.param(policies.PipeDream(1, stash=True), 1, 1, id="PipeDream-stash"),
    pytest.param(policies.PipeDream(1, stash=False), 1, 1, id="PipeDream-nostash"),
    pytest.param(policies.Async(max_active_keys=1), 1, 3, id="Async1"),
]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize(("policy", "micro", "batches"), POLICIES)
def test_moe_gradients_equal_a_plain_loop_over_rows(policy, micro, batches, k):
    g = moe_graph(k=k)
    data = _data(n=6 * batches)
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64", seed=0)
    hist = tr.fit(data, batch_size=6)
    bs = [{n: v[i * 6 : (i + 1) * 6] for n, v in data.items()} for i in range(batches)]
    ref = reference_fit(g, start, bs, k, "softmax", None, micro)
    assert_params_close(tr.params, ref, rtol=1e-10)
    st = hist.statistics["gate"]
    assert sum(st.expert_rows.values()) == 6 * batches * k
    assert sum(1 for v in st.expert_rows.values() if v) >= 2  # rows went to different experts


def test_experts_without_rows_are_skipped_and_counted():
    g = moe_graph(experts=4, k=1)
    data = _data(n=4)
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(4), dtype="float64")
    hist = tr.fit(data, batch_size=4)  # one row per key: three experts skip each key
    skipped = sum(hist.statistics[f"e{i}"].skipped for i in range(4))
    assert skipped == 4 * 3
    ref = reference_fit(g, start, [data], 1, "softmax", None, 4)
    assert_params_close(tr.params, ref, rtol=1e-10)


@pytest.mark.parametrize("gates", ["normalized", "none"])
def test_gate_kinds(gates):
    g = moe_graph(k=2, gates=gates)
    data = _data()
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64")
    tr.fit(data, batch_size=12)
    ref = reference_fit(g, start, [data], 2, gates, None, 2)
    assert_params_close(tr.params, ref, rtol=1e-10)
    if gates == "none":  # hard branches: the gate gets a zero gradient
        np.testing.assert_array_equal(tr.params["gate"]["weight"], start["gate"]["weight"])


def test_capacity_drops_rows_counts_them_and_matches_the_reference():
    g = moe_graph(experts=3, k=2, capacity=3)
    data = _data(n=12)
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64")
    hist = tr.fit(data, batch_size=12)
    st = hist.statistics["gate"]
    # 2 keys of 6 rows choose 2 of 3 experts (24 choices); at most 3 per expert and key fit
    assert st.capacity == 3
    assert st.dropped_total > 0
    assert sum(st.dropped_rows.values()) == st.dropped_total
    assert sum(st.expert_rows.values()) == 24 - st.dropped_total
    assert all(v <= 3 * 2 for v in st.expert_rows.values())
    ref = reference_fit(g, start, [data], 2, "softmax", 3, 2)
    assert_params_close(tr.params, ref, rtol=1e-10)


def test_capacity_factor_and_overflow_error():
    g = moe_graph(experts=3, k=1, capacity_factor=0.5)
    assert g.nodes["gate"].module.limit(12) == 2
    g = moe_graph(experts=3, k=2, capacity=1, on_overflow="error")
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    with pytest.raises(ann.ActorError, match=r"router 'gate': key 0 sends more rows than the "
                       r"capacity 1 allows"):  # fmt: skip
        tr.fit(_data(), batch_size=12)


def test_capacity_factor_must_be_a_finite_number_when_the_graph_is_built():
    for factor in (float("inf"), float("nan"), "1", 0, True):
        with pytest.raises(ann.GraphError, match=r"router 'gate': capacity_factor=.* finite"):
            moe_graph(experts=3, k=1, capacity_factor=factor)
    # a router module made by hand (or read from a spec) is checked before any compute
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    router = ann.dynamic.Router(nn.Linear(D, 2), 2, capacity_factor=float("inf"))
    r = g.layer("gate", router, x)
    outs = [g.layer(f"e{i}", nn.Linear(D, C), r) for i in range(2)]
    g.loss("loss", nn.CrossEntropyLoss(), g.merge("m", r, *outs), y)
    with pytest.raises(ann.GraphError, match=r"router 'gate': capacity_factor=inf"):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def test_predict_follows_the_routes():
    g = moe_graph(k=2, capacity=2)
    data = _data()
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    logits = tr.predict({"x": data["x"][:6]})["logits"]
    p = tr.params
    mods = {n: g.nodes[n].module for n in g.layers}
    # the reference's head input for each row, with the same capacity (per predict batch)
    ref_out = []
    # rebuild the merged rows by hand, with the reference's chooser
    s = np.asarray(mods["gate"].gate(p["gate"], data["x"][:6]))
    probs = np.exp(s - s.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    load = [0] * 4
    chosen = [_row_choices(row, 2) for row in s]
    kept = [[False, False] for _ in range(6)]
    for j in range(2):
        for i in range(6):
            e = chosen[i][j]
            kept[i][j] = load[e] < 2
            load[e] += kept[i][j]
    for i in range(6):
        out = np.zeros((1, H))
        for j, e in enumerate(chosen[i]):
            if kept[i][j]:
                out = out + probs[i, e] * mods[f"e{e}"](p[f"e{e}"], data["x"][i : i + 1])
        ref_out.append(mods["head"](p["head"], out)[0])
    np.testing.assert_allclose(logits, np.array(ref_out), rtol=1e-12)


def test_bit_identical_deterministic_runs():
    runs = []
    for _ in range(2):
        tr = ann.Trainer(moe_graph(k=2), optimizer=optim.SGD(lr=0.1),
                         policy=policies.OneFOneB(3), dtype="float32")  # fmt: skip
        tr.fit(_data(n=24), batch_size=12)
        runs.append(tr.params)
    assert_params_equal(runs[0], runs[1])


def test_async_routed_run_replays_identically(tmp_path):
    path = str(tmp_path / "moe.trace")
    tr = ann.Trainer(moe_graph(k=2, capacity=4), optimizer=optim.SGD(lr=0.05),
                     policy=policies.Async(max_active_keys=3), dtype="float64",
                     trace=path)  # fmt: skip
    tr.fit(_data(n=48), batch_size=6)
    t = ann.trace.read(path)
    routes = [e for e in t.events if e["ev"] == "route"]
    assert len(routes) == 8 and all(sum(e["m"]["load"]) <= 12 for e in routes)
    rep = ann.replay(path)
    assert rep.identical, rep.first_divergence
    assert rep.events_checked > 0
    assert_params_close(rep.params, tr.params, rtol=0)


@pytest.mark.anyio
async def test_router_graph_trains_on_trio_and_asyncio():
    g = moe_graph(k=1)
    data = _data(n=12)
    start = fresh_params(g)
    async with ann.open_run(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                            dtype="float64") as run:  # fmt: skip
        await run.step(data)
        await run.drain()
        await anyio.lowlevel.checkpoint()
    ref = reference_fit(g, start, [data], 1, "softmax", None, 2)
    assert_params_close(run.params, ref, rtol=1e-10)
    assert isinstance(run.statistics()["gate"], ann.dynamic.RouterStatistics)


def test_a_branch_of_several_layers_and_a_condition_router():
    """Hard branches on a condition (a parameterless gate), each branch two stages deep."""
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("sign", SignGate(), x, experts=2, k=1, gates="none")
    ends = []
    for b in range(2):
        h = g.layer(f"b{b}a", nn.Sequential(nn.Linear(D, H), nn.Tanh()), r)
        ends.append(g.layer(f"b{b}b", nn.Linear(H, C), h))
    out = g.merge("merge", r, *ends)
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    data = _data(n=8)
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(2), dtype="float64")
    tr.fit(data, batch_size=8)
    mods = {n: g.nodes[n].module for n in g.layers}

    def loss(p):
        total = 0.0
        for half in np.array_split(np.arange(8), 2):
            part = 0.0
            for i in half:
                b = int(data["x"][i, 0] > 0)
                h = mods[f"b{b}a"](p[f"b{b}a"], data["x"][i : i + 1])
                o = mods[f"b{b}b"](p[f"b{b}b"], h)
                part = part + nn.CrossEntropyLoss()({}, o, data["y"][i : i + 1])
            total = total + part / 8
        return total

    p = dict(start)
    g_ref = ann.grad(loss)(p)
    ref, _ = optim.SGD(lr=0.1).update(p, g_ref, optim.SGD(lr=0.1).init(p))
    assert_params_close(tr.params, ref, rtol=1e-10)


@dataclass(frozen=True)
class SignGate(nn.Module):
    """Scores (x0 <= 0, x0 > 0): a fixed condition on a value."""

    def init_params(self, init):
        return {}

    def __call__(self, params, x, *, rng=None):
        pos = (ops.raw(x)[:, :1] > 0).astype(ops.raw(x).dtype)
        return np.concatenate([1 - pos, pos], axis=1)


def test_bad_wiring_is_a_clear_graph_error():
    g = moe_graph(experts=3)
    with pytest.raises(ann.GraphError, match=r"gate.*scores of shape \(2, 5\).*needs \(2, 4\)"):
        g2 = ann.Graph()
        x = g2.input("x", (None, D))
        y = g2.input("y", (None,), dtype="int64")
        r = g2.router("gate", nn.Linear(D, 5), x, experts=4)
        outs = [g2.layer(f"e{i}", nn.Linear(D, C), r) for i in range(4)]
        g2.loss("loss", nn.CrossEntropyLoss(), g2.merge("m", r, *outs), y)
        ann.Trainer(g2, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    g3 = ann.Graph()
    x = g3.input("x", (None, D))
    r = g3.router("gate", nn.Linear(D, 3), x, experts=3)
    outs = [g3.layer(f"e{i}", nn.Linear(D, C), r) for i in range(2)]
    with pytest.raises(ann.GraphError, match=r"router 'gate' has 3 experts but 2 branches"):
        g3.merge("m", r, *outs)
    with pytest.raises(
        ann.GraphError, match=r"router 'bad': Router: k=4 must be an int in \[1, experts=3\]"
    ):
        g3.router("bad", nn.Linear(D, 3), x, experts=3, k=4)
    with pytest.raises(ann.GraphError, match="is not a router"):
        g3.merge("m2", x, *outs)
    # an expert whose output also feeds something else
    g4 = ann.Graph()
    x = g4.input("x", (None, D))
    y = g4.input("y", (None,), dtype="int64")
    r = g4.router("gate", nn.Linear(D, 2), x, experts=2)
    outs = [g4.layer(f"e{i}", nn.Linear(D, C), r) for i in range(2)]
    m = g4.merge("m", r, *outs)
    g4.loss("loss", nn.CrossEntropyLoss(), m, y)
    g4.loss("side", nn.CrossEntropyLoss(), outs[0], y)
    with pytest.raises(ann.GraphError, match=r"layer 'e0' feeds \['m', 'side'\]"):
        g4.check_structure()
    assert g.to_spec() == ann.Graph.from_spec(g.to_spec()).to_spec()
    assert ann.Graph.from_spec(g.to_spec()).nodes["gate"].actor is ann.dynamic.RouterActor


def _assign_by_hand(choice, experts, capacity):
    """Row by row, first choices before second ones: the rule assign_rows implements."""
    route = choice.copy()
    dropped = np.zeros(experts, dtype=np.int64)
    load = np.zeros(experts, dtype=np.int64)
    for j in range(choice.shape[1]):
        for i in range(choice.shape[0]):
            e = int(choice[i, j])
            if load[e] < capacity:
                load[e] += 1
            else:
                route[i, j] = -1
                dropped[e] += 1
    return route, dropped


@pytest.mark.parametrize("seed", range(20))
def test_capacity_assignment_matches_the_row_by_row_rule(seed):
    from asyncnn.dynamic import assign_rows

    rng = np.random.default_rng(seed)
    experts = int(rng.integers(1, 6))
    k = int(rng.integers(1, experts + 1))
    rows = int(rng.integers(0, 40))
    choice = np.array([rng.permutation(experts)[:k] for _ in range(rows)], dtype=np.int64)
    choice = choice.reshape(rows, k)  # 0 rows too
    capacity = int(rng.integers(0, 12))
    got = assign_rows(choice, experts, capacity)
    want = _assign_by_hand(choice, experts, capacity)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def _stream_reference(graph, start, keys, fwd_version, per_update, lr, correct=None, predict=False):
    """A routed graph trained on a stream of keys with stale weights, re-enacted key by key.

    Key ``i`` runs forward at stage ``s`` with version ``fwd_version(s, i)`` of that stage (or,
    with ``predict``, its linear prediction ``w + D * (w - w_before)``, D the keys in flight at
    the stage after the update that made ``w``), and, stashed, its whole gradient is taken at
    those weights. Each stage applies ``per_update`` consecutive keys' gradients (``correct(g,
    d, w_now, w_fwd)`` first, ``d`` the delay) in one plain SGD update. ``keys`` are (x, y,
    weight of the key's mean loss).
    """
    names = graph.layers
    hist = {n: [start[n]] for n in names}  # every version of every stage
    acc: dict[str, Any] = {}

    def weights(s, name, v):
        w = hist[name][v]
        if predict and v > 0:
            # WeightPrediction's horizon: the keys in flight at the stage right after its
            # update v (forwarded before it, their gradient applied by a later update)
            d = sum(1 for i in range(len(keys)) if fwd_version(s, i) < v <= i // per_update)
            w = _tmap(lambda a, b, d=d: a + d * (a - b), w, hist[name][v - 1])
        return w

    for i, (x, y, scale) in enumerate(keys):
        used = {n: fwd_version(s, i) for s, n in enumerate(names)}
        w = {n: weights(s, n, used[n]) for s, n in enumerate(names)}
        g = ann.grad(lambda q, x=x, y=y: reference_loss(graph, q, x, y, 1, "softmax", None))(w)
        update = i // per_update  # the update that applies key i's gradient
        for n in names:
            d = update - used[n]
            gn = _tmap(lambda a, scale=scale: a * scale, g[n])
            if correct is not None:
                gn = correct(gn, d, hist[n][update], hist[n][used[n]])
            acc[n] = gn if n not in acc else _tmap(lambda a, b: a + b, acc[n], gn)
        if (i + 1) % per_update == 0:
            for n in names:
                hist[n].append(_tmap(lambda a, b: a - lr * b, hist[n][-1], acc.pop(n)))
    return {n: hist[n][-1] for n in names}


def _tmap(fn, *trees):
    return ann._math._pytree.tree_map(fn, *trees)


def _dc(g, d, w, w0):
    return _tmap(lambda a, b, c: a + 0.5 * a * a * (b - c), g, w, w0)


@pytest.mark.parametrize(
    "remedy",
    [
        pytest.param(None, id="plain"),
        pytest.param("StalenessScaledLR", id="StalenessScaledLR"),
        pytest.param("DelayCompensation", id="DelayCompensation"),
        pytest.param("WeightPrediction", id="WeightPrediction"),
    ],
)
def test_router_under_pipedream_and_remedies_equals_a_key_by_key_reference(remedy):
    """The router is a stage like any other: its forward uses the weights the policy gives
    (a prediction), and its stale gradient is delayed, recorded and corrected like a layer's."""
    g = moe_graph(experts=2, k=1)  # gate, e0, e1, merge, head: 5 stages
    data = _data(n=24)
    start = fresh_params(g)
    inner = policies.PipeDream(2)
    correct, predict = None, False
    if remedy == "StalenessScaledLR":
        policy: Any = policies.StalenessScaledLR(inner)
        correct = lambda g, d, w, w0: _tmap(lambda a: a / max(d, 1), g)  # noqa: E731
    elif remedy == "DelayCompensation":
        policy = policies.DelayCompensation(inner, strength=0.5)
        correct = _dc
    elif remedy == "WeightPrediction":
        policy, predict = policies.WeightPrediction(inner), True
    else:
        policy = inner
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64", seed=0)
    hist = tr.fit(data, batch_size=6)  # 4 minibatches of 2 keys: a stream of 8 keys
    keys = [(data["x"][lo : lo + 3], data["y"][lo : lo + 3], 1.0) for lo in range(0, 24, 3)]
    fv = forward_versions_1f1b(5, 8)
    ref = _stream_reference(g, start, keys, lambda s, i: fv[s][i], 1, 0.1, correct, predict)
    assert_params_close(tr.params, ref, rtol=1e-10)
    # the gate's delays are those of stage 0: its warm-up of K - 1 = 4 forwards
    assert hist.statistics["gate"].delays == {0: 1, 1: 1, 2: 1, 3: 1, 4: 4}


def test_router_under_pipedream_2bw_uses_the_double_buffered_version():
    """PipeDream-2BW: W(t+1) = W(t) - lr grad f_t(W(t-1)) for every stage, the gate too."""
    g = moe_graph(experts=2, k=1)  # 5 stages: microbatches >= 4
    data = _data(n=40)
    start = fresh_params(g)
    # 5 keys a minibatch: the gate (stage 0, 4 forwards ahead) runs the last forward of each
    # minibatch after the previous minibatch's update, and must still use the version before it
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream2BW(5),
                     dtype="float64", seed=0)  # fmt: skip
    hist = tr.fit(data, batch_size=10)  # 4 minibatches of 5 keys of 2 rows
    keys = [(data["x"][lo : lo + 2], data["y"][lo : lo + 2], 0.2) for lo in range(0, 40, 2)]
    ref = _stream_reference(g, start, keys, lambda s, i: max(i // 5 - 1, 0), 5, 0.1)
    assert_params_close(tr.params, ref, rtol=1e-10)
    assert hist.statistics["gate"].delays == {0: 5, 1: 15}


def test_router_recomputes_its_gate_at_the_discrepancy_corrected_weights():
    """PipeDream(stash=False) recomputes a backward at the latest weights; under
    DiscrepancyCorrection at ``w - d * delta``: the gate's too (its route stays the forward's)."""
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", nn.Linear(D, 2), x, experts=2, k=1)
    outs = [g.layer("e0", nn.Tanh(), r), g.layer("e1", nn.Sigmoid(), r)]
    g.loss("loss", nn.CrossEntropyLoss(), g.merge("merge", r, *outs), y)  # 4 stages
    data = _data(n=24)
    start = fresh_params(g)
    gamma, lr = 0.5, 0.5
    policy = policies.DiscrepancyCorrection(policies.PipeDream(2, stash=False), decay=gamma)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=lr), policy=policy, dtype="float64", seed=0)
    tr.fit(data, batch_size=6)  # a stream of 8 keys of 3 rows
    fv = forward_versions_1f1b(4, 8)[0]  # the gate is stage 0
    versions, delta = [start["gate"]], None

    def gate_weights(q, xs, choice):
        probs = ops.softmax(xs @ q["weight"] + q["bias"], axis=-1)
        return ops.take(ops.reshape(probs, (-1,)), np.arange(len(choice)) * 2 + choice, axis=0)

    for i in range(8):
        xs, ys = data["x"][3 * i : 3 * i + 3], data["y"][3 * i : 3 * i + 3]
        wf = versions[fv[i]]
        scores = xs @ wf["weight"] + wf["bias"]
        choice = np.argmax(scores, axis=1)  # ties to the lower index
        w = np.asarray(gate_weights(wf, xs, choice))
        expert_out = np.where(choice[:, None] == 0, np.tanh(xs), 1 / (1 + np.exp(-xs)))
        g_m = ann.grad(lambda m, ys=ys: nn.CrossEntropyLoss()({}, m, ys))(w[:, None] * expert_out)
        g_w = (np.asarray(g_m) * expert_out).sum(axis=1)
        d = i - fv[i]
        wb = versions[i]
        if delta is not None and d:
            wb = _tmap(lambda a, v, d=d: a - d * v, wb, delta)
        _, pb = ann.vjp(lambda q, xs=xs, choice=choice: gate_weights(q, xs, choice), wb)
        (g_gate,) = pb(g_w)
        versions.append(_tmap(lambda a, b: a - lr * b, versions[i], g_gate))
        change = _tmap(lambda a, b: (1 - gamma) * (a - b), versions[-1], versions[-2])
        delta = change if delta is None else _tmap(lambda a, c: gamma * a + c, delta, change)
    assert_params_close({"gate": tr.params["gate"]}, {"gate": versions[-1]}, rtol=1e-10)


def test_a_capacity_of_zero_drops_every_row_in_training_and_in_predict():
    """Every choice dropped: the merge gives zero rows of its own width (not of width 0)."""
    g = moe_graph(experts=3, k=2, capacity=0)
    data = _data(n=12)
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64")
    hist = tr.fit(data, batch_size=12)
    st = hist.statistics["gate"]
    assert st.dropped_total == 24 and sum(st.expert_rows.values()) == 0
    assert_params_close(tr.params, reference_fit(g, start, [data], 2, "softmax", 0, 2), rtol=1e-10)
    logits = tr.predict({"x": data["x"][:5]})["logits"]
    head = g.nodes["head"].module(tr.params["head"], np.zeros((5, H)))
    np.testing.assert_array_equal(logits, head)
    assert tr.evaluate(data, batch_size=4)["loss"] > 0


@pytest.mark.parametrize(
    ("policy", "micro"),
    [
        pytest.param(policies.ZeroBubbleH1(3), 3, id="ZeroBubbleH1"),
        pytest.param(policies.ZeroBubbleH1(4, virtual=2), 4, id="ZeroBubbleH1-virtual2"),
        pytest.param(policies.Interleaved1F1B(4, virtual=3), 4, id="Interleaved1F1B-virtual3"),
    ],
)
def test_routing_under_the_interleaved_and_split_backward_policies(policy, micro):
    """Every policy runs a routed graph: ZB-H1's split backward too (the router's gate gradient
    is computed with its input half), with experts that get no rows in some keys."""
    g = moe_graph(experts=3, k=1, capacity=2)  # gate, e0, e1, e2, merge, head: 6 layers
    data = _data(n=20)  # minibatches of 8, 8 and 4 rows
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64")
    hist = tr.fit(data, batch_size=8)
    bs = [{n: v[lo : lo + 8] for n, v in data.items()} for lo in range(0, 20, 8)]
    assert_params_close(tr.params, reference_fit(g, start, bs, 1, "softmax", 2, micro), rtol=1e-10)
    assert sum(hist.statistics[f"e{i}"].skipped for i in range(3)) > 0
    for name in g.layers:
        st = hist.statistics[name]
        assert st.stored == 0 and st.backwards == st.forwards, name


@dataclass(frozen=True)
class BoolSignGate(nn.Module):
    """A condition as bools (x0 <= 0, x0 > 0): no scores to rank."""

    def init_params(self, init):
        return {}

    def __call__(self, params, x, *, rng=None):
        pos = ops.raw(x)[:, :1] > 0
        return np.concatenate([~pos, pos], axis=1)


def test_a_gate_that_gives_bools_is_refused_when_the_graph_is_built():
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("side", BoolSignGate(), x, experts=2, k=1, gates="none")
    outs = [g.layer(f"b{i}", nn.Linear(D, C), r) for i in range(2)]
    g.loss("loss", nn.CrossEntropyLoss(), g.merge("m", r, *outs), y)
    with pytest.raises(ann.GraphError, match=r"'side'.*scores of dtype bool.*astype"):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


@dataclass(frozen=True)
class NanGate(nn.Module):
    """Scores from the first two features, NaN from the third row on (the graph's check runs
    two rows, so only a key of more rows meets it)."""

    def init_params(self, init):
        return {}

    def __call__(self, params, x, *, rng=None):
        s = np.array(ops.raw(x)[:, :2])
        s[2:, 1] = np.nan
        return s


def _two_expert_graph(gate: Any, **kw: Any) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", gate, x, experts=2, k=1, **kw)
    outs = [g.layer(f"e{i}", nn.Linear(D, C), r) for i in range(2)]
    o = g.merge("merge", r, *outs)
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    g.output("logits", o)
    return g


@pytest.mark.parametrize("gates", ["softmax", "normalized", "none"])
def test_a_nan_gate_score_is_an_error_naming_the_router_not_a_silent_route(gates):
    # a NaN has no rank: argsort put it last, so with "normalized" weights the row went to the
    # other expert with a finite output, and the NaN went unnoticed
    tr = ann.Trainer(_two_expert_graph(NanGate(), gates=gates), optimizer=optim.SGD(lr=0.1),
                     policy=policies.Sync(), dtype="float64")  # fmt: skip
    data = _data(n=4)
    msg = r"router 'gate': the gate NanGate\(\) gave a NaN score \(row 2, expert 1\)"
    with pytest.raises(ann.ActorError, match=msg) as info:
        tr.fit(data, batch_size=4)
    assert info.value.actor == "gate"
    with pytest.raises(ValueError, match=msg):
        tr.predict({"x": data["x"]})


@dataclass(frozen=True)
class InfGate(nn.Module):
    """Scores from the first two features, +inf in the third row's second: a softmax of it is
    NaN (the router's own output)."""

    def init_params(self, init):
        return {}

    def __call__(self, params, x, *, rng=None):
        s = np.array(ops.raw(x)[:, :2])
        s[2:, 1] = np.inf
        return s


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_check_finite_names_the_router_whose_gate_weights_are_not_finite():
    # the router's forward went unchecked: the merge or the loss was named instead
    tr = ann.Trainer(_two_expert_graph(InfGate()), optimizer=optim.SGD(lr=0.1),
                     policy=policies.GPipe(2), dtype="float64", check_finite=True)  # fmt: skip
    with pytest.raises(ann.ActorError, match=r"'gate' produced NaN or Inf in its forward") as info:
        tr.fit(_data(n=8), batch_size=8)
    assert (info.value.actor, info.value.kind, info.value.key) == ("gate", "forward", 0)


V = 7


@pytest.mark.parametrize(
    "policy",
    [policies.Sync(), policies.ZeroBubbleH1(2), policies.PipeDream(1, stash=False)],
    ids=["Sync", "ZeroBubbleH1", "PipeDream-nostash"],
)
def test_integer_ids_routed_to_embedding_experts_equal_a_plain_loop_over_rows(policy):
    # the ids have no gradient: the router's backward built the input's gradient from the
    # stored input, which a stashing policy does not keep (TypeError on the backward)
    g = ann.Graph()
    tok = g.input("tok", (None,), dtype="int64")
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", nn.Embedding(V, 2), tok, experts=2, k=1)
    outs = [g.layer(f"e{i}", nn.Embedding(V, H), r) for i in range(2)]
    o = g.layer("head", nn.Linear(H, C), g.merge("m", r, *outs))
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    rng = np.random.default_rng(0)
    data = {"tok": rng.integers(0, V, 8), "y": rng.integers(0, C, 8)}
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64")
    tr.fit(data, batch_size=8)
    mods = {n: g.nodes[n].module for n in g.layers}

    def loss(p):
        total = 0.0
        for i in range(8):
            t = data["tok"][i : i + 1]
            s = mods["gate"].gate(p["gate"], t)
            e = int(np.argmax(ops.raw(s)[0]))
            w = ops.softmax(s, axis=-1)[:, e : e + 1]
            o = mods["head"](p["head"], mods[f"e{e}"](p[f"e{e}"], t) * w)
            total = total + nn.CrossEntropyLoss()({}, o, data["y"][i : i + 1])
        return total / 8

    ref, _ = optim.SGD(lr=0.1).update(start, ann.grad(loss)(start), optim.SGD(lr=0.1).init(start))
    assert_params_close(tr.params, ref, rtol=1e-10)


@pytest.mark.parametrize("reads", ["e1", "e1b", "gate"])
def test_an_output_reading_a_router_or_an_expert_branch_is_refused_naming_the_merge(reads):
    # predict failed with numpy's "setting an array element with a sequence": such a node
    # gets only the rows routed to it, a different set per key
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", nn.Linear(D, 2), x, experts=2, k=1)
    e0 = g.layer("e0", nn.Linear(D, C), r)
    e1 = g.layer("e1b", nn.Linear(D, C), g.layer("e1", nn.Linear(D, D), r))
    g.loss("loss", nn.CrossEntropyLoss(), g.merge("merge", r, e0, e1), y)
    g.output("out", reads)
    said = "router 'gate', whose value" if reads == "gate" else f"layer '{reads}' of an expert"
    with pytest.raises(
        ann.GraphError, match=rf"output 'out' reads {said}.*g\.output\('out', 'merge'\)"
    ):
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


@dataclass(frozen=True)
class CountGate(nn.Module):
    """Integer scores: each expert's count of features above its threshold (a condition's
    counts, no parameters), of ``dtype`` (``"float"``: the same numbers as floats)."""

    dtype: str

    def init_params(self, init):
        return {}

    def __call__(self, params, x, *, rng=None):
        raw = np.asarray(ops.raw(x))
        counts = np.stack([(raw > t).sum(axis=1) for t in (-0.5, 0.0, 0.5)], axis=1)
        return counts.astype(raw.dtype if self.dtype == "float" else self.dtype)


def _count_graph(kind: str, gates: str) -> ann.Graph:
    """A routed graph whose gate scores rows by counts of ``kind`` (an integer dtype, or
    "float": the same numbers as floats)."""
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", CountGate(kind), x, experts=3, k=2, gates=gates)
    outs = [g.layer(f"e{i}", nn.Sequential(nn.Linear(D, H), nn.Tanh()), r) for i in range(3)]
    o = g.layer("head", nn.Linear(H, C), g.merge("merge", r, *outs))
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    g.output("logits", o)
    return g


@pytest.mark.parametrize("dtype", ["int64", "uint8"])
@pytest.mark.parametrize("gates", ["softmax", "normalized", "none"])
def test_integer_gate_scores_route_and_weigh_as_their_float_values(gates, dtype):
    # the gate's scores are "numbers": integers failed at the first key with "softmax: x must
    # be floating point" (unless gates="none"), though the graph's check had let them pass;
    # unsigned ones were ranked negated, wrapped round: a count of 0 ranked first
    data = _data(n=12)
    runs = []
    for kind in (dtype, "float"):
        tr = ann.Trainer(_count_graph(kind, gates), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                         dtype="float64")  # fmt: skip
        hist = tr.fit(data, batch_size=6)
        runs.append((tr.params, hist.losses, tr.predict({"x": data["x"]})["logits"]))
    (p_int, l_int, o_int), (p_float, l_float, o_float) = runs
    assert_params_equal(p_int, p_float)
    assert l_int == l_float
    np.testing.assert_array_equal(o_int, o_float)
    tr = ann.Trainer(
        _count_graph(dtype, gates), optimizer=optim.SGD(lr=0.1), policy=policies.Sync()
    )
    tr.fit(data, batch_size=6)  # float32: the parameters stay float32
    assert {str(a.dtype) for a in ann._math._pytree.tree_leaves(tr.params)} == {"float32"}


@pytest.mark.parametrize("gates", ["softmax", "normalized", "none"])
def test_integer_gate_scores_in_a_float32_run_keep_every_message_float32(tmp_path, gates):
    # integer scores were weighed as float64: the merge sent its experts float64 gradients,
    # whose backward then ran in float64 (the parameters stayed float32 only through the cast
    # of the optimizer's update), and the results differed from the float scores' run
    data = _data(n=12)
    runs = []
    for kind in ("int64", "float"):
        path = str(tmp_path / f"{kind}.trace")
        tr = ann.Trainer(_count_graph(kind, gates), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2),
                         trace=path)  # fmt: skip
        hist = tr.fit(data, batch_size=6)
        sent = {(e.actor, e.kind, t["d"]) for e in ann.trace.read(path).events
                if e.what == "send" for t in e.tensors if t is not None}  # fmt: skip
        assert {s for s in sent if np.dtype(s[2]).kind == "f" and s[2] != "<f4"} == set()
        runs.append((tr.params, hist.losses, tr.predict({"x": data["x"]})["logits"]))
    (p_int, l_int, o_int), (p_float, l_float, o_float) = runs
    assert_params_equal(p_int, p_float)
    assert l_int == l_float
    np.testing.assert_array_equal(o_int, o_float)
