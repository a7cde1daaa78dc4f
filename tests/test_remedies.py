"""Gradient delays (statistics, trace) and the staleness remedies (asyncnn/_runtime/_remedies.py),
each against an independent sequential re-enactment of its paper's rule on PipeDream's known
delays, and on the order each layer of an Async run recorded in its trace. (Weight prediction and
discrepancy correction are in test_remedies_prediction.py; spike compensation and PipeMare's
rescheduled learning rate in test_remedies_updates.py.)"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import assert_params_close, chain_graph, classification_data, minibatches
from _remedies_cases import (
    _microbatches,
    _rescheduled,
    _run,
    _spike_compensated_momentum,
    _tmap,
    _trace_orders,
    pipedream_with_correction,
)


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
    # numpy floats (a sweep's): float32 was refused as if out of range, float64 kept as numpy
    for value in (np.float32(0.5), np.float64(0.5)):
        dc = policies.DelayCompensation(inner, strength=value)
        disc = policies.DiscrepancyCorrection(policies.Async(2), decay=value)
        assert type(dc.strength) is float and type(disc.decay) is float and dc.strength == 0.5
        assert policies.policy_from_spec(json.loads(json.dumps(dc.to_spec()))) == dc
    with pytest.raises(ValueError, match=r"strength=.* must be a finite number >= 0"):
        policies.DelayCompensation(inner, strength=10**400)  # (float() of it overflowed)
    for bad in (1.0, -0.1, np.float32(1.5), True, "0.5"):
        with pytest.raises(ValueError, match=r"decay must be in \[0, 1\) \(a real number\)"):
            policies.DiscrepancyCorrection(policies.Async(2), decay=bad)
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


# -- DelayCompensation corrects the gradient the update applies -----------------------------------
def _dc_asgd_2bw(graph, params, opt, batches, lam):
    """DC-ASGD on PipeDream-2BW's published rule, in sequence: ``G_t = grad f_t(W(t-1))`` (the
    minibatch's whole gradient, ``W(-1) = W(0)``), and the update applies
    ``G_t + lam * G_t * G_t * (W(t) - W(t-1))``, with the minibatch's loss as the graph defines
    it (a mean or a sum over its rows)."""
    from _reference import composed_loss

    history = [[params[n] for n in graph.layers]]
    state = opt.init(history[0])
    for t, b in enumerate(batches):
        used, now = history[max(t - 1, 0)], history[-1]
        g = ann.grad(lambda p, b=b: composed_loss(graph, p, b["x"], b["y"]))(used)
        g = _tmap(lambda g, w, w0: g + lam * g * g * (w - w0), g, now, used)
        new, state = opt.update(now, g, state)
        history.append(new)
    return dict(zip(graph.layers, history[-1], strict=True))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_delay_compensation_under_pipedream_2bw_corrects_the_minibatch_gradient(reduction):
    # (each microbatch's share of the gradient was corrected alone: the correction, quadratic
    # in the gradient, came out about 1/M of DC-ASGD's and depended on how the minibatch was cut)
    data = classification_data(24)
    loss = nn.CrossEntropyLoss(reduction=reduction)
    opt = lambda: optim.SGD(lr=0.05, momentum=0.5)  # noqa: E731
    lam = 2.0 if reduction == "mean" else 0.05
    results = {}
    for m in (2, 3, 4):
        policy = policies.DelayCompensation(policies.PipeDream2BW(m), strength=lam)
        tr = ann.Trainer(chain_graph(3, loss=loss), optimizer=opt(), policy=policy,
                         dtype="float64", seed=1)  # fmt: skip
        start = tr.params
        hist = tr.fit(data, epochs=2, batch_size=8)
        assert hist.statistics[tr.graph.layers[0]].delays == {0: m, 1: 5 * m}
        ref = _dc_asgd_2bw(tr.graph, start, opt(), minibatches(data, 8) * 2, lam)
        assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
        results[m] = tr.params
    assert_params_close(results[2], results[4], rtol=1e-10, atol=1e-12)  # whatever the cut
    plain = ann.Trainer(chain_graph(3, loss=loss), optimizer=opt(),
                        policy=policies.PipeDream2BW(2), dtype="float64", seed=1)  # fmt: skip
    plain.fit(data, epochs=2, batch_size=8)
    first = ann._math._pytree.tree_leaves(plain.params[plain.graph.layers[0]])[0]
    corrected = ann._math._pytree.tree_leaves(results[2][plain.graph.layers[0]])[0]
    assert not np.allclose(first, corrected, rtol=1e-6)  # and the correction did something


@pytest.mark.anyio
@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("remedy", ["dc", "dc+staleness"])
async def test_a_gradient_correction_under_async_every_f_gradients_corrects_each_one(
    remedy, every, anyio_backend, tmp_path
):
    """Under Async(min_update_frequency=F) each key is a minibatch of its own, whose gradient
    is a whole mean-loss gradient: each is corrected by its own delay, then the update takes
    their mean (DC-ASGD's and Zhang et al.'s averaged updates)."""
    make, formula = REMEDIES[remedy]
    k = 3
    graph = chain_graph(k)
    batches = minibatches(classification_data(48), 4)  # 12 keys, each a minibatch
    path = str(tmp_path / "run.trace")
    policy = make(policies.Async(max_active_keys=4, min_update_frequency=every))
    async with ann.open_run(graph, optim.SGD(lr=0.1), policy, dtype="float64", trace=path) as run:
        start = run.state().params
        for b in batches:
            await run.step(b)
        await run.drain()
    orders = _trace_orders(path, graph.layers)
    ref, delays = pipedream_with_correction(
        graph, start, 0.1, batches, False, formula, orders=orders, every=every
    )
    assert_params_close(run.state().params, ref, rtol=1e-10, atol=1e-12)
    assert max(delays[0]) > 0


@pytest.mark.parametrize(
    "inner",
    [
        policies.Sync(),
        policies.GPipe(3),
        policies.OneFOneB(3),
        policies.ZeroBubbleH1(3),
        policies.Async(1, 2),
    ],
    ids=str,
)
def test_gradient_corrections_are_bit_identical_no_ops_without_delay(inner):
    data = classification_data(24)
    want, _, _ = _run(inner, 3, data, batch_size=8)
    for make, _ in REMEDIES.values():
        got, _, _ = _run(make(inner), 3, data, batch_size=8)
        assert_params_close(got.params, want.params, rtol=0, atol=0)


@pytest.mark.anyio
async def test_reading_the_state_mid_minibatch_leaves_a_corrected_2bw_run_as_it_was(anyio_backend):
    """A stage sums a 2BW minibatch's keys before DelayCompensation corrects them: a state read
    while some of them are summed (a fit reads it at every step) holds their corrected sum as
    the pending gradient, and leaves the sum open, so the run goes on as if never read."""
    batches = minibatches(classification_data(48), 8)
    policy = policies.DelayCompensation(policies.PipeDream2BW(3), strength=2.0)

    async def run(read):
        partial = 0
        graph = chain_graph(3)
        async with ann.open_run(graph, optim.SGD(lr=0.1), policy, dtype="float64") as r:
            for b in batches:
                await r.step(b)
                if read:
                    state = r.state()
                    partial += sum(1 for _, n in state.pending_grads.values() if n)
                    for name, (acc, n) in state.pending_grads.items():
                        assert len(state.pending_delays[name]) == n
                        assert all(np.isfinite(x).all() for x in ann._math._pytree.tree_leaves(acc))
            await r.drain()
            return r.state().params, partial

    read, partial = await run(True)
    unread, _ = await run(False)
    assert partial  # (some reads came mid-minibatch)
    assert_params_close(read, unread, rtol=0, atol=0)
