"""The device pool: where actors' compute runs without blocking the event loop.

CPU work goes to the long-lived worker threads of a :class:`ComputeTeam` (numpy releases the GIL
inside BLAS and most ufuncs, so workers compute in parallel). With one BLAS thread per call (the
default) the team also splits a task's large products into parts that its free workers run: one
actor alone can then use every core, and several actors share them (see ``_parallel.py``). A
worker hands its result back by scheduling a callback on the event loop (trio's
``run_sync_soon``, asyncio's ``call_soon_threadsafe``; the task and this hand-over are
``_pool_job.py``'s), which never blocks the worker; the awaiting task sleeps on an
:class:`anyio.Event`. A thread per call (``anyio.to_thread.run_sync``) costs about twice this
round trip, so it is not used.

Work whose estimated cost is below ``inline_flops`` runs on the event-loop thread: handing it to a
thread would cost more than doing it.

GPU work is only *launched* from the host: ``fn`` runs on the event-loop thread inside the actor's
CUDA stream, the kernels queue up, an event marks their end, and the host waits for that event only
when it must (:meth:`DevicePool.wait`), polling with back-off so the loop keeps running.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel

from ._base import Device, parse_device
from ._checks import MAX_POOL_WORKERS, check_flag, check_number, check_workers
from ._gil import check_switch_interval
from ._parallel import DEFAULT_PART_FLOPS, ComputeTeam
from ._pool_job import _call_soon_threadsafe, _Job, _notify
from ._registry import get_backend

__all__ = [
    "DEFAULT_INLINE_FLOPS",
    "DevicePool",
    "InlineCounter",
    "PoolStatistics",
    "open_device_pool",
]

T = TypeVar("T")

_get_ident = threading.get_ident

#: Work estimated below this many flops runs inline. A hand-off to a worker costs ~50 µs of
#: latency, which one BLAS thread (~100 GFLOP/s) spends on ~5 MFLOP: below that, inline is faster.
DEFAULT_INLINE_FLOPS = 5_000_000

_pool_ids = itertools.count()

#: seconds a closing pool waits for tasks whose callers were cancelled before leaving their
#: threads behind
ABANDONED_GRACE = 1.0


@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of a :class:`DevicePool`'s state.

    Attributes:
        workers: number of CPU worker threads.
        tasks_inline: CPU tasks run on the event-loop thread (cost below the threshold):
            those of :meth:`DevicePool.run`, and those its callers ran themselves and counted
            through :meth:`DevicePool.inline_counter` (a run's actors do).
        tasks_threaded: CPU tasks finished by worker threads (failed ones included; a
            cancelled caller's task that no worker had started is skipped, not counted).
        tasks_gpu: GPU launches.
        tasks_abandoned: threaded tasks whose caller was cancelled (result discarded or never run).
        busy_seconds: seconds each worker spent running tasks (and parts of split work), one
            entry per worker.
        queue_length: CPU tasks waiting for a free worker (not those of cancelled callers,
            which a worker will skip).
        splits: computations split into parts across the workers (0 when the pool does not
            split work).
        parts_helped: parts of split computations that a worker ran for another caller.
    """

    workers: int
    tasks_inline: int
    tasks_threaded: int
    tasks_gpu: int
    tasks_abandoned: int
    busy_seconds: tuple[float, ...]
    queue_length: int
    splits: int = 0
    parts_helped: int = 0


class InlineCounter:
    """CPU tasks that one thread's caller ran inline itself, never through
    :meth:`DevicePool.run` (an actor's work below :attr:`DevicePool.inline_flops`): each
    ``counter.tasks += 1`` counts in :attr:`PoolStatistics.tasks_inline`. Only the thread that
    asked :meth:`DevicePool.inline_counter` for it may add to it, so that no count is lost
    without a lock."""

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks = 0


