"""Interleaved 1F1B and zero bubble in the runtime (asyncnn/_runtime/_interleaved.py, _turns.py):
the stages of one device take turns in the device's order, ZB-H1's backward runs as an input half
and a deferred weight half, and both give the plain loop's parameters, bit-identical run to run
under random sleeps. (Their orders against PyTorch's are in test_policies_orders.py; their measured
bubble in test_experiments_pipeline_bubble.py.)"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn.policies import DeviceTurns

from _reference import (
    OPTIMIZERS,
    assert_params_close,
    assert_params_equal,
    chain_graph,
    classification_data,
    fresh_params,
    minibatches,
    plain_sgd,
)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize(
    "k,policy",
    [
        (3, policies.ZeroBubbleH1(3)),
        (4, policies.ZeroBubbleH1(4)),
        (4, policies.ZeroBubbleH1(4, virtual=2)),
        (6, policies.ZeroBubbleH1(3, virtual=3)),
        (6, policies.Interleaved1F1B(6, virtual=3)),
    ],
)
def test_split_and_interleaved_runs_equal_plain_minibatch_training_float64(k, policy, opt_name):
    data = classification_data(26)  # batches of 8, 8, 8 and 2: a short last minibatch too
    g = chain_graph(k)
    tr = ann.Trainer(g, optimizer=OPTIMIZERS[opt_name](), policy=policy, dtype="float64")
    start = tr.params
    hist = tr.fit(data, epochs=2, batch_size=8)
    ref, ref_losses = plain_sgd(g, start, OPTIMIZERS[opt_name](), minibatches(data, 8) * 2)
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hist.losses, ref_losses, rtol=1e-10)
    for name in g.layers:
        st = hist.statistics[name]
        assert st.stored == 0 and st.updates == 8 and st.backwards == st.forwards


@pytest.mark.anyio
@pytest.mark.parametrize(
    "policy", [policies.Interleaved1F1B(4, virtual=2), policies.ZeroBubbleH1(4, virtual=2)]
)
async def test_turns_and_split_backwards_on_trio_and_asyncio(policy):
    g = chain_graph(4)
    data = classification_data(16)
    start = fresh_params(g)
    batches = [{k: v[:8] for k, v in data.items()}, {k: v[8:] for k, v in data.items()}]
    async with ann.open_run(g, optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64") as run:
        for b in batches:
            await run.step(b)
        await run.drain()
    ref, _ = plain_sgd(g, start, optim.SGD(lr=0.1), batches)
    assert_params_close(run.params, ref, rtol=1e-10, atol=1e-12)


# -- random sleeps ---------------------------------------------------------------------------------
def _sleep_forward(x: Any, *, rng: Any) -> tuple[Any, Any]:
    time.sleep(float(rng.uniform(0, 0.002)))
    return x, rng


def _sleep_vjp(g: Any, rng: Any, needs: Any) -> tuple[Any]:
    time.sleep(float(rng.uniform(0, 0.002)))
    return (g,)


_sleep = ops.Primitive("test_random_sleep", _sleep_forward, _sleep_vjp)


@dataclass(frozen=True)
class SleepyLinear(nn.Linear):
    """A Linear that sleeps a random while in its forward and in each half of its backward
    (the draws of a run's seeded generator: the timing differs between runs, not the maths)."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        h = _sleep(x, rng=SLEEPS[0]) @ _sleep(params["weight"], rng=SLEEPS[0])
        return h + params["bias"]


SLEEPS: list[Any] = [np.random.default_rng(0)]


@pytest.mark.parametrize(
    "stages,policy",
    [
        ([2, 2, 2, 1], policies.Interleaved1F1B(4, virtual=2)),
        ([2, 2, 1], policies.ZeroBubbleH1(4)),
        ([2, 2, 2, 1], policies.ZeroBubbleH1(4, virtual=2)),
    ],
)
def test_bit_identical_run_to_run_under_seeded_random_sleeps(stages, policy):
    data = {"x": classification_data(26)["x"].astype(np.float32), "y": classification_data(26)["y"]}
    results = []
    for seed in range(3):
        SLEEPS[0] = np.random.default_rng(seed)
        layers: list[Any] = []
        widths = [5] + [8] * (len(stages) - 1) + [3]
        for s, n in enumerate(stages):
            layers.append(SleepyLinear(widths[s], widths[s + 1]))
            if n == 2:
                layers.append(nn.Tanh())
        g = ann.Graph.sequential(
            layers, loss=nn.CrossEntropyLoss(), stages=stages, input_shape=(None, 5)
        )
        tr = ann.Trainer(g, optimizer=optim.Adam(lr=0.01), policy=policy, dtype="float32")
        tr.fit(data, epochs=2, batch_size=8, shuffle=True)
        results.append(tr.params)
    assert_params_equal(results[0], results[1])
    assert_params_equal(results[0], results[2])


# -- turns -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "policy,schedule",
    [
        (policies.Interleaved1F1B(4, virtual=2), policies.interleaved_1f1b_schedule),
        (policies.ZeroBubbleH1(4, virtual=2), policies.interleaved_zero_bubble_schedule),
    ],
)
def test_the_stages_of_a_device_compute_one_at_a_time_in_its_order(policy, schedule, tmp_path):
    d, v, m = 2, 2, 4
    path = tmp_path / "run.trace"
    tr = ann.Trainer(
        chain_graph(d * v), optimizer=optim.SGD(lr=0.1), policy=policy, trace=str(path)
    )
    tr.fit(classification_data(16), epochs=1, batch_size=8)  # two minibatches of 4 keys
    events = [e for e in ann.trace.read(str(path)).events if e.what in ("start", "end")]
    names = tr.graph.layers
    for dev in range(d):
        mine = [e for e in events if e.actor in names[dev::d]]
        mine.sort(key=lambda e: (e.time, e.what != "end"))
        # each start is followed by its own end: no two stages of the device overlap
        got = []
        for start, end in zip(mine[::2], mine[1::2], strict=True):
            assert (start.what, end.what) == ("start", "end")
            assert (start.actor, start.kind, start.key) == (end.actor, end.kind, end.key)
            kind = start.kind if "half" not in start.meta else f"backward_{start.meta['half']}"
            got.append((kind, names.index(start.actor), start.key))
        want = [(k, st, mb) for k, st, mb in schedule(d, v, m)[dev]]
        want += [(k, st, mb + m) for k, st, mb in schedule(d, v, m)[dev]]
        assert got == want


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_device_turns_pass_in_order_and_refuse_out_of_turn(backend):
    turns = DeviceTurns(0, lambda m: [0, 2, 2, 0][:m])
    seen = []

    async def stage(s: int, ops_: int) -> None:
        for _ in range(ops_):
            await turns.wait(s, 4)
            seen.append(s)
            await anyio.lowlevel.checkpoint()
            turns.passed(s)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stage, 2, 2)
            tg.start_soon(stage, 0, 2)

    anyio.run(main, backend=backend)
    assert seen == [0, 2, 2, 0]
    assert turns.next_stage() is None  # the minibatch is over
    assert turns.is_turn(0, 4) and not turns.is_turn(2, 4)
    with pytest.raises(RuntimeError, match="stage 2 computed out of turn"):
        turns.passed(2)


