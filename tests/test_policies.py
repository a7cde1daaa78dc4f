"""Each policy's semantics (DESIGN.md section 2) against plain, independent references."""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn.backends import open_device_pool

from _reference import (
    OPTIMIZERS,
    assert_params_close,
    assert_params_equal,
    chain_graph,
    classification_data,
    composed_loss,
    minibatches,
    pipedream_reference,
    plain_sgd,
)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("policy_name", ["Sync", "GPipe", "OneFOneB"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_flush_policies_equal_plain_minibatch_training_float64(
    policy_name: str, k: int, opt_name: str
) -> None:
    data = classification_data(24)
    for m in [1] if policy_name == "Sync" else [1, 3, 5, 8]:
        policy = policies.Sync() if policy_name == "Sync" else getattr(policies, policy_name)(m)
        g = chain_graph(k)
        tr = ann.Trainer(g, optimizer=OPTIMIZERS[opt_name](), policy=policy, dtype="float64")
        start = tr.params
        hist = tr.fit(data, epochs=2, batch_size=10)  # batches of 10, 10, 4: uneven splits too
        ref, ref_losses = plain_sgd(g, start, OPTIMIZERS[opt_name](), minibatches(data, 10) * 2)
        assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(hist.losses, ref_losses, rtol=1e-10)


@pytest.mark.parametrize("policy", [policies.GPipe(4), policies.OneFOneB(3)])
def test_flush_policies_float32_within_1e5(policy: policies.Policy) -> None:
    data = {
        k: (v.astype(np.float32) if v.dtype.kind == "f" else v)
        for k, v in classification_data(24).items()
    }
    g = chain_graph(3)
    tr = ann.Trainer(g, optimizer=optim.Adam(lr=0.01), policy=policy, dtype="float32")
    start = tr.params
    tr.fit(data, epochs=2, batch_size=8)
    ref, _ = plain_sgd(g, start, optim.Adam(lr=0.01), minibatches(data, 8) * 2)
    assert_params_close(tr.params, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stash", [True, False])
@pytest.mark.parametrize("k,m", [(2, 4), (3, 2), (4, 3), (3, 1)])
def test_pipedream_matches_sequential_1f1b_reenactment(k: int, m: int, stash: bool) -> None:
    data = classification_data(30)
    g = chain_graph(k)
    tr = ann.Trainer(
        g,
        optimizer=optim.SGD(lr=0.1, momentum=0.5),
        policy=policies.PipeDream(m, stash=stash),
        dtype="float64",
    )
    start = tr.params
    tr.fit(data, epochs=1, batch_size=10)
    micro = []
    for b in minibatches(data, 10):
        idx = np.array_split(np.arange(len(b["y"])), m)
        micro += [{kk: v[i[0] : i[-1] + 1] for kk, v in b.items()} for i in idx]
    ref, _ = pipedream_reference(g, start, optim.SGD(lr=0.1, momentum=0.5), micro, stash)
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    assert tr.versions == {name: len(micro) for name in g.layers}


def test_peak_stored_activations() -> None:
    data = classification_data(32)
    k, m = 4, 8
    for policy, bound in [
        (policies.OneFOneB(m), lambda s: k - s),
        (policies.GPipe(m), lambda s: m),
    ]:
        tr = ann.Trainer(
            chain_graph(k), optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64"
        )
        hist = tr.fit(data, epochs=2, batch_size=16)
        for s, name in enumerate(tr.graph.layers):
            assert hist.statistics[name].peak_stored == bound(s), (policy, name)
            assert hist.statistics[name].stored == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "policy", [policies.GPipe(4), policies.OneFOneB(4), policies.PipeDream(3)], ids=str
)
async def test_deterministic_policies_are_bit_identical_with_random_sleeps(
    policy: policies.Policy,
) -> None:
    # Every piece of work goes to the pool's threads (inline_flops=0: on the event-loop thread
    # a sleep would only stall every actor alike), and each layer sleeps 0-2 ms before each
    # forward, drawn from its own generator seeded by the run: each run finishes the stages'
    # work in another order, the same one whenever the test runs
    sleeps: dict[tuple[int, int], np.random.Generator] = {}

    class Sleepy(nn.Linear):
        def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
            time.sleep(float(sleeps[self.in_features, self.out_features].uniform(0, 0.002)))
            return super().__call__(params, x)

    data = classification_data(24)
    batches = minibatches(data, 8) * 2
    results: list[dict[str, Any]] = []
    for run_seed in range(3):
        sleepy = [Sleepy(5, 8), Sleepy(8, 8), Sleepy(8, 3)]
        for layer in sleepy:
            sizes = (layer.in_features, layer.out_features)
            sleeps[sizes] = np.random.default_rng([run_seed, *sizes])
        g = ann.Graph.sequential(
            [sleepy[0], nn.Tanh(), sleepy[1], nn.Tanh(), sleepy[2]],
            loss=nn.CrossEntropyLoss(),
            stages=[2, 2, 1],
            input_shape=(None, 5),
        )
        with anyio.fail_after(60):
            async with (
                open_device_pool(cpu_workers=3, inline_flops=0) as pool,
                ann.open_run(
                    g, optimizer=optim.Adam(lr=0.01), policy=policy, dtype="float32", pool=pool
                ) as run,
            ):
                for b in batches:
                    await run.step(b)
                await run.drain()
        results.append(run.params)
    assert_params_equal(results[0], results[1])
    assert_params_equal(results[0], results[2])


def test_async_trains_and_counts_updates() -> None:
    data = classification_data(40)
    tr = ann.Trainer(
        chain_graph(3),
        optimizer=optim.SGD(lr=0.1),
        policy=policies.Async(max_active_keys=3, min_update_frequency=2),
        dtype="float64",
    )
    hist = tr.fit(data, epochs=2, batch_size=5)
    assert len(hist.losses) == 16
    assert all(v == 8 for v in tr.versions.values())  # 16 keys, an update every 2 gradients
    assert all(np.isfinite(hist.losses))


@pytest.mark.parametrize("k,v,m", [(4, 2, 4), (6, 2, 3), (6, 3, 4)])
def test_interleaved_1f1b_equals_plain_minibatch_training_and_is_bit_identical(
    k: int, v: int, m: int
) -> None:
    data = classification_data(26)  # batches of 8, 8, 8 and 2: a short last minibatch too
    runs = []
    for _ in range(2):
        g = chain_graph(k)
        opt = optim.SGD(lr=0.1, momentum=0.9)
        tr = ann.Trainer(g, optimizer=opt, policy=policies.Interleaved1F1B(m, v), dtype="float64")
        start = tr.params
        hist = tr.fit(data, epochs=2, batch_size=8)
        runs.append(tr.params)
    ref, ref_losses = plain_sgd(g, start, optim.SGD(lr=0.1, momentum=0.9), minibatches(data, 8) * 2)
    assert_params_close(runs[0], ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hist.losses, ref_losses, rtol=1e-10)
    assert_params_equal(runs[0], runs[1])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(
    "policy", [policies.Sync(), policies.GPipe(4), policies.OneFOneB(3)], ids=str
)
def test_a_summed_loss_trains_as_the_plain_loop_under_every_flush_policy(
    policy: policies.Policy, reduction: str
) -> None:
    # (microbatches' gradients were scaled as a mean's, rows / minibatch rows, whatever the
    # loss's reduction: a summed loss trained on a fraction of its gradient, and reported a
    # fraction of its value)
    data = classification_data(24)
    g = chain_graph(3, loss=ann.nn.CrossEntropyLoss(reduction))
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.02), policy=policy, dtype="float64")
    start = tr.params
    hist = tr.fit(data, epochs=1, batch_size=10)  # batches of 10, 10, 4: uneven splits too
    ref, ref_losses = plain_sgd(g, start, optim.SGD(lr=0.02), minibatches(data, 10))
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hist.losses, ref_losses, rtol=1e-10)
    whole = composed_loss(g, [tr.params[n] for n in g.layers], data["x"], data["y"])
    np.testing.assert_allclose(tr.evaluate(data, batch_size=7)["loss"], float(whole), rtol=1e-10)


@pytest.mark.parametrize(
    "policy", [policies.PipeDream(3), policies.Async(max_active_keys=3)], ids=str
)
def test_a_summed_loss_is_reported_whole_by_the_policies_that_update_per_key(
    policy: policies.Policy,
) -> None:
    # with lr=0 every key's loss is taken at the starting weights: the minibatch's loss is the
    # summed loss of its rows there, however it was cut into keys
    data = classification_data(24)
    g = chain_graph(2, loss=ann.nn.CrossEntropyLoss("sum"))
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.0), policy=policy, dtype="float64")
    start = [tr.params[n] for n in g.layers]
    hist = tr.fit(data, epochs=1, batch_size=10)
    want = [float(composed_loss(g, start, b["x"], b["y"])) for b in minibatches(data, 10)]
    np.testing.assert_allclose(hist.losses, want, rtol=1e-10)
