"""The async face and the runtime's behaviour under failure: every bad input or broken actor ends
in a clear error within seconds, never a hang; memory stays flat."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies

from _reference import assert_params_close, chain_graph, fresh_params, plain_sgd


def _data(n=16, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, features)), "y": rng.integers(0, classes, n)}


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


def _sync_run():
    """``open_run`` of a two-stage chain under ``Sync`` (SGD, defaults otherwise)."""
    return ann.open_run(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def _trainer(**kw):
    return ann.Trainer(
        chain_graph(2),
        optimizer=optim.SGD(lr=0.1),
        policy=kw.pop("policy", policies.GPipe(2)),
        dtype="float64",
        **kw,
    )


def test_bad_batches_name_the_field():
    tr = _trainer()
    d = _data()
    with pytest.raises(
        ValueError, match=r"input 'x': got shape \(16, 4\), the graph declares \(None, 5\)"
    ):
        tr.fit({"x": d["x"][:, :4], "y": d["y"]}, batch_size=8)
    with pytest.raises(ValueError, match=r"the batch has no \['y'\]"):
        tr.fit({"x": d["x"]}, batch_size=8)
    with pytest.raises(ValueError, match=r"'y' is declared int64 but got float64 data"):
        tr.fit({"x": d["x"], "y": d["y"].astype(float)}, batch_size=8)
    with pytest.raises(ValueError, match=r"'extra'"):
        tr.fit({**d, "extra": d["x"]}, batch_size=8)


def test_nan_in_data_with_checks_on():
    d = _data()
    d["x"][3, 1] = np.nan
    with pytest.raises(ValueError, match="'x' contains NaN"):
        _trainer(check_finite=True).fit(d, batch_size=8)


@dataclass(frozen=True)
class Exploding(nn.Module):
    at_call: int = 0

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        raise FloatingPointError("boom in the layer")


@dataclass(frozen=True)
class Log(nn.Module):
    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.log(x)


def _graph_with(middle: nn.Module) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("first", nn.Linear(5, 3), x)
    h = g.layer("middle", middle, h)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


def test_exception_in_layer_is_one_actor_error():
    g = _graph_with(nn.Identity())
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(2))
    # swap the module after validation, so that it fails at run time
    g.nodes["middle"].module = Exploding()
    with pytest.raises(ann.ActorError) as info:
        tr.fit(_data(), batch_size=8)
    err = info.value
    assert err.actor == "middle" and err.kind == "forward" and err.key == 0
    assert isinstance(err.__cause__, FloatingPointError)
    assert "boom in the layer" in str(err)


def test_nan_produced_by_a_layer_is_named():
    g = _graph_with(Log())  # log of negative activations: NaN
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), check_finite=True)
    with (
        np.errstate(invalid="ignore"),
        pytest.raises(ann.ActorError, match="'middle' produced NaN"),
    ):
        tr.fit(_data(), batch_size=16)


class Silent(ann.LayerActor):
    """A custom actor that never answers."""

    async def on_forward(self, key, inputs, meta):
        await anyio.sleep_forever()


def _silent_graph() -> ann.Graph:
    """A Linear layer, then a Silent one, then the loss."""
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("first", nn.Linear(5, 3), x)
    h = g.layer("silent", nn.Identity(), h, actor=Silent)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


def test_layer_that_never_answers_is_a_stall_error_within_seconds():
    g = _silent_graph()
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), stall_timeout=0.5)
    start = time.perf_counter()
    with pytest.raises(ann.StallError) as info:
        tr.fit(_data(), batch_size=16)
    assert time.perf_counter() - start < 5
    assert "silent: computing forward of key 0" in str(info.value)
    assert "first: waiting for backward of key 0" in str(info.value)


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
    g = chain_graph(3)
    d = _data(n=16)
    halves = [{k: v[:8] for k, v in d.items()}, {k: v[8:] for k, v in d.items()}]
    async with ann.open_run(g, optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream(2)) as run:
        await run.step(halves[0])
        await run.drain()
        await run.step(halves[1])
        await run.drain()
    assert sorted(run.losses) == [0, 1]


@pytest.mark.anyio
async def test_a_bad_batch_after_good_ones_is_still_checked():
    # a batch like the last one skips the checks: any change of name, shape or dtype must not
    d = _data(n=16)
    good = {k: v[:8] for k, v in d.items()}
    async with ann.open_run(
        chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64"
    ) as run:
        with pytest.raises(ValueError, match=r"the batch has no \['x', 'y'\]"):
            await run.step({})  # on a fresh run: nothing was checked before it
        await run.step(good)
        await run.step({k: v[8:] for k, v in d.items()})
        with pytest.raises(ValueError, match=r"input 'x': got shape \(8, 4\)"):
            await run.step({"x": good["x"][:, :4], "y": good["y"]})
        with pytest.raises(ValueError, match=r"'y' is declared int64 but got float64 data"):
            await run.step({"x": good["x"], "y": good["y"].astype(float)})
        with pytest.raises(ValueError, match=r"the batch has no \['y'\]"):
            await run.step({"x": good["x"]})
        with pytest.raises(ValueError, match=r"'extra'"):
            await run.step({**good, "extra": good["y"]})
        await run.step(good)  # and a good one after them runs
        await run.drain()
    assert sorted(run.losses) == [0, 1, 2]
    nan = {"x": good["x"].copy(), "y": good["y"]}
    nan["x"][3, 1] = np.nan
    async with ann.open_run(
        chain_graph(2),
        optimizer=optim.SGD(lr=0.1),
        policy=policies.GPipe(2),
        dtype="float64",
        check_finite=True,
    ) as run:
        await run.step(good)
        with pytest.raises(ValueError, match="'x' contains NaN"):
            await run.step(nan)  # the same shapes and dtypes: checked all the same


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
        await run.step(data)
        await run.drain()
        after = run.statistics()
    assert before["stage0"].forwards == 1 and after["stage0"].forwards == 2
    assert before["stage0"] is not after["stage0"]
    assert after["stage0"].idle_seconds >= 0.0


class _SpinForever(ann.LayerActor):
    """Its forward runs a Python loop that never ends, inline on the event loop's thread."""

    async def on_forward(self, key, inputs, meta):
        def spin():
            while True:
                pass

        return await self.compute(spin, cost=0)