def test_a_split_backward_needs_both_halves_from_a_custom_actor():
    class OnlyBackward(ann.LayerActor):
        async def on_backward(self, key, grad, meta):
            return await super().on_backward(key, grad, meta)

    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("a", nn.Linear(5, 4), x, actor=OnlyBackward)
    out = g.layer("b", nn.Linear(4, 3), h)
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.ZeroBubbleH1(2))
    with pytest.raises(TypeError, match="'a'.*OnlyBackward overrides on_backward only"):
        tr.fit(classification_data(8), epochs=1, batch_size=8)
    # under a policy that does not split, the same actor runs
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(2))
    tr.fit(classification_data(8), epochs=1, batch_size=8)


def test_a_custom_backward_with_its_input_half_needs_its_weight_half_too():
    # the base weight half would read a stored pullback that this class's halves do not keep
    class NoWeightHalf(ann.LayerActor):
        async def on_backward(self, key, grad, meta):
            return await super().on_backward(key, grad, meta)

        async def on_backward_input(self, key, grad, meta):
            return await super().on_backward_input(key, grad, meta)

    class Halves(ann.LayerActor):  # wrapping a half alone stays allowed
        async def on_backward_weight(self, key, meta):
            return await super().on_backward_weight(key, meta)

    def graph(actor: type) -> ann.Graph:
        g = ann.Graph()
        x = g.input("x", shape=(None, 5))
        y = g.input("y", shape=(None,), dtype="int64")
        h = g.layer("a", nn.Linear(5, 4), x, actor=actor)
        g.loss("loss", nn.CrossEntropyLoss(), g.layer("b", nn.Linear(4, 3), h), y)
        return g

    tr = ann.Trainer(
        graph(NoWeightHalf), optimizer=optim.SGD(lr=0.1), policy=policies.ZeroBubbleH1(2)
    )
    with pytest.raises(TypeError, match="overrides on_backward and on_backward_input only; "
                       "override on_backward_weight too"):  # fmt: skip
        tr.fit(classification_data(8), epochs=1, batch_size=8)
    tr = ann.Trainer(graph(Halves), optimizer=optim.SGD(lr=0.1), policy=policies.ZeroBubbleH1(2))
    tr.fit(classification_data(8), epochs=1, batch_size=8)


