"""The life of a run, shared by a run in one process, a cluster's driver and its workers: the
trace recorder opened and closed, the actors served and stopped, the stall watchdog, the device
pool sized for the CPU actors, the one error a failed run reports, and the trio loop a
synchronous call (``Trainer.fit``, ``replay``) runs it on.

Each process hosts a share of the run's actors. :func:`hosting` is the one sequence every process
goes through (serve the actors beside the process's own tasks, watch for stalls, end the run,
pick the one error, close the inboxes); a :class:`Share` says what differs between the local
run, the driver and a worker, in a handful of hooks. :func:`recording` closes the trace around it.
"""

from __future__ import annotations

import contextvars
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from asyncnn._errors import ActorError, StallError
from asyncnn.backends import (
    DEFAULT_INLINE_FLOPS,
    MAX_POOL_WORKERS,
    DevicePool,
    open_device_pool,
)
from asyncnn.backends._blas import _BLAS_LIMITS

from ._config import RunConfig
from ._messages import STOP, Message
from ._recorder import Recorder
from ._stall import LoopBlockedError

if TYPE_CHECKING:
    from ._graph import Graph
    from ._policies import Policy
    from ._run import Run, RunState

__all__ = [
    "Share",
    "close_channels",
    "close_recorder",
    "host_cores",
    "hosting",
    "internal_trace",
    "cpu_layers",
    "error_leaves",
    "finish_run",
    "maybe_pool",
    "one_process_workers",
    "open_recorder",
    "pool_spec",
    "record_error",
    "recording",
    "run_trio",
    "serve_actors",
    "single_error",
    "start_cancellable",
    "start_trace_watch",
    "start_watchdog",
]


T = TypeVar("T")


def run_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``fn(*args)`` on a new trio loop, a Ctrl-C raised at a checkpoint of its main task.

    By default trio raises ``KeyboardInterrupt`` in whatever code runs when the signal comes,
    anyio's cancel scopes included (a cluster driver enters one per message it reads): landing
    inside one's exit, it leaves the scope open and trio fails with "Cancel scope stack
    corrupted" instead of stopping the call. At a checkpoint of the main task (which a blocked
    main task is woken for) it stops the call as any error there does."""
    return anyio.run(
        fn, *args, backend="trio",
        backend_options={"restrict_keyboard_interrupt_to_checkpoints": True},
    )  # fmt: skip


async def _stop_all(run: Run) -> None:
    for name, actor in run.actors.items():
        await actor.send_channel.send(Message(STOP, -1, 0, "", name, 0))


def serve_actors(tg: Any, run: Run) -> anyio.Event:
    """Starts each of the run's local actors as a task of ``tg``; the event is set once every
    one of them has stopped."""
    stopped = anyio.Event()
    serving = set(run.local)

    async def serve(name: str, actor: Any) -> None:
        try:
            await actor.serve()
        finally:
            # its idle time ends here, not when its statistics are read after the run
            run._stopped_at[name] = time.perf_counter()
        serving.discard(name)
        if not serving:
            stopped.set()

    if not serving:
        stopped.set()
    for name, actor in run.local.items():
        tg.start_soon(serve, name, actor, name=f"actor {name}")
    return stopped


async def finish_run(run: Run) -> None:
    """The end of a run that went well: drains it, waits for the local actors' GPU work (done
    before anyone reads it), and tells every actor to stop."""
    await run.drain()
    await run.wait_for_devices()
    await _stop_all(run)


def cpu_layers(graph: Graph, hosted: Collection[str] | None = None) -> list[str]:
    """The layers of ``graph`` on the CPU (only those in ``hosted``, where given)."""
    return [
        n
        for n in graph.layers
        if graph.nodes[n].device == "cpu" and (hosted is None or n in hosted)
    ]


#: the trace a run in this context writes for asyncnn's own use (a replay's temporary trace, which
#: it reads back and deletes): a warning about what the trace can do later is not the user's
_INTERNAL_TRACE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "asyncnn_internal_trace", default=None
)


@contextmanager
def internal_trace(path: str) -> Iterator[None]:
    """Marks the trace at ``path``, which a run opened inside this block writes, as asyncnn's
    own (:func:`open_recorder` then warns nothing about it): for ``replay``'s temporary trace.
    A context variable: a run of another task or thread is not marked."""
    token = _INTERNAL_TRACE.set(path)
    try:
        yield
    finally:
        _INTERNAL_TRACE.reset(token)


#: the top-level packages whose frames stand between a user's call and a run's code: asyncnn,
#: and the machinery an ``async with open_run`` or a ``Trainer.fit`` goes through
_MACHINERY = frozenset({"asyncnn", "contextlib", "anyio", "trio", "asyncio", "outcome", "sniffio"})


def _user_stacklevel() -> int:
    """The ``stacklevel`` at which a warning raised by this function's caller names the user's
    line: the first frame outside :data:`_MACHINERY` (the ``async with open_run`` or the
    ``fit`` call), rather than contextlib's ``__aenter__``; 2 (the caller's caller) where
    every frame is (a run on a thread of its own)."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).partition(".")[0] not in _MACHINERY:
            return level
        frame, level = frame.f_back, level + 1
    return 2


