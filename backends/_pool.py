"""The device pool: where actors' compute runs without blocking the event loop.

CPU work goes to a few long-lived worker threads fed by one queue (numpy releases the GIL inside
BLAS and most ufuncs, so workers compute in parallel). A worker hands its result back by scheduling
a callback on the event loop (trio's ``run_sync_soon``, asyncio's ``call_soon_threadsafe``), which
never blocks the worker; the awaiting task sleeps on an :class:`anyio.Event`. A thread per call
(``anyio.to_thread.run_sync``) costs about twice this round trip, so it is not used.

Work whose estimated cost is below ``inline_flops`` runs on the event-loop thread: handing it to a
thread would cost more than doing it.

GPU work is only *launched* from the host: ``fn`` runs on the event-loop thread inside the actor's
CUDA stream, the kernels queue up, an event marks their end, and the host waits for that event only
when it must (:meth:`DevicePool.wait`), polling with back-off so the loop keeps running.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

from ._base import Device, parse_device
from ._registry import get_backend

__all__ = ["DEFAULT_INLINE_FLOPS", "DevicePool", "PoolStatistics", "open_device_pool"]

T = TypeVar("T")

#: Work estimated below this many flops runs inline. A hand-off to a worker costs ~50 µs of
#: latency, which one BLAS thread (~100 GFLOP/s) spends on ~5 MFLOP: below that, inline is faster.
DEFAULT_INLINE_FLOPS = 5_000_000

_pool_ids = itertools.count()


@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of a :class:`DevicePool`'s state.

    Attributes:
        workers: number of CPU worker threads.
        tasks_inline: CPU tasks run on the event-loop thread (cost below the threshold).
        tasks_threaded: CPU tasks finished by worker threads (failed ones included).
        tasks_gpu: GPU launches.
        tasks_abandoned: threaded tasks whose caller was cancelled (result discarded or never run).
        busy_seconds: seconds each worker spent running tasks, one entry per worker.
        queue_length: CPU tasks waiting for a free worker.
    """

    workers: int
    tasks_inline: int
    tasks_threaded: int
    tasks_gpu: int
    tasks_abandoned: int
    busy_seconds: tuple[float, ...]
    queue_length: int


class _Job:
    __slots__ = ("fn", "args", "done", "result", "error", "abandoned")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.done = anyio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.abandoned = False


def _call_soon_threadsafe(native_token: Any) -> Callable[[Callable[[], object]], None]:
    """A non-blocking 'run this on the loop thread' for the running event loop."""
    if hasattr(native_token, "run_sync_soon"):  # a trio.lowlevel.TrioToken
        return native_token.run_sync_soon
    if hasattr(native_token, "call_soon_threadsafe"):  # an asyncio event loop
        return native_token.call_soon_threadsafe
    raise RuntimeError(f"unsupported event loop token {native_token!r}")  # pragma: no cover


