"""A router under stale weights: PipeDream and its remedies, PipeDream-2BW and discrepancy
correction, each against a key-by-key re-enactment (the gate is a stage like any other)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

from _reference import assert_params_close, forward_versions_1f1b, fresh_params
from _routing_cases import D, _data, moe_graph, reference_loss


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
