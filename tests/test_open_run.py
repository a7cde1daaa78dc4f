"""What ``open_run`` (asyncnn/_runtime/_open_run.py) checks of a run's ``state`` before anything
starts: the gradients summed and not applied yet with their delays, and the optimizer
states."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import optim, policies
from asyncnn._math._pytree import tree_leaves, tree_map

from _reference import chain_graph, classification_data, minibatches

pytestmark = pytest.mark.timeout(60)


class _NoCluster:
    """A cluster that must never be reached: ``open_run`` refuses the state before it."""

    def open_run(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("open_run sent a state it should have refused to the cluster")


def _pending_state() -> tuple[ann.Trainer, ann.RunState]:
    """An ``Async(1, 2)`` trainer after 3 keys: one gradient pending at each layer."""
    tr = ann.Trainer(
        chain_graph(3), optimizer=optim.SGD(lr=0.1, momentum=0.9), policy=policies.Async(1, 2),
        dtype="float64",
    )  # fmt: skip
    tr.fit(classification_data(24), epochs=1, batch_size=8)
    assert {n: c for n, (_, c) in tr.state.pending_grads.items()} == dict.fromkeys(
        tr.graph.layers, 1
    )
    return tr, tr.state


async def _open(tr: ann.Trainer, state: ann.RunState, **options: Any) -> None:
    async with ann.open_run(
        tr.graph, optimizer=tr.optimizer, policy=tr.policy, dtype="float64", state=state,
        **options,
    ) as run:  # fmt: skip
        await run.step(minibatches(classification_data(8), 8)[0])
        await run.drain()


_WHERE = [{}, {"validated": True}, {"cluster": _NoCluster()}]


@pytest.mark.anyio
@pytest.mark.parametrize("where", _WHERE, ids=["checked", "validated", "cluster"])
async def test_open_run_refuses_pending_gradients_that_do_not_fit_the_layer(where):
    # (a sum of a broadcastable shape was added into the layer's next gradient by numpy, with
    # no error: the layer trained on a wrong gradient)
    tr, state = _pending_state()
    acc, count = state.pending_grads["stage0"]
    narrow = tree_map(lambda a: np.ones((1, *a.shape[1:])) if a.ndim > 1 else a, acc)
    at = r"state.pending_grads\['stage0'\]"
    cases = [
        ({"stage0": (narrow, count)}, ValueError,
         rf"{at}\[0\]\[0\]\['weight'\] has shape \(1, 6\); the layer's is \(5, 6\)"),
        ({"stage0": ([acc[0]], count)}, ValueError, rf"{at}\[0\] must be a list of 2 entries"),
        ({"stage0": (acc, -1)}, ValueError, rf"{at} counts -1 gradients, which is not a count"),
        ({"stage0": (acc, True)}, ValueError, rf"{at} counts True gradients"),
        ({"stage0": (acc, 1.0)}, ValueError, rf"{at} counts 1.0 gradients"),
        ({"stage0": (acc, 1, 1)}, ValueError, rf"{at} must be a pair \(sum, count\)"),
        ({"nope": (acc, 1)}, ValueError,
         r"state.pending_grads names 'nope', which is no layer of the graph"),
        ([("stage0", (acc, 1))], TypeError, r"state.pending_grads must be \{layer: \(sum, count\)"),
    ]  # fmt: skip
    for pending, error, match in cases:
        bad = dataclasses.replace(state, pending_grads=pending)
        with pytest.raises(error, match=f"^open_run: {match}"):
            await _open(tr, bad, **where)


@pytest.mark.anyio
async def test_open_run_takes_pending_gradients_that_fit():
    tr, state = _pending_state()
    acc, _ = state.pending_grads["stage0"]
    fine = {
        "stage0": [acc, np.int64(1)],  # (a pair as a list, a numpy count: as decoded)
        "stage1": (None, 2),  # skipped keys sum no array
        "stage2": (None, 0),
    }
    await _open(tr, dataclasses.replace(state, pending_grads=fine))
    # a numpy count stays a count (the cast of integer weights made it np.float32(1.0), and
    # run.state() then failed on "slice indices must be integers")
    given = dataclasses.replace(state, pending_grads={"stage0": (acc, np.int64(1))})
    async with ann.open_run(
        tr.graph, optimizer=tr.optimizer, policy=tr.policy, dtype="float32", state=given
    ) as run:  # fmt: skip
        (_, count) = run.state().pending_grads["stage0"]
        assert count == 1 and isinstance(count, int | np.integer)
        await run.step(minibatches(classification_data(8), 8)[0])
        await run.drain()
        run.state()


@pytest.mark.anyio
@pytest.mark.parametrize("where", _WHERE, ids=["checked", "validated", "cluster"])
async def test_open_run_refuses_pending_delays_that_do_not_fit_the_gradients(where):
    # (the update applying the carried gradients averages their delays into a remedy's
    # correction and counts them in the statistics)
    tr, state = _pending_state()
    assert state.pending_delays == dict.fromkeys(tr.graph.layers, [0])
    at = r"state.pending_delays\['stage0'\]"
    cases = [
        ({"stage0": [0, 0]}, ValueError,
         rf"{at} holds 2 delays, more than the 1 gradients state.pending_grads\['stage0'\]"),
        ({"stage0": [-1]}, ValueError, rf"{at} holds the delay -1, which is not an int >= 0"),
        ({"stage0": [True]}, ValueError, rf"{at} holds the delay True"),
        ({"stage0": [1.0]}, ValueError, rf"{at} holds the delay 1.0"),
        ({"stage0": 1}, ValueError, rf"{at} must be a list of the delays"),
        ({"nope": [1]}, ValueError,
         r"state.pending_delays names 'nope', which is no layer of the graph"),
        ([("stage0", [1])], TypeError, r"state.pending_delays must be \{layer: \[delay, ...\]\}"),
    ]  # fmt: skip
    for delays, error, match in cases:
        bad = dataclasses.replace(state, pending_delays=delays)
        with pytest.raises(error, match=f"^open_run: {match}"):
            await _open(tr, bad, **where)


@pytest.mark.anyio
async def test_open_run_loads_the_pending_delays_of_the_gradients_it_carries():
    tr, state = _pending_state()
    given = {"stage0": [np.int64(2)], "stage1": [1]}  # (a numpy delay: as decoded)
    # stage1's gradients dropped, its delays with them; stage2's gradients have none
    carried = {n: state.pending_grads[n] for n in ("stage0", "stage2")}
    start = dataclasses.replace(state, pending_grads=carried, pending_delays=given)
    async with ann.open_run(
        tr.graph, optimizer=tr.optimizer, policy=tr.policy, dtype="float64", state=start
    ) as run:  # fmt: skip
        loaded = run.state().pending_delays
        assert loaded == {"stage0": [2]} and type(loaded["stage0"][0]) is int
        await run.step(minibatches(classification_data(8), 8)[0])
        await run.drain()
        stats = run.statistics()
    assert start.pending_delays is given  # (the caller's state left as it was)
    # the update applying stage0's carried gradient counts its delay; stage1 has no update yet
    # (its gradients dropped), stage2's counts its new gradient's alone
    assert stats["stage0"].delays == {2: 1, 0: 1} and stats["stage1"].delays == {}
    assert stats["stage2"].delays == {0: 1}


@pytest.mark.anyio
@pytest.mark.parametrize("where", _WHERE, ids=["checked", "validated", "cluster"])
async def test_open_run_refuses_optimizer_states_that_do_not_fit_the_layer(where):
    # (found only at the layer's first update, inside the run, after the compute before it)
    tr, state = _pending_state()
    state = dataclasses.replace(state, pending_grads={})
    sgd = state.opt_states["stage0"]
    narrow = tree_map(lambda a: np.zeros((1, *a.shape[1:])) if np.ndim(a) > 1 else a, sgd)
    cases = [
        (narrow, r"state.opt_states\['stage0'\]\['momentum_buffer'\]\[0\]\['weight'\] has shape "
                 r"\(1, 6\); the layer's is \(5, 6\)"),
        ({"step": 3}, r"state.opt_states\['stage0'\] must be a dict with keys \['momentum_buffer', "
                      r"'step'\], as SGD.init\(params\) makes it; got \['step'\]"),
        ({**sgd, "step": -1}, r"state.opt_states\['stage0'\]\['step'\] must be an int >= 0"),
        (None, r"state.opt_states\['stage0'\] must be a dict with keys .* got NoneType"),
        # not floating: no cast to the run's dtype makes it one (it failed in the first update)
        (tree_map(lambda a: a.astype(np.int32) if np.ndim(a) else a, sgd),
         r"state.opt_states\['stage0'\]\['momentum_buffer'\]\[0\]\['bias'\] is int32; an "
         r"optimizer's buffer is a floating array"),
        (tree_map(lambda a: a > 0 if np.ndim(a) else a, sgd),
         r"state.opt_states\['stage0'\]\['momentum_buffer'\]\[0\]\['bias'\] has dtype bool"),
    ]  # fmt: skip
    for opt_state, match in cases:
        bad = dataclasses.replace(state, opt_states={**state.opt_states, "stage0": opt_state})
        with pytest.raises(ValueError, match=f"^open_run: {match}"):
            await _open(tr, bad, **where)
    # a state of another optimizer
    with pytest.raises(ValueError, match=r"state.opt_states\['stage0'\] must be a dict with keys "
                       r"\['exp_avg', 'exp_avg_sq', 'step'\], as Adam.init"):  # fmt: skip
        async with ann.open_run(
            tr.graph, optimizer=optim.Adam(lr=0.1), policy=tr.policy, state=state, **where
        ):
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("where", _WHERE, ids=["checked", "validated", "cluster"])
async def test_open_run_refuses_a_state_whose_cast_to_its_dtype_overflows(where):
    # (a float32 state of weights 1e5 opened in a float16 run computed on Inf weights, with no
    # word; so did optimizer buffers and pending gradients, where data that overflows is refused)
    tr, state = _pending_state()  # (float64, SGD with momentum, a gradient pending at each layer)
    fix = r": rescale the {}, or run in a wider dtype \(dtype='float32' on open_run\)$"

    def big(tree: Any, value: float) -> Any:
        return tree_map(lambda a: np.full_like(a, value) if np.ndim(a) else a, tree)

    params = {**state.params, "stage1": big(state.params["stage1"], -7e4)}
    acc, count = state.pending_grads["stage2"]
    momentum = state.opt_states["stage0"]
    cases = [
        (dataclasses.replace(state, params=params),
         r"state.params\['stage1'\]\[0\]\['bias'\] has -70000, which overflows the run's dtype "
         r"float16 to -Inf \(its largest value is 65504\)", "weights"),
        (dataclasses.replace(state, opt_states={**state.opt_states, "stage0": big(momentum, 1e9)}),
         r"state.opt_states\['stage0'\]\['momentum_buffer'\]\[0\]\['bias'\] has 1e\+09, which "
         r"overflows the run's dtype float16 to Inf", "optimizer's buffers"),
        (dataclasses.replace(
            state, pending_grads={**state.pending_grads, "stage2": (big(acc, 1e6), count)}),
         r"state.pending_grads\['stage2'\]\[0\]\[0\]\['bias'\] has 1e\+06, which overflows",
         "pending gradients"),
    ]  # fmt: skip
    for bad, match, what in cases:
        with pytest.raises(ValueError, match=f"^open_run: {match}.*{fix.format(what)}"):
            async with ann.open_run(
                tr.graph, optimizer=tr.optimizer, policy=tr.policy, dtype="float16", state=bad,
                **where,
            ):  # fmt: skip
                pass
    # a buffer too small for float16 becomes 0, as a cast does: not an error (nor a NaN or Inf
    # the state holds itself, which is the run's check_finite's to find)
    small = dataclasses.replace(
        state, opt_states={**state.opt_states, "stage0": big(momentum, 1e-10)}
    )
    async with ann.open_run(
        tr.graph, optimizer=tr.optimizer, policy=tr.policy, dtype="float16", state=small
    ) as run:  # fmt: skip
        buffers = tree_leaves(run.state().opt_states["stage0"]["momentum_buffer"])
        assert all(b.dtype == np.float16 and not b.any() for b in buffers)


@pytest.mark.anyio
async def test_open_run_names_a_graph_spec_in_a_short_message():
    # (a graph's spec, a dict, was printed whole in the message)
    spec = chain_graph(3).to_spec()
    with pytest.raises(TypeError, match=r"graph must be an asyncnn.Graph.*Graph.from_spec") as e:
        async with ann.open_run(spec, optimizer=optim.SGD(), policy=policies.Sync()):
            pass
    assert len(str(e.value)) < 300
    with pytest.raises(TypeError, match=r"^open_run: graph must be an asyncnn.Graph, got None$"):
        async with ann.open_run(None, optimizer=optim.SGD(), policy=policies.Sync()):
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("where", _WHERE, ids=["checked", "validated", "cluster"])
async def test_open_run_refuses_versions_and_counters_that_are_not_counts(where):
    # (a float version read back from JSON trained, and Trainer.save then wrote a checkpoint
    # that Trainer.load refuses; a string one failed mid-run with a bare TypeError)
    tr, state = _pending_state()
    versions = dict(state.versions)
    cases = [
        ({"versions": {**versions, "stage0": 5.0}},
         r"state.versions\['stage0'\] is 5.0, which is not a version \(an int >= 0"),
        ({"versions": {**versions, "stage0": -1}}, r"state.versions\['stage0'\] is -1"),
        ({"versions": {**versions, "stage0": "7"}}, r"state.versions\['stage0'\] is '7'"),
        ({"versions": {**versions, "stage0": True}}, r"state.versions\['stage0'\] is True"),
        ({"minibatches": -3}, r"state.minibatches is -3, which is not a count \(an int >= 0"),
        ({"minibatches": "7"}, r"state.minibatches is '7'"),
        ({"keys": 2.0}, r"state.keys is 2.0"),
    ]  # fmt: skip
    for change, match in cases:
        with pytest.raises(ValueError, match=f"^open_run: {match}"):
            await _open(tr, dataclasses.replace(state, **change), **where)


@pytest.mark.anyio
@pytest.mark.parametrize("where", _WHERE, ids=["checked", "validated", "cluster"])
async def test_open_run_refuses_a_state_with_layers_the_graph_lacks(where):
    # (they were taken silently; Trainer.load refuses a checkpoint with such layers)
    tr, state = _pending_state()
    for field in ("params", "opt_states", "versions"):
        held = getattr(state, field)
        bad = dataclasses.replace(state, **{field: {**held, "ghost": held["stage0"]}})
        with pytest.raises(
            ValueError, match=rf"^open_run: state.{field} has layers \['ghost'\], which the graph "
        ):
            await _open(tr, bad, **where)


@pytest.mark.anyio
async def test_open_run_takes_numpy_counts_as_ints_and_casts_integer_weights():
    # (numpy ints as a decoder gives them; integer weights as Trainer.params = ... casts them:
    # they entered the run as ints and the layer failed at its first backward on a None
    # gradient)
    tr, state = _pending_state()
    ints = tree_map(lambda a: np.round(a * 4).astype(np.int32), state.params["stage0"])
    start = dataclasses.replace(
        state,
        versions={n: np.int64(v) for n, v in state.versions.items()},
        minibatches=np.int64(state.minibatches),
        keys=np.int64(state.keys),
        params={**state.params, "stage0": ints},
    )
    async with ann.open_run(
        tr.graph, optimizer=tr.optimizer, policy=tr.policy, dtype="float64", state=start
    ) as run:  # fmt: skip
        await run.step(minibatches(classification_data(8), 8)[0])
        await run.drain()
        after = run.state()
    assert all(type(v) is int for v in after.versions.values())
    assert type(after.minibatches) is int and type(after.keys) is int
    assert after.versions["stage0"] == state.versions["stage0"] + 1
    assert all(leaf.dtype == np.float64 for leaf in tree_leaves(after.params["stage0"]))
    assert start.params["stage0"] is ints  # (the caller's state left as it was)


@pytest.mark.anyio
@pytest.mark.parametrize("where", _WHERE, ids=["checked", "validated", "cluster"])
async def test_open_run_refuses_a_weight_given_as_a_list_naming_it(where):
    # (it was reported as a fault of the optimizer state, "a list of 10 entries (one per
    # module)", or failed inside the run)
    tr, state = _pending_state()
    p = state.params["stage0"]
    listed = [{**p[0], "weight": p[0]["weight"].tolist()}, *p[1:]]
    bad = dataclasses.replace(state, params={**state.params, "stage0": listed})
    with pytest.raises(
        ValueError,
        match=r"^open_run: state.params\['stage0'\]\[0\]\['weight'\] is a list of numbers, not an "
        r"array",
    ):
        await _open(tr, bad, **where)
