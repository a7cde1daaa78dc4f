"""Fused optimizer updates on cupy: one kernel for a parameter leaf instead of 2 to 8 passes,
and one launch for up to :data:`MAX_LEAVES` leaves.

Each kernel reads the parameter, its gradient and its state buffers once and writes fresh
arrays (the optimizers stay functional: nothing is written in place), except inside
:func:`in_place`, where it writes over the arrays it read: a captured update (a CUDA graph)
keeps its parameters in fixed buffers, and writing there saves a copy of every parameter per
step.

The arithmetic is the eager update's, operation for operation, with rounding after each
(``__fmul_rn`` and friends, which the compiler may not contract into fused multiply-adds), so
float32 and float64 results equal the eager ones bit for bit. 16-bit floats (float16, bfloat16)
compute in float32 and round once on the store; their kernels move eight values per 16-byte
load and store (an elementwise kernel moving one 2-byte value at a time reaches about half the
memory bandwidth), one value at a time for unaligned views, and the elementwise kernel as the
fallback where the CUDA headers are missing.

Inside :func:`scalars_on_device`, the scalars that change from step to step are read from a
small array on the device instead of the kernel's arguments: Adam's bias corrections and AdamW's
decay, which follows the learning rate (:func:`adam_step_scalars`), and SGD's learning rate
(:func:`sgd_step_scalars`). A captured update then replays right at every step, under a
learning-rate schedule too, once :func:`set_scalars` has written that step's values there (one
tiny kernel, its values passed by value: no host memory the device reads later).

:func:`sgd_many` and :func:`adam_many` update a whole parameter tree in one launch for up to
:data:`MAX_LEAVES` leaves (the leaves' pointers and sizes in the kernel's arguments, each block
working on one leaf), the per-leaf kernels' arithmetic exactly: an eager step launched one kernel
per leaf, each costing tens of microseconds of host time.

Inside :func:`reading_sums`, an update whose gradient leaf is one of the given arrays reads a sum
of other arrays in its place, summed in the update's own kernel (:func:`sum_lines`' arithmetic,
that of ``_fused_sum.sum_into``): a flush's update then reads its keys' gradients once, with no
pass writing their sum and no pass reading it back.

Imported only from the optimizers and the runtime's capture, on cupy arrays.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from typing import Any

import cupy
import numpy as np

from ._fused_source import (
    _HALF,
    _VEC,
    _adam_rule,
    _elementwise,
    _multi,
    _sgd_rule,
    _summed_rule,
    _Update,
    _vectorised,
)

__all__ = [
    "MAX_LEAVES",
    "adam_leaf",
    "adam_many",
    "adam_step_scalars",
    "in_place",
    "reading_sums",
    "scalars_on_device",
    "set_scalars",
    "sgd_leaf",
    "sgd_many",
    "sgd_step_scalars",
    "vectorised_available",
]

_state = threading.local()
_THREADS = 256  # threads a block


@contextlib.contextmanager
def in_place() -> Iterator[None]:
    """Within this block (on this thread) the updates write the new parameter and state buffers
    over the ones they read, and return those arrays."""
    _state.on = True
    try:
        yield
    finally:
        _state.on = False


def _in_place() -> bool:
    return bool(getattr(_state, "on", False))


@contextlib.contextmanager
def reading_sums(sums: dict[int, tuple[list[Any], float]]) -> Iterator[set[int]]:
    """Within this block (on this thread) an update given a gradient leaf ``g`` with ``id(g)``
    in ``sums`` reads ``((t0 + t1) + ...) * scale`` instead, ``(terms, scale) = sums[id(g)]``
    (``g`` itself is not read). Yields the set of the ids taken so far: a caller checks that
    every update took its sum (one that computes otherwise, on the host say, read ``g``)."""
    taken: set[int] = set()
    _state.sums, _state.taken = sums, taken
    try:
        yield taken
    finally:
        _state.sums = None


def _with_sum(
    rule: _Update, arrays: list[Any], scalars: tuple[float, ...]
) -> tuple[_Update, list[Any], tuple[float, ...], int | None]:
    """The rule, its arrays and scalars with the gradient's sum in place of the gradient where
    :func:`reading_sums` names it; the last item is the gradient's id then (else None)."""
    sums = getattr(_state, "sums", None)
    if not sums or "g" not in rule.ins:
        return rule, arrays, scalars, None
    at = rule.ins.index("g")
    gid = id(arrays[at])
    found = sums.get(gid)
    if found is None:
        return rule, arrays, scalars, None
    terms, scale = found
    arrays = arrays[:at] + list(terms) + arrays[at + 1 :]
    return _summed_rule(rule, len(terms)), arrays, (*scalars, scale), gid


