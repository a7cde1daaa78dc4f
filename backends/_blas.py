"""What the compute team must respect of BLAS. OpenBLAS keeps one thread count for the whole
process, which every open team sets to one while it is open (:data:`_BLAS_LIMITS`); and a
product cut into parts must have each part take the same BLAS path as the uncut product, or its
rounding differs: parts of whole kernel blocks (:data:`ALIGN`), no one-row or one-column piece
(a matrix-vector product), no part that multiplies an array by its own transpose (``syrk``).
Apart from ``_parallel.py``, the team and its workers, because these depend only on BLAS and on
the shapes: where a product is cut is a function of its shape and the team's size alone.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._held import HeldSetting

#: Parts of a product start on multiples of this many rows or columns (BLAS kernels work in
#: blocks of 4 to 16 rows; a part of whole blocks keeps every kernel call on its fast path).
ALIGN = 16


@functools.lru_cache(maxsize=4096)
def split_bounds(length: int, parts: int, align: int = 1) -> tuple[int, ...]:
    """Cut points of ``range(length)`` into at most ``parts`` nearly equal pieces of whole
    ``align``-sized blocks: ``(0, ..., length)``; a function of its arguments alone.

    Raises:
        TypeError: an argument is not an int.
        ValueError: ``length`` below 0, or ``parts`` or ``align`` below 1 (a negative
            ``align`` cut short of ``length``, silently dropping its last rows).
    """
    # (checked on a cache miss only: the team asks for the same few shapes on every step)
    for name, value, least in (("length", length, 0), ("parts", parts, 1), ("align", align, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"split_bounds: {name} must be an int, got {value!r}")
        if value < least:
            raise ValueError(f"split_bounds: {name} must be at least {least}, got {value!r}")
    blocks = -(-length // align)
    parts = max(1, min(parts, blocks))
    return tuple(min(length, (i * blocks // parts) * align) for i in range(parts + 1))


def _no_one_wide_tail(bounds: tuple[int, ...]) -> tuple[int, ...]:
    """``bounds`` with a last piece one row (or column) wide merged into the piece before it:
    numpy computes a one-row product as a matrix-vector product and sums one column pairwise,
    whose rounding differs from the uncut call's."""
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        return bounds[:-2] + bounds[-1:]
    return bounds


@functools.lru_cache(maxsize=4096)
def _product_plan(
    m: int, n: int, k: int, workers: int, part_flops: int
) -> tuple[int, tuple[int, ...]]:
    """``(axis, bounds)`` of a split ``(m, k) @ (k, n)`` product: axis 0 cuts rows of the output,
    1 columns; ``bounds`` has one piece when the product stays whole."""
    flops = 2 * m * n * k
    parts = min(workers, flops // max(1, part_flops))
    axis = 0 if m >= n else 1
    if parts < 2 or min(m, n) == 1:  # a matrix-vector product: its parts would round otherwise
        return axis, (0, m if axis == 0 else n)
    return axis, _no_one_wide_tail(split_bounds(m if axis == 0 else n, parts, ALIGN))


def _has_own_transpose(
    a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], axis: int, bounds: tuple[int, ...]
) -> bool:
    """Whether the whole product, or one of its parts, multiplies an array by its own transpose
    (the same memory): numpy computes that with BLAS's symmetric product (syrk), which rounds
    otherwise than the general product the other side of the cut uses. ``a @ a[:32].T`` is
    general whole, but its first part of 32 rows is ``a[:32] @ a[:32].T``."""
    if a.strides != b.strides[::-1]:  # the common case: one comparison
        return False
    pa = a.__array_interface__["data"][0]
    pb = b.__array_interface__["data"][0]
    m, n = a.shape[0], b.shape[1]
    if m == n and pa == pb:
        return True
    # part [lo, hi) of the cut axis against the whole other operand
    step, start, other = (a.strides[0], pa, pb) if axis == 0 else (b.strides[1], pb, pa)
    width = n if axis == 0 else m
    return any(
        hi - lo == width and start + lo * step == other
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    )


