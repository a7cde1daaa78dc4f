"""The capture's bookkeeping (``asyncnn/_runtime/_capture.py``) on the CPU, with a numpy stand-in
for CUDA graphs: slots per key under flushes, one set of buffers when streaming, a slot and a
weight copy per key in flight under a stash, eviction, captures that fail.

The stand-in "captures" a function by running it once and keeping the arrays it returned as the
graph's buffers; a launch runs the function again and writes the new results into those buffers,
as a replay writes its outputs in place. A pullback among the results is single-use, so the
stand-in's pullback recomputes the forward from the graph's input and weight buffers as they are
at the backward: it gives the eager result only if nothing wrote those buffers between the
forward and its backward, which is what a real graph's residuals need. Races between CUDA streams
are not modelled (tests/test_gpu_capture.py runs the real graphs on a GPU).
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
import asyncnn.backends
from asyncnn import nn, optim, policies
from asyncnn._math._pytree import tree_flatten, tree_unflatten
from asyncnn._runtime import _actors, _capture, _capture_loss, _loss_actor

from _reference import assert_params_equal


class _CaptureError(RuntimeError):
    pass


_capturing = [False]  # a capture records its copies, it does not make them


def _copy_into(dst: Any, src: Any) -> None:
    if not _capturing[0]:
        np.copyto(dst, src)


class _Graph:
    """A function run again at each launch, its array results written into the first run's."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        _capturing[0] = True
        try:
            leaves, self.treedef = tree_flatten(fn())
        finally:
            _capturing[0] = False
        # a numpy reduction gives a scalar, where cupy's gives a 0-d array a launch writes into
        self.leaves = [np.array(x) if isinstance(x, np.generic) else x for x in leaves]
        wrapped = [
            x if isinstance(x, np.ndarray) or not callable(x) else self._fresh(i)
            for i, x in enumerate(self.leaves)
        ]
        self.result = tree_unflatten(self.treedef, wrapped)

    def _fresh(self, i: int) -> Any:
        # a pullback: from a new run of the function, on the buffers as they are now
        return lambda *a: tree_flatten(self.fn())[0][i](*a)

    def launch(self, stream: Any) -> None:
        leaves, treedef = tree_flatten(self.fn())
        assert treedef == self.treedef
        for old, new in zip(self.leaves, leaves, strict=True):
            if isinstance(old, np.ndarray):
                old[...] = new


class _Pool:
    def total_bytes(self) -> int:
        return 0


@pytest.fixture
def emulated(monkeypatch):
    """CUDA graphs emulated on numpy, for CPU actors; yields a dict whose ``"fail"`` entry, a
    callable of (actor name, capture count), makes chosen forward captures fail."""
    control: dict[str, Any] = {"fail": lambda name, n: False, "actors": [], "count": {}}
    graphs = types.ModuleType("asyncnn.backends._graphs")
    graphs.CaptureError = _CaptureError
    graphs.WORKSPACE_BYTES = 0
    graphs.copy_into = _copy_into
    fused = types.ModuleType("asyncnn.backends._fused")
    fused.in_place = contextlib.nullcontext
    fused.scalars_on_device = lambda buffer: contextlib.nullcontext()
    for name, module in (("_graphs", graphs), ("_fused", fused)):
        monkeypatch.setitem(sys.modules, f"asyncnn.backends.{name}", module)
        monkeypatch.setattr(asyncnn.backends, name, module, raising=False)

    def capture(self, fn, warm=None):
        name = self.actor.name
        n = control["count"][name] = control["count"].get(name, 0) + 1
        if warm is None and name.startswith("stage") and control["fail"](name, n):
            raise _CaptureError("emulated: this capture fails")
        (fn if warm is None else warm)()
        graph = _Graph(fn)
        self.stats.captures += 1
        return graph, graph.result, (_Pool(), types.SimpleNamespace(nbytes=0))

    monkeypatch.setattr(_capture._Graphs, "_capture", capture)
    # a backward graph calls its entry's pullback at every launch: keep the captured one
    monkeypatch.setattr(
        _capture._Entry,
        "pullback",
        property(
            lambda self: self.__dict__.get("_pullback"),
            lambda self, v: (
                self.__dict__.__setitem__("_pullback", v)
                if v is not None or "_pullback" not in self.__dict__
                else None
            ),
        ),
        raising=False,
    )
    layer_init, loss_init = _actors.LayerActor.__init__, _loss_actor.LossActor.__init__

    def layer(self, ctx, *args, **kwargs):
        layer_init(self, ctx, *args, **kwargs)
        if ctx.cuda_graphs and not self.stochastic:
            self.graphs = _capture.ActorGraphs(self)
            control["actors"].append(self)

    def loss(self, ctx, node):
        loss_init(self, ctx, node)
        if ctx.cuda_graphs:
            self.graphs = _capture_loss.LossGraphs(self)
            self.direct = False
            control["actors"].append(self)

    monkeypatch.setattr(_actors.LayerActor, "__init__", layer)
    monkeypatch.setattr(_loss_actor.LossActor, "__init__", loss)
    return control


def _train(policy, batches, graphs, control=None, trace=None):
    modules = [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8),
               nn.Tanh(), nn.Linear(8, 3)]  # fmt: skip
    g = ann.Graph.sequential(modules, loss=nn.CrossEntropyLoss(), stages=4, balance="params")
    out: dict[str, Any] = {}
    if control is not None:
        control["actors"].clear()

    async def main():
        async with ann.open_run(
            g, optim.SGD(lr=0.05, momentum=0.5), policy, dtype="float64", cuda_graphs=graphs,
            trace=trace,
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


@pytest.mark.parametrize(
    "policy",
    [policies.Sync(), policies.GPipe(4), policies.PipeDream(4), policies.PipeDream(4, stash=False),
     policies.Async(max_active_keys=2, min_update_frequency=2, stash=True)],
    ids=["sync", "gpipe4", "pipedream4", "pipedream4-recompute", "async2-stash"],
)  # fmt: skip
def test_a_trace_of_emulated_graphs_records_what_was_sent_and_replays(emulated, policy, tmp_path):
    # the graphs write over the buffers they hand out at their next launch, and the trace's
    # writer reads later: it must read what was sent, not what the buffers hold by then
    batches = _batches([16] * 8)
    eager_trace, graphs_trace = tmp_path / "eager.trace", tmp_path / "graphs.trace"
    eager = _train(policy, batches, False, trace=str(eager_trace))
    graphs = _train(policy, batches, True, emulated, trace=str(graphs_trace))
    assert graphs["active"]
    assert all(st.replays for st in graphs["stats"].values()), graphs
    assert_params_equal(graphs["params"], eager["params"])
    if policy.deterministic:  # same order: the same messages, digest for digest
        assert ann.trace.diff(eager_trace, graphs_trace) is None

    def losses(path):  # each key's loss, as the trace's events carry it
        ends = [e for e in ann.trace.read(path).events if e.actor == "loss" and e.what == "end"]
        return sorted((e.key, e.meta["loss"]) for e in ends)

    assert losses(graphs_trace) == losses(eager_trace)
    replayed = ann.replay(graphs_trace)  # captured again, as recorded
    assert replayed.identical and replayed.events_checked > 0
    assert_params_equal(replayed.params, graphs["params"])
