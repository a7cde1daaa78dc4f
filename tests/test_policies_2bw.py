"""PipeDream-2BW against its published rule, short minibatches included."""

from __future__ import annotations

import dataclasses

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies
from asyncnn.policies import OneFOneBOrder

from _reference import (
    assert_params_close,
    assert_params_equal,
    chain_graph,
    classification_data,
    minibatches,
)


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


# -- one stream across fits and runs --------------------------------------------------------------
# Each fit started its stream anew: its first minibatch's forwards computed at the latest weights,
# where one unbroken run used the version before them (the state kept no earlier version), so two
# fits of N minibatches differed from one fit of 2N.
def _two_bw_trainer(k: int = 3) -> ann.Trainer:
    return ann.Trainer(
        chain_graph(k), optimizer=optim.SGD(lr=0.1, momentum=0.5),
        policy=policies.PipeDream2BW(2), dtype="float64",
    )  # fmt: skip


def test_pipedream_2bw_continues_bit_identically_across_fits():
    data = classification_data(40)
    straight = _two_bw_trainer()
    start = straight.params
    straight.fit(data, epochs=2, batch_size=8)
    split = _two_bw_trainer()
    split.fit(data, epochs=1, batch_size=8)
    # the state holds each layer's version before the latest: that after 4 minibatches
    earlier = split.state.earlier_params
    assert {n: sorted(e) for n, e in earlier.items()} == {n: [4] for n in split.graph.layers}
    four = _two_bw_trainer()
    four.fit({k: v[:32] for k, v in data.items()}, epochs=1, batch_size=8)
    assert_params_equal({n: e[4] for n, e in earlier.items()}, four.params)
    hist = split.fit(data, epochs=1, batch_size=8)
    assert_params_equal(split.params, straight.params)
    for name in split.graph.layers:  # the second fit's first minibatch is a version behind too
        assert hist.statistics[name].delays == {1: 5 * 2}
    ref = two_bw_reference(chain_graph(3), start, optim.SGD(lr=0.1, momentum=0.5),
                           minibatches(data, 8) * 2)  # fmt: skip
    assert_params_close(split.params, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "remedy",
    [
        lambda p: policies.DelayCompensation(p, strength=0.5),  # reads the forward's weights
        lambda p: policies.PipeMareLR(p),  # corrects each update
    ],
    ids=["delay-compensation", "pipemare"],
)
def test_a_remedy_over_pipedream_2bw_continues_bit_identically_across_fits(remedy):
    data = classification_data(24)

    def trainer():
        return ann.Trainer(chain_graph(3), optimizer=optim.SGD(lr=0.1, momentum=0.5),
                           policy=remedy(policies.PipeDream2BW(2)), dtype="float64")  # fmt: skip

    straight = trainer()
    straight.fit(data, epochs=2, batch_size=8)
    split = trainer()
    split.fit(data, epochs=1, batch_size=8)
    split.fit(data, epochs=1, batch_size=8)
    assert_params_equal(split.params, straight.params)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_pipedream_2bw_run_state_carries_the_version_before_the_latest():
    batches = minibatches(classification_data(40), 8)
    opt = lambda: optim.Adam(lr=0.01)  # noqa: E731

    def run(state=None):
        return ann.open_run(
            chain_graph(3), optimizer=opt(), policy=policies.PipeDream2BW(2), dtype="float64",
            state=state,
        )  # fmt: skip

    async with run() as whole:
        for b in batches:
            await whole.step(b)
        await whole.drain()
    async with run() as first:
        for b in batches[:2]:
            await first.step(b)
        await first.drain()
    state = first.state()
    layers = ("stage0", "stage1", "stage2")
    assert {n: sorted(e) for n, e in state.earlier_params.items()} == {n: [1] for n in layers}
    async with run(state) as second:
        for b in batches[2:]:
            await second.step(b)
        await second.drain()
    assert_params_equal(second.params, whole.params)
    assert all(second.statistics()[n].delays == {1: 3 * 2} for n in layers)
    # a state without it (one built by hand, or of a checkpoint of an older asyncnn) starts the
    # stream anew: its first minibatch computes at the latest weights, as before
    async with run(dataclasses.replace(state, earlier_params={})) as anew:
        for b in batches[2:]:
            await anew.step(b)
        await anew.drain()
    assert all(anew.statistics()[n].delays == {0: 2, 1: 2 * 2} for n in layers)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_numpy_int_versions_of_earlier_params_are_taken_as_ints_traced_too(tmp_path):
    # open_run took np.int64 version keys, which the trace's encoding (and the cluster's wire)
    # refuse: a traced run computed every step, then failed writing its trace at the end
    tr = _two_bw_trainer(2)
    tr.fit(classification_data(16), epochs=1, batch_size=8)
    earlier = {
        n: {np.int64(v): p for v, p in e.items()} for n, e in tr.state.earlier_params.items()
    }
    state = dataclasses.replace(tr.state, earlier_params=earlier)
    path = str(tmp_path / "np.trace")
    async with ann.open_run(
        tr.graph, optimizer=tr.optimizer, policy=tr.policy, state=state, dtype="float64", trace=path
    ) as run:
        for b in minibatches(classification_data(16), 8):
            await run.step(b)
        await run.drain()
        assert all(type(v) is int for e in run.state().earlier_params.values() for v in e)
    assert ann.replay(path).identical


