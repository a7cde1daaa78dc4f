"""Tracing reverse-mode autodiff.

``vjp`` wraps the floating-point leaves of its arguments in :class:`Tracer` objects that belong to a
fresh :class:`Trace`. Every primitive applied to a tracer appends one node to that trace (its VJP
rule, the residuals the rule needs, and which earlier nodes it read), so the nodes are already in
topological order: the pullback walks them backwards once, freeing each node's residuals as soon as
its rule has run. Calls on raw arrays never touch a trace and cost one forward computation only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ._autodiff_args import (
    _CONTAINERS,
    CheckedForward,
    CheckedRule,
    _complex_leaf,
    _cotangent_leaves,
    _hides,
    _is_complex,
    _is_differentiable,
    _mixed_devices,
    _unopened,
)
from ._pytree import _LEAF, tree_flatten, tree_unflatten

__all__ = ["Primitive", "Trace", "Tracer", "primitive_vjp", "vjp"]

# A forward rule returns (output, residuals); a VJP rule maps (cotangent, residuals, needs) to one
# gradient (or None) per positional argument. ``needs[i]`` says whether argument i is traced, so
# expensive rules (matmul, conv) can skip gradients nobody asked for.
Forward = Callable[..., tuple[Any, Any]]
VjpRule = Callable[[Any, Any, tuple[bool, ...]], Sequence[Any]]


class _Node:
    __slots__ = ("rule", "res", "parents", "needs")

    def __init__(
        self, rule: VjpRule | None, res: Any, parents: tuple[int, ...], needs: tuple[bool, ...]
    ) -> None:
        self.rule = rule
        self.res = res
        self.parents = parents
        self.needs = needs


#: the node of every input leaf (no rule, nothing kept): one shared object, never changed
_LEAF_NODE = _Node(None, None, (), ())


class Trace:
    """The record of one differentiated call: a list of nodes in execution order."""

    __slots__ = ("nodes", "done")

    def __init__(self) -> None:
        self.nodes: list[_Node | None] = []
        self.done = False

    def leaf(self, value: Any) -> Tracer:
        self.nodes.append(_LEAF_NODE)
        return Tracer(value, self, len(self.nodes) - 1)

    def record(
        self, rule: VjpRule, res: Any, parents: tuple[int, ...], needs: tuple[bool, ...], out: Any
    ) -> Tracer:
        if self.done:
            raise RuntimeError(
                "this traced array belongs to a vjp whose pullback has already run; "
                "compute with it inside the function passed to vjp"
            )
        self.nodes.append(_Node(rule, res, parents, needs))
        return Tracer(out, self, len(self.nodes) - 1)

    def backward(self, seeds: dict[int, Any], wanted: Sequence[int]) -> list[Any]:
        """Propagates cotangents ``seeds`` (node -> cotangent) back to the ``wanted`` nodes,
        which are input leaves (a node with a rule drops its cotangent once its rule has run)."""
        if self.done:
            raise RuntimeError(
                "this pullback has already been called: a pullback is usable once and frees its "
                "residuals; call vjp again to differentiate again"
            )
        self.done = True
        nodes = self.nodes
        grads: list[Any] = [None] * len(nodes)
        for i, ct in seeds.items():
            grads[i] = ct
        # Only leaves are wanted, and a leaf has no rule: each node with a rule drops its own
        # cotangent once it has run (and its residuals), so memory falls as the walk goes.
        for i in range(len(nodes) - 1, -1, -1):
            node = nodes[i]
            if node is None:
                continue
            rule = node.rule
            if rule is None:
                continue
            nodes[i] = None
            g = grads[i]
            if g is None:
                continue
            grads[i] = None
            for p, ig in zip(node.parents, rule(g, node.res, node.needs), strict=True):
                if p >= 0 and ig is not None:
                    prev = grads[p]
                    grads[p] = ig if prev is None else prev + ig
        return [grads[i] for i in wanted]


class Primitive:
    """A differentiable operation: a forward rule and a VJP rule.

    Calling a primitive on raw arrays runs the forward rule and returns its output; calling it
    with traced arrays also records the node needed to differentiate it.

    The rules of a primitive made here are checked on every call: the forward must return
    ``(output, residuals)`` with one output (an array or a number, not a tuple, list or dict),
    and the VJP rule a tuple (or list) of one gradient (or None) per positional argument, each
    of its argument's shape, and of its dtype for a floating argument. A rule that does not
    fails with a ``ValueError`` (a ``RuleError``) naming the primitive (the library's own
    primitives are made unchecked).
    """

    __slots__ = ("name", "forward", "vjp_rule")

    def __init__(self, name: str, forward: Forward, vjp_rule: VjpRule) -> None:
        self.name = name
        self.forward: Forward = CheckedForward(name, forward)
        self.vjp_rule: VjpRule = CheckedRule(name, vjp_rule)

    @classmethod
    def _builtin(cls, name: str, forward: Forward, vjp_rule: VjpRule) -> Primitive:
        """A primitive of the library's own rules, tested: not checked on each call (every op
        of every traced layer comes through them)."""
        prim = cls.__new__(cls)
        prim.name = name
        prim.forward = forward
        prim.vjp_rule = vjp_rule
        return prim

    def __repr__(self) -> str:
        return f"Primitive({self.name!r})"

    def __call__(self, *args: Any, **params: Any) -> Any:
        # Every op of every traced layer comes through here: one and two arguments (tanh, add,
        # matmul) take a short path, the general loop below is for the others.
        try:
            n = len(args)
            if n == 1:
                a = args[0]
                if type(a) is not Tracer:
                    return self.forward(a, **params)[0]
                out, res = self.forward(a.value, **params)
                return a.trace.record(self.vjp_rule, res, (a.index,), _TRACED, out)
            if n == 2:
                a, b = args
                if type(a) is Tracer:
                    if type(b) is Tracer:
                        if b.trace is not a.trace:
                            raise self._two_traces()
                        out, res = self.forward(a.value, b.value, **params)
                        parents: tuple[int, ...] = (a.index, b.index)
                        return a.trace.record(self.vjp_rule, res, parents, _BOTH_TRACED, out)
                    out, res = self.forward(a.value, b, **params)
                    return a.trace.record(self.vjp_rule, res, (a.index, -1), _FIRST_TRACED, out)
                if type(b) is Tracer:
                    out, res = self.forward(a, b.value, **params)
                    return b.trace.record(self.vjp_rule, res, (-1, b.index), _SECOND_TRACED, out)
                return self.forward(a, b, **params)[0]
            trace: Trace | None = None
            for a in args:
                if type(a) is Tracer:
                    trace = a.trace
                    break
            if trace is None:
                return self.forward(*args, **params)[0]
            values = []
            indices = []
            needs = []
            for a in args:
                if type(a) is Tracer:
                    if a.trace is not trace:
                        raise self._two_traces()
                    values.append(a.value)
                    indices.append(a.index)
                    needs.append(True)
                else:
                    values.append(a)
                    indices.append(-1)
                    needs.append(False)
            out, res = self.forward(*values, **params)
            return trace.record(self.vjp_rule, res, tuple(indices), tuple(needs), out)
        except (TypeError, ValueError) as exc:
            # (only once the op failed: cupy refuses a host operand with a bare TypeError)
            values = [a.value if type(a) is Tracer else a for a in args]
            mixed = _mixed_devices(self.name, values, params)
            if mixed is None:
                raise
            raise mixed from exc

    def _two_traces(self) -> ValueError:
        return ValueError(
            f"{self.name}: its inputs come from two different vjp calls; nested "
            "differentiation is not supported, pass every array you differentiate "
            "as an argument of the outermost vjp"
        )


# the ``needs`` of the short paths of Primitive.__call__ (tuples: shared, never changed)
_TRACED = (True,)
_BOTH_TRACED = (True, True)
_FIRST_TRACED = (True, False)
_SECOND_TRACED = (False, True)


#: ``initial`` (or ``mean``) not given (numpy's own default is a private sentinel)
_UNSET: Any = object()


class Tracer:
    """A traced array: a raw backend array plus its place in a :class:`Trace`.

    Supports the arithmetic operators, ``@``, ``.T``, ``.sum()``, ``.mean()``, ``.max()``,
    ``.min()``, ``.std()``, ``.var()``, ``.reshape()``, ``.transpose()``, ``.swapaxes()``,
    ``.squeeze()``, ``.take()``, ``.clip()`` (``np.sum(t)``, ``np.std(t)``, ``np.reshape(t, s)``,
    ``np.take(t, i)`` and the like call these, with numpy's keywords at their defaults; others
    are refused by name), ``.ravel()`` and ``.flatten()``, indexing, iteration over the first
    axis, the numpy ufuncs that have an asyncnn op (``np.exp(t)`` becomes ``ops.exp(t)``), and
    the numpy functions that have a match in the ops (``np.concatenate``, ``np.stack``,
    ``np.where``, ``np.diff``, ``np.dot``, ``np.ravel``, ... become ops; ``np.zeros_like(t)``
    and the like give plain constants; any other numpy function is refused by name, never
    converting ``t``). Each computes what numpy's does (``t.var()`` is ``ops.var(t, ddof=0)``,
    ``t.take(i)`` takes from the flattened array).
    Comparisons (``<``, ``==``, ...) return raw boolean arrays, and ``float(t)`` and ``bool(t)``
    the value (they have no gradient).
    """

    __slots__ = ("value", "trace", "index")

    def __init__(self, value: Any, trace: Trace, index: int) -> None:
        self.value = value
        self.trace = trace
        self.index = index

    # -- what a raw array would say ----------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return int(self.value.ndim)

    @property
    def size(self) -> int:
        return int(self.value.size)

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self) -> Iterator[Any]:
        if self.ndim == 0:  # as numpy; Python's fallback through __getitem__ would yield nothing
            raise TypeError("iteration over a 0-d traced array")
        # one unstack, not an index per row: each index's gradient is of the whole array, and
        # adding them up made a loop over the rows cost its length squared
        yield from _ops.unstack(self, 0)

    def __repr__(self) -> str:
        return f"Tracer(shape={self.shape}, dtype={self.dtype})"

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        refused = _refused_by_method(self)
        if refused is not None:
            # np.reshape(t, ...) calls t.reshape, and numpy retries a TypeError of it by
            # converting t (fromnumeric's _wrapfunc): the method's own error says what to fix
            raise refused
        caller = _numpy_caller()
        raise TypeError(
            "a traced array cannot be turned into a numpy array inside vjp/grad (its gradient "
            "would be lost). Use asyncnn.ops on it, or take `.value` explicitly if you mean to "
            "stop the gradient."
            + ("" if caller is None else f" (np.{caller} asked for it{_op_hint(caller)}.)")
        )

    def __bool__(self) -> bool:
        return bool(self.value)

    def __float__(self) -> float:
        return float(self.value)

    # -- arithmetic: delegated to the ops -----------------------------------------------------
    def __add__(self, o: Any) -> Any:
        return _ops.add(self, o)

    def __radd__(self, o: Any) -> Any:
        return _ops.add(o, self)

    def __sub__(self, o: Any) -> Any:
        return _ops.subtract(self, o)

    def __rsub__(self, o: Any) -> Any:
        return _ops.subtract(o, self)

    def __mul__(self, o: Any) -> Any:
        return _ops.multiply(self, o)

    def __rmul__(self, o: Any) -> Any:
        return _ops.multiply(o, self)

    def __truediv__(self, o: Any) -> Any:
        return _ops.divide(self, o)

    def __rtruediv__(self, o: Any) -> Any:
        return _ops.divide(o, self)

    def __matmul__(self, o: Any) -> Any:
        return _ops.matmul(self, o)

    def __rmatmul__(self, o: Any) -> Any:
        return _ops.matmul(o, self)

    def __pow__(self, o: Any) -> Any:
        return _ops.power(self, o)

    def __rpow__(self, o: Any) -> Any:
        return _ops.power(o, self)

    def __neg__(self) -> Any:
        return _ops.negative(self)

    def __pos__(self) -> Tracer:
        return self

    def __abs__(self) -> Any:
        return _ops.abs(self)

    def __getitem__(self, idx: Any) -> Any:
        return _ops.getitem(self, idx)

    # Comparisons have no gradient: they answer with raw arrays.
    def __lt__(self, o: Any) -> Any:
        return self.value < _raw(o)

    def __le__(self, o: Any) -> Any:
        return self.value <= _raw(o)

    def __gt__(self, o: Any) -> Any:
        return self.value > _raw(o)

    def __ge__(self, o: Any) -> Any:
        return self.value >= _raw(o)

    def __eq__(self, o: object) -> Any:
        return self.value == _raw(o)

    def __ne__(self, o: object) -> Any:
        return self.value != _raw(o)

    __hash__ = object.__hash__  # by identity, as before: __eq__ answers with an array

    @property
    def T(self) -> Any:  # noqa: N802 - numpy's name
        return _ops.transpose(self)

    # ``dtype``, ``out``, ``initial`` and ``where`` are what np.sum(t), np.mean(t), np.max(t)
    # pass to these methods (the last two only when given)
    def sum(
        self,
        axis: Any = None,
        keepdims: bool = False,
        *,
        dtype: Any = None,
        out: Any = None,
        initial: Any = _UNSET,
        where: Any = True,
    ) -> Any:
        t = _reduced(self, "sum", dtype, out, initial, where)
        return _ops.sum(t, axis=axis, keepdims=keepdims)

    def mean(
        self,
        axis: Any = None,
        keepdims: bool = False,
        *,
        dtype: Any = None,
        out: Any = None,
        where: Any = True,
    ) -> Any:
        t = _reduced(self, "mean", dtype, out, _UNSET, where)
        return _ops.mean(t, axis=axis, keepdims=keepdims)

    def max(
        self,
        axis: Any = None,
        keepdims: bool = False,
        *,
        out: Any = None,
        initial: Any = _UNSET,
        where: Any = True,
    ) -> Any:
        t = _reduced(self, "max", None, out, initial, where)
        return _ops.max(t, axis=axis, keepdims=keepdims)

    def min(
        self,
        axis: Any = None,
        keepdims: bool = False,
        *,
        out: Any = None,
        initial: Any = _UNSET,
        where: Any = True,
    ) -> Any:
        t = _reduced(self, "min", None, out, initial, where)
        return _ops.min(t, axis=axis, keepdims=keepdims)

    def reshape(self, *shape: Any, order: Any = "C", copy: Any = None) -> Any:
        # (np.reshape(t, s) calls t.reshape(s, order="C"), adding copy= when given)
        if order != "C":
            raise TypeError(
                f"reshape of a traced array takes order='C' only, got order={order!r}: numpy's "
                "order='F' is a C-order reshape between two transposes, "
                "ops.transpose(ops.reshape(ops.transpose(t), shape[::-1]))"
            )
        if copy is False:
            raise TypeError(
                "reshape of a traced array cannot promise not to copy (copy=False): leave copy "
                "out (a traced array is never changed in place, so a view and a copy read alike)"
            )
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        return _ops.reshape(self, shape)

    def transpose(self, *axes: Any) -> Any:
        if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], tuple | list)):
            axes = () if axes[0] is None else tuple(axes[0])  # np.transpose(t): t.transpose(None)
        return _ops.transpose(self, axes or None)

    # (np.var(t) calls t.var(axis=..., dtype=..., out=..., ddof=...), adding keepdims=, where=
    # and mean= when given; numpy's correction= arrives as ddof)
    def var(
        self,
        axis: Any = None,
        dtype: Any = None,
        out: Any = None,
        ddof: Any = 0,
        keepdims: bool = False,
        *,
        where: Any = True,
        mean: Any = _UNSET,
    ) -> Any:
        t = _reduced(self, "var", dtype, out, _UNSET, where, mean)
        return _ops.var(t, axis=axis, ddof=ddof, keepdims=keepdims)

    def std(
        self,
        axis: Any = None,
        dtype: Any = None,
        out: Any = None,
        ddof: Any = 0,
        keepdims: bool = False,
        *,
        where: Any = True,
        mean: Any = _UNSET,
    ) -> Any:
        t = _reduced(self, "std", dtype, out, _UNSET, where, mean)
        return _ops.std(t, axis=axis, ddof=ddof, keepdims=keepdims)

    def cumsum(self, axis: Any = None, dtype: Any = None, out: Any = None) -> Any:
        # (np.cumsum(t, axis) calls t.cumsum(axis=axis, dtype=None, out=None))
        return _ops.cumsum(_reduced(self, "cumsum", dtype, out, _UNSET, True), axis)

    # (np.prod(t) calls t.prod(axis=..., dtype=..., out=...), adding keepdims=, initial= and
    # where= when given; numpy's order of the arguments, as ndarray.prod)
    def prod(
        self,
        axis: Any = None,
        dtype: Any = None,
        out: Any = None,
        keepdims: bool = False,
        initial: Any = _UNSET,
        where: Any = True,
    ) -> Any:
        t = _reduced(self, "prod", dtype, out, initial, where)
        return _ops.prod(t, axis=axis, keepdims=keepdims)

    def cumprod(self, axis: Any = None, dtype: Any = None, out: Any = None) -> Any:
        # (np.cumprod(t, axis) calls t.cumprod(axis=axis, dtype=None, out=None))
        return _ops.cumprod(_reduced(self, "cumprod", dtype, out, _UNSET, True), axis)

    def squeeze(self, axis: Any = None) -> Any:
        # (np.squeeze(t) calls t.squeeze(), np.squeeze(t, axis) t.squeeze(axis=axis))
        return _ops.squeeze(self, axis)

    def take(self, indices: Any, axis: Any = None, out: Any = None, mode: Any = "raise") -> Any:
        # (np.take(t, i) calls t.take(i, axis=None, out=None, mode="raise"))
        if out is not None:
            raise TypeError("take of a traced array cannot write into out=; use the result")
        if not (type(mode) is str and mode == "raise"):
            # ops.take refuses an index out of range; numpy's other modes first map the
            # indices into range, which the caller can do, and still get the gradient
            mapped = {"wrap": "np.mod(indices, n)", "clip": "np.clip(indices, 0, n - 1)"}
            fix = (
                f"map the indices first, ops.take(t, {mapped[mode]}, axis) with n = "
                "t.shape[axis] (t.size with axis=None, taking from ops.reshape(t, -1))"
                if type(mode) is str and mode in mapped
                else "numpy's modes are 'raise', 'wrap' and 'clip'"
            )
            raise TypeError(
                f"take of a traced array takes mode='raise' only, got mode={mode!r} (an index "
                f"out of range is an error): {fix}"
            )
        if axis is None:  # numpy's: take from the flattened array
            return _ops.take(_ops.reshape(self, -1), indices, 0)
        return _ops.take(self, indices, axis)

    def swapaxes(self, axis1: Any, axis2: Any) -> Any:
        # (np.swapaxes(t, a, b) calls t.swapaxes(a, b))
        axes = list(range(self.ndim))
        a = _ops.checked_axis(_ops.check_axis, axis1, self, "swapaxes")
        b = _ops.checked_axis(_ops.check_axis, axis2, self, "swapaxes")
        axes[a], axes[b] = axes[b], axes[a]
        return _ops.transpose(self, axes)

    def ravel(self, order: Any = "C") -> Any:
        # (np.ravel(t) never calls this: __array_function__ answers it, with _np_ravel)
        _check_c_order(order, "ravel")
        return _ops.reshape(self, -1)

    def flatten(self, order: Any = "C") -> Any:
        _check_c_order(order, "flatten")
        return _ops.reshape(self, -1)

    def astype(self, dtype: Any) -> Any:
        return _ops.astype(self, dtype)

    def clip(
        self,
        min: Any = None,  # noqa: A002 - numpy's names
        max: Any = None,  # noqa: A002
        *,
        out: Any = None,
        **ufunc_keywords: Any,
    ) -> Any:
        # (np.clip(t, lo, hi) calls this, as numpy's own arrays' clip)
        if out is not None:
            raise TypeError("clip of a traced array cannot write into out=; use the result")
        given = [f"{k}={v!r}" for k, v in ufunc_keywords.items() if not _is_ufunc_default(k, v)]
        if given:
            raise TypeError(
                "clip of a traced array takes none of numpy's ufunc keywords but at their "
                f"defaults, got {', '.join(given)}: clip, then convert with ops.astype or select "
                "with ops.where"
            )
        from ._ops_act import clip

        return clip(self, min, max)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        op: Any = None
        if method == "__call__" and not kwargs:
            if ufunc.__name__ in _COMPARISONS:  # ``array == traced``: no gradient, a raw answer
                return ufunc(*(_raw(x) for x in inputs))
            op = _ops.UFUNC_OPS.get(ufunc.__name__)
        if op is None:
            raise _ufunc_refusal(ufunc, method, kwargs)
        return op(*inputs)

    def __array_function__(
        self, func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # NEP 18: numpy hands every function of its API given a traced array here, before it
        # converts anything (a conversion is refused: the gradient would be lost)
        if func in _numpy_api.BY_METHOD:
            # numpy's own code calls the traced array's method (np.sum(t) is t.sum(...), and
            # numpy's retry after the method's TypeError is _refused_by_method's) or reads its
            # shape or dtype: the method's value, gradient and refusals, word for word
            return func._implementation(*args, **kwargs)
        match = _numpy_api.FUNCTIONS.get(func)
        if match is None:
            raise _numpy_api.refusal(func)
        return match(*args, **kwargs)


#: the ops a ufunc's method matches: np.add.reduce(t) is what np.sum(t) computes, ...
_UFUNC_METHOD_OPS = {
    ("add", "reduce"): "ops.sum(t, axis)",
    ("multiply", "reduce"): "ops.prod(t, axis)",
    ("maximum", "reduce"): "ops.max(t, axis)",
    ("minimum", "reduce"): "ops.min(t, axis)",
    ("add", "accumulate"): "ops.cumsum(t, axis)",
    ("multiply", "accumulate"): "ops.cumprod(t, axis)",
}

#: the numpy function behind a boolean reduction numpy's callers see
_BOOLEAN_REDUCTIONS = {("logical_or", "reduce"): "any", ("logical_and", "reduce"): "all"}


def _ufunc_refusal(ufunc: Any, method: str, kwargs: dict[str, Any]) -> TypeError:
    """The error of numpy's ``ufunc.method`` applied to a traced array, which it cannot
    differentiate: what to write instead, where there is something (there was one message,
    "use the matching function from asyncnn.ops", for np.any(t) too, which has none)."""
    name = ufunc.__name__
    called = name if method == "__call__" else f"{name}.{method}"
    if _is_boolean(ufunc):  # (np.any, np.all, np.isnan, np.logical_not, ...)
        numpy_s = _BOOLEAN_REDUCTIONS.get((name, method))
        shown = called if numpy_s is None else f"{called} (np.{numpy_s})"
        example = f"np.{numpy_s or called}({_boolean_arguments(ufunc, method)})"
        return TypeError(
            f"numpy's {shown} of a traced array has no gradient: a boolean result does not "
            "change with small changes of t. Compute it on the plain array outside the traced "
            "function, or on ops.raw(t) inside it (no gradient flows through it), e.g. "
            f"{example}"
        )
    op = _ops.UFUNC_OPS.get(name) if method == "__call__" else None
    if op is not None:  # (the op itself, but with keywords)
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        return TypeError(
            f"numpy's {name} of a traced array takes none of numpy's ufunc keywords, got "
            f"{given}: ops.{op.__name__}(...), then ops.astype for a dtype (out= has no match: "
            "use the result)"
        )
    match = _UFUNC_METHOD_OPS.get((name, method))
    if match is not None:
        return TypeError(
            f"numpy's {called} cannot differentiate a traced array: {match} is its "
            "differentiable match"
        )
    return TypeError(
        f"numpy's {called} cannot differentiate a traced array, and asyncnn.ops has no match "
        "for it: write it with the ops (the ufuncs with an op, np.exp(t), np.maximum(t, 0), "
        "..., become it), or apply it to ops.raw(t) for a value with no gradient"
    )


def _boolean_arguments(ufunc: Any, method: str) -> str:
    """The arguments of ``ufunc.method`` on raw arrays, as the refusal's example shows them: one
    array for a reduction, ``ufunc.nin`` arrays for a call or ``outer`` (np.logical_or takes
    two), the indices where ``reduceat`` and ``at`` need them."""
    arrays = ("ops.raw(t)", "ops.raw(u)", "ops.raw(v)")
    if method in ("reduce", "accumulate"):
        return arrays[0]
    if method == "reduceat":
        return f"{arrays[0]}, indices"
    if method == "at":  # (the array, the indices, then the other operand of a binary ufunc)
        return ", ".join((arrays[0], "indices", *arrays[1 : ufunc.nin]))
    return ", ".join(arrays[: ufunc.nin])


def _is_boolean(ufunc: Any) -> bool:
    """Whether ``ufunc`` gives booleans for every input but Python objects."""
    loops = [sig for sig in ufunc.types if "O" not in sig]
    return bool(loops) and all(sig.endswith("->?") for sig in loops)


def _raw(x: Any) -> Any:
    return x.value if type(x) is Tracer else x


def _refused_by_method(t: Tracer) -> TypeError | None:
    """The TypeError of a method of ``t`` that numpy's ``_wrapfunc`` is handling (np.reshape,
    np.transpose, np.clip, ... call the array's method and, on a TypeError, convert the array
    next), else None: a conversion anywhere else, the user's own handler of that error
    included, is refused as any other."""
    exc = sys.exception()
    if not isinstance(exc, TypeError) or exc.__traceback__ is None:
        return None
    frame = exc.__traceback__.tb_frame  # (the traceback's first frame is the one handling it)
    if frame.f_code.co_name != "_wrapfunc" or not _is_numpy(frame):
        return None
    return exc if frame.f_locals.get("obj") is t else None


def _numpy_caller() -> str | None:
    """The numpy function converting a traced array (through ``_wrapit``, for a method a traced
    array lacks; numpy's code outside its dispatched API, np.testing's, through ``asarray``), or
    None when numpy's Python code is not the caller."""
    frame: Any = sys._getframe(2)  # (this function's, __array__'s, then the caller's)
    while frame is not None and _is_numpy(frame):
        if frame.f_code.co_name == "_wrapit":
            return str(frame.f_locals.get("method"))
        if not frame.f_code.co_name.startswith("_"):  # (np.std's helpers are _std, _var)
            return str(frame.f_code.co_name)
        frame = frame.f_back
    return None


