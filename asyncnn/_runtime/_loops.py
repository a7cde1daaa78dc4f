"""Recurrent loops: a cell actor whose output feeds itself for the next step.

A loop node (made by :meth:`Graph.loop`) carries a state ``h`` per row through steps
``h <- cell(params, h, xs[:, t])`` (or ``cell(params, h)`` without ``xs``). Each row runs as many
steps as it needs: ``lengths[i]`` steps, or until ``until({}, h)`` says stop (at most
``max_steps``), so sequences of different lengths (or trees of different shapes, walked in
post-order with a stack in the state) share one key. A key's steps run back to back as one
scheduled forward op, with only the rows still active at each step; its backward unwinds them in
reverse (backpropagation through time), as one backward op, so deterministic policies keep their
static orders. The loop is the only cycle a graph may have: the cell's self edge is marked
recurrent in the spec, and any other cycle is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncnn._math._autodiff import vjp
from asyncnn._math._nn._module import Initializer, Module

from ._actors import LayerActor, _tree_add
from ._messages import FORWARD
from ._statistics import ActorStatistics

__all__ = ["Loop", "LoopActor", "LoopStatistics", "RNNCell", "planned_row_steps"]

OUTPUTS = ("last", "all")


@dataclass(frozen=True)
class Loop(Module):
    """The module of a loop node: runs ``cell`` over each row's steps.

    Called as ``loop(params, init, [xs], [lengths])`` (the inputs it was built with, in that
    order). ``params`` are the cell's.

    Attributes:
        cell: ``cell(params, h, x_t) -> h`` (``cell(params, h)`` when there is no ``xs``); the
            new state has the shape of the old.
        has_xs: whether a per-step input ``xs`` of shape ``(rows, steps, ...)`` is read.
        has_lengths: whether an int ``lengths`` input ``(rows,)`` gives each row's steps.
        until: a parameterless module, ``until({}, h) -> (rows,)``, true where a row stops after
            the step that produced ``h`` (a stop condition carried in the state).
        max_steps: the most steps (default: the length of ``xs``).
        output: ``"last"`` (each row's state after its last step, ``(rows, ...)``) or ``"all"``
            (``(rows, max_steps, ...)``, each row's states, zeros after its end).
    """

    cell: Module
    has_xs: bool = False
    has_lengths: bool = False
    until: Module | None = None
    max_steps: int | None = None
    output: str = "last"

    def __post_init__(self) -> None:
        if not isinstance(self.cell, Module):
            raise TypeError(f"Loop: cell must be an nn.Module, got {type(self.cell).__name__}")
        if self.output not in OUTPUTS:
            raise ValueError(f"Loop: output={self.output!r} must be one of {OUTPUTS}")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 0
        ):
            raise ValueError(f"Loop: max_steps={self.max_steps!r} must be an int >= 0")
        if not self.has_xs and self.max_steps is None:
            raise ValueError("Loop: without xs, give max_steps (the most steps a row may take)")
        if self.has_lengths and self.until is not None:
            raise ValueError("Loop: give lengths or until, not both")

    def init_params(self, init: Initializer) -> Any:
        return self.cell.init_params(init)

    def split(self, inputs: list[Any]) -> tuple[Any, Any, Any]:
        """``(init, xs or None, lengths or None)`` from the inputs."""
        it = iter(inputs[1:])
        xs = next(it) if self.has_xs else None
        lengths = next(it) if self.has_lengths else None
        return inputs[0], xs, lengths

    def steps(self, xs: Any) -> int:
        """The most steps of a key."""
        t = int(xs.shape[1]) if xs is not None else 0
        if self.max_steps is not None:
            return min(t, self.max_steps) if xs is not None else self.max_steps
        return t

    def step(self, params: Any, h: Any, x: Any) -> Any:
        """One step of the cell, with its output's shape checked."""
        new = self.cell(params, h) if x is None else self.cell(params, h, x)
        if tuple(new.shape) != tuple(h.shape):
            raise ValueError(
                f"the loop's cell {self.cell!r} turned a state of shape {tuple(h.shape)} into "
                f"{tuple(new.shape)}; a recurrent state must keep its shape"
            )
        return new

    def __call__(self, params: Any, *inputs: Any, rng: Any = None) -> Any:
        # A plain (dense, masked) evaluation: every row steps, finished rows keep their state.
        from asyncnn import ops

        h, xs, lengths = self.split(list(inputs))
        n = int(h.shape[0])
        total = self.steps(xs)
        active = np.ones(n, dtype=bool)
        if lengths is not None:
            lengths = np.asarray(ops.raw(lengths))
            check_lengths(lengths, total, "loop")
        outs = []
        tail = (1,) * (len(h.shape) - 1)
        for t in range(total):
            if lengths is not None:
                active = lengths > t
            new = self.step(params, h, None if xs is None else xs[:, t])
            h = ops.where(active.reshape((n, *tail)), new, h)
            if self.output == "all":
                outs.append(ops.where(active.reshape((n, *tail)), h, h * 0))
            if self.until is not None:
                active = active & ~np.asarray(ops.raw(self.until({}, h)), dtype=bool)
        if self.output == "all":
            return ops.stack(outs, axis=1) if outs else ops.expand_dims(h, 1)[:, :0]
        return h


def planned_row_steps(loop: Loop, inputs: list[Any]) -> int:
    """The row-steps a key will take at most: the sum of its lengths (capped at the steps of
    ``xs`` / ``max_steps``), or every row for every step without lengths."""
    h, xs, lengths = loop.split(inputs)
    total = loop.steps(xs)
    if lengths is None:
        return int(h.shape[0]) * total
    from asyncnn.backends import to_numpy

    return int(np.clip(np.asarray(to_numpy(lengths)), 0, total).sum())


def check_lengths(lengths: Any, total: int, who: str) -> None:
    """Raises ValueError unless every length is an int in [0, total]."""
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise ValueError(f"{who}: lengths must be one int per row, got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")  # fmt: skip
    bad = np.nonzero((lengths < 0) | (lengths > total))[0]
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{who}: lengths[{i}] = {int(lengths[i])} is outside [0, {total}] (the steps of xs / "
            "max_steps)"
        )


@dataclass(slots=True)
class LoopStatistics(ActorStatistics):
    """A loop cell's counters, besides those of every actor.

    Attributes:
        steps: batched cell steps run (forward), over all keys.
        row_steps: row-steps run (a row that takes 5 steps counts 5).
        max_steps_seen: the most steps any key took.
    """

    steps: int = 0
    row_steps: int = 0
    max_steps_seen: int = 0


class LoopActor(LayerActor):
    """Runs a key's steps back to back (only the rows still active at each step) and unwinds
    them in reverse on the backward."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats = LoopStatistics()
        self.loop: Loop = self.module

    def _unroll(self, params: Any, inputs: list[Any], tape: bool) -> tuple[Any, list[Any], Any]:
        loop = self.loop
        xp = self.backend.xp
        h, xs, lengths = loop.split(self._to_device(inputs))
        n = int(h.shape[0])
        total = loop.steps(xs)
        if lengths is not None:
            lengths = np.asarray(self.backend.to_numpy(lengths))
            check_lengths(lengths, total, f"loop {self.name!r}")
            active = lengths > 0
        else:
            active = np.ones(n, dtype=bool)
        steps_done = np.zeros(n, dtype=np.int64)
        outs = xp.zeros((n, total, *h.shape[1:]), dtype=h.dtype) if loop.output == "all" else None
        records: list[tuple[Any, Any]] = []
        for t in range(total):
            rows = np.nonzero(active)[0]
            if not len(rows):
                break
            r = xp.asarray(rows)
            x = None if xs is None else xs[r, t]
            if tape:
                new, pullback = vjp(lambda p, a, b: loop.step(p, a, b), params, h[r], x)
                records.append((r, pullback))
            else:
                new = loop.step(params, h[r], x)
            h = h.copy()
            h[r] = new
            if outs is not None:
                outs[r, t] = new
            steps_done[rows] += 1
            if lengths is not None:
                active = lengths > t + 1
            if loop.until is not None:
                stop = np.asarray(self.backend.to_numpy(loop.until({}, new)), dtype=bool)
                active[rows[stop.reshape(-1)]] = False
        return (outs if outs is not None else h), records, steps_done

    def _unroll_cost(self, inputs: list[Any]) -> float | None:
        """The cell's cost per row-step, times the steps: a long unroll of a small cell is big
        work (it goes to a worker thread, off the event loop, when over the inline threshold).
        None on a GPU, whose compute ignores the cost (and counting the steps would read the
        lengths back from the device)."""
        if not self.on_cpu:
            return None
        return self._cost(1) * planned_row_steps(self.loop, inputs)

    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        keep = self.keep_pullback
        cost = self._unroll_cost(inputs)
        out, records, steps = await self.compute(self._unroll, self.params, inputs, keep, cost=cost)
        self._hold(key, (records if keep else None, self.version, inputs), inputs, out)
        st = self.stats
        assert isinstance(st, LoopStatistics)
        taken = int(steps.max()) if len(steps) else 0
        st.steps += taken
        st.row_steps += int(steps.sum())
        st.max_steps_seen = max(st.max_steps_seen, taken)
        rec = self.run.recorder
        if rec is not None:
            rec.event(self.name, "loop", FORWARD, key, self.version, "", self.seq,
                      meta={"steps": [int(s) for s in steps]})  # fmt: skip
        return out

    def _unwind(self, records: list[tuple[Any, Any]], grad: Any, inputs: list[Any]) -> Any:
        loop = self.loop
        xp = self.backend.xp
        h, xs, lengths = loop.split(self._to_device(inputs))
        if loop.output == "all":
            g_all, gh = grad, xp.zeros_like(h)
        else:
            g_all, gh = None, grad.copy()
        gxs = None if xs is None else xp.zeros_like(xs)
        acc = None
        for t in range(len(records) - 1, -1, -1):
            r, pullback = records[t]
            g = gh[r] if g_all is None else gh[r] + g_all[r, t]
            gp, g_h, g_x = pullback(g)
            gh[r] = g_h
            if gxs is not None and g_x is not None:
                gxs[r, t] = g_x
            acc = gp if acc is None else _tree_add(acc, gp)
        grads: list[Any] = [gh]
        if loop.has_xs:
            grads.append(gxs)
        if loop.has_lengths:
            grads.append(None)
        return acc, grads

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> list[Any] | None:
        records, _, inputs = self._unhold(key)
        if records is None:  # recompute at the latest version (no stashing)
            cost = self._unroll_cost(inputs)
            _, records, _ = await self.compute(self._unroll, self.params, inputs, True, cost=cost)
        row_steps = sum(len(r) for r, _ in records)
        param_grads, input_grads = await self.compute(
            self._unwind, records, grad, inputs, cost=2 * self._cost(1) * row_steps
        )
        # param_grads is None when no row took a step: accumulate counts it as a zero gradient
        await self._settle(param_grads, meta)
        return list(input_grads)


@dataclass(frozen=True)
class RNNCell(Module):
    """An Elman cell for loops: ``h <- tanh(x_t @ w_x + h @ w_h + bias)``.

    Params: ``{"w_x": (input_size, hidden_size), "w_h": (hidden_size, hidden_size),
    "bias": (hidden_size,)}``, uniform in ``±1/sqrt(hidden_size)`` (as torch's RNN).
    """

    input_size: int
    hidden_size: int

    def init_params(self, init: Initializer) -> Any:
        from asyncnn._math._nn._module import fan_in_bound

        b = fan_in_bound(self.hidden_size)
        return {
            "w_x": init.uniform((self.input_size, self.hidden_size), b),
            "w_h": init.uniform((self.hidden_size, self.hidden_size), b),
            "bias": init.uniform((self.hidden_size,), b),
        }

    def __call__(self, params: Any, h: Any, x: Any, *, rng: Any = None) -> Any:
        from asyncnn import ops

        pre = ops.add(ops.matmul(x, params["w_x"]), ops.matmul(h, params["w_h"]))
        return ops.tanh(ops.add(pre, params["bias"]))
