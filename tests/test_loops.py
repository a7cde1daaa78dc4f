"""Loops: a cell feeding itself, rows of one key leaving at different steps; gradients equal a
plain loop over the instances one by one (BPTT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn.dynamic import RNNCell

from _reference import (
    assert_params_close,
    forward_versions_1f1b,
    fresh_params,
    microbatched_sgd,
)

T, DX, DC, H, C = 5, 3, 2, 4, 3


def rnn_graph(output: str = "last") -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, T, DX))
    c = g.input("c", (None, DC))
    lens = g.input("len", (None,), dtype="int64")
    y = g.input("y", (None,), dtype="int64") if output == "last" else g.input("y", (None, T, C))
    h0 = g.layer("enc", nn.Sequential(nn.Linear(DC, H), nn.Tanh()), c)
    xe = g.layer("embed", nn.Linear(DX, DX), x)
    h = g.loop("rnn", RNNCell(DX, H), h0, xe, lens, output=output)
    o = g.layer("head", nn.Linear(H, C), h)
    g.loss("loss", nn.CrossEntropyLoss() if output == "last" else nn.MSELoss(), o, y)
    g.output("logits", o)
    return g


def _data(n=8, seed=0, output="last"):
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, T + 1, n)
    lens[:3] = [0, T, 2]  # an empty sequence, a full one, a short one in the same key
    y = rng.integers(0, C, n) if output == "last" else rng.standard_normal((n, T, C))
    return {"x": rng.standard_normal((n, T, DX)), "c": rng.standard_normal((n, DC)),
            "len": lens, "y": y}  # fmt: skip


def reference_loss(g, p, d, lo, hi, output):
    """One instance at a time: its own number of steps, a plain Python loop."""
    m = {n: g.nodes[n].module for n in g.layers}
    cell = m["rnn"].cell
    total = 0.0
    for i in range(lo, hi):
        h = m["enc"](p["enc"], d["c"][i : i + 1])
        states = []
        for t in range(int(d["len"][i])):
            h = cell(p["rnn"], h, m["embed"](p["embed"], d["x"][i : i + 1, t]))
            states.append(h)
        if output == "last":
            total = total + nn.CrossEntropyLoss()({}, m["head"](p["head"], h), d["y"][i : i + 1])
        else:
            zeros = d["x"][i : i + 1, 0, :1] * 0 + np.zeros((1, H))
            seq = ops.stack(states + [zeros] * (T - len(states)), axis=1)
            o = m["head"](p["head"], seq)
            total = total + ops.sum(ops.square(o - d["y"][i : i + 1])) / (T * C)
    return total / (hi - lo)


def reference_fit(g, start, batches, microbatches, output="last", lr=0.1):
    return microbatched_sgd(
        start, batches, microbatches,
        lambda q, b, lo, hi: reference_loss(g, q, b, lo, hi, output), lr,
    )  # fmt: skip


POLICIES = [
    pytest.param(policies.Sync(), 1, 2, id="Sync"),
    pytest.param(policies.GPipe(2), 2, 2, id="GPipe2"),
    pytest.param(policies.OneFOneB(3), 3, 1, id="1F1B3"),
    pytest.param(policies.PipeDream(1, stash=True), 1, 1, id="PipeDream-stash"),
    pytest.param(policies.PipeDream(1, stash=False), 1, 1, id="PipeDream-nostash"),
    pytest.param(policies.Async(max_active_keys=1), 1, 2, id="Async1"),
]


@pytest.mark.parametrize(("policy", "micro", "batches"), POLICIES)
def test_bptt_equals_a_plain_loop_over_instances(policy, micro, batches):
    g = rnn_graph()
    data = _data(n=8 * batches)
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64")
    hist = tr.fit(data, batch_size=8)
    bs = [{k: v[i * 8 : (i + 1) * 8] for k, v in data.items()} for i in range(batches)]
    assert_params_close(tr.params, reference_fit(g, start, bs, micro), rtol=1e-10)
    st = hist.statistics["rnn"]
    assert st.row_steps == int(data["len"].sum())
    assert st.max_steps_seen == T


def test_all_states_output():
    g = rnn_graph(output="all")
    data = _data(output="all")
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64")
    tr.fit(data, batch_size=8)
    assert_params_close(tr.params, reference_fit(g, start, [data], 2, "all"), rtol=1e-10)


@dataclass(frozen=True)
class Halt(nn.Module):
    """Stops a row once its first state component exceeds 0.3 (no parameters)."""

    def init_params(self, init):
        return {}

    def __call__(self, params, h, *, rng=None):
        return ops.raw(h)[:, 0] > 0.3


@dataclass(frozen=True)
class Step(nn.Module):
    """``h <- tanh(h @ w + b)``: a cell without per-step input."""

    size: int

    def init_params(self, init):
        return {"w": init.normal((self.size, self.size), 0.8), "b": init.normal((self.size,), 0.5)}

    def __call__(self, params, h, *, rng=None):
        return ops.tanh(ops.add(ops.matmul(h, params["w"]), params["b"]))


def loop_graph(until: Any, name: str = "loop", size: int = H) -> ann.Graph:
    """An encoder, a loop ``name`` of :class:`Step` cells that runs until ``until`` says stop
    (at most 6 steps), then a head and a loss."""
    g = ann.Graph()
    c = g.input("c", (None, DC))
    y = g.input("y", (None,), dtype="int64")
    h0 = g.layer("enc", nn.Linear(DC, size), c)
    h = g.loop(name, Step(size), h0, until=until, max_steps=6)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("head", nn.Linear(size, C), h), y)
    return g


def test_stop_condition_carried_in_the_state():
    g = loop_graph(Halt())
    rng = np.random.default_rng(3)
    data = {"c": rng.standard_normal((10, DC)), "y": rng.integers(0, C, 10)}
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(2), dtype="float64")
    hist = tr.fit(data, batch_size=10)
    m = {n: g.nodes[n].module for n in g.layers}
    steps_taken = []

    def loss(p):
        total = 0.0
        steps_taken.clear()
        for half in np.array_split(np.arange(10), 2):
            for i in half:
                hh = m["enc"](p["enc"], data["c"][i : i + 1])
                taken = 0
                while taken < 6:
                    hh = m["loop"].cell(p["loop"], hh)
                    taken += 1
                    if float(ops.raw(hh)[0, 0]) > 0.3:
                        break
                steps_taken.append(taken)
                o = m["head"](p["head"], hh)
                total = total + nn.CrossEntropyLoss()({}, o, data["y"][i : i + 1]) / 10
        return total

    p = dict(start)
    ref, _ = optim.SGD(lr=0.1).update(p, ann.grad(loss)(p), optim.SGD(lr=0.1).init(p))
    assert_params_close(tr.params, ref, rtol=1e-10)
    assert len(set(steps_taken)) > 1  # rows left the loop at different steps
    assert hist.statistics["loop"].row_steps == sum(steps_taken)


def test_async_loop_replays_identically_and_runs_are_bit_identical(tmp_path):
    path = str(tmp_path / "rnn.trace")
    data = _data(n=32)
    tr = ann.Trainer(rnn_graph(), optimizer=optim.SGD(lr=0.05),
                     policy=policies.Async(max_active_keys=3), dtype="float64",
                     trace=path)  # fmt: skip
    tr.fit(data, batch_size=4)
    loops = [e for e in ann.trace.read(path).events if e["ev"] == "loop"]
    assert [sum(e["m"]["steps"]) for e in sorted(loops, key=lambda e: e["key"])] == [
        int(data["len"][i : i + 4].sum()) for i in range(0, 32, 4)
    ]
    rep = ann.replay(path)
    assert rep.identical, rep.first_divergence
    assert_params_close(rep.params, tr.params, rtol=0)
    runs = []
    for _ in range(2):
        t2 = ann.Trainer(rnn_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(4),
                         dtype="float32")  # fmt: skip
        t2.fit(data, batch_size=16)
        runs.append(t2.params)
    assert_params_close(runs[0], runs[1], rtol=0)


def test_bad_lengths_and_cycles_are_clear_errors():
    g = rnn_graph()
    data = _data()
    data["len"][4] = T + 2
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    with pytest.raises(ann.ActorError, match=r"loop 'rnn': lengths\[4\] = 7 is outside \[0, 5\]"):
        tr.fit(data, batch_size=8)
    spec = g.to_spec()
    assert ann.Graph.from_spec(spec).to_spec() == spec
    assert [e for e in spec["nodes"] if e["name"] == "rnn"][0]["recurrent"] is True
    cyclic: Any = {"nodes": [dict(e) for e in spec["nodes"]], "outputs": {}}
    for e in cyclic["nodes"]:
        if e["name"] == "embed":
            e["inputs"] = ["head"]  # reads a later node: a cycle through the head
    with pytest.raises(ann.GraphError, match=r"node 'embed' reads 'head', which comes after it"):
        ann.Graph.from_spec(cyclic)
    for e in cyclic["nodes"]:
        if e["name"] == "embed":
            e["inputs"] = ["embed"]
    with pytest.raises(ann.GraphError, match=r"node 'embed' reads itself: a cycle"):
        ann.Graph.from_spec(cyclic)
    marked = {"nodes": [dict(e) for e in spec["nodes"]], "outputs": {}}
    for e in marked["nodes"]:
        if e["name"] == "head":
            e["recurrent"] = True
    with pytest.raises(ann.GraphError, match="marked recurrent but is not a loop"):
        ann.Graph.from_spec(marked)
    g2 = ann.Graph()
    x = g2.input("x", (None, H))
    g2.layer("a", nn.Linear(H, H), x)
    with pytest.raises(ann.GraphError, match=r"layer 'b' reads its own output: a cycle"):
        g2.layer("b", nn.Linear(H, H), "b")
    with pytest.raises(ann.GraphError, match=r"loop 'l': Loop: without xs, give max_steps"):
        g2.loop("l", Step(H), x)
    with pytest.raises(ann.GraphError, match=r"layer 'rnn' .*turned a state of shape \(2, 4\)"):
        g3 = ann.Graph()
        c = g3.input("c", (None, H))
        y = g3.input("y", (None,), dtype="int64")
        h = g3.loop("rnn", nn.Linear(H, 2), c, max_steps=3)
        g3.loss("loss", nn.CrossEntropyLoss(), h, y)
        ann.Trainer(g3, optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


@dataclass(frozen=True)
class HaltShaped(nn.Module):
    """Halt's stop condition (a row stops once its first state component exceeds 0.3), given in
    the shape ``kind`` names: ``"rows"`` ``(rows,)``, ``"column"`` ``(rows, 1)`` (both one bool
    per row), or one the rule refuses: ``"wide"`` ``(rows, 2)``, ``"extra_row"``
    ``(rows + 1,)``, ``"batch"`` ``()`` (one value for the whole batch), ``"deep"``
    ``(rows, 1, 1)``; ``"squeezed"`` is ``(rows,)`` but ``()`` for a single row (a column
    squeezed), which a build's check on two rows cannot see."""

    kind: str

    def init_params(self, init):
        return {}

    def __call__(self, params, h, *, rng=None):
        first = ops.raw(h)[:, :1] > 0.3  # (rows, 1)
        return {
            "rows": lambda: first[:, 0],
            "column": lambda: first,
            "wide": lambda: np.concatenate([first, first], axis=1),
            "extra_row": lambda: np.concatenate([first[:, 0], first[:1, 0]]),
            "batch": lambda: np.asarray(first.all()),
            "deep": lambda: first[:, :, None],
            "squeezed": lambda: first.squeeze(),
        }[self.kind]()