class DevicePool:
    """Runs compute for actors on CPU worker threads and CUDA streams.

    Open one with :func:`open_device_pool`; the constructor is private.
    """

    def __init__(
        self, cpu_workers: int, inline_flops: float, name: str, blas_threads: int | None = None
    ) -> None:
        self._n = cpu_workers
        self._blas_threads = blas_threads
        self._inline_flops = inline_flops
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy = [0.0] * cpu_workers
        self._done_per_worker = [0] * cpu_workers
        self._inline = 0
        self._gpu = 0
        self._abandoned = 0
        self._closed = True
        self._exited = 0
        self._all_exited: anyio.Event | None = None
        self._call_soon: Callable[[Callable[[], object]], None] | None = None

    # -- lifetime -------------------------------------------------------------------------------

    def _start(self) -> None:
        self._call_soon = _call_soon_threadsafe(anyio.lowlevel.current_token().native_token)
        self._all_exited = anyio.Event()
        self._closed = False
        for i in range(self._n):
            t = threading.Thread(
                target=self._worker, args=(i,), name=f"{self._name}-cpu{i}", daemon=True
            )
            t.start()
            self._threads.append(t)

    async def _aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        assert self._all_exited is not None
        # Shielded: closing after a cancellation must still wait for the threads, or they would
        # outlive the pool. It waits at most for the tasks already running to finish.
        with anyio.CancelScope(shield=True):
            if self._threads:
                await self._all_exited.wait()
        for t in self._threads:
            t.join()

    def _worker(self, index: int) -> None:
        if self._blas_threads is not None:
            # An OpenMP-threaded BLAS keeps its thread count per calling thread (a pthreads
            # OpenBLAS keeps it per process, set when the pool opened): set it here too.
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=self._blas_threads, user_api="blas")
        call_soon = self._call_soon
        assert call_soon is not None
        get = self._queue.get
        busy = self._busy
        done = self._done_per_worker
        while True:
            job = get()
            if job is None:
                break
            if not job.abandoned:  # a cancelled caller's job that has not started is skipped
                start = time.perf_counter()
                try:
                    job.result = job.fn(*job.args)
                except BaseException as exc:  # handed to the awaiting task, with its traceback
                    job.error = exc
                busy[index] += time.perf_counter() - start
                done[index] += 1
            self._notify(call_soon, job.done.set)
        self._notify(call_soon, self._worker_exited)

    @staticmethod
    def _notify(
        call_soon: Callable[[Callable[[], object]], None], fn: Callable[[], object]
    ) -> None:
        try:
            call_soon(fn)
        except RuntimeError:
            # The loop is gone (the pool was never closed, and its run ended): nobody is waiting.
            pass

    def _worker_exited(self) -> None:
        self._exited += 1
        if self._exited == len(self._threads) and self._all_exited is not None:
            self._all_exited.set()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this device pool is closed: use it inside its 'async with open_device_pool()'"
            )

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

        Pass keyword arguments to ``fn`` with :func:`functools.partial`.

        Raises:
            Exception: whatever ``fn`` raised, with its traceback.
            RuntimeError: when the pool is closed.
        """
        dev = parse_device(device)
        if dev.kind != "cpu":
            result, _ = await self.enqueue(dev, fn, *args, stream=stream, after=after)
            return result
        self._check_open()
        if cost is not None and cost < self._inline_flops:
            await anyio.lowlevel.checkpoint()
            self._inline += 1
            return fn(*args)
        job = _Job(fn, args)
        self._queue.put(job)
        try:
            await job.done.wait()
        except BaseException:
            # Cancelled: the worker finishes (or skips) the job and its result is dropped.
            job.abandoned = True
            self._abandoned += 1
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
        :meth:`run`, and the event is ``None`` (the work is done).
        """
        backend = get_backend(device)
        if backend.device.kind == "cpu":
            return await self.run(backend.device, fn, *args), None
        self._check_open()
        # a cancellation point, not a yield: queuing kernels is quick, and the actors' channel
        # operations yield anyway
        await anyio.lowlevel.checkpoint_if_cancelled()
        launched = backend.launch(fn, args, stream, after)
        self._gpu += 1
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
            call_soon = self._call_soon
            if get_backend(device).notify(event, lambda: self._notify(call_soon, woken.set)):
                await woken.wait()
        interval = 1e-5
        while not event.done:
            await anyio.sleep(interval)
            interval = min(2 * interval, max_interval)
        await anyio.lowlevel.checkpoint()

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's counters."""
        return PoolStatistics(
            workers=self._n,
            tasks_inline=self._inline,
            tasks_threaded=sum(self._done_per_worker),
            tasks_gpu=self._gpu,
            tasks_abandoned=self._abandoned,
            busy_seconds=tuple(self._busy),
            queue_length=self._queue.qsize(),
        )

    @property
    def inline_flops(self) -> float:
        """CPU work estimated below this many flops runs on the event-loop thread."""
        return self._inline_flops

    @property
    def workers(self) -> int:
        """Number of CPU worker threads."""
        return self._n

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<DevicePool {self._name} {state}, {self._n} CPU workers>"


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@asynccontextmanager
async def open_device_pool(
    cpu_workers: int | None = None,
    blas_threads: int | None = 1,
    inline_flops: float = DEFAULT_INLINE_FLOPS,
) -> AsyncIterator[DevicePool]:
    """Opens a :class:`DevicePool`; its worker threads stop when the block exits.

    Works under trio and asyncio (through anyio). Leaving the block waits for tasks already
    running on workers to finish (a thread cannot be interrupted), even when leaving because of
    a cancellation.

    Args:
        cpu_workers: CPU worker threads; default: one per core this process may use.
        blas_threads: BLAS threads per call while the pool is open (threadpoolctl), so that
            workers computing side by side don't oversubscribe the cores; ``None`` leaves BLAS as
            it is. numpy's OpenBLAS (and MKL) take this limit process-wide, not per thread, so it
            is set once here and restored on exit rather than in each worker.
        inline_flops: CPU work whose ``cost`` is below this runs on the event-loop thread.

    Example::

        async with open_device_pool() as pool:
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            y = await pool.run("cpu", np.matmul, a, b, cost=flops)
    """
    n = _default_workers() if cpu_workers is None else int(cpu_workers)
    if n < 1:
        raise ValueError(f"cpu_workers must be at least 1, got {cpu_workers}")
    if blas_threads is not None and blas_threads < 1:
        raise ValueError(f"blas_threads must be at least 1 or None, got {blas_threads}")
    limiter = None
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits

        limiter = threadpool_limits(limits=blas_threads, user_api="blas")
    pool = DevicePool(
        n, inline_flops, name=f"asyncnn-pool{next(_pool_ids)}", blas_threads=blas_threads
    )
    try:
        pool._start()
        try:
            yield pool
        finally:
            await pool._aclose()
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