def _is_numpy(frame: Any) -> bool:
    return str(frame.f_globals.get("__name__", "")).startswith("numpy.")


def _op_hint(name: str) -> str:
    return f"; ops.{name} is its differentiable match" if name in _ops.__all__ else ""


def _check_c_order(order: Any, name: str) -> None:
    """Refuses a memory ``order`` but numpy's default, for ``name`` (ravel, flatten)."""
    if not (type(order) is str and order == "C"):
        raise TypeError(
            f"{name} of a traced array takes order='C' only, got order={order!r}: numpy's "
            "order='F' reads the array with its axes reversed, ops.reshape(ops.transpose(t), -1)"
        )


#: numpy's ufunc keywords at their defaults, which np.clip(t, ...) passes through to t.clip
_UFUNC_DEFAULTS: dict[str, Any] = {
    "where": True,
    "casting": "same_kind",
    "order": "K",
    "dtype": None,
    "subok": True,
    "signature": None,
}


def _is_ufunc_default(keyword: str, value: Any) -> bool:
    default = _UFUNC_DEFAULTS.get(keyword, _UNSET)
    return value is default or (type(value) is str and value == default)


#: the mean of the entries a ``mask`` selects along ``axis``, kept for broadcasting against t
_MASKED_MEAN = (
    "ops.sum(ops.where(mask, t, 0.0), axis, keepdims=True) / mask.sum(axis, keepdims=True)"
)