def halting_graph(kind: str, size: int = H) -> ann.Graph:
    """A loop ``"walk"`` of :class:`Step` cells that runs until :class:`HaltShaped` (``kind``)
    says stop, at most 6 steps, then a head and a loss."""
    return loop_graph(HaltShaped(kind), "walk", size)


@pytest.mark.parametrize("policy", [policies.Sync(), policies.OneFOneB(2)], ids=["Sync", "1F1B2"])
def test_an_until_of_shape_rows_by_one_runs_as_one_of_shape_rows(policy):
    # (rows, 1) is one bool per row, as (rows,) is: the actor took it, but the graph's build
    # refused it (the dense check broadcast it against the rows' mask into (rows, rows))
    rng = np.random.default_rng(3)
    data = {"c": rng.standard_normal((10, DC)), "y": rng.integers(0, C, 10)}
    runs = {}
    for kind in ("rows", "column"):
        g = halting_graph(kind)
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64")
        hist = tr.fit(data, batch_size=10, epochs=2)
        runs[kind] = (tr.params, hist)
        h0 = g.nodes["enc"].module(tr.params["enc"], data["c"])
        runs[kind] += (np.asarray(ops.raw(g.nodes["walk"].module(tr.params["walk"], h0))),)
    (p_rows, h_rows, d_rows), (p_col, h_col, d_col) = runs["rows"], runs["column"]
    assert_params_close(p_col, p_rows, rtol=0)
    assert h_col.losses == h_rows.losses
    s_rows, s_col = h_rows.statistics["walk"], h_col.statistics["walk"]
    assert s_col.row_steps == s_rows.row_steps < 10 * 2 * s_rows.max_steps_seen  # rows halted
    np.testing.assert_array_equal(d_col, d_rows)  # the dense evaluation agrees too


