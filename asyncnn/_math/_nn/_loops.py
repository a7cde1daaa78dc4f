"""The modules of recurrent loops: :class:`Loop` (a cell run over each row's steps) and
:class:`RNNCell`, an Elman cell for it.

Called directly (the graph's check, ``predict``, ``evaluate``, a plain reference), a loop steps
as its actor does: at each step only the rows still active, until none is, with the same result
bit for bit, and differentiably. The runtime runs a loop node with an actor that also unwinds the
steps in reverse (``asyncnn/_runtime/_loops.py``; see ``docs/dynamic.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncnn.backends import to_numpy

from .. import _ops as ops
from .._data import _check_index
from .._pytree import tree_leaves
from ._args import store_sizes
from ._module import Initializer, Module, Shape, check_params, fan_in_bound, float_input_error

__all__ = ["OUTPUTS", "Loop", "RNNCell", "check_lengths", "planned_row_steps", "stop_rows"]

OUTPUTS = ("last", "all")


@dataclass(frozen=True)
class Loop(Module):
    """The module of a loop node: runs ``cell`` over each row's steps.

    Called as ``loop(params, init, [xs], [lengths], rng=None)`` (the inputs it was built with,
    in that order). ``params`` are the cell's. Given an ``rng`` (training), a stochastic cell
    (one with dropout) draws from it at every step in turn; the loop node's actor gives it the
    key's seeded stream, as a plain layer's, and draws the same masks again when it recomputes
    the steps for the backward.

    Attributes:
        cell: ``cell(params, h, x_t) -> h`` (``cell(params, h)`` when there is no ``xs``); the
            new state has the shape of the old.
        has_xs: whether a per-step input ``xs`` of shape ``(rows, steps, ...)`` is read.
        has_lengths: whether an int ``lengths`` input ``(rows,)`` gives each row's steps.
        until: a parameterless module, ``until({}, h)``: one bool per row of ``h``, shape
            ``(rows,)`` or ``(rows, 1)``, true where a row stops after the step that produced
            ``h`` (a stop condition carried in the state); any other shape (one value for the
            whole batch included) or dtype (floats, ints: compare them, ``p > 0.5``) is an
            error (:func:`stop_rows`), and so is an ``until`` with parameters or one that draws
            random numbers (it is called without ``rng``).
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
        if callable(getattr(self.cell, "loop_cell", None)):
            # torch's cells take (x, h) and a loop calls (h, x): with input_size == hidden_size
            # the swap would train on without a word
            raise TypeError(
                f"Loop: {type(self.cell).__name__} takes torch's order, cell(params, x, h), and "
                f"a loop calls cell(params, h, x_t): give its loop form, "
                f"Loop({type(self.cell).__name__}(...).loop_cell(), ...)"
            )
        if self.output not in OUTPUTS:
            raise ValueError(f"Loop: output={self.output!r} must be one of {OUTPUTS}")
        if self.max_steps is not None:  # (not a bool; a numpy int kept as a plain int)
            steps = _check_index(self.max_steps, "Loop: max_steps", 0)
            object.__setattr__(self, "max_steps", steps)
        if not self.has_xs and self.max_steps is None:
            raise ValueError("Loop: without xs, give max_steps (the most steps a row may take)")
        if self.has_lengths and self.until is not None:
            raise ValueError("Loop: give lengths or until, not both")
        if _has_params(self.until):
            raise ValueError(
                f"Loop: until {self.until!r} has parameters, but until is called with none "
                "(until({}, h)) and trains none; compute the stop condition from the state "
                "alone, e.g. with a halting unit in the cell that writes it into the state"
            )
        if self.until is not None and _draws(self.until):
            # called without an rng, it would run as in evaluation in training too, silently
            raise ValueError(
                f"Loop: until {self.until!r} draws random numbers (it reads its rng), but until "
                "is called without one (until({}, h)); draw in the cell instead (it gets the "
                "key's rng in training) and write the stop condition into the state"
            )

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
        return self.steps_of(None if xs is None else tuple(xs.shape))

    def steps_of(self, xs_shape: tuple[int, ...] | None) -> int:
        """The most steps of a key whose ``xs`` has shape ``xs_shape`` (None: no ``xs``)."""
        t = int(xs_shape[1]) if xs_shape is not None else 0
        if self.max_steps is not None:
            return min(t, self.max_steps) if xs_shape is not None else self.max_steps
        return t

    def cell_rng(self, rng: Any) -> Any:
        """The generator the cell draws from, ``rng`` (None in evaluation), or None where the
        cell draws nothing (it is not :attr:`~Module.stochastic`): a cell that only accepts
        ``rng`` is called without it, as before."""
        return rng if rng is not None and self.cell.stochastic else None

    def step(self, params: Any, h: Any, x: Any, rng: Any = None) -> Any:
        """One step of the cell, with its output's shape checked.

        ``rng``: the generator a stochastic cell (dropout) draws this step's masks from, the
        key's one stream that every step draws from in turn (:meth:`cell_rng`'s), or None
        (evaluation, or a cell that draws nothing). Its draws depend only on the rows each step
        runs, so stepping again over the same rows from a fresh copy of the stream draws the
        same masks (the loop actor's recompute)."""
        args = (h,) if x is None else (h, x)
        new = self.cell(params, *args) if rng is None else self.cell(params, *args, rng=rng)
        if tuple(new.shape) != tuple(h.shape):
            raise ValueError(
                f"the loop's cell {self.cell!r} turned a state of shape {tuple(h.shape)} into "
                f"{tuple(new.shape)}; a recurrent state must keep its shape"
            )
        return new

    def __call__(self, params: Any, *inputs: Any, rng: Any = None) -> Any:
        # A plain evaluation (the graph's check, predict, evaluate, references) that steps as
        # the loop actor does: at each step the cell (and until) runs on the rows still active
        # only, so a finished row's state never reaches the cell, the loop ends once no row is
        # active, and the output equals the actor's bit for bit. It stays differentiable: the
        # active rows are gathered (take) and put back (where) by traced ops.
        h, xs, lengths = self.split(list(inputs))
        n = int(h.shape[0])
        total = self.steps(xs)
        xp = ops.namespace_of(h)
        rng = self.cell_rng(rng)
        if lengths is not None:
            # (a device's array reaches the host only explicitly: cupy refuses np.asarray)
            lengths = np.asarray(to_numpy(ops.raw(lengths)))
            check_lengths(lengths, total, "loop")
            active = lengths > 0
        else:
            active = np.ones(n, dtype=bool)
        tail = tuple(int(d) for d in h.shape[1:])
        outs: list[Any] = []
        for t in range(total):
            rows = np.nonzero(active)[0]
            if not len(rows):
                break
            r = xp.asarray(rows)
            x = None if xs is None else ops.getitem_trusted(xs, (r, t))
            new = self.step(params, h if len(rows) == n else ops.take_trusted(h, r, axis=0), x, rng)
            if len(rows) == n:
                h = new
            else:
                # each row's place among the active ones (0 for the others, masked out)
                place = np.zeros(n, dtype=np.int64)
                place[rows] = np.arange(len(rows))
                mask = active.reshape((n, *(1,) * len(tail)))
                h = ops.where(mask, ops.take_trusted(new, xp.asarray(place), axis=0), h)
            if self.output == "all":
                outs.append(h if len(rows) == n else ops.where(mask, h, xp.zeros_like(ops.raw(h))))
            if lengths is not None:
                active = lengths > t + 1
            if self.until is not None:
                stop = to_numpy(ops.raw(self.until({}, new)))
                stopped = np.zeros(n, dtype=bool)
                stopped[rows] = stop_rows(stop, len(rows), tuple(new.shape), self.until, "loop")
                # a new array: the masks taken so far are the traced wheres' conditions
                active = active & ~stopped
        if self.output == "last":
            return h
        # the steps no row took are zeros, as the actor's (rows, steps, ...) output
        rest = xp.zeros((n, total - len(outs), *tail), dtype=ops.raw(h).dtype)
        if not outs:
            return rest
        taken = ops.stack(outs, axis=1)
        return taken if len(outs) == total else ops.concatenate([taken, rest], axis=1)