@pytest.mark.timeout(60)
def test_an_inline_compute_that_never_returns_is_a_stall_error():
    g = ann.Graph()
    x = g.input("x", (None, 5))
    y = g.input("y", (None,), dtype="int64")
    g.loss(
        "loss", nn.CrossEntropyLoss(), g.layer("spin", nn.Linear(5, 3), x, actor=_SpinForever), y
    )
    tr = ann.Trainer(
        g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64", stall_timeout=1.0
    )
    with pytest.raises(
        ann.StallError, match=r"actor 'spin' has been computing its forward of key 0"
    ):
        tr.fit(_data(), batch_size=16)


_release = threading.Event()


class _HangOnAWorker(ann.LayerActor):
    """Its forward hangs on a pool thread (a cost far above the inline threshold)."""

    async def on_forward(self, key, inputs, meta):
        return await self.compute(_release.wait, 60.0, cost=1e12)


@pytest.mark.timeout(30)
def test_a_hung_compute_on_a_pool_thread_fails_fit_without_waiting_for_it():
    g = ann.Graph()
    x = g.input("x", (None, 5))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("hang", nn.Linear(5, 3), x, actor=_HangOnAWorker)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("out", nn.Linear(3, 3), h), y)
    tr = ann.Trainer(
        g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64", stall_timeout=1.0
    )
    try:
        with pytest.raises(ann.StallError, match=r"hang: computing forward of key 0"):
            tr.fit(_data(), batch_size=16)  # returns in seconds while the thread still waits
    finally:
        _release.set()


@pytest.mark.anyio
async def test_a_step_after_the_block_is_a_clear_error():
    d = _data()
    async with _sync_run() as run:
        await run.step(d)
    with pytest.raises(RuntimeError, match=r"run.step\(\) after the open_run block was left"):
        await run.step(d)  # was anyio.ClosedResourceError, with no message
    await run.drain()  # nothing left to wait for: returns at once
    assert sorted(run.losses) == [0]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_steps_from_several_tasks_go_in_one_at_a_time():
    # each step's minibatch index must be that of its keys: the loss recorded under it is its
    # batch's loss in a run that steps the batches one by one in that order
    d = _data(n=32)
    batches = [{k: v[i * 8 : (i + 1) * 8] for k, v in d.items()} for i in range(4)]
    got: dict[int, int] = {}

    def run_args():
        return dict(optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(2), dtype="float64")

    async def step(run, i):
        got[i] = await run.step(batches[i])

    with anyio.fail_after(20):
        async with ann.open_run(chain_graph(3), **run_args()) as run:
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(step, run, i)
            await run.drain()
        order = sorted(range(4), key=lambda i: got[i])
        assert sorted(got.values()) == [0, 1, 2, 3]
        async with ann.open_run(chain_graph(3), **run_args()) as one_by_one:
            for i in order:
                await one_by_one.step(batches[i])
    assert run.losses == one_by_one.losses
    assert_params_close(run.params, one_by_one.params, rtol=0)


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_a_step_cancelled_before_its_keys_go_in_leaves_the_run_usable():
    d = _data()
    policy = policies.Async(max_active_keys=1, min_update_frequency=1)
    with anyio.fail_after(20):
        async with ann.open_run(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policy) as run:
            await run.step(d)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await run.step(d)  # waits for its admission: cancelled there
            await run.step(d)
            await run.drain()  # waited forever for the cancelled step's loss
    assert sorted(run.losses) == [0, 1]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_a_step_cut_off_after_some_keys_went_in_fails_clearly():
    g = _silent_graph()
    policy = policies.PipeDream(4)  # 2 keys in flight at most: the 3rd key waits
    with anyio.fail_after(20), pytest.raises(RuntimeError, match=r"minibatch 0 was cut off"):
        async with ann.open_run(g, optimizer=optim.SGD(lr=0.1), policy=policy) as run:
            async with anyio.create_task_group() as tg:
                scope = anyio.CancelScope()

                async def step():
                    with scope:
                        await run.step(_data())

                tg.start_soon(step)
                while run.in_flight < run.max_in_flight:  # the keys that went in: 2 of 4
                    await anyio.lowlevel.checkpoint()
                scope.cancel()
            with pytest.raises(RuntimeError, match=r"2 of its 4 keys went in"):
                await run.step(_data())  # would wait forever
            with pytest.raises(RuntimeError, match=r"run.drain\(\) cannot wait"):
                await run.drain()
            # and leaving the block, which drains, raises it too (it hung)