@pytest.mark.parametrize(
    ("kind", "shape"),
    [("wide", r"\(2, 2\)"), ("extra_row", r"\(3,\)"), ("batch", r"\(\)"),
     ("deep", r"\(2, 1, 1\)")],
)  # fmt: skip
def test_an_until_of_another_shape_is_refused_when_the_graph_is_built(kind, shape):
    with pytest.raises(
        ann.GraphError,
        match=rf"layer 'walk' .*until HaltShaped\(kind='{kind}'\) gave a stop condition of "
        rf"shape {shape} for a state of shape \(2, 4\); it must give one bool per row, shape "
        r"\(2,\) or \(2, 1\)",
    ):
        ann.Trainer(halting_graph(kind), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def test_an_until_whose_shape_slips_past_the_build_is_refused_by_the_loop_actor():
    # squeezed, a column of one row is a scalar: the build's two rows give (2,), a key of one
    # row gives (), refused by the same rule, named by the loop's actor
    g = halting_graph("squeezed", size=DC)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64")
    rng = np.random.default_rng(0)
    data = {"c": rng.standard_normal((1, DC)), "y": rng.integers(0, C, 1)}
    with pytest.raises(
        ann.ActorError,
        match=r"loop 'walk': until HaltShaped\(kind='squeezed'\) gave a stop condition of shape "
        r"\(\) for a state of shape \(1, 2\); it must give one bool per row, shape \(1,\) or "
        r"\(1, 1\)",
    ) as info:
        tr.fit(data, batch_size=1)
    assert info.value.actor == "walk"


def test_a_keys_cost_counts_its_row_steps_so_long_unrolls_leave_the_event_loop():
    from asyncnn.dynamic import Loop, planned_row_steps

    lengths = np.array([0, 3, 6, 9], dtype=np.int64)  # 9 is over the 6 steps of xs: capped
    h, xs = np.zeros((4, 2)), np.zeros((4, 6, 3))
    loop = Loop(RNNCell(3, 2), has_xs=True, has_lengths=True)
    assert planned_row_steps(loop, [h, xs, lengths]) == 0 + 3 + 6 + 6
    assert planned_row_steps(Loop(RNNCell(3, 2), has_xs=True), [h, xs]) == 4 * 6
    assert planned_row_steps(Loop(RNNCell(3, 2), max_steps=5), [h]) == 4 * 5


# -- stale-weight policies: the loop is a stage like any other ------------------------------------
def _tmap(fn, *trees):
    return ann._math._pytree.tree_map(fn, *trees)


def _rnn_rows(cell, q, h0, xe, lens):
    """The loop's final states, row by row, each row its own number of steps (a plain loop)."""
    rows = []
    for i in range(len(lens)):
        h = h0[i : i + 1]
        for t in range(int(lens[i])):
            h = cell(q, h, xe[i : i + 1, t])
        rows.append(h)
    return ops.concatenate(rows, axis=0)


def _key_grads(g, wf, wb, d):
    """A key's parameter gradients, stage by stage (``rnn_graph()``'s four): the forward at the
    weights ``wf``, each stage's backward at ``wb`` from the inputs its forward got (a stashed
    backward has ``wb = wf``: the plain gradient), of the key's mean loss."""
    m = {n: g.nodes[n].module for n in g.layers}
    cell = m["rnn"].cell
    h0 = m["enc"](wf["enc"], d["c"])
    xe = m["embed"](wf["embed"], d["x"])
    h = _rnn_rows(cell, wf["rnn"], h0, xe, d["len"])
    o = m["head"](wf["head"], h)
    (g_o,) = ann.vjp(lambda o: nn.CrossEntropyLoss()({}, o, d["y"]), o)[1](1.0)
    g_head, g_h = ann.vjp(lambda q, a: m["head"](q, a), wb["head"], h)[1](g_o)
    rnn = lambda q, a, b: _rnn_rows(cell, q, a, b, d["len"])  # noqa: E731
    g_rnn, g_h0, g_xe = ann.vjp(rnn, wb["rnn"], h0, xe)[1](g_h)
    (g_enc,) = ann.vjp(lambda q: m["enc"](q, d["c"]), wb["enc"])[1](g_h0)
    (g_embed,) = ann.vjp(lambda q: m["embed"](q, d["x"]), wb["embed"])[1](g_xe)
    return {"enc": g_enc, "embed": g_embed, "rnn": g_rnn, "head": g_head}


def _stream_reference(g, start, keys, fwd_version, per_update, lr, stash=True, correct=None,
                      predict=False, decay=None):  # fmt: skip
    """``rnn_graph()`` trained on a stream of keys with stale weights, re-enacted key by key.

    Key ``i`` runs forward at stage ``s`` with version ``fwd_version(s, i)`` of that stage (or,
    with ``predict``, its linear prediction ``w + D * (w - w_before)``, D the keys in flight at
    the stage after the update that made ``w``). Stashed, its backward is at the forward's
    weights; else at the latest (with ``decay``, DiscrepancyCorrection's estimate ``w - d *
    delta`` of the forward's, delta the average weight change). Each stage applies
    ``per_update`` consecutive keys' gradients (``correct(g, d, w_now, w_fwd)`` first, ``d`` the
    delay) in one plain SGD update. ``keys`` are (data, weight of the key's mean loss)."""
    names = g.layers
    hist = {n: [start[n]] for n in names}  # every version of every stage
    delta: dict[str, Any] = {}
    acc: dict[str, Any] = {}

    def weights(s, name, v):
        w = hist[name][v]
        if predict and v > 0:
            # WeightPrediction's horizon: the keys in flight at the stage right after its
            # update v (forwarded before it, their gradient applied by a later update)
            dd = sum(1 for i in range(len(keys)) if fwd_version(s, i) < v <= i // per_update)
            w = _tmap(lambda a, b: a + dd * (a - b), w, hist[name][v - 1])
        return w

    for i, (d, scale) in enumerate(keys):
        update = i // per_update  # the update that applies key i's gradient
        used = {n: fwd_version(s, i) for s, n in enumerate(names)}
        wf = {n: weights(s, n, used[n]) for s, n in enumerate(names)}
        wb = dict(wf)
        if not stash:
            for n in names:
                wb[n], lag = hist[n][update], update - used[n]
                if decay is not None and n in delta and lag:
                    wb[n] = _tmap(lambda a, v, lag=lag: a - lag * v, wb[n], delta[n])
        grads = _key_grads(g, wf, wb, d)
        for n in names:
            gn = _tmap(lambda a, scale=scale: a * scale, grads[n])
            if correct is not None:
                gn = correct(gn, update - used[n], hist[n][update], hist[n][used[n]])
            acc[n] = gn if n not in acc else _tmap(lambda a, b: a + b, acc[n], gn)
        if (i + 1) % per_update == 0:
            for n in names:
                hist[n].append(_tmap(lambda a, b: a - lr * b, hist[n][-1], acc.pop(n)))
                if decay is not None:
                    ch = _tmap(lambda a, b: (1 - decay) * (a - b), hist[n][-1], hist[n][-2])
                    old = delta.get(n)
                    delta[n] = ch if old is None else _tmap(lambda a, c: decay * a + c, old, ch)
    return {n: hist[n][-1] for n in names}


def _assert_nothing_left(hist, g):
    for name in g.layers:
        st = hist.statistics[name]
        assert st.stored == 0 and st.stored_bytes == 0, name
        assert st.backwards == st.forwards, name


@pytest.mark.parametrize(
    ("remedy", "stash"),
    [
        pytest.param(None, True, id="PipeDream-stash"),
        pytest.param(None, False, id="PipeDream-nostash"),
        pytest.param("StalenessScaledLR", True, id="StalenessScaledLR"),
        pytest.param("DelayCompensation", True, id="DelayCompensation"),
        pytest.param("WeightPrediction", True, id="WeightPrediction"),
        pytest.param("DiscrepancyCorrection", False, id="DiscrepancyCorrection-nostash"),
    ],
)
def test_loop_under_pipedream_and_remedies_equals_a_key_by_key_reference(remedy, stash):
    """The loop is a stage like any other: its forward uses the weights the policy gives (a
    prediction), a recomputed backward the policy's estimate of the forward's, and its stale
    gradient is delayed, recorded and corrected like a layer's."""
    g = rnn_graph()  # enc, embed, rnn, head: 4 stages
    data = _data(n=24)
    start = fresh_params(g)
    inner = policies.PipeDream(2, stash=stash)
    kw: dict[str, Any] = {"stash": stash}
    if remedy == "StalenessScaledLR":
        policy: Any = policies.StalenessScaledLR(inner)
        kw["correct"] = lambda g, d, w, w0: _tmap(lambda a: a / max(d, 1), g)
    elif remedy == "DelayCompensation":
        policy = policies.DelayCompensation(inner, strength=0.5)
        kw["correct"] = lambda g, d, w, w0: _tmap(
            lambda a, b, c: a + 0.5 * a * a * (b - c), g, w, w0
        )
    elif remedy == "WeightPrediction":
        policy, kw["predict"] = policies.WeightPrediction(inner), True
    elif remedy == "DiscrepancyCorrection":
        policy, kw["decay"] = policies.DiscrepancyCorrection(inner, decay=0.5), 0.5
    else:
        policy = inner
    lr = 0.5 if remedy == "DiscrepancyCorrection" else 0.1  # larger steps: a larger correction
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=lr), policy=policy, dtype="float64", seed=0)
    hist = tr.fit(data, batch_size=6)  # 4 minibatches of 2 keys: a stream of 8 keys
    keys = [({k: v[lo : lo + 3] for k, v in data.items()}, 1.0) for lo in range(0, 24, 3)]
    fv = forward_versions_1f1b(4, 8)
    ref = _stream_reference(g, start, keys, lambda s, i: fv[s][i], 1, lr, **kw)
    assert_params_close(tr.params, ref, rtol=1e-10)
    # the loop's delays are those of stage 2: a warm-up of K - 1 - 2 = 1 forward
    assert hist.statistics["rnn"].delays == {0: 1, 1: 7}
    assert hist.statistics["rnn"].row_steps == int(data["len"].sum())
    _assert_nothing_left(hist, g)