#: a masked reduction along ``axis`` in ops, for the message refusing ``where=``
_MASKED = {
    "sum": "ops.sum(ops.where(mask, t, 0.0), axis)",
    "mean": "ops.sum(ops.where(mask, t, 0.0), axis) / mask.sum(axis)",
    "max": "ops.max(ops.where(mask, t, -np.inf), axis)",
    "min": "ops.min(ops.where(mask, t, np.inf), axis)",
    "prod": "ops.prod(ops.where(mask, t, 1.0), axis)",
    "var": "ops.sum(ops.where(mask, ops.square(t - m), 0.0), axis) / (mask.sum(axis) - ddof) "
    f"with m = {_MASKED_MEAN}",
    "std": "ops.sqrt(ops.sum(ops.where(mask, ops.square(t - m), 0.0), axis) / (mask.sum(axis) "
    f"- ddof)) with m = {_MASKED_MEAN}",
}


def _reduced(
    t: Tracer, name: str, dtype: Any, out: Any, initial: Any, where: Any, mean: Any = _UNSET
) -> Any:
    """What ``t.sum(dtype=..., out=...)`` (and ``np.sum(t)``) reduces: ``t`` in ``dtype``."""
    if out is not None:
        raise TypeError(f"{name} of a traced array cannot write into out=; use the result")
    if where is not True:
        raise TypeError(
            f"{name} of a traced array takes no where= mask: select the entries first, as in "
            f"ops.{name}(t[mask]) over all of them, or {_MASKED[name]} along an axis"
        )
    if initial is not _UNSET:
        combined = {
            "sum": f"ops.sum(t) + {initial!r}",
            "max": f"ops.maximum(ops.max(t), {initial!r})",
            "min": f"ops.minimum(ops.min(t), {initial!r})",
            "prod": f"ops.prod(t) * {initial!r}",
        }[name]
        raise TypeError(
            f"{name} of a traced array takes no initial=: combine it with the result, {combined}"
        )
    if mean is not _UNSET:  # (numpy 2's var and std take the mean if it is known already)
        spread = "ops.sum(ops.square(t - m), axis) / (n - ddof)"
        raise TypeError(
            f"{name} of a traced array takes no mean=: leave it out (ops.{name} computes the "
            "mean itself), or for a mean m of your own, "
            + (spread if name == "var" else f"ops.sqrt({spread})")
            + " with n the number of entries reduced"
        )
    return t if dtype is None else _ops.astype(t, dtype)