@pytest.mark.anyio
async def test_an_input_that_is_not_an_array_is_named():
    d = _data()
    async with _sync_run() as run:
        with pytest.raises(TypeError, match=r"input 'x' is a list, not an array"):
            await run.step({"x": d["x"].tolist(), "y": d["y"]})  # said "got shape ()"
        await run.step(d)


def test_bad_run_options_name_the_option():
    with pytest.raises(ValueError, match=r"seed must be an int >= 0, got -1"):
        _trainer(seed=-1)  # numpy's "expected non-negative integer", naming nothing
    with pytest.raises(ValueError, match=r"stall_timeout must be a number > 0, got True"):
        _trainer(stall_timeout=True)  # was a stall timeout of 1 s
    with pytest.raises(ValueError, match=r"dtype must name a floating dtype.*got None"):
        ann.Trainer(chain_graph(2), optim.SGD(lr=0.1), policies.Sync(), dtype=None)  # was float64


class _NeverTakes:
    """An inbox whose send never returns (a receiver stuck for good)."""

    async def send(self, msg):
        await anyio.sleep_forever()

    def close(self):
        pass


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_a_step_cancelled_while_its_key_goes_in_fails_later_calls_clearly():
    # the key's first message is sent (its receiver stuck), the second never: waiting for that
    # key, as drain and the block's exit do, would never end
    with anyio.fail_after(10), pytest.raises(RuntimeError, match=r"drain\(\) cannot wait: key 0"):
        async with _sync_run() as run:
            run.actors["stage0"].send_channel = _NeverTakes()
            with anyio.move_on_after(0.05):
                await run.step(_data())
            with pytest.raises(RuntimeError, match=r"key 0 \(minibatch 0\) was cut off \(Canc"):
                await run.step(_data())


@pytest.mark.anyio
async def test_a_minibatchs_loss_is_the_same_whatever_order_its_shares_arrive_in():
    # two losses, or a pipeline's keys, report in an order that varies from run to run: an
    # ordinary running sum varied in its last bits with it
    from asyncnn._runtime._run import _Pending

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


@dataclass(frozen=True)
class _RowsOut(nn.Module):
    """A layer that breaks the batch dimension: ``how`` drops a row, sums the rows, or sums
    everything."""

    how: str

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if self.how == "drop":
            return x[:-1]
        if self.how == "sum0":
            return ops.sum(x, axis=0, keepdims=True)
        return ops.sum(x)


@dataclass(frozen=True)
class _Add(nn.Module):
    def __call__(self, params: Any, a: Any, b: Any, *, rng: Any = None) -> Any:
        return ops.add(a, b)


def _rows_graph(how: str) -> ann.Graph:
    # the pooled rows broadcast back onto x: without the check this trains, and Sync and
    # GPipe(4), which must agree, gave different losses (10.44 and 3.05)
    g = ann.Graph()
    x = g.input("x", (None, 4))
    y = g.input("y", (None, 4))
    pooled = g.layer("pool", _RowsOut(how), g.layer("a", nn.Linear(4, 4), x))
    out = g.layer("out", _Add(), pooled, x)
    g.loss("loss", nn.MSELoss(), out, y)
    return g


_ROWS_SAID = {
    "drop": r"shape \(1, 4\) for inputs of shape \(2, 4\): 1 row where its inputs have 2 rows",
    "sum0": r"shape \(1, 4\) for inputs of shape \(2, 4\): 1 row where its inputs have 2 rows",
    "all": r"shape \(\) for inputs of shape \(2, 4\): no batch dimension where its inputs",
}


