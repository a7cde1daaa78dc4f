"""The CPU compute team: one worker thread per core, and large products split across them.

OpenBLAS runs one multi-threaded call at a time (concurrent callers queue on its lock), but as many
single-threaded calls side by side as there are cores. So the team's threads all call BLAS with one
thread each, and one large computation is cut into parts that free workers take:

- A :class:`ComputeTeam` holds two queues: *tasks* (whole jobs, such as an actor's vjp handed over
  by the device pool) and *splits* (the parts of one computation in progress). A free worker takes a
  part before a task, so a computation already started finishes first.
- The caller of a split takes parts of its own split too, until none is left unclaimed, then waits
  for the parts other workers took. It never waits for a part nobody has started, so a split called
  from inside a worker (a task that splits its products), or from many callers at once (several
  actors), cannot deadlock: at worst the caller does all its parts itself.
- How work is cut depends only on the shapes and the team's size, never on timing; a part computes
  the same arithmetic whichever thread runs it. Results are therefore identical run to run. A
  team may plan its products for another size than its thread count (``plan_workers``: each
  process of a cluster cuts its products as one process of all the host's cores would), parts
  beyond its threads then running one after another. A
  matrix product is cut along an output dimension (rows of ``a``, or columns of ``b``), never along
  the contraction, so every output element is summed in the same order as an uncut product with
  the same BLAS kernel.

Which team, if any, a thread's products go to (:func:`matmul`, :func:`elementwise`,
:func:`using_team`) is decided per thread in ``_dispatch.py``; those names are imported here too,
where the package has always found them. Where a product may be cut, and the BLAS thread count
the open teams share, are ``_blas.py``'s; how a product, an elementwise pass or a column sum is
cut into parts, ``_parallel_cuts.py``'s (the team's methods of those names call it).
"""

from __future__ import annotations

import collections
import contextvars
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._blas import _BLAS_LIMITS, _product_plan, split_bounds
from ._checks import check_flag, check_number, check_workers
from ._dispatch import _state, current_team, elementwise, matmul, narrowed, using_team
from ._gil import SWITCH_INTERVALS, auto_interval, check_switch_interval
from ._parallel_cuts import split_elementwise, split_matmul, split_sum_rows

__all__ = [
    "DEFAULT_PART_ELEMENTS",
    "DEFAULT_PART_FLOPS",
    "ComputeTeam",
    "TeamStatistics",
    "current_team",
    "elementwise",
    "matmul",
    "narrowed",
    "split_bounds",
    "using_team",
]

#: The parts of a split product do at least this many flops on average: ~40 µs on one core, far
#: above the ~10-20 µs it costs to wake a worker and hand it the part. (Parts are whole blocks
#: of 16 rows or columns, so the one before a short last block may do less.)
DEFAULT_PART_FLOPS = 4_000_000
#: A part of a split elementwise pass touches at least this many elements (~50 µs of a ufunc).
DEFAULT_PART_ELEMENTS = 131_072


def _report(exc: BaseException) -> None:
    """An error that a worker's task raised: handed to :func:`threading.excepthook`, as a
    thread's uncaught error is, while the worker carries on."""
    args = [type(exc), exc, exc.__traceback__, threading.current_thread()]
    try:
        threading.excepthook(threading.ExceptHookArgs(args))
    except BaseException as hook_error:
        # A hook that fails must not end the worker: the team would take tasks that no thread
        # runs, and their callers would wait forever. Its error goes to sys.excepthook, as
        # threading does with a failing hook.
        try:
            sys.excepthook(type(hook_error), hook_error, hook_error.__traceback__)
        except BaseException:  # nowhere left to report it; the worker goes on
            pass


@dataclass(frozen=True)
class TeamStatistics:
    """A snapshot of a :class:`ComputeTeam`'s counters.

    Attributes:
        workers: worker threads.
        tasks: whole tasks the workers finished.
        splits: computations split into parts (by any caller).
        parts: parts run, by the callers and by the workers.
        parts_helped: parts run by a worker other than the split's caller.
        busy_seconds: seconds each worker spent running tasks and parts, one entry per worker.
    """

    workers: int
    tasks: int
    splits: int
    parts: int
    parts_helped: int
    busy_seconds: tuple[float, ...]


