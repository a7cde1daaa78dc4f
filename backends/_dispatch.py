"""Where this thread's products go: a CUDA graph capture's product, a compute team, or numpy.

:func:`matmul` is the one entry point the math rules use: it dispatches to the product of a CUDA
graph capture in progress, to the team of the calling thread (set on the team's workers, or by
:func:`using_team`), or to ``a @ b``; :func:`elementwise` does the same for elementwise passes.
The choice is a thread's own (a thread-local), read on every op, so it lives apart from the team
(``_parallel.py``: the workers and how work is cut across them): the per-op path is this short
file, and the team only sets itself here as its workers' team.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._parallel import ComputeTeam

__all__ = [
    "batched_product",
    "capturing",
    "current_team",
    "elementwise",
    "matmul",
    "narrowed",
    "using_team",
]


class _ThreadState(threading.local):
    team: ComputeTeam | None = None
    #: the capture-safe product of a CUDA graph capture in progress on this thread
    capture_matmul: Callable[[Any, Any], Any] | None = None


_state = _ThreadState()


def current_team() -> ComputeTeam | None:
    """The compute team whose products this thread splits (None: products run unsplit)."""
    return _state.team


@contextlib.contextmanager
def using_team(team: ComputeTeam | None) -> Iterator[None]:
    """Within the block, :func:`matmul` on this thread splits its products over ``team``.

    A team's own workers use it already; this is for other threads, such as a plain training loop
    on the main thread. ``None`` turns splitting off within the block.
    """
    previous = _state.team
    _state.team = team
    try:
        yield
    finally:
        _state.team = previous


@contextlib.contextmanager
def capturing(product: Callable[[Any, Any], Any]) -> Iterator[None]:
    """Within the block, :func:`matmul` on this thread is ``product`` (a CUDA graph capture's)."""
    previous = _state.capture_matmul
    _state.capture_matmul = product
    try:
        yield
    finally:
        _state.capture_matmul = previous


def matmul(a: Any, b: Any) -> Any:
    """``a @ b``, through the backend this thread is using.

    Inside a CUDA graph capture on this thread: the capture's product (cuBLAS on the capture's
    stream). On a thread with a :class:`ComputeTeam` (its workers, or inside :func:`using_team`):
    large 2-D numpy products split across the team. Otherwise ``a @ b``. The product of two
    arrays of one dtype is in that dtype: two bfloat16 arrays give bfloat16 (see :func:`narrowed`).
    """
    state = _state
    product = state.capture_matmul
    if product is not None:
        return product(a, b)
    team = state.team
    if team is not None and type(a) is np.ndarray and type(b) is np.ndarray:
        out = team.matmul(a, b)
    elif (a.ndim > 2 or b.ndim > 2) and _no_batched_kernel(a):
        out = _batched_bfloat16(a, b).astype(a.dtype, copy=False)
    else:
        out = a @ b
    if out.dtype is not a.dtype:  # one comparison: numpy's dtypes of float32, ... are singletons
        return narrowed(out, a, b)
    return out


def batched_product(a: Any, b: Any) -> Any:
    """``a @ b`` as numpy computes it, also where one side has more than two axes and the
    library has no such product: cupy has no batched bfloat16 kernel ("data type 'E' not
    understood"), where this gives numpy's bfloat16 product, in float32 (a stack of products
    against a matrix: one 2-D product of the stacked rows, cuBLAS's, in bfloat16). For the
    gradients of a batched product, which sum over the batch before they are rounded."""
    if (a.ndim > 2 or b.ndim > 2) and _no_batched_kernel(a):
        return _batched_bfloat16(a, b)
    return a @ b


def _no_batched_kernel(a: Any) -> bool:
    """Whether ``a``'s library has no batched product for its dtype: bfloat16 on cupy."""
    return a.dtype.kind == "V" and type(a) is not np.ndarray


def _batched_bfloat16(a: Any, b: Any) -> Any:
    """``a @ b`` of bfloat16 arrays, one with more than two axes, without a batched bfloat16
    product: a stack against a matrix as one 2-D product of its rows (in bfloat16, the 2-D
    product the library has), anything else as the float32 product of the two (returned in
    float32, as numpy's bfloat16 product is)."""
    if b.ndim == 2 and a.ndim > 2 and b.dtype == a.dtype:
        rows = a.reshape(-1, a.shape[-1])
        return (rows @ b).reshape(*a.shape[:-1], b.shape[1])
    return a.astype(np.float32) @ b.astype(np.float32)


def narrowed(out: Any, a: Any, b: Any) -> Any:
    """``out``, numpy's product of ``a`` and ``b``, in their dtype where numpy widened it.

    numpy multiplies two bfloat16 arrays (ml_dtypes) in float32 and returns float32. cuBLAS also
    accumulates in float32 but rounds the result to bfloat16, as this does: each op's output is
    in its inputs' dtype on the CPU as on a GPU. Mixed dtypes keep numpy's promotion.
    """
    dtype = a.dtype
    if out.dtype is dtype:  # the common case first: one comparison
        return out
    # (a vector times a vector is a numpy scalar; a cupy array is neither: cuBLAS rounded it;
    # a byte-swapped dtype came back native, as numpy's own product does, not wider)
    if (
        isinstance(out, np.ndarray | np.generic)
        and b.dtype == dtype != out.dtype
        and dtype.itemsize < out.dtype.itemsize
    ):
        return out.astype(dtype)
    return out


def elementwise(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` for an elementwise ``fn`` (each output row depends only on the same rows of
    the inputs, numpy broadcasting); on a thread with a :class:`ComputeTeam`, large numpy work is
    split by rows of the result (see :meth:`ComputeTeam.elementwise`): bit-identical either way
    for correctly rounded operations (``+ - * /``, ``maximum``).
    """
    team = _state.team
    if team is None:
        return fn(*args)
    return team.elementwise(fn, *args)
