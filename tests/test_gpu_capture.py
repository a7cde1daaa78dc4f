"""CUDA-graph capture of GPU actors (asked for with ``cuda_graphs=True``): captured runs give the
eager run's results (and the CPU's), a new input shape is captured anew (eager until then),
pipelines with flushes capture one set of graphs per key of a minibatch, streaming policies capture
one set where every forward and backward is at the latest weights and a slot per key in flight
where they stash. Skipped without cupy and a GPU."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import assert_params_close, assert_params_equal
from conftest import HAS_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")]


def _graph(stages=(2, 2, 2, 1), device="cuda:0"):
    return ann.Graph.sequential(
        [
            nn.Linear(6, 32),
            nn.Tanh(),
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Linear(32, 32),
            nn.GELU(),
            nn.Linear(32, 4),
        ],
        loss=nn.CrossEntropyLoss(),
        stages=list(stages),
        input_shape=(None, 6),
        devices=[device] * len(stages),
    )


def _batches(sizes, seed=0):
    import cupy as cp

    rng = np.random.default_rng(seed)
    return [
        {"x": cp.asarray(rng.standard_normal((n, 6)).astype(np.float32)),
         "y": cp.asarray(rng.integers(0, 4, n))}
        for n in sizes
    ]  # fmt: skip


def _train(batches, optimizer, policy, cuda_graphs, dtype="float32", device="cuda:0", trace=None):
    out = {}

    async def main():
        async with ann.open_run(
            _graph(device=device), optimizer, policy, seed=3, dtype=dtype,
            cuda_graphs=cuda_graphs, trace=trace,
        ) as run:  # fmt: skip
            for b in batches:
                await run.step(b)
            await run.drain()
            out["active"] = run.cuda_graphs_active
            out["stats"] = {n: a.graphs.stats for n, a in run.local.items() if a.graphs is not None}
            out["slots"] = {
                n: a.graphs.base.slots for n, a in run.local.items() if a.graphs is not None
            }
            out["graph_bytes"] = {n: st.graph_bytes for n, st in run.statistics().items()}
            out["layers"] = {
                n: {
                    "updates_captured": len(a.graphs.updates),
                    # the graphs that sum a flush's gradients as the update reads them
                    "summing": [k for k in a.graphs.updates if k[0] == "summed"],
                }
                for n, a in run.local.items()
                if getattr(a, "graphs", None) is not None and hasattr(a.graphs, "updates")
            }
        out["params"] = _to_host(run.state().params)
        out["opt_states"] = _to_host(run.state().opt_states)
        out["losses"] = [run.losses[i] for i in sorted(run.losses)]

    anyio.run(main)
    return out


def _to_host(tree):
    import cupy as cp

    if isinstance(tree, dict):
        return {k: _to_host(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_host(v) for v in tree)
    return cp.asnumpy(tree) if isinstance(tree, cp.ndarray) else tree


def _max_diff(a, b):
    from asyncnn._math._pytree import tree_leaves

    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(tree_leaves(_to_host(a)), tree_leaves(_to_host(b)), strict=True)
    )


@pytest.mark.parametrize(
    "optimizer",
    [optim.SGD(lr=0.1), optim.SGD(lr=0.1, momentum=0.9), optim.Adam(lr=0.01),
     optim.AdamW(lr=optim.CosineAnnealing(0.01, total_steps=8), weight_decay=0.1,
                 amsgrad=True),
     optim.SGD(lr=optim.CosineAnnealing(0.1, total_steps=8), momentum=0.9, weight_decay=0.01)],
    ids=["sgd", "momentum", "adam", "adamw-cosine-amsgrad", "sgd-cosine-momentum"],
)  # fmt: skip
def test_captured_run_equals_eager_run_float32(optimizer):
    batches = _batches([16] * 8)
    eager = _train(batches, optimizer, policies.Sync(), False)
    graphs = _train(batches, optimizer, policies.Sync(), True)
    assert graphs["active"] and not eager["stats"]
    # every actor captured once and replayed the later steps (forward, backward, update: Adam's
    # too, one graph for every step, its step's scalars written on the device before each, and
    # SGD's under a schedule, its learning rate so written)
    for name, st in graphs["stats"].items():
        assert st.captures >= 1 and st.replays >= 5 and not st.failures, (name, vars(st))
    for name, layer in graphs["layers"].items():
        assert layer["updates_captured"] == 1, name
    # the graphs' memory is reported: every capturing actor holds some, an eager run none
    assert all(graphs["graph_bytes"][n] > 0 for n in graphs["stats"]), graphs["graph_bytes"]
    assert not any(eager["graph_bytes"].values())
    diff = _max_diff(graphs["params"], eager["params"])
    print(f"captured vs eager, {optimizer}: max |param difference| {diff:.3g}, losses equal: "
          f"{graphs['losses'] == eager['losses']}")  # fmt: skip
    # cuBLAS may pick another algorithm for our handle than for cupy's: float tolerance
    assert_params_close(graphs["params"], eager["params"], rtol=1e-5,
                        atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(graphs["losses"], eager["losses"], rtol=1e-5)


def test_new_shapes_are_captured_anew_and_results_stay_equal():
    sizes = [16, 16, 8, 16, 8, 16, 8, 12]  # two shapes repeating, one seen once (eager)
    batches = _batches(sizes, seed=1)
    opt = optim.SGD(lr=0.05, momentum=0.5)
    eager = _train(batches, opt, policies.Sync(), False)
    graphs = _train(batches, opt, policies.Sync(), True)
    for name, st in graphs["stats"].items():
        assert st.eager >= 3 and st.replays >= 3 and not st.failures, (name, vars(st))
    assert_params_close(graphs["params"], eager["params"], rtol=1e-5,
                        atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(graphs["losses"], eager["losses"], rtol=1e-5)


_PIPELINES = [policies.GPipe(4), policies.OneFOneB(4), policies.GPipe(3)]


@pytest.mark.parametrize("policy", _PIPELINES, ids=["gpipe4", "1f1b4", "gpipe3"])
@pytest.mark.parametrize(
    "optimizer", [optim.SGD(lr=0.1, momentum=0.9), optim.Adam(lr=0.01)], ids=["momentum", "adam"]
)
def test_pipelines_capture_graphs_per_key_and_equal_eager(policy, optimizer):
    batches = _batches([16] * 8)  # M keys of 16 / M rows per minibatch
    m = policy.microbatches
    eager = _train(batches, optimizer, policy, False)
    graphs = _train(batches, optimizer, policy, True)
    assert graphs["active"]
    for name, st in graphs["stats"].items():
        # a forward graph per key of a minibatch (M slots), replayed in the later minibatches
        assert st.captures >= m and st.replays >= 5 * m and not st.failures, (name, vars(st))
    for name, layer in graphs["layers"].items():
        # the update reads its M keys' gradients and sums them itself: one graph
        assert len(layer["summing"]) == 1, (name, layer)
    assert_params_close(graphs["params"], eager["params"], rtol=1e-5,
                        atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(graphs["losses"], eager["losses"], rtol=1e-5)


def test_captured_pipeline_is_bit_identical_across_runs_and_equals_the_cpu_in_float64():
    batches = _batches([16] * 6 + [12, 16])  # a short minibatch: its keys run eagerly
    opt = optim.SGD(lr=0.05, momentum=0.5)
    first = _train(batches, opt, policies.OneFOneB(4), True, "float64")
    second = _train(batches, opt, policies.OneFOneB(4), True, "float64")
    assert first["active"] and all(st.replays for st in first["stats"].values())
    assert first["losses"] == second["losses"]
    assert_params_equal(first["params"], second["params"])
    cpu = _train([_to_host(b) for b in batches], opt, policies.OneFOneB(4), False, "float64",
                 device="cpu")  # fmt: skip
    assert_params_close(first["params"], cpu["params"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(first["losses"], cpu["losses"], rtol=1e-10)


@pytest.mark.parametrize(
    "policy",
    [policies.PipeDream(4, stash=False), policies.Async(max_active_keys=1, min_update_frequency=2)],
    ids=["pipedream-recompute", "async-one-key-two-per-update"],
)
def test_streaming_policies_capture_at_the_latest_weights_and_equal_eager(policy):
    # keys stream on (no flush): one set of buffers per graph, outputs copied out of it, the
    # backward recomputing from the kept inputs in one graph; a sum of gradients kept across
    # backwards copies them out of the graph's buffers
    batches = _batches([16] * 8)
    opt = optim.SGD(lr=0.05, momentum=0.9)
    eager = _train(batches, opt, policy, False)
    graphs = _train(batches, opt, policy, True)
    assert graphs["active"]
    for name, st in graphs["stats"].items():
        # a layer replays its forward and its backward graph for each key after the first
        # two; the loss one graph per key (its first key runs eagerly, its second captures)
        least = len(batches) - 2 if name == "loss" else 10
        assert st.captures >= 1 and st.replays >= least and not st.failures, (name, vars(st))
    assert_params_close(graphs["params"], eager["params"], rtol=1e-5,
                        atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(graphs["losses"], eager["losses"], rtol=1e-5)
    again = _train(batches, opt, policy, True)
    assert again["losses"] == graphs["losses"]
    assert_params_equal(again["params"], graphs["params"])


def test_async_with_several_keys_in_flight_captures_and_learns():
    batches = _batches([16] * 4, seed=2) * 6
    opt = optim.SGD(lr=0.2, momentum=0.9)
    graphs = _train(batches, opt, policies.Async(max_active_keys=4), True)
    assert graphs["active"]
    for name, st in graphs["stats"].items():
        assert st.replays >= 20 and not st.failures, (name, vars(st))
    losses = graphs["losses"]
    assert np.all(np.isfinite(losses)) and np.mean(losses[-4:]) < np.mean(losses[:4])


def test_stashing_pipedream_captures_a_slot_per_key_in_flight_and_equals_the_cpu():
    # each key's backward must read the weights its forward read, though updates come between:
    # a slot's copy of them; a backward at the latest weights would differ far beyond 1e-10
    batches = _batches([16] * 10)
    opt = optim.SGD(lr=0.05, momentum=0.5)
    policy = policies.PipeDream(4)
    first = _train(batches, opt, policy, True, "float64")
    assert first["active"]
    for name, st in first["stats"].items():
        assert st.captures >= 1 and st.replays >= 4 and not st.failures, (name, vars(st))
    # no more slots than keys in flight (4 stages: PipeDream admits 4 at a time)
    assert 1 < max(first["slots"].values()) <= 4, first["slots"]
    second = _train(batches, opt, policy, True, "float64")
    assert first["losses"] == second["losses"]
    assert_params_equal(first["params"], second["params"])
    cpu = _train([_to_host(b) for b in batches], opt, policy, False, "float64", device="cpu")
    assert_params_close(first["params"], cpu["params"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(first["losses"], cpu["losses"], rtol=1e-10)
    eager = _train(batches, opt, policy, False, "float32")
    graphs = _train(batches, opt, policy, True, "float32")
    assert_params_close(graphs["params"], eager["params"], rtol=1e-5, atol=1e-6)


def test_stashing_async_captures_and_learns():
    batches = _batches([16] * 4, seed=2) * 6
    opt = optim.SGD(lr=0.2, momentum=0.9)
    graphs = _train(batches, opt, policies.Async(max_active_keys=3, stash=True), True)
    assert graphs["active"]
    for name, st in graphs["stats"].items():
        assert st.replays >= 15 and not st.failures, (name, vars(st))
    assert max(graphs["slots"].values()) <= 3, graphs["slots"]
    losses = graphs["losses"]
    assert np.all(np.isfinite(losses)) and np.mean(losses[-4:]) < np.mean(losses[:4])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_captured_16_bit_runs_close_to_eager(dtype):
    try:
        ann.backends.get_backend("cuda:0").dtype(dtype)
    except ValueError as exc:
        pytest.skip(str(exc))
    batches = _batches([16] * 6)
    for b in batches:
        b["x"] = b["x"].astype(ann.backends.get_backend("cuda:0").dtype(dtype))
    eager = _train(batches, optim.SGD(lr=0.1), policies.Sync(), False, dtype)
    graphs = _train(batches, optim.SGD(lr=0.1), policies.Sync(), True, dtype)
    assert all(st.replays >= 3 for st in graphs["stats"].values())
    print(f"{dtype}: max |param difference| {_max_diff(graphs['params'], eager['params']):.3g}")
    np.testing.assert_allclose(graphs["losses"], eager["losses"], rtol=2e-2)


def test_a_captured_float16_adam_update_keeps_float32_moments_and_equals_eager():
    # a float16 leaf's Adam moments are float32: the fused kernels take one type for every
    # array, so its update widens the leaf and runs the float32 kernel, which inside the
    # captured update reads the step's scalars from the device (the array code would have kept
    # the captured step's bias corrections for every later step)
    from asyncnn._math._pytree import tree_leaves

    dt = ann.backends.get_backend("cuda:0").dtype("float16")
    batches = _batches([16] * 8)
    for b in batches:
        b["x"] = b["x"].astype(dt)
    opt = optim.Adam(lr=1e-2, amsgrad=True)
    eager = _train(batches, opt, policies.Sync(), False, "float16")
    graphs = _train(batches, opt, policies.Sync(), True, "float16")
    assert graphs["active"]
    for name, st in graphs["stats"].items():
        assert st.replays >= 5 and not st.failures, (name, vars(st))
    assert all(layer["updates_captured"] for layer in graphs["layers"].values())
    for run in (eager, graphs):
        for state in run["opt_states"].values():
            for buf in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                assert {leaf.dtype for leaf in tree_leaves(state[buf])} == {np.dtype("float32")}
        assert {leaf.dtype for leaf in tree_leaves(run["params"])} == {np.dtype("float16")}
    diff = _max_diff(graphs["params"], eager["params"])
    print(f"float16 Adam: max |param difference| captured - eager {diff:.3g}")
    # (each step moves a weight by about lr: a bias correction of another step, 1 / (1 - b1^t)
    # from 5.3 at t = 2 to 2.3 at t = 8, moved them apart by many times this)
    assert diff < 2e-3
    np.testing.assert_allclose(graphs["losses"], eager["losses"], rtol=2e-2)


def test_cross_entropy_bad_label_on_gpu_gives_nan_without_host_sync():
    import cupy as cp

    logits = cp.zeros((3, 4), dtype=cp.float32)
    good = ann.ops.cross_entropy(logits, cp.asarray([0, 1, 3]))
    assert np.isclose(float(good), np.log(4))
    assert np.isnan(float(ann.ops.cross_entropy(logits, cp.asarray([0, 4, 1]))))
    assert np.isnan(float(ann.ops.cross_entropy(logits, cp.asarray([-1, 0, 1]))))


@pytest.mark.parametrize(
    "policy",
    [policies.GPipe(4), policies.PipeDream(4), policies.Async(max_active_keys=4, stash=True)],
    ids=["gpipe4", "pipedream4", "async4-stash"],
)
def test_a_captured_run_with_a_trace_records_every_message_and_replays_identically(
    policy, tmp_path
):
    # the trace's copies are queued behind each actor's graphs (no host wait); the writer reads
    # them once landed: two deterministic runs record the same digests, and a replay (captured
    # as recorded) sends exactly what the run sent
    batches = _batches([16] * 12)
    runs = []
    for i in range(2):
        runs.append(
            _train(batches, optim.Adam(lr=0.01), policy, True, trace=str(tmp_path / f"{i}.t"))
        )
        assert runs[-1]["active"] and all(st.replays for st in runs[-1]["stats"].values())
    if policy.deterministic:
        assert ann.trace.diff(tmp_path / "0.t", tmp_path / "1.t") is None
        assert_params_equal(runs[0]["params"], runs[1]["params"])
    eager = _train(batches, optim.Adam(lr=0.01), policy, False, trace=str(tmp_path / "e.t"))
    if policy.deterministic:
        assert_params_close(runs[0]["params"], eager["params"], rtol=1e-5, atol=1e-6)
    replayed = ann.replay(tmp_path / "0.t")
    assert replayed.identical and replayed.events_checked > 0
    assert_params_equal(_to_host(replayed.params), runs[0]["params"])
    # each op's work on the device's clock: a "device" event after each op's end, a row of
    # its own under each actor in the Chrome export, the overlap in the summary
    trace = ann.trace.read(tmp_path / "0.t")
    ops = {(e.actor, e.seq) for e in trace.events if e.what == "end" and e.actor != "scheduler"}
    device = [e for e in trace.events if e.what == "device"]
    assert {(e.actor, e.seq) for e in device} == ops
    last = max(e["t"] for e in trace.events)
    for e in device:
        assert all(0 <= a <= b <= last + 1.0 for a, b in e.meta["spans"]), e
    counts = ann.trace.to_chrome(tmp_path / "0.t", tmp_path / "0.json")
    assert counts["device_slices"] == sum(len(e.meta["spans"]) for e in device)
    use = ann.trace.summary(tmp_path / "0.t")["devices"]["cuda:0"]
    assert use["active_seconds"] > 0 and use["overlap"] >= 1.0


def test_copy_of_gives_an_equal_array_of_its_own_on_the_current_stream():
    # how a replay's outputs leave the graph's buffers (one memcpy where contiguous)
    import cupy as cp

    from asyncnn.backends import _graphs

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        base = cp.arange(24, dtype=cp.float32).reshape(4, 6)
        cases = [base, base.astype(cp.float16), base.T, base[:, ::2], cp.zeros((0, 6)), base[1, 2]]
        copies = [_graphs.copy_of(a) for a in cases]
        base += 100  # queued after the copies on this stream: they keep the values before
    stream.synchronize()
    for a, c in zip(cases, copies, strict=True):
        assert c.shape == a.shape and c.dtype == a.dtype
        assert c.size == 0 or c.data.ptr != a.data.ptr
    assert cp.array_equal(copies[0], cp.arange(24, dtype=cp.float32).reshape(4, 6))
    assert cp.array_equal(copies[2], cp.arange(24, dtype=cp.float32).reshape(4, 6).T)
    assert cp.array_equal(copies[3], cp.arange(24, dtype=cp.float32).reshape(4, 6)[:, ::2])
    assert float(copies[5]) == 8.0