def test_stages_that_take_turns_must_share_a_placement():
    g = ann.Graph()
    h = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    sizes = [5, 6, 6, 6, 3]
    for s in range(4):
        h = g.layer(f"s{s}", nn.Linear(sizes[s], sizes[s + 1]), h, worker=s % 2 if s else 1)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    with pytest.raises(Exception, match=r"runs layers \['s0', 's2'\] on one device") as info:
        ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Interleaved1F1B(2)).fit(
            classification_data(8), epochs=1, batch_size=8
        )
    assert "different workers" in str(info.value) or "different workers" in str(
        info.value.__cause__
    )


def test_a_zero_bubble_run_replays_exactly(tmp_path):
    path = str(tmp_path / "zb.trace")
    tr = ann.Trainer(
        chain_graph(4),
        optimizer=optim.SGD(lr=0.1, momentum=0.9),
        policy=policies.ZeroBubbleH1(4, virtual=2),
        trace=path,
        dtype="float64",
    )
    tr.fit(classification_data(16), epochs=1, batch_size=8)
    rep = ann.replay(path)
    assert rep.identical, rep.first_divergence
    # the trace records the halves as backwards, telling them apart in meta
    starts = [e for e in ann.trace.read(path).events if e.what == "start"]
    assert {(e.kind, e.meta.get("half")) for e in starts} == {
        ("forward", None),
        ("backward", "input"),
        ("backward", "weight"),
    }


def test_zero_bubble_policy_spec_and_checks():
    p = policies.ZeroBubbleH1(4, virtual=2)
    assert p.splits_backward() and p.waits_between_minibatches()
    assert not p.allows_capture(4, traced=False)
    assert policies.policy_from_spec(p.to_spec()) == p
    assert policies.DelayCompensation(p).splits_backward()  # a wrapper delegates it
    assert not policies.OneFOneB(4).splits_backward()
    with pytest.raises(ValueError, match=r"ZeroBubbleH1\(virtual=0\)"):
        policies.ZeroBubbleH1(4, virtual=0)
    with pytest.raises(ValueError, match="not a multiple of virtual=2"):
        p.orders(["a", "b", "c"])
    # alone on its device, a stage takes no turns
    assert policies.ZeroBubbleH1(4).orders(["a", "b"])["a"].device_turns() is None
    orders = p.orders(["a", "b", "c", "d"])
    assert orders["a"].device_turns() is orders["c"].device_turns()
    assert orders["a"].device_turns() is not orders["b"].device_turns()


# -- the bubble in virtual time ---------------------------------------------------------------------
VIRTUAL_BUSY: dict[str, float] = {}
COSTS = {"forward": 1.0, "backward": 2.0, "input": 1.0, "weight": 1.0}  # F = B = W, B + W = 2 F


