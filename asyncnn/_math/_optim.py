"""Functional optimizers with torch.optim semantics: SGD here, Adam and AdamW (``_optim_adam``),
RMSprop and Adagrad (``_optim_rms``).

An optimizer is a frozen record of hyperparameters. ``state = opt.init(params)`` makes its state,
``params, state = opt.update(params, grads, state)`` returns new parameters and a new state and
never writes into ``params``, ``grads`` or the old state: callers keep old parameter versions
(weight stashing) and old states (replay) by reference.

The state is a dict: ``"step"`` (a Python int, the number of updates done) and one pytree per
buffer, shaped like the parameters (``"momentum_buffer"``; ``"exp_avg"``, ``"exp_avg_sq"``,
``"max_exp_avg_sq"``; ``"square_avg"``, ``"grad_avg"``; ``"sum"``: torch's names), so it can be
checkpointed like the parameters.

Every update allocates its outputs and then works in place on those fresh arrays only, with at
most one scratch array per leaf. Hyperparameters are Python floats, which never promote an array's
dtype: float32 parameters stay float32. A 16-bit leaf (float16, bfloat16) is updated in float32
and each result rounded once to 16 bits, as the GPU kernels do: in 16-bit arithmetic Adam's
``eps=1e-8`` would be 0 in float16 and its ``beta2=0.999`` 1 in bfloat16. The buffers keep the
parameter's dtype, but for Adam's and AdamW's moments of a float16 parameter, which are float32
(as AMP, apex and DeepSpeed keep them): ``(1 - beta2) * g**2`` underflows float16 for ``|g|``
below about 5e-3, and a second moment stored as 0 made the next step with a small or no gradient
(an embedding row not in the batch) ``lr * m / eps``, up to ``1e5 * lr``; so are all of
RMSprop's and Adagrad's buffers of a float16 parameter, whose squares underflow alike. bfloat16
has float32's range, and keeps its moments in bfloat16, as torch does.

Against torch.optim (CPU, float64 or float32) the updates agree to rounding, not bit for bit:
torch's kernels fuse multiply-adds (``add(alpha=)``, ``lerp``, which Adam uses for its first
moment) and compute ``addcdiv`` as ``p + (value * m) / d``; here each operation rounds (numpy
has no fused multiply-add) in the order of the formulas in each docstring, which the GPU kernels
repeat exactly. One step differs by a few units in the last place of its largest term. An inf or
NaN gradient goes through as in torch (``inf - inf`` and ``inf / inf`` are NaN), silently: no
numpy RuntimeWarning comes from an update.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends import array_namespace as ns
from ..backends import current_team
from ._optim_checks import (
    _check_buffer,
    _check_clip_norm,
    _check_grads,
    _check_params,
    _non_negative,
    _not_a_float_array,
)
from ._optim_leaf import (
    BuiltinLeafUpdate,
    _fresh,
    _many_kernels,
    _numpy_many,
)
from ._pytree import tree_flatten, tree_unflatten
from ._schedules import (
    Schedule,
    check_dataclass,
    check_lr,
)

__all__ = ["SGD", "Optimizer", "clip_grad_norm", "keeps_base_state", "state_dtype"]

State = dict[str, Any]


def clip_grad_norm(grads: Any, max_norm: float) -> tuple[Any, Any]:
    """Scales a pytree of gradients so that their global L2 norm is at most ``max_norm``.

    torch.nn.utils.clip_grad_norm_ semantics: ``total_norm`` is the L2 norm of all leaves taken
    together, and every leaf is multiplied by ``min(1, max_norm / (total_norm + 1e-6))``. The
    gradients are not modified: new arrays are returned. As torch's default
    (``error_if_nonfinite=False``), non-finite gradients raise (and warn) nothing: a NaN makes
    every clipped leaf NaN, an infinity turns itself into NaN and every other entry into 0; check
    ``total_norm`` to skip such a step. The squares are summed in float32 at least (16-bit
    leaves are widened first, as torch's norm accumulates them), in float64 if a leaf is.

    Args:
        grads: a pytree of float arrays.
        max_norm: the largest norm allowed (>= 0).

    Returns:
        ``(clipped_grads, total_norm)``; ``total_norm`` is a 0-d array on the gradients' device
        (the norm before clipping), so that clipping never waits for a GPU.

    Raises:
        TypeError: for a leaf that is not a float array (an int array would be scaled to 0).
    """
    bound = _non_negative("clip_grad_norm", "max_norm", max_norm)
    leaves, treedef = tree_flatten(grads)
    if not leaves:
        return grads, ns().asarray(0.0, dtype="float32")
    for i, g in enumerate(leaves):
        wrong = _not_a_float_array(g)
        if wrong is not None:
            raise TypeError(f"clip_grad_norm: gradient leaf {i} of {treedef!r} {wrong}")
    xp = ns(*leaves)
    # by dtype, not by leaf: result_type takes at most 64 arguments
    dtype = xp.result_type(*{g.dtype for g in leaves}, xp.float32)
    total_sq = xp.zeros((), dtype=dtype)
    # numpy warns where a norm overflows or an infinity times 0 gives NaN; torch does not
    with np.errstate(over="ignore", invalid="ignore"):
        for g in leaves:
            flat = g.reshape(-1)
            if flat.dtype != dtype:  # a float16 dot sums in float16: 256 ones of 16 overflow
                flat = flat.astype(dtype)
            total_sq += xp.dot(flat, flat)
        total_norm = xp.asarray(xp.sqrt(total_sq))
        scale = xp.minimum(bound / (total_norm + 1e-6), 1.0)
        clipped = [_fresh(xp, xp.multiply, g, scale.astype(g.dtype)) for g in leaves]
    return tree_unflatten(treedef, clipped), total_norm


class Optimizer(abc.ABC):
    """Base of the functional optimizers: validation, flattening, clipping and the step count.

    A subclass is a frozen dataclass with fields ``lr`` and ``clip_norm`` among its
    hyperparameters; it names its state buffers in :meth:`buffer_names` and updates one leaf in
    :meth:`update_leaf`. :meth:`init` and :meth:`update` may also be overridden whole. One
    that is not a frozen dataclass is refused by :meth:`init` and :meth:`to_spec`, and one
    without ``lr`` or ``clip_norm`` by :meth:`init`.

    A class that defines its own :meth:`update_leaf` is taken as not elementwise
    (:attr:`elementwise_update` ``False``, whatever it inherits): each of its leaves is updated
    whole, never cut by rows over a compute team, so an update that looks at the whole leaf (a
    LARS or LAMB trust ratio, a per-tensor norm) sees all of it. One whose update is elementwise
    says so in its own class body, ``elementwise_update = True``, to be cut again.

    Example:
        >>> @dataclass(frozen=True)
        ... class LARS(optim.SGD):  # elementwise_update is False: leaves updated whole
        ...     def update_leaf(self, p, g, buffers, step, lr):
        ...         trust = float(np.linalg.norm(p) / (np.linalg.norm(g) + 1e-12))
        ...         return super().update_leaf(p, g, buffers, step, lr * trust)
    """

    lr: float | Schedule
    clip_norm: float | None

    #: whether :meth:`update_leaf` is elementwise (each element's new value depends only on that
    #: element of the parameter, gradient and buffers): then a large CPU leaf's update is cut by
    #: rows over the compute team, each element computed exactly as whole (bit-identical).
    #: Set to False for a class whose ``update_leaf`` comes from a class (its own body, or a
    #: mixin before its parents) that does not say so itself.
    elementwise_update = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # an update_leaf other than the one a class declared elementwise (the class's own, or a
        # mixin's: class LARS(TrustRatio, optim.SGD)) is not known to be: cut by rows, a
        # whole-leaf quantity (a trust ratio, a norm) would be computed per part
        mro = cls.__mro__
        leaf = next(i for i, k in enumerate(mro) if "update_leaf" in vars(k))
        said = next((i for i, k in enumerate(mro) if "elementwise_update" in vars(k)), len(mro))
        if leaf < said:
            cls.elementwise_update = False

    @abc.abstractmethod
    def buffer_names(self) -> tuple[str, ...]:
        """The per-parameter state buffers, each a pytree shaped like the parameters."""

    @abc.abstractmethod
    def update_leaf(
        self, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        """One parameter's update: new ``p`` and new buffers, never writing into the old ones.

        ``step`` is the number of updates done before this one; ``lr`` the rate for this one.
        """

    def init(self, params: Any) -> State:
        """The state before the first update: step 0 and zero buffers shaped like ``params``
        (Adagrad's ``sum`` filled with its ``initial_accumulator_value``), each in its
        parameter's dtype (float32 for the buffers of a float16 one in Adam, AdamW, RMSprop and
        Adagrad).

        Raises:
            TypeError: a leaf of ``params`` that is not a float array (as :meth:`update`
                refuses it), or this optimizer, or its schedule, not a frozen dataclass, or this
                optimizer without the field ``lr`` or ``clip_norm``.
        """
        # a run makes its states when it opens: refused here, not at save or trace= after a fit
        check_dataclass(self, "Optimizer")
        for field, example in (
            ("lr", "lr: float = 1e-3"),
            ("clip_norm", "clip_norm: float | None = None"),
        ):
            if not hasattr(self, field):  # (update reads both: it failed at the first update)
                raise TypeError(
                    f"{type(self).__name__} subclasses optim.Optimizer but has no field "
                    f"{field!r}, which every update reads; add it ({example})"
                )
        if isinstance(self.lr, Schedule):
            check_dataclass(self.lr, "Schedule")
        leaves, treedef = tree_flatten(params)
        _check_params(type(self).__name__, leaves, treedef)
        state: State = {"step": 0}
        dtypes = [self._state_dtype(p.dtype) for p in leaves]
        for name in self.buffer_names():
            start = self._buffer_start(name)
            if start != 0.0:
                made = [
                    ns(p).full_like(p, start, dtype=d) for p, d in zip(leaves, dtypes, strict=True)
                ]
            else:
                made = [
                    ns(p).zeros_like(p) if d == p.dtype else ns(p).zeros_like(p, dtype=d)
                    for p, d in zip(leaves, dtypes, strict=True)
                ]
            state[name] = tree_unflatten(treedef, made)
        return state

    def _buffer_start(self, name: str) -> float:
        """The value :meth:`init` fills the buffer ``name`` with: 0 (Adagrad's ``sum`` starts
        at its ``initial_accumulator_value``)."""
        return 0.0

    def _state_dtype(self, dtype: Any) -> Any:
        """The dtype :meth:`init` makes the buffers of a parameter of ``dtype`` in, which
        :meth:`update` keeps them in: ``dtype`` itself (Adam's moments of a float16 parameter
        are float32). :meth:`update` takes a buffer of ``dtype`` too."""
        return dtype

    def learning_rate(self, step: int) -> float:
        """The learning rate of the update that follows ``step`` updates.

        Raises:
            ValueError: where the schedule gives a negative or NaN rate for this step.
        """
        if not isinstance(self.lr, Schedule):
            return self.lr
        lr = float(self.lr(step))
        if not lr >= 0.0:  # written so that NaN fails too
            raise ValueError(
                f"{type(self).__name__}: the schedule {self.lr!r} gave the learning rate {lr!r} "
                f"for step {step}; a learning rate must be >= 0 (clamp it in the schedule)"
            )
        return lr

    def update(self, params: Any, grads: Any, state: State) -> tuple[Any, State]:
        """Applies one update.

        Args:
            params: a pytree of arrays.
            grads: a pytree of the same structure, shapes and dtypes.
            state: the state from :meth:`init` or the previous update.

        Returns:
            ``(new_params, new_state)``, all new arrays.
        """
        name = type(self).__name__
        p_leaves, treedef = tree_flatten(params)
        g_leaves, g_def = tree_flatten(grads)
        if g_def != treedef:
            raise ValueError(
                f"{name}.update: grads have structure {g_def!r}, params have {treedef!r}"
            )
        _check_grads(p_leaves, g_leaves, treedef)
        buffer_names = self.buffer_names()
        if (
            not isinstance(state, dict)
            or len(state) != 1 + len(buffer_names)
            or "step" not in state
            or any(b not in state for b in buffer_names)
        ):
            expected = {"step", *buffer_names}
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"{name}.update: state must be a dict with keys {sorted(expected)}, as made by "
                f"{name}.init(params) with the same options; got {found}"
            )
        step = state["step"]
        if (
            type(step) is not int
            and (isinstance(step, bool) or not isinstance(step, numbers.Integral))
        ) or step < 0:
            raise ValueError(f"{name}.update: state['step'] must be an int >= 0, got {step!r}")
        step = int(step)
        buffers = []
        for buf_name in buffer_names:
            buf_leaves, buf_def = tree_flatten(state[buf_name])
            if buf_def != treedef:
                raise ValueError(
                    f"{name}.update: state[{buf_name!r}] has structure {buf_def!r}, params have "
                    f"{treedef!r}; was the state made for other parameters?"
                )
            _check_buffer(name, buf_name, p_leaves, buf_leaves, treedef, self._state_dtype)
            buffers.append(buf_leaves)
        if self.clip_norm is not None:
            clipped, _ = clip_grad_norm(g_leaves, self.clip_norm)
            g_leaves = clipped
        lr = self.learning_rate(step)
        many = self._update_many(p_leaves, g_leaves, buffers, step, lr)
        if many is not None:
            new_p, new_bufs = many
        else:
            new_p, new_bufs = [], [[] for _ in buffer_names]
            for i, (p, g) in enumerate(zip(p_leaves, g_leaves, strict=True)):
                p2, bufs2 = self._update_leaf(
                    p, g, tuple(b[i] for b in buffers) if buffers else (), step, lr
                )
                new_p.append(p2)
                for out, b in zip(new_bufs, bufs2, strict=True):
                    out.append(b)
        new_state: State = {"step": step + 1}
        for buf_name, leaves in zip(buffer_names, new_bufs, strict=True):
            new_state[buf_name] = tree_unflatten(treedef, leaves)
        return tree_unflatten(treedef, new_p), new_state

    def _update_many(
        self, ps: list[Any], gs: list[Any], buffers: list[list[Any]], step: int, lr: float
    ) -> tuple[list[Any], list[list[Any]]] | None:
        """Every leaf's update at once (``(new_ps, new_buffers)``) where the leaves' backend has
        a kernel for several leaves and :meth:`update_leaf` is this class's own; None for one
        leaf at a time."""
        return None

    def _update_leaf(
        self, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        """:meth:`update_leaf`, cut by rows over this thread's compute team where the update is
        elementwise and the leaf large (numpy float32/float64 arrays only)."""
        team = current_team()
        bounds = None if team is None else self._team_cut(team, p, g, buffers)
        if team is None or bounds is None:
            return self.update_leaf(p, g, buffers, step, lr)
        new_p = np.empty_like(p)
        new_bufs = tuple(np.empty_like(b) for b in buffers)

        def rows(lo: int, hi: int) -> None:
            part, part_bufs = self.update_leaf(
                p[lo:hi], g[lo:hi], tuple(b[lo:hi] for b in buffers), step, lr
            )
            new_p[lo:hi] = part
            for out, b in zip(new_bufs, part_bufs, strict=True):
                out[lo:hi] = b

        team.run_parts(lambda i: rows(bounds[i], bounds[i + 1]), len(bounds) - 1)
        return new_p, new_bufs

    def _team_cut(
        self, team: Any, p: Any, g: Any, buffers: tuple[Any, ...]
    ) -> tuple[int, ...] | None:
        """The rows ``team`` cuts this leaf's update at (:meth:`_update_leaf`), or None where
        it runs whole: small, not elementwise, or not numpy float32/float64 arrays of one
        shape."""
        arrays = (p, g, *buffers)
        if (
            # a pass touching fewer elements is never cut (ComputeTeam.row_bounds), and most
            # leaves of small layers are that small: asked first, it spares them the rest
            getattr(p, "size", 0) * len(arrays) < 2 * team.part_elements
            or not self.elementwise_update
            or not all(type(a) is np.ndarray and a.shape == p.shape for a in arrays)
            or p.ndim == 0
            or p.dtype not in (np.float32, np.float64)
        ):
            return None
        bounds = team.row_bounds(p.shape[0], p.size * len(arrays))
        return bounds if len(bounds) > 2 else None

    def to_spec(self) -> dict[str, Any]:
        """A plain dict (msgpack-able) of the name and hyperparameters; see :func:`from_spec`.

        Raises:
            TypeError: this optimizer is not a dataclass.
        """
        check_dataclass(self, "Optimizer")
        cls = type(self)
        from ._optim_spec import BUILTINS  # (which imports this module)

        spec: dict[str, Any] = {
            "name": cls.__name__
            if BUILTINS.get(cls.__name__) is cls
            else f"{cls.__module__}:{cls.__qualname__}"
        }
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, Schedule):
                value = value.to_spec()
            elif isinstance(value, tuple):
                value = list(value)
            spec[field.name] = value
        return spec


@dataclass(frozen=True)
class SGD(BuiltinLeafUpdate, Optimizer):
    """Stochastic gradient descent with momentum, as torch.optim.SGD.

    With ``d = g + weight_decay * p``: the momentum buffer starts as ``d`` (no dampening on the
    first update), then ``b = momentum * b + (1 - dampening) * d``; the step is ``b``, or
    ``d + momentum * b`` with ``nesterov``; ``p = p - lr * step``.

    Args:
        lr: learning rate, a float or a :class:`Schedule` (default 0.1; torch's is 1e-3).
        momentum: momentum factor (0 for none).
        dampening: dampening of the momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        clip_norm: if set, gradients are clipped to this global norm before the update: the
            norm of the whole tree ``update`` is given, which in a run is one layer's (each
            layer actor updates its own parameters), not the model's.
    """

    lr: float | Schedule = 0.1
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    clip_norm: float | None = None
    elementwise_update = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", check_lr("SGD", self.lr))
        for name in ("momentum", "dampening", "weight_decay"):
            object.__setattr__(self, name, _non_negative("SGD", name, getattr(self, name)))
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"SGD: nesterov must be a bool, got {self.nesterov!r}")
        if self.nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise ValueError(
                "SGD: Nesterov momentum requires a momentum and zero dampening, got "
                f"momentum={self.momentum}, dampening={self.dampening}"
            )
        object.__setattr__(self, "clip_norm", _check_clip_norm("SGD", self.clip_norm))

    def buffer_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum != 0.0 else ()

    def _update_many(
        self, ps: list[Any], gs: list[Any], buffers: list[list[Any]], step: int, lr: float
    ) -> tuple[list[Any], list[list[Any]]] | None:
        fused = _many_kernels(self, SGD, ps)
        if fused is None:
            return _numpy_many(self, SGD, ps, gs, buffers, step, lr)
        return fused.sgd_many(
            ps, gs, buffers[0] if buffers else None, step, lr, self.momentum, self.dampening,
            self.weight_decay, self.nesterov,
        )  # fmt: skip

    def _fused_leaf(
        self, fused: Any, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        buf = buffers[0] if buffers else None
        return fused.sgd_leaf(
            p, g, buf, step, lr, self.momentum, self.dampening, self.weight_decay, self.nesterov
        )

    def _update_array(
        self, xp: Any, p: Any, g: Any, buffers: tuple[Any, ...], step: int, lr: float
    ) -> tuple[Any, tuple[Any, ...]]:
        """:meth:`update_leaf`'s arithmetic on one float32 or float64 leaf of ``xp``."""
        d, d_is_ours = g, False
        if self.weight_decay != 0.0:
            d = _fresh(xp, xp.multiply, p, self.weight_decay)
            d += g
            d_is_ours = True
        if self.momentum == 0.0:
            if not d_is_ours:
                d = _fresh(xp, xp.multiply, g, -lr)
            else:
                d *= -lr
            d += p
            return d, ()
        if step == 0:
            # torch starts the buffer as a copy of the first step, undamped
            buf = d if d_is_ours else d.copy()
        else:
            buf = _fresh(xp, xp.multiply, buffers[0], self.momentum)
            if self.dampening == 0.0:
                buf += d
            elif d_is_ours:  # dampening excludes nesterov, so d is not needed after this
                d *= 1.0 - self.dampening
                buf += d
            else:
                buf += _fresh(xp, xp.multiply, d, 1.0 - self.dampening)
        if self.nesterov:
            new = _fresh(xp, xp.multiply, buf, self.momentum)
            new += d
            new *= -lr
        else:
            new = _fresh(xp, xp.multiply, buf, -lr)
        new += p
        return new, (buf,)


def state_dtype(optimizer: Any, dtype: Any) -> Any:
    """The dtype in which ``optimizer.init`` makes (and ``update`` keeps) the state buffers of a
    parameter of ``dtype``, for an optimizer whose state has :meth:`Optimizer.init`'s layout
    (:func:`keeps_base_state`): float32 for the buffers of a float16 parameter in Adam, AdamW,
    RMSprop and Adagrad, else ``dtype``. A state cast to a run's dtype casts its buffers to this
    one: cast to float16, small second moments would become 0 (they are taken, and widened
    again, but not restored).
    """
    if not keeps_base_state(optimizer):
        return dtype
    return optimizer._state_dtype(np.dtype(dtype))


def keeps_base_state(optimizer: Any) -> bool:
    """Whether ``optimizer``'s state has :meth:`Optimizer.init`'s layout (a ``step`` count and
    its :meth:`~Optimizer.buffer_names`), which :meth:`Optimizer.update` checks: an
    ``asyncnn.optim`` optimizer whose ``init`` and ``update`` are the base's. Another one's
    update checks its own state."""
    cls = type(optimizer)
    return isinstance(optimizer, Optimizer) and (cls.init, cls.update) == (
        Optimizer.init,
        Optimizer.update,
    )