def test_loop_under_pipedream_2bw_uses_the_double_buffered_version():
    """PipeDream-2BW: W(t+1) = W(t) - lr grad f_t(W(t-1)) for every stage, the loop too."""
    g = rnn_graph()
    data = _data(n=32)
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream2BW(4),
                     dtype="float64", seed=0)  # fmt: skip
    hist = tr.fit(data, batch_size=8)  # 4 minibatches of 4 keys of 2 rows
    keys = [({k: v[lo : lo + 2] for k, v in data.items()}, 0.25) for lo in range(0, 32, 2)]
    ref = _stream_reference(g, start, keys, lambda s, i: max(i // 4 - 1, 0), 4, 0.1)
    assert_params_close(tr.params, ref, rtol=1e-10)
    # a key none of whose rows takes a step has a zero gradient, with no delay (a skipped key's)
    stepping = [bool(d["len"].any()) for d, _ in keys]
    assert hist.statistics["rnn"].delays == {0: sum(stepping[:4]), 1: sum(stepping[4:])}
    assert hist.statistics["head"].delays == {0: 4, 1: 12}
    assert hist.statistics["rnn"].peak_versions_held <= 2
    _assert_nothing_left(hist, g)


@pytest.mark.parametrize(
    ("policy", "micro"),
    [
        pytest.param(policies.ZeroBubbleH1(3), 3, id="ZeroBubbleH1"),
        pytest.param(policies.ZeroBubbleH1(4, virtual=2), 4, id="ZeroBubbleH1-virtual2"),
        pytest.param(policies.Interleaved1F1B(4, virtual=2), 4, id="Interleaved1F1B-virtual2"),
    ],
)
def test_loop_under_the_interleaved_and_split_backward_policies(policy, micro):
    """Every policy runs a loop: ZB-H1's split backward too (the input half unwinds the steps
    for the inputs' gradients, the weight half finishes each step's parameter gradient)."""
    g = rnn_graph()
    data = _data(n=20)  # minibatches of 8, 8 and 4 rows
    start = fresh_params(g)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64")
    hist = tr.fit(data, batch_size=8)
    bs = [{k: v[lo : lo + 8] for k, v in data.items()} for lo in range(0, 20, 8)]
    assert_params_close(tr.params, reference_fit(g, start, bs, micro), rtol=1e-10)
    assert hist.statistics["rnn"].row_steps == int(data["len"].sum())
    # every key's gradient is fresh; a key none of whose rows takes a step has a zero gradient,
    # with no delay (a skipped key's)
    keys = [part for b in bs for part in np.array_split(b["len"], micro)]
    assert 0 < sum(not k.any() for k in keys)
    assert hist.statistics["rnn"].delays == {0: sum(bool(k.any()) for k in keys)}
    assert hist.statistics["head"].delays == {0: len(keys)}
    _assert_nothing_left(hist, g)


def test_a_loop_without_xs_splits_its_backward_bit_for_bit():
    """A cell without per-step input (and rows halting at different steps): ZB-H1's two halves
    give exactly the gradients of one backward (1F1B's, the same microbatches)."""
    rng = np.random.default_rng(3)
    data = {"c": rng.standard_normal((12, DC)), "y": rng.integers(0, C, 12)}
    runs = []
    for policy in (policies.OneFOneB(3), policies.ZeroBubbleH1(3)):
        g = loop_graph(Halt())
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64")
        hist = tr.fit(data, batch_size=6, epochs=2)
        _assert_nothing_left(hist, g)
        runs.append((tr.params, hist.losses))
    assert_params_close(runs[1][0], runs[0][0], rtol=0)
    assert runs[1][1] == runs[0][1]


def test_a_recomputed_backward_unwinds_the_steps_its_forward_took():
    """PipeDream(stash=False) recomputes a key's steps at the latest weights, over the rows its
    forward ran at each step: a row whose stop condition would fire at another step with the new
    weights still unwinds the forward's steps (the gradient of the output downstream got)."""
    g = loop_graph(Halt())
    rng = np.random.default_rng(3)
    data = {"c": rng.standard_normal((24, DC)), "y": rng.integers(0, C, 24)}
    start = fresh_params(g)
    lr = 1.0  # large steps: rows stop at other steps under the weights of the backward
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=lr), policy=policies.PipeDream(2, stash=False),
                     dtype="float64")  # fmt: skip
    hist = tr.fit(data, batch_size=6)  # a stream of 8 keys of 3 rows
    m = {n: g.nodes[n].module for n in g.layers}
    cell = m["loop"].cell

    def run(q, a, steps):
        out = []
        for i, n in enumerate(steps):
            hh = a[i : i + 1]
            for _ in range(n):
                hh = cell(q, hh)
            out.append(hh)
        return ops.concatenate(out, axis=0)

    def halting_steps(q, a):
        steps = []
        for i in range(len(a)):
            hh, n = a[i : i + 1], 0
            while n < 6:
                hh, n = cell(q, hh), n + 1
                if float(ops.raw(hh)[0, 0]) > 0.3:
                    break
            steps.append(n)
        return steps

    fv = forward_versions_1f1b(3, 8)
    hist_w = {n: [start[n]] for n in g.layers}
    changed = 0
    for i in range(8):
        cs, ys = data["c"][3 * i : 3 * i + 3], data["y"][3 * i : 3 * i + 3]
        wf = {n: hist_w[n][fv[s][i]] for s, n in enumerate(g.layers)}
        wb = {n: hist_w[n][i] for n in g.layers}  # the latest: key i's backward is update i
        a = m["enc"](wf["enc"], cs)
        steps = halting_steps(wf["loop"], a)
        changed += steps != halting_steps(wb["loop"], a)
        hf = run(wf["loop"], a, steps)
        o = m["head"](wf["head"], hf)
        (g_o,) = ann.vjp(lambda o, ys=ys: nn.CrossEntropyLoss()({}, o, ys), o)[1](1.0)
        g_head, g_h = ann.vjp(lambda q, b: m["head"](q, b), wb["head"], hf)[1](g_o)
        g_loop, g_a = ann.vjp(lambda q, b, s=steps: run(q, b, s), wb["loop"], a)[1](g_h)
        (g_enc,) = ann.vjp(lambda q, cs=cs: m["enc"](q, cs), wb["enc"])[1](g_a)
        grads = {"enc": g_enc, "loop": g_loop, "head": g_head}
        for n in g.layers:
            hist_w[n].append(_tmap(lambda w, d: w - lr * d, hist_w[n][-1], grads[n]))
    assert changed > 0  # some key's rows would stop at other steps under the latest weights
    assert_params_close(tr.params, {n: hist_w[n][-1] for n in g.layers}, rtol=1e-10)
    assert hist.statistics["loop"].delays == {0: 1, 1: 7}
    _assert_nothing_left(hist, g)


