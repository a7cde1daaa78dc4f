"""PipeDream-2BW against its published rule, short minibatches included."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies
from asyncnn.policies import OneFOneBOrder

from _reference import assert_params_close, chain_graph, classification_data, minibatches


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
