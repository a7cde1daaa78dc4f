"""Each policy's semantics (DESIGN.md section 2) against plain, independent references."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies
from asyncnn.policies import OneFOneBOrder

from _reference import (
    OPTIMIZERS,
    assert_params_close,
    assert_params_equal,
    chain_graph,
    classification_data,
    composed_loss,
    minibatches,
    one_f_one_b_order,
    pipedream_reference,
    plain_sgd,
)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("policy_name", ["Sync", "GPipe", "OneFOneB"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_flush_policies_equal_plain_minibatch_training_float64(policy_name, k, opt_name):
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
def test_flush_policies_float32_within_1e5(policy):
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
def test_pipedream_matches_sequential_1f1b_reenactment(k, m, stash):
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


def test_order_formula_matches_design():
    # DESIGN.md: w = min(K - s - 1, M) warm-ups, then F(w+i), B(i), then the rest of the Bs.
    for k in range(1, 5):
        for s in range(k):
            for m in range(1, 9):
                order = OneFOneBOrder(k - s - 1, flush=True)
                seq = []
                for _ in range(2 * m):
                    op = order.next()
                    seq.append(("F" if op[0] == "forward" else "B", op[1]))
                    order.done(op, m)
                assert seq == one_f_one_b_order(s, k, m), (k, s, m)
                # the next minibatch starts over with the next keys
                assert order.next() == ("forward", m)


def test_peak_stored_activations():
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


def test_deterministic_policies_are_bit_identical_with_random_sleeps():
    import time

    from asyncnn import nn

    rng = np.random.default_rng(123)

    class Sleepy(nn.Linear):
        def __call__(self, params, x, *, rng_=None, rng=None):
            time.sleep(float(np.random.default_rng().uniform(0, 0.003)))
            return super().__call__(params, x)

    data = classification_data(24)
    for policy in [policies.GPipe(4), policies.OneFOneB(4), policies.PipeDream(3, stash=True)]:
        results = []
        for _ in range(3):
            g = ann.Graph.sequential(
                [Sleepy(5, 8), nn.Tanh(), Sleepy(8, 8), nn.Tanh(), Sleepy(8, 3)],
                loss=nn.CrossEntropyLoss(),
                stages=[2, 2, 1],
                input_shape=(None, 5),
            )
            tr = ann.Trainer(g, optimizer=optim.Adam(lr=0.01), policy=policy, dtype="float32")
            tr.fit(data, epochs=2, batch_size=8, shuffle=True)
            results.append(tr.params)
        assert_params_equal(results[0], results[1])
        assert_params_equal(results[0], results[2])
    _ = rng


def test_async_trains_and_counts_updates():
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


def test_policy_specs_round_trip_and_validate():
    for p in [
        policies.Sync(),
        policies.GPipe(3),
        policies.OneFOneB(2),
        policies.PipeDream(4, stash=False),
        policies.Async(8, 2, stash=True),
    ]:
        assert policies.policy_from_spec(p.to_spec()) == p
    with pytest.raises(ValueError, match="microbatches"):
        policies.GPipe(0)
    with pytest.raises(ValueError, match="max_active_keys"):
        policies.Async(max_active_keys=0)
    # a string such as "no" is truthy: it would silently mean stash=True
    with pytest.raises(ValueError, match=r"PipeDream\(stash='no'\): stash must be True or False"):
        policies.PipeDream(4, stash="no")
    with pytest.raises(ValueError, match=r"Async\(stash=0\): stash must be True or False"):
        policies.Async(stash=0)


def test_policy_counts_and_flags_take_numpy_values_as_plain_ones():
    # (a numpy integer, as a sweep over np.arange gives, was refused with "microbatches must be
    # an int >= 1", though Graph.sequential's stages and fit's batch_size take one)
    import json

    made = [
        (policies.GPipe(np.int64(4)), policies.GPipe(4)),
        (policies.OneFOneB(np.int32(3)), policies.OneFOneB(3)),
        (policies.PipeDream(np.int64(2), stash=np.False_), policies.PipeDream(2, stash=False)),
        (policies.PipeDream2BW(np.uint8(3)), policies.PipeDream2BW(3)),
        (policies.Async(np.int64(3), np.int16(2), np.True_), policies.Async(3, 2, True)),
        (policies.Interleaved1F1B(np.int64(4), np.int64(2)), policies.Interleaved1F1B(4, 2)),
        (policies.ZeroBubbleH1(np.int64(4), np.int64(2)), policies.ZeroBubbleH1(4, 2)),
    ]
    for got, want in made:
        assert got == want and got.to_spec() == want.to_spec()
        args = got.to_spec()["args"]
        assert all(type(v) in (int, bool) for v in args.values()), args
        assert policies.policy_from_spec(json.loads(json.dumps(got.to_spec()))) == want
    assert policies.interleaved_1f1b_schedule(
        np.int64(2), np.int64(2), np.int64(4)
    ) == policies.interleaved_1f1b_schedule(2, 2, 4)
    for bad in [True, np.True_, 0, np.int64(0), -1, 2.0, None, "4"]:
        with pytest.raises(ValueError, match=r"GPipe\(microbatches=.*\): microbatches must be"):
            policies.GPipe(bad)
        with pytest.raises(ValueError, match=r"ZeroBubbleH1\(virtual=.*\): virtual must be"):
            policies.ZeroBubbleH1(4, virtual=bad)
    with pytest.raises(ValueError, match=r"Async\(min_update_frequency=np.False_\)"):
        policies.Async(4, np.False_)
    with pytest.raises(ValueError, match=r"PipeDream\(stash=np.int64\(1\)\): stash must be"):
        policies.PipeDream(2, stash=np.int64(1))


@pytest.mark.parametrize("warmup", [-1, -3, 1.0, True, "2"])
def test_a_1f1b_order_refuses_a_warmup_that_is_not_a_count(warmup):
    # (a negative warm-up planned a backward before its forward: the run stalled, and a policy
    # such as docs/policies.md's OneFOneBWarm with extra=-1 failed only after stall_timeout)
    with pytest.raises(ValueError, match=r"OneFOneBOrder\(warmup=.*\): warmup must be None"):
        OneFOneBOrder(warmup, flush=True)
    with pytest.raises(ValueError, match=r"OneFOneBOrder\(flush='no'\)"):
        OneFOneBOrder(1, flush="no")
    assert OneFOneBOrder(np.int64(0), flush=True).next() == ("forward", 0)


def test_split_refuses_a_minibatch_of_no_rows():
    # (split(0) divided by zero; a run refuses an empty batch before it asks)
    for p in [policies.GPipe(3), policies.Sync(), policies.Interleaved1F1B(4, 2)]:
        with pytest.raises(ValueError, match=r"split\(rows=0\): rows must be an int >= 1"):
            p.split(0)
    assert policies.GPipe(3).split(np.int64(7)) == [(0, 3), (3, 5), (5, 7)]


# -- what each policy decides is one of its methods ----------------------------------------------
@pytest.mark.parametrize("rows", [1, 5, 8, 64, 67])
@pytest.mark.parametrize("m", [1, 3, 4, 8])
def test_split_follows_numpy_array_split(rows, m):
    parts = policies.GPipe(microbatches=m).split(rows)
    sizes = [len(a) for a in np.array_split(np.arange(rows), min(m, rows))]
    assert [hi - lo for lo, hi in parts] == sizes
    assert parts[0][0] == 0 and parts[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))


def test_policy_methods_state_each_decision():
    assert policies.Sync().keeps_pullback() and policies.Sync().waits_between_minibatches()
    assert policies.PipeDream(4, stash=True).keeps_pullback()
    assert not policies.PipeDream(4, stash=False).keeps_pullback()
    assert (
        not policies.Async(4).keeps_pullback() and not policies.Async(4).waits_between_minibatches()
    )
    assert policies.Sync().allows_capture(3, traced=False)
    assert policies.OneFOneB(1).allows_capture(3, traced=False)
    assert policies.Sync().allows_capture(3, traced=True)  # the trace copies behind the graphs
    assert policies.GPipe(4).allows_capture(3, traced=False)  # flushes: graphs per key
    assert policies.OneFOneB(4).allows_capture(3, traced=False)
    # keys streaming: the latest weights (recomputed) or a stash (a slot per key in flight)
    assert policies.PipeDream(1).allows_capture(3, traced=False)  # stashes: a slot per key
    assert policies.PipeDream(1, stash=False).allows_capture(3, traced=False)
    assert policies.Async(1).allows_capture(3, traced=False)
    assert policies.Async(1, stash=True).allows_capture(3, traced=False)
    assert policies.Async(1).allows_capture(3, traced=True)
    assert policies.Sync().minibatch_done(2, 2) and not policies.Sync().minibatch_done(1, 2)


def test_capture_needs_forwards_and_backwards_at_the_latest_weights():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Predicting(policies.Async):
        def predicts_weights(self) -> bool:
            return True

    @dataclass(frozen=True)
    class Averaging(policies.Async):
        def weight_change_decay(self) -> float | None:
            return 0.9

    @dataclass(frozen=True)
    class UpdatingInside(policies.OneFOneB):  # a flush, but updates within the minibatch
        def update_due(self, backwards_since_update: int, minibatch_done: bool) -> bool:
            return True

    assert policies.Async(2).allows_capture(3, traced=False)
    assert not UpdatingInside(4).allows_capture(3, traced=False)
    assert UpdatingInside(1).allows_capture(3, traced=False)  # one key: nothing in between
    assert not Predicting(2).allows_capture(3, traced=False)
    assert not Averaging(2).allows_capture(3, traced=False)
    assert not policies.PipeDream2BW(4).allows_capture(3, traced=False)  # pinned versions
    assert not policies.ZeroBubbleH1(4).allows_capture(3, traced=False)  # split backward
    # a wrapper keeps its wrapped policy's answer and the general rule over its own decisions
    assert not policies.WeightPrediction(policies.Async(2)).allows_capture(3, traced=False)


def test_replay_policy_keeps_the_recorded_meaning_and_orders():
    seen = []
    recorded = policies.PipeDream(microbatches=3, stash=False)
    ops = [("forward", 0), ("forward", 1), ("backward", 0)]
    rp = policies.Replay(recorded, {"stage0": ops}, keys=9, isolated="stage0",
                         on_op=lambda *a: seen.append(a))  # fmt: skip
    assert rp.split(7) == recorded.split(7) and rp.microbatches == 3 and not rp.stash
    assert rp.max_in_flight(2) == 9 and not rp.keeps_pullback()
    assert rp.update_due(1, False) and rp.loss_cotangent(2, 6) == recorded.loss_cotangent(2, 6)
    assert not rp.waits_between_minibatches()
    # captured as the recorded run was (the same order: the same captures)
    assert rp.allows_capture(1, traced=True) == recorded.allows_capture(1, traced=True)
    assert not policies.Replay(policies.PipeDream2BW(2), {}).allows_capture(1, traced=True)
    assert not rp.delivers("stage0") and policies.Replay(recorded, {}).delivers("stage0")
    assert rp.to_spec() == recorded.to_spec()
    order = rp.order_for("stage0", 0, 2)
    for op in ops:
        assert order.next() == op
        order.done(op, 3)
    assert order.next() == ("forward", -1)  # afterwards: nothing more
    assert seen == [("stage0", i, k, key) for i, (k, key) in enumerate(ops)]
    assert rp.order_for("stage1", 1, 2).next() == ("forward", -1)


# -- PipeDream-2BW -------------------------------------------------------------------------------
def two_bw_reference(graph, params, opt, batches):
    """PipeDream-2BW's published rule, in sequence: W(t+1) = W(t) - update(grad f_t(W(t-1))),
    f_t the mean loss of minibatch t (W(-1) = W(0))."""
    from _reference import composed_loss

    history = [[params[n] for n in graph.layers]]
    state = opt.init(history[0])
    for t, b in enumerate(batches):
        used = history[max(t - 1, 0)]
        g = ann.grad(lambda p, b=b: composed_loss(graph, p, b["x"], b["y"]))(used)
        new, state = opt.update(history[-1], g, state)
        history.append(new)
    return dict(zip(graph.layers, history[-1], strict=True))


@pytest.mark.parametrize("k,m", [(2, 1), (3, 2), (3, 4), (4, 3)])
def test_pipedream_2bw_follows_its_published_rule(k, m):
    data = classification_data(40)
    g = chain_graph(k)
    opt = lambda: optim.SGD(lr=0.1, momentum=0.5)  # noqa: E731
    tr = ann.Trainer(g, optimizer=opt(), policy=policies.PipeDream2BW(m), dtype="float64")
    start = tr.params
    hist = tr.fit(data, epochs=2, batch_size=8)
    ref = two_bw_reference(g, start, opt(), minibatches(data, 8) * 2)
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    assert tr.versions == {name: 10 for name in g.layers}  # one update per minibatch
    for name in g.layers:
        st = hist.statistics[name]
        assert st.delays == {0: m, 1: 9 * m}  # the first minibatch's gradient is fresh
        assert st.peak_versions_held <= 2  # double buffering


def test_pipedream_2bw_states_its_decisions():
    p = policies.PipeDream2BW(4)
    assert not p.waits_between_minibatches() and p.keeps_pullback() and p.max_in_flight(3) == 3
    assert p.versions_kept() == 1 and p.forward_version(0, 7, 7) == 7
    assert p.forward_version(5, 7, 12) == 11
    assert policies.policy_from_spec(p.to_spec()) == p
    with pytest.raises(ValueError, match="microbatches >= 4"):
        policies.PipeDream2BW(3).stage_order(0, 5)


# A minibatch cut into fewer than K - 1 keys (a short last minibatch of an epoch) ended the run:
# "the policy pins key 7 (minibatch 3) to version 2, but the layer holds versions [0] and 1".
# Stage 0 of 1F1B forwards the minibatch after it before its update from two minibatches back
# is made; the forwards now wait for it, keeping the published rule exactly.
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "rows,batch_size,epochs",
    [(17, 8, 2), (18, 8, 2), (17, 8, 1), (2, 8, 3), (1, 8, 4)],
    ids=["last-1-row", "last-2-rows", "last-1-row-one-epoch", "epoch-of-2-rows", "epoch-of-1-row"],
)
def test_pipedream_2bw_follows_its_rule_through_short_minibatches(rows, batch_size, epochs):
    # 4 stages, M = 3 = K - 1: a minibatch of 1 or 2 rows has fewer keys than K - 1 (the last
    # two cases: every minibatch, the whole epoch being one)
    data = classification_data(rows)
    g = chain_graph(4)
    opt = lambda: optim.SGD(lr=0.1, momentum=0.5)  # noqa: E731
    tr = ann.Trainer(
        g, optimizer=opt(), policy=policies.PipeDream2BW(3), dtype="float64", stall_timeout=10
    )
    start = tr.params
    batches = minibatches(data, batch_size) * epochs
    hist = tr.fit(data, epochs=epochs, batch_size=batch_size)
    ref = two_bw_reference(g, start, opt(), batches)
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    assert tr.versions == {name: len(batches) for name in g.layers}  # one update per minibatch
    keys = [min(3, len(b["y"])) for b in batches]
    for name in g.layers:
        st = hist.statistics[name]
        # the first minibatch's gradient is fresh, every later one a version behind
        assert st.delays == ({0: keys[0], 1: sum(keys[1:])} if len(keys) > 1 else {0: keys[0]})
        assert st.peak_versions_held <= 2  # still double buffering
        assert st.stored == 0


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_pipedream_2bw_steps_short_minibatches_through_open_run():
    # minibatches of 8, 1, 2, 8, 1, 1, 8, 2, 8 rows on 5 stages (M = 4): several short ones in
    # a row, and a drain (the end of a stream) after a short one
    data = classification_data(39)
    sizes = [8, 1, 2, 8, 1, 1, 8, 2, 8]
    bounds = np.cumsum([0, *sizes])
    batches = [{k: v[bounds[i] : bounds[i + 1]] for k, v in data.items()} for i in range(9)]
    g = chain_graph(5)
    opt = lambda: optim.Adam(lr=0.01)  # noqa: E731
    policy = policies.PipeDream2BW(4)
    with anyio.fail_after(45):
        async with ann.open_run(g, optimizer=opt(), policy=policy, dtype="float64") as run:
            start = run.params
            for i, b in enumerate(batches):
                await run.step(b)
                if i == 4:
                    await run.drain()
            await run.drain()
    assert sorted(run.losses) == list(range(len(batches)))
    ref = two_bw_reference(g, start, opt(), batches)
    assert_params_close(run.params, ref, rtol=1e-10, atol=1e-12)


def test_pipedream_2bw_order_waits_for_the_pinned_version():
    # stage 0 of 4 (warm-up 3), minibatches of 3, 1 and 3 keys: minibatch 2's forwards (keys
    # 4..6) use the version after minibatch 0's update, so they come after B(0) .. B(2); plain
    # 1F1B would have forwarded key 4 right after B(0)
    order = policies.PipeDream2BW(3).stage_order(0, 4)
    sizes = [3, 3, 3, 1, 3, 3, 3]  # the keys of each key's minibatch
    seq = []
    for _ in range(14):
        op = order.next()
        if op == ("forward", 7):  # the stream ends with key 6
            order.end_of_stream(7)
            op = order.next()
        seq.append(("F" if op[0] == "forward" else "B", op[1]))
        order.done(op, sizes[op[1]])
    assert seq == [
        ("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0), ("B", 1), ("B", 2),
        ("F", 4), ("F", 5), ("F", 6), ("B", 3), ("B", 4), ("B", 5), ("B", 6),
    ]  # fmt: skip
    # full minibatches (M >= K - 1 keys) never wait: plain 1F1B over the stream
    for k, m in [(2, 1), (3, 2), (4, 3), (4, 5)]:
        for s in range(k):
            order = policies.PipeDream2BW(m).stage_order(s, k)
            plain = OneFOneBOrder(k - s - 1, flush=False)
            for _ in range(6 * m):
                op = order.next()
                assert op == plain.next(), (k, m, s)
                order.done(op, m)
                plain.done(op, m)


# -- interleaved 1F1B ----------------------------------------------------------------------------
def _torch_device_orders(devices, virtual, m):
    """PyTorch's ScheduleInterleaved1F1B order of each rank, without a process group (its own
    schedule visualizer instantiates the schedule on mocked stages), idle slots left out."""
    pytest.importorskip("torch")
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B

    ranks = get_schedule_ops(ScheduleInterleaved1F1B, devices, m, virtual)
    kinds = {"FORWARD": "forward", "FULL_BACKWARD": "backward"}
    return [
        [(kinds[a.computation_type.name], a.stage_index, a.microbatch_index) for a in r if a]
        for r in ranks
    ]


@pytest.mark.parametrize(
    "d,v,m",
    [(2, 2, 4), (2, 2, 6), (2, 3, 8), (3, 2, 3), (3, 2, 6), (4, 2, 8), (4, 3, 4), (4, 2, 2)],
)
def test_interleaved_1f1b_order_equals_pytorchs(d, v, m):
    assert policies.interleaved_1f1b_schedule(d, v, m) == _torch_device_orders(d, v, m)


def test_interleaved_1f1b_stages_follow_their_part_of_the_device_order():
    d, v, m = 2, 2, 4
    policy = policies.Interleaved1F1B(m, virtual=v)
    names = [f"s{i}" for i in range(d * v)]
    orders = policy.orders(names)
    device_ops = policies.interleaved_1f1b_schedule(d, v, m)
    for first_key in (0, 4):  # two minibatches: the part restarts with the next keys
        for i, name in enumerate(names):
            want = [(k, first_key + mb) for k, st, mb in device_ops[i % d] if st == i]
            got = []
            for _ in range(2 * m):
                op = orders[name].next()
                got.append(op)
                orders[name].done(op, m)
            assert got == want, name
    with pytest.raises(ValueError, match="multiple of the rounds"):
        policies.interleaved_1f1b_schedule(2, 2, 5)
    with pytest.raises(ValueError, match="not a multiple of virtual=2"):
        policy.orders(names[:3])
    assert policies.policy_from_spec(policy.to_spec()) == policy


@pytest.mark.parametrize("k,v,m", [(4, 2, 4), (6, 2, 3), (6, 3, 4)])
def test_interleaved_1f1b_equals_plain_minibatch_training_and_is_bit_identical(k, v, m):
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


@pytest.mark.parametrize(
    "d,v,m", [(2, 2, 4), (2, 3, 6), (3, 2, 3), (3, 2, 6), (4, 2, 8), (4, 3, 2)]
)
def test_interleaved_zero_bubble_order_equals_pytorchs(d, v, m):
    pytest.importorskip("torch")
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
    from torch.distributed.pipelining.schedules import ScheduleInterleavedZeroBubble

    kinds = {
        "FORWARD": "forward",
        "BACKWARD_INPUT": "backward_input",
        "BACKWARD_WEIGHT": "backward_weight",
    }
    ranks = get_schedule_ops(ScheduleInterleavedZeroBubble, d, m, v)
    want = [
        [(kinds[a.computation_type.name], a.stage_index, a.microbatch_index) for a in r if a]
        for r in ranks
    ]
    assert policies.interleaved_zero_bubble_schedule(d, v, m) == want


def _torch_schedule_ops(schedule_class, devices, virtual, m):
    """Each rank's order under one of PyTorch's multi-stage schedules, made on mocked stages
    (as its visualizer does, but for any ``virtual`` >= 1), idle slots left out."""
    from unittest import mock

    from torch.distributed.pipelining.stage import PipelineStage

    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod = 0, devices, None
    stage.num_stages = devices * virtual
    sched = schedule_class([stage] * virtual, m)
    kinds = {
        "FORWARD": "forward",
        "FULL_BACKWARD": "backward",
        "BACKWARD_INPUT": "backward_input",
        "BACKWARD_WEIGHT": "backward_weight",
    }
    return [
        [
            (kinds[a.computation_type.name], a.stage_index, a.microbatch_index)
            for a in sched.pipeline_order[rank]
            if a is not None and a.computation_type.name in kinds
        ]
        for rank in range(devices)
    ]


@pytest.mark.parametrize("schedule", ["ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble"])
def test_interleaved_orders_and_refusals_equal_pytorchs_over_a_grid(schedule):
    # every D <= 4, V <= 3 (V = 1: ZB-H1 and 1F1B's interleaved form), M <= 10: M below D, not
    # a multiple of D, 1; each order equals PyTorch's and each M PyTorch refuses is refused
    pytest.importorskip("torch")
    from torch.distributed.pipelining import schedules

    cls = getattr(schedules, schedule)
    ours = {
        "ScheduleInterleaved1F1B": policies.interleaved_1f1b_schedule,
        "ScheduleInterleavedZeroBubble": policies.interleaved_zero_bubble_schedule,
    }[schedule]
    refused = 0
    for d in range(1, 5):
        for v in range(1, 4):
            for m in range(1, 11):
                try:
                    want = _torch_schedule_ops(cls, d, v, m)
                except ValueError as exc:
                    assert "multiple of the number of rounds" in str(exc)
                    with pytest.raises(ValueError, match="multiple of the rounds"):
                        ours(d, v, m)
                    refused += 1
                    continue
                assert ours(d, v, m) == want, (d, v, m)
    assert refused == 18  # M = 5, 7, 9 on 2 devices, M = 7, 10 on 3, M = 9 on 4, for each V


def _torch_single_stage_order(schedule_class, k, s, m):
    """The order PyTorch's ScheduleGPipe or Schedule1F1B runs at stage ``s`` of ``k`` (its
    ``_step_microbatches`` on a mocked stage that records each forward and backward; its
    ``pipeline_order`` of the last stage of Schedule1F1B starts at microbatch 1)."""
    from unittest import mock

    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining.stage import PipelineStage

    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod = s, k, None
    stage.num_stages, stage.stage_index = k, s
    stage.is_first, stage.is_last = s == 0, s == k - 1
    seen = []
    stage.forward_one_chunk.side_effect = lambda i, *a, **kw: seen.append(("F", i))
    stage.backward_one_chunk.side_effect = lambda i, *a, **kw: seen.append(("B", i))
    sched = schedule_class(stage, m)
    quiet = [mock.patch.object(schedules, "_batch_p2p", lambda *a, **kw: [])]
    quiet.append(mock.patch.object(schedules, "_wait_batch_p2p", lambda *a, **kw: None))
    for name in ("_initialize_stage", "_maybe_compute_loss", "_maybe_get_loss", "_update_losses"):
        quiet.append(mock.patch.object(sched, name))
    for patch in quiet:
        patch.start()
    try:
        sched._step_microbatches([() for _ in range(m)], [{} for _ in range(m)])
    finally:
        for patch in quiet:
            patch.stop()
    return seen


@pytest.mark.parametrize("name", ["GPipe", "OneFOneB"])
def test_gpipe_and_1f1b_orders_equal_pytorchs(name):
    # every stage of K <= 5 with M <= 9 (M below K only for GPipe: PyTorch's 1F1B refuses it;
    # ours caps the warm-up at M, test_order_formula_matches_design)
    pytest.importorskip("torch")
    from torch.distributed.pipelining import schedules

    cls = {"GPipe": schedules.ScheduleGPipe, "OneFOneB": schedules.Schedule1F1B}[name]
    for k in range(1, 6):
        for m in range(1 if name == "GPipe" else k, 10):
            for s in range(k):
                order = getattr(policies, name)(m).stage_order(s, k)
                got = []
                for _ in range(2 * m):
                    op = order.next()
                    got.append(("F" if op[0] == "forward" else "B", op[1]))
                    order.done(op, m)
                assert got == _torch_single_stage_order(cls, k, s, m), (k, s, m)


def test_replay_delegates_the_stale_gradient_decisions():
    recorded = policies.DelayCompensation(policies.PipeDream2BW(4), strength=0.5)
    rp = policies.Replay(recorded, {})
    assert rp.corrects_gradients() and rp.needs_forward_weights()
    assert rp.versions_kept() == 1 and rp.forward_version(3, 0, 3) == 2
    assert not rp.predicts_weights()
    g = {"w": np.ones(2)}
    w, w0 = {"w": np.full(2, 3.0)}, {"w": np.ones(2)}
    np.testing.assert_array_equal(rp.correct_gradient(g, 1, 5, w, w0)["w"], [2.0, 2.0])
    assert rp.predict_weights(w, w0, 2) is w  # no prediction: the latest weights
    wp = policies.Replay(policies.WeightPrediction(policies.PipeDream(2)), {})
    np.testing.assert_array_equal(wp.predict_weights(w, w0, 2)["w"], [7.0, 7.0])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(
    "policy", [policies.Sync(), policies.GPipe(4), policies.OneFOneB(3)], ids=str
)
def test_a_summed_loss_trains_as_the_plain_loop_under_every_flush_policy(policy, reduction):
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
def test_a_summed_loss_is_reported_whole_by_the_policies_that_update_per_key(policy):
    # with lr=0 every key's loss is taken at the starting weights: the minibatch's loss is the
    # summed loss of its rows there, however it was cut into keys
    data = classification_data(24)
    g = chain_graph(2, loss=ann.nn.CrossEntropyLoss("sum"))
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.0), policy=policy, dtype="float64")
    start = [tr.params[n] for n in g.layers]
    hist = tr.fit(data, epochs=1, batch_size=10)
    want = [float(composed_loss(g, start, b["x"], b["y"])) for b in minibatches(data, 10)]
    np.testing.assert_allclose(hist.losses, want, rtol=1e-10)


def test_pipedream_2bw_runs_a_layer_without_parameters_at_its_only_version():
    # (a layer without parameters never updates, but its forwards were pinned to the version
    # before the last minibatch's update like the others': from the third minibatch on it
    # failed, "pins key 8 (minibatch 2) to version 1, but the layer holds versions [] and 0")
    data = classification_data(40)
    mods = [ann.nn.Linear(5, 6), ann.nn.Tanh(), ann.nn.Linear(6, 6), ann.nn.Linear(6, 3)]
    g = ann.Graph.sequential(
        mods, loss=ann.nn.CrossEntropyLoss(), stages=[1, 1, 1, 1], input_shape=(None, 5)
    )
    opt = lambda: optim.SGD(lr=0.1, momentum=0.5)  # noqa: E731
    tr = ann.Trainer(g, optimizer=opt(), policy=policies.PipeDream2BW(3), dtype="float64")
    start = tr.params
    tr.fit(data, epochs=2, batch_size=8)
    ref = two_bw_reference(g, start, opt(), minibatches(data, 8) * 2)
    assert_params_close(tr.params, ref, rtol=1e-10, atol=1e-12)
    assert tr.versions == {"stage0": 10, "stage1": 0, "stage2": 10, "stage3": 10}
