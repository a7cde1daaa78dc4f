"""The capture's bookkeeping (``asyncnn/_runtime/_capture.py``) on the CPU, with a numpy stand-in
for CUDA graphs (``tests/_graphs_stand_in.py``): slots per key under flushes, one set of buffers
when streaming, a slot and a weight copy per key in flight under a stash, eviction, captures that
fail (traces of captured runs: ``tests/test_device_path_emulated.py``).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._math._pytree import tree_map

from _reference import assert_params_equal


def _train(policy, batches, graphs, control=None, optimizer=None, graph=None):
    modules = [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8),
               nn.Tanh(), nn.Linear(8, 3)]  # fmt: skip
    g = graph or ann.Graph.sequential(
        modules, loss=nn.CrossEntropyLoss(), stages=4, balance="params"
    )
    out: dict[str, Any] = {}
    if control is not None:
        control["actors"].clear()
    opt = optim.SGD(lr=0.05, momentum=0.5) if optimizer is None else optimizer

    async def main():
        async with ann.open_run(
            g, opt, policy, dtype="float64", cuda_graphs=graphs
        ) as run:  # fmt: skip
            for b in batches:
                await run.step(b)
            await run.drain()
            out["active"] = run.cuda_graphs_active
            if control is not None:
                actors = control["actors"]
                out["stats"] = {a.name: a.graphs.stats for a in actors}
                out["slots"] = {a.name: a.graphs.base.slots for a in actors}
                out["busy"] = {a.name: set(a.graphs.base.busy) for a in actors}
                layers = [a for a in actors if hasattr(a.graphs, "grad_sum")]
                out["summed"] = {a.name: len(a.graphs.grad_sum) for a in layers}
                out["update_grads"] = {
                    a.name: [c.tree for c in a.graphs.updates.values()] for a in layers
                }
                out["sums"] = {a.name: a.graphs.grad_sum_tree for a in layers}
                out["summing"] = {
                    a.name: [k for k in a.graphs.updates if k[0] == "summed"] for a in layers
                }
                out["update_keys"] = {a.name: list(a.graphs.updates) for a in layers}
                out["update_steps"] = {
                    a.name: [int(c.frozen["step"]) for c in a.graphs.updates.values()]
                    for a in layers
                }
        out["params"] = run.state().params
        out["losses"] = [run.losses[i] for i in sorted(run.losses)]

    anyio.run(main)
    return out


def _batches(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 6)), "y": rng.integers(0, 3, n)} for n in sizes]


@pytest.mark.parametrize(
    "policy",
    [policies.Sync(), policies.GPipe(4), policies.OneFOneB(4), policies.PipeDream(4),
     policies.PipeDream(8), policies.PipeDream(4, stash=False),
     policies.Async(max_active_keys=1, min_update_frequency=3, stash=True)],
    ids=["sync", "gpipe4", "1f1b4", "pipedream4", "pipedream8", "pipedream4-recompute",
         "async1-stash"],
)  # fmt: skip
def test_emulated_graphs_equal_the_eager_run_bit_for_bit(emulated, policy):
    batches = _batches([16] * 10)
    eager = _train(policy, batches, False)
    graphs = _train(policy, batches, True, emulated)
    assert graphs["active"]
    assert all(st.replays and not st.failures for st in graphs["stats"].values()), graphs
    assert graphs["busy"] == {name: set() for name in graphs["busy"]}  # every slot given back
    assert graphs["losses"] == eager["losses"]
    assert_params_equal(graphs["params"], eager["params"])


def test_a_stash_takes_no_more_slots_than_keys_in_flight_and_survives_eviction(emulated):
    # batches of many sizes: more signatures than the cache keeps, evicted while in use
    rng = np.random.default_rng(1)
    batches = _batches([int(n) for n in rng.integers(8, 24, 30)])
    eager = _train(policies.PipeDream(4), batches, False)
    graphs = _train(policies.PipeDream(4), batches, True, emulated)
    assert graphs["slots"]["stage0"] == 4 and max(graphs["slots"].values()) <= 4
    assert_params_equal(graphs["params"], eager["params"])


def test_a_forward_whose_capture_fails_keeps_its_own_weights(emulated):
    # its eager pullback must not read the static weight buffers a later update writes
    emulated["fail"] = lambda name, n: n % 3 == 0
    batches = _batches([16] * 12)
    eager = _train(policies.PipeDream(4), batches, False)
    graphs = _train(policies.PipeDream(4), batches, True, emulated)
    assert any(st.failures for st in graphs["stats"].values())
    assert_params_equal(graphs["params"], eager["params"])


def test_the_failed_signatures_and_their_messages_stay_bounded(emulated, monkeypatch):
    # every forward capture fails and every shape comes twice: the failed signatures and the
    # statistics' messages grew by one a shape, for as long as the run lasted
    from asyncnn._runtime import _capture

    monkeypatch.setattr(_capture, "_SEEN_KEPT", 4)
    monkeypatch.setattr(_capture, "_FAILURES_KEPT", 3)
    emulated["fail"] = lambda name, n: True
    batches = _batches([n for n in range(3, 13) for _ in range(2)], seed=4)
    eager = _train(policies.Sync(), batches, False)
    graphs = _train(policies.Sync(), batches, True, emulated)
    assert graphs["losses"] == eager["losses"]
    assert_params_equal(graphs["params"], eager["params"])
    stages = [a for a in emulated["actors"] if a.name.startswith("stage")]
    assert all(len(a.graphs.base.failed) <= 4 for a in stages)
    failures = [st.failures for name, st in graphs["stats"].items() if name.startswith("stage")]
    # the latest kept: the last three shapes' (10, 11 and 12 rows)
    assert all([m.split(",")[0] for m in f] == ["((((10", "((((11", "((((12"] for f in failures)


@pytest.mark.parametrize(
    "policy", [policies.Sync(), policies.GPipe(4), policies.PipeDream(4, stash=True)],
    ids=["sync", "gpipe4", "pipedream4-stash"],
)  # fmt: skip
def test_a_backward_whose_capture_fails_drops_its_forward_from_graph_bytes(
    emulated, monkeypatch, policy
):
    # every backward capture of stage1 fails: its forward graphs are dropped, their memory
    # (1000 bytes a capture here) stayed counted in graph_bytes for the rest of the run
    from asyncnn._runtime import _capture

    inner = _capture._Graphs._capture

    def capture(self, fn, warm=None):
        if self.actor.name == "stage1" and "_backward" in getattr(warm, "__qualname__", ""):
            raise self.g.CaptureError("this backward capture fails (test)")
        graph, result, keep = inner(self, fn, warm)
        return graph, result, (keep[0], types.SimpleNamespace(nbytes=1000))

    monkeypatch.setattr(_capture._Graphs, "_capture", capture)
    batches = _batches([16] * 6, seed=10)
    eager = _train(policy, batches, False)
    graphs = _train(policy, batches, True, emulated)
    assert graphs["losses"] == eager["losses"]
    assert_params_equal(graphs["params"], eager["params"])
    layers = [a for a in emulated["actors"] if a.name.startswith("stage")]
    assert any(a.stats.graph_bytes for a in layers)  # (the other stages' graphs are counted)
    for a in layers:
        assert a.stats.graph_bytes == a.graphs.base.memory(), a.name
    assert not any(e for a in layers if a.name == "stage1" for e in a.graphs.entries)


@pytest.mark.parametrize(
    "policy", [policies.GPipe(3), policies.OneFOneB(4)], ids=["gpipe3", "1f1b4"]
)
def test_a_flush_sums_its_keys_gradients_at_the_update_into_what_the_update_reads(emulated, policy):
    # minibatches of 14 rows make keys of other shapes, eager at first sight: a minibatch then
    # mixes captured keys (whose sum waits) and eager ones (the order of the sum is kept)
    batches = _batches([16, 16, 16, 14, 16, 14, 16, 16, 14, 16], seed=2)
    eager = _train(policy, batches, False)
    graphs = _train(policy, batches, True, emulated)
    assert graphs["losses"] == eager["losses"]
    assert_params_equal(graphs["params"], eager["params"])
    for name, count in graphs["summed"].items():
        if name.startswith("stage"):  # every stage has parameters here
            assert count, name
            # the captured update reads the sum's own buffers: no copy into its inputs
            assert any(g is graphs["sums"][name] for g in graphs["update_grads"][name]), name
            # and sums the keys' gradients itself, from their graphs' buffers: one graph for
            # the minibatches of 16 rows, one for those of 14 (at most two are kept)
            assert len(graphs["summing"][name]) == 2, name


@pytest.mark.parametrize(
    "optimizer",
    [optim.SGD(lr=0.05, momentum=0.5, clip_norm=1.0),
     optim.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), None],
    ids=["clipped", "nesterov-sums", "update-does-not-sum"],
)  # fmt: skip
def test_an_update_that_cannot_read_the_sum_gets_it_summed_first(emulated, optimizer):
    # a clip reads the gradients before the update: the sum is made first; an update whose
    # summing capture fails (None here: the stand-in says it read its gradients) too. (Adam's
    # captured update reads its step's scalars from the device, which numpy's cannot: the GPU
    # test covers it)
    emulated["not_summed"] = optimizer is None
    batches = _batches([16] * 6, seed=5)
    eager = _train(policies.OneFOneB(4), batches, False, optimizer=optimizer)
    graphs = _train(policies.OneFOneB(4), batches, True, emulated, optimizer=optimizer)
    assert graphs["losses"] == eager["losses"]
    assert_params_equal(graphs["params"], eager["params"])
    summing = {n: len(k) for n, k in graphs["summing"].items() if n.startswith("stage")}
    want = 1 if optimizer is not None and optimizer.clip_norm is None else 0
    assert summing == dict.fromkeys(summing, want), summing
    if optimizer is None:
        assert all(
            any("summed" in f and "read its gradients" in f for f in st.failures)
            for n, st in graphs["stats"].items() if n.startswith("stage")
        ), graphs["stats"]  # fmt: skip


def test_gradients_still_owed_are_summed_when_a_run_state_asks(emulated):
    graphs = _train(policies.GPipe(4), _batches([16] * 4), True, emulated)
    assert graphs["summed"]["stage0"]
    actor = emulated["actors"][0]
    a = {"w": np.array([1.0, 2.0]), "b": np.array([0.5])}
    b = {"w": np.array([0.25, -1.0]), "b": np.array([2.0])}
    actor.acc, actor.acc_count = None, 2
    actor._owed = (a, b)  # (as two captured keys of a minibatch in flight leave them)
    acc = actor.acc
    np.testing.assert_array_equal(acc["w"], [1.25, 1.0])
    np.testing.assert_array_equal(acc["b"], [2.5])
    assert acc["w"] is not a["w"] and not actor._owed
    actor._owed = (b,)  # one more, added to what was summed
    np.testing.assert_array_equal(actor.acc["w"], [1.5, 0.0])
    actor.acc = None  # (a run's state restored: nothing owed)
    assert actor.acc is None and not actor._owed


@dataclasses.dataclass(frozen=True)
class _KeepsLastGradient(optim.Optimizer):
    """``p -= lr * (g + g_before / 2)``: keeps the gradient it was given, as its state."""

    lr: float = 0.05
    clip_norm: float | None = None

    def buffer_names(self):
        return ("before",)

    def update_leaf(self, p, g, buffers, step, lr):
        return p - lr * (g + 0.5 * buffers[0]), (g,)


@pytest.mark.parametrize("policy", [policies.Sync(), policies.GPipe(3)], ids=["sync", "gpipe3"])
def test_an_optimizer_of_ones_own_may_keep_the_gradients_it_is_given(emulated, policy):
    # (the gradients handed to an update are the graphs' own buffers, or the sum's: a later
    # backward or sum wrote over what the optimizer kept)
    batches = _batches([12] * 6, seed=3)
    eager = _train(policy, batches, False, optimizer=_KeepsLastGradient())
    graphs = _train(policy, batches, True, emulated, optimizer=_KeepsLastGradient())
    assert graphs["active"]
    assert_params_equal(graphs["params"], eager["params"])


class _HalfUpdate(ann.LayerActor):
    """Applies half of each gradient it is given: an actor reading its update's gradients."""

    async def apply_gradients(self, grads):
        half = await self.compute(tree_map, lambda g: g * 0.5, grads, cost=0)
        await super().apply_gradients(half)


