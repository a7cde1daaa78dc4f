"""The ``cuda_graphs`` flag on machines without a GPU: validation, and a no-op on CPU actors."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import assert_params_equal


def _graph():
    return ann.Graph.sequential(
        [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)],
        loss=nn.CrossEntropyLoss(),
        stages=[2, 1],
        input_shape=(None, 5),
    )


def _data(n=24):
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 5)), "y": rng.integers(0, 3, n)}


def test_cuda_graphs_must_be_a_bool_or_none():
    with pytest.raises(TypeError, match="cuda_graphs must be True, False or None"):
        ann.Trainer(_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), cuda_graphs=1)

    async def main():
        async with ann.open_run(_graph(), optim.SGD(lr=0.1), policies.Sync(), cuda_graphs="yes"):
            pass

    with pytest.raises(TypeError, match="cuda_graphs must be True, False or None"):
        anyio.run(main)


def test_cuda_graphs_refuses_a_cluster():
    with pytest.raises(ValueError, match="cluster=None"):
        ann.Trainer(
            _graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), cuda_graphs=True,
            cluster=ann.cluster.LocalCluster(workers=1),
        )  # fmt: skip


def test_the_cuda_graphs_attribute_refuses_true_with_a_cluster_as_the_constructor_does():
    # (accepted, it was refused only at the next fit; no worker starts here)
    cluster = ann.cluster.LocalCluster(workers=1)
    tr = ann.Trainer(_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), cluster=cluster)
    with pytest.raises(ValueError, match="cluster=None"):
        tr.cuda_graphs = True
    assert tr.cuda_graphs is None  # (the refused value is not kept)
    for value in (False, None):
        tr.cuda_graphs = value
        assert tr.cuda_graphs is value
    tr = ann.Trainer(_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())
    tr.cuda_graphs = True  # (without a cluster: as the constructor takes it)
    assert tr.cuda_graphs is True
    assert not cluster.processes


@pytest.mark.parametrize(
    ("policy", "active"),
    [(policies.Sync(), True), (policies.GPipe(1), True), (policies.GPipe(3), True),
     (policies.OneFOneB(2), True), (policies.PipeDream(2), True),
     (policies.PipeDream(2, stash=False), True), (policies.Async(max_active_keys=2), True),
     (policies.Async(max_active_keys=2, stash=True), True),
     (policies.PipeDream2BW(2), False)],
    ids=["sync", "gpipe1", "gpipe3", "1f1b", "pipedream-stash", "pipedream", "async",
         "async-stash", "pipedream-2bw-pinned"],
)  # fmt: skip
def test_capture_allowed_with_flushes_or_streaming_at_the_latest_or_stashed_weights(policy, active):
    assert policy.allows_capture(2, False) is active
    seen = {}

    async def main():
        async with ann.open_run(_graph(), optim.SGD(lr=0.1), policy, cuda_graphs=True) as run:
            seen["active"] = run.cuda_graphs_active
            # CPU actors never capture: nothing does, whatever the policy allows
            seen["graphs"] = [a.graphs for a in run.local.values()]

    anyio.run(main)
    assert seen["active"] is False
    assert seen["graphs"] == [None] * len(seen["graphs"])


def test_by_default_graphs_are_on_only_where_the_run_has_a_gpu_actor():
    # (the default, None: a CPU run stays as it was, so fit keeps its state at every step)
    seen = {}

    async def main():
        async with ann.open_run(_graph(), optim.SGD(lr=0.1), policies.Sync()) as run:
            seen["asked"], seen["active"] = run.cuda_graphs, run.cuda_graphs_active

    anyio.run(main)
    assert seen == {"asked": None, "active": False}
    assert (
        ann.Trainer(_graph(), optimizer=optim.SGD(lr=0.1), policy=policies.Sync()).cuda_graphs
        is None
    )


def test_by_default_a_cluster_runs_its_actors_eagerly(monkeypatch):
    # with a cluster the default (None) reaches the workers as False: graphs need one process
    from contextlib import asynccontextmanager

    seen = []

    class Recording(ann.cluster.LocalCluster):
        @asynccontextmanager
        async def _run(self, graph, optimizer, policy, config, **options):
            seen.append(config.cuda_graphs)
            yield None

        def open_run(self, graph, optimizer, policy, config, **options):
            return self._run(graph, optimizer, policy, config, **options)

    async def main(asked):
        async with ann.open_run(
            _graph(), optim.SGD(lr=0.1), policies.Sync(), cluster=Recording(workers=1),
            cuda_graphs=asked,
        ):  # fmt: skip
            pass

    for asked in (None, False):
        anyio.run(main, asked)
    assert seen == [False, False]


def test_cuda_graphs_is_a_no_op_on_the_cpu():
    results = []
    for flag in (False, True, None):
        tr = ann.Trainer(
            _graph(), optimizer=optim.SGD(lr=0.1, momentum=0.9), policy=policies.Sync(),
            cuda_graphs=flag, seed=4,
        )  # fmt: skip
        hist = tr.fit(_data(), epochs=2, batch_size=8)
        results.append((tr.params, hist.losses))
    for params, losses in results[1:]:
        assert_params_equal(results[0][0], params)
        assert results[0][1] == losses


@pytest.mark.parametrize(
    "policy", [policies.Sync(), policies.GPipe(2), policies.OneFOneB(2)], ids=str
)
def test_step_hooks_see_each_steps_weights_on_the_cpu_with_cuda_graphs_on(policy):
    # the flag once made fit keep its state at epoch ends only (as captured updates, written
    # in place, need): a CPU graph's step hooks saw the weights from before the fit
    class Weights(ann.callbacks.Callback):
        def __init__(self):
            self.seen = []

        def on_step_end(self, trainer, step, logs):
            self.seen.append(trainer.params)

    seen = {}
    for flag in (False, True):
        cb = Weights()
        tr = ann.Trainer(
            _graph(), optimizer=optim.SGD(lr=0.1), policy=policy, cuda_graphs=flag, seed=1
        )
        before = tr.params
        tr.fit(_data(48), epochs=1, batch_size=8, callbacks=[cb])
        seen[flag] = cb.seen
        assert len(cb.seen) == 6
        with pytest.raises(AssertionError):  # the first step's hook sees its update
            assert_params_equal(cb.seen[0], before)
    for eager, flagged in zip(seen[False], seen[True], strict=True):
        assert_params_equal(eager, flagged)


@pytest.mark.parametrize(
    ("devices", "active"),
    [(["cuda:0", "cuda:0"], True), (["cpu", "cuda:0"], True), (["cuda:0", "cpu"], True),
     (["cpu", "cpu"], False)],
    ids=["gpu", "cpu-then-gpu", "gpu-then-cpu", "cpu"],
)  # fmt: skip
def test_capture_applies_where_a_graph_has_a_gpu_actor(fake_cuda, emulated, devices, active):
    # CPU actors wait for the events of a GPU actor's messages, so a graph with actors on both
    # captures its GPU ones by default; one with none stays eager
    graph = ann.Graph.sequential(
        [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)], loss=nn.CrossEntropyLoss(),
        stages=[2, 1], input_shape=(None, 5), devices=devices,
    )  # fmt: skip
    seen = {}

    async def main():
        async with ann.open_run(graph, optim.SGD(lr=0.1), policies.GPipe(2)) as r:
            seen["active"] = r.cuda_graphs_active

    anyio.run(main)
    assert seen["active"] is active


def test_by_default_several_gpus_in_one_process_stay_eager(fake_cuda, emulated, monkeypatch):
    # capture across GPUs has not run on a machine with several: asked for, it applies
    from asyncnn.backends import Device, _registry

    for key in ("cuda:1", Device("cuda", 1)):  # a second stand-in GPU (the same numpy arrays)
        monkeypatch.setitem(_registry._by_key, key, fake_cuda)
    monkeypatch.setitem(_registry._backends, Device("cuda", 1), fake_cuda)
    graph = ann.Graph.sequential(
        [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)], loss=nn.CrossEntropyLoss(),
        stages=[2, 1], input_shape=(None, 5), devices=["cuda:0", "cuda:1"],
    )  # fmt: skip
    seen = []

    async def main(asked):
        async with ann.open_run(
            graph, optim.SGD(lr=0.1), policies.GPipe(2), cuda_graphs=asked
        ) as r:
            seen.append(r.cuda_graphs_active)

    for asked in (None, True, False):
        anyio.run(main, asked)
    assert seen == [False, True, False]
