"""Gradient delays (statistics, trace) and the staleness remedies (asyncnn/_runtime/_remedies.py),
each against an independent sequential re-enactment of its paper's rule on PipeDream's known
delays, and on the order each layer of an Async run recorded in its trace."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import (
    assert_params_close,
    chain_graph,
    classification_data,
    minibatches,
    one_f_one_b_order,
)


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


# -- delays ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,m", [(2, 3), (3, 2), (4, 3)])
def test_pipedream_delays_are_the_warmup_of_each_stage(k, m, tmp_path):
    data = classification_data(30)
    tr, _, hist = _run(policies.PipeDream(m), k, data, trace=tmp_path / "run.trace")
    keys = 3 * m
    for s, name in enumerate(tr.graph.layers):
        want = Counter(min(i, k - s - 1) for i in range(keys))  # key i waits min(i, w) updates
        st = hist.statistics[name]
        assert st.delays == dict(want), name
        assert st.max_delay == k - s - 1
        assert st.mean_delay == pytest.approx(sum(d * c for d, c in want.items()) / keys)
    # the trace: each update event lists the delays of the gradients it applied
    events = ann.trace.read(tmp_path / "run.trace").events
    for s, name in enumerate(tr.graph.layers):
        ups = [e["m"]["delays"] for e in events if e["a"] == name and e["ev"] == "update"]
        assert ups == [[min(i, k - s - 1)] for i in range(keys)]


def test_flush_policies_have_no_delay_and_async_reports_its_own(tmp_path):
    data = classification_data(24)
    for policy in [policies.Sync(), policies.GPipe(3), policies.OneFOneB(4)]:
        tr, _, hist = _run(policy, 3, data, batch_size=8)
        for name in tr.graph.layers:
            st = hist.statistics[name]
            assert st.max_delay == 0 and st.mean_delay == 0.0
            assert st.delays == {0: st.backwards}
    tr, _, hist = _run(policies.Async(max_active_keys=3, min_update_frequency=2), 3, data, 4)
    for name in tr.graph.layers:
        st = hist.statistics[name]
        assert sum(st.delays.values()) == st.backwards == 6
        assert st.max_delay <= 2  # at most 3 keys in flight, an update every 2 gradients
        assert st.as_dict()["delays"] == st.delays


# -- remedies against their formulas ---------------------------------------------------------------
def _dc(lam):
    return lambda g, d, v, w, w0: _tmap(lambda g, w, w0: g + lam * g * g * (w - w0), g, w, w0)


def _staleness(g, d, v, w, w0):
    return _tmap(lambda g: g / max(d, 1), g)


def _pipemare(warmup):
    # with plain SGD (no momentum, no weight decay) rescheduling the learning rate is scaling
    # the gradient; test_pipemare_reschedules_the_learning_rate_of_any_optimizer has the others
    def correct(g, d, v, w, w0):
        p = 1.0 - min(v / warmup, 1.0)
        return _tmap(lambda g: g * max(d, 1) ** (-p), g)

    return correct


REMEDIES = {
    "dc": (lambda inner: policies.DelayCompensation(inner, strength=2.0), _dc(2.0)),
    "staleness": (policies.StalenessScaledLR, _staleness),
    "pipemare": (lambda inner: policies.PipeMareLR(inner, warmup_updates=5), _pipemare(5)),
    "dc+staleness": (
        lambda inner: policies.DelayCompensation(policies.StalenessScaledLR(inner), strength=2.0),
        lambda g, d, v, w, w0: _dc(2.0)(_staleness(g, d, v, w, w0), d, v, w, w0),
    ),
}


@pytest.mark.parametrize("stash", [True, False])
@pytest.mark.parametrize("k,m", [(3, 2), (4, 3)])
@pytest.mark.parametrize("remedy", sorted(REMEDIES))
def test_remedy_equals_its_formula_on_pipedream(remedy, k, m, stash):
    make, formula = REMEDIES[remedy]
    data = classification_data(30)
    tr, start, hist = _run(make(policies.PipeDream(m, stash=stash)), k, data, epochs=2)
    micro = _microbatches(data, 10, m) * 2
    ref, delays = pipedream_with_correction(tr.graph, start, 0.1, micro, stash, formula)
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    for s, name in enumerate(tr.graph.layers):
        assert hist.statistics[name].delays == dict(Counter(delays[s]))
    # and the remedy changed something: plain PipeDream ends elsewhere
    plain, _ = pipedream_with_correction(tr.graph, start, 0.1, micro, stash, lambda g, *a: g)
    leaves = ann._math._pytree.tree_leaves
    first = tr.graph.layers[0]
    assert not np.allclose(leaves(plain[first])[0], leaves(ref[first])[0], rtol=1e-6)


def test_remedies_change_nothing_without_delay():
    data = classification_data(24)
    want, _, _ = _run(policies.OneFOneB(3), 3, data, batch_size=8)
    for make, _ in REMEDIES.values():
        got, _, _ = _run(make(policies.OneFOneB(3)), 3, data, batch_size=8)
        assert_params_close(got.params, want.params, rtol=0, atol=0)


def test_remedy_keeps_only_the_versions_stored_keys_reference():
    from asyncnn._runtime._actors import LayerActor

    kept: dict[str, int] = {}

    class Recording(LayerActor):
        async def apply_gradients(self, grads):
            await super().apply_gradients(grads)
            held = set(self.weights_by_version)
            assert held <= set(self.version_refs), (self.name, held, self.version_refs)
            kept[self.name] = max(kept.get(self.name, 0), len(held))

    k = 4
    g = ann.Graph()
    h = g.input("x", shape=(None, 5), dtype="float64")
    y = g.input("y", shape=(None,), dtype="int64")
    for s in range(k):
        last = s == k - 1
        mod = (
            nn.Linear(6, 3) if last else nn.Sequential(nn.Linear(5 if s == 0 else 6, 6), nn.Tanh())
        )
        h = g.layer(f"stage{s}", mod, h, actor=Recording)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    for stash in (True, False):
        kept.clear()
        policy = policies.DelayCompensation(policies.PipeDream(3, stash=stash))
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64")
        hist = tr.fit(classification_data(30), epochs=1, batch_size=10)
        for s, name in enumerate(g.layers):
            # stage s has at most K - s keys stored, of K - s - 1 older versions at most
            assert kept[name] <= k - s - 1, (stash, name, kept)
            assert hist.statistics[name].peak_versions_held <= k - s
        assert kept["stage0"] == k - 1  # in steady state: the versions of 3 keys in flight


def test_remedy_specs_round_trip_delegate_and_validate():
    inner = policies.PipeDream(4, stash=False)
    for p in [
        policies.DelayCompensation(inner, strength=0.1),
        policies.StalenessScaledLR(policies.Async(8, 2)),
        policies.PipeMareLR(policies.DelayCompensation(inner), warmup_updates=50),
    ]:
        spec = p.to_spec()
        assert policies.policy_from_spec(spec) == p
        assert p.corrects_gradients() and not p.allows_capture(1, traced=False)
    p = policies.DelayCompensation(inner)
    assert p.deterministic and not p.flush
    assert not policies.StalenessScaledLR(policies.Async(4)).deterministic
    assert policies.PipeMareLR(policies.Sync()).flush
    assert p.microbatches == 4 and not p.stash and not p.keeps_pullback()
    assert p.max_in_flight(3) == 3 and p.update_due(1, False) and p.loss_cotangent(1, 4) == 1.0
    assert (
        p.needs_forward_weights() and not policies.StalenessScaledLR(inner).needs_forward_weights()
    )
    assert policies.StalenessScaledLR(p).needs_forward_weights()
    with pytest.raises(ValueError, match="strength"):
        policies.DelayCompensation(inner, strength=-1.0)
    for bad in (float("inf"), float("nan"), True, "0.1"):  # inf would make the weights NaN
        with pytest.raises(ValueError, match=r"strength=.* must be a finite number >= 0"):
            policies.DelayCompensation(inner, strength=bad)
    with pytest.raises(ValueError, match="warmup_updates"):
        policies.PipeMareLR(inner, warmup_updates=0)
    with pytest.raises(TypeError, match="must be a Policy"):
        policies.StalenessScaledLR("PipeDream")  # type: ignore[arg-type]


@pytest.mark.parametrize("inner", [policies.Async(3, 1), policies.PipeDream(3)], ids=str)
def test_a_remedied_run_replays_exactly(inner, tmp_path):
    data = classification_data(24)
    path = tmp_path / "run.trace"
    policy = policies.DelayCompensation(policies.StalenessScaledLR(inner), strength=1.0)
    tr, _, _ = _run(policy, 3, data, batch_size=4, trace=path)
    result = ann.replay(path)
    assert_params_close(result.params, tr.params, rtol=0, atol=0)


@pytest.mark.parametrize("stash", [True, False])
@pytest.mark.parametrize("k,m", [(3, 2), (4, 3)])
def test_weight_prediction_equals_its_formula_on_pipedream(k, m, stash):
    data = classification_data(30)
    policy = policies.WeightPrediction(policies.PipeDream(m, stash=stash))
    tr, start, hist = _run(policy, k, data, epochs=2)
    micro = _microbatches(data, 10, m) * 2
    ident = lambda g, *a: g  # noqa: E731
    ref, delays = pipedream_with_correction(tr.graph, start, 0.1, micro, stash, ident, True)
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    plain, _ = pipedream_with_correction(tr.graph, start, 0.1, micro, stash, ident, False)
    leaves = ann._math._pytree.tree_leaves
    first = tr.graph.layers[0]
    assert not np.allclose(leaves(plain[first])[0], leaves(ref[first])[0], rtol=1e-6)
    assert policies.policy_from_spec(policy.to_spec()) == policy
    assert policy.predicts_weights() and not policy.corrects_gradients()


def test_weight_prediction_extrapolates_by_the_stage_delay_from_the_first_update(monkeypatch):
    """The horizon is the delay the gradient of the stage's next forward will have: under
    PipeDream K - s - 1 from the stage's first update of a fit (the delay of the last gradient
    applied, which it used to be, is 0, 1, ... over the warm-up), then less as the stream ends
    (no forward follows)."""
    from asyncnn._runtime._weight_versions import WeightVersions

    seen: dict[str, list[int]] = {}
    horizon = WeightVersions._prediction_horizon

    def recorded(self):
        seen.setdefault(self.name, []).append(horizon(self))
        return seen[self.name][-1]

    monkeypatch.setattr(WeightVersions, "_prediction_horizon", recorded)
    k, keys = 4, 9  # 3 minibatches of 3 keys, one stream
    tr, _, _ = _run(policies.WeightPrediction(policies.PipeDream(3)), k, classification_data(30))
    for s, name in enumerate(tr.graph.layers):
        w = k - s - 1
        assert seen[name] == [min(w, keys - u) for u in range(1, keys + 1)], name
    assert seen["stage0"][:4] == [3, 3, 3, 3]  # was [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("policy", "in_flight", "want"),
    [
        (policies.PipeDream(4), [0, 1, 2, 3], [0, 1, 2, 3]),
        (policies.Async(8, min_update_frequency=1), [0, 1, 5], [0, 1, 5]),
        (policies.Async(8, min_update_frequency=2), [0, 1, 2, 3], [0, 0.5, 1, 1.5]),
        (policies.Async(8, min_update_frequency=3), [1, 3, 7], [1 / 3, 1, 7 / 3]),
        (policies.OneFOneB(4), [0], [0]),  # a flush: nothing in flight at an update
        (policies.PipeDream2BW(4), [0, 2], [0, 0]),  # updates only when a minibatch is done
    ],
    ids=["PipeDream", "Async-F1", "Async-F2", "Async-F3", "OneFOneB", "PipeDream2BW"],
)
def test_the_prediction_horizon_is_the_keys_in_flight_over_the_gradients_per_update(
    policy, in_flight, want
):
    """Right after an update with ``n`` keys in flight at the stage, the ``j``-th forward that
    follows (one per backward) waits for ``(n + j) // F`` updates under
    Async(min_update_frequency=F): ``n / F`` on average over the ``F`` forwards before the next
    update, which all use the prediction; ``n`` under PipeDream (an update per gradient)."""
    from types import SimpleNamespace

    from asyncnn._runtime._weight_versions import WeightVersions

    f = 1 if isinstance(policy, policies.PipeDream) else getattr(policy, "min_update_frequency", 0)
    for n, horizon in zip(in_flight, want, strict=True):
        if f:  # the hand count: the mean over the F forwards of their updates to wait for
            assert sum((n + j) // f for j in range(f)) / f == pytest.approx(horizon)
        actor = WeightVersions.__new__(WeightVersions)
        actor.ctx = SimpleNamespace(policy=policy)  # (only update_due is asked)
        actor.store = {key: (None, 0, None) for key in range(10, 10 + n)}
        actor.skipped = set()
        assert actor._prediction_horizon() == pytest.approx(horizon), (policy, n)


@pytest.mark.anyio
async def test_weight_prediction_under_async_every_f_gradients_equals_its_formula(
    anyio_backend, tmp_path
):
    """Async(min_update_frequency=2): each update applies the mean of 2 gradients, and the
    forwards after it use the weights extrapolated by n / 2 updates, n the keys in flight at
    the stage; re-enacted on the order the trace recorded."""
    k = 3
    graph = chain_graph(k)
    batches = minibatches(classification_data(36), 4)  # 9 keys: 4 updates a stage, 1 left
    path = str(tmp_path / "run.trace")
    policy = policies.WeightPrediction(policies.Async(max_active_keys=3, min_update_frequency=2))
    opt = optim.SGD(lr=0.1)
    async with ann.open_run(graph, opt, policy, dtype="float64", trace=path) as run:
        start = run.state().params
        for b in batches:
            await run.step(b)
        await run.drain()
    orders = _trace_orders(path, graph.layers)
    ident = lambda g, *a: g  # noqa: E731
    ref, _ = pipedream_with_correction(
        graph, start, 0.1, batches, False, ident, predict=True, orders=orders, every=2
    )
    assert_params_close(run.state().params, ref, rtol=1e-10, atol=1e-12)
    plain, _ = pipedream_with_correction(graph, start, 0.1, batches, False, ident, orders=orders,
                                         every=2)  # fmt: skip
    first = graph.layers[0]
    leaves = ann._math._pytree.tree_leaves
    assert not np.allclose(leaves(plain[first])[0], leaves(ref[first])[0], rtol=1e-6)


@pytest.mark.parametrize(
    "policy",
    [policies.PipeDream2BW(3), policies.WeightPrediction(policies.PipeDream(3))],
    ids=["2bw", "prediction"],
)
def test_an_on_forward_that_ignores_forward_weights_fails_clearly(policy, monkeypatch):
    from asyncnn._runtime._actors import LayerActor

    async def plain_on_forward(self, key, inputs, meta):  # computes at self.params, asks nothing
        out = await self.compute(self._apply, self.params, inputs, None)
        self._hold(key, (None, self.version, inputs), inputs, out)
        return out

    monkeypatch.setattr(LayerActor, "on_forward", plain_on_forward)
    with pytest.raises(Exception, match="without asking forward_weights"):
        _run(policy, 3, classification_data(30))


@pytest.mark.parametrize("k,m", [(3, 2), (4, 3)])
def test_discrepancy_correction_equals_its_formula_on_pipedream(k, m):
    data = classification_data(30)
    policy = policies.DiscrepancyCorrection(policies.PipeDream(m, stash=False), decay=0.8)
    tr, start, _ = _run(policy, k, data, epochs=2)
    micro = _microbatches(data, 10, m) * 2
    ident = lambda g, *a: g  # noqa: E731
    ref, _ = pipedream_with_correction(tr.graph, start, 0.1, micro, False, ident, gamma=0.8)
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    plain, _ = pipedream_with_correction(tr.graph, start, 0.1, micro, False, ident)
    leaves = ann._math._pytree.tree_leaves
    first = tr.graph.layers[0]
    assert not np.allclose(leaves(plain[first])[0], leaves(ref[first])[0], rtol=1e-6)
    assert policies.policy_from_spec(policy.to_spec()) == policy
    # with stashing it changes nothing: the backward already uses the forward's weights
    stashed, _, _ = _run(policies.DiscrepancyCorrection(policies.PipeDream(m)), k, data, epochs=2)
    want, _, _ = _run(policies.PipeDream(m), k, data, epochs=2)
    assert_params_close(stashed.params, want.params, rtol=0, atol=0)
    with pytest.raises(ValueError, match="decay must be in"):
        policies.DiscrepancyCorrection(policies.PipeDream(m), decay=1.0)


# -- spike compensation ----------------------------------------------------------------------------
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


def _assert_follows(tr, hist, ref, delays, plain_policy, k, data, opt):
    """The run's weights are the reference's, its delays the reference's, and the same run
    without the remedy (``plain_policy``) ends elsewhere (so the remedy acted)."""
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    for s, name in enumerate(tr.graph.layers):
        assert hist.statistics[name].delays == dict(Counter(delays[s]))
    plain = _run(plain_policy, k, data, epochs=2, optimizer=opt)[0]
    first = tr.graph.layers[0]
    leaves = ann._math._pytree.tree_leaves
    assert not np.allclose(leaves(plain.params[first])[0], leaves(ref[first])[0], rtol=1e-6)


@pytest.mark.parametrize("stash", [True, False])
@pytest.mark.parametrize("k,m", [(3, 2), (4, 3)])
def test_spike_compensation_equals_its_formula_on_pipedream(k, m, stash):
    data = classification_data(30)
    opt = optim.SGD(lr=0.05, momentum=0.9, weight_decay=0.01)
    policy = policies.SpikeCompensation(policies.PipeDream(m, stash=stash))
    tr, start, hist = _run(policy, k, data, epochs=2, optimizer=opt)
    micro = _microbatches(data, 10, m) * 2
    ident = lambda g, *a: g  # noqa: E731
    step = _spike_compensated_momentum(0.05, 0.9, 0.01, k)
    ref, delays = pipedream_with_correction(
        tr.graph, start, 0.05, micro, stash, ident, sgd_step=step
    )
    # without the compensation (plain momentum) the weights end elsewhere
    _assert_follows(tr, hist, ref, delays, policies.PipeDream(m, stash=stash), k, data, opt)
    assert policies.policy_from_spec(policy.to_spec()) == policy
    assert policy.corrects_updates() and not policy.corrects_gradients()
    assert policies.Replay(policy, {}).corrects_updates()


def test_spike_compensation_changes_nothing_without_delay_and_needs_plain_sgd():
    data = classification_data(24)
    opt = optim.SGD(lr=0.1, momentum=0.9)
    want, _, _ = _run(policies.OneFOneB(3), 3, data, batch_size=8, optimizer=opt)
    got, _, _ = _run(
        policies.SpikeCompensation(policies.OneFOneB(3)), 3, data, batch_size=8, optimizer=opt
    )
    assert_params_close(got.params, want.params, rtol=0, atol=0)
    with pytest.raises(ann.ActorError, match="SpikeCompensation corrects the step of optim.SGD"):
        _run(policies.SpikeCompensation(policies.PipeDream(2)), 2, data, optimizer=optim.Adam())


# -- PipeMare's learning-rate rescheduling: the step's rate, whatever the optimizer ---------------
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


@pytest.mark.parametrize("stash", [True, False])
@pytest.mark.parametrize(
    "opt",
    [optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01), optim.Adam(lr=0.01, weight_decay=0.01)],
    ids=["sgd-momentum-decay", "adam"],
)
def test_pipemare_reschedules_the_learning_rate_of_any_optimizer(opt, stash):
    """PipeMare scales the learning rate of a stage's update, so the whole step: the momentum's
    and the weight decay's part too, and Adam's step (scaling the gradient instead would leave
    the weight decay alone, let the velocity carry the scale into later steps, and all but
    vanish in Adam's normalisation)."""
    data = classification_data(30)
    k, m, warmup = 4, 3, 5  # 20 updates a stage: the damping fades out over the first 5
    policy = policies.PipeMareLR(policies.PipeDream(m, stash=stash), warmup_updates=warmup)
    tr, start, hist = _run(policy, k, data, epochs=2, optimizer=opt)
    micro = _microbatches(data, 10, m) * 2
    ident = lambda g, *a: g  # noqa: E731
    step = _rescheduled(opt, k, warmup)
    ref, delays = pipedream_with_correction(
        tr.graph, start, None, micro, stash, ident, sgd_step=step
    )
    _assert_follows(tr, hist, ref, delays, policies.PipeDream(m, stash=stash), k, data, opt)
    assert policy.corrects_updates() and not policy.corrects_gradients()
    assert policy.scale(3, 0) == pytest.approx(1 / 3) and policy.scale(3, warmup) == 1.0
    assert policy.scale(0, 0) == policy.scale(1, 0) == 1.0  # delay 0 or 1: not damped


def test_pipemare_around_spike_compensation_rescales_the_compensated_step():
    data = classification_data(30)
    k, m, warmup = 4, 3, 5
    opt = optim.SGD(lr=0.05, momentum=0.9, weight_decay=0.01)
    policy = policies.PipeMareLR(
        policies.SpikeCompensation(policies.PipeDream(m)), warmup_updates=warmup
    )
    tr, start, _ = _run(policy, k, data, epochs=2, optimizer=opt)
    micro = _microbatches(data, 10, m) * 2
    step = _spike_compensated_momentum(0.05, 0.9, 0.01, k, pipemare_warmup=warmup)
    ref, _ = pipedream_with_correction(
        tr.graph, start, None, micro, True, lambda g, *a: g, sgd_step=step
    )
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)