@pytest.mark.anyio
async def test_open_run_refuses_earlier_params_that_do_not_fit_the_state():
    tr = _two_bw_trainer(2)
    tr.fit(classification_data(16), epochs=1, batch_size=8)
    state = tr.state
    p = state.params["stage0"]
    wrong = [{"weight": np.zeros((5, 7)), "bias": np.zeros(7)}, {}]
    cases = [
        ({"nope": {1: p}}, r"state.earlier_params names 'nope', which is no layer of the graph"),
        ({"stage0": {2: p}}, r"state.earlier_params\['stage0'\] holds version 2, which is not "
                             r"below the layer's version 2"),
        ({"stage0": {-1: p}}, r"state.earlier_params\['stage0'\] holds version -1"),
        ({"stage0": {1: wrong}}, r"state.earlier_params\['stage0'\]\[1\]\[0\]\['bias'\] "
                                 r"has shape \(7,\); the layer's is \(6,\)"),
    ]  # fmt: skip
    for earlier, match in cases:
        bad = dataclasses.replace(state, earlier_params=earlier)
        with pytest.raises(ValueError, match=f"^open_run: {match}"):
            async with ann.open_run(tr.graph, optimizer=tr.optimizer, policy=tr.policy, state=bad):
                pass


def test_weights_set_between_fits_start_the_stream_anew_for_those_layers():
    # the version before the latest is of the weights the setter replaced: the next fit's first
    # minibatch computes at the weights set, as a fit from them always did
    data = classification_data(40)
    tr = _two_bw_trainer()
    tr.fit(data, epochs=1, batch_size=8)
    tr.params = {"stage1": tr.params["stage1"]}
    assert sorted(tr.state.earlier_params) == ["stage0", "stage2"]
    hist = tr.fit(data, epochs=1, batch_size=8)
    assert hist.statistics["stage1"].delays == {0: 2, 1: 4 * 2}
    assert hist.statistics["stage0"].delays == {1: 5 * 2}


@pytest.mark.timeout(60)
def test_a_traced_pipedream_2bw_fit_goes_on_from_the_version_before_and_replays(tmp_path):
    # a trace's initial state held the latest weights only, so a traced fit started its stream
    # anew (its first minibatch at the latest weights); it records the earlier version now, and
    # its replay starts from it too
    data = classification_data(24)
    straight = _two_bw_trainer()
    straight.fit(data, epochs=2, batch_size=8)
    tr = _two_bw_trainer()
    tr.trace = str(tmp_path / "run.trace")
    tr.fit(data, epochs=1, batch_size=8)
    hist = tr.fit(data, epochs=1, batch_size=8)
    assert hist.statistics["stage0"].delays == {1: 3 * 2}
    assert_params_equal(tr.params, straight.params)
    held = ann.trace.read(tr.traces[-1]).state["earlier"]  # (recorded: the replay's start)
    assert held and "stage0" in held["dict"]
    for path in tr.traces:
        assert ann.replay(path).identical


@pytest.mark.timeout(60)
def test_a_policy_that_pins_no_forwards_drops_the_earlier_versions(tmp_path):
    # a Sync fit after a PipeDream2BW one recorded the earlier versions in its trace (a second
    # copy of the weights) though nothing used them
    data = classification_data(16)
    tr = _two_bw_trainer(2)
    tr.fit(data, epochs=1, batch_size=8)
    assert tr.state.earlier_params
    tr.policy = policies.Sync()
    tr.trace = str(tmp_path / "sync.trace")
    tr.fit(data, epochs=1, batch_size=8)
    assert "earlier" not in ann.trace.read(tr.traces[-1]).state
    assert tr.state.earlier_params == {}
