"""Graphs across worker processes (LocalCluster): same results as one process, clear faults."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._cluster._placement import _worker_of
from asyncnn._math._pytree import tree_leaves

from _cluster_cases import _alive, chain, data, fit, slow_chain
from _reference import assert_params_equal

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def three() -> Any:
    with ann.cluster.LocalCluster(workers=3) as cluster:
        yield cluster


POLICIES = [
    policies.Sync(),
    policies.GPipe(microbatches=3),
    policies.OneFOneB(microbatches=3),
    policies.PipeDream(microbatches=4),
    policies.PipeDream(microbatches=4, stash=False),
    policies.ZeroBubbleH1(microbatches=3),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p))
@pytest.mark.parametrize("workers", [2, 3])
def test_deterministic_policies_match_one_process_bit_for_bit(
    policy: Any, workers: int, three: Any
) -> None:
    placed = [0, 1, None] if workers == 2 else [0, 1, 2]
    one, h1 = fit(chain([None, None, None]), policy)
    many, h2 = fit(chain(placed), policy, cluster=three)
    assert_params_equal(one.params, many.params)
    assert many.versions == one.versions
    np.testing.assert_allclose(h2.losses, h1.losses, rtol=1e-6)
    # every actor reports its counters, wherever it ran
    assert set(h2.statistics) == {"s0", "s1", "s2", "loss"}
    assert h2.statistics["s0"].forwards == h1.statistics["s0"].forwards > 0


def test_a_cluster_serves_several_fits_and_continues_the_same_run(three: Any) -> None:
    policy = policies.OneFOneB(microbatches=2)
    one = ann.Trainer(chain([None] * 3), optimizer=optim.Adam(lr=0.01), policy=policy)
    many = ann.Trainer(chain([2, 0, 1]), optimizer=optim.Adam(lr=0.01), policy=policy,
                       cluster=three)  # fmt: skip
    for _ in range(3):
        one.fit(data(), epochs=1, batch_size=32)
        many.fit(data(), epochs=1, batch_size=32)
    assert_params_equal(one.params, many.params)
    # evaluation runs in the driver on the gathered weights
    assert one.evaluate(data()) == many.evaluate(data())


def test_pipedream_2bw_on_a_cluster_goes_on_across_fits_as_in_one_process(three: Any) -> None:
    # a worker's share of the state held the latest weights only, so each fit on a cluster
    # started the 2BW stream anew; the version before the latest now travels both ways
    policy = policies.PipeDream2BW(2)
    one = ann.Trainer(chain([None] * 3), optimizer=optim.SGD(lr=0.1), policy=policy)
    many = ann.Trainer(chain([2, 0, None]), optimizer=optim.SGD(lr=0.1), policy=policy,
                       cluster=three)  # fmt: skip
    for _ in range(2):
        one.fit(data(), epochs=1, batch_size=32)
        h = many.fit(data(), epochs=1, batch_size=32)
    assert_params_equal(one.params, many.params)
    assert set(many.state.earlier_params) == {"s0", "s1", "s2"}
    assert_params_equal(one.state.earlier_params, many.state.earlier_params)
    assert 0 not in h.statistics["s0"].delays  # the second fit's first minibatch a version behind


def test_async_pending_delays_travel_to_and_from_the_workers(three: Any) -> None:
    # a worker's share of the state carried the gradients pending into the next fit, not their
    # delays: the first update of a fit on a cluster counted none of the carried ones
    def trainer(cluster: Any = None) -> ann.Trainer:
        workers = [None] * 3 if cluster is None else [2, 0, None]
        policy = policies.SpikeCompensation(policies.Async(1, min_update_frequency=2))
        return ann.Trainer(chain(workers), optimizer=optim.SGD(lr=0.1, momentum=0.9),
                           policy=policy, cluster=cluster)  # fmt: skip

    one, many = trainer(), trainer(three)
    one.fit(data(), epochs=1, batch_size=32)  # 3 keys: one gradient carried
    many.fit(data(), epochs=1, batch_size=32)
    assert (
        many.state.pending_delays
        == one.state.pending_delays
        == dict.fromkeys(("s0", "s1", "s2"), [0])
    )
    h1 = one.fit(data(), epochs=1, batch_size=32)
    h2 = many.fit(data(), epochs=1, batch_size=32)
    assert_params_equal(one.params, many.params)
    for name in ("s0", "s1", "s2"):  # the second fit's 2 updates count 4 delays, 1 carried
        assert h2.statistics[name].delays == h1.statistics[name].delays == {0: 4}


def test_loss_on_its_own_worker_and_layers_in_the_driver(three: Any) -> None:
    policy = policies.GPipe(microbatches=2)
    one, _ = fit(chain([None] * 3), policy)
    many, _ = fit(chain([None, 1, None], loss_worker=2), policy, cluster=three)
    assert_params_equal(one.params, many.params)


def test_a_save_from_a_hook_of_a_cluster_fit_is_refused_not_stale(
    tmp_path: Any, three: Any
) -> None:
    # (the workers send their weights back only at the run's end: a checkpoint saved from a
    # hook silently held the weights from before the fit)
    outcome: dict[str, Any] = {}

    class Saves(ann.callbacks.Callback):
        def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, Any]) -> None:
            try:
                trainer.save(tmp_path / "in-a-hook")
            except RuntimeError as exc:
                outcome["refused"] = exc

        def on_fit_end(self, trainer: Any, history: Any) -> None:
            trainer.save(tmp_path / "at-the-end")  # the run is over: its weights are back

    tr = ann.Trainer(chain([0, 1, 2]), optimizer=optim.SGD(lr=0.1),
                     policy=policies.GPipe(microbatches=2), cluster=three)  # fmt: skip
    tr.fit(data(), epochs=1, batch_size=32, callbacks=[Saves()])
    assert str(outcome["refused"]).startswith("save: a fit on a cluster is running")
    assert not (tmp_path / "in-a-hook").exists()
    back = ann.Trainer.load(tmp_path / "at-the-end")
    assert back.versions == tr.versions and min(tr.versions.values()) > 0
    assert_params_equal(back.params, tr.params)


def test_a_step_hook_after_a_cluster_runs_end_may_save_its_weights(
    tmp_path: Any, three: Any
) -> None:
    # (the hooks of the last minibatches run once the workers' weights are back: a save there
    # was refused as if the trainer held the weights from before the fit)
    saved: dict[int, Any] = {}

    class Saves(ann.callbacks.Callback):
        def on_step_end(self, trainer: Any, step: int, logs: dict[str, Any]) -> None:
            try:
                trainer.save(tmp_path / f"step-{step}")
                saved[step] = dict(trainer.versions)
            except RuntimeError:
                pass  # (a step hook while the run is open)

    tr = ann.Trainer(chain([0, 1, 2]), optimizer=optim.SGD(lr=0.1),
                     policy=policies.GPipe(microbatches=2), cluster=three)  # fmt: skip
    tr.fit(data(), epochs=1, batch_size=32, callbacks=[Saves()])
    last = max(saved)  # the last step's hook comes after the run: its save went through
    assert last == tr.state.minibatches - 1 and saved[last] == tr.versions
    assert ann.Trainer.load(tmp_path / f"step-{last}").versions == tr.versions


FLUSHING = [policies.Sync(), policies.GPipe(microbatches=3), policies.OneFOneB(microbatches=3)]


class _StopAt(ann.callbacks.Callback):
    """Sets ``trainer.stop_training`` in the step hook of minibatch ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.seen: list[int] = []

    def on_step_end(self, trainer: Any, step: int, logs: dict[str, Any]) -> None:
        self.seen.append(step)
        if step == self.at:
            trainer.stop_training = True


