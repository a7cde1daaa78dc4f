"""The driver's side of a run on a cluster: it hosts the scheduler (and any node without
``worker=``), sends each worker its share, and gathers losses, weights, statistics and traces.

Reading the workers during the run (their frames, their silences, their failures named) is
``_driver_read``'s.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from asyncnn._errors import WorkerError
from asyncnn._math._imports import import_by_path
from asyncnn._math._pytree import tree_map
from asyncnn._runtime._checks import validate
from asyncnn._runtime._config import RunConfig
from asyncnn._runtime._graph import Graph
from asyncnn._runtime._lifecycle import (
    cpu_layers,
    host_cores,
    hosting,
    maybe_pool,
    one_process_workers,
    open_recorder,
    pool_spec,
    recording,
)
from asyncnn._runtime._loss_reductions import check_loss_reductions
from asyncnn._runtime._policies import Policy
from asyncnn._runtime._recorder import Recorder
from asyncnn._runtime._run import (
    Run,
    RunState,
    init_state,
)
from asyncnn._runtime._statistics import ActorStatistics
from asyncnn.backends import DevicePool, to_numpy

from . import _shm
from ._codec import encode_state
from ._driver_read import DroppedTrace, _died, _gather_traces, _one_error, _read_worker
from ._driver_read import _class_named as _class_named  # (tests import it from here)
from ._local import LocalCluster
from ._nccl import LinkedShare, NcclLinks, plan_links, unique_ids
from ._placement import check_turns, placement
from ._remote import ClusterRun, RemoteActor
from ._traces import merge_traces, refused_as_trace
from ._wire import lost_peer
from ._worker import driver_paths

if TYPE_CHECKING:
    from ._base import Cluster

__all__ = ["open_cluster_run"]


class DriverRun(ClusterRun):
    """The run in the driver: its state and statistics include what the workers send back."""

    results: dict[int, dict[str, Any]]
    worker_traces: dict[int, Any]
    nccl: NcclLinks | None = None

    #: the state the run started from (the weights of a worker's layers until it sends its own)
    start_state: RunState

    def state(self) -> RunState:
        """The run's state, the workers' layers as they sent them at the run's end.

        Raises:
            RuntimeError: before then (their weights are in the workers): a state mixing the
                workers' starting weights with the driver's current ones would continue with
                stages out of step (read :attr:`params` for the weights as they are known).
        """
        own = self._gathered()
        waiting = [n for n in self.graph.layers if n not in own.params]
        if waiting:
            raise RuntimeError(
                f"the state of a cluster run is known at its end: the layers {waiting} are on "
                "worker processes, which send their weights back when the run ends; take "
                "run.state() after the open_run block (run.params gives the weights known now)"
            )
        order = self.graph.layers
        return RunState(
            params={n: own.params[n] for n in order},
            opt_states={n: own.opt_states[n] for n in order},
            versions={n: own.versions[n] for n in order},
            minibatches=own.minibatches,
            keys=own.keys,
            pending_grads=own.pending_grads,
            actor_states=own.actor_states,
            earlier_params=own.earlier_params,
            pending_delays=own.pending_delays,
        )

    def _gathered(self) -> RunState:
        """The driver's own layers' state, with what the workers have sent back."""
        own = super().state()
        for res in self.results.values():
            own.params.update(res["params"])
            own.opt_states.update(res["opt_states"])
            own.versions.update(res["versions"])
            own.pending_grads.update(res["pending"])
            own.actor_states.update(res["actor_states"])
            own.earlier_params.update(res["earlier"])
            own.pending_delays.update(res["pending_delays"])
        return own

    @property
    def params(self) -> dict[str, Any]:
        """``{node name: params}`` of every layer, as numpy (those of workers as they sent them
        at the end of the run; before that, as they were at its start)."""
        known = self._gathered().params
        start = self.start_state.params
        return {n: tree_map(to_numpy, known.get(n, start[n])) for n in self.graph.layers}

    def statistics(self) -> dict[str, ActorStatistics]:
        out = super().statistics()
        for res in self.results.values():
            for name, d in res["stats"].items():
                # a router's or a loop's counters have more fields than the base
                cls = import_by_path(d["cls"], ActorStatistics, "statistics class")
                out[name] = cls(**d["fields"])
        return {n: out[n] for n in self.actors if n in out}


@asynccontextmanager
async def open_cluster_run(
    cluster: Cluster,
    graph: Graph,
    optimizer: Any,
    policy: Policy,
    config: RunConfig,
    *,
    state: RunState | None = None,
    pool: DevicePool | None = None,
    on_loss: Any = None,
    validated: bool = False,
) -> AsyncIterator[Run]:
    """:func:`asyncnn.open_run` for a graph spread over ``cluster``'s workers, with the run's
    options whole as ``config`` (the one record every process of the run reads them from)."""
    # the test and the claim are one step: two fits on two threads (each with its own event
    # loop) both got past a bare test and then garbled each other's messages to the workers
    with cluster.run_lock:
        if cluster.running:
            # refused before anything reaches the workers: the open run goes on unharmed
            raise RuntimeError(
                f"this {type(cluster).__name__} already has a run open; its workers serve one "
                "run at a time: finish that run first, or give this one a cluster of its own"
            )
        cluster.running = True
    try:
        if not validated:
            validate(graph, config.dtype)
        check_loss_reductions(graph, policy)
        where = placement(graph, cluster)
        check_turns(graph, policy, where)
        # what cannot be sent to a worker (a module holding a function, a class defined inside
        # a function) is refused before any worker starts, leaving a warm cluster's workers be
        specs = {
            "graph": graph.to_spec(), "optimizer": optimizer.to_spec(), "policy": policy.to_spec()
        }  # fmt: skip
        if state is None:
            state = init_state(graph, optimizer, config.seed, config.dtype)
        try:
            await cluster.start()
            async with _driver_run(
                cluster, where, graph, optimizer, policy, config, state, pool, on_loss, specs
            ) as run:
                yield run
        except BaseException:
            cluster.broken()  # its workers may be mid-message: the next run starts fresh ones
            raise
    finally:
        with cluster.run_lock:
            cluster.running = False  # (this run's claim: a refused run never made one)
            if cluster.close_after_run:
                cluster.close_after_run = False
                cluster._stop()  # (its with-block was left, by an error, while this ran)


@asynccontextmanager
async def _driver_run(
    cluster: Cluster,
    where: dict[str, int | None],
    graph: Graph,
    optimizer: Any,
    policy: Policy,
    config: RunConfig,
    state: RunState,
    pool: DevicePool | None,
    on_loss: Any,
    specs: dict[str, Any],
) -> AsyncIterator[Run]:
    hosted_by: dict[int | None, list[str]] = {}
    for name, w in where.items():
        hosted_by.setdefault(w, []).append(name)
    here = set(hosted_by.get(None, []))
    plan = plan_links(graph, where) if cluster.nccl else []
    ids = _nccl_ids(len(plan))
    recorder = open_recorder(config, graph, optimizer, policy, state, workers=where)
    for conn in cluster.connections.values():
        conn.new_loop()
    # cores shared out between the processes that host CPU actors (they share this host when
    # the cluster is local; a Ray worker on its own machine may be told otherwise)
    cpu_hosts = {where[n] for n in cpu_layers(graph)} or {None}
    threads = cluster.threads_per_worker or max(1, host_cores() // len(cpu_hosts))
    share = _DriverShare(
        cluster, where, hosted_by, recorder, config.trace, state, threads, plan, ids, specs
    )
    with recording(recorder, share):
        # Every process plans its products as one process on this host would (a team of all
        # its cores), whatever its own threads: where a product is cut decides the last bits
        # of its sums, and a cluster's run must give one process's bits.
        async with maybe_pool(pool, threads, plan_workers=one_process_workers()) as the_pool:
            # (the workers' pools cut as this one: a pool given by the caller's too)
            share.pool = pool_spec(the_pool)
            proxies = {
                n: RemoteActor(n, cluster.connections[w], None, w)
                for n, w in where.items()
                if w is not None
            }
            run = DriverRun(
                graph, optimizer, policy, state, the_pool, config, on_loss=on_loss,
                recorder=recorder, hosted=here, remote=proxies,
            )  # fmt: skip
            run.results = {}
            run.start_state = state
            run.worker_traces = share.traces
            async with hosting(run, share):
                yield run


class _DriverShare(LinkedShare):
    """The driver's part in a cluster run: it sends each worker its share of the run (``state``
    of the layers it hosts, ``threads`` for its pool), reads every worker beside its own actors,
    marks the end of what it sent on each link, waits for the workers' results, names a failure
    by its first cause (a worker's death explains the rest), and merges the workers' traces into
    its own."""

    def __init__(
        self,
        cluster: Cluster,
        where: dict[str, int | None],
        hosted_by: dict[int | None, list[str]],
        recorder: Recorder | None,
        trace: str | None,
        state: RunState,
        threads: int,
        plan: list[Any],
        ids: list[Any],
        specs: dict[str, Any],
    ) -> None:
        super().__init__(-1, plan, ids, cluster.start_timeout)
        self.specs = specs
        self.cluster = cluster
        self.where = where
        self.state = state
        self.threads = threads
        #: how the driver's pool cuts work (pool_spec), which the workers' pools follow
        self.pool: dict[str, Any] = {}
        self.hosted_by = hosted_by
        self.recorder = recorder
        self.trace = trace if recorder is not None else None
        self.results_in = anyio.Event()
        # each worker's trace file, as it sent it (with its result, or with its error report)
        self.traces: dict[int, Any] = {}

    async def begin(self, run: Run) -> None:
        assert isinstance(run, DriverRun)
        await _start_workers(
            self.cluster, run, self.state, self.where, self.threads, self.pool, self.plan,
            self.ids, self.specs,
        )  # fmt: skip
        await super().begin(run)

    def start(self, tg: Any, run: Run) -> None:
        assert isinstance(run, DriverRun)
        cluster, hosted_by = self.cluster, self.hosted_by

        async def read_all() -> None:
            async with anyio.create_task_group() as rtg:
                for w in range(cluster.workers):
                    rtg.start_soon(_read_worker, cluster, run, w, hosted_by.get(w, []))
            self.results_in.set()

        tg.start_soon(read_all)

    async def actors_stopped(self, run: Run) -> None:
        # what the driver's actors sent precedes this marker on each link
        for conn in self.cluster.connections.values():
            await conn.send({"t": "eor"})

    async def settle(self, run: Run) -> None:
        await self.results_in.wait()

    async def failure(self, group: BaseExceptionGroup[Any]) -> BaseException:
        error = _one_error(group)
        lost = lost_peer(error)
        if lost is not None and lost.worker is not None:
            # a process failed because another one went away: report that one
            j = lost.worker
            error = await _died(self.cluster, j, self.hosted_by.get(j, []), lost)
        if self.trace is not None:
            await _gather_traces(self.cluster, self.traces, self.hosted_by)
        return error

    async def interrupted(self, run: Run) -> None:
        # a run cancelled from outside (a cancel scope, Ctrl-C on asyncio) is no failure of its
        # tasks: its workers' events are asked for here, before the cluster takes them down
        if self.trace is not None:
            await _gather_traces(self.cluster, self.traces, self.hosted_by)

    def trace_closing(self, failed: bool) -> None:
        if self.recorder is None:
            return
        # say whose events the trace lacks (summary and replay report it): those a worker left
        # out of its report (too large to send), and after a failure those never collected
        dropped = {w: t.reason for w, t in self.traces.items() if isinstance(t, DroppedTrace)}
        if dropped:
            self.recorder.event(
                "scheduler", "missing",
                meta={"workers": sorted(dropped), "error": "; ".join(
                    f"worker {w}: {dropped[w]}" for w in sorted(dropped)
                )},
            )  # fmt: skip
            if not failed:  # (a failed run's error says enough; a finished one says nothing)
                for w in sorted(dropped):
                    warnings.warn(
                        f"the trace {self.trace} lacks worker {w}'s events: {dropped[w]}",
                        UserWarning,
                        stacklevel=2,
                    )
        if not failed:
            return
        missing = sorted(
            w for w, names in self.hosted_by.items()
            if w is not None and names and w not in self.traces
        )  # fmt: skip
        if missing:
            self.recorder.event(
                "scheduler", "missing",
                meta={"workers": missing, "error": "the run failed or was interrupted before "
                      "these workers' events could be collected"},
            )  # fmt: skip

    def trace_closed(self, failed: bool) -> None:
        parts = [t for _, t in sorted(self.traces.items()) if not isinstance(t, DroppedTrace)]
        if self.trace is None or not parts:
            return
        try:
            _merge(self.trace, parts)
        except Exception:
            if not failed:  # a failed run's own error matters more than its trace
                raise


async def _start_workers(
    cluster: Cluster,
    run: DriverRun,
    state: RunState,
    where: dict[str, int | None],
    threads: int,
    pool: dict[str, Any],
    plan: list[Any],
    ids: list[Any],
    specs: dict[str, Any],
) -> None:
    """Sends each worker its share of the run: the specs (the graph's, the optimizer's and the
    policy's, built before the workers started), the run's options, the threads of its pool
    and how that pool cuts work (``pool``: the driver's, :func:`pool_spec`), and the state of
    the layers it hosts."""
    graph, recorder = run.graph, run.recorder
    # what every worker is told alike (the specs are built once)
    common = {
        "t": "run",
        "graph": specs["graph"],
        "shapes": {k: list(v) for k, v in (graph.shapes or {}).items()},
        "placement": where,
        "optimizer": specs["optimizer"],
        "policy": specs["policy"],
        # the run's options, whole; a worker writes no trace file of its own name
        "config": run.config.replace(trace=None).to_spec(),
        "max_in_flight": run.max_in_flight,
        "threads": threads,
        "pool": pool,
        "trace": run.config.trace_payloads if recorder is not None else None,
        "nccl": {"plan": [list(k) for k in plan], "ids": ids},
        # the import path as it is now: a module put on it after the workers started
        # (a notebook's sys.path.append) imports there too
        "paths": driver_paths(),
        # the bound of the waits at a run's end (a peer's end-of-run marker, the error report)
        "heartbeat_timeout": cluster.heartbeat_timeout,
    }
    for w in range(cluster.workers):
        buffers: list[Any] = []
        names = [n for n in graph.layers if where[n] == w]
        hosted = [n for n, p in where.items() if p == w]
        # the run's start on the worker's clock, from which it stamps its events, so that they
        # are on the driver's clock (the worker's stamp of the share's arrival counted the
        # share's whole way there as clock offset: receives came milliseconds before their sends)
        t0 = None if recorder is None else recorder.t0 + await _worker_clock(cluster, w, hosted)
        cmd = {
            **common,
            "t0": t0,
            **encode_state(state, buffers, names),
            "minibatches": state.minibatches,
            "keys": state.keys,
        }
        await _send_share(cluster, w, hosted, cmd, buffers)


#: the clock queries a traced run sends a worker of another host; the one with the shortest
#: round trip gives the estimate
CLOCK_EXCHANGES = 8


async def _worker_clock(cluster: Cluster, w: int, hosted: list[str]) -> float:
    """How far worker ``w``'s ``time.perf_counter()`` reads ahead of this process's.

    Every process of one host reads the same clock (CLOCK_MONOTONIC on Linux, which the
    shared-memory links rely on too): for a :class:`LocalCluster`'s workers, and a worker that
    answers with this host's boot id, 0 exactly. A worker elsewhere is asked its clock a few
    times (Cristian's method): its reading less the midpoint of the exchange with the shortest
    round trip, off by at most half that round trip.

    Raises:
        WorkerError: the worker died, hung (no answer within the cluster's
            ``heartbeat_timeout``), or answered something else.
    """
    if isinstance(cluster, LocalCluster):
        return 0.0
    conn = cluster.connections[w]
    here = _shm.boot_id()
    best = (float("inf"), 0.0)  # (round trip, offset)
    try:
        for _ in range(CLOCK_EXCHANGES):
            # (each query bounded alone: a slow link's few round trips may add up past it)
            with anyio.fail_after(cluster.heartbeat_timeout):
                sent = time.perf_counter()
                await conn.send({"t": "clock"})
                header, _ = await conn.receive()
                back = time.perf_counter()
            if header.get("t") != "clock" or not isinstance(header.get("now"), float):
                raise WorkerError(
                    w, hosted,
                    f"{cluster.describe_worker(w, hosted)} answered {header!r:.100} to the "
                    "driver's clock query instead of its clock's reading: run the same asyncnn "
                    "version on the driver and every worker",
                )  # fmt: skip
            if here and header.get("boot") == here:
                return 0.0  # this host's: the same clock
            best = min(best, (back - sent, header["now"] - (sent + back) / 2))
    except TimeoutError:
        raise WorkerError(
            w, hosted,
            f"{cluster.describe_worker(w, hosted)} did not answer the driver's clock query "
            f"within {cluster.heartbeat_timeout:g} s (hung, or stopped)",
        ) from None  # fmt: skip
    except (EOFError, ConnectionError) as exc:
        raise await _died(cluster, w, hosted, exc, unheard=True) from exc
    return best[1]


async def _send_share(
    cluster: Cluster, w: int, hosted: list[str], cmd: dict[str, Any], buffers: list[Any]
) -> None:
    """Sends worker ``w`` its share of the run. Nobody reads the worker yet (its heartbeats
    start with the run), so the send watches it: a worker that takes none of the share for
    ``heartbeat_timeout`` (stopped, hung) or goes away fails the run, named."""
    conn = cluster.connections[w]
    stalled = False
    lost: BaseException | None = None

    async def watch() -> None:
        nonlocal stalled
        seen = -1
        # (bytes sent, and the pulse of a long step such as making a large slab)
        while conn.sent_progress() != seen:
            seen = conn.sent_progress()
            await anyio.sleep(cluster.heartbeat_timeout)
        stalled = True
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        try:
            await conn.send(cmd, buffers)
        except (EOFError, ConnectionError) as exc:
            lost = exc
        tg.cancel_scope.cancel()
    if lost is not None:
        raise await _died(cluster, w, hosted, lost, unheard=True) from lost
    if stalled:
        raise WorkerError(
            w, hosted,
            f"{cluster.describe_worker(w, hosted)} took none of its share of the run for "
            f"{cluster.heartbeat_timeout:g} s (hung, or stopped)",
        )  # fmt: skip


def _merge(path: str, parts: list[Any]) -> None:
    """Merges the workers' ``parts`` of the trace (bytes) into the driver's at ``path``.

    Raises:
        TraceWriteError: the disk refused a part's temporary file or the merged trace; ``path``
            holds the driver's events as it did.
    """
    files = []
    advice = (
        "the workers' events were not merged into it, which holds the driver's events as they "
        f"were: free space in the temporary folder ({tempfile.gettempdir()}), or set TMPDIR to "
        "another"
    )
    try:
        with refused_as_trace(path, advice):
            for raw in parts:
                fd, name = tempfile.mkstemp(suffix=".trace")
                files.append(name)  # (removed below, written or not)
                with os.fdopen(fd, "wb") as f:
                    f.write(np.asarray(raw).tobytes())
        merge_traces(path, files)
    finally:
        for name in files:
            os.unlink(name)


def _nccl_ids(count: int) -> list[Any]:
    if not count:
        return []
    try:
        return unique_ids(count)
    except ImportError as exc:
        raise RuntimeError(
            "the cluster was made with nccl=True, but this (the driver) process cannot load "
            f"cupy's NCCL bindings ({exc}); install cupy with NCCL, or use nccl=False (GPU "
            "tensors then travel through the host)"
        ) from exc