@dataclass(frozen=True)
class Blowup(nn.Module):
    """A cell whose ``kind`` goes wrong: ``"forward"`` gives Inf states; ``"backward"`` gives
    zero states (finite) but a NaN gradient (the square root of zero)."""

    kind: str

    def init_params(self, init):
        return {}

    def __call__(self, params, h, *, rng=None):
        if self.kind == "forward":
            return ops.add(h, np.inf)
        return ops.sqrt(ops.multiply(ops.multiply(h, h), 0.0))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NaN's making, on purpose
@pytest.mark.parametrize("policy", [policies.Sync(), policies.ZeroBubbleH1(2)], ids=["Sync", "ZB"])
@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_check_finite_names_the_loop_that_produced_nan_or_inf(kind, policy):
    # the loop's forward and backward went unchecked: the head (forward) or the encoder
    # (backward) was named instead
    g = ann.Graph()
    c = g.input("c", (None, DC))
    y = g.input("y", (None,), dtype="int64")
    h = g.loop("loop", Blowup(kind), g.layer("enc", nn.Linear(DC, H), c), max_steps=2)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("head", nn.Linear(H, C), h), y)
    rng = np.random.default_rng(0)
    data = {"c": rng.standard_normal((4, DC)), "y": rng.integers(0, C, 4)}
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64",
                     check_finite=True)  # fmt: skip
    with pytest.raises(ann.ActorError, match=rf"actor 'loop' produced NaN or Inf in its {kind}"):
        tr.fit(data, batch_size=4)