def open_recorder(
    config: RunConfig,
    graph: Graph,
    optimizer: Any,
    policy: Policy,
    state: RunState,
    **header: Any,
) -> Recorder | None:
    """The recorder of a run's trace (None without one), its header and initial state queued;
    ``header`` adds fields to the header. The header is written once the run completes it with
    its device pool (:func:`pool_spec`, in :class:`~asyncnn._runtime._run.Run`), which opens
    after the trace: a trace path that cannot be written fails before a pool starts. A trace
    naming classes defined in ``__main__`` warns (at the user's line) that only a ``__main__``
    that defines them again can replay it, unless it is asyncnn's own (:func:`internal_trace`)."""
    trace = config.trace
    if trace is None:
        return None
    defined_in_main = graph.main_classes()
    if defined_in_main and _INTERNAL_TRACE.get() != trace:
        warnings.warn(
            f"the trace {trace} names {defined_in_main}, defined in __main__ (this script or "
            "notebook): asyncnn.replay can rebuild the graph only where __main__ defines them "
            "again; define them in a module to replay anywhere",
            stacklevel=_user_stacklevel(),
        )
    head = {**_trace_header(config, graph, optimizer, policy, state), **header}
    recorder = Recorder(trace, head, config.trace_payloads, defer_header=True)
    try:
        recorder.state(
            state.params, state.opt_states, state.versions, state.pending_grads,
            state.actor_states, state.earlier_params, state.pending_delays,
        )  # fmt: skip
    except BaseException:
        close_recorder(recorder, failed=True)
        raise
    return recorder


def record_error(recorder: Recorder | None, error: BaseException) -> None:
    """Writes the error a run ends with into its trace (where, what, which key). An error of
    no actor (a callback's, a stall, Ctrl-C inside the run) is said as
    :func:`record_interruption` says it: that the run stopped outside its actors, and on what."""
    if recorder is None:
        return
    if not hasattr(error, "actor"):
        # (its bare text, "callback boom", said neither that no actor failed nor its type)
        record_interruption(recorder, error)
        return
    key = getattr(error, "key", None)
    recorder.event(
        getattr(error, "actor", "scheduler"), "error", getattr(error, "kind", "") or "",
        -1 if key is None else key, meta={"error": str(error) or type(error).__name__},
    )  # fmt: skip


def record_interruption(recorder: Recorder | None, exc: BaseException) -> None:
    """Writes into the trace that the run was cancelled or interrupted (``exc``: the
    cancellation, ``KeyboardInterrupt``, or another error raised outside the actors)."""
    if recorder is None:
        return
    if _is_cancellation(exc) and not _asyncio_runner_interrupted():
        what = "the run was cancelled from outside (a cancel scope or a timeout around it)"
    elif isinstance(exc, KeyboardInterrupt) or _is_cancellation(exc):
        what = "the run was interrupted (KeyboardInterrupt)"
    else:
        said = str(exc)
        what = f"the run stopped on {type(exc).__name__}" + (f": {said}" if said else "")
    recorder.event("scheduler", "error", "", -1, meta={"error": what})