class VirtualCostActor(ann.LayerActor):
    """The real actor, its (tiny) math inline, and each operation then taking a fixed time on a
    virtual clock (trio's MockClock jumps to the next deadline when every task waits): the run's
    timeline is the schedule's, with no overhead and no other process in it."""

    async def compute(self, fn, *args, cost=None):
        return fn(*args)

    async def _costs(self, what: str) -> None:
        await anyio.sleep(COSTS[what])
        VIRTUAL_BUSY[self.name] = VIRTUAL_BUSY.get(self.name, 0.0) + COSTS[what]

    async def on_forward(self, key, inputs, meta):
        out = await super().on_forward(key, inputs, meta)
        await self._costs("forward")
        return out

    async def on_backward(self, key, grad, meta):
        grads = await super().on_backward(key, grad, meta)
        await self._costs("backward")
        return grads

    async def on_backward_input(self, key, grad, meta):
        grads = await super().on_backward_input(key, grad, meta)
        await self._costs("input")
        return grads

    async def on_backward_weight(self, key, meta):
        await super().on_backward_weight(key, meta)
        await self._costs("weight")


def _virtual_bubble(policy, stages: int, devices: int, m: int) -> list[float]:
    """Each device's bubble (idle over busy time) over one minibatch of ``m`` keys, on the
    virtual clock."""
    import trio.testing

    g = ann.Graph()
    h = g.input("x", shape=(None, 3))
    y = g.input("y", shape=(None,), dtype="int64")
    for s in range(stages):
        h = g.layer(f"s{s}", nn.Linear(3, 3), h, actor=VirtualCostActor)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    batch = {"x": np.ones((m, 3)), "y": np.zeros(m, dtype=np.int64)}
    out = {}

    async def main() -> None:
        async with ann.open_run(g, optim.SGD(lr=0.1), policy, dtype="float64") as run:
            await run.step(batch)  # a first minibatch: every actor started
            await run.drain()
            VIRTUAL_BUSY.clear()
            t0 = trio.current_time()
            await run.step(batch)
            await run.drain()
            out["wall"] = trio.current_time() - t0

    clock = trio.testing.MockClock(autojump_threshold=0)
    anyio.run(main, backend="trio", backend_options={"clock": clock})
    busy = [sum(VIRTUAL_BUSY[f"s{s}"] for s in range(d, stages, devices)) for d in range(devices)]
    return [(out["wall"] - b) / b for b in busy]


@pytest.mark.parametrize(
    "name,k,v,m",
    [
        ("OneFOneB", 3, 1, 6),
        ("Interleaved1F1B", 2, 2, 4),
        ("Interleaved1F1B", 3, 2, 6),
        ("Interleaved1F1B", 2, 3, 4),
        ("ZeroBubbleH1", 3, 1, 6),
        ("ZeroBubbleH1", 4, 1, 4),
        ("ZeroBubbleH1", 2, 2, 4),
        ("Interleaved1F1B", 2, 2, 5),  # M not a multiple of PyTorch's rounds: one round
        ("ZeroBubbleH1", 2, 2, 5),
    ],
)
def test_the_runtime_realizes_each_schedules_bubble_on_a_virtual_clock(name, k, v, m):
    """Equal stages (F = B = W: fixed virtual-time work), no overhead: the measured bubble of
    each device (idle over busy time) is (K-1)/M under 1F1B, (K-1)/(M V) under interleaved 1F1B
    and (K-1)/(3 M V) under zero bubble (ZB-H1 for V = 1), exactly, so below 1F1B's at the same
    K and M; the runtime's turns and split backwards add no idle of their own. (On the wall
    clock: experiments/pipeline_bubble.py.)"""
    policy = {
        "OneFOneB": lambda: policies.OneFOneB(m),
        "Interleaved1F1B": lambda: policies.Interleaved1F1B(m, virtual=v),
        "ZeroBubbleH1": lambda: policies.ZeroBubbleH1(m, virtual=v),
    }[name]()
    want = (k - 1) / (m * v) / (3 if name == "ZeroBubbleH1" else 1)
    assert _virtual_bubble(policy, k * v, k, m) == pytest.approx([want] * k, abs=1e-9)


def test_fewer_microbatches_than_devices_leave_a_larger_bubble():
    # (docs/policies.md: the bubble is (D - 1) / (M V) for M >= D; D = 4, V = 2, M = 3: 2/3)
    bubbles = _virtual_bubble(policies.Interleaved1F1B(3, virtual=2), 8, 4, 3)
    assert bubbles == pytest.approx([2 / 3] * 4, abs=1e-9)


