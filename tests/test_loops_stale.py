"""Loops under stale-weight policies (PipeDream, its remedies, 2BW, the interleaved and split
backward ones): the loop is a stage like any other, checked against a key-by-key reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

from _loops_cases import DC, C, Halt, _data, loop_graph, reference_fit, rnn_graph
from _reference import assert_params_close, forward_versions_1f1b, fresh_params


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