@pytest.mark.parametrize("policy", FLUSHING, ids=lambda p: repr(p))
def test_stop_training_in_a_step_hook_stops_a_cluster_fit_where_one_process_stops(
    policy: Any, three: Any
) -> None:
    # (on a cluster the hooks of minibatch k came only once minibatch k+1 was admitted, so a
    # stop at step 1 trained 3 minibatches, not 2, and the weights differed)
    for at in (1, 3):  # (3: the first step of the second epoch)
        runs = []
        for workers, cluster in (([None] * 3, None), ([0, 1, None], three)):
            tr = ann.Trainer(chain(workers), optimizer=optim.SGD(lr=0.1), policy=policy,
                             cluster=cluster)  # fmt: skip
            stop = _StopAt(at)
            hist = tr.fit(data(), epochs=2, batch_size=32, callbacks=[stop])
            runs.append((tr, hist, stop.seen))
        (one, h1, seen1), (many, h2, seen2) = runs
        assert seen2 == seen1 == list(range(at + 1))
        assert many.versions == one.versions == dict.fromkeys(("s0", "s1", "s2"), at + 1)
        assert_params_equal(one.params, many.params)
        assert h2.losses == h1.losses and h2.stopped_early
        assert (many.epochs_done, many.epoch_batches) == (one.epochs_done, one.epoch_batches)


def test_a_step_hook_raising_mid_run_on_a_cluster_keeps_the_state_from_before_the_fit(
    three: Any,
) -> None:
    # (its hook came only after the run had ended, which kept the whole fit: docs/workflow.md's
    # table keeps the state from before the call on a cluster, the weights being on the workers)
    class RaiseAt(ann.callbacks.Callback):
        def on_step_end(self, trainer: Any, step: int, logs: dict[str, Any]) -> None:
            if step == 1:
                raise ValueError("boom")

    tr = ann.Trainer(chain([0, 1, None]), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(),
                     cluster=three)  # fmt: skip
    before = {n: tree_leaves(p) for n, p in tr.params.items()}
    with pytest.raises(ValueError, match="boom"):
        tr.fit(data(), epochs=1, batch_size=32, callbacks=[RaiseAt()])  # 3 minibatches
    assert tr.versions == dict.fromkeys(("s0", "s1", "s2"), 0)
    assert (tr.state.minibatches, tr.epochs_done, tr.epoch_batches) == (0, 0, 0)
    assert_params_equal(before, {n: tree_leaves(p) for n, p in tr.params.items()})


def test_reading_the_weights_of_layers_on_a_workers_gpu_needs_no_gpu_here() -> None:
    # (params and save waited for every layer's GPU, also the workers': a driver without cupy
    # raised ImportError, one with GPUs made a context on each)
    g = ann.Graph()
    x = g.input("x", (None, 12))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("s0", nn.Linear(12, 4), x, worker=0, device="cuda:0")
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    with ann.cluster.LocalCluster(workers=1) as cluster:
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), cluster=cluster)
        assert set(tr.params) == {"s0"}