@contextlib.contextmanager
def _from_any_thread() -> Iterator[None]:
    """Within the block, threadpoolctl sets BLAS's thread count from this thread.

    Recent threadpoolctl (3.8 here) lets only one thread set a pthreads OpenBLAS's count: the
    first that set it, while it lives; it silently ignores the others. But a team opens,
    closes and starts its workers on whichever threads its user has. So each change clears
    that thread first, and again after (leaving no thread in control, as before the first).
    """
    import threadpoolctl

    controller: Any = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(controller, "clear_controlling_thread", None)  # older: any thread sets it
    if clear is not None:
        clear(force=True)
    try:
        yield
    finally:
        if clear is not None:
            clear(force=True)


def _limit(controller: Any, limit: int) -> Any:
    """Sets BLAS's thread count to ``limit`` through threadpoolctl's ``controller``; returns
    its limiter, which restores the count found before it."""
    with _from_any_thread():
        return controller.limit(limits=limit, user_api="blas")


class _BlasLimits(HeldSetting[int]):
    """The BLAS thread counts that the open teams hold.

    OpenBLAS keeps one count for the whole process, so teams open at the same time share it
    (see :class:`HeldSetting`). Every change is made under one lock, from whichever thread
    opens or closes a team or starts its worker.
    """

    def __init__(self) -> None:
        super().__init__()
        # threadpoolctl's controller of the libraries loaded as the first team of the moment
        # opened: a look-up reads every loaded library's path and symbols (25 ms with cupy and
        # torch loaded), and each of a 16-worker team's threads set its count as it started
        self._controller: Any = None

    def _set(self, value: int, first: bool) -> Any:
        if first:  # (the libraries loaded since the last team closed are found)
            from threadpoolctl import ThreadpoolController

            with _from_any_thread():
                self._controller = ThreadpoolController()
        # the first limiter restores the count from before the first team
        return _limit(self._controller, value)

    def _restore(self, original: Any) -> None:
        with _from_any_thread():
            original.restore_original_limits()

    def held(self) -> set[int]:
        """The counts the open teams (and pools of one worker with BLAS's own threads) hold."""
        with self._lock:
            return {value for _, value in self._held}

    def hold(self, owner: object, value: int) -> None:
        """As :meth:`HeldSetting.hold`, warning where another open holder holds another count:
        the process then multiplies on the newest count, so the runs open at once compute their
        products on a count they did not choose, and float32 products round otherwise on 2
        threads than on 1 (results, and replays of their traces, differ in the last bits from
        each run alone)."""
        others = self.held()
        if others and others != {value}:
            warnings.warn(
                f"BLAS set to {value} thread(s) (a compute pool opening, or balance='time' "
                f"timing layers) while an open pool holds "
                f"{', '.join(str(v) for v in sorted(others))}: OpenBLAS keeps one count "
                "for the whole process, so the runs open at once now multiply on the newest "
                "count, and their results (and the replays of their traces) may differ in the "
                "last bits from each run alone; run them one after the other, in separate "
                "processes, or on one pool (open_run(..., pool=...))",
                RuntimeWarning,
                stacklevel=3,
            )
        super().hold(owner, value)

    def apply(self, owner: object) -> None:
        """Sets the count that applies now on the calling thread (a worker of ``owner`` as it
        starts: an OpenMP-threaded BLAS keeps its count per thread); nothing once ``owner``
        holds none.

        The newest team's count, not ``owner``'s: a worker of an older team that starts late
        must not override the count of a team opened since, nor set any once its own team
        has given its count back.
        """
        with self._lock:
            if any(o is owner for o, _ in self._held):
                _limit(self._controller, self._held[-1][1])


_BLAS_LIMITS = _BlasLimits()
