"""The sum of a minibatch's gradients in one pass, on cupy.

Under a flush (``GPipe(M)``, ``OneFOneB(M)``) a captured layer actor's keys each leave their
parameter gradients in their own graph's buffers, which stay as they are until the next
minibatch. Adding them as they come takes ``M - 1`` passes over the parameters, the scaling by
``1 / M`` another and the captured update's copy of the result a last one: on a 4096 x 4096
float32 layer each pass costs about 50-85 µs of an H100's memory bandwidth, for every layer and
minibatch. :func:`sum_into` reads the ``M`` gradients once and writes their sum, scaled, once.

The arithmetic is the one of adding as they come, operation for operation: ``((g0 + g1) + g2)
...`` left to right, then ``* scale`` with the scale rounded to the arrays' type (as cupy rounds a
Python float multiplying a float32 array), each rounded (``__fadd_rn``, ``__fmul_rn``: nothing
contracted into a fused multiply-add). So float32 and float64 sums equal the eager ones bit for
bit. 16-bit gradients are left to the eager sum (:func:`sums`): cupy scales a bfloat16 array by a
Python float into float32, which the update then reads; a bfloat16 sum would round it.

Imported only from the runtime's capture, on cupy arrays.
"""

from __future__ import annotations

import functools
from typing import Any

import cupy

from ._fused import _elementwise, _Update

__all__ = ["MAX_TERMS", "sum_into", "sums"]

#: the most arrays one kernel reads (more are summed in turns, the running sum read again)
MAX_TERMS = 8

_CTYPES = {"float32": "float", "float64": "double"}


@functools.cache
def _kernel(terms: int, ctype: str) -> Any:
    body = "C t = (C)a0;\n" + "".join(f"t = ADD(t, (C)a{i});\n" for i in range(1, terms))
    body += "out = (T)MUL(t, (C)s);"
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
