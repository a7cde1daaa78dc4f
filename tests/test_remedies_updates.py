"""The remedies that correct an optimizer's step (asyncnn/_runtime/_remedies.py): spike
compensation of momentum SGD, and PipeMare's rescheduled learning rate under any optimizer, each
against its rule re-enacted step by step on PipeDream."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies

from _reference import assert_params_close, assert_params_equal, chain_graph, classification_data
from _remedies_cases import (
    _microbatches,
    _rescheduled,
    _run,
    _spike_compensated_momentum,
    pipedream_with_correction,
)


# -- spike compensation ----------------------------------------------------------------------------
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


@dataclass(frozen=True)
class _TrustScaledSGD(optim.SGD):
    """An SGD subclass with its own update rule (a LARS-like trust ratio): not plain SGD."""

    def update_leaf(self, p, g, buffers, step, lr):
        trust = float(np.linalg.norm(p) / (np.linalg.norm(g) + 1e-12))
        return super().update_leaf(p, g, buffers, step, lr * trust)


@dataclass(frozen=True)
class _SignSGD(optim.SGD):
    """An SGD subclass that steps by the gradient's sign, through its array arithmetic."""

    def _update_array(self, xp, p, g, buffers, step, lr):
        return super()._update_array(xp, p, xp.sign(g), buffers, step, lr)


@dataclass(frozen=True)
class _NamedSGD(optim.SGD):
    """An SGD subclass that changes nothing of the update: still plain SGD."""


@pytest.mark.parametrize("cls", [_TrustScaledSGD, _SignSGD])
def test_spike_compensation_refuses_an_sgd_subclass_with_its_own_update(cls):
    # its spike assumes the step lr * v of plain SGD, which such a subclass does not take
    data = classification_data(24)
    policy = policies.SpikeCompensation(policies.PipeDream(2))
    with pytest.raises(ann.ActorError, match=f"{cls.__name__}.*its own update rule"):
        _run(policy, 2, data, optimizer=cls(lr=0.05, momentum=0.9))


def test_spike_compensation_takes_an_sgd_subclass_that_keeps_its_update():
    data = classification_data(24)
    policy = policies.SpikeCompensation(policies.PipeDream(2))
    want, _, _ = _run(policy, 2, data, optimizer=optim.SGD(lr=0.05, momentum=0.9))
    got, _, _ = _run(policy, 2, data, optimizer=_NamedSGD(lr=0.05, momentum=0.9))
    assert_params_close(got.params, want.params, rtol=0, atol=0)


# -- PipeMare's learning-rate rescheduling: the step's rate, whatever the optimizer ---------------
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


# -- gradients carried from one fit to the next -----------------------------------------------------
# Async(min_update_frequency>1) carries the gradients summed and not yet applied at a fit's end
# into the next fit (RunState.pending_grads), but their delays were lost: the next fit's first
# update applied them with the mean delay of its own gradients alone (0, where one unbroken fit
# had 1/3: the carried gradient's delay of 1 left out), so SpikeCompensation corrected that
# update otherwise than one fit did, and the carried delays were counted by no fit's statistics.
@pytest.mark.parametrize(
    "remedy", [policies.SpikeCompensation, policies.PipeMareLR], ids=["spike", "pipemare"]
)
def test_a_remedy_over_async_continues_bit_identically_across_fits(remedy):
    data = classification_data(32)  # 4 keys a fit, an update each 3: one gradient carried

    def trainer():
        policy = remedy(policies.Async(max_active_keys=2, min_update_frequency=3))
        return ann.Trainer(chain_graph(3), optimizer=optim.SGD(lr=0.1, momentum=0.5),
                           policy=policy, dtype="float64")  # fmt: skip

    straight = trainer()
    whole = straight.fit(data, epochs=2, batch_size=8)
    split = trainer()
    first = split.fit(data, epochs=1, batch_size=8)
    assert split.state.pending_delays == dict.fromkeys(split.graph.layers, [1])
    second = split.fit(data, epochs=1, batch_size=8)
    # (PipeMareLR damps no mean delay up to 1: its weights were the same, its counts were not)
    assert_params_equal(split.params, straight.params)
    for name in split.graph.layers:  # each delay counted once, by the update that applies it
        both = Counter(first.statistics[name].delays) + Counter(second.statistics[name].delays)
        assert both == Counter(whole.statistics[name].delays) == {0: 5, 1: 1}