@pytest.mark.parametrize("how", sorted(_ROWS_SAID))
def test_a_layer_that_drops_or_mixes_rows_is_refused_naming_it(how):
    with pytest.raises(ann.GraphError, match=rf"layer 'pool' \(_RowsOut.*{_ROWS_SAID[how]}"):
        ann.Trainer(_rows_graph(how), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(4))


@pytest.mark.anyio
async def test_open_run_refuses_a_layer_that_drops_rows():
    with pytest.raises(ann.GraphError, match=r"layer 'pool' .*keep the batch dimension"):
        async with ann.open_run(_rows_graph("drop"), optim.SGD(lr=0.1), policies.Sync()):
            pass  # pragma: no cover


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_drain_waits_for_a_step_part_way_in_under_pipedream():
    # drain told the stages the stream's length while the step's other keys were still to go
    # in: "stage0: waiting for forward of key 8", a StallError after stall_timeout
    d = _data(n=16)

    def run_args():
        return dict(optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream(8), dtype="float64")

    with anyio.fail_after(20):
        async with ann.open_run(chain_graph(3), stall_timeout=5, **run_args()) as run:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run.step, d)  # 8 keys, 3 in flight at most
                while run.next_key < 1:
                    await anyio.lowlevel.checkpoint()
                assert run.next_key < 8  # the step is part-way in
                await run.drain()
                assert run.next_key == 8 and run.in_flight == 0 and sorted(run.losses) == [0]
        async with ann.open_run(chain_graph(3), **run_args()) as alone:
            await alone.step(d)
    assert run.losses == alone.losses
    assert_params_close(run.params, alone.params, rtol=0)


@pytest.mark.anyio
async def test_a_step_or_drain_from_another_thread_is_refused_naming_the_way():
    # run from a thread, its work ran there and the run broke ("must be called from async
    # context"), or it hung
    d = _data()
    got: list[BaseException] = []

    def elsewhere(call):
        coro = call()
        try:
            coro.send(None)
        except BaseException as exc:  # noqa: BLE001 - kept for the assertions
            got.append(exc)
        finally:
            coro.close()

    async with _sync_run() as run:
        await run.step(d)
        for call in (lambda: run.step(d), run.drain, run.wait_idle):
            await anyio.to_thread.run_sync(elsewhere, call)
        await run.step(d)  # the run is untouched
        await run.drain()
    assert [type(e) for e in got] == [RuntimeError] * 3
    for what, e in zip(("step", "drain", "wait_idle"), got, strict=True):
        assert f"run.{what}() was called from another thread" in str(e)
        assert f"trio.from_thread.run(run.{what}, ...) or anyio.from_thread.run" in str(e)
    assert sorted(run.losses) == [0, 1]


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_wait_idle_under_pipedream_is_refused_at_once_naming_drain():
    # its stages keep the stream's last keys until the stream ends: it waited for a forward
    # that never came, a StallError after stall_timeout (60 s by default)
    d = _data()
    with anyio.fail_after(20):
        async with ann.open_run(
            chain_graph(3), optimizer=optim.SGD(lr=0.1), policy=policies.PipeDream(4),
            dtype="float64", stall_timeout=10,
        ) as run:  # fmt: skip
            await run.wait_idle()  # nothing admitted: nothing to wait for
            await run.step(d)
            with pytest.raises(
                RuntimeError, match=r"run.wait_idle\(\) cannot finish under PipeDream.*drain\(\)"
            ):
                await run.wait_idle()
            await run.drain()
            await run.wait_idle(losses=True)  # the stream ended: nothing in flight
            await run.step(d)
    assert sorted(run.losses) == [0, 1]


@pytest.mark.anyio
async def test_idle_seconds_stop_growing_once_the_run_ended():
    async with _sync_run() as run:
        await run.step(_data())
    first = run.statistics()
    second = run.statistics()
    for name in first:
        assert first[name].idle_seconds == second[name].idle_seconds  # grew with the clock


@pytest.mark.anyio
async def test_a_batch_that_is_not_a_dict_names_the_inputs():
    d = _data()
    async with _sync_run() as run:
        for batch, what in (((d["x"], d["y"]), "tuple of 2"), ([d["x"]], "list of 1")):
            with pytest.raises(
                TypeError,
                match=rf"a batch must be a dict of input name to array, got a {what}; the "
                r"graph's inputs are \['x', 'y'\]: pass \{'x': ..., 'y': ...\}",
            ):
                await run.step(batch)  # was AttributeError: 'tuple' object has no 'items'
        await run.step(d)
    assert sorted(run.losses) == [0]
