"""The runtime's path for a device with streams (a GPU's), on the CPU, with a numpy stand-in for
a CUDA device (``tests/_device_stand_in.py``): its actors compute through streams and events, a
loss value and a trace's copies reach the host asynchronously, a traced run writes when each
op's work ran on the device, routing and loops on the device equal the CPU's, and with the
stand-in for CUDA graphs too (``tests/_graphs_stand_in.py``) a captured, traced run on the device
equals the CPU's; and the stand-in itself runs a stream's work in order from any thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _loops_cases import _data as loop_data
from _loops_cases import rnn_graph
from _reference import assert_params_equal
from _routing_cases import _data as routing_data
from _routing_cases import moe_graph


def _graph(devices: list[str]) -> ann.Graph:
    modules = [nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    return ann.Graph.sequential(
        modules, loss=nn.CrossEntropyLoss(), stages=[2, 2, 1], devices=devices
    )


def _train(devices: list[str], policy: Any, trace: str | None = None) -> Any:
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((96, 6)), "y": rng.integers(0, 3, 96)}
    tr = ann.Trainer(
        _graph(devices), optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64", seed=1,
        trace=trace, cuda_graphs=False,  # eager: the captured path is the test below's
    )  # fmt: skip
    history = tr.fit(data, epochs=2, batch_size=16)
    return tr, history


@pytest.mark.parametrize(
    "policy", [policies.Sync(), policies.GPipe(4), policies.PipeDream(4)], ids=str
)
def test_device_actors_compute_what_cpu_actors_do(fake_cuda: Any, policy: Any) -> None:
    cpu, cpu_hist = _train(["cpu"] * 3, policy)
    dev, dev_hist = _train(["cuda:0"] * 3, policy)
    assert fake_cuda.copies > 0  # the losses came back through asynchronous copies
    assert dev_hist.losses == cpu_hist.losses  # read after they landed, not before
    assert_params_equal(dev.params, cpu.params)


@pytest.mark.anyio
async def test_device_actors_keep_what_their_kernels_read_until_a_run_ends(
    fake_cuda: Any, monkeypatch: Any
) -> None:
    # a compute's function and arguments (a backward's pullback holds its forward's inputs)
    # live until the actor finds its kernels done; once the run's end has waited for the
    # device, nothing is kept any more. Here no compute is ever found done by asking (the
    # stand-in's work lands when asked), so all are kept until the end's wait.
    from asyncnn.backends import get_backend

    monkeypatch.setattr(type(get_backend("cuda:0")), "event_done", lambda self, event: False)
    rng = np.random.default_rng(0)
    async with ann.open_run(
        _graph(["cuda:0"] * 3), optim.SGD(lr=0.1), policies.GPipe(4), dtype="float64",
        cuda_graphs=False,
    ) as run:  # fmt: skip
        for _ in range(3):
            await run.step({"x": rng.standard_normal((16, 6)), "y": rng.integers(0, 3, 16)})
        await run.drain()
        kept = {name: len(actor.keepalive) for name, actor in run.local.items()}
    assert all(kept.values()), kept
    assert not any(actor.keepalive for actor in run.local.values())


@pytest.mark.parametrize("devices", [["cpu", "cuda:0", "cpu"], ["cuda:0", "cpu", "cuda:0"]])
@pytest.mark.parametrize("policy", [policies.Sync(), policies.GPipe(4)], ids=str)
def test_cpu_and_device_actors_together_compute_what_cpu_actors_do(
    fake_cuda: Any, policy: Any, devices: list[str]
) -> None:
    # a CPU actor reading a device actor's tensors waits for the events its messages carry (on
    # a real GPU the copy to the host is not ordered after the producer's stream; here a read
    # that skips the event sees the launch's results as NaN: this failed before the waits)
    cpu, cpu_hist = _train(["cpu"] * 3, policy)
    mixed, mixed_hist = _train(devices, policy)
    assert mixed_hist.losses == cpu_hist.losses
    assert_params_equal(mixed.params, cpu.params)


def test_a_traced_device_run_records_what_the_cpu_run_does_and_when_it_ran(
    fake_cuda: Any, tmp_path: Path
) -> None:
    cpu_trace, dev_trace = tmp_path / "cpu.trace", tmp_path / "dev.trace"
    _train(["cpu"] * 3, policies.PipeDream(4), str(cpu_trace))
    copies = fake_cuda.copies
    _train(["cuda:0"] * 3, policies.PipeDream(4), str(dev_trace))
    assert fake_cuda.copies > copies
    # the digests of the copies as they landed, the losses too
    assert ann.trace.diff(cpu_trace, dev_trace) is None
    trace = ann.trace.read(dev_trace)

    def losses(path: Path) -> list[Any]:
        ends = [e for e in ann.trace.read(path).events if e.actor == "loss" and e.what == "end"]
        return [(e.key, e.meta["loss"]) for e in ends]

    assert losses(dev_trace) == losses(cpu_trace)
    # a "device" event after each op's end, on the same actor and seq, with its spans in order
    ends = [(e.actor, e.seq) for e in trace.events if e.what == "end"]
    device_events = [e for e in trace.events if e.what == "device"]
    assert [(e.actor, e.seq) for e in device_events] == ends
    for e in device_events:
        flat = [t for span in e.meta["spans"] for t in span]
        assert flat == sorted(flat) and len(flat) >= 2
    assert not any(e.what == "device" for e in ann.trace.read(cpu_trace).events)
    assert ann.trace.to_chrome(dev_trace, tmp_path / "dev.json")["device_slices"] == sum(
        len(e.meta["spans"]) for e in device_events
    )
    use = ann.trace.summary(dev_trace)["devices"]["cuda:0"]
    assert use["busy_seconds"] > 0 and use["overlap"] >= 1.0
    replayed = ann.replay(dev_trace)
    assert replayed.identical


@pytest.mark.parametrize(
    "policy",
    [policies.Sync(), policies.GPipe(4), policies.PipeDream(4), policies.PipeDream(4, stash=False),
     policies.Async(max_active_keys=2, min_update_frequency=2, stash=True)],
    ids=["sync", "gpipe4", "pipedream4", "pipedream4-recompute", "async2-stash"],
)  # fmt: skip
def test_a_captured_traced_run_on_the_device_equals_the_eager_cpu_run(
    fake_cuda: Any, emulated: Any, policy: Any, tmp_path: Path
) -> None:
    # the graphs' buffers are written again at the next launch, and the trace's copies are
    # queued behind each launch on the actor's stream: they must hold what was sent
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((96, 6)), "y": rng.integers(0, 3, 96)}
    out: dict[str, Any] = {}
    for where, graphs in (("cpu", False), ("cuda:0", True)):

        async def main(where: str = where, graphs: bool = graphs) -> None:
            async with ann.open_run(
                _graph([where] * 3), optim.SGD(lr=0.1), policy, dtype="float64", seed=1,
                cuda_graphs=graphs, trace=str(tmp_path / f"{where}.trace"),
            ) as run:  # fmt: skip
                for i in range(6):
                    await run.step({k: v[i * 16 : (i + 1) * 16] for k, v in data.items()})
                await run.drain()
                stats = [a.graphs.stats for a in run.local.values() if a.graphs is not None]
                out[where] = (run.cuda_graphs_active, stats)
            out[f"{where} params"] = run.state().params

        anyio.run(main)
    active, stats = out["cuda:0"]
    assert active and len(stats) == 4 and all(st.replays for st in stats)
    assert_params_equal(out["cuda:0 params"], out["cpu params"])
    if policy.deterministic:
        assert ann.trace.diff(tmp_path / "cpu.trace", tmp_path / "cuda:0.trace") is None
    assert ann.replay(tmp_path / "cuda:0.trace").identical  # captured again, as recorded


def _on(graph: ann.Graph, device: str) -> ann.Graph:
    """``graph`` with every node but its inputs on ``device``."""
    spec = graph.to_spec()
    for node in spec["nodes"]:
        if node["kind"] != "input" and "device" in node:
            node["device"] = device
    return ann.Graph.from_spec(spec)


#: the policies routing and loops run under on a device (here and in test_gpu_runtime.py)
ROUTING_LOOP_POLICIES = pytest.mark.parametrize(
    "policy",
    [policies.Sync(), policies.GPipe(2), policies.PipeDream(1, stash=True),
     policies.Async(max_active_keys=1)],
    ids=["sync", "gpipe2", "pipedream1", "async1"],
)  # fmt: skip


@ROUTING_LOOP_POLICIES
@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
@pytest.mark.parametrize("model", ["routing", "loop"])
def test_routing_and_loops_on_the_device_equal_the_cpu(
    fake_cuda: Any, request: pytest.FixtureRequest, model: str, captured: bool, policy: Any
) -> None:
    # a router's per-expert rows (a new input shape at an expert whenever its share of rows
    # changes: captured per shape, up to the cache's limit) and a loop's per-row steps, through
    # streams and events; the loop cell and the router themselves stay eager
    graphs = request.getfixturevalue("emulated") if captured else None
    (cpu, cpu_params), (dev, dev_params) = routing_or_loop_runs(model, captured, policy)
    assert fake_cuda.copies > 0  # (the device run's losses came back through copies)
    if graphs is not None:
        assert sum(a.graphs.stats.replays for a in graphs["actors"]) > 0
    assert dev.losses == cpu.losses
    assert_params_equal(dev_params, cpu_params)


def routing_or_loop_runs(model: str, captured: bool, policy: Any) -> list[tuple[Any, Any]]:
    """``(history, params)`` of a float64 fit of the routing (``"routing"``: a sparse mixture of
    experts) or loop (``"loop"``: BPTT over variable lengths) model on the CPU, then with every
    node on ``cuda:0``, captured or eager (also run on the real GPU by test_gpu_runtime.py)."""
    make, data = (
        (lambda: moe_graph(k=2), routing_data(n=48))
        if model == "routing"
        else (rnn_graph, loop_data(n=32))
    )
    runs = []
    for where in ("cpu", "cuda:0"):
        tr = ann.Trainer(
            _on(make(), where), optimizer=optim.SGD(lr=0.1), policy=policy, dtype="float64",
            seed=0, cuda_graphs=captured and where != "cpu",
        )  # fmt: skip
        runs.append((tr.fit(data, batch_size=8, epochs=2), tr.params))
    return runs


@pytest.mark.parametrize("asked", [None, False], ids=["default", "eager"])
def test_a_replay_captures_where_the_recorded_run_did(
    fake_cuda: Any, emulated: Any, asked: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    # the header keeps the option as given: left at its default (on where there is a GPU actor)
    # the recorded run captured, and so must its replay, or a 16-bit product could differ
    import contextlib

    import asyncnn._tracing._replay as replay_module

    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((64, 6)), "y": rng.integers(0, 3, 64)}
    tr = ann.Trainer(
        _graph(["cuda:0"] * 3), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(),
        dtype="float64", seed=1, trace=str(tmp_path / "run.trace"), cuda_graphs=asked,
    )  # fmt: skip
    tr.fit(data, epochs=1, batch_size=16)
    assert ann.trace.read(tmp_path / "run.trace").header["config"]["cuda_graphs"] is asked
    seen = []
    opened = replay_module.open_run

    @contextlib.asynccontextmanager
    async def spy(*args: Any, **kwargs: Any) -> Any:
        async with opened(*args, **kwargs) as run:
            seen.append(run.cuda_graphs_active)
            yield run

    monkeypatch.setattr(replay_module, "open_run", spy)
    assert ann.replay(tmp_path / "run.trace").identical
    assert seen == [asked is None]


def test_the_stand_in_lands_a_stream_in_order_from_two_threads() -> None:
    # a copy queued later never runs before an earlier one ends, whichever thread lands it
    import threading

    from _device_stand_in import _Stream

    stream, order = _Stream(), []
    started, release = threading.Event(), threading.Event()

    def first() -> None:
        started.set()
        release.wait(5)
        order.append("first")

    stream.queued = [(1, first), (2, lambda: order.append("second"))]
    stream.position = 2
    a = threading.Thread(target=stream.land, args=(1,))
    b = threading.Thread(target=stream.land, args=(2,))
    a.start()
    assert started.wait(5)  # the first thread runs its copy
    b.start()
    b.join(0.2)  # the second waits for the first's copy: it cannot be done yet
    assert b.is_alive() and order == []
    release.set()
    a.join(5)
    b.join(5)
    assert order == ["first", "second"]