_COMPARISONS = frozenset(("equal", "not_equal", "less", "less_equal", "greater", "greater_equal"))


def _is_tracer(x: Any) -> bool:
    return type(x) is Tracer


def _is_float_array(x: Any) -> bool:
    # (a complex one too: hidden in a namedtuple it would pass as a constant, bare it is refused)
    return type(x) is Tracer or (hasattr(x, "shape") and (_is_differentiable(x) or _is_complex(x)))


def _trace_call(fn: Callable[..., Any], primals: tuple[Any, ...], who: str) -> tuple[Any, ...]:
    """Runs ``fn(*primals)`` on a fresh trace, the differentiable leaves of ``primals`` traced.

    Returns ``(trace, leaves, treedef, leaf_index, out_leaves, out_def, out_index, out_raw)``:
    the primals' leaves and structure, each leaf's node (-1: not differentiated), the output's
    leaves and structure, each output leaf's node (-1: a constant), and the output as raw
    arrays.
    """
    trace = Trace()
    nodes = trace.nodes
    leaves, treedef = tree_flatten(primals)
    traced: list[Any] = []
    leaf_index: list[int] = []
    for leaf in leaves:
        if type(leaf) is np.ndarray and leaf.dtype.kind == "f":  # the common leaf, traced
            index = len(nodes)
            nodes.append(_LEAF_NODE)
            traced.append(Tracer(leaf, trace, index))
            leaf_index.append(index)
            continue
        if type(leaf) is Tracer:
            raise ValueError(
                f"{who} got a traced array as an argument: nested differentiation (grad of "
                "grad) is not supported"
            )
        if _is_differentiable(leaf):
            if isinstance(leaf, float):
                leaf = np.asarray(leaf)
            t = trace.leaf(leaf)
            traced.append(t)
            leaf_index.append(t.index)
        else:
            if _is_complex(leaf):  # refused: as a constant, None where a gradient is expected
                raise _complex_leaf(who, treedef, len(traced), leaf)  # (its place: len(traced))
            if isinstance(leaf, _CONTAINERS) and _hides(leaf, _is_float_array):
                raise TypeError(_unopened(who, "an argument holds", leaf, "get no gradient"))
            traced.append(leaf)
            leaf_index.append(-1)
    out = fn(*tree_unflatten(treedef, traced))
    if type(out) is Tracer and out.trace is trace:  # one array out, as a layer's: no tree
        return trace, leaves, treedef, leaf_index, [out], _LEAF, [out.index], out.value
    out_leaves, out_def = tree_flatten(out)
    out_index = [o.index if type(o) is Tracer and o.trace is trace else -1 for o in out_leaves]
    for o in out_leaves:
        if type(o) is Tracer:
            if o.trace is not trace:
                raise ValueError(f"{who}: fn returned a traced array of another vjp call")
        elif isinstance(o, _CONTAINERS) and _hides(o, _is_tracer):
            raise TypeError(_unopened(who, "fn returned", o, "come back traced, with no gradient"))
    if out_def.kind == "leaf":  # one array out: nothing to rebuild
        out_raw = _raw(out_leaves[0])
    else:
        out_raw = tree_unflatten(out_def, [_raw(o) for o in out_leaves])
    return trace, leaves, treedef, leaf_index, out_leaves, out_def, out_index, out_raw