def _asyncio_runner_interrupted() -> bool:
    """Whether the asyncio runner (``asyncio.run``, ``anyio.run``) of the running loop has taken
    a Ctrl-C: its SIGINT handler, installed for the length of its ``run``, then cancels the main
    task (a run inside sees a cancellation, as from a cancel scope) and counts the interrupt,
    which it raises as ``KeyboardInterrupt`` once the main task has ended."""
    handler = signal.getsignal(signal.SIGINT)
    # (a functools.partial of the runner's bound _on_sigint, the main task bound to it)
    runner = getattr(getattr(handler, "func", None), "__self__", None)
    if not getattr(runner, "_interrupt_count", 0):
        return False
    import asyncio

    try:
        return getattr(runner, "_loop", None) is asyncio.get_running_loop()
    except RuntimeError:  # (no asyncio loop runs here)
        return False


def _is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is the running event loop's cancellation (none outside a loop)."""
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())
    except RuntimeError:  # (no event loop runs here: anyio's NoEventLoopError)
        return False


#: how often a run looks whether its trace's writer has failed (a poll: the writer is a thread)
TRACE_WRITER_POLL = 0.1


def start_trace_watch(tg: Any, recorder: Recorder | None) -> anyio.CancelScope | None:
    """Starts, in ``tg``, a task that fails the run once its trace's writer has failed (a full
    disk), with the error naming the trace (:meth:`Recorder.failure`): the run stops there,
    as on any failure, instead of training on unrecorded to its end. Cancel the returned
    scope to stop it (None without a trace)."""
    if recorder is None:
        return None

    async def watch() -> None:
        while True:
            await anyio.sleep(TRACE_WRITER_POLL)
            failure = recorder.failure()
            if failure is not None:
                raise failure

    return start_cancellable(tg, watch)


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


class Share:
    """What one process does in a run beside serving its actors. This base class is a run in one
    process; a cluster's driver and its workers override the hooks where they differ (their
    readers of other processes, heartbeats, end-of-run markers, and how a failure is named).
    """

    #: this process watches the run for stalls (a worker does not: the driver sees its stalls
    #: through heartbeats)
    watches: bool = True
    #: this process writes the run's error into its trace (a worker does not: the driver's
    #: trace has it)
    records_error: bool = True

    async def begin(self, run: Run) -> None:
        """Prepares the run before any actor serves (a driver sends the workers their shares;
        a cluster process opens its links to other processes' GPUs). A failure here is raised
        as it is, the inboxes closed and :meth:`close` called."""

    def start(self, tg: Any, run: Run) -> None:
        """Starts the tasks that run beside the actors in ``tg`` (readers of other processes,
        heartbeats)."""

    async def end(self, run: Run) -> None:
        """Ends a run that went well, once the caller's block is done: by default drains it and
        tells every actor to stop."""
        await finish_run(run)

    async def actors_stopped(self, run: Run) -> None:
        """Runs once the run has ended here and this process's actors have stopped, their
        device work done (a cluster process tells its peers that nothing more will come from
        it)."""

    async def settle(self, run: Run) -> None:
        """Waits, after the actors stopped, for what must arrive before the run is over (the
        driver: every worker's result)."""

    async def failure(self, group: BaseExceptionGroup[Any]) -> BaseException:
        """The one error a failed run reports, out of what its tasks raised. It runs with
        Ctrl-C held back (:class:`_HeldCtrlC`), so it must end soon (the driver waits at most a
        few seconds for its workers' events)."""
        return single_error(group)

    async def interrupted(self, run: Run) -> None:
        """Runs when the run is cancelled from outside or interrupted (Ctrl-C), before its
        inboxes close (the driver collects its workers' events for the trace); whatever it
        awaits must shield itself from the cancellation. It runs with Ctrl-C held back
        (:class:`_HeldCtrlC`), so it must end soon."""

    def close(self, run: Run) -> None:
        """Releases what this process opened for the run (its links to other processes' GPUs),
        whether it went well or not."""

    def trace_closing(self, failed: bool) -> None:
        """Runs just before the trace closes (whatever the run's fate)."""

    def trace_closed(self, failed: bool) -> None:
        """Runs just after the trace closed (whatever the run's fate)."""