@dataclass(frozen=True)
class SqrtGain(nn.Module):
    """``h * (1 + sqrt(g))`` with ``g = 0``: finite states and input gradients, but an Inf
    gradient for ``g`` (the square root's slope at zero)."""

    size: int

    def init_params(self, init):
        return {"g": init.zeros((self.size,))}

    def __call__(self, params, h, *, rng=None):
        return ops.add(h, ops.multiply(h, ops.sqrt(params["g"])))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Inf's making, on purpose
@pytest.mark.parametrize("policy", [policies.Sync(), policies.ZeroBubbleH1(2)], ids=["Sync", "ZB"])
@pytest.mark.parametrize("first", ["layer", "loop"])
def test_check_finite_names_the_actor_and_parameter_whose_gradient_is_not_finite(first, policy):
    # parameter gradients went unchecked: a first layer (no input gradient formed) was named
    # only a step later, for the NaN forward its updated weights made
    g = ann.Graph()
    c = g.input("c", (None, DC))
    y = g.input("y", (None,), dtype="int64")
    if first == "layer":
        h = g.layer("first", SqrtGain(DC), c)
    else:
        h = g.loop("first", SqrtGain(DC), c, max_steps=2)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("head", nn.Linear(DC, C), h), y)
    rng = np.random.default_rng(0)
    data = {"c": rng.standard_normal((8, DC)), "y": rng.integers(0, C, 8)}
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64",
                     check_finite=True)  # fmt: skip
    msg = r"actor 'first' produced NaN or Inf in the gradient of its parameter params\['g'\]"
    with pytest.raises(ann.ActorError, match=msg) as info:
        tr.fit(data, batch_size=4)
    assert (info.value.actor, info.value.kind, info.value.key) == ("first", "backward", 0)