class DevicePool:
    """Runs compute for actors on CPU worker threads and CUDA streams.

    Open one with :func:`open_device_pool`; the constructor is private.
    """

    def __init__(
        self,
        cpu_workers: int,
        inline_flops: float,
        name: str,
        blas_threads: int | None = None,
        split: bool = False,
        part_flops: int = DEFAULT_PART_FLOPS,
        switch_interval: float | Literal["auto"] | None = "auto",
        plan_workers: int | None = None,
    ) -> None:
        self._n = cpu_workers
        self._inline_flops = inline_flops
        self._name = name
        self._team = ComputeTeam(
            cpu_workers,
            blas_threads=blas_threads,
            split=split,
            part_flops=part_flops,
            switch_interval=switch_interval,
            name=f"{name}-cpu",
            on_exit=self._on_worker_exit,
            plan_workers=plan_workers,
        )
        self._exited = 0
        self._all_exited: anyio.Event | None = None
        # Counters. Tasks of other threads' event loops may call this pool too, and an
        # unlocked ``+= 1`` from two threads can lose one (free-threaded Python; a tracer):
        # ``_inline`` and ``_gpu`` are written only by the pool's loop thread, without a lock
        # (the common case pays one thread-id comparison), the rest under ``_count_lock``.
        self._count_lock = threading.Lock()
        self._inline = 0
        self._gpu = 0
        self._inline_elsewhere = 0  # by other threads' loops
        # tasks run inline by callers that count them themselves (inline_counter), by thread
        self._inline_counters: dict[int, InlineCounter] = {}
        self._gpu_elsewhere = 0
        self._abandoned = 0
        self._skipped = 0  # abandoned jobs that a worker then skipped
        # Jobs handed to the team that no worker has finished (run or skipped) yet, and those of
        # them whose caller was cancelled: a close waits without bound for the others only.
        self._unfinished = 0
        self._unfinished_abandoned = 0
        self._closer: anyio.Event | None = None  # set when the closing pool should look again
        self._closed = True
        self._call_soon: Callable[[Callable[[], object]], None] | None = None
        self._loop_thread: int | None = None  # the thread of the loop that opened the pool

    # -- lifetime -------------------------------------------------------------------------------

    def _start(self) -> None:
        self._call_soon = _call_soon_threadsafe(anyio.lowlevel.current_token().native_token)
        self._loop_thread = threading.get_ident()
        self._all_exited = anyio.Event()
        self._team.start()
        self._closed = False

    async def _aclose(self) -> None:
        if self._closed:
            return
        self._closed = True  # (before the counts are read: a job's end from now on wakes the close)
        self._team.shutdown()
        assert self._all_exited is not None
        # Shielded: closing after a cancellation must still wait for the threads, or they would
        # outlive the pool. It waits for the tasks already queued or running to finish, without
        # blocking the loop (the workers report their exit, and each job's end, through it). A
        # task whose caller was cancelled may never end (a hung compute that failed the run
        # with a StallError): once only such tasks are left, the wait is bounded, and a thread
        # still in one is left behind (a daemon), so that the run's error is not held up by it.
        # A live caller's task (another loop's) is always waited for: left running, it would
        # compute with BLAS's count released and its caller would wait on a closed pool.
        with anyio.CancelScope(shield=True):
            while not self._all_exited.is_set():
                # made before looking, so that a change reported from now on wakes this wait
                self._closer = closer = anyio.Event()
                with self._count_lock:
                    abandoned_only = 0 < self._unfinished_abandoned == self._unfinished
                if abandoned_only:
                    with anyio.move_on_after(ABANDONED_GRACE):
                        await self._all_exited.wait()
                    break
                await closer.wait()
            self._closer = None
        # joins the threads that have left; restores BLAS's threads
        self._team.close(wait=self._all_exited.is_set())

    def _wake_closer(self) -> None:
        """On the pool's loop: a closing pool looks again at what it waits for."""
        if self._closer is not None:
            self._closer.set()

    def _on_worker_exit(self) -> None:
        call_soon = self._call_soon
        if call_soon is not None:
            _notify(call_soon, self._worker_exited)

    def _worker_exited(self) -> None:
        self._exited += 1
        if self._exited == self._n and self._all_exited is not None:
            self._all_exited.set()
            self._wake_closer()

    def _job_done(self, call_soon: Callable[[Callable[[], object]], None], job: _Job) -> None:
        """After a job, on its worker, once the team counts it: wakes the awaiting task."""
        # One uncontended lock (~0.1 µs) against a hand-off of ~50 µs. A skipped job is counted
        # here, after the team's count of tasks, so that statistics() never takes away a
        # skipped job that the team's count does not hold yet.
        with self._count_lock:
            job.finished = True
            self._unfinished -= 1
            if job.abandoned:
                self._unfinished_abandoned -= 1
            if job.skipped:
                self._skipped += 1
            closing = self._closed
        if closing:
            _notify(self._pool_call_soon(), self._wake_closer)
        if not job.skipped:  # (nobody waits for a skipped one)
            _notify(call_soon, job.done.set)

    def _pool_call_soon(self) -> Callable[[Callable[[], object]], None]:
        call_soon = self._call_soon
        assert call_soon is not None
        return call_soon

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this device pool is closed: use it inside its 'async with open_device_pool()'"
            )

    def _caller_call_soon(self) -> Callable[[Callable[[], object]], None]:
        """'Run this on the loop thread' for the loop that awaits: the pool's own, or another
        thread's loop that shares it (a worker must wake the loop its caller sleeps in: waking
        the pool's loop instead would set the caller's event from a foreign thread)."""
        call_soon = self._pool_call_soon()
        if threading.get_ident() == self._loop_thread:  # the common case: one comparison
            return call_soon
        return _call_soon_threadsafe(anyio.lowlevel.current_token().native_token)

    # -- running work ---------------------------------------------------------------------------

    async def run(
        self,
        device: str | Device,
        fn: Callable[..., T],
        *args: Any,
        cost: float | None = None,
        stream: Any = None,
        after: Sequence[Any] = (),
    ) -> T:
        """Runs ``fn(*args)`` for ``device`` and returns its result.

        On the CPU, ``fn`` runs on a worker thread, or inline on the event-loop thread when
        ``cost`` (an estimate in flops) is below the pool's ``inline_flops``; ``cost=None`` means
        unknown, and goes to a worker. On a CUDA device, ``fn`` is launched on ``stream`` (see
        :meth:`enqueue`) and its result returned without waiting for the kernels to finish.

        ``after``: events of the work that produced what ``fn`` reads (a GPU actor's
        messages; ``None`` entries are skipped). On the CPU, ``fn`` starts once each is done
        (:meth:`wait`, without blocking the loop); on a CUDA device, ``stream`` waits for them.

        On a worker, ``fn`` runs in a copy of the caller's :mod:`contextvars` context (inline,
        in that context itself): numpy's error state (``np.errstate``) applies either way.

        Pass keyword arguments to ``fn`` with :func:`functools.partial`. Tasks of another
        thread's event loop may call this too (the worker wakes the caller's own loop).

        Raises:
            Exception: whatever ``fn`` raised, with its traceback.
            RuntimeError: when the pool is closed.
        """
        dev = parse_device(device)
        if dev.kind != "cpu":
            result, _ = await self.enqueue(dev, fn, *args, stream=stream, after=after)
            return result
        self._check_open()
        if after:
            # The data may still be in flight on a device's stream: a CPU task has no stream
            # to queue the wait on, so the host waits (an actor does the same before it asks).
            for event in after:
                if event is not None and not event.done:
                    await self.wait(event)
            self._check_open()  # (it may have closed meanwhile, from another thread's loop)
        small = False
        if cost is not None:
            try:
                small = cost < self._inline_flops
            except TypeError:
                raise TypeError(_bad_cost(cost)) from None
            if cost != cost:  # NaN
                raise ValueError(_bad_cost(cost))
        if small:
            await anyio.lowlevel.checkpoint()
            if _get_ident() == self._loop_thread:
                self._inline += 1
            else:
                with self._count_lock:
                    self._inline_elsewhere += 1
            return fn(*args)
        job = _Job(fn, args)
        call_soon = self._caller_call_soon()
        with self._count_lock:  # (uncontended: ~0.1 µs, against a hand-off of ~50 µs)
            self._unfinished += 1
        try:
            self._team.submit(job, functools.partial(self._job_done, call_soon, job))
        except BaseException:  # (the pool closed meanwhile, from another thread's loop)
            with self._count_lock:
                self._unfinished -= 1
            raise
        try:
            await job.done.wait()
        except BaseException:
            # Cancelled: the worker finishes (or skips) the job and its result is dropped.
            with self._count_lock:
                job.abandoned = True
                self._abandoned += 1
                if not job.finished:
                    self._unfinished_abandoned += 1
                closing = self._closed
            if closing:  # the close may now wait for this job no longer than the grace
                _notify(self._pool_call_soon(), self._wake_closer)
            raise
        error = job.error
        if error is not None:
            job.error = None  # the job must not keep the traceback's frames alive
            try:
                raise error
            finally:
                del error
        return job.result

    async def enqueue(
        self,
        device: str | Device,
        fn: Callable[..., T],
        *args: Any,
        stream: Any = None,
        after: Sequence[Any] = (),
    ) -> tuple[T, Any]:
        """Launches ``fn(*args)`` on ``stream`` of ``device``; returns ``(result, event)``.

        On a CUDA device ``fn`` runs on the event-loop thread inside ``stream`` (the current
        stream when None): its kernels are queued, not finished, when this returns. ``stream``
        first waits for each event in ``after`` (the events of the messages ``fn`` reads). The
        returned event marks the end of ``fn``'s work: pass it on with the result, and
        :meth:`wait` for it only where the host needs the data. On the CPU this is
        :meth:`run` on a worker, after the events in ``after`` are done (the CPU has no
        streams: ``stream`` is not used), and the event is ``None`` (the work is done).
        """
        backend = get_backend(device)
        if backend.device.kind == "cpu":
            return await self.run(backend.device, fn, *args, after=after), None
        self._check_open()
        # a cancellation point, not a yield: queuing kernels is quick, and the actors' channel
        # operations yield anyway
        await anyio.lowlevel.checkpoint_if_cancelled()
        launched = backend.launch(fn, args, stream, after)
        if _get_ident() == self._loop_thread:
            self._gpu += 1
        else:
            with self._count_lock:
                self._gpu_elsewhere += 1
        return launched

    async def wait(
        self, event: Any, *, device: str | Device | None = None, max_interval: float = 1e-3
    ) -> None:
        """Returns once the work before ``event`` has finished, without blocking the loop.

        With the event's ``device`` named, its backend wakes the loop when the event completes
        (a CUDA host function); otherwise, or where the backend cannot, this polls
        ``event.done``, sleeping 10 µs, then twice as long each time, up to ``max_interval``
        seconds (the loop's sleeps last whole milliseconds at least). ``None`` (CPU work) is
        finished already.
        """
        if event is None:
            await anyio.lowlevel.checkpoint()
            return
        if device is not None and not event.done and self._call_soon is not None:
            woken = anyio.Event()
            call_soon = self._caller_call_soon()
            if get_backend(device).notify(event, lambda: _notify(call_soon, woken.set)):
                await woken.wait()
        interval = 1e-5
        while not event.done:
            await anyio.sleep(interval)
            interval = min(2 * interval, max_interval)
        await anyio.lowlevel.checkpoint()

    def inline_counter(self) -> InlineCounter:
        """The counter of the calling thread's own inline work, for :meth:`statistics`.

        A caller that runs its small CPU work itself, where :meth:`run` would run it inline
        (``cost`` below :attr:`inline_flops`), skipping the call, adds one to the counter's
        ``tasks`` for each such task, so that :attr:`PoolStatistics.tasks_inline` counts it:
        one attribute increment per task, no lock. The counter is the calling thread's (one
        per thread, made on the first call): add to it from that thread only.
        """
        thread = _get_ident()
        with self._count_lock:
            counter = self._inline_counters.get(thread)
            if counter is None:
                counter = self._inline_counters[thread] = InlineCounter()
        return counter

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's counters."""
        with self._count_lock:
            inline = self._inline + self._inline_elsewhere
            inline += sum(counter.tasks for counter in self._inline_counters.values())
            gpu = self._gpu + self._gpu_elsewhere
            abandoned = self._abandoned
            skipped = self._skipped
        team = self._team.statistics()  # after: it holds every skipped job counted above
        # a cancelled caller's queued job is skipped, not waited for
        queued = sum(1 for t in self._team._queued() if not (type(t) is _Job and t.abandoned))
        return PoolStatistics(
            workers=self._n,
            tasks_inline=inline,
            tasks_threaded=team.tasks - skipped,
            tasks_gpu=gpu,
            tasks_abandoned=abandoned,
            busy_seconds=team.busy_seconds,
            queue_length=queued,
            splits=team.splits,
            parts_helped=team.parts_helped,
        )

    @property
    def inline_flops(self) -> float:
        """CPU work estimated below this many flops runs on the event-loop thread."""
        return self._inline_flops

    @property
    def workers(self) -> int:
        """Number of CPU worker threads."""
        return self._n

    @property
    def is_open(self) -> bool:
        """Whether the pool takes work: inside its ``async with open_device_pool()`` block."""
        return not self._closed

    @property
    def team(self) -> ComputeTeam:
        """The CPU worker threads: the :class:`ComputeTeam` that runs this pool's CPU tasks (and,
        when the pool splits work, the parts of their large products)."""
        return self._team

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<DevicePool {self._name} {state}, {self._n} CPU workers>"


