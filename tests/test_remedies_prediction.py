"""The remedies that change the weights a stage computes at (asyncnn/_runtime/_remedies.py):
WeightPrediction (its horizon, and its rule re-enacted on PipeDream and on an Async run's
recorded order) and DiscrepancyCorrection; an on_forward that ignores forward_weights fails."""

from __future__ import annotations

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies

from _reference import assert_params_close, chain_graph, classification_data, minibatches
from _remedies_cases import _microbatches, _run, _trace_orders, pipedream_with_correction


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