def test_combinations_that_would_correct_with_the_wrong_weights_are_refused():
    """DelayCompensation needs the weights a gradient was computed at, which under
    WeightPrediction are predicted ones that no stage keeps; SpikeCompensation's spike uses the
    optimizer's learning rate, which an inner PipeMareLR has rescheduled."""
    inner = policies.PipeDream(3)
    dc, wp = policies.DelayCompensation, policies.WeightPrediction
    for make in (
        lambda: dc(wp(inner)),
        lambda: wp(dc(inner)),
        lambda: wp(policies.StalenessScaledLR(dc(inner, strength=0.5))),
    ):
        with pytest.raises(ValueError, match="cannot be combined with WeightPrediction"):
            make()
    with pytest.raises(ValueError, match=r"nest them the other way, PipeMareLR\(Spike"):
        policies.SpikeCompensation(policies.StalenessScaledLR(policies.PipeMareLR(inner)))
    # and a spec of one is refused as it is rebuilt
    spec = {"type": "DelayCompensation", "args": {"policy": wp(inner).to_spec(), "strength": 1.0}}
    with pytest.raises(ValueError, match=r"DelayCompensation\(WeightPrediction\(PipeDream\)\)"):
        policies.policy_from_spec(spec)
    # a prediction would replace PipeDream2BW's pinned version after the first update
    with pytest.raises(ValueError, match=r"WeightPrediction\(PipeDream2BW\): .*pins them"):
        wp(policies.PipeDream2BW(3))
    # each alone, and every other nesting, is fine
    policies.PipeMareLR(policies.SpikeCompensation(dc(inner)))
    policies.DiscrepancyCorrection(wp(policies.PipeDream(3, stash=False)))