@asynccontextmanager
async def hosting(run: Run, share: Share) -> AsyncIterator[None]:
    """Prepares the run (:meth:`Share.begin`), serves its local actors (and ``share``'s own
    tasks) for the length of the block,
    then ends the run; a failure of the run's own tasks becomes one error (:func:`single_error`),
    written to the trace and raised with the original failure as its cause. What the block itself
    raised comes out as it was raised (an ``ExceptionGroup`` of the user's stays that group),
    unless an actor, the loop or the watchdog failed too. The inboxes are closed whatever happens.

    The sequence is the same in every process; ``share`` says what differs.
    """
    body_error: BaseException | None = None
    users: BaseException | None = None
    held: _HeldCtrlC | None = None
    try:
        await share.begin(run)
        async with anyio.create_task_group() as tg:
            stopped = serve_actors(tg, run)
            share.start(tg, run)
            watchdog = start_watchdog(tg, run) if share.watches else None
            trace_watch = start_trace_watch(tg, run.recorder)
            try:
                yield
            except BaseException as exc:
                body_error = exc
                raise
            # the block's end drains the run, then stops its actors: a step called from
            # another task meanwhile would admit keys that nothing computes
            run._closing = True
            await share.end(run)
            await stopped.wait()
            await run.wait_for_devices()
            await share.actors_stopped(run)
            await share.settle(run)
            if watchdog is not None:
                watchdog.cancel()
            if trace_watch is not None:
                trace_watch.cancel()
    except BaseExceptionGroup as group:
        # Ctrl-C pressed again while the run stops (the driver gathers its workers' events)
        # waits until the error is known and written: landing in the driver's task group, it
        # came out as a BaseExceptionGroup, before the error reached the trace
        held = _HeldCtrlC()
        try:
            error = await share.failure(group)
        except BaseException as exc:
            if not _only_interrupts(exc):
                raise
            # (one that was pending before it was held: the events it cut short stay missing)
            held.pressed = True
            error = single_error(group)
        finally:
            held.restore()
        if body_error is not None and any(error is e for e in error_leaves(body_error)):
            # the runtime's own failures come out as one error, but what the block raised is
            # the user's, whole: their ExceptionGroup (a task group of theirs) stays that group
            error = body_error
            if share.records_error:
                record_error(run.recorder, error)
            users = error  # raised below, once this handler is left: its context its own
        else:
            if share.records_error:
                record_error(run.recorder, error)
            try:
                raise error from error.__cause__  # keeps the original failure as the cause
            finally:
                held.deliver()  # (a held Ctrl-C raised instead, the run's error its context)
    except BaseException as exc:
        # a run cancelled from outside, or Ctrl-C: said in the trace, which would otherwise
        # look like a run that ended cleanly (and a replay of it wait for the work left undone)
        if share.records_error:
            record_interruption(run.recorder, exc)
        held = _HeldCtrlC()
        try:
            await share.interrupted(run)
        except BaseException as again:
            if not _only_interrupts(again):
                raise
            held.pressed = True
        finally:
            held.restore()
        try:
            raise
        finally:
            held.deliver()
    finally:
        run._ended = True  # a step after the block is refused, naming it
        try:
            close_channels(run)
        finally:
            share.close(run)
    if users is not None:
        try:
            raise users
        finally:
            if held is not None:
                held.deliver()