class _Split:
    __slots__ = ("fn", "context", "n", "next", "left", "errors", "done")

    def __init__(self, fn: Callable[[int], object], n: int) -> None:
        self.fn = fn
        # the caller's context (numpy's error state is a context variable): each part a worker
        # runs sees the settings the caller's own parts see
        self.context = contextvars.copy_context()
        self.n = n
        self.next = 0  # the next unclaimed part
        self.left = n  # parts not finished
        self.errors: list[tuple[int, BaseException]] = []
        self.done = threading.Event()


class ComputeTeam:
    """Worker threads, one per core, that run whole tasks and share out split computations.

    Use it as a context manager (or call :meth:`start` and :meth:`close`)::

        with ComputeTeam(16) as team:
            y = team.matmul(a, b)  # cut into up to 16 parts, run side by side

    Args:
        workers: worker threads (usually one per core this process may use), at most
            ``MAX_POOL_WORKERS`` (4096).
        blas_threads: BLAS threads per call while the team is open, set through threadpoolctl
            (OpenBLAS keeps one count for the whole process: of the teams open at once, the
            last opened sets it, and the count from before the first returns when the last
            one closes, in any order); ``None`` leaves BLAS as it is. Splitting only pays with
            ``1``.
        part_flops: the least work, in flops, of a part of a split product on average (parts
            are whole blocks of 16 rows or columns, so one can do less).
        part_elements: the least number of elements one part of a split elementwise pass
            touches (twice that when the pass is cut in only two parts).
        split: whether work is split at all; with ``False`` the team only runs whole tasks (and
            its workers' products run uncut), as a pool whose BLAS calls are multi-threaded wants.
        switch_interval: the interpreter's switch interval (``sys.setswitchinterval``, seconds,
            from 1e-6 to 1) while the team is open: the longest a worker back from BLAS may wait for the GIL
            that a thread running Python holds (Python's own is 5 ms, ten to a hundred of the
            team's parts). Process-wide, as BLAS's thread count: the team opened last sets it,
            and the interval from before the first returns when the last closes. ``None``
            leaves it as it is; ``"auto"`` asks for 5e-5 s in a team of 8 workers or more and
            leaves it below (see ``docs/cpu.md``).
        name: prefix of the worker threads' names.
        on_exit: called by each worker thread as it stops (after :meth:`shutdown` or
            :meth:`close`), so that an event loop can wait for the workers without blocking.
        plan_workers: the team size its products are planned for, at most
            ``MAX_POOL_WORKERS``: a large product is cut into up to this many parts, whatever
            the number of threads (parts beyond them run one after another on whichever
            thread is free), so that the cuts, and with them the last bits of the sums, are
            those of a team of ``plan_workers`` threads. Default: ``workers``. Elementwise
            passes, bias-gradient sums and optimizer updates are cut by the thread count:
            their parts are bit-identical to the whole whatever the cut.
    """

    def __init__(
        self,
        workers: int,
        *,
        blas_threads: int | None = 1,
        part_flops: int = DEFAULT_PART_FLOPS,
        part_elements: int = DEFAULT_PART_ELEMENTS,
        split: bool = True,
        switch_interval: float | Literal["auto"] | None = "auto",
        name: str = "asyncnn-team",
        on_exit: Callable[[], object] | None = None,
        plan_workers: int | None = None,
    ) -> None:
        check_number("workers", workers, integer=True, least=-math.inf)
        if workers < 1:
            raise ValueError(
                f"a compute team needs at least 1 worker, got workers={workers}: pass one per "
                "core this process may use (len(os.sched_getaffinity(0)))"
            )
        check_workers("workers", workers)  # (at most MAX_POOL_WORKERS)
        check_workers("plan_workers", plan_workers, none_ok=True)
        check_number("blas_threads", blas_threads, integer=True, least=1, none_ok=True)
        check_number("part_flops", part_flops, integer=False, least=1, finite=True)
        check_number("part_elements", part_elements, integer=False, least=1, finite=True)
        check_flag("split", split)
        check_switch_interval(switch_interval)
        self._n = int(workers)
        self._plan = self._n if plan_workers is None else int(plan_workers)
        self._switch_interval = (
            auto_interval(self._n)
            if switch_interval == "auto"
            else None
            if switch_interval is None
            else float(switch_interval)
        )
        self._blas_threads = blas_threads
        self._part_flops = int(part_flops)
        self._part_elements = int(part_elements)
        self._split = bool(split)
        self._name = name
        self._on_exit = on_exit
        self._cond = threading.Condition(threading.Lock())
        self._splits: collections.deque[_Split] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], object], Callable[[], object] | None]]
        self._tasks = collections.deque()
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._busy = [0.0] * self._n
        self._tasks_done = [0] * self._n  # per worker: each worker writes only its own entry
        self._helped = [0] * self._n
        self._split_count = 0
        self._part_count = 0
        self._state = "new"  # new -> open -> closing -> closed

    # -- lifetime -------------------------------------------------------------------------------

    def start(self) -> ComputeTeam:
        """Starts the workers (and limits BLAS threads); returns the team."""
        if self._state != "new":
            raise RuntimeError(f"this compute team was started already ({self._state})")
        if self._blas_threads is not None:
            _BLAS_LIMITS.hold(self, self._blas_threads)
        if self._switch_interval is not None:
            SWITCH_INTERVALS.hold(self, self._switch_interval)
        self._state = "open"
        try:
            for i in range(self._n):
                t = threading.Thread(
                    target=self._worker, args=(i,), name=f"{self._name}-{i}", daemon=True
                )
                t.start()
                self._threads.append(t)
        except BaseException:
            # (the OS refused a thread) the workers started so far must not outlive the team,
            # nor BLAS's count stay limited
            self.close()
            raise
        return self

    def shutdown(self) -> None:
        """Asks the workers to stop once the queued work is done, and returns at once (each
        worker calls ``on_exit`` as it leaves); :meth:`close` then joins them."""
        with self._cond:
            if self._state == "open":
                self._state = "closing"
            self._cond.notify_all()

    def close(self, wait: bool = True) -> None:
        """Stops the workers once the queued tasks are done; restores BLAS's thread count.

        Waits for tasks already queued or running (a thread cannot be interrupted), unless
        ``wait`` is false: then a worker still running a task is left to finish it on its own
        (the threads are daemons). Splits called after this run all their parts on the caller.
        Closing twice does nothing.
        """
        if self._state in ("new", "closed"):
            self._state = "closed"
            return
        self.shutdown()
        current = threading.current_thread()
        for t in self._threads:
            if t is not current and (wait or not t.is_alive()):
                t.join()
        self._state = "closed"
        SWITCH_INTERVALS.release(self)
        _BLAS_LIMITS.release(self)

    def __enter__(self) -> ComputeTeam:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def workers(self) -> int:
        """Number of worker threads."""
        return self._n

    @property
    def plan_workers(self) -> int:
        """The team size products are planned for (``plan_workers``, by default
        :attr:`workers`): a large product is cut into up to this many parts."""
        return self._plan

    @property
    def splits_work(self) -> bool:
        """Whether the team splits large work across its workers."""
        return self._split

    @property
    def blas_threads(self) -> int | None:
        """The BLAS threads of each call while the team is open (None: BLAS's own setting)."""
        return self._blas_threads

    @property
    def part_flops(self) -> int:
        """The least work, in flops, of a part of a split product on average (the
        ``part_flops`` the team was made with, as an int). With :attr:`plan_workers` and
        :attr:`splits_work` it decides where products are cut, and so the last bits of their
        sums: a trace records the three to replay with the same cuts."""
        return self._part_flops

    @property
    def part_elements(self) -> int:
        """The least number of elements one part of a split elementwise pass touches (the
        ``part_elements`` the team was made with, as an int): a pass touching fewer than twice
        this runs whole (:meth:`row_bounds`, :meth:`elementwise`)."""
        return self._part_elements

    @property
    def queued_tasks(self) -> int:
        """Tasks waiting for a free worker."""
        return len(self._tasks)

    def _queued(self) -> list[Callable[[], object]]:
        """The tasks waiting for a free worker, oldest first (a snapshot)."""
        with self._cond:
            return [task for task, _ in self._tasks]

    @property
    def is_open(self) -> bool:
        """Whether the workers are running and take new tasks."""
        return self._state == "open"

    # -- the workers ----------------------------------------------------------------------------

    def _worker(self, index: int) -> None:
        try:
            self._serve(index)
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def _serve(self, index: int) -> None:
        if self._blas_threads is not None:
            # An OpenMP-threaded BLAS keeps its thread count per calling thread (a pthreads
            # OpenBLAS keeps it per process, set in start()): set it here too, as the teams
            # open now share it (this team's own count could undo a newer team's).
            _BLAS_LIMITS.apply(self)
        if self._split:
            _state.team = self
        cond = self._cond
        busy = self._busy
        tasks_done = self._tasks_done
        helped = self._helped
        while True:
            with cond:
                while not self._splits and not self._tasks:
                    if self._state != "open":
                        return
                    self._idle += 1
                    cond.wait()
                    self._idle -= 1
                if self._splits:
                    split = self._splits[0]
                    part = self._claim(split)
                    task = then = None
                else:
                    task, then = self._tasks.popleft()
            start = time.perf_counter()
            if task is not None:
                try:
                    task()  # a task reports its own errors (see submit)
                except BaseException as exc:
                    _report(exc)
                busy[index] += time.perf_counter() - start
                tasks_done[index] += 1
                if then is not None:
                    try:
                        then()
                    except BaseException as exc:
                        _report(exc)
            else:
                split.context.copy().run(self._run_part, split, part)
                busy[index] += time.perf_counter() - start
                helped[index] += 1

    def _claim(self, split: _Split) -> int:
        """The next unclaimed part of ``split``, or -1; called with the lock held."""
        i = split.next
        if i >= split.n:
            return -1
        split.next = i + 1
        if i + 1 == split.n:
            self._splits.remove(split)
        return i

    def _run_part(self, split: _Split, i: int) -> None:
        try:
            split.fn(i)
        except BaseException as exc:  # raised by the split's caller, lowest part first
            split.errors.append((i, exc))
        with self._cond:
            self._part_count += 1
            split.left -= 1
            if split.left == 0:
                split.done.set()

    # -- running work ---------------------------------------------------------------------------

    def submit(self, task: Callable[[], object], then: Callable[[], object] | None = None) -> None:
        """Queues ``task()`` for a free worker, and ``then()`` after it once the team's counters
        include it. Both must report their own results and errors: what they raise goes to
        :func:`threading.excepthook` (printed, as a thread's uncaught error), and the worker
        carries on. Parts of splits in progress go before them.

        Raises:
            RuntimeError: when the team is not open.
        """
        with self._cond:
            if self._state != "open":
                if self._state == "new":
                    raise RuntimeError(
                        "this compute team has not started: open it with 'with "
                        "ComputeTeam(...) as team:' or call team.start() first"
                    )
                raise RuntimeError(f"this compute team is {self._state}: it takes no new tasks")
            self._tasks.append((task, then))
            if self._idle:
                self._cond.notify()

    def run_parts(self, fn: Callable[[int], object], parts: int) -> None:
        """Runs ``fn(0)``, ..., ``fn(parts - 1)``, side by side on free workers and this thread.

        Returns once every part has finished. This thread takes parts too, so the call never waits
        for a part that nobody has started (safe from inside a worker, and from many threads at
        once). Each part must write its own piece of the result.

        Raises:
            BaseException: the error of the lowest-numbered part that failed (after all parts
                have finished).
        """
        if parts <= 1 or self._state != "open" or not self._split:
            for i in range(parts):
                fn(i)
            return
        split = _Split(fn, parts)
        with self._cond:
            self._split_count += 1
            self._splits.append(split)
            if self._idle:
                self._cond.notify(min(parts - 1, self._idle))
        claim = self._claim
        while True:
            with self._cond:
                i = claim(split)
            if i < 0:
                break
            self._run_part(split, i)
        split.done.wait()
        if split.errors:
            error = min(split.errors, key=lambda e: e[0])[1]
            split.errors.clear()
            try:
                raise error
            finally:
                del error

    def product_plan(self, m: int, n: int, k: int) -> tuple[int, tuple[int, ...]]:
        """How :meth:`matmul` cuts an ``(m, k) @ (k, n)`` product: ``(axis, bounds)``, with axis
        0 for rows and 1 for columns of the output; one piece means the product stays whole.
        A function of the shapes, :attr:`plan_workers` and :attr:`part_flops` alone."""
        return _product_plan(m, n, k, self._plan, self._part_flops)

    def matmul(self, a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """``a @ b``; a large 2-D float product is cut along its larger output dimension into up
        to :attr:`plan_workers` parts (by default one per worker), in whole blocks of 16 rows or
        columns (bfloat16: the float32 product of the two, as numpy computes it).

        The cut depends only on the shapes and :attr:`plan_workers`, never on how many threads
        run the parts, so the result repeats bit for bit, and a team planning for ``P`` workers
        on fewer threads gives the bits of a team of ``P`` threads. Every output element is the same dot product as in an uncut single-threaded call
        (never a cut contraction), and equals ``a @ b`` with one BLAS thread bit for bit where
        BLAS computes each part with the kernel it uses for the whole. OpenBLAS takes other
        kernels for small products: parts of well under a megaflop (a ``part_flops`` far below
        the default) can differ from the uncut product in the last bits (float64: about 1e-15
        relative), the same in every run; with its Haswell kernels (0.3.34) parts of several
        megaflops did too.
        """
        return split_matmul(self, a, b)

    def row_bounds(self, rows: int, elements: int) -> tuple[int, ...]:
        """Cut points of an elementwise pass over ``rows`` rows touching ``elements`` elements in
        all: one piece when it is too small to split (see ``part_elements``).

        Up to one piece per worker thread, not per :attr:`plan_workers`: the passes cut here
        (correctly rounded elementwise operations, column sums, elementwise optimizer updates)
        give the same bits however they are cut."""
        open_ = self._state == "open" and self._split
        parts = min(self._n, elements // self._part_elements) if open_ else 1
        if parts == 2 and elements < 4 * self._part_elements:
            # two parts save half the pass and pay a hand-over that costs about two parts' worth:
            # on the 2-core CI VM a 263K-element add took 108 µs in two parts, 51 µs whole
            parts = 1
        return split_bounds(rows, max(1, parts))

    def map_rows(self, fn: Callable[[int, int], object], rows: int, elements: int) -> None:
        """Runs ``fn(lo, hi)`` over pieces of ``range(rows)`` side by side (see
        :meth:`row_bounds`); each call must write only rows ``lo:hi`` of its outputs."""
        bounds = self.row_bounds(rows, elements)
        if len(bounds) <= 2:
            fn(0, rows)
            return
        self.run_parts(lambda i: fn(bounds[i], bounds[i + 1]), len(bounds) - 1)

    def elementwise(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, split by rows of the result when the numpy arrays among ``args`` are
        large (see ``part_elements``).

        ``fn`` must be elementwise along the first axis: row ``i`` of its result depends only on
        row ``i`` of the arguments that have the result's full first axis (others, broadcast or
        scalar, go whole to every part). A ufunc writes each part in place; any other ``fn``
        computes a part and copies it in. Results equal the uncut call bit for bit for correctly
        rounded operations (``+ - * /``, ``sqrt``, ``maximum``, comparisons: what the math rules
        pass); a transcendental ufunc (``exp``, ``log1p``) may take another vector loop for a
        part of an array with negative strides, and differ from the uncut call in the last bit.
        Arguments other than numpy arrays and scalars (lists, other libraries' arrays, ndarray
        subclasses) leave the call whole.
        """
        return split_elementwise(self, fn, *args)

    def sum_rows(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """``x.sum(axis=0)`` of a 2-D array (a bias gradient), cut by columns when large.

        Each column is summed over the rows in the same order as the uncut call, so the result
        is the same bit for bit.
        """
        return split_sum_rows(self, x)

    def statistics(self) -> TeamStatistics:
        """A snapshot of the team's counters."""
        return TeamStatistics(
            workers=self._n,
            tasks=sum(self._tasks_done),
            splits=self._split_count,
            parts=self._part_count,
            parts_helped=sum(self._helped),
            busy_seconds=tuple(self._busy),
        )

    def __repr__(self) -> str:
        plan = f", products planned for {self._plan}" if self._plan != self._n else ""
        return f"<ComputeTeam {self._name} {self._state}, {self._n} workers{plan}>"
