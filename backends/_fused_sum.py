"""The sum of a minibatch's gradients in one pass, on cupy.

Under a flush (``GPipe(M)``, ``OneFOneB(M)``) a captured layer actor's keys each leave their
parameter gradients in their own graph's buffers, which stay as they are until the next
minibatch. Adding them as they come takes ``M - 1`` passes over the parameters, the scaling by
``1 / M`` another and the captured update's copy of the result a last one: on a 4096 x 4096
float32 layer each pass costs about 50-85 µs of an H100's memory bandwidth, for every layer and
minibatch. :func:`sum_into` reads the ``M`` gradients once and writes their sum, scaled, once;
inside :func:`summed` the optimizer's update kernel itself reads the ``M`` gradients and sums
them (no pass writing the sum, none reading it back).

The arithmetic is the one of adding as they come, operation for operation: ``((g0 + g1) + g2)
...`` left to right, then ``* scale`` with the scale rounded to the arrays' type (as cupy rounds a
Python float multiplying a float32 array), each rounded (``__fadd_rn``, ``__fmul_rn``: nothing
contracted into a fused multiply-add). So float32 and float64 sums equal the eager ones bit for
bit. 16-bit gradients are left to the eager sum (:func:`sums`): cupy scales a bfloat16 array by a
Python float into float32, which the update then reads; a bfloat16 sum would round it.

Imported only from the runtime's capture, on cupy arrays.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import cupy

from ._fused import reading_sums
from ._fused_source import _elementwise, _Update, sum_lines

__all__ = ["MAX_TERMS", "NotSummed", "sum_into", "summed", "sums"]

#: the most arrays one kernel reads (more are summed in turns, the running sum read again)
MAX_TERMS = 8

_CTYPES = {"float32": "float", "float64": "double"}


@functools.cache
def _kernel(terms: int, ctype: str) -> Any:
    body = sum_lines(tuple(f"a{i}" for i in range(terms)), "s", "out")
    rule = _Update(
        f"asyncnn_sum{terms}", tuple(f"a{i}" for i in range(terms)), ("out",), ("s",), body
    )
    return _elementwise(rule, ctype)


def sums(terms: list[list[Any]]) -> bool:
    """Whether :func:`sum_into` takes these summands (each a list of leaves): float32 or
    float64 cupy arrays, a leaf's terms all of one dtype and shape."""
    return all(
        isinstance(a, cupy.ndarray)
        and str(a.dtype) in _CTYPES
        and a.dtype == leaves[0].dtype
        and a.shape == leaves[0].shape
        for leaves in zip(*terms, strict=True)
        for a in leaves
    )


def sum_into(out: list[Any], terms: list[list[Any]], scale: float) -> None:
    """Writes ``(((t0 + t1) + t2) + ...) * scale`` leaf by leaf into ``out``.

    Args:
        out: the arrays written, one per leaf (none of them is among the terms).
        terms: the summands in order, each a list of leaves shaped and typed as ``out``, which
            :func:`sums` takes.
        scale: the factor applied to the sum (1.0: none).
    """
    for i, dst in enumerate(out):
        leaves = [t[i] for t in terms]
        ctype = _CTYPES[str(dst.dtype)]
        head, rest = leaves[:MAX_TERMS], leaves[MAX_TERMS:]
        # the scale goes with the last turn; a product by 1.0 is exact
        _kernel(len(head), ctype)(*head, 1.0 if rest else scale, dst)
        while rest:
            head, rest = rest[: MAX_TERMS - 1], rest[MAX_TERMS - 1 :]
            _kernel(len(head) + 1, ctype)(dst, *head, 1.0 if rest else scale, dst)


class NotSummed(RuntimeError):
    """An update inside :func:`summed` that did not read the sum it was given in place of a
    gradient (it read the gradient's array itself)."""


@contextlib.contextmanager
def summed(gradients: list[Any], terms: list[list[Any]], scale: float) -> Iterator[None]:
    """Within this block (on this thread) the built-in optimizers' kernels given the array
    ``gradients[i]`` read ``(((t0 + t1) + t2) + ...) * scale`` of the leaves ``i`` of ``terms``
    instead, summed as :func:`sum_into` sums them (the arithmetic, bit for bit): ``gradients``
    are never read.

    Raises:
        NotSummed: at the block's end, where some update did not read its sum (it computed
            otherwise: on the host, or clipping the gradients first); what it computed read
            ``gradients`` as they were, and is to be thrown away.
    """
    if len(terms) > MAX_TERMS:
        raise ValueError(f"summed: at most {MAX_TERMS} terms, got {len(terms)}")
    sums = {id(g): ([t[i] for t in terms], scale) for i, g in enumerate(gradients)}
    with reading_sums(sums) as taken:
        yield
    missing = len(sums) - len(taken)
    if missing:
        raise NotSummed(f"{missing} of {len(sums)} gradient leaves were read as they are")