def planned_row_steps(loop: Loop, inputs: list[Any]) -> int:
    """The row-steps a key will take at most: the sum of its lengths (capped at the steps of
    ``xs`` / ``max_steps``), or every row for every step without lengths."""
    h, xs, lengths = loop.split(inputs)
    total = loop.steps(xs)
    if lengths is None:
        return int(h.shape[0]) * total
    return int(np.clip(np.asarray(to_numpy(lengths)), 0, total).sum())


def _has_params(module: Any) -> bool:
    """Whether ``module`` draws parameters (False where it cannot say: calling it will tell)."""
    init = getattr(module, "init", None)
    if init is None:
        return False
    try:
        return bool(tree_leaves(init(0, dtype="float64")))
    except Exception:
        return False


def _draws(module: Any) -> bool:
    """Whether ``module`` draws random numbers when given an ``rng`` (its ``stochastic``)."""
    try:
        return bool(module.stochastic)
    except Exception:  # (not an nn.Module: it cannot say, and gets no rng to draw from)
        return False


def stop_rows(stop: Any, rows: int, state: tuple[int, ...], until: Any, who: str) -> np.ndarray:
    """``until``'s stop condition for a state of ``rows`` rows as one bool per row, shape
    ``(rows,)``: the one rule for its dtype and shape, at the graph's build (the dense
    evaluation) and in the loop actor alike. It must be bools, ``(rows,)`` or ``(rows, 1)``.

    Raises:
        ValueError: for another dtype (floats, whose cast to bool is true for every nonzero
            value, or ints), or any other shape (one value for the whole batch, ``(rows, 2)``,
            the wrong number of rows), naming ``who``, what was found and what is accepted.
    """
    stop = np.asarray(stop)
    if stop.dtype != np.bool_:
        raise ValueError(
            f"{who}: until {until!r} gave a stop condition of dtype {stop.dtype}; it must give "
            "bools (true: the row stops): compare, e.g. p > 0.5 for a probability, n != 0 for "
            "a count"
        )
    if stop.shape not in ((rows,), (rows, 1)):
        raise ValueError(
            f"{who}: until {until!r} gave a stop condition of shape {stop.shape} for a state of "
            f"shape {state}; it must give one bool per row, shape ({rows},) or ({rows}, 1)"
        )
    return stop.reshape(rows)


