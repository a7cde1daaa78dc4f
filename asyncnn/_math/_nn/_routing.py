"""The modules of data-dependent routing: :class:`Router` (a gate picks each row's experts) and
:class:`Merge` (the experts' rows gathered back), and the pure functions behind them.

Both are plain modules: called directly they evaluate densely, for shapes and for a plain
reference. The runtime runs a router node and a merge node with actors of their own that send
each expert only its rows (``asyncnn/_runtime/_routing.py``; see ``docs/dynamic.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncnn.backends import is_floating

from .. import _ops as ops
from .. import _ops_nn as ops_nn
from .._data import _check_index
from ._args import as_int
from ._module import Initializer, Module

__all__ = [
    "GATES",
    "OVERFLOW",
    "Merge",
    "Router",
    "assign_rows",
    "expert_rows",
    "gate_weights",
    "topk_experts",
]

GATES = ("softmax", "normalized", "none")
OVERFLOW = ("drop", "error")


@dataclass(frozen=True)
class Router(Module):
    """The module of a router node (made by :meth:`Graph.router`); see ``docs/dynamic.md``.

    Attributes:
        gate: the module scoring the experts: ``gate(params, x, *extra) -> (rows, experts)``
            (``rng=`` the key's generator too in training, where it draws random numbers).
        experts: how many experts (branches) the router feeds.
        k: how many experts each row goes to (top-k of the scores; ties go to the lower index).
        gates: how a row's outputs are weighted in the merge: ``"softmax"`` (the softmax over all
            experts, at the chosen ones), ``"normalized"`` (the softmax over the chosen ``k``),
            ``"none"`` (weight 1: hard branches; the gate then gets no gradient).
        capacity: the most rows an expert takes per key (None: no limit).
        capacity_factor: or a limit of ``ceil(capacity_factor * rows * k / experts)`` per key.
        on_overflow: ``"drop"`` (drop rows over capacity and count them) or ``"error"``.
    """

    gate: Module
    experts: int
    k: int = 1
    gates: str = "softmax"
    capacity: int | None = None
    capacity_factor: float | None = None
    on_overflow: str = "drop"

    def __post_init__(self) -> None:
        if not isinstance(self.gate, Module):
            raise TypeError(f"Router: gate must be an nn.Module, got {type(self.gate).__name__}")
        # (a bool is refused, experts=True is no count; a numpy int is kept as a plain int)
        object.__setattr__(self, "experts", _check_index(self.experts, "Router: experts", 1))
        object.__setattr__(self, "k", _check_index(self.k, "Router: k", 1))
        if self.k > self.experts:
            raise ValueError(f"Router: k={self.k!r} must be an int in [1, experts={self.experts}]")
        if self.gates not in GATES:
            raise ValueError(f"Router: gates={self.gates!r} must be one of {GATES}")
        if self.capacity is not None and self.capacity_factor is not None:
            raise ValueError("Router: give capacity or capacity_factor, not both")
        if self.capacity is not None:
            capacity = _check_index(self.capacity, "Router: capacity", 0)
            object.__setattr__(self, "capacity", capacity)
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"Router: capacity_factor={self.capacity_factor!r} must be > 0")
        if self.on_overflow not in OVERFLOW:
            raise ValueError(f"Router: on_overflow={self.on_overflow!r} must be one of {OVERFLOW}")

    def init_params(self, init: Initializer) -> Any:
        return self.gate.init_params(init)

    def limit(self, rows: int) -> int | None:
        """The capacity of each expert for a key of ``rows`` rows (None: unlimited)."""
        if self.capacity_factor is not None:
            # an expert gets each row at most once (a row's k choices are k experts): a factor
            # that would allow more (one as large as 1e308, whose product is inf) allows that
            limit = self.capacity_factor * rows * self.k / self.experts
            return rows if limit >= rows else int(math.ceil(limit))
        return self.capacity

    def scores(self, params: Any, x: Any, *extra: Any, rng: Any = None) -> Any:
        """The gate's scores, checked to be ``(rows, experts)``.

        ``rng``: the generator a stochastic gate (dropout, noise) draws from in training (the
        router actor gives it the key's seeded stream, as a plain layer's, and a fresh copy of
        it when it recomputes the gate for the backward, so the draws are the forward's); None
        in evaluation. A gate that draws nothing is called without it."""
        if rng is not None and self.gate.stochastic:
            s = self.gate(params, x, *extra, rng=rng)
        else:
            s = self.gate(params, x, *extra)
        shape = tuple(getattr(s, "shape", ()))
        if len(shape) != 2 or shape[1] != self.experts or shape[0] != x.shape[0]:
            raise ValueError(
                f"the gate {self.gate!r} gave scores of shape {shape} for input {tuple(x.shape)}; "
                f"a router over {self.experts} experts needs ({x.shape[0]}, {self.experts})"
            )
        dtype = getattr(ops.raw(s), "dtype", None)
        # bools have no order to rank by; bfloat16 (an extension dtype of kind "V") does
        if dtype is not None and dtype.kind not in "iu" and not is_floating(dtype):
            raise ValueError(
                f"the gate {self.gate!r} gave scores of dtype {dtype}; a router ranks numbers "
                "(one score per expert): cast a condition to numbers, e.g. cond.astype(x.dtype)"
            )
        return s

    def __call__(self, params: Any, x: Any, *extra: Any, rng: Any = None) -> Any:
        # Shape evaluation only (graph validation): the experts read the routed rows of x.
        self.scores(params, x, *extra, rng=rng)
        return x


@dataclass(frozen=True)
class Merge(Module):
    """The module of a merge node (made by :meth:`Graph.merge`): ``out[i] = sum_j w[i, j] *
    expert_{route[i, j]}(x[i])`` over the row's kept choices (zeros for a row all of whose choices
    were dropped)."""

    experts: int

    def __post_init__(self) -> None:
        # a numpy integer kept as a plain int, which a spec can carry (the graph's checks
        # compare it with its router's experts)
        experts = as_int(self.experts)
        if experts is not None:
            object.__setattr__(self, "experts", experts)

    def init_params(self, init: Initializer) -> Any:
        return {}

    def __call__(self, params: Any, routed: Any, *branches: Any, rng: Any = None) -> Any:
        # Shape evaluation only (graph validation): every branch must give the same row shape.
        shapes = [tuple(b.shape) for b in branches]
        if len(set(s[1:] for s in shapes)) > 1:
            raise ValueError(f"the expert branches give rows of different shapes: {shapes}")
        return branches[0] * 0


def topk_experts(scores: np.ndarray[Any, Any], k: int) -> np.ndarray[Any, Any]:
    """Each row's ``k`` best experts, best first (ties go to the lower index)."""
    if scores.dtype.kind in "iu":
        # a negated integer score can wrap round (an unsigned 0 would rank first, and a signed
        # minimum, which negates to itself, too): sort ascending instead, the columns reversed
        # so that, read from the end, ties come out lower index first
        e = scores.shape[1]
        up = np.argsort(scores[:, ::-1], axis=1, kind="stable")[:, ::-1]
        return (e - 1 - up[:, :k]).astype(np.int64)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)