# -- every remedy under Async, on the order its trace recorded ------------------------------------
def _trace_orders(path, names):
    """Each layer's operations ``("F" | "B", key)`` in the order its trace recorded them."""
    orders: dict[str, list[tuple[str, int]]] = {n: [] for n in names}
    for e in ann.trace.read(path).events:
        if e["a"] in orders and e["ev"] == "start" and e["k"] in ("forward", "backward"):
            orders[e["a"]].append(("F" if e["k"] == "forward" else "B", e["key"]))
    return [orders[n] for n in names]


_MOMENTUM_DECAY = optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01)
ASYNC_REMEDIES: dict[str, Any] = {
    # name: (the remedy around Async, the optimizer, the reference's arguments for k stages)
    "dc": (
        lambda p: policies.DelayCompensation(p, strength=2.0),
        optim.SGD(lr=0.1),
        lambda k: {"correct": _dc(2.0)},
    ),
    "staleness": (policies.StalenessScaledLR, optim.SGD(lr=0.1), lambda k: {"correct": _staleness}),
    "pipemare": (
        lambda p: policies.PipeMareLR(p, warmup_updates=4),
        _MOMENTUM_DECAY,
        lambda k: {"sgd_step": _rescheduled(_MOMENTUM_DECAY, k, 4)},
    ),
    "prediction": (policies.WeightPrediction, optim.SGD(lr=0.1), lambda k: {"predict": True}),
    "discrepancy": (
        lambda p: policies.DiscrepancyCorrection(p, decay=0.8),
        optim.SGD(lr=0.1),
        lambda k: {"gamma": 0.8},
    ),
    "spike": (
        policies.SpikeCompensation,
        optim.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda k: {"sgd_step": _spike_compensated_momentum(0.05, 0.9, 0.01, k)},
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("remedy", sorted(ASYNC_REMEDIES))
async def test_each_remedy_under_async_equals_its_formula_on_the_recorded_order(
    remedy, anyio_backend, tmp_path
):
    """Async (no stashing: each backward recomputes at the latest weights) takes its messages
    as they come; the trace records each layer's order, and the paper's rule re-enacted on that
    order gives the run's weights, whatever the timing was."""
    make, opt, reference = ASYNC_REMEDIES[remedy]
    k = 3
    graph = chain_graph(k)
    batches = minibatches(classification_data(36), 4)  # 9 keys, each a minibatch
    path = str(tmp_path / "run.trace")
    policy = make(policies.Async(max_active_keys=3))
    async with ann.open_run(graph, opt, policy, dtype="float64", trace=path) as run:
        start = run.state().params
        for b in batches:
            await run.step(b)
        await run.drain()
    kw = {"correct": lambda g, *a: g, **reference(k)}
    orders = _trace_orders(path, graph.layers)
    ref, delays = pipedream_with_correction(graph, start, 0.1, batches, False, orders=orders, **kw)
    assert_params_close(run.state().params, ref, rtol=1e-10, atol=1e-12)
    assert max(delays[0]) > 0  # stage 0 runs the forwards of the keys in flight first


def test_pipemare_takes_a_numpy_int_as_a_plain_one() -> None:
    p = policies.PipeMareLR(policies.PipeDream(2), warmup_updates=np.int64(3))
    assert p.warmup_updates == 3 and type(p.warmup_updates) is int
    with pytest.raises(ValueError, match="must be an int >= 1"):
        policies.PipeMareLR(policies.PipeDream(2), warmup_updates=np.True_)


@dataclasses.dataclass(frozen=True)
class _StopInStage0Correction(policies.PipeMareLR):
    """Ctrl-C as it lands in stage 0's third update, between its version going up and the
    correction of its weights (a PipeMareLR of warmup 1 that changes no update otherwise)."""

    warmup_updates: int = 1
    name: ClassVar[str] = "_StopInStage0Correction"

    def adjust(self, new, old, grads, delay, optimizer, step):
        if step == 2 and any(w.shape == (5, 6) for w in ann._math._pytree.tree_leaves(new)):
            raise KeyboardInterrupt
        return super().adjust(new, old, grads, delay, optimizer, step)


@pytest.mark.parametrize(
    "remedy",
    [lambda p: policies.PipeMareLR(p, warmup_updates=4), policies.SpikeCompensation],
    ids=["pipemare", "spike"],
)
def test_a_remedied_pipedream2bw_fit_stopped_mid_update_keeps_whole_minibatches(remedy):
    # (kept: stage 0's weights without the correction of its third update, the other layers
    # after another minibatch, and half-summed gradients that the next fit added into another
    # minibatch's update)
    data = classification_data(40)
    inner = remedy(policies.PipeDream2BW(2))

    def trainer(policy):
        opt = optim.SGD(lr=0.1, momentum=0.9)
        return ann.Trainer(chain_graph(3), optimizer=opt, policy=policy, seed=3)

    tr = trainer(_StopInStage0Correction(inner))
    with pytest.raises(KeyboardInterrupt):
        tr.fit(data, epochs=1, batch_size=8)
    done = tr.state.minibatches
    assert done == 2 and set(tr.versions.values()) == {done} and tr.state.pending_grads == {}
    reference = trainer(inner)
    reference.fit({k: v[: 8 * done] for k, v in data.items()}, epochs=1, batch_size=8)
    assert_params_close(tr.params, reference.params, rtol=0, atol=0)
    tr.policy = inner  # and it goes on as a fit that ended there
    tr.fit(data, epochs=1, batch_size=8)
    reference.fit({k: v[8 * done :] for k, v in data.items()}, epochs=1, batch_size=8)
    assert_params_close(tr.params, reference.params, rtol=0, atol=0)