def check_lengths(lengths: Any, total: int, who: str) -> None:
    """Raises unless every length is an int in [0, total]: TypeError for lengths of another
    dtype (floats), ValueError for another shape or a length out of range."""
    if lengths.ndim == 1 and lengths.dtype.kind not in "iu":
        # (a TypeError: the graph's check then says to declare the input's dtype, not features)
        raise TypeError(
            f"{who}: lengths must be one int per row, got {lengths.dtype} "
            f"{tuple(lengths.shape)}; declare that input with an integer dtype, "
            "g.input(name, shape=(None,), dtype='int64')"
        )
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


@dataclass(frozen=True)
class RNNCell(Module):
    """An Elman cell for loops: ``h <- tanh(x_t @ w_x + h @ w_h + bias)``.

    Params: ``{"w_x": (input_size, hidden_size), "w_h": (hidden_size, hidden_size),
    "bias": (hidden_size,)}``, uniform in ``±1/sqrt(hidden_size)`` (as torch's RNN). Called as
    ``cell(params, h, x)`` with ``h`` (batch, hidden_size) and ``x`` (batch, input_size).
    """

    input_size: int
    hidden_size: int

    def __post_init__(self) -> None:
        store_sizes(self, "input_size", "hidden_size")

    def _expected(self) -> dict[str, Shape]:
        i, h = self.input_size, self.hidden_size
        return {"w_x": (i, h), "w_h": (h, h), "bias": (h,)}

    def init_params(self, init: Initializer) -> Any:
        b = fan_in_bound(self.hidden_size)
        return {
            "w_x": init.uniform((self.input_size, self.hidden_size), b),
            "w_h": init.uniform((self.hidden_size, self.hidden_size), b),
            "bias": init.uniform((self.hidden_size,), b),
        }

    def __call__(self, params: Any, h: Any, x: Any, *, rng: Any = None) -> Any:
        check_params(self, params, self._expected())
        hs, xs = tuple(h.shape), tuple(x.shape)
        if xs[-1:] != (self.input_size,) or hs[-1:] != (self.hidden_size,) or hs[:-1] != xs[:-1]:
            # (numpy would broadcast a state of one row, or of none, over the batch)
            raise ValueError(
                f"{self!r} got state h of shape {hs} and input x of shape {xs}; expected "
                f"(batch, {self.hidden_size}) and (batch, {self.input_size}), the same batch"
            )
        if x.dtype.kind in "iub":  # ints, bools: numpy would promote them (int64 to float64)
            raise float_input_error(self, x, params["w_x"])
        pre = ops.add(ops.matmul(x, params["w_x"]), ops.matmul(h, params["w_h"]))
        return ops.tanh(ops.add(pre, params["bias"]))