@contextlib.contextmanager
def scalars_on_device(buffer: Any) -> Iterator[None]:
    """Within this block (on this thread) Adam's and SGD's kernels read their step-dependent
    scalars (:func:`adam_step_scalars`, :func:`sgd_step_scalars`) from ``buffer``, a float64
    array of 3 on the device."""
    _state.scalars = buffer
    try:
        yield
    finally:
        _state.scalars = None


def adam_step_scalars(
    step: int, lr: float, betas: tuple[float, float], weight_decay: float, decoupled: bool
) -> tuple[float, float, float]:
    """What Adam's update ``step`` (0 for the first) multiplies by besides its constants:
    ``(sqrt(1 - b2^t), -lr / (1 - b1^t), decay)`` with ``t = step + 1``; ``decay`` is AdamW's
    ``1 - lr * weight_decay`` (1 for Adam)."""
    beta1, beta2 = betas
    t = step + 1
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    return math.sqrt(1.0 - beta2**t), -(lr / (1.0 - beta1**t)), decay


def sgd_step_scalars(lr: float) -> tuple[float, float, float]:
    """What SGD's update multiplies by besides its constants, as :func:`set_scalars` takes it:
    ``(-lr, 0, 0)`` (the two zeros unread)."""
    return -lr, 0.0, 0.0


@functools.cache
def _setter() -> Any:
    return cupy.ElementwiseKernel(
        "float64 a, float64 b, float64 c", "float64 out",
        "out = i == 0 ? a : (i == 1 ? b : c)", "asyncnn_set_scalars",
    )  # fmt: skip


def set_scalars(buffer: Any, values: tuple[float, float, float]) -> None:
    """Writes ``values`` into ``buffer`` (a float64 array of 3) on the current stream, by one
    kernel whose arguments carry them (nothing read from host memory later)."""
    _setter()(*values, buffer)


def vectorised_available(dtype_name: str) -> bool:
    """Whether the eight-at-a-time kernels build here for ``dtype_name`` (a 16-bit float)."""
    return (
        dtype_name in _HALF
        and _vectorised(_sgd_rule(False, 0, False, False), dtype_name) is not None
    )


def _vectorisable(arrays: list[Any]) -> bool:
    """One dtype, one size, contiguous, 16-byte aligned (views into an array may not be)."""
    size, dtype = arrays[0].size, arrays[0].dtype
    return all(
        a.dtype == dtype and a.flags.c_contiguous and a.size == size and a.data.ptr % 16 == 0
        for a in arrays
    )