@pytest.mark.parametrize(
    "policy", [policies.Interleaved1F1B(5, virtual=2), policies.ZeroBubbleH1(5, virtual=2)]
)
def test_microbatches_pytorch_refuses_run_in_one_round_and_equal_the_plain_loop(policy):
    # M = 5 on 2 devices is not a multiple of PyTorch's rounds (2): each full minibatch runs
    # the order of one round of 5, the short last one (2 keys) PyTorch's own
    data = classification_data(24)  # minibatches of 11, 11 and 2 rows
    g = chain_graph(4)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1, momentum=0.9), policy=policy, dtype="float64")
    start = tr.params
    hist = tr.fit(data, epochs=2, batch_size=11)
    ref, ref_losses = plain_sgd(
        g, start, optim.SGD(lr=0.1, momentum=0.9), minibatches(data, 11) * 2
    )
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hist.losses, ref_losses, rtol=1e-10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("base", [policies.Interleaved1F1B, policies.ZeroBubbleH1])
def test_a_stage_order_made_alone_takes_no_turns(base):
    # (stage_order gave each stage a schedule and turns of its own: stage 0 waited for stage
    # 2's turn on a device object no other stage used, and a policy built on it stalled)
    @dataclass(frozen=True)
    class OnItsOwn(policies.Policy):
        microbatches: int = 4

        def stage_order(self, stage, num_stages):
            return base(self.microbatches, virtual=2).stage_order(stage, num_stages)

        def splits_backward(self):
            return base is policies.ZeroBubbleH1

    assert OnItsOwn().stage_order(0, 4).device_turns() is None
    assert base(4, virtual=2).orders(["a", "b", "c", "d"])["a"].device_turns() is not None
    data = classification_data(16)
    g = chain_graph(4)
    tr = ann.Trainer(
        g, optimizer=optim.SGD(lr=0.1), policy=OnItsOwn(), dtype="float64", stall_timeout=10
    )
    start = tr.params
    tr.fit(data, epochs=1, batch_size=8)
    ref, _ = plain_sgd(g, start, optim.SGD(lr=0.1), minibatches(data, 8))
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)


def test_a_layer_count_not_a_multiple_of_virtual_is_refused_with_the_fix():
    g = chain_graph(6)
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Interleaved1F1B(4, 4))
    with pytest.raises(ValueError, match=r"virtual=4\)?.*give virtual one of \[1, 2, 3, 6\]"):
        tr.fit(classification_data(8), epochs=1, batch_size=8)


def test_without_turns_the_stages_of_a_device_would_overlap(monkeypatch):
    """The same run with the turns switched off: a device's two stages compute at once (as two
    devices would), and its measured bubble is no longer the schedule's (0 instead of 1/8)."""
    from asyncnn._runtime._interleaved import _InterleavedOrder

    monkeypatch.setattr(_InterleavedOrder, "device_turns", lambda self: None)
    bubbles = _virtual_bubble(policies.Interleaved1F1B(4, virtual=2), 4, 2, 4)
    assert min(bubbles) < 0.125 - 0.05


@pytest.mark.parametrize("k,m", [(4, 8), (4, 2), (3, 3)])
def test_zero_bubble_peaks_at_1f1b_memory_though_every_stage_holds_up_to_k_keys(k, m):
    # docs/policies.md: ZB-H1's peak over the stages is 1F1B's, min(K, M) keys, while each
    # stage holds that many (1F1B's stage s: min(K - s, M)); it defers weight halves
    data = classification_data(4 * m)
    peaks = {}
    for policy in (policies.OneFOneB(m), policies.ZeroBubbleH1(m)):
        tr = ann.Trainer(chain_graph(k), optimizer=optim.SGD(lr=0.1), policy=policy)
        hist = tr.fit(data, epochs=1, batch_size=2 * m)
        peaks[policy.name] = [hist.statistics[n].peak_stored for n in tr.graph.layers]
    assert peaks["OneFOneB"] == [min(k - s, m) for s in range(k)]
    assert peaks["ZeroBubbleH1"] == [min(k, m)] * k