def _half_update_graph():
    g = ann.Graph()
    x, y = g.input("x", (None, 6)), g.input("y", (None,), dtype="int64")
    h = g.layer("stage0", nn.Sequential(nn.Linear(6, 8), nn.Tanh()), x, actor=_HalfUpdate)
    h = g.layer("stage1", nn.Linear(8, 3), h)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


@pytest.mark.parametrize(
    "policy", [policies.Sync(), policies.GPipe(4), policies.OneFOneB(4)],
    ids=["sync", "gpipe4", "1f1b4"],
)  # fmt: skip
def test_an_actor_that_overrides_apply_gradients_gets_the_summed_gradients(emulated, policy):
    # under a flush the captured update sums its keys' gradients itself: an override of
    # apply_gradients read the sum's buffers unwritten (the first update's gradients, again)
    batches = _batches([16] * 8, seed=9)
    eager = _train(policy, batches, False, graph=_half_update_graph())
    graphs = _train(policy, batches, True, emulated, graph=_half_update_graph())
    assert graphs["active"] and all(st.replays for st in graphs["stats"].values())
    assert graphs["losses"] == eager["losses"]
    assert_params_equal(graphs["params"], eager["params"])
    # the layer of the built-in actor still leaves the sum to its captured update
    if not isinstance(policy, policies.Sync):
        assert graphs["summing"]["stage1"] and not graphs["summing"]["stage0"], graphs["summing"]