def _default_workers() -> int:
    """One worker per core this process may use (no more than :data:`MAX_POOL_WORKERS`)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return min(cores, MAX_POOL_WORKERS)


@asynccontextmanager
async def open_device_pool(
    cpu_workers: int | None = None,
    blas_threads: int | None = 1,
    inline_flops: float = DEFAULT_INLINE_FLOPS,
    split: bool | None = None,
    part_flops: int = DEFAULT_PART_FLOPS,
    switch_interval: float | Literal["auto"] | None = "auto",
    plan_workers: int | None = None,
) -> AsyncIterator[DevicePool]:
    """Opens a :class:`DevicePool`; its worker threads stop when the block exits.

    Works under trio and asyncio (through anyio). Leaving the block waits for the tasks already
    queued or running on workers to finish (a thread cannot be interrupted), even when leaving
    because of a cancellation, with one exception: a task whose caller was cancelled (a hung
    compute that failed a run with a ``StallError``, say) is waited for at most one second
    once only such tasks are left. A worker still in one is then left to finish it on its own,
    as a daemon thread, and BLAS's thread count and the switch interval are given back at
    once: until it ends, it computes beside whatever runs next. (They are not held until it
    ends: a task that never ends would keep them for the rest of the process.)

    Args:
        cpu_workers: CPU worker threads, at most :data:`MAX_POOL_WORKERS` (4096); default:
            one per core this process may use.
        blas_threads: BLAS threads per call while the pool is open (threadpoolctl), so that
            workers computing side by side don't oversubscribe the cores; ``None`` leaves BLAS as
            it is. numpy's OpenBLAS (and MKL) take this limit process-wide, not per thread, so it
            is set once when the pool opens, and the count from before returns once the last
            pool (or :class:`ComputeTeam`) open at the same time closes.
        inline_flops: CPU work whose ``cost`` is below this runs on the event-loop thread.
        split: whether a task's large products (:func:`asyncnn.backends.matmul`) are cut into
            parts that free workers run side by side (see :class:`ComputeTeam`); default: when
            ``blas_threads`` is 1. With one worker per core and ``blas_threads=1`` one task alone
            can use every core, and several tasks share them.
        part_flops: the fewest flops a part of a split product does on average (smaller
            products stay whole; see :class:`ComputeTeam`).
        switch_interval: the interpreter's switch interval while the pool is open (seconds,
            from 1e-6 to 1), so that a worker back from BLAS gets the GIL soon from a thread
            running Python (process-wide; the interval from before returns when the last pool
            or team closes; ``None`` leaves it as it is; ``"auto"``: 5e-5 s with 8 workers or
            more, else as it is; see :class:`ComputeTeam`).
        plan_workers: the team size large products are planned for, whatever ``cpu_workers``
            (parts beyond the workers run one after another): their cuts, and so the last bits
            of their sums, are those of a pool of ``plan_workers`` workers. A cluster's worker
            processes plan as one process of the host's cores would; default: ``cpu_workers``.

    Example::

        async with open_device_pool() as pool:
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            y = await pool.run("cpu", np.matmul, a, b, cost=flops)
    """
    check_workers("cpu_workers", cpu_workers, none_ok=True)
    check_workers("plan_workers", plan_workers, none_ok=True)
    n = _default_workers() if cpu_workers is None else int(cpu_workers)
    check_number("blas_threads", blas_threads, integer=True, least=1, none_ok=True)
    check_number("inline_flops", inline_flops, integer=False, least=-math.inf)
    check_number("part_flops", part_flops, integer=False, least=1, finite=True)
    check_flag("split", split, none_ok=True)
    check_switch_interval(switch_interval)
    pool = DevicePool(
        n,
        inline_flops,
        name=f"asyncnn-pool{next(_pool_ids)}",
        blas_threads=blas_threads,
        split=blas_threads == 1 if split is None else bool(split),
        part_flops=part_flops,
        switch_interval=switch_interval,
        plan_workers=None if plan_workers is None else int(plan_workers),
    )
    pool._start()
    try:
        yield pool
    finally:
        await pool._aclose()


def _bad_cost(cost: object) -> str:
    return f"DevicePool.run: cost must be a number of flops (or None: unknown), got {cost!r:.40}"
