"""Routing (sparse experts, branches): gradients equal a plain loop over the rows one by one.
(Stale weights are in test_routing_stale.py, what a router refuses or names in
test_routing_checks.py.)"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

from _reference import assert_params_close, assert_params_equal, fresh_params
from _routing_cases import C, D, H, _data, _row_choices, moe_graph, reference_fit

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
    # (predict and evaluate dropped those rows, merged to zeros, without a word)
    for call in (tr.predict, tr.evaluate):
        with pytest.raises(ValueError, match=r"router 'gate': a batch of 12 rows sends more rows "
                           r"than the capacity 1 allows to \{"):  # fmt: skip
            call(_data())
    tr.predict({"x": _data()["x"][:1]})  # one row, two experts: within capacity


def test_a_huge_capacity_factor_is_no_limit_and_never_overflows():
    # (1e308 passed the graph's check, then the capacity, 1e308 * rows * k / experts, overflowed
    # to inf at the first key: "OverflowError: cannot convert float infinity to integer")
    g = moe_graph(experts=3, k=2, capacity_factor=1e308)
    assert g.nodes["gate"].module.limit(12) == 12  # every row (each goes to an expert once)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    tr.fit(_data(), batch_size=12)
    ref = ann.Trainer(moe_graph(experts=3, k=2), optimizer=optim.SGD(lr=0.1),
                      policy=policies.Sync(), dtype="float64")  # fmt: skip
    ref.fit(_data(), batch_size=12)
    assert_params_equal(tr.params, ref.params)  # (no row dropped: as with no capacity)


def test_validation_of_a_routed_graph_routes_batches_of_the_runs_key_size():
    # (validation evaluated batches of 256 rows, whose capacity a run's 4-row keys never reach:
    # with on_overflow="error" the fit failed at its first epoch end, advising a batch size
    # fit has no argument for; with "drop" it scored rows dropped only there)
    g = moe_graph(experts=3, k=1, capacity=4, on_overflow="error")
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64")
    data = _data(n=24)
    hist = tr.fit(data, epochs=1, batch_size=8, validation_data=data)
    assert hist.epochs[0]["val_loss"] == tr.evaluate(data, batch_size=4)["loss"]


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


_DRAWN: list[np.random.Generator] = []  # a copy of the rng of each training call of DropGate


@dataclass(frozen=True)
class DropGate(nn.Module):
    """Scores ``Linear(dropout(x))`` (dropout on the gate's input); notes a copy of the
    generator each training call is given, as it is before the call draws."""

    experts: int
    p: float

    def init_params(self, init):
        return nn.Linear(D, self.experts).init_params(init)

    def __call__(self, params, x, *, rng=None):
        if rng is not None:
            _DRAWN.append(copy.deepcopy(rng))
        return nn.Linear(D, self.experts)(params, nn.Dropout(self.p)({}, x, rng=rng))


def _drop_gate_graph(p: float, experts: int = 3) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", DropGate(experts, p), x, experts=experts, k=1)
    outs = [g.layer(f"e{i}", nn.Linear(D, C), r) for i in range(experts)]
    g.loss("loss", nn.CrossEntropyLoss(), g.merge("merge", r, *outs), y)
    return g


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(policies.Sync(), id="Sync"),
        pytest.param(policies.PipeDream(1, stash=False), id="PipeDream-nostash"),
        pytest.param(policies.Async(max_active_keys=1), id="Async1"),
    ],
)
def test_a_stochastic_gate_draws_the_keys_masks_and_its_recompute_draws_them_again(policy):
    # the router gave its gate no rng: dropout (or noise) in a gate was inert in training
    from asyncnn._math._nn._routing import gate_weights, topk_experts

    g = _drop_gate_graph(0.5)
    data = _data(n=8)
    start = fresh_params(g)
    _DRAWN.clear()
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64", seed=0)
    tr.fit(data, batch_size=8)  # one key
    recomputes = not isinstance(policy, policies.Sync)  # (no pullback kept: the gate again)
    assert len(_DRAWN) == (2 if recomputes else 1)
    if recomputes:
        assert _DRAWN[0].bit_generator.state == _DRAWN[1].bit_generator.state
    stream = copy.deepcopy(_DRAWN[0])  # the key's stream, as the gate got it
    m = {n: g.nodes[n].module for n in g.layers}
    x = data["x"]

    def loss(p):  # the gate on the whole key, drawing from the same stream; dense experts
        s = m["gate"].gate(p["gate"], x, rng=stream)
        choice = topk_experts(np.asarray(ops.raw(s)), 1)
        w = gate_weights(s, choice, "softmax", np.dtype("float64"))
        out = 0.0
        for e in range(3):
            picked = (choice == e).astype(np.float64)  # (rows, 1)
            out = out + m[f"e{e}"](p[f"e{e}"], x) * (w * picked)
        return nn.CrossEntropyLoss()({}, out, data["y"])

    ref, _ = optim.SGD(lr=0.1).update(start, ann.grad(loss)(start), optim.SGD(lr=0.1).init(start))
    assert_params_close(tr.params, ref, rtol=1e-10)


def test_dropout_in_a_gate_trains_seeded_repeatably_and_leaves_evaluation_alone():
    data = _data(n=16)

    def fit(p: float, seed: int = 0) -> tuple[list[float], dict]:
        tr = ann.Trainer(_drop_gate_graph(p), optimizer=optim.SGD(lr=0.1),
                         policy=policies.GPipe(2), dtype="float64", seed=seed)  # fmt: skip
        return list(tr.fit(data, batch_size=8, epochs=2).losses), tr.params

    (dropped, params), (again, params_again) = fit(0.9), fit(0.9)
    inert, _ = fit(1e-12)
    assert dropped != inert  # p changes training
    assert dropped == again
    assert_params_equal(params, params_again)  # bit for bit, run to run
    assert fit(0.9, seed=1)[0] != dropped  # the masks follow the run's seed
    # evaluation draws nothing: the same as without dropout, at the same weights
    evaluated = [
        ann.Trainer(
            _drop_gate_graph(p),
            optimizer=optim.SGD(lr=0.1),
            policy=policies.Sync(),
            dtype="float64",
        ).evaluate(data)  # fmt: skip
        for p in (0.9, 1e-12)
    ]
    assert evaluated[0] == evaluated[1]


@pytest.mark.anyio
async def test_the_merge_counts_the_keys_it_holds_until_their_backward(tmp_path):
    # the merge keeps each key's gate weights, row picks and expert outputs until its
    # backward, but its statistics said it stored nothing (0 against the trace's 4)
    path = str(tmp_path / "moe.trace")
    data = _data(n=16)
    async with ann.open_run(moe_graph(k=2), optimizer=optim.SGD(lr=0.1),
                            policy=policies.GPipe(4), dtype="float32",
                            trace=path) as run:  # fmt: skip
        await run.step(data)
        await run.drain()
        stats = run.statistics()
    merge, head = stats["merge"], stats["head"]
    summary = ann.trace.summary(path)["actors"]
    assert merge.peak_stored == summary["merge"]["peak_stored"] == 4  # every key at once
    assert head.peak_stored == summary["head"]["peak_stored"] == 4
    assert (merge.stored, merge.stored_bytes) == (0, 0)  # each let go at its backward
    # 4 rows a key, k=2: the (4, 2) float32 weights, the int64 (row, column) picks of each of
    # a row's two experts, and the H-wide float32 output of each
    per_key = 4 * 2 * 4 + 4 * 2 * 2 * 8 + 4 * 2 * H * 4
    assert merge.peak_stored_bytes == 4 * per_key
    # its one (empty) version, as a parameterless layer's and as the trace counts it (its
    # statistics said 0)
    assert merge.peak_versions_held == summary["merge"]["peak_versions_held"] == 1
