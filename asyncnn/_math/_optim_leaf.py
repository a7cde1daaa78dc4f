"""How one leaf's update runs, beside its arithmetic (see ``_optim``): on fresh output arrays,
through the backend's fused kernels where it has them (several leaves at once, or one), with
numpy's warnings on non-finite values silenced as torch has none, and a 16-bit leaf in float32
(its buffers kept in float32 too where the optimizer says so: Adam's moments of float16).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..backends import array_namespace as ns
from ..backends import backend_of, current_team, is_half

if TYPE_CHECKING:
    from ._optim import Optimizer


def _fresh(xp: Any, ufunc: Any, a: Any, b: Any) -> Any:
    if type(a) is np.ndarray and a.ndim:
        # out= costs an allocation call more on every small leaf, and the result is a fresh
        # array of a's dtype already: b is a Python float or an array of a's dtype (numpy 1's
        # value-based casting may widen a float too large for a's dtype: then as below)
        out = ufunc(a, b)
        if out.dtype is a.dtype:
            return out
    # out= keeps 0-d results arrays: numpy ufuncs otherwise return scalars for 0-d inputs
    return ufunc(a, b, out=xp.empty_like(a))


def _with_decay(xp: Any, p: Any, g: Any, weight_decay: float) -> Any:
    """``g + weight_decay * p`` in a fresh array, torch's L2 (coupled) weight decay; ``g``
    itself where ``weight_decay`` is 0."""
    if weight_decay == 0.0:
        return g
    decayed = _fresh(xp, xp.multiply, p, weight_decay)
    decayed += g
    return decayed


def _many_kernels(opt: Optimizer, cls: type[Optimizer], ps: list[Any]) -> Any:
    """The fused kernels' module for updating the leaves ``ps`` at once, or None: numpy leaves
    (no fused kernels), a subclass with its own :meth:`~Optimizer.update_leaf`, which the
    built-in kernels would skip, or a leaf whose buffers the optimizer keeps in another dtype
    (float32 moments of a float16 leaf)."""
    if not ps or type(ps[0]) is np.ndarray or type(opt).update_leaf is not cls.update_leaf:
        return None
    if any(opt._state_dtype(p.dtype) != p.dtype for p in ps):
        # a float16 leaf whose buffers are float32 (Adam's): the kernels take one type for all
        # arrays, so :meth:`~BuiltinLeafUpdate.update_leaf` widens it leaf by leaf
        return None
    return backend_of(ps[0]).fused_kernels()


def _numpy_many(
    opt: Optimizer,
    cls: type[Optimizer],
    ps: list[Any],
    gs: list[Any],
    buffers: list[list[Any]],
    step: int,
    lr: float,
) -> tuple[list[Any], list[list[Any]]] | None:
    """Every leaf's update where each leaf and gradient is a numpy array, no leaf a 16-bit float
    (computed in float32 leaf by leaf), and the compute team current on this thread (if any)
    cuts none of them by rows: the array code of ``cls`` leaf by leaf, under one error state.
    ``(new_ps, new_buffers)``, else None (one leaf at a time then). The same arithmetic as
    :meth:`~Optimizer.update_leaf`; the leaf-by-leaf path looks for a team and sets the error
    state at every leaf."""
    kind = type(opt)
    if kind.update_leaf is not cls.update_leaf or kind._update_leaf is not cls._update_leaf:
        return None  # (a subclass's own step, which the leaf-by-leaf path calls)
    team = current_team()
    for i, p in enumerate(ps):  # (ps, gs and each buffer: leaves of one tree, as long)
        g = gs[i]
        if type(p) is not np.ndarray or type(g) is not np.ndarray:
            return None
        if p.dtype.itemsize == 2 and is_half(p.dtype):
            return None
        if team is not None:
            bs = tuple([b[i] for b in buffers])
            if opt._team_cut(team, p, g, bs) is not None:
                return None
    update = opt._update_array  # type: ignore[attr-defined]
    new_ps: list[Any] = []
    with _silent_non_finite():
        if not buffers:  # (plain SGD: no state but the step count)
            for p, g in zip(ps, gs, strict=True):
                new_ps.append(update(np, p, g, (), step, lr)[0])
            return new_ps, []
        new_bufs: list[list[Any]] = [[] for _ in buffers]
        for i, p in enumerate(ps):
            new_p, new_bs = update(np, p, gs[i], tuple([b[i] for b in buffers]), step, lr)
            new_ps.append(new_p)
            for out, b in zip(new_bufs, new_bs, strict=True):
                out.append(b)
    return new_ps, new_bufs


def _leaf_ops(p: Any, g: Any) -> tuple[Any, Any]:
    """The array namespace of a leaf and its gradient, and their backend's fused kernels (None
    where it has none)."""
    if type(p) is np.ndarray and type(g) is np.ndarray:
        return np, None  # numpy has no fused kernels: the array code is its fast path
    return ns(p, g), backend_of(p, g).fused_kernels()


def _silent_non_finite() -> Any:
    """numpy's error state for an update's arithmetic: an inf or NaN gradient (or a square
    that overflows) goes through as in torch, ``inf - inf`` and ``inf / inf`` giving NaN, with
    no RuntimeWarning per leaf and update (a run that must stop on it checks the gradients,
    ``check_finite``). numpy's error state is per thread, so each leaf's update sets it where it
    runs (a team's thread included)."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def _in_float32(
    update: Callable[..., tuple[Any, tuple[Any, ...]]],
    opt: Optimizer,
    p: Any,
    g: Any,
    buffers: tuple[Any, ...],
    step: int,
    lr: float,
) -> tuple[Any, tuple[Any, ...]]:
    """A 16-bit leaf's ``update`` (a class's own ``update_leaf``) as the GPU kernels compute it:
    in float32 from the leaf's values, the new parameter rounded once to its dtype, and each new
    buffer to the dtype the optimizer keeps it in (``opt._state_dtype``: the parameter's, or
    float32 for Adam's moments of a float16 leaf). (In 16 bits numpy rounds every intermediate,
    and every hyperparameter: Adam's eps=1e-8 is 0 in float16, so a second moment that
    underflows to 0 divides by 0; its beta2=0.999 is 1 in bfloat16.) Buffers of float32 already
    are read as they are: ``update`` writes into none of its inputs (but inside the fused
    kernels' ``in_place``, where writing over the state's buffers is what is asked)."""
    f32 = np.float32
    keep = opt._state_dtype(p.dtype)
    new_p, new_buffers = update(
        opt,
        p.astype(f32),
        g.astype(f32),
        tuple(b.astype(f32, copy=False) for b in buffers),
        step,
        lr,
    )
    return new_p.astype(p.dtype), tuple(b.astype(keep, copy=False) for b in new_buffers)