def _apply(
    rule: _Update, arrays: list[Any], scalars: tuple[float, ...], outs: tuple[Any, ...],
    dsc: Any = None,
) -> tuple[Any, ...]:  # fmt: skip
    """Runs ``rule`` over ``arrays`` (the inputs, in ``rule.ins`` order); ``outs`` are the
    output arrays to write (empty: fresh ones); ``dsc`` the device scalars' array where
    ``rule.device`` names some. Returns the outputs as a tuple."""
    rule, arrays, scalars, summed = _with_sum(rule, arrays, scalars)
    if summed is not None:
        _state.taken.add(summed)
    p = arrays[0]
    on_device = (dsc,) if rule.device else ()
    name = str(p.dtype)
    if name in _HALF and p.size and _vectorisable(arrays + list(outs)):
        kernel = _vectorised(rule, name)
        if kernel is not None:
            if not outs:
                outs = tuple(cupy.empty_like(p) for _ in rule.outs)
            n = p.size
            blocks = min(-(-n // (_VEC * _THREADS)), 8192)
            kernel(
                (blocks,), (_THREADS,),
                (*arrays, *outs, *on_device, *(np.float64(s) for s in scalars), np.int64(n)),
            )  # fmt: skip
            return outs
    ctype = "double" if p.dtype == cupy.float64 else "float"
    result = _elementwise(rule, ctype)(*arrays, *on_device, *scalars, *outs)
    return result if isinstance(result, tuple) else (result,)


def _in_place_outs(outs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arrays an update writes over (its inputs, inside :func:`in_place`, where every one
    is given), else () for fresh outputs."""
    return outs if _in_place() and all(a is not None for a in outs) else ()


def _sgd_setup(
    step: int, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool
) -> tuple[_Update, int, tuple[float, ...], Any]:
    """The SGD rule of this step, its momentum mode (0 none, 1 first step, 2 later), its scalars
    and the device scalars' array (or None: the learning rate is an argument)."""
    mode = 0 if momentum == 0.0 else (1 if step == 0 else 2)
    dsc = getattr(_state, "scalars", None)
    rule = _sgd_rule(weight_decay != 0.0, mode, nesterov, dampening != 0.0, dsc is not None)
    scalars = (weight_decay, momentum, 1.0 - dampening)
    return rule, mode, scalars if dsc is not None else (-lr, *scalars), dsc


def _sgd_arrays(p: Any, g: Any, buf: Any, mode: int) -> tuple[list[Any], tuple[Any, ...]]:
    """A leaf's inputs to the SGD rule, and its outputs in place (empty: fresh ones)."""
    arrays = [p, g] if mode != 2 else [p, g, buf]
    return arrays, _in_place_outs((p,) if mode == 0 else (p, buf))


def sgd_leaf(
    p: Any, g: Any, buf: Any, step: int, lr: float, momentum: float, dampening: float,
    weight_decay: float, nesterov: bool,
) -> tuple[Any, tuple[Any, ...]]:  # fmt: skip
    """One leaf of torch's SGD update in one kernel: ``(new_p, (new_buffer,) or ())``. Inside
    :func:`scalars_on_device` the learning rate comes from the device (``lr`` is unread)."""
    rule, mode, scalars, dsc = _sgd_setup(step, lr, momentum, dampening, weight_decay, nesterov)
    arrays, outs = _sgd_arrays(p, g, buf, mode)
    result = _apply(rule, arrays, scalars, outs, dsc)
    return result[0], tuple(result[1:])


def sgd_many(
    ps: list[Any], gs: list[Any], bufs: list[Any] | None, step: int, lr: float,
    momentum: float, dampening: float, weight_decay: float, nesterov: bool,
) -> tuple[list[Any], list[list[Any]]] | None:  # fmt: skip
    """:func:`sgd_leaf` over every leaf, in one launch per :data:`MAX_LEAVES` leaves:
    ``(new_ps, [new_buffers])`` (no buffer list without momentum), or None where the leaves
    do not suit one kernel (see :func:`_apply_many`; then update them one by one)."""
    rule, mode, scalars, dsc = _sgd_setup(step, lr, momentum, dampening, weight_decay, nesterov)
    leaves = [
        _sgd_arrays(p, g, None if bufs is None else bufs[i], mode)
        for i, (p, g) in enumerate(zip(ps, gs, strict=True))
    ]
    return _apply_many(rule, leaves, scalars, dsc)


def _adam_setup(
    step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
    amsgrad: bool, decoupled: bool,
) -> tuple[_Update, tuple[float, ...], Any]:  # fmt: skip
    """The Adam rule of this step, its scalars and the device scalars' array (or None)."""
    beta1, beta2 = betas
    coupled = weight_decay != 0.0 and not decoupled
    dsc = getattr(_state, "scalars", None)
    # (p * 1.0 + delta equals delta + p: an AdamW with lr * weight_decay == 0 may take either)
    rule = _adam_rule(coupled, decoupled and weight_decay != 0.0, amsgrad, dsc is not None)
    scalars: tuple[float, ...] = (weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps)
    if dsc is None:
        scalars += adam_step_scalars(step, lr, betas, weight_decay, decoupled)
    return rule, scalars, dsc


def _adam_arrays(
    p: Any, g: Any, buffers: tuple[Any, ...], amsgrad: bool
) -> tuple[list[Any], tuple[Any, ...]]:
    """A leaf's inputs to the Adam rule, and its outputs in place (empty: fresh ones)."""
    arrays = [p, g, buffers[0], buffers[1]] + ([buffers[2]] if amsgrad else [])
    return arrays, _in_place_outs((p, *buffers))


def adam_leaf(
    p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float, betas: tuple[float, float],
    eps: float, weight_decay: float, amsgrad: bool, decoupled: bool,
) -> tuple[Any, tuple[Any, ...]]:  # fmt: skip
    """One leaf of torch's Adam/AdamW update in one kernel: ``(new_p, new_buffers)``; inside
    :func:`scalars_on_device` the step's scalars come from the device (``step`` and ``lr`` are
    then not read)."""
    rule, scalars, dsc = _adam_setup(step, lr, betas, eps, weight_decay, amsgrad, decoupled)
    arrays, outs = _adam_arrays(p, g, buffers, amsgrad)
    result = _apply(rule, arrays, scalars, outs, dsc)
    return result[0], tuple(result[1:])


def adam_many(
    ps: list[Any], gs: list[Any], buffers: list[list[Any]], step: int, lr: float,
    betas: tuple[float, float], eps: float, weight_decay: float, amsgrad: bool, decoupled: bool,
) -> tuple[list[Any], list[list[Any]]] | None:  # fmt: skip
    """:func:`adam_leaf` over every leaf (``buffers``: one list of leaves per state buffer), in
    one launch per :data:`MAX_LEAVES` leaves: ``(new_ps, new_buffers)``, or None where the
    leaves do not suit one kernel."""
    rule, scalars, dsc = _adam_setup(step, lr, betas, eps, weight_decay, amsgrad, decoupled)
    leaves = [
        _adam_arrays(p, g, tuple(b[i] for b in buffers), amsgrad)
        for i, (p, g) in enumerate(zip(ps, gs, strict=True))
    ]
    return _apply_many(rule, leaves, scalars, dsc)


# -- several leaves in one launch --------------------------------------------------------------
#: the most leaves one launch updates: their pointers, sizes and first blocks travel in the
#: kernel's arguments (4 KB at most); 24 leaves of Adam with amsgrad take about 2 KB
MAX_LEAVES = 24
#: the bytes of a launch's arguments its leaves may take: fewer leaves a launch for rules of many
#: arrays (an update reading a sum of 8 gradients)
_ARG_BYTES = 2400
#: the most blocks one leaf gets (its threads then stride over it)
_MAX_LEAF_BLOCKS = 4096


def _apply_many(
    rule: _Update, leaves: list[tuple[list[Any], tuple[Any, ...]]], scalars: tuple[float, ...],
    dsc: Any,
) -> tuple[list[Any], list[list[Any]]] | None:  # fmt: skip
    """Runs ``rule`` over every leaf (its inputs in ``rule.ins`` order, and its outputs to
    write, empty for fresh ones) in one launch per :data:`MAX_LEAVES` leaves: the outputs as
    ``(firsts, [seconds, ...])``. None, launching nothing, unless every array is a contiguous
    cupy array of one float dtype on the current GPU, no array is written twice, and the
    kernels build (the per-leaf kernels serve the rest; none for no leaves)."""
    if not leaves:
        return None
    summed: list[int | None] = []
    if getattr(_state, "sums", None):  # (only inside reading_sums)
        given, scalars_given = rule, scalars
        with_sums: list[tuple[list[Any], tuple[Any, ...]]] = []
        for arrays, outs in leaves:
            rule, arrays, scalars, gid = _with_sum(given, arrays, scalars_given)
            with_sums.append((arrays, outs))
            summed.append(gid)
        if len({gid is None for gid in summed}) > 1 or len({len(a) for a, _ in with_sums}) > 1:
            return None  # (some leaves read a sum, or sums of other lengths: one by one)
        leaves = with_sums
    first = leaves[0][0][0]
    dtype, device = first.dtype, first.device.id
    name = str(dtype)
    if name not in _HALF and dtype not in (cupy.float32, cupy.float64):
        return None
    if device != cupy.cuda.runtime.getDevice():  # (the launch goes to the current one)
        return None
    written = [id(o) for _, outs in leaves for o in outs]
    if len(set(written)) != len(written):  # in place, one array twice: blocks would race
        return None
    aligned = True
    for arrays, outs in leaves:
        size = arrays[0].size
        for a in (*arrays, *outs):
            if (
                type(a) is not cupy.ndarray
                or a.dtype != dtype
                or a.size != size
                or not a.flags.c_contiguous
                or a.device.id != device
            ):
                return None
            aligned = aligned and a.data.ptr % 16 == 0
    vec = _VEC if name in _HALF and aligned else 1
    per = max(1, min(MAX_LEAVES, _ARG_BYTES // (8 * (len(rule.ins) + len(rule.outs) + 2))))
    parts = [leaves[lo : lo + per] for lo in range(0, len(leaves), per)]
    kernels = [_multi(rule, name, len(part), vec) for part in parts]
    if any(k is None for k in kernels):  # before any launch: in place, none may run twice
        return None
    if summed and summed[0] is not None:
        _state.taken.update(gid for gid in summed if gid is not None)
    results: list[tuple[Any, ...]] = []
    for part, kernel in zip(parts, kernels, strict=True):
        args: list[Any] = []
        blocks = 0
        for arrays, outs in part:
            if not outs:
                outs = tuple(cupy.empty_like(arrays[0]) for _ in rule.outs)
            results.append(outs)
            n = arrays[0].size
            args += [*arrays, *outs, np.int64(n), np.int32(blocks)]
            blocks += min(-(-n // (vec * _THREADS)), _MAX_LEAF_BLOCKS)
        args.append(np.int32(blocks))
        if rule.device:
            args.append(dsc)
        args += [np.float64(s) for s in scalars]
        if blocks:
            kernel((blocks,), (_THREADS,), tuple(args))
    return [r[0] for r in results], [[r[i] for r in results] for i in range(1, len(rule.outs))]