def test_resume_from_a_checkpoint_on_a_cluster(tmp_path: Any, three: Any) -> None:
    policy = policies.PipeDream(microbatches=2)
    straight, _ = fit(chain([0, 1, 2]), policy, cluster=three, epochs=1)
    straight.fit(data(), epochs=1, batch_size=32)  # two fits: PipeDream drains at each end
    first, _ = fit(chain([0, 1, 2]), policy, cluster=three, epochs=1)
    first.save(str(tmp_path / "ckpt"))
    resumed = ann.Trainer.load(str(tmp_path / "ckpt"), cluster=three)
    resumed.fit(data(), epochs=1, batch_size=32)
    assert_params_equal(straight.params, resumed.params)


@pytest.mark.anyio
async def test_open_run_on_a_cluster(anyio_backend: str, three: Any) -> None:
    g = chain([0, 1, None])
    batch = data(32)
    async with ann.open_run(
        g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(microbatches=2), cluster=three
    ) as run:
        start = run.params  # (a KeyError: the workers' layers were in no state before their end)
        assert sorted(start) == ["s0", "s1", "s2"]
        with pytest.raises(RuntimeError, match=r"known at its end: the layers \['s0', 's1'\]"):
            run.state()  # (a mix of the workers' starting weights and the driver's current ones)
        for _ in range(3):
            await run.step(batch)
        await run.drain()
        with pytest.raises(AttributeError, match=r"hosted by worker 1.*run.state\(\).versions"):
            run.actors["s1"].version  # noqa: B018 - (getting_started's example, on a cluster)
    async with ann.open_run(
        chain([None] * 3), optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(microbatches=2)
    ) as ref:
        for _ in range(3):
            await ref.step(batch)
    assert_params_equal(ref.params, run.params)
    assert sorted(run.losses) == [0, 1, 2]


@pytest.mark.anyio
async def test_a_second_run_on_a_busy_cluster_is_refused_and_the_first_goes_on(
    anyio_backend: str, three: Any
) -> None:
    batch = data(32)
    opts: dict[str, Any] = {"optimizer": optim.SGD(lr=0.1), "policy": policies.Sync()}
    async with ann.open_run(chain([0, 1, None]), cluster=three, **opts) as run:
        await run.step(batch)
        with pytest.raises(RuntimeError, match="already has a run open"):
            async with ann.open_run(chain([2, 1, None]), cluster=three, **opts):
                pass
        await run.step(batch)
    async with ann.open_run(chain([None] * 3), **opts) as ref:
        for _ in range(2):
            await ref.step(batch)
    assert_params_equal(ref.params, run.params)


def test_async_trace_of_a_distributed_run_replays_identically(tmp_path: Any, three: Any) -> None:
    path = str(tmp_path / "run.trace")
    tr, _ = fit(
        chain([0, 1, 2]), policies.Async(max_active_keys=3, min_update_frequency=1),
        cluster=three, trace=path,
    )  # fmt: skip
    t = ann.trace.read(path)
    actors = {e["a"] for e in t.events}
    assert {"s0", "s1", "s2", "loss", "scheduler"} <= actors
    times = [e["t"] for e in t.events]
    assert times == sorted(times)  # one clock, merged in time order
    rep = ann.replay(path)
    assert rep.identical, rep.first_divergence
    assert_params_equal(tr.params, rep.params)
    ann.trace.to_chrome(path, str(tmp_path / "run.json"))


def wide(workers: list[int | None], width: int = 512) -> ann.Graph:
    """Two Linear+Tanh stages and a head, wide enough that a run's pool cuts their products."""
    g = ann.Graph()
    x = g.input("x", shape=(None, width))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("s0", nn.Sequential(nn.Linear(width, width), nn.Tanh()), x, worker=workers[0])
    h = g.layer("s1", nn.Sequential(nn.Linear(width, width), nn.Tanh()), h, worker=workers[1])
    h = g.layer("s2", nn.Linear(width, 10), h, worker=workers[2])
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


@pytest.mark.parametrize(("workers", "threads"), [(2, None), (3, 1)])
def test_layers_whose_products_are_cut_match_one_process_bit_for_bit(
    workers: int, threads: int | None, tmp_path: Any
) -> None:
    # Each worker's pool had host_cores() // processes threads (or threads_per_worker), and
    # cut its products into as many parts: other kernels for other parts, so every leaf
    # differed from one process in the last bits (1e-9) once layers were wide enough to cut.
    # Every process now cuts as one process on this host would, whatever its threads.
    from asyncnn._runtime._lifecycle import RUN_PART_FLOPS, one_process_workers
    from asyncnn.backends import ComputeTeam

    plan = one_process_workers()
    if plan < 2:
        pytest.skip("a host of one core: one process cuts no product")
    # a microbatch's forward product, 256 x 512 @ 512 x 512, is cut in one process
    assert len(ComputeTeam(plan, part_flops=RUN_PART_FLOPS).product_plan(256, 512, 512)[1]) > 2
    rng = np.random.default_rng(0)
    d = {"x": rng.normal(size=(1024, 512)).astype("float32"), "y": rng.integers(0, 10, 1024)}
    opts: dict[str, Any] = {
        "optimizer": optim.SGD(lr=0.05, momentum=0.9), "policy": policies.GPipe(microbatches=2)
    }  # fmt: skip
    one = ann.Trainer(wide([None] * 3), **opts)
    one.fit(d, epochs=1, batch_size=512)
    path = str(tmp_path / "cluster.trace")
    placed: list[int | None] = [0, 1, None] if workers == 2 else [0, 1, 2]
    with ann.cluster.LocalCluster(workers=workers, threads_per_worker=threads) as cluster:
        many = ann.Trainer(wide(placed), cluster=cluster, trace=path, **opts)
        many.fit(d, epochs=1, batch_size=512)
    for name in one.params:
        for a, b in zip(tree_leaves(one.params[name]), tree_leaves(many.params[name]), strict=True):
            same = np.asarray(a).tobytes() == np.asarray(b).tobytes()
            assert same, f"{name}: {np.max(np.abs(np.asarray(a) - np.asarray(b)))}"
    pool = ann.trace.read(path).header["pool"]
    assert pool.get("plan_workers", pool["cpu_workers"]) == plan
    # a replay (in one process, on the recorded pool and plan) gives the same bits
    rep = ann.replay(path)
    assert rep.identical, rep.first_divergence
    assert_params_equal(many.params, rep.params)