@dataclasses.dataclass(frozen=True)
class _UpdateEveryTwoMinibatches(policies.GPipe):
    """A flush whose update sums two minibatches, telling no minibatch done."""

    def minibatch_done(self, backwards_done, minibatch_keys):
        return False

    def update_due(self, backwards_since_update, minibatch_done):
        return backwards_since_update == 2 * self.microbatches

    def gradient_scale(self, accumulated):
        return 1.0 / accumulated


def test_a_flush_that_updates_across_minibatches_sums_before_the_graphs_run_again(emulated):
    policy = _UpdateEveryTwoMinibatches(3)
    batches = _batches([12] * 8, seed=4)
    eager = _train(policy, batches, False)
    graphs = _train(policy, batches, True, emulated)
    assert graphs["active"] and all(st.replays for st in graphs["stats"].values())
    assert graphs["losses"] == eager["losses"]
    assert_params_equal(graphs["params"], eager["params"])


def test_summing_graphs_of_rotating_shapes_are_kept_not_captured_again(emulated):
    # minibatches of three sizes in turn: three sets of backward graphs, each summed by its own
    # update graph; the least recently used is evicted only past MAX_SIGNATURES (kept in the
    # order they were made, the three were captured again at every minibatch once past two)
    policy = policies.OneFOneB(4)
    counts = []
    for rounds in (4, 8):
        emulated["count"].clear()
        batches = _batches([16, 12, 8] * rounds, seed=6)
        eager = _train(policy, batches, False)
        graphs = _train(policy, batches, True, emulated)
        assert graphs["losses"] == eager["losses"]
        assert_params_equal(graphs["params"], eager["params"])
        assert {n: len(k) for n, k in graphs["summing"].items()} == dict.fromkeys(
            graphs["summing"], 3
        )
        counts.append(dict(emulated["count"]))
    assert counts[0] == counts[1]  # twice the minibatches, no capture more


