"""Recurrent loops: a cell actor whose output feeds itself for the next step.

A loop node (made by :meth:`Graph.loop`, its module a :class:`~asyncnn.dynamic.Loop` from the
math) carries a state ``h`` per row through steps
``h <- cell(params, h, xs[:, t])`` (or ``cell(params, h)`` without ``xs``). Each row runs as many
steps as it needs: ``lengths[i]`` steps, or until ``until({}, h)`` says stop (one bool per
row, ``(rows,)`` or ``(rows, 1)``, the rule of ``stop_rows`` that the graph's check applies too;
at most ``max_steps``), so sequences of different lengths (or trees of different shapes, walked
in post-order with a stack in the state) share one key. A key's steps run back to back as one
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
from asyncnn._math._nn._loops import Loop, check_lengths, planned_row_steps, stop_rows

from ._actors import LayerActor
from ._messages import FORWARD
from ._statistics import ActorStatistics
from ._weight_versions import _tree_add

__all__ = ["LoopActor", "LoopStatistics"]


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
                stop = self.backend.to_numpy(loop.until({}, new))
                who = f"loop {self.name!r}"
                active[rows[stop_rows(stop, len(rows), tuple(new.shape), loop.until, who)]] = False
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
        rec = self.ctx.recorder
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