def _only_interrupts(exc: BaseException) -> bool:
    """Whether ``exc`` is ``KeyboardInterrupt``, or a group of nothing else (trio's, where one
    landed in a task group)."""
    return all(isinstance(e, KeyboardInterrupt) for e in error_leaves(exc))


class _HeldCtrlC:
    """Ctrl-C held back from now until :meth:`restore`, and handed on by :meth:`deliver`: for
    the few seconds a stopping run needs to know its error and write it, with its workers'
    events, into its trace.

    A ``KeyboardInterrupt`` raised meanwhile would cut that short, wherever it landed: trio
    raises it at the next checkpoint of its main task, KI protection or not (inside a task
    group there, as a ``BaseExceptionGroup``), and asyncio's runner, pressed a second time,
    wherever the main thread is. So, on the main thread and where SIGINT has a Python handler,
    a handler that only counts the presses stands in for it (nothing to do elsewhere: a
    signal's handler runs on the main thread only, and one ignored or left to the system stays
    so).
    """

    def __init__(self) -> None:
        #: a Ctrl-C came (or one already on its way reached the held code)
        self.pressed = False
        self._previous: Any = None
        self._handler = self._note  # (one bound method: compared by identity on restore)
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):  # SIG_IGN, SIG_DFL, or set outside Python (None)
            return
        try:
            signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # (an embedded interpreter whose main thread takes no signals)
            return
        self._previous = previous

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.pressed = True

    def restore(self) -> None:
        """Puts the previous handler back (unless someone replaced this one meanwhile)."""
        if self._previous is not None and signal.getsignal(signal.SIGINT) is self._handler:
            signal.signal(signal.SIGINT, self._previous)

    def deliver(self) -> None:
        """Hands a held Ctrl-C on as it would have come: ``KeyboardInterrupt`` raised here, or
        the previous handler called (asyncio's runner's: it cancels the main task on a first
        Ctrl-C and raises from the second on; a handler of the program's own)."""
        if not self.pressed:
            return
        previous = self._previous
        if (
            previous is None
            or previous is signal.default_int_handler
            # trio's would only mark the interrupt pending, for the main task's next
            # checkpoint: inside a task group again, or never once the run's code has ended
            or str(getattr(previous, "__module__", "")).partition(".")[0] == "trio"
        ):
            raise KeyboardInterrupt
        previous(signal.SIGINT, sys._getframe())


@contextmanager
def recording(recorder: Recorder | None, share: Share | None = None) -> Iterator[None]:
    """Closes the run's trace when the block ends, however it ends (a trace that fails to write
    must not hide the run's own error); ``share``'s hooks run around the closing."""
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if share is not None:
            share.trace_closing(failed)
        close_recorder(recorder, failed)
        if share is not None:
            share.trace_closed(failed)


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
    """The one error a failed run reports: an actor's failure, then a blocked loop, then a
    stall, before anything else (a plain exception is its own)."""
    leaves = error_leaves(group)
    # a blocked loop's own report names the actor; the watchdog, woken once the loop is
    # interrupted, may report the same stall in general terms before it arrives
    for kind in (ActorError, LoopBlockedError, StallError):
        for e in leaves:
            if isinstance(e, kind):
                return e
    for e in leaves:
        if not isinstance(e, anyio.get_cancelled_exc_class()):
            return e
    return leaves[0]