@pytest.mark.parametrize(
    "optimizer",
    [optim.SGD(lr=optim.CosineAnnealing(0.05, total_steps=12), momentum=0.5),
     optim.SGD(lr=optim.StepLR(0.05, step_size=3, gamma=0.5)),
     optim.Adam(lr=optim.CosineAnnealing(0.01, total_steps=12))],
    ids=["sgd-cosine-momentum", "sgd-step", "adam-cosine"],
)  # fmt: skip
def test_an_update_under_a_schedule_is_captured_once_for_every_step(emulated, optimizer):
    # SGD's update token held its learning rate: under a schedule changing it every step no
    # update was ever captured. It reads the rate from the device now, as Adam's reads its
    # scalars: one graph from the second step on (the first, with momentum's first buffer, its
    # own), and the run equal to the eager one
    batches = _batches([16] * 12, seed=7)
    eager = _train(policies.Sync(), batches, False, optimizer=optimizer)
    graphs = _train(policies.Sync(), batches, True, emulated, optimizer=optimizer)
    assert graphs["losses"] == eager["losses"]
    assert_params_equal(graphs["params"], eager["params"])
    token = ("adam",) if isinstance(optimizer, optim.Adam) else ("sgd", None, False)
    assert graphs["update_keys"] == dict.fromkeys(graphs["update_keys"], [("update", token)])
    # ... and launched up to the last step (a replay keeps the step its Python sees current)
    assert graphs["update_steps"] == dict.fromkeys(graphs["update_steps"], [11])
    assert all(st.replays and not st.failures for st in graphs["stats"].values())


