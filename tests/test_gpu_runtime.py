"""The actor runtime on a CUDA device: one stream per actor, events in the messages, results
equal to the CPU's. Skipped without cupy and a GPU (run them on a GPU machine with
``bash experiments/device_tests.sh``)."""

from __future__ import annotations

import numpy as np
import pytest
from test_device_path_emulated import ROUTING_LOOP_POLICIES, routing_or_loop_runs

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import assert_params_close, assert_params_equal
from conftest import HAS_CUDA, spin_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")]


def _graph(devices):
    return ann.Graph.sequential(
        [
            nn.Linear(6, 32),
            nn.Tanh(),
            nn.Linear(32, 32),
            nn.GELU(),
            nn.Linear(32, 32),
            nn.Tanh(),
            nn.Linear(32, 4),
        ],
        loss=nn.CrossEntropyLoss(),
        stages=[2, 2, 2, 1],
        input_shape=(None, 6),
        devices=devices,
    )


def _data(n=48):
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 6)), "y": rng.integers(0, 4, n)}


@pytest.mark.parametrize(
    "policy",
    [
        policies.Sync(),
        policies.GPipe(4),
        policies.OneFOneB(4),
        policies.PipeDream(3, stash=True),
        policies.PipeDream(3, stash=False),
    ],
    ids=["sync", "gpipe", "1f1b", "pipedream", "pipedream-nostash"],
)
@pytest.mark.parametrize(
    "devices", [["cuda:0"] * 4, ["cpu", "cuda:0", "cpu", "cuda:0"]], ids=["gpu", "mixed"]
)
@pytest.mark.parametrize("cuda_graphs", [None, False], ids=["default", "eager"])
def test_gpu_runs_equal_cpu_runs_float64(policy, devices, cuda_graphs):
    # by default the GPU actors capture, CPU actors beside them included (those wait for the
    # events of a GPU actor's messages: captured GPipe/OneFOneB across CPU and GPU stages once
    # ended with wrong weights on an H100 without the waits)
    results = {}
    for name, devs in (("cpu", ["cpu"] * 4), ("gpu", devices)):
        tr = ann.Trainer(
            _graph(devs), optimizer=optim.Adam(lr=0.01), policy=policy, dtype="float64", seed=1,
            cuda_graphs=cuda_graphs,
        )  # fmt: skip
        hist = tr.fit(_data(), epochs=2, batch_size=16)
        results[name] = (tr.params, hist.losses, hist.statistics)
    assert_params_close(results["gpu"][0], results["cpu"][0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(results["gpu"][1], results["cpu"][1], rtol=1e-10)
    # a capture that failed would fall back to eager without a sound: say which ran
    graph_bytes = [results["gpu"][2][f"stage{i}"].graph_bytes for i in range(4)]
    on_gpu = [d != "cpu" for d in devices]
    if cuda_graphs is None:
        assert all(b > 0 for b, g in zip(graph_bytes, on_gpu, strict=True) if g), graph_bytes
    assert not any(
        b for b, g in zip(graph_bytes, on_gpu, strict=True) if not g or cuda_graphs is False
    )


@pytest.mark.parametrize("cuda_graphs", [None, False], ids=["default", "eager"])
def test_ignored_labels_on_the_gpu_train_as_on_the_cpu(cuda_graphs):
    # a CrossEntropyLoss at its defaults takes -100 labels on a GPU too (its fused kernels
    # skip them), and trains as the CPU's composed path does
    data = _data()
    data["y"][::5] = -100
    results = {}
    for name, devs in (("cpu", ["cpu"] * 4), ("gpu", ["cuda:0"] * 4)):
        tr = ann.Trainer(
            _graph(devs), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), dtype="float64",
            seed=3, cuda_graphs=None if name == "cpu" else cuda_graphs,
        )  # fmt: skip
        hist = tr.fit(data, epochs=2, batch_size=16)
        results[name] = (tr.params, hist.losses)
    assert_params_close(results["gpu"][0], results["cpu"][0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(results["gpu"][1], results["cpu"][1], rtol=1e-10)


def test_gpu_float32_within_1e5():
    results = []
    for devs in (["cpu"] * 4, ["cuda:0"] * 4):
        tr = ann.Trainer(
            _graph(devs),
            optimizer=optim.SGD(lr=0.1, momentum=0.9),
            policy=policies.OneFOneB(4),
            seed=2,
        )
        tr.fit(_data(), epochs=2, batch_size=16)
        results.append(tr.params)
    assert_params_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
def test_gpu_deterministic_and_replayable(tmp_path, captured):
    # captured, the replay reads its weights inside its run: they must include the last updates,
    # which the captures write in place on the actors' streams (on an H100 they once did not)
    runs = []
    for i in range(2):
        tr = ann.Trainer(
            _graph(["cuda:0"] * 4),
            optimizer=optim.SGD(lr=0.1),
            policy=policies.PipeDream(4),
            trace=str(tmp_path / f"{i}.trace"),
            cuda_graphs=captured,
        )
        tr.fit(_data(), epochs=1, batch_size=16)
        runs.append(tr.params)
    assert_params_equal(runs[0], runs[1])
    rep = ann.replay(tmp_path / "0.trace")
    assert rep.identical
    assert_params_equal(rep.params, runs[0])


def test_gpu_async_trains():
    tr = ann.Trainer(
        _graph(["cuda:0"] * 4), optimizer=optim.Adam(lr=0.01), policy=policies.Async(4, 2)
    )
    before = tr.evaluate(_data())
    tr.fit(_data(), epochs=10, batch_size=8)
    after = tr.evaluate(_data())
    assert after["loss"] < before["loss"]
    assert all(v == 30 for v in tr.versions.values())  # 60 keys, an update every 2 gradients


def test_data_already_on_the_gpu_stays_there_and_gives_the_same_run():
    import cupy as cp

    d = _data()
    on_device = {k: cp.asarray(v) for k, v in d.items()}
    results = []
    for data in (d, on_device):
        tr = ann.Trainer(
            _graph(["cuda:0"] * 4),
            optimizer=optim.Adam(lr=0.01),
            policy=policies.OneFOneB(4),
            seed=3,
        )
        hist = tr.fit(data, epochs=2, batch_size=16, shuffle=True)
        results.append((tr.params, hist.losses, tr.evaluate(data)))
    assert_params_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    assert results[0][2] == pytest.approx(results[1][2])


@pytest.mark.anyio
async def test_a_gpu_batch_is_read_only_after_its_copy_lands():
    # step copies a GPU batch on the host thread's stream, which the actors' streams do not
    # follow: with a kernel still running there, an actor that did not wait would read the copy
    # before it is written (each step's batch differs, so memory the pool hands back holding an
    # earlier batch would not pass for this one)
    import cupy as cp

    batches = [_data(16) for _ in range(3)]
    for i, b in enumerate(batches):
        b["x"] = b["x"] * (i + 1) - i
    losses = []
    for on_gpu in (False, True):
        g = ann.Graph.sequential(
            [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)], loss=nn.CrossEntropyLoss(),
            input_shape=(None, 6), devices=["cuda:0" if on_gpu else "cpu"],
        )  # fmt: skip
        async with ann.open_run(g, optim.SGD(lr=0.1), policies.Sync(), dtype="float64") as run:
            for d in batches:
                batch = dict(d)
                if on_gpu:
                    batch = {k: cp.asarray(v) for k, v in d.items()}
                    spin_gpu(300_000_000)  # about 0.15 s on an H100
                await run.step(batch)
            await run.drain()
            losses.append([run.losses[i] for i in range(3)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-10)


@pytest.mark.parametrize("cuda_graphs", [False, None], ids=["eager", "default"])
def test_a_batch_a_late_backward_reads_is_not_handed_out_again(monkeypatch, cuda_graphs):
    # The first stage's weight gradient reads its input, the run's copy of a batch already on
    # the GPU, through the pullback that holds it. Here that backward waits behind a kernel
    # spinning on the stage's stream (before the Linear's product, in the Tanh's rule), while
    # the host goes on to the next step and copies the next batch on its own stream, which
    # waits for no actor's:
    # had the memory of the first copy gone back to the pool when the backward was queued, the
    # next copy would land in it before the product read it (the weights would differ from
    # the CPU's, and through them every later step: this failed so on an H100 without the fix).
    import anyio
    import cupy as cp

    from asyncnn._math._ops import PRIMITIVES
    from asyncnn._math._pytree import tree_map

    def to_host(a):
        return cp.asnumpy(a) if isinstance(a, cp.ndarray) else a

    batches = [_data(16) for _ in range(4)]
    for i, b in enumerate(batches):
        b["x"] = b["x"] * (i + 1) - i

    def fit(device):
        g = ann.Graph.sequential(
            [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)], loss=nn.CrossEntropyLoss(),
            stages=[2, 1], input_shape=(None, 6), devices=[device] * 2,
        )  # fmt: skip

        async def main():
            async with ann.open_run(
                g, optim.SGD(lr=0.1), policies.Sync(), dtype="float64", cuda_graphs=cuda_graphs
            ) as run:
                for b in batches:
                    if device != "cpu":  # (a numpy batch would be copied on the actor's stream)
                        b = {k: cp.asarray(v) for k, v in b.items()}
                    await run.step(b)
                await run.drain()
            return tree_map(to_host, run.state().params)

        return anyio.run(main)

    on_cpu = fit("cpu")
    tanh = PRIMITIVES["tanh"]
    rule = tanh.vjp_rule

    def late_rule(*args):
        spin_gpu(60_000_000)  # about 30 ms on an H100, on the backward's stream
        return rule(*args)

    monkeypatch.setattr(tanh, "vjp_rule", late_rule)
    assert_params_close(fit("cuda:0"), on_cpu, rtol=1e-10)


@ROUTING_LOOP_POLICIES
@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
@pytest.mark.parametrize("model", ["routing", "loop"])
def test_routing_and_loops_on_the_gpu_equal_the_cpu(model, captured, policy):
    # the stand-in device's test (test_device_path_emulated.py) on the real one: a router's
    # per-expert rows (an expert sees a new input shape whenever its share of rows changes,
    # captured per shape up to the cache's limit) and a loop's per-row steps, float64
    (cpu, cpu_params), (gpu, gpu_params) = routing_or_loop_runs(model, captured, policy)
    if captured:
        assert any(st.graph_bytes for st in gpu.statistics.values()), gpu.statistics
    np.testing.assert_allclose(gpu.losses, cpu.losses, rtol=1e-10)
    assert_params_close(gpu_params, cpu_params, rtol=1e-10, atol=1e-12)
