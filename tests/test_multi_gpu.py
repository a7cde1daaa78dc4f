"""A K-stage graph with one stage per GPU, in one process (peer copies, events) and across K
worker processes, under GPipe, OneFOneB and PipeDream: the same parameters as the one-GPU run.

K is the number of visible GPUs. Tests that need several GPUs skip on a machine with one; their
one-GPU stand-ins run the same code paths with every stage on ``cuda:0`` (one stream per stage,
or one worker process per stage sharing the card). Everything skips without cupy and a GPU. Run
them on a GPU machine with ``bash experiments/multi_gpu.sh`` (see its header).
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import assert_params_close, assert_params_equal
from conftest import HAS_CUDA


def _gpu_count() -> int:
    if not HAS_CUDA:
        return 0
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


GPUS = _gpu_count()
STANDIN_STAGES = 4  # stages that share cuda:0 in the one-GPU stand-ins
STANDIN_WORKERS = 2  # worker processes that share cuda:0 in the cross-process stand-in

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU"),
    pytest.mark.timeout(300),
]
several_gpus = pytest.mark.skipif(
    GPUS < 2,
    reason=f"needs 2 or more GPUs, this machine has {GPUS}: the one-GPU stand-in "
    "(test_*_standin_*) runs the same code with every stage on cuda:0",
)


def _policies(k: int) -> list[Any]:
    m = 2 * k  # microbatches: more than the stages, so the pipeline fills
    return [policies.GPipe(m), policies.OneFOneB(m), policies.PipeDream(m)]


POLICY_IDS = ["gpipe", "1f1b", "pipedream"]


def _graph(devices: list[str], workers: list[int | None] | None = None) -> ann.Graph:
    k = len(devices)
    modules: list[Any] = []
    sizes = []
    for s in range(k):
        last = s == k - 1
        modules.append(nn.Linear(6 if s == 0 else 32, 4 if last else 32))
        if not last:
            modules.append(nn.Tanh())
        sizes.append(1 if last else 2)
    return ann.Graph.sequential(
        modules,
        loss=nn.CrossEntropyLoss(),
        stages=sizes,
        input_shape=(None, 6),
        devices=devices,
        workers=workers,
    )


def _data(n: int = 96) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 6)).astype(np.float32), "y": rng.integers(0, 4, n)}


def _fit(
    devices: list[str],
    policy: Any,
    workers: list[int | None] | None = None,
    cluster: Any = None,
    cuda_graphs: bool | None = None,
) -> tuple[Any, Any]:
    tr = ann.Trainer(
        _graph(devices, workers),
        optimizer=optim.SGD(lr=0.1, momentum=0.9),
        policy=policy,
        seed=3,
        cluster=cluster,
        cuda_graphs=cuda_graphs,
    )
    hist = tr.fit(_data(), epochs=2, batch_size=48)
    return tr, hist


def _captures(devices: list[str], policy: Any, cuda_graphs: bool | None = None) -> bool:
    """Whether a run of this graph and policy with ``cuda_graphs`` (the default: None) captures
    CUDA graphs."""

    async def main() -> bool:
        async with ann.open_run(
            _graph(devices), optim.SGD(lr=0.1), policy, cuda_graphs=cuda_graphs
        ) as run:
            return bool(run.cuda_graphs_active)

    return anyio.run(main)


def _assert_same_run(run: tuple[Any, Any], reference: tuple[Any, Any]) -> None:
    (tr, hist), (ref, ref_hist) = run, reference
    assert tr.versions == ref.versions
    assert_params_close(tr.params, ref.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hist.losses, ref_hist.losses, rtol=1e-5)
    # evaluation runs outside the actors: each node on its own device, inputs moved between them
    got, want = tr.evaluate(_data()), ref.evaluate(_data())
    assert got["accuracy"] == want["accuracy"]
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        tr.predict(_data())["logits"], ref.predict(_data())["logits"], rtol=1e-5, atol=1e-6
    )


# -- one process, one stage per GPU ---------------------------------------------------------------


@several_gpus
@pytest.mark.parametrize("policy", _policies(max(GPUS, 1)), ids=POLICY_IDS)
def test_in_process_one_stage_per_gpu_matches_one_gpu(policy: Any) -> None:
    spread = _fit([f"cuda:{i}" for i in range(GPUS)], policy)
    one = _fit(["cuda:0"] * GPUS, policy)
    _assert_same_run(spread, one)


@several_gpus
@pytest.mark.parametrize("policy", _policies(max(GPUS, 1)), ids=POLICY_IDS)
def test_in_process_captured_stages_per_gpu_match_eager_ones_on_one_gpu(policy: Any) -> None:
    # a stage per GPU takes the same captured path as stages sharing one, when asked for (the
    # default keeps several GPUs eager until this has run): each actor captures on its own
    # device, inputs copied from a peer
    spread_devices = [f"cuda:{i}" for i in range(GPUS)]
    assert not _captures(spread_devices, policy)
    assert _captures(spread_devices, policy, cuda_graphs=True)
    spread = _fit(spread_devices, policy, cuda_graphs=True)
    one = _fit(["cuda:0"] * GPUS, policy, cuda_graphs=False)
    _assert_same_run(spread, one)


@pytest.mark.parametrize("policy", _policies(STANDIN_STAGES), ids=POLICY_IDS)
def test_in_process_standin_captured_stages_match_eager_ones(policy: Any) -> None:
    assert _captures(["cuda:0"] * STANDIN_STAGES, policy)
    captured = _fit(["cuda:0"] * STANDIN_STAGES, policy)
    eager = _fit(["cuda:0"] * STANDIN_STAGES, policy, cuda_graphs=False)
    _assert_same_run(captured, eager)


@several_gpus
def test_in_process_one_stage_per_gpu_is_bit_identical_to_one_gpu() -> None:
    # the same kernels on the same kind of card, in the same order: only where the data lives
    # differs, and a peer copy moves bits unchanged
    policy = policies.OneFOneB(2 * GPUS)
    spread, _ = _fit([f"cuda:{i}" for i in range(GPUS)], policy)
    one, _ = _fit(["cuda:0"] * GPUS, policy)
    assert_params_equal(spread.params, one.params)


@pytest.mark.parametrize("policy", _policies(STANDIN_STAGES), ids=POLICY_IDS)
def test_in_process_standin_stages_share_one_gpu(policy: Any) -> None:
    # one stream per stage on cuda:0, checked against the same graph on the CPU
    on_gpu = _fit(["cuda:0"] * STANDIN_STAGES, policy)
    on_cpu = _fit(["cpu"] * STANDIN_STAGES, policy)
    _assert_same_run(on_gpu, on_cpu)


# -- K worker processes, each stage on its worker's GPU -------------------------------------------


@pytest.fixture(scope="module")
def gpu_workers() -> Any:
    with ann.cluster.LocalCluster(workers=GPUS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def standin_workers() -> Any:
    with ann.cluster.LocalCluster(workers=STANDIN_WORKERS) as cluster:
        yield cluster


@several_gpus
@pytest.mark.parametrize("policy", _policies(max(GPUS, 1)), ids=POLICY_IDS)
def test_across_processes_one_stage_per_gpu_matches_one_gpu(policy: Any, gpu_workers: Any) -> None:
    spread = _fit(
        [f"cuda:{i}" for i in range(GPUS)], policy, workers=list(range(GPUS)), cluster=gpu_workers
    )
    one = _fit(["cuda:0"] * GPUS, policy)
    _assert_same_run(spread, one)


@pytest.mark.parametrize("policy", _policies(STANDIN_WORKERS), ids=POLICY_IDS)
def test_across_processes_standin_workers_share_one_gpu(policy: Any, standin_workers: Any) -> None:
    k = STANDIN_WORKERS
    spread = _fit(["cuda:0"] * k, policy, workers=list(range(k)), cluster=standin_workers)
    one = _fit(["cuda:0"] * k, policy)
    _assert_same_run(spread, one)
    # tensors cross processes as raw bytes, and each worker runs the kernels the driver would
    assert_params_equal(spread[0].params, one[0].params)


# -- the copies between devices ---------------------------------------------------------------------


def _slow_product(n: int = 2048, rounds: int = 20) -> tuple[Any, Any, Any]:
    """On a fresh stream of cuda:0, a product that takes a while; returns (x, event, host copy)."""
    import cupy

    with cupy.cuda.Device(0):
        producer = cupy.cuda.Stream(non_blocking=True)
        with producer:
            a = cupy.random.default_rng(0).standard_normal((n, n), dtype=cupy.float32) / n**0.5
            x = a
            for _ in range(rounds):
                x = cupy.tanh(x @ a)
            done = cupy.cuda.Event(disable_timing=True)
            done.record(producer)
        producer.synchronize()
        expected = x.get()
        # queue the same work again, writing into x in place, so a reader that does not wait
        # for the event sees the old values or a mix
        with producer:
            y = a
            for _ in range(rounds):
                y = cupy.tanh(y @ a)
            x[...] = 0
            x += y
            done.record(producer)
    return x, done, expected


def _consume(device: int, x: Any, event: Any, transpose: bool) -> np.ndarray:
    import cupy

    from asyncnn.backends import get_backend
    from asyncnn.backends._cupy import _peer_copy

    backend = get_backend(f"cuda:{device}")
    source = x.T if transpose else x
    stream = backend.new_stream()
    with backend.activate(stream):
        backend.wait_event(event, stream)  # what an actor does before its compute
        if device == x.device.id:  # copy_to would return x itself: call what it calls
            moved = _peer_copy(source, device)
        else:
            moved = backend.copy_to(source, f"cuda:{device}")
        assert moved.device.id == device
        result = cupy.asnumpy(moved, stream=stream)
    stream.synchronize()
    return np.asarray(result)


@several_gpus
@pytest.mark.parametrize("transpose", [False, True], ids=["contiguous", "strided"])
def test_a_copy_to_another_gpu_waits_for_the_producer(transpose: bool) -> None:
    x, event, expected = _slow_product()
    got = _consume(1, x, event, transpose)
    np.testing.assert_array_equal(got, expected.T if transpose else expected)


@pytest.mark.parametrize("transpose", [False, True], ids=["contiguous", "strided"])
def test_standin_the_copy_helper_waits_for_the_producer_on_one_gpu(transpose: bool) -> None:
    x, event, expected = _slow_product()
    got = _consume(0, x, event, transpose)
    np.testing.assert_array_equal(got, expected.T if transpose else expected)


@several_gpus
def test_copy_to_keeps_dtype_shape_and_layout() -> None:
    import cupy

    from asyncnn.backends import get_backend

    with cupy.cuda.Device(0):
        f = cupy.asfortranarray(cupy.arange(12, dtype=cupy.float32).reshape(3, 4))
    moved = get_backend("cuda:0").copy_to(f, "cuda:1")
    assert moved.device.id == 1 and moved.dtype == f.dtype and moved.shape == (3, 4)
    np.testing.assert_array_equal(moved.get(), f.get())
    assert get_backend("cuda:1").asarray(moved) is moved  # already there: no copy