@pytest.mark.parametrize(
    "policy", [policies.GPipe(4), policies.OneFOneB(4)], ids=["gpipe4", "1f1b4"]
)
def test_a_summing_update_under_a_schedule_is_captured_once(emulated, policy):
    # under a flush the update reads its keys' gradients itself: one summing graph for every
    # step after the first, the schedule's rate read from the device as Sync's update reads it
    opt = optim.SGD(lr=optim.CosineAnnealing(0.05, total_steps=10), momentum=0.5)
    batches = _batches([16] * 10, seed=8)
    eager = _train(policy, batches, False, optimizer=opt)
    graphs = _train(policy, batches, True, emulated, optimizer=opt)
    assert graphs["losses"] == eager["losses"]
    assert_params_equal(graphs["params"], eager["params"])
    for name, keys in graphs["summing"].items():
        assert [k[1] for k in keys] == [("sgd", None, False)], (name, keys)
    assert graphs["update_steps"] == dict.fromkeys(graphs["update_steps"], [9])


def test_the_sightings_of_new_signatures_stay_bounded(emulated, monkeypatch):
    # every step's batch a new size: every actor's sightings grew by one entry a step, for as
    # long as the run lasted
    from asyncnn._runtime import _capture

    monkeypatch.setattr(_capture, "_SEEN_KEPT", 6, raising=False)
    batches = _batches(list(range(3, 17)), seed=7)
    eager = _train(policies.Sync(), batches, False)
    graphs = _train(policies.Sync(), batches, True, emulated)
    assert graphs["losses"] == eager["losses"]
    assert_params_equal(graphs["params"], eager["params"])
    seen = {a.name: len(a.graphs.base.seen) for a in emulated["actors"]}
    assert max(seen.values()) <= 6, seen
    assert all(not st.replays and st.eager for st in graphs["stats"].values())