@dataclass(frozen=True)
class FloatHalt(nn.Module):
    """A probability of stopping (a sigmoid), not a decision."""

    def init_params(self, init):
        return {}

    def __call__(self, params, h, *, rng=None):
        return 1 / (1 + np.exp(-ops.raw(h)[:, 0]))


@dataclass(frozen=True)
class LearnedHalt(nn.Module):
    """A stop condition with a parameter (a threshold): until trains none."""

    def init_params(self, init):
        return {"t": init.zeros((1,))}

    def __call__(self, params, h, *, rng=None):
        return ops.raw(h)[:, 0] > params["t"][0]


@pytest.mark.parametrize(
    ("until", "said"),
    [
        # floats were cast to bools: a sigmoid's every value is true, so each row stopped after
        # one step, silently
        (
            FloatHalt(),
            r"layer 'loop' .*until FloatHalt\(\) gave a stop condition of dtype "
            r"float32; it must give bools .*compare, e\.g\. p > 0\.5",
        ),
        # the loop failed at the build with a bare KeyError: 't'
        (
            LearnedHalt(),
            r"loop 'loop': Loop: until LearnedHalt\(\) has parameters, but until is "
            r"called with none",
        ),
    ],
    ids=["floats", "parameters"],
)
def test_an_until_of_floats_or_with_parameters_is_refused_when_the_graph_is_built(until, said):
    with pytest.raises(ann.GraphError, match=said):
        ann.Trainer(loop_graph(until), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


@dataclass(frozen=True)
class Climb(nn.Module):
    """``h <- h + 0.1 tanh(h @ w) + 0.25 e0``: the first component climbs by at least 0.15 a
    step, so every row reaches :class:`Over` soon. Refuses a state that is over already (a
    finished row): only the rows still active may reach the cell."""

    size: int

    def init_params(self, init):
        return {"w": init.normal((self.size, self.size), 0.5)}

    def __call__(self, params, h, *, rng=None):
        if (np.asarray(ops.raw(h))[:, 0] > 1.0).any():
            raise ValueError("Climb: stepped a row that had finished")
        e0 = np.zeros(self.size)
        e0[0] = 0.25
        return ops.add(ops.add(h, ops.multiply(ops.tanh(ops.matmul(h, params["w"])), 0.1)), e0)


@dataclass(frozen=True)
class Over(nn.Module):
    def init_params(self, init):
        return {}

    def __call__(self, params, h, *, rng=None):
        return ops.raw(h)[:, :1] > 1.0


def _sent_forward(path, actor, like):
    """What ``actor`` sent on its forward of key 0, as recorded with ``trace_payloads="all"``."""
    (send,) = [e for e in ann.trace.read(path).events
               if e.actor == actor and e.what == "send" and e.kind == "forward" and e.key == 0]  # fmt: skip
    return np.frombuffer(send.payloads[0], dtype=like.dtype).reshape(like.shape)


@pytest.mark.parametrize("output", ["last", "all"])
@pytest.mark.parametrize("stop", ["until", "lengths"])
def test_predict_and_evaluate_step_the_active_rows_only_as_training_does(tmp_path, stop, output):
    # the plain evaluation (graph check, predict, evaluate) stepped every row to max_steps:
    # the cell ran on finished rows (Climb refuses them: the Trainer failed to build), and a
    # loop whose rows had all stopped went on (max_steps=10**6: 7 s to build a Trainer)
    rows = 8
    steps = T if stop == "lengths" else 10**6 if output == "last" else 40
    g = ann.Graph()
    c = g.input("c", (None, DC))
    y = g.input("y", (None,), dtype="int64")
    h0 = g.layer("enc", nn.Linear(DC, H), c)
    if stop == "until":
        h = g.loop("loop", Climb(H), h0, until=Over(), max_steps=steps, output=output)
    else:
        xs = g.input("xs", (None, T, DX))
        lens = g.input("len", (None,), dtype="int64")
        h = g.loop("loop", RNNCell(DX, H), h0, xs, lens, output=output)
    g.output("states", h)
    if output == "all":
        h = g.layer("flat", nn.Flatten(), h)
    width = H * (steps if output == "all" else 1)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("head", nn.Linear(width, C), h), y)
    rng = np.random.default_rng(4)
    data = {"c": rng.standard_normal((rows, DC)), "y": rng.integers(0, C, rows)}
    if stop == "lengths":
        data["xs"] = rng.standard_normal((rows, T, DX))
        data["len"] = np.array([0, T, 2, 1, 3, T, 0, 4])
    path = str(tmp_path / "loop.trace")
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64",
                     trace=path, trace_payloads="all")  # fmt: skip
    states = tr.predict({k: v for k, v in data.items() if k != "y"}, batch_size=rows)["states"]
    evaluated = tr.evaluate(data, batch_size=rows)["loss"]
    hist = tr.fit(data, batch_size=rows)  # one key, at the weights predict and evaluate used
    np.testing.assert_array_equal(states, _sent_forward(path, "loop", states))
    assert evaluated == hist.losses[0]  # (8 rows: the mean's scaling is exact)
    (loop,) = [e for e in ann.trace.read(path).events if e["ev"] == "loop"]
    taken = loop["m"]["steps"]
    assert len(set(taken)) > 2 and max(taken) <= min(steps, 40)  # rows left at different steps
    m = {n: g.nodes[n].module for n in g.layers}

    def loss(p):  # the plain evaluation is differentiable: its gradient is training's
        extra = [data["xs"], data["len"]] if stop == "lengths" else []
        h = m["loop"](p["loop"], m["enc"](p["enc"], data["c"]), *extra)
        h = m["flat"](p["flat"], h) if output == "all" else h
        return nn.CrossEntropyLoss()({}, m["head"](p["head"], h), data["y"])

    start = fresh_params(g)
    ref, _ = optim.SGD(lr=0.1).update(start, ann.grad(loss)(start), optim.SGD(lr=0.1).init(start))
    assert_params_close(tr.params, ref, rtol=1e-10)


def test_a_traced_loop_event_records_the_version_its_steps_computed_with(tmp_path):
    # (it recorded the latest version, where PipeDream2BW pins the one before the last update)
    path = str(tmp_path / "rnn.trace")
    tr = ann.Trainer(rnn_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream2BW(4),
                     dtype="float64", trace=path)  # fmt: skip
    tr.fit(_data(n=32), batch_size=8)  # 4 minibatches of 4 keys
    events = ann.trace.read(path).events
    starts = {e["key"]: e["v"] for e in events
              if e["ev"] == "start" and e["a"] == "rnn" and e["k"] == "forward"}  # fmt: skip
    loops = {e["key"]: e["v"] for e in events if e["ev"] == "loop"}
    assert loops == starts
    # minibatch m computes with version m - 1 (the first two with the starting version 0)
    assert [loops[k] for k in sorted(loops)] == [0] * 8 + [1] * 4 + [2] * 4