def test_check_finite_on_a_worker_names_the_first_actor(three: Any) -> None:
    tr = ann.Trainer(chain([0, 1, 2]), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(),
                     cluster=three, check_finite=True)  # fmt: skip
    tr.state.params["s1"][0]["weight"][:] = np.nan
    with pytest.raises(ann.ActorError, match="NaN or Inf") as info:
        tr.fit(data(), epochs=1, batch_size=32)
    assert info.value.actor == "s1"
    assert info.value.key == 0
    assert isinstance(info.value.__cause__, ann.RemoteError)
    # the cluster was replaced: the next fit works
    tr2, _ = fit(chain([0, 1, 2]), policies.Sync(), cluster=three)
    one, _ = fit(chain([None] * 3), policies.Sync())
    assert_params_equal(one.params, tr2.params)


def test_a_node_on_a_worker_the_cluster_lacks_is_a_graph_error(three: Any) -> None:
    with pytest.raises(ann.GraphError, match="worker=5.*3 workers"):
        fit(chain([0, 5, 1]), policies.Sync(), cluster=three)
    # a numpy integer (``workers=np.arange(3)``) is a worker's number, as a Python int is
    with pytest.raises(ann.GraphError, match=r"worker=5.*3 workers"):
        fit(chain([0, np.int64(5), 1]), policies.Sync(), cluster=three)  # type: ignore[list-item]
    assert _worker_of("layer", "s1", np.int64(1), three) == 1
    assert type(_worker_of("layer", "s1", np.int64(1), three)) is int
    with pytest.raises(ann.GraphError, match=r"worker=np.int64\(-1\).*3 workers"):
        _worker_of("layer", "s1", np.int64(-1), three)
    # a bool or a string is not
    with pytest.raises(ann.GraphError, match=r"'s1' is placed on worker=np.True_ \(of type bool"):
        _worker_of("layer", "s1", np.bool_(True), three)
    with pytest.raises(ann.GraphError, match=r"'s1' is placed on worker='1' \(of type str\)"):
        _worker_of("layer", "s1", "1", three)
    with pytest.raises(ann.GraphError, match=r"'s1' is placed on worker=True \(of type bool\)"):
        fit(chain([0, True, 2]), policies.Sync(), cluster=three)


def test_cluster_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="workers >= 1"):
        ann.cluster.LocalCluster(workers=0)
    with pytest.raises(ValueError, match="workers >= 1, got -3"):
        ann.cluster.LocalCluster(workers=-3)
    # a bool is no count (True was taken as one worker); a string names its type
    for wrong in (True, "2", 2.0):
        with pytest.raises(
            TypeError, match=rf"takes an int >= 1, got .* \(of type {type(wrong).__name__}"
        ):
            ann.cluster.LocalCluster(workers=wrong)  # type: ignore[arg-type]
    # a numpy integer is taken, as worker= takes it (it was refused as "workers >= 1, got 2")
    numpy_count = ann.cluster.LocalCluster(workers=np.int64(2))  # type: ignore[arg-type]
    assert numpy_count.workers == 2 and type(numpy_count.workers) is int
    # options failed deep in the first run ("'>=' not supported"), declared every worker hung
    # (a timeout of 0), or turned NCCL on (nccl="no")
    for option, value, error in [
        ("heartbeat_timeout", "5", TypeError), ("heartbeat_timeout", 0, ValueError),
        ("heartbeat_timeout", None, TypeError), ("start_timeout", -1.0, ValueError),
        ("max_message_bytes", 1.5, TypeError), ("threads_per_worker", 0, ValueError),
        ("nccl", "no", TypeError),
    ]:  # fmt: skip
        with pytest.raises(error, match=rf"LocalCluster\({option}=\.\.\.\)"):
            ann.cluster.LocalCluster(workers=2, **{option: value})
    ann.cluster.LocalCluster(workers=2, start_timeout=None, heartbeat_timeout=np.float32(2))
    # numpy numbers are taken and kept as Python ones: a numpy int64 reached msgpack (threads,
    # "can not serialize 'numpy.int64' object") and the shared-memory reader (max_message_bytes,
    # "no attribute 'bit_length'") only once the first run was under way
    numbers = ann.cluster.LocalCluster(
        workers=2, threads_per_worker=np.int64(1), max_message_bytes=np.int64(2**30),
        heartbeat_timeout=np.float32(2), start_timeout=np.int32(30),
    )  # fmt: skip
    assert type(numbers.threads_per_worker) is int and numbers.threads_per_worker == 1
    assert type(numbers.max_message_bytes) is int and numbers.max_message_bytes == 2**30
    assert type(numbers.heartbeat_timeout) is float and type(numbers.start_timeout) is float
    # an empty address made every worker exit at the start with no reason given
    for empty in ("", "  "):
        with pytest.raises(
            ValueError, match=r"LocalCluster\(host=\.\.\.\) takes an address.* got '\s*'"
        ):
            ann.cluster.LocalCluster(workers=2, host=empty)
    with pytest.raises(TypeError, match="asyncnn.cluster"):
        ann.Trainer(chain([0]), optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), cluster=2)