@asynccontextmanager
async def maybe_pool(
    pool: DevicePool | None,
    cores: int | None = None,
    *,
    part_flops: int = 0,
    split: bool | None = None,
    inline_flops: float | None = None,
    plan_workers: int | None = None,
    blas_threads: int | None = None,
    one_at_a_time: bool = False,
) -> AsyncIterator[DevicePool]:
    """``pool``, or a fresh one with a worker per core of ``cores`` (default: this host's),
    that cuts products into parts of at least ``part_flops`` (default :data:`RUN_PART_FLOPS`)
    where ``split`` (default: it does), planned for ``plan_workers`` workers (default: as many
    as it has), and runs work below ``inline_flops`` (default
    :data:`~asyncnn.backends.DEFAULT_INLINE_FLOPS`) on the loop's thread, uncut. A replay
    passes the recorded run's (:func:`pool_spec`), so that its products are cut as the run's
    were, whatever this host's cores (and ``blas_threads``, the BLAS threads of each call,
    where that was not 1); a cluster's processes pass the driver's plan, so that theirs are cut
    as in one process. With ``one_at_a_time`` (the run's policy keeps one key in flight) and
    neither ``cores`` nor ``blas_threads`` given, a host of up to :data:`ONE_WORKER_CORES`
    cores gets one worker with BLAS on every core and products whole instead."""
    if pool is not None:
        yield pool
        return
    if inline_flops is None:
        inline_flops = DEFAULT_INLINE_FLOPS
    if (
        cores is None and blas_threads is None and one_at_a_time
        and one_process_workers() <= ONE_WORKER_CORES
        and _BLAS_LIMITS.held() <= {one_process_workers()}
    ):  # fmt: skip
        # One computing actor at a time on a host of 2 cores: one worker, its products whole on
        # BLAS's own threads. There OpenBLAS's two threads multiply faster than the products
        # cut in two over a team (14.9 against 18.3 ms a step on the CI kind of VM, session
        # 25) and an elementwise pass is cheaper whole than handed to the other core, so Sync
        # ran 1-10% (1 stage) and 6-9% (4 stages) faster a step than on the team
        # (docs/benchmarks.md, session 35); where several actors compute at once the team lets
        # them share the cores instead. Not beside an open team (another run in this process):
        # OpenBLAS keeps one thread count for the process, and the newest pool's would apply to
        # both runs' products.
        cores = one_process_workers()
        async with open_device_pool(
            cpu_workers=1, blas_threads=cores, part_flops=part_flops or RUN_PART_FLOPS,
            split=False, inline_flops=inline_flops,
        ) as fresh:  # fmt: skip
            yield fresh
        return
    cores = cores or one_process_workers()
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
        cpu_workers=cores, blas_threads=blas_threads or 1,
        part_flops=part_flops or RUN_PART_FLOPS, split=split, inline_flops=inline_flops,
        plan_workers=plan_workers,
    ) as fresh:  # fmt: skip
        yield fresh


#: the fewest flops in a part of a product cut over a run's pool
RUN_PART_FLOPS = 16_000_000
#: up to this many cores, a run whose policy computes one key at a time gets one pool worker
#: with BLAS on every core (see maybe_pool)
ONE_WORKER_CORES = 2


def pool_spec(pool: DevicePool) -> dict[str, Any]:
    """What of a run's CPU pool decides how its products are cut into parts (and so the last
    bits of their sums), for the trace's header: ``cpu_workers``, ``inline_flops`` (work
    below it runs on the loop's thread, where nothing is cut), ``part_flops``, ``split``, and
    ``plan_workers`` where the team plans its products for another size than its threads (a
    cluster's driver: the size of one process on its host). A cluster's driver sends it to
    its workers, whose pools then cut as its pool does."""
    spec: dict[str, Any] = {"cpu_workers": pool.workers, "inline_flops": pool.inline_flops}
    team = getattr(pool, "team", None)
    if team is not None:
        spec["split"] = team.splits_work
        spec["part_flops"] = team.part_flops
        # (only where it differs: a trace without it planned for its cpu_workers)
        plan = getattr(team, "plan_workers", pool.workers)
        if plan != pool.workers:
            spec["plan_workers"] = plan
        # (only where it is not 1: products whole on BLAS's own threads round as that many
        # threads do, which a replay must set too)
        threads = getattr(team, "blas_threads", 1)
        if threads not in (1, None):
            spec["blas_threads"] = threads
    return spec


def one_process_workers() -> int:
    """The workers of a run's own pool in one process on this host: one per core it may use,
    at most ``MAX_POOL_WORKERS``. A cluster's processes plan their products for as many, so
    that their cuts are those of one process."""
    return min(host_cores(), MAX_POOL_WORKERS)


def host_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