def vjp(fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[[Any], tuple[Any, ...]]]:
    """Runs ``fn(*primals)`` and returns its output and a pullback.

    Args:
        fn: a function of pytrees of arrays built from asyncnn ops.
        *primals: its arguments. Floating-point array leaves are differentiated; integer and
            boolean arrays and non-array leaves are passed through as constants; complex ones
            are refused.

    Returns:
        ``(out, pullback)``: ``out`` is ``fn``'s result with raw arrays; ``pullback(cotangent)``
        takes a cotangent of the same structure as ``out`` and returns a tuple with one gradient
        per primal, of the same pytree structure, holding ``None`` at non-differentiable leaves.
        A pullback may be called once; it frees its residuals as it goes (they are references
        to the forward's arrays: change none in place before it runs).

    Raises:
        TypeError: a complex leaf (pass its real and imaginary parts as two real arrays), or
            an op in ``fn`` that makes a complex value from a traced array; a dict whose keys
            do not sort together.

    Example:
        >>> y, pb = vjp(lambda w, x: ops.sum(ops.tanh(x @ w)), w, x)
        >>> gw, gx = pb(1.0)
    """
    trace, leaves, treedef, leaf_index, out_leaves, out_def, out_index, out_raw = _trace_call(
        fn, primals, "vjp"
    )
    wanted = [i for i in leaf_index if i >= 0]
    at = [k for k, i in enumerate(leaf_index) if i >= 0]  # where each wanted leaf's grad goes
    num_primals = len(primals)
    one_out = out_def.kind == "leaf"

    def pullback(cotangent: Any) -> tuple[Any, ...]:
        if one_out and type(cotangent) not in _CONTAINERS:  # (what _cotangent_leaves accepts)
            i = out_index[0]
            seeds = {} if i < 0 or cotangent is None else {i: _as_cotangent(cotangent, out_raw)}
        else:
            seeds = {}
            ct_leaves = _cotangent_leaves(cotangent, out_def)
            for i, ct, o in zip(out_index, ct_leaves, out_leaves, strict=True):
                if i < 0 or ct is None:
                    continue
                ct = _as_cotangent(ct, _raw(o))
                seeds[i] = ct if i not in seeds else seeds[i] + ct
        grads = trace.backward(seeds, wanted) if wanted else []
        flat: list[Any] = [None] * len(leaves)
        given: set[int] = set()
        for k, g in zip(at, grads, strict=True):
            if g is None:
                g = _zeros_like(leaves[k])
            elif id(g) in given or not getattr(getattr(g, "flags", None), "writeable", True):
                # a rule may hand one array to two inputs (add's) or a read-only broadcast view
                # (sum's): each gradient is the caller's own, writable array, as torch's are
                g = g.copy()
            given.add(id(g))
            flat[k] = g
        return tuple(tree_unflatten(treedef, flat)) if num_primals else ()

    return out_raw, pullback