def test_a_heartbeat_timeout_the_heartbeat_cannot_meet_is_refused() -> None:
    # heartbeat_timeout=0.3 was taken: a worker with nothing to send is silent for the 0.5 s
    # between two heartbeats, so every run longer than that failed, blaming a healthy worker
    from asyncnn._cluster._base import HEARTBEAT_INTERVAL, MIN_HEARTBEAT_TIMEOUT

    assert MIN_HEARTBEAT_TIMEOUT == 2 * HEARTBEAT_INTERVAL == 1.0
    for short in (0.3, 0.999, np.float32(0.5)):
        with pytest.raises(
            ValueError,
            match=r"^LocalCluster\(heartbeat_timeout=\.\.\.\) must be at least 1 s, got "
            r".*: a worker sends a heartbeat every 0.5 s",
        ):
            ann.cluster.LocalCluster(workers=1, heartbeat_timeout=short)
    assert ann.cluster.LocalCluster(workers=1, heartbeat_timeout=1).heartbeat_timeout == 1.0


def run_with_a_broken_frame(cluster: Any, graph: ann.Graph, inject: Any) -> str:
    """Runs ``GPipe(4)`` on ``cluster`` and, after its first minibatch, awaits ``inject(conn)``
    on worker 1's connection between two frames, as a broken sender would; the run must fail.
    Returns the text of its error and cause."""
    tr = ann.Trainer(graph, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(microbatches=4),
                     cluster=cluster)  # fmt: skip
    big = data(2000)

    async def main() -> None:
        async with ann.open_run(
            tr.graph, tr.optimizer, tr.policy, cluster=cluster, state=tr.state
        ) as run:
            await run.step({k: v[:32] for k, v in big.items()})
            conn = cluster.connections[1]
            async with conn._lock:  # between two frames
                await inject(conn)
            for i in range(32, 2000, 32):
                await run.step({k: v[i : i + 32] for k, v in big.items()})

    with pytest.raises((ann.WorkerError, ann.ActorError)) as info:
        anyio.run(main, backend="trio")
    return str(info.value) + str(info.value.__cause__)


def test_a_frame_claiming_100_gb_is_refused_and_the_run_reports_it() -> None:
    from asyncnn._cluster._wire import _PREFIX, MAGIC

    async def claim(conn: Any) -> None:
        await conn._send_all(_PREFIX.pack(MAGIC, 10, 100 * 10**9))

    # a raw TCP frame (tests/test_shm.py sends the same claim through shared memory)
    cluster = ann.cluster.LocalCluster(workers=2, shm=False)
    start = time.perf_counter()
    text = run_with_a_broken_frame(cluster, slow_chain(), claim)
    assert time.perf_counter() - start < 10
    assert "100,000,000,000 bytes" in text and "worker 1" in text
    cluster.close()


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "tcp"])
def test_a_message_over_max_message_bytes_fails_the_run_naming_the_nodes_and_the_limit(
    shm: bool,
) -> None:
    g = ann.Graph()
    x = g.input("x", shape=(None, 12))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("s0", nn.Linear(12, 4), x)
    h = g.layer("s1", nn.Sequential(nn.Linear(4, 64), nn.Tanh()), h, worker=0)
    h = g.layer("s2", nn.Linear(64, 4), h, worker=1)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    # the weights fit in 3,000 bytes; s1's activations (32 x 64 float32) do not
    with ann.cluster.LocalCluster(workers=2, max_message_bytes=3000, shm=shm) as cluster:
        with pytest.raises(ann.ActorError) as info:
            fit(g, policies.Sync(), cluster=cluster, epochs=1)
    text = str(info.value)
    assert info.value.actor == "s1"
    assert "from 's1' to 's2'" in text and "(32, 64)" in text and "worker 1" in text
    assert "8,192 bytes" in text and "max_message_bytes" in text