class BuiltinLeafUpdate:
    """The shape of the built-in optimizers' :meth:`~Optimizer.update_leaf` (SGD's, Adam's),
    placed before ``Optimizer`` among their bases: one kernel per leaf where the backend has
    fused kernels (:meth:`_fused_leaf`), else the array code (:meth:`_update_array`) under one
    error state, a 16-bit leaf in float32 (:func:`_in_float32`), as is a float16 leaf whose
    buffers are float32 (Adam's moments) on any backend.

    A class whose update the backends have no kernel for (RMSprop, Adagrad) sets
    :attr:`_fused_update` False: its array code then runs on every backend's arrays (cupy's
    too, one operation per launch), and a GPU run leaves its update out of the CUDA graphs it
    captures (updated eagerly, as an optimizer of one's own is)."""

    #: (:meth:`Optimizer._state_dtype`, which the class this is mixed into has)
    _state_dtype: Callable[[Any], Any]

    #: whether the backends' fused kernels have this update (:meth:`_fused_leaf`)
    _fused_update: ClassVar[bool] = True

    def update_leaf(
        self, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        xp, fused = _leaf_ops(p, g)
        # one kernel per leaf (cupy), the same arithmetic; but a kernel takes one type for all
        # of its arrays: a float16 leaf whose buffers are float32 (Adam's) goes the CPU's way,
        # the float32 kernel on its widened copies (which, unlike the array code, reads a
        # captured update's step scalars from the device)
        if fused is not None and self._fused_update and self._state_dtype(p.dtype) == p.dtype:
            return self._fused_leaf(fused, p, g, buffers, step, lr)
        with _silent_non_finite():
            if p.dtype.itemsize == 2 and is_half(p.dtype):
                # (this update's own arithmetic, not a subclass's update_leaf around it)
                update = BuiltinLeafUpdate.update_leaf
                return _in_float32(update, self, p, g, buffers, step, lr)  # type: ignore[arg-type]
            return self._update_array(xp, p, g, buffers, step, lr)

    def _fused_leaf(
        self, fused: Any, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        """:meth:`update_leaf` on the backend's fused kernels (``fused``): one kernel."""
        raise NotImplementedError

    def _update_array(
        self, xp: Any, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        """:meth:`update_leaf`'s arithmetic on one float32 or float64 leaf of ``xp``."""
        raise NotImplementedError
