"""The life of a run, shared by a run in one process, a cluster's driver and its workers: the
trace recorder opened and closed, the actors served and stopped, the stall watchdog, the device
pool sized for the CPU actors, and the one error a failed run reports."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio

from asyncnn._errors import ActorError, StallError
from asyncnn.backends import DevicePool, open_device_pool

from ._config import RunConfig
from ._messages import STOP, Message
from ._recorder import Recorder

if TYPE_CHECKING:
    from ._graph import Graph
    from ._policies import Policy
    from ._run import Run, RunState

__all__ = [
    "close_channels",
    "close_recorder",
    "host_cores",
    "cpu_layers",
    "error_leaves",
    "finish_run",
    "maybe_pool",
    "open_recorder",
    "record_error",
    "serve_actors",
    "single_error",
    "start_cancellable",
    "start_watchdog",
]


async def _stop_all(run: Run) -> None:
    for name, actor in run.actors.items():
        await actor.send_channel.send(Message(STOP, -1, 0, "", name, 0))


def serve_actors(tg: Any, run: Run) -> None:
    """Starts each of the run's local actors as a task of ``tg``."""
    for name, actor in run.local.items():
        tg.start_soon(actor.serve, name=f"actor {name}")


async def finish_run(run: Run) -> None:
    """The end of a run that went well: drains it, waits for the local actors' GPU work (done
    before anyone reads it), and tells every actor to stop."""
    await run.drain()
    for actor in run.local.values():
        await actor.wait_for_device()
    await _stop_all(run)


def cpu_layers(graph: Graph, hosted: Collection[str] | None = None) -> list[str]:
    """The layers of ``graph`` on the CPU (only those in ``hosted``, where given)."""
    return [
        n
        for n in graph.layers
        if graph.nodes[n].device == "cpu" and (hosted is None or n in hosted)
    ]


def open_recorder(
    config: RunConfig,
    graph: Graph,
    optimizer: Any,
    policy: Policy,
    state: RunState,
    **header: Any,
) -> Recorder | None:
    """The recorder of a run's trace (None without one), its header and initial state written;
    ``header`` adds fields to the header."""
    trace = config.trace
    if trace is None:
        return None
    defined_in_main = graph.main_classes()
    if defined_in_main:
        warnings.warn(
            f"the trace {trace} names {defined_in_main}, defined in __main__ (this script or "
            "notebook): asyncnn.replay can rebuild the graph only where __main__ defines them "
            "again; define them in a module to replay anywhere",
            stacklevel=3,
        )
    head = {**_trace_header(config, graph, optimizer, policy, state), **header}
    recorder = Recorder(trace, head, config.trace_payloads)
    recorder.state(state.params, state.opt_states, state.versions, state.pending_grads)
    return recorder


def record_error(recorder: Recorder | None, error: BaseException) -> None:
    """Writes the error a run ends with into its trace (where, what, which key)."""
    if recorder is None:
        return
    key = getattr(error, "key", None)
    recorder.event(
        getattr(error, "actor", "scheduler"), "error", getattr(error, "kind", "") or "",
        -1 if key is None else key, meta={"error": str(error)},
    )  # fmt: skip


def close_recorder(recorder: Recorder | None, failed: bool) -> None:
    """Closes a run's trace; a trace that failed to write must not hide the run's own error."""
    if recorder is None:
        return
    try:
        recorder.close()
    except Exception:
        if not failed:
            raise


def close_channels(run: Run) -> None:
    """Closes the inboxes of the run's local actors."""
    for actor in run.local.values():
        actor.send_channel.close()
        actor.inbox.close()


def start_cancellable(tg: Any, fn: Callable[[], Awaitable[Any]]) -> anyio.CancelScope:
    """Starts ``fn()`` in ``tg``; cancel the returned scope to stop it."""
    scope = anyio.CancelScope()

    async def guard() -> None:
        with scope:
            await fn()

    tg.start_soon(guard)
    return scope


def start_watchdog(tg: Any, run: Run) -> anyio.CancelScope:
    """Starts the run's stall watchdog in ``tg``; cancel the returned scope to stop it. The
    thread that watches the loop itself starts now, before any actor can block the loop."""
    run._watch_loop()
    return start_cancellable(tg, run._watchdog)


def _trace_header(
    config: RunConfig, graph: Graph, optimizer: Any, policy: Policy, state: RunState
) -> dict[str, Any]:
    return {
        "created": time.time(),
        "graph": graph.to_spec(),
        "policy": policy.to_spec(),
        "optimizer": optimizer.to_spec(),
        "seed": config.seed,
        "dtype": config.dtype,
        "config": config.to_spec(),
        "start": {"minibatches": state.minibatches, "keys": state.keys},
        "devices": sorted({graph.nodes[n].device for n in graph.layers}),
    }


def error_leaves(group: BaseException) -> list[BaseException]:
    """The errors inside a (nested) exception group, in order."""
    if not isinstance(group, BaseExceptionGroup):
        return [group]
    return [leaf for sub in group.exceptions for leaf in error_leaves(sub)]


def single_error(group: BaseException) -> BaseException:
    """The one error a failed run reports: an actor's failure or a stall, before anything else
    (a plain exception is its own)."""
    leaves = error_leaves(group)
    for kind in (ActorError, StallError):
        for e in leaves:
            if isinstance(e, kind):
                return e
    for e in leaves:
        if not isinstance(e, anyio.get_cancelled_exc_class()):
            return e
    return leaves[0]


@asynccontextmanager
async def maybe_pool(
    pool: DevicePool | None, cores: int | None = None
) -> AsyncIterator[DevicePool]:
    """``pool``, or a fresh one with a worker per core of ``cores`` (default: this host's)."""
    if pool is not None:
        yield pool
        return
    cores = cores or host_cores()
    # One shared team, every core a worker with one BLAS thread. An actor's large products,
    # elementwise passes and optimizer updates are cut over the free workers, so whichever
    # actor computes gets the cores (under Sync, GPipe, OneFOneB) and actors computing at once
    # share them (OpenBLAS runs one multi-threaded call at a time: fixed shares never overlap).
    # One actor alone gains too: its elementwise work and updates use every core
    # (docs/benchmarks.md, "CPU: one shared compute team").
    # Parts of at least 16 MFLOP: with several actors computing, every worker is often busy and
    # smaller parts only add hand-offs (on 2 cores, the main job's 25-row keys ran 7% slower cut
    # at 4 MFLOP than whole, and as fast at 16); the 16-core runs' products are far larger.
    async with open_device_pool(
        cpu_workers=cores, blas_threads=1, part_flops=RUN_PART_FLOPS
    ) as fresh:
        yield fresh


#: the fewest flops in a part of a product cut over a run's pool
RUN_PART_FLOPS = 16_000_000


def host_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