# -- learning, and Ray -----------------------------------------------------------------------------
def _mnist1d_accuracy(policy: Any, cluster: Any = None, workers: Any = None) -> float:
    from asyncnn import data as datasets

    ds = datasets.load_mnist1d()
    layers = [nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)]
    g = ann.Graph.sequential(layers, loss=nn.CrossEntropyLoss(), stages=3, input_shape=(None, 40),
                             workers=workers)  # fmt: skip
    tr = ann.Trainer(g, optimizer=optim.Adam(lr=5e-3), policy=policy, seed=0, cluster=cluster)
    tr.fit({"x": ds["x_train"], "y": ds["y_train"]}, epochs=150, batch_size=100, shuffle=True)
    return float(tr.evaluate({"x": ds["x_test"], "y": ds["y_test"]})["accuracy"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_async_on_workers_trains_mnist1d_within_three_points_of_sync_in_one_process() -> None:
    sync = _mnist1d_accuracy(policies.Sync())
    with ann.cluster.LocalCluster(workers=2) as cluster:
        spread = _mnist1d_accuracy(policies.Async(max_active_keys=4), cluster, [0, 1, None])
    assert spread >= sync - 0.03, f"Async on 2 workers: {spread:.1%}, Sync: {sync:.1%}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_cluster_matches_one_process_and_reports_a_dead_worker() -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    try:
        cluster = ann.cluster.RayCluster(workers=2, heartbeat_timeout=5.0)
        policy = policies.OneFOneB(microbatches=3)
        one, _ = fit(chain([None] * 3), policy)
        many, _ = fit(chain([0, 1, None]), policy, cluster=cluster)
        assert_params_equal(one.params, many.params)
        # asyncnn's own listeners on Ray workers are on loopback (Ray's are Ray's: see docs)
        assert {v["host"] for v in cluster.info.values()} == {"127.0.0.1"}
        # a deterministic policy on Ray equals one process; Async learns as well
        tr, hist = fit(chain([0, 1, None]), policies.Async(max_active_keys=3), cluster=cluster)
        assert np.isfinite(hist.losses).all()
        # a Ray worker that dies fails the run with its name
        pid = cluster.info[1]["pid"]
        threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
        slow = ann.Trainer(slow_chain(), optimizer=optim.SGD(lr=0.1),
                           policy=policies.GPipe(microbatches=4), cluster=cluster)  # fmt: skip
        with pytest.raises(ann.WorkerError, match="worker 1 .*died"):
            slow.fit(data(4000), epochs=1, batch_size=32)
        cluster.close()
    finally:
        ray.shutdown()


# -- dynamic graphs on workers ---------------------------------------------------------------------
def _moe_on(workers: list[Any]) -> ann.Graph:
    """A router on one process, 3 experts spread over others, the merge and head elsewhere."""
    g = ann.Graph()
    x = g.input("x", shape=(None, 12))
    y = g.input("y", shape=(None,), dtype="int64")
    r = g.router("gate", nn.Linear(12, 3), x, experts=3, k=1, capacity=6, worker=workers[0])
    outs = [
        g.layer(f"e{i}", nn.Sequential(nn.Linear(12, 8), nn.Tanh()), r, worker=workers[1 + i])
        for i in range(3)
    ]
    m = g.merge("merge", r, *outs, worker=workers[4])
    o = g.layer("head", nn.Linear(8, 4), m, worker=workers[5])
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    return g


@pytest.mark.parametrize("policy", [policies.GPipe(microbatches=3), policies.PipeDream(2)],
                         ids=repr)  # fmt: skip
def test_routed_experts_on_workers_match_one_process(policy: Any, three: Any) -> None:
    one, h1 = fit(_moe_on([None] * 6), policy)
    many, h2 = fit(_moe_on([0, 1, 2, None, 1, 2]), policy, cluster=three)
    assert_params_equal(one.params, many.params)
    # skipped keys (an expert with no rows) and capacity drops are counted on every worker
    for name in ("e0", "e1", "e2"):
        assert h2.statistics[name].skipped == h1.statistics[name].skipped
    gate1, gate2 = h1.statistics["gate"], h2.statistics["gate"]
    assert gate2.expert_rows == gate1.expert_rows and gate2.dropped_rows == gate1.dropped_rows
    assert sum(gate2.dropped_rows.values()) > 0  # the capacity of 6 rows per key bites


def test_a_recurrent_loop_on_a_worker_matches_one_process(three: Any) -> None:
    """Sequences of 0-5 steps in one key; the loop cell, its encoder and the head on 3 workers."""
    from asyncnn.dynamic import RNNCell

    def rnn(w: int | None) -> ann.Graph:
        g = ann.Graph()
        x = g.input("x", (None, 5, 3))
        c = g.input("c", (None, 4))
        lens = g.input("len", (None,), dtype="int64")
        y = g.input("y", (None,), dtype="int64")
        h0 = g.layer("enc", nn.Sequential(nn.Linear(4, 6), nn.Tanh()), c, worker=0)
        h = g.loop("rnn", RNNCell(3, 6), h0, x, lens, worker=w)
        o = g.layer("head", nn.Linear(6, 3), h, worker=2)
        g.loss("loss", nn.CrossEntropyLoss(), o, y)
        return g

    rng = np.random.default_rng(0)
    n = 24
    d = {"x": rng.normal(size=(n, 5, 3)).astype("float32"),
         "c": rng.normal(size=(n, 4)).astype("float32"),
         "len": rng.integers(0, 6, n), "y": rng.integers(0, 3, n)}  # fmt: skip
    results = []
    for cluster, w in ((None, None), (three, 1)):
        tr = ann.Trainer(rnn(w), optimizer=optim.SGD(lr=0.1), policy=policies.OneFOneB(3),
                         cluster=cluster)  # fmt: skip
        tr.fit(d, epochs=2, batch_size=12)
        results.append(tr.params)
    assert_params_equal(results[0], results[1])


def test_a_worker_that_died_between_fits_is_replaced(caplog: Any) -> None:
    with ann.cluster.LocalCluster(workers=2) as cluster:
        policy = policies.OneFOneB(microbatches=2)
        many = ann.Trainer(chain([0, 1, None]), optimizer=optim.SGD(lr=0.1), policy=policy,
                           cluster=cluster)  # fmt: skip
        one = ann.Trainer(chain([None] * 3), optimizer=optim.SGD(lr=0.1), policy=policy)
        many.fit(data(), epochs=1, batch_size=32)
        one.fit(data(), epochs=1, batch_size=32)
        victim = cluster.pids[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.perf_counter() + 5
        while _alive(victim) and time.perf_counter() < deadline:
            time.sleep(0.02)
        with caplog.at_level("WARNING", logger="asyncnn.cluster"):
            many.fit(data(), epochs=1, batch_size=32)  # all state was in the driver: no loss
        one.fit(data(), epochs=1, batch_size=32)
        assert "worker 0 killed by SIGKILL since the last run" in caplog.text
        assert victim not in cluster.pids
        assert_params_equal(one.params, many.params)


# -- hostile local processes -------------------------------------------------------------------------
def _flood(host: str, port: int, count: int, refused: list[int]) -> None:
    """``count`` wrong-token handshakes against ``host:port``, 32 at a time."""
    from asyncnn._cluster._handshake import connect

    async def main() -> None:
        limiter = anyio.CapacityLimiter(32)

        async def one() -> None:
            async with limiter:
                try:
                    conn = await connect(host, port, b"not the token", {"role": "peer", "index": 9},
                                         "worker", seconds=20)  # fmt: skip
                    conn.close()
                except (ConnectionError, OSError):
                    refused[0] += 1

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)

    anyio.run(main, backend="trio")


@pytest.mark.timeout(180)
def test_a_flood_of_wrong_tokens_during_a_run_leaves_it_unharmed() -> None:
    # 12,000 wrong-token handshakes against a worker, while a run goes on: the run completes,
    # equals one process, and the refusals cost a counter and a few lines, not a list each
    cluster = ann.cluster.LocalCluster(workers=2)
    batches = [data(32, seed) for seed in range(4)]
    refused = [0]
    steps = [0]

    async def main(graph: ann.Graph, on_cluster: bool) -> dict[str, Any]:
        async with ann.open_run(
            graph, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(microbatches=2),
            cluster=cluster if on_cluster else None,
        ) as run:  # fmt: skip
            if on_cluster:
                await run.step(batches[0])
                host, port = cluster.info[0]["host"], cluster.info[0]["port"]
                flood = threading.Thread(target=_flood, args=(host, port, 12_000, refused))
                flood.start()
                i = 1
                while flood.is_alive():
                    await run.step(batches[i % 4])
                    i += 1
                    await anyio.sleep(0.02)
                flood.join()
                for _ in range(3):  # and a little after it
                    await run.step(batches[i % 4])
                    i += 1
                steps[0] = i
            else:
                for i in range(steps[0]):
                    await run.step(batches[i % 4])
        return run.params

    try:
        spread = anyio.run(main, chain([0, 1, None]), True, backend="trio")
        assert refused[0] == 12_000
        assert cluster.rejected_count >= 12_000 - 64  # at most the last few still in flight
        assert len(cluster.rejected) <= cluster.REJECTED_KEPT
        assert any("wrong token" in line for line in cluster.rejected)
    finally:
        cluster.close()
    one = anyio.run(main, chain([None] * 3), False, backend="trio")
    assert_params_equal(one, spread)


class _Blocked(ann.cluster.LocalCluster):
    """A local cluster whose port is found by idle connections before its workers dial it."""

    idle: list[Any]

    def _launch(self, host: str, port: int, token: bytes) -> None:
        import socket

        self.idle = [socket.create_connection((host, port)) for _ in range(4)]
        super()._launch(host, port, token)


def test_idle_connections_to_the_drivers_port_cannot_keep_the_workers_out() -> None:
    # the driver handshakes with every comer at once: four idle connections (each would have
    # held a one-at-a-time handshake for its 10 s timeout) do not delay the start
    cluster = _Blocked(workers=2, start_timeout=8.0)
    try:
        tr, _ = fit(chain([0, 1, None]), policies.Sync(), cluster=cluster, epochs=1)
    finally:
        for s in getattr(cluster, "idle", []):
            s.close()
        cluster.close()
    one, _ = fit(chain([None] * 3), policies.Sync(), epochs=1)
    assert_params_equal(one.params, tr.params)


@pytest.mark.parametrize(
    "policy",
    [policies.Interleaved1F1B(microbatches=4), policies.ZeroBubbleH1(microbatches=4, virtual=2)],
    ids=lambda p: repr(p),
)
def test_interleaved_stages_of_a_device_on_one_worker_match_one_process(
    policy: Any, three: Any
) -> None:
    # 4 stages on 2 devices (V = 2): device 0 hosts stages 0 and 2, device 1 stages 1 and 3;
    # the stages of a device take turns, so they share a worker
    one, h1 = fit(chain([None] * 4), policy)
    many, h2 = fit(chain([0, 1, 0, 1]), policy, cluster=three)
    assert_params_equal(one.params, many.params)
    assert many.versions == one.versions
    np.testing.assert_allclose(h2.losses, h1.losses, rtol=1e-6)


def test_stages_of_one_device_on_different_workers_are_refused_by_name() -> None:
    # refused by the driver before any worker hears of the run
    with ann.cluster.LocalCluster(workers=2) as cluster:
        with pytest.raises(ann.GraphError, match=r"\['s0', 's2'\] on one device.*different"):
            fit(chain([0, 1, 1, 0]), policies.Interleaved1F1B(microbatches=4), cluster=cluster)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_two_runs_opened_at_once_from_two_threads_one_is_refused_the_other_goes_on(
    backend: str, monkeypatch: Any
) -> None:
    # the check for an open run and the claim were apart (validation, placement, the specs and
    # the starting state in between): two fits on two threads both got past the check, and
    # both then failed with garbled errors blaming the workers or the protocol
    from asyncnn._cluster import _driver

    cluster = ann.cluster.LocalCluster(workers=2)
    first_inside, second_done = threading.Event(), threading.Event()
    calls: list[str] = []
    real_placement = _driver.placement

    def placement(graph: Any, cl: Any) -> Any:
        if not calls:
            calls.append("first")
            first_inside.set()
            second_done.wait(10)  # the window between the check and the claim, held open
        else:
            calls.append("second")
        return real_placement(graph, cl)

    class Started(Exception):
        pass

    async def start() -> None:
        assert cluster.running  # the refused run left the open one's claim alone
        raise Started  # far enough: the workers are not what is tested

    monkeypatch.setattr(_driver, "placement", placement)
    monkeypatch.setattr(cluster, "start", start)
    opts: dict[str, Any] = {"optimizer": optim.SGD(lr=0.1), "policy": policies.Sync()}
    outcomes: dict[str, BaseException] = {}

    def one_run(name: str) -> None:
        async def body() -> None:
            async with ann.open_run(chain([0, 1, None]), cluster=cluster, **opts):
                pass

        try:
            anyio.run(body, backend=backend)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcomes[name] = exc

    first = threading.Thread(target=one_run, args=("first",))
    first.start()
    try:
        assert first_inside.wait(10)
        one_run("second")
    finally:
        second_done.set()
        first.join(10)
    assert isinstance(outcomes["second"], RuntimeError), outcomes
    assert "already has a run open" in str(outcomes["second"])
    assert isinstance(outcomes["first"], Started), outcomes
    assert calls == ["first"] and not cluster.running


def test_threads_per_worker_past_a_pools_limit_is_refused_by_its_own_name() -> None:
    # 5000 was taken, and the fit then failed with "cpu_workers must be at most 4096", an
    # argument the user never passed
    from asyncnn.backends import MAX_POOL_WORKERS

    with pytest.raises(
        ValueError,
        match=rf"^LocalCluster\(threads_per_worker=\.\.\.\) must be at most {MAX_POOL_WORKERS}, "
        r"got 5000",
    ):
        ann.cluster.LocalCluster(workers=2, threads_per_worker=5000)
    most = ann.cluster.LocalCluster(workers=2, threads_per_worker=MAX_POOL_WORKERS)
    assert most.threads_per_worker == MAX_POOL_WORKERS


class _FakeRay:
    """A stand-in for the ``ray`` module: a local instance this process starts, actors that
    are made (or fail to be) but never serve, and the resources of a 2-CPU host."""

    def __init__(self, fail_actors: bool = False) -> None:
        import types

        self.module = types.ModuleType("ray")
        self.up = False
        self.shutdowns = 0
        fake = self

        class Handle:
            def options(self, **resources: Any) -> Any:
                return self

            def remote(self) -> Any:
                if fail_actors:
                    raise ValueError("The quantity of resource num_cpus cannot be negative")
                actor = types.SimpleNamespace()
                actor.serve = types.SimpleNamespace(remote=lambda *args: object())
                return actor

        def init(**kwargs: Any) -> None:
            fake.up = True

        def shutdown() -> None:
            fake.up, fake.shutdowns = False, fake.shutdowns + 1

        m = self.module
        m.is_initialized = lambda: fake.up  # type: ignore[attr-defined]
        m.init, m.shutdown = init, shutdown  # type: ignore[attr-defined]
        m.remote = lambda cls: Handle()  # type: ignore[attr-defined]
        m.wait = lambda refs, **kw: ([], list(refs))  # type: ignore[attr-defined]
        m.kill = lambda actor: None  # type: ignore[attr-defined]
        m.cluster_resources = lambda: {"CPU": 2.0, "memory": 1e9}  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_ray_cluster_whose_start_failed_stops_the_ray_it_started(
    anyio_backend: str, monkeypatch: Any, caplog: Any
) -> None:
    # close() returned at once when no actor had been made, leaving running the local Ray
    # instance the start had begun; every later RayCluster then took it as someone else's
    import sys

    ray = _FakeRay(fail_actors=True)
    monkeypatch.setitem(sys.modules, "ray", ray.module)
    cluster = ann.cluster.RayCluster(workers=2)
    with pytest.raises(ValueError, match="num_cpus cannot be negative"):
        await cluster.start()
    cluster.close()
    assert not ray.up and ray.shutdowns == 1
    assert not cluster._owns_ray


@pytest.mark.anyio
async def test_ray_workers_that_ray_cannot_place_are_said_to_be_so(
    anyio_backend: str, monkeypatch: Any, caplog: Any
) -> None:
    # a GPU asked of a host without one waited start_timeout, then said only "workers [0, 1]
    # did not connect (worker 0: no word; worker 1: no word)"
    import sys

    ray = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray.module)
    cluster = ann.cluster.RayCluster(workers=2, gpus_per_worker=1, start_timeout=0.3)
    with pytest.raises(
        ann.WorkerError,
        match=r"did not connect within 0.3 s \(worker 0: no word: Ray may be unable to place "
        r"it: the 2 workers need 2 GPUs in all \(gpus_per_worker=1\), and the Ray cluster has 0",
    ):
        await cluster.start()
    assert not ray.up  # (a start that failed stops the Ray it started)


def test_ray_cluster_options_are_checked_when_it_is_made() -> None:
    # they were taken as given, and the fit failed naming Ray's num_cpus, not the option
    for option, value, error in [
        ("cpus_per_worker", -1, ValueError), ("cpus_per_worker", "two", TypeError),
        ("gpus_per_worker", float("nan"), ValueError), ("gpus_per_worker", True, TypeError),
        ("address", 5, TypeError),
    ]:  # fmt: skip
        with pytest.raises(error, match=rf"^RayCluster\({option}=\.\.\.\)"):
            ann.cluster.RayCluster(workers=2, **{option: value})
    ok = ann.cluster.RayCluster(workers=2, cpus_per_worker=0, gpus_per_worker=np.float32(0.5))
    assert ok.cpus_per_worker == 0 and type(ok.gpus_per_worker) is float
