"""The async face of a run: open_run on trio and asyncio, statistics, losses and gradients as the
plain loop, memory that stays flat. (Errors are in test_run_errors.py; steps from several tasks,
cancellation, threads, drain and wait_idle in test_run_concurrency.py.)"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import (
    assert_params_close,
    chain_graph,
    fresh_params,
    pipedream_reference,
    plain_sgd,
)
from _run_cases import _data, _sync_run, _trainer


@pytest.mark.anyio
async def test_open_run_on_trio_and_asyncio():
    g = chain_graph(2)
    data = _data()
    start = fresh_params(g)
    async with ann.open_run(
        g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64"
    ) as run:
        await run.step({"x": data["x"][:8], "y": data["y"][:8]})
        await run.step({"x": data["x"][8:], "y": data["y"][8:]})
        await run.drain()
    assert sorted(run.losses) == [0, 1]
    ref, losses = plain_sgd(
        g,
        start,
        optim.SGD(lr=0.1),
        [{k: v[:8] for k, v in data.items()}, {k: v[8:] for k, v in data.items()}],
    )
    assert_params_close(run.params, ref, rtol=1e-10)
    np.testing.assert_allclose([run.losses[0], run.losses[1]], losses, rtol=1e-10)


class Doubler(ann.LayerActor):
    """A custom actor: its backward sends twice the true input gradient upstream."""

    async def on_backward(self, key, grad, meta):
        grads = await super().on_backward(key, grad, meta)
        return [g * 2 for g in grads]


def test_custom_actor_changes_the_gradient_upstream():
    def build(actor):
        g = ann.Graph()
        x = g.input("x", shape=(None, 5))
        y = g.input("y", shape=(None,), dtype="int64")
        h = g.layer("first", nn.Linear(5, 4), x)
        h = g.layer("second", nn.Linear(4, 3), h, actor=actor)
        g.loss("loss", nn.CrossEntropyLoss(), h, y)
        return g

    d = _data()
    plain = ann.Trainer(
        build(None), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64"
    )
    custom = ann.Trainer(
        build(Doubler), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64"
    )
    p0 = plain.params
    plain.fit(d, batch_size=16)
    custom.fit(d, batch_size=16)
    step_plain = p0["first"]["weight"] - plain.params["first"]["weight"]
    step_custom = p0["first"]["weight"] - custom.params["first"]["weight"]
    np.testing.assert_allclose(step_custom, 2 * step_plain, rtol=1e-10)
    np.testing.assert_array_equal(
        plain.params["second"]["weight"], custom.params["second"]["weight"]
    )


def test_memory_stays_flat_over_a_long_run():
    import gc
    import tracemalloc

    g = chain_graph(3, width=16)
    d = _data(n=64)
    tr = ann.Trainer(
        g, optimizer=optim.Adam(lr=1e-3), policy=policies.PipeDream(4), dtype="float32"
    )
    tr.fit(d, epochs=2, batch_size=16)  # warm-up
    tracemalloc.start()
    # each fit leaves its run's cyclic garbage (threads, sockets, inboxes) to the collector,
    # whose timing differs between Pythons: collect it so that only live memory is compared
    tr.fit(d, epochs=5, batch_size=16)
    gc.collect()
    first, _ = tracemalloc.get_traced_memory()
    tr.fit(d, epochs=20, batch_size=16)
    gc.collect()
    second, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert second - first < 200_000, f"memory grew by {second - first} bytes over 20 more epochs"
    stats = tr.fit(d, epochs=1, batch_size=16).statistics
    assert all(s.stored == 0 for s in stats.values())
    assert stats["stage0"].peak_versions_held <= 4  # stashing holds at most K versions


def test_statistics_and_utilisation():
    tr = _trainer(policy=policies.OneFOneB(4))
    hist = tr.fit(_data(n=32), epochs=2, batch_size=16)
    st = hist.statistics["stage0"]
    # 2 epochs of 2 minibatches, each split into 4 keys: 16 keys, 4 updates
    assert st.forwards == 16 and st.backwards == 16 and st.updates == 4
    assert st.messages_in == 16 + 16 + 1 and st.messages_out == 16  # + the stop message
    assert st.stored == 0 and st.stored_bytes == 0 and st.peak_stored == 2
    util = hist.utilisation()
    assert set(util) == {"stage0", "stage1", "loss"} and all(0 <= u <= 1 for u in util.values())
    assert hist.samples_per_second > 0


def test_two_loss_nodes_add_up():
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("trunk", nn.Linear(5, 4), x)
    a = g.layer("head_a", nn.Linear(4, 3), h)
    b = g.layer("head_b", nn.Linear(4, 3), h)
    g.loss("loss_a", nn.CrossEntropyLoss(), a, y)
    g.loss("loss_b", nn.CrossEntropyLoss(), b, y)
    d = _data()
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64")
    p0 = tr.params

    def loss(p):
        hh = g.nodes["trunk"].module(p["trunk"], d["x"])
        la = nn.CrossEntropyLoss()({}, g.nodes["head_a"].module(p["head_a"], hh), d["y"])
        lb = nn.CrossEntropyLoss()({}, g.nodes["head_b"].module(p["head_b"], hh), d["y"])
        return la + lb

    value, grads = ann.value_and_grad(loss)(p0)
    hist = tr.fit(d, batch_size=16)
    np.testing.assert_allclose(hist.losses, [float(value)], rtol=1e-10)
    for name in p0:
        for k in p0[name]:
            np.testing.assert_allclose(
                tr.params[name][k], p0[name][k] - 0.1 * grads[name][k], rtol=1e-10, atol=1e-12
            )


def test_async_pending_gradients_carry_over_between_fits():
    d = _data(n=12)

    def run(fits):
        tr = ann.Trainer(
            chain_graph(2),
            optimizer=optim.SGD(lr=0.1),
            policy=policies.Async(max_active_keys=1, min_update_frequency=2),
            dtype="float64",
        )
        for f in fits:
            tr.fit({k: v[f] for k, v in d.items()}, batch_size=4)
        return tr

    whole = run([slice(0, 12)])  # 3 keys: one update, one gradient left pending
    split = run([slice(0, 4), slice(4, 12)])  # 1 key, then 2 keys: the same 3 keys
    assert whole.versions == split.versions == {"stage0": 1, "stage1": 1}
    assert_params_close(split.params, whole.params, rtol=1e-12)
    more = run([slice(0, 12), slice(0, 4)])  # the pending gradient joins the 4th: a 2nd update
    assert more.versions == {"stage0": 2, "stage1": 2}


@pytest.mark.anyio
async def test_pipedream_can_drain_and_go_on_in_one_run():
    # a drain ends PipeDream's stream (its cool-down) and the next step starts another: the
    # weights after the drain are those of a run of the first half alone, and the final ones
    # those of a run of the second half from there (not those of one stream without the drain)
    g = chain_graph(3)
    d = _data(n=16)
    halves = [{k: v[:8] for k, v in d.items()}, {k: v[8:] for k, v in d.items()}]
    async with ann.open_run(
        g, optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream(2), dtype="float64"
    ) as run:
        await run.step(halves[0])
        await run.drain()
        drained = run.params
        await run.step(halves[1])
        await run.drain()
    assert sorted(run.losses) == [0, 1]
    micro = [{k: v[i : i + 4] for k, v in d.items()} for i in range(0, 16, 4)]  # 2 per step
    first, _ = pipedream_reference(g, fresh_params(g), optim.SGD(lr=0.1), micro[:2], stash=True)
    assert_params_close(drained, first, rtol=1e-10)
    final, _ = pipedream_reference(g, first, optim.SGD(lr=0.1), micro[2:], stash=True)
    assert_params_close(run.params, final, rtol=1e-10)


@pytest.mark.anyio
async def test_step_copies_its_inputs():
    # step returns before its keys are computed: refilling the caller's buffer must not matter
    g = chain_graph(2)
    d = _data(n=16)
    batches = [{k: v[:8].copy() for k, v in d.items()}, {k: v[8:].copy() for k, v in d.items()}]

    async def train(reuse):
        async with ann.open_run(
            g, optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream(2), dtype="float64"
        ) as run:
            buf = {k: v.copy() for k, v in batches[0].items()}
            for b in batches:
                if reuse:
                    for k in buf:
                        buf[k][...] = b[k]
                    await run.step(buf)
                else:
                    await run.step(b)
        return run.losses

    assert await train(reuse=True) == await train(reuse=False)


@pytest.mark.anyio
async def test_statistics_are_snapshots_that_later_work_leaves_alone():
    data = _data()
    async with ann.open_run(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64"
    ) as run:
        await run.step(data)
        await run.drain()
        before = run.statistics()
        seen = {n: asdict(s) for n, s in before.items()}  # (copies: the dicts too)
        await run.step(data)
        await run.drain()
        after = run.statistics()
    # the earlier snapshot's every field, its delays dict included, as it was when taken
    assert {n: asdict(s) for n, s in before.items()} == seen
    assert before["stage0"].forwards == 1 and after["stage0"].forwards == 2
    assert before["stage0"].delays == {0: 1} and after["stage0"].delays == {0: 2}
    assert after["stage0"].busy_seconds > before["stage0"].busy_seconds


@pytest.mark.anyio
async def test_a_minibatchs_loss_is_the_same_whatever_order_its_shares_arrive_in():
    # two losses, or a pipeline's keys, report in an order that varies from run to run: an
    # ordinary running sum varied in its last bits with it
    from asyncnn._runtime._run_actors import _Pending

    shares = [1e16, 1.0, -1e16, 1.0]
    got = []
    async with _sync_run() as run:
        for order in (shares, shares[::-1]):
            mb = 100 + len(got)
            run._pending[mb] = _Pending(keys=len(order))
            for key, share in enumerate(order):
                run.loss_reported(key, share, {"minibatch": mb, "mb_rows": 4})
            got.append(run.losses.pop(mb))
    assert got == [2.0, 2.0]


@pytest.mark.anyio
async def test_work_of_a_minibatch_the_run_never_admitted_is_dropped_quietly() -> None:
    # (a replay of one actor alone admits no minibatch) a backward was dropped, but the loss
    # of such a minibatch failed with KeyError: 7
    async with _sync_run() as run:
        run.backward_done("stage0", 99)
        run.loss_reported(99, 1.5, {"minibatch": 7, "mb_rows": 4})
        assert run.losses == {} and run.in_flight == 0
        data = _data(8)
        assert await run.step(data) == 0
        await run.drain()
    assert sorted(run.losses) == [0]


@pytest.mark.anyio
async def test_idle_seconds_stop_growing_once_the_run_ended():
    async with _sync_run() as run:
        await run.step(_data())
    first = run.statistics()
    second = run.statistics()
    for name in first:
        assert first[name].idle_seconds == second[name].idle_seconds  # grew with the clock
