"""Recurrent loops: a cell actor whose output feeds itself for the next step.

A loop node (made by :meth:`Graph.loop`, its module a :class:`~asyncnn.dynamic.Loop` from the
math) carries a state ``h`` per row through steps
``h <- cell(params, h, xs[:, t])`` (or ``cell(params, h)`` without ``xs``). Each row runs as many
steps as it needs: ``lengths[i]`` steps, or until ``until({}, h)`` says stop (one bool per
row, ``(rows,)`` or ``(rows, 1)``, the rule of ``stop_rows`` that the graph's check applies too;
at most ``max_steps``), so sequences of different lengths (or trees of different shapes, walked
in post-order with a stack in the state) share one key. A key's steps run back to back as one
scheduled forward op, with only the rows still active at each step; its backward unwinds them in
reverse (backpropagation through time), as one backward op (two under ``ZeroBubbleH1``: the
inputs' gradients, then the parameters'), so deterministic policies keep their static orders.
Like any layer's, its forward uses the weights the policy gives (:meth:`forward_weights`), and
its gradient's delay is recorded and corrected by the policy's remedies. The loop is the only
cycle a graph may have: the cell's self edge is marked recurrent in the spec, and any other
cycle is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncnn._math._autodiff import vjp
from asyncnn._math._autodiff_split import vjp_split
from asyncnn._math._nn._loops import Loop, check_lengths, planned_row_steps, stop_rows

from ._actors import LayerActor
from ._messages import BACKWARD, FORWARD
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
        # key -> the rows each step of its forward ran (a backward that recomputes the steps,
        # no pullback kept, runs the same ones)
        self.schedules: dict[int, list[Any]] = {}

    def _unroll(
        self, params: Any, inputs: list[Any], tape: bool, split: bool = False, rng: Any = None
    ) -> tuple[Any, list[Any], Any]:
        """A key's steps: the output, each step's (active rows, pullback) (with ``split``, a
        pullback in two halves, ``vjp_split``'s; without ``tape``, None), and the steps each
        row took. ``rng``: the key's stream (:meth:`_cell_rng`), which a stochastic cell draws
        from at every step in turn; None in evaluation."""
        loop = self.loop
        xp = self.backend.xp
        who = f"loop {self.name!r}"  # for the errors
        h, xs, lengths = loop.split(self._to_device(inputs))
        n = int(h.shape[0])
        total = loop.steps(xs)
        if lengths is not None:
            lengths = np.asarray(self.backend.to_numpy(lengths))
            check_lengths(lengths, total, who)
            active = lengths > 0
        else:
            active = np.ones(n, dtype=bool)
        steps_done = np.zeros(n, dtype=np.int64)
        outs = xp.zeros((n, total, *h.shape[1:]), dtype=h.dtype) if loop.output == "all" else None
        records: list[tuple[Any, Any]] = []
        taper = vjp_split if split else vjp
        for t in range(total):
            rows = np.nonzero(active)[0]
            if not len(rows):
                break
            r = xp.asarray(rows)
            x = None if xs is None else xs[r, t]
            if tape:
                new, pullback = taper(lambda p, a, b: loop.step(p, a, b, rng), params, h[r], x)
                records.append((r, pullback))
            else:
                new = loop.step(params, h[r], x, rng)
                records.append((r, None))
            h = h.copy()
            h[r] = new
            if outs is not None:
                outs[r, t] = new
            steps_done[rows] += 1
            if lengths is not None:
                active = lengths > t + 1
            if loop.until is not None:
                stop = self.backend.to_numpy(loop.until({}, new))
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
        # the weights the policy gives this forward (the latest, a prediction or a pinned
        # version), like any layer's: their version gives the gradient's delay
        params, version = self.forward_weights(key, meta)
        out, records, steps = await self.compute(
            self._unroll, params, inputs, keep, self.splits_backward, self._cell_rng(key),
            cost=cost,
        )  # fmt: skip
        if not keep:
            self.schedules[key] = [r for r, _ in records]
        self._hold(key, (records if keep else None, version, inputs), inputs, out)
        if self.ctx.checks_finite:
            await self._check_finite(FORWARD, key, out)
        st = self.stats
        assert isinstance(st, LoopStatistics)
        taken = int(steps.max()) if len(steps) else 0
        st.steps += taken
        st.row_steps += int(steps.sum())
        st.max_steps_seen = max(st.max_steps_seen, taken)
        rec = self.ctx.recorder
        if rec is not None:
            # the version the steps computed with (PipeDream2BW pins one before the latest)
            rec.event(self.name, "loop", FORWARD, key, version, "", self.seq,
                      meta={"steps": [int(s) for s in steps]})  # fmt: skip
        return out

    def _unwind(
        self, records: list[tuple[Any, Any]], grad: Any, inputs: list[Any], split: bool = False
    ) -> tuple[Any, list[Any]]:
        """Backpropagation through a key's steps, last to first: the parameters' gradient (or,
        with ``split``, the steps' weight halves, last step first, for :func:`_weight_grads`)
        and one gradient per input slot."""
        loop = self.loop
        xp = self.backend.xp
        h, xs, lengths = loop.split(self._to_device(inputs))
        if loop.output == "all":
            g_all, gh = grad, xp.zeros_like(h)
        else:
            g_all, gh = None, grad.copy()
        gxs = None if xs is None else xp.zeros_like(xs)
        acc = None
        halves: list[Any] = []
        for t in range(len(records) - 1, -1, -1):
            r, pullback = records[t]
            g = gh[r] if g_all is None else gh[r] + g_all[r, t]
            if split:
                (g_h, g_x), weight_pullback = pullback(g)
                halves.append(weight_pullback)
            else:
                gp, g_h, g_x = pullback(g)
                acc = gp if acc is None else _tree_add(acc, gp)
            gh[r] = g_h
            if gxs is not None and g_x is not None:
                gxs[r, t] = g_x
        grads: list[Any] = [gh]
        if loop.has_xs:
            grads.append(gxs)
        if loop.has_lengths:
            grads.append(None)
        return (halves if split else acc), grads

    async def on_backward(self, key: int, grad: Any, meta: dict[str, Any]) -> list[Any] | None:
        records, forward_version, inputs = self._unhold(key)
        if records is None:  # not stashed: recompute the steps
            records = await self._recompute(key, forward_version, inputs, False)
        param_grads, input_grads = await self.compute(
            self._unwind, records, grad, inputs, cost=self._unwind_cost(records)
        )
        if self.ctx.checks_finite:
            await self._check_finite(BACKWARD, key, input_grads)
        # param_grads is None when no row took a step: accumulate counts it as a zero gradient;
        # with the forward's version: the gradient's delay is recorded, and corrected by a
        # policy that corrects stale gradients
        await self._settle(param_grads, meta, forward_version)
        return list(input_grads)

    async def on_backward_input(
        self, key: int, grad: Any, meta: dict[str, Any]
    ) -> list[Any] | None:
        # a split backward (ZeroBubbleH1): the steps unwound for the inputs' gradients, each
        # step's weight half kept (the key stays stored, as a layer's does) for the weight half
        records, forward_version, inputs = self.store[key]
        if records is None:  # not stashed: recompute the steps
            records = await self._recompute(key, forward_version, inputs, True)
        cost = self._unwind_cost(records) / 2  # each half about half the work
        halves, input_grads = await self.compute(
            self._unwind, records, grad, inputs, True, cost=cost
        )
        self.store[key] = ((halves, cost), forward_version, inputs)
        if self.ctx.checks_finite:
            await self._check_finite(BACKWARD, key, input_grads)
        return list(input_grads)

    async def on_backward_weight(self, key: int, meta: dict[str, Any]) -> None:
        (halves, cost), forward_version, _ = self._unhold(key)
        param_grads = await self.compute(_weight_grads, halves, cost=cost)
        await self._settle(param_grads, meta, forward_version)

    async def _recompute(
        self, key: int, forward_version: int, inputs: list[Any], split: bool
    ) -> list[tuple[Any, Any]]:
        """A key's steps taped again (its forward kept no pullback), at the latest weights, or
        at the policy's estimate of the forward's (DiscrepancyCorrection), over the rows the
        forward ran at each step: the output's gradient is that of the forward's steps, even
        where other weights would stop a row (``until``) at another step."""
        schedule = self.schedules.pop(key)
        params = await self.recompute_weights(forward_version)
        cost = self._cost(1) * sum(len(r) for r in schedule)
        records: list[tuple[Any, Any]] = await self.compute(
            self._retape, params, inputs, schedule, split, self._cell_rng(key), cost=cost
        )
        return records

    def _cell_rng(self, key: int) -> Any:
        """The stream a stochastic cell draws from over a key's steps, each step in turn: the
        key's own (:meth:`_rng`, seeded by the run's seed, this node's stage and the key, as a
        plain layer's), made afresh for each use, so that the recompute of the steps draws the
        same masks as their forward; None where the cell draws nothing."""
        return self.loop.cell_rng(self._rng(key))

    def _retape(
        self, params: Any, inputs: list[Any], schedule: list[Any], split: bool, rng: Any = None
    ) -> list[tuple[Any, Any]]:
        # the forward's rows at each step, from a fresh copy of its stream (``rng``): each step
        # draws what it drew in the forward, its masks too
        loop = self.loop
        h, xs, _ = loop.split(self._to_device(inputs))
        taper = vjp_split if split else vjp
        records: list[tuple[Any, Any]] = []
        for t, r in enumerate(schedule):
            x = None if xs is None else xs[r, t]
            new, pullback = taper(lambda p, a, b: loop.step(p, a, b, rng), params, h[r], x)
            records.append((r, pullback))
            h = h.copy()
            h[r] = new
        return records

    def _unwind_cost(self, records: list[tuple[Any, Any]]) -> float:
        return 2 * self._cost(1) * sum(len(r) for r, _ in records)


def _weight_grads(halves: list[Any]) -> Any:
    """The parameters' gradient of a split backward: its steps' weight halves (kept last step
    first by :meth:`LoopActor._unwind`), summed in that order, as the one-piece backward sums
    them (None when no row took a step)."""
    acc = None
    for weight_pullback in halves:
        gp = weight_pullback()
        acc = gp if acc is None else _tree_add(acc, gp)
    return acc