def primitive_vjp(
    prim: Primitive, args: Sequence[Any], params: dict[str, Any], wrt: Sequence[int]
) -> tuple[Any, Callable[[Any], list[Any]]]:
    """:func:`vjp` of one primitive call, ``prim(*args, **params)``, with respect to the
    arguments ``wrt`` (by position), without a trace: its forward and VJP rules directly.

    Returns ``(out, pullback)``; ``pullback(cotangent)`` gives one gradient per position in
    ``wrt`` (None for an argument that is not differentiable), equal bit for bit to what
    ``vjp`` of the same call gives. For a function that is one primitive on a hot path (a loss
    actor's loss): a trace's own bookkeeping costs more than the call itself on small arrays.
    """
    out, res = prim.forward(*args, **params)
    chosen = set(wrt)
    needs = tuple(i in chosen and _is_differentiable(a) for i, a in enumerate(args))

    def pullback(cotangent: Any) -> list[Any]:
        grads = prim.vjp_rule(_as_cotangent(cotangent, out), res, needs)
        return [
            None if not needs[i] else _zeros_like(args[i]) if grads[i] is None else grads[i]
            for i in wrt
        ]

    return out, pullback


def _zeros_like(x: Any) -> Any:
    if isinstance(x, float):
        return np.zeros(())
    return _ops.zeros_like_raw(x)


def _as_cotangent(ct: Any, out: Any) -> Any:
    shape = getattr(out, "shape", ())
    if getattr(ct, "shape", None) == shape and getattr(ct, "dtype", None) == out.dtype:
        return ct
    if np.iscomplexobj(ct) and out.dtype.kind != "c":  # a cast would drop its imaginary part
        raise ValueError(
            f"pullback: a complex cotangent ({getattr(ct, 'dtype', type(ct).__name__)}) for an "
            f"output of dtype {out.dtype}"
        )
    xp = _ops.namespace_of(out)
    ct = xp.asarray(ct, dtype=out.dtype)
    if ct.shape != shape:
        if ct.size != 1:
            raise ValueError(
                f"pullback: cotangent of shape {ct.shape} for an output of shape {shape}"
            )
        ct = xp.broadcast_to(ct.reshape(()), shape)
    return ct


from . import _autodiff_numpy as _numpy_api  # noqa: E402  (it imports Tracer from here)
from . import _ops  # noqa: E402  (the ops module imports Primitive and Tracer from here)
