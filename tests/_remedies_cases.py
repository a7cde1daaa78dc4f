"""The sequential re-enactment of PipeDream that the staleness remedies are checked against, the
run it is compared with, and the update rules (spike compensation, PipeMare's rescheduled rate)
that tests/test_remedies.py, tests/test_remedies_prediction.py and tests/test_remedies_updates.py
share."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn, optim

from _reference import chain_graph, one_f_one_b_order


def _microbatches(data, batch_size, m):
    out = []
    n = len(data["y"])
    for lo in range(0, n, batch_size):
        b = {k: v[lo : lo + batch_size] for k, v in data.items()}
        for part in np.array_split(np.arange(len(b["y"])), min(m, len(b["y"]))):
            out.append({k: v[part[0] : part[-1] + 1] for k, v in b.items()})
    return out


def _tmap(fn, *trees):
    return ann._math._pytree.tree_map(fn, *trees)


def pipedream_with_correction(
    graph, params, lr, micro, stash, correct, predict=False, gamma=None, sgd_step=None,
    orders=None, every=1,
):  # fmt: skip
    """PipeDream re-enacted in sequence (1F1B over the stream, plain SGD after each backward),
    with ``correct(g, delay, version, w_now, w_forward) -> g`` applied to each gradient; with
    ``predict``, forwards use ``w + D * (w - w_before)`` after each update, D the stage's keys
    in flight (forwarded, backward to come) over ``every``: the mean of the updates the
    gradients of the forwards before the next update will wait for (linear weight prediction at
    the stage's delay, K - s - 1 under PipeDream); with ``gamma`` (and no stashing), a backward
    recomputes at ``w - delay * delta``, delta the stage's average weight change (PipeMare's
    discrepancy correction).
    ``sgd_step(s, w, g, delay) -> w``, where given, replaces the plain SGD step of stage ``s``.
    ``orders``, where given, replaces 1F1B: each stage's operations ``("F" | "B", key)`` in
    order (an ``Async`` run's, read from its trace). ``every``: a stage updates with the mean of
    each ``every`` gradients (``Async(min_update_frequency=every)``), ``delay`` their mean.

    Returns the final parameters and each stage's list of delays."""
    names = graph.layers
    k = len(names)
    p = [params[n] for n in names]
    version = [0] * k
    if orders is None:
        orders = [one_f_one_b_order(s, k, len(micro)) for s in range(k)]
    pos = [0] * k
    acts = {(0, i): mb["x"] for i, mb in enumerate(micro)}
    grads: dict[tuple[int, int], Any] = {}
    stored: dict[tuple[int, int], Any] = {}
    delays: list[list[int]] = [[] for _ in range(k)]
    predicted: list[Any] = [None] * k
    delta: list[Any] = [None] * k
    summed: list[list[Any]] = [[] for _ in range(k)]  # (gradient, delay) since the last update
    loss = nn.CrossEntropyLoss()

    def _update(s, parts):
        """Stage ``s``'s update with the mean of ``parts``' gradients (``(g, delay)`` each)."""
        gp, delay = parts[0] if every == 1 else (
            _tmap(lambda *gs: sum(gs) / every, *[g for g, _ in parts]),
            sum(d for _, d in parts) / every,
        )  # fmt: skip
        before = p[s]
        if sgd_step is None:
            p[s] = _tmap(lambda w, g: w - lr * g, p[s], gp)
        else:
            p[s] = sgd_step(s, p[s], gp, delay)
        version[s] += 1
        if predict:
            d = sum(1 for stage, _ in stored if stage == s) / every  # keys in flight / every
            predicted[s] = _tmap(lambda w, w0, d=d: w + d * (w - w0), p[s], before)
        if gamma is not None:
            change = _tmap(lambda w, w0: (1 - gamma) * (w - w0), p[s], before)
            delta[s] = (
                change if delta[s] is None else _tmap(lambda v, c: gamma * v + c, delta[s], change)
            )

    progressed = True
    while progressed:
        progressed = False
        for s in range(k):
            if pos[s] == len(orders[s]):
                continue
            kind, i = orders[s][pos[s]]
            module = graph.nodes[names[s]].module
            if kind == "F" and (s, i) in acts:
                x = acts.pop((s, i))
                w = predicted[s] if predicted[s] is not None else p[s]
                out = module(w, x)
                stored[(s, i)] = (x, w, version[s])
                if s + 1 < k:
                    acts[(s + 1, i)] = out
                else:
                    y = micro[i]["y"]
                    grads[(s, i)] = ann.grad(lambda o, y=y: loss({}, o, y))(out)
            elif kind == "B" and (s, i) in grads:
                g_out = grads.pop((s, i))
                x, w_fwd, v_fwd = stored.pop((s, i))
                w_grad = w_fwd if stash else p[s]
                delay = version[s] - v_fwd
                if gamma is not None and not stash and delta[s] is not None and delay:
                    w_grad = _tmap(lambda w, v, d=delay: w - d * v, p[s], delta[s])
                _, pb = ann.vjp(lambda q, x, module=module: module(q, x), w_grad, x)
                gp, gx = pb(g_out)
                if s > 0:
                    grads[(s - 1, i)] = gx
                delay = version[s] - v_fwd
                delays[s].append(delay)
                summed[s].append((correct(gp, delay, version[s], p[s], w_fwd), delay))
                if len(summed[s]) == every:
                    _update(s, summed[s])
                    summed[s] = []
            else:
                continue
            pos[s] += 1
            progressed = True
    assert all(pos[s] == len(orders[s]) for s in range(k))
    return dict(zip(names, p, strict=True)), delays


def _run(policy, k, data, batch_size=10, epochs=1, trace=None, optimizer=None):
    tr = ann.Trainer(
        chain_graph(k),
        optimizer=optimizer or optim.SGD(lr=0.1),
        policy=policy,
        dtype="float64",
        trace=trace,
    )
    start = tr.params
    hist = tr.fit(data, epochs=epochs, batch_size=batch_size)
    return tr, start, hist


def _trace_orders(path, names):
    """Each layer's operations ``("F" | "B", key)`` in the order its trace recorded them."""
    orders: dict[str, list[tuple[str, int]]] = {n: [] for n in names}
    for e in ann.trace.read(path).events:
        if e["a"] in orders and e["ev"] == "start" and e["k"] in ("forward", "backward"):
            orders[e["a"]].append(("F" if e["k"] == "forward" else "B", e["key"]))
    return [orders[n] for n in names]


def _spike_compensated_momentum(lr, m, wd, k, pipemare_warmup=None):
    """Kosson et al.'s spike compensation re-enacted step by step, per stage: with ``d = g + wd
    w`` and the momentum buffer ``v = d`` at the first update, else ``m v + d``, a gradient of
    delay ``D`` moves the weights by ``-lr (m**D v + (1 - m**D) / (1 - m) d)``. With
    ``pipemare_warmup`` (T), ``lr`` is PipeMare's rescheduled learning rate of each update."""
    buffers = [None] * k
    updates = [0] * k

    def step(s, w, g, delay):
        d = _tmap(lambda g, w: g + wd * w, g, w)
        v = d if buffers[s] is None else _tmap(lambda v, d: m * v + d, buffers[s], d)
        buffers[s] = v
        a = m**delay
        b = sum(m**j for j in range(delay))  # 1 + m + ... + m**(D-1): the missed steps
        eta = lr
        if pipemare_warmup is not None:
            eta = lr * max(delay, 1) ** -(1.0 - min(updates[s] / pipemare_warmup, 1.0))
        updates[s] += 1
        return _tmap(lambda w, v, d: w - eta * (a * v + b * d), w, v, d)

    return step


def _rescheduled(opt, k, warmup):
    """Each stage's optimizer updates with PipeMare's learning rate (Yang et al., T1): update
    ``j`` (0-based) of a stage, applying a gradient of delay ``d``, runs with ``lr * max(d, 1)
    ** -p``, ``p = 1 - min(j / T, 1)``; the optimizer's state (velocity, moments) goes on as
    the optimizer makes it."""
    states: list[Any] = [None] * k

    def step(s, w, g, delay):
        if states[s] is None:
            states[s] = opt.init(w)
        p = 1.0 - min(states[s]["step"] / warmup, 1.0)
        w, states[s] = dataclasses.replace(opt, lr=opt.lr * max(delay, 1) ** -p).update(
            w, g, states[s]
        )
        return w

    return step