def assign_rows(
    choice: np.ndarray[Any, Any], experts: int, capacity: int | None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Applies the capacity: first choices of all rows (in row order), then second choices, ...

    Returns the route (``choice`` with ``-1`` where dropped) and the dropped count per expert.
    """
    route = choice.copy()
    dropped = np.zeros(experts, dtype=np.int64)
    if capacity is None:
        return route, dropped
    load = np.zeros(experts, dtype=np.int64)
    n = choice.shape[0]
    for j in range(choice.shape[1]):  # k columns; the rows of a column at once
        col = choice[:, j].astype(np.int64)
        # each row's place among the rows of this column that chose the same expert, in row
        # order: a stable sort groups them, the offset from the group's start is the place
        order = np.argsort(col, kind="stable")
        grouped = col[order]
        place = np.empty(n, dtype=np.int64)
        place[order] = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
        keep = load[col] + place < capacity
        route[~keep, j] = -1
        dropped += np.bincount(col[~keep], minlength=experts)
        load += np.bincount(col[keep], minlength=experts)
    return route, dropped


def gate_weights(scores: Any, choice: np.ndarray[Any, Any], gates: str, float_dtype: Any) -> Any:
    """The ``(rows, k)`` weights of the chosen experts (differentiable in ``scores``), in
    ``float_dtype``, the floating dtype the experts compute in (the caller knows it: the run's):
    a gate scoring in float64 in a float32 run (one without parameters on integer ids) would
    make the merge send its experts float64 gradients.

    Integer scores (counts, a condition as 0/1) are ranked as they are and weighted as
    ``float_dtype``: an integer has no gradient, so the gate gets none through them.
    """
    idx = choice
    if getattr(ops.raw(scores), "dtype", np.dtype(np.float64)).kind in "iu":
        # ops.softmax takes floats only; in the experts' dtype, so that the merge's weighted
        # sum and the gradients it sends back stay in it (float64 weights made a float32 run's
        # experts compute their backward in float64)
        scores = ops.astype(ops.raw(scores), float_dtype)
    if gates == "none":
        # weight 1, still a function of the scores (its gradient is zero); picked by where, not
        # as scores * 0 + 1, which is NaN at an infinite score (a gate masking experts out)
        picked = _take_rows(scores, idx)
        xp = ops.namespace_of(picked)  # (a cupy where takes no numpy condition)
        ones = xp.ones_like(ops.raw(picked))
        weights = ops.where(xp.ones_like(ones, dtype=bool), ones, picked)
    elif gates == "softmax":
        weights = _take_rows(ops_nn.softmax(scores, axis=-1), idx)
    else:
        weights = ops_nn.softmax(_take_rows(scores, idx), axis=-1)
    return weights if ops.raw(weights).dtype == float_dtype else ops.astype(weights, float_dtype)


def _take_rows(a: Any, idx: np.ndarray[Any, Any]) -> Any:
    n, e = a.shape
    flat = (np.arange(n)[:, None] * e + idx).reshape(-1)
    # (the rows' own numbers and the top-k's columns: in range by construction)
    return ops.reshape(ops.take_trusted(ops.reshape(a, (n * e,)), flat, axis=0), idx.shape)


def expert_rows(route: np.ndarray[Any, Any], e: int) -> tuple[np.ndarray[Any, Any], Any]:
    """The rows that go to expert ``e`` (ascending) and the route column each came through."""
    rows, cols = np.nonzero(route == e)
    return rows, cols
