"""Recurrent layers with torch's semantics: the cells :class:`LSTMCell` and :class:`GRUCell`,
and :class:`LSTM` and :class:`GRU`, which run them over a whole batch-first sequence in one call.

The weights are stored ``(in, out)`` like :class:`~asyncnn.nn.Linear`'s (and
``dynamic.RNNCell``'s), the transpose of torch's, so that a step is ``x @ weight_ih``; they carry
torch's names (``weight_ih``, ``weight_hh_l1_reverse``), and ``asyncnn.interop`` maps them to a
torch ``state_dict`` by name, transposing the weights as it does Linear's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _ops as ops
from .. import _ops_nn as ops_nn
from .._optim_checks import _real
from ._args import store_sizes
from ._module import (
    Initializer,
    Module,
    Shape,
    _reads_rng,
    check_flags,
    check_params,
    fan_in_bound,
    float_input_error,
    is_rebuilding,
)

__all__ = ["GRU", "LSTM", "GRUCell", "LSTMCell", "LoopCell"]

# the primitives themselves where the shapes are checked here already (as Linear does)
_MATMUL = ops.PRIMITIVES["matmul"]
_ADD = ops.PRIMITIVES["add"]
_MULTIPLY = ops.PRIMITIVES["multiply"]
_SUBTRACT = ops.PRIMITIVES["subtract"]


def _shape(x: Any) -> Shape:
    return tuple(getattr(x, "shape", ()))


def _cols(x: Any, part: int, size: int) -> Any:
    """The ``part``-th block of ``size`` columns of ``x`` (batch, gates * size): one gate."""
    return ops.getitem_trusted(x, (slice(None), slice(part * size, (part + 1) * size)))


def _lstm_step(gx: Any, h: Any, c: Any, w_hh: Any, b_hh: Any, size: int) -> tuple[Any, Any]:
    """One LSTM step from ``gx = x @ weight_ih + bias_ih``: torch's gates i, f, g, o."""
    gates = _ADD(gx, _MATMUL(h, w_hh))
    if b_hh is not None:
        gates = _ADD(gates, b_hh)
    i = ops.sigmoid(_cols(gates, 0, size))
    f = ops.sigmoid(_cols(gates, 1, size))
    g = ops.tanh(_cols(gates, 2, size))
    o = ops.sigmoid(_cols(gates, 3, size))
    c = _ADD(_MULTIPLY(f, c), _MULTIPLY(i, g))
    return _MULTIPLY(o, ops.tanh(c)), c


def _gru_step(gx: Any, h: Any, w_hh: Any, b_hh: Any, size: int) -> Any:
    """One GRU step from ``gx = x @ weight_ih + bias_ih``: torch's gates r, z, n, with
    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`` (the reset gate applied after the product)."""
    gh = _MATMUL(h, w_hh)
    if b_hh is not None:
        gh = _ADD(gh, b_hh)
    r = ops.sigmoid(_ADD(_cols(gx, 0, size), _cols(gh, 0, size)))
    z = ops.sigmoid(_ADD(_cols(gx, 1, size), _cols(gh, 1, size)))
    n = ops.tanh(_ADD(_cols(gx, 2, size), _MULTIPLY(r, _cols(gh, 2, size))))
    return _ADD(n, _MULTIPLY(z, _SUBTRACT(h, n)))  # (1 - z) * n + z * h


def _input_gates(x: Any, w_ih: Any, b_ih: Any) -> Any:
    gx = _MATMUL(x, w_ih)
    return gx if b_ih is None else _ADD(gx, b_ih)


def _sequence_gates(x: Any, w_ih: Any, b_ih: Any) -> list[Any]:
    """Each step's ``x_t @ weight_ih + bias_ih`` of a sequence ``x`` (batch, seq, features), from
    one product over all its steps (as torch's): (batch, gates) per step."""
    n, t, width = _shape(x)
    gx = _input_gates(ops.reshape(x, (n * t, width)), w_ih, b_ih)
    return ops.unstack(ops.reshape(gx, (n, t, _shape(gx)[1])), axis=1)


def _torch_init(init: Initializer, hidden_size: int, shapes: dict[str, Shape]) -> Any:
    """torch's initialisation of a recurrent layer: every weight and bias
    ``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``, in the order of ``shapes``."""
    bound = fan_in_bound(hidden_size)
    return {k: init.uniform(s, bound) for k, s in shapes.items()}


def _zeros(x: Any, shape: Shape) -> Any:
    """A zero state of ``x``'s dtype and device (torch's default ``hx``)."""
    return ops.namespace_of(x).zeros(shape, dtype=ops.raw(x).dtype)


@dataclass(frozen=True)
class _Cell(Module):
    """What LSTMCell and GRUCell share: sizes, parameters, input checks."""

    input_size: int
    hidden_size: int
    bias: bool = True

    #: gates per step: 4 (LSTM), 3 (GRU)
    _GATES = 0

    def __post_init__(self) -> None:
        store_sizes(self, "input_size", "hidden_size")
        check_flags(self, "bias")

    def _expected(self) -> dict[str, Shape]:
        i, h, gh = self.input_size, self.hidden_size, self._GATES * self.hidden_size
        shapes: dict[str, Shape] = {"weight_ih": (i, gh), "weight_hh": (h, gh)}
        if self.bias:
            shapes["bias_ih"] = (gh,)
            shapes["bias_hh"] = (gh,)
        return shapes

    def init_params(self, init: Initializer) -> Any:
        return _torch_init(init, self.hidden_size, self._expected())

    def _check_x(self, params: Any, x: Any) -> int:
        """Checks the params and ``x`` (batch, input_size); returns the batch."""
        check_params(self, params, self._expected())
        shape = _shape(x)
        if len(shape) != 2 or shape[1] != self.input_size:
            raise ValueError(
                f"{self!r} got input x of shape {shape}; expected (batch, {self.input_size}) "
                "(for a whole sequence (batch, seq, features) use "
                f"nn.{type(self).__name__.removesuffix('Cell')})"
            )
        if x.dtype.kind in "iub":  # ints, bools: numpy would promote them (int64 to float64)
            raise float_input_error(self, x, params["weight_ih"])
        return shape[0]

    def _check_state(self, name: str, s: Any, batch: int) -> None:
        if _shape(s) != (batch, self.hidden_size):
            raise ValueError(
                f"{self!r}: state {name} has shape {_shape(s)}, expected (batch, hidden_size) = "
                f"({batch}, {self.hidden_size}), the batch of input x"
            )

    def flops(self, *input_shapes: Any) -> int:
        return 2 * (self.input_size + self.hidden_size) * self._GATES * self.hidden_size

    def loop_cell(self) -> LoopCell:
        """This cell with the call of a loop's cell, ``cell(params, h, x_t) -> h``, for
        :meth:`asyncnn.Graph.loop` (see :class:`LoopCell`); its parameters are this cell's."""
        return LoopCell(self)


@dataclass(frozen=True)
class LSTMCell(_Cell):
    """One LSTM step, as ``torch.nn.LSTMCell``: ``cell(params, x, (h, c)) -> (h, c)``.

    ``i, f, g, o`` (torch's gate order) are the four column blocks of
    ``x @ weight_ih + bias_ih + h @ weight_hh + bias_hh``;
    ``c' = sigmoid(f) * c + sigmoid(i) * tanh(g)`` and ``h' = sigmoid(o) * tanh(c')``.

    Params (torch's names, weights stored ``(in, out)`` like :class:`Linear`'s, i.e. the
    transpose of torch's; ``asyncnn.interop`` transposes them): ``"weight_ih"``
    ``(input_size, 4 * hidden_size)``, ``"weight_hh"`` ``(hidden_size, 4 * hidden_size)``,
    ``"bias_ih"`` and ``"bias_hh"`` ``(4 * hidden_size,)`` (absent with ``bias=False``). All are
    initialized as torch's: ``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``.

    It returns two arrays, which a graph node cannot carry (a graph layer gives one array): in a
    graph run a sequence with :class:`LSTM`, or step the cell in a loop with
    :meth:`loop_cell` (whose state is ``h`` and ``c`` side by side). Called directly, it is a
    function like any other (``vjp`` differentiates it).

    Call: ``cell(params, x, state=None)`` with ``x`` (batch, input_size) and ``state`` a pair
    ``(h, c)``, each (batch, hidden_size), or None for zeros (torch's default). Returns the new
    ``(h, c)``.

    Raises:
        ValueError: ``x`` or a state of another shape, or a state that is not a pair, naming
            the cell, the shapes got and expected.
        TypeError: integer or bool input (cast it to a float dtype).
    """

    _GATES = 4

    def __call__(self, params: Any, x: Any, state: Any = None, *, rng: Any = None) -> Any:
        n = self._check_x(params, x)
        if state is None:
            h = c = _zeros(x, (n, self.hidden_size))
        else:
            if not isinstance(state, tuple | list) or len(state) != 2:
                what = f"of shape {_shape(state)}" if hasattr(state, "shape") else repr(state)
                raise ValueError(
                    f"{self!r}: state must be a pair (h, c), each (batch, {self.hidden_size}), "
                    f"or None for zeros, got {type(state).__name__} {what:.80}"
                )
            h, c = state
            self._check_state("h", h, n)
            self._check_state("c", c, n)
        gx = _input_gates(x, params["weight_ih"], params.get("bias_ih"))
        return _lstm_step(gx, h, c, params["weight_hh"], params.get("bias_hh"), self.hidden_size)


@dataclass(frozen=True)
class GRUCell(_Cell):
    """One GRU step, as ``torch.nn.GRUCell``: ``cell(params, x, state) -> h``.

    ``r, z, n`` (torch's gate order) are the three column blocks of the products:
    ``r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)``, ``z`` likewise,
    ``n = tanh(x W_in + b_in + r * (h W_hn + b_hn))``, and ``h' = (1 - z) * n + z * h``.

    Params (torch's names, weights stored ``(in, out)`` like :class:`Linear`'s, the transpose of
    torch's; ``asyncnn.interop`` transposes them): ``"weight_ih"``
    ``(input_size, 3 * hidden_size)``, ``"weight_hh"`` ``(hidden_size, 3 * hidden_size)``,
    ``"bias_ih"`` and ``"bias_hh"`` ``(3 * hidden_size,)`` (absent with ``bias=False``), all
    ``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))`` as torch's.

    Call: ``cell(params, x, state=None)``, torch's order (:class:`LSTMCell`'s keyword), with
    ``x`` (batch, input_size) and ``state`` the previous ``h`` (batch, hidden_size) or None for
    zeros. In a graph it is a layer of two inputs,
    ``g.layer("gru", nn.GRUCell(3, 8), x, h)``. A loop calls its cell the other way round,
    ``cell(params, h, x_t)``: give a loop :meth:`loop_cell`, not the cell itself (whose
    arguments the loop would swap, unnoticed where ``input_size == hidden_size``).

    Raises:
        ValueError: ``x`` or ``h`` of another shape, naming the cell and the shapes.
        TypeError: integer or bool input (cast it to a float dtype).
    """

    _GATES = 3

    def __call__(self, params: Any, x: Any, state: Any = None, *, rng: Any = None) -> Any:
        n = self._check_x(params, x)
        if state is None:
            h = _zeros(x, (n, self.hidden_size))
        else:
            h = state
            self._check_state("h", h, n)
        gx = _input_gates(x, params["weight_ih"], params.get("bias_ih"))
        return _gru_step(gx, h, params["weight_hh"], params.get("bias_hh"), self.hidden_size)

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        return (input_shapes[0][0], self.hidden_size)


@dataclass(frozen=True)
class LoopCell(Module):
    """An :class:`LSTMCell` or :class:`GRUCell` with a loop's call, ``cell(params, h, x_t) ->
    h`` (:meth:`asyncnn.Graph.loop`); made by the cells' ``loop_cell()``.

    A GRU's state is its ``h`` (batch, hidden_size). A loop's state is one array that keeps
    its shape, so an LSTM's is ``h`` and ``c`` side by side, (batch, 2 * hidden_size): start it
    from zeros of that shape, and read ``h`` from its first ``hidden_size`` columns.
    The parameters are the cell's, under its names.

    Example:
        ```python no-run
        h0 = g.input("h0", shape=(None, 2 * 16))  # zeros: h and c
        hc = g.loop("lstm", nn.LSTMCell(3, 16).loop_cell(), h0, xs, lengths)
        ```
    """

    cell: Module

    def __post_init__(self) -> None:
        if not isinstance(self.cell, LSTMCell | GRUCell):
            raise TypeError(
                f"LoopCell: cell must be an nn.LSTMCell or nn.GRUCell, got {self.cell!r:.80}"
            )

    def init_params(self, init: Initializer) -> Any:
        return self.cell.init_params(init)

    def __call__(self, params: Any, h: Any, x: Any, *, rng: Any = None) -> Any:
        cell = self.cell
        if not isinstance(cell, LSTMCell):  # a GRUCell (__post_init__ took no other)
            return cell(params, x, h)
        size = cell.hidden_size
        if len(_shape(h)) != 2 or _shape(h)[1] != 2 * size:
            raise ValueError(
                f"{self!r}: the loop's state has shape {_shape(h)}, expected (batch, "
                f"{2 * size}): an LSTM's h and c side by side (start it from zeros)"
            )
        new_h, new_c = cell(params, x, (_cols(h, 0, size), _cols(h, 1, size)))
        return ops.concatenate([new_h, new_c], axis=1)

    def flops(self, *input_shapes: Any) -> int:
        return self.cell.flops(*input_shapes)


#: the values of LSTM's and GRU's ``output``: every step's output, or the last step's
_OUTPUTS = ("all", "last")


@dataclass(frozen=True)
class _Recurrent(Module):
    """What LSTM and GRU share: the stack of layers (and directions) over a sequence."""

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = True
    dropout: float = 0.0
    bidirectional: bool = False
    return_state: bool = False
    output: str = "all"

    _GATES = 0

    @property
    def stochastic(self) -> bool:
        # dropout between layers draws only where there is a layer after another
        return (bool(self.dropout) and self.num_layers > 1) or _reads_rng(type(self))

    def __post_init__(self) -> None:
        owner = type(self).__name__
        store_sizes(self, "input_size", "hidden_size", "num_layers")
        check_flags(self, "bias", "batch_first", "bidirectional", "return_state")
        if not self.batch_first:
            # a graph cuts its inputs into microbatches along the first axis: time-first input
            # would be cut along time, each piece starting again from a zero state, silently
            raise ValueError(
                f"{owner}: batch_first=False is not supported: asyncnn's recurrent layers take "
                "(batch, seq, features), since a graph splits its inputs into microbatches along "
                "the first axis; transpose time-first input, x.transpose(1, 0, 2), and the "
                "output back"
            )
        dropout = _real(owner, "dropout", self.dropout)
        if not 0 <= dropout <= 1:
            raise ValueError(f"{owner}: dropout must be in [0, 1], got {self.dropout!r}")
        object.__setattr__(self, "dropout", dropout)
        if not isinstance(self.output, str) or self.output not in _OUTPUTS:
            raise ValueError(
                f"{owner}: output must be 'all' (every step's output, (batch, seq, directions * "
                "hidden_size)) or 'last' (the last step's, (batch, directions * hidden_size): "
                f"the top layer's final state), got {self.output!r}"
            )
        if dropout and self.num_layers == 1 and not is_rebuilding():  # (arguments valid)
            # as torch warns: the dropout is between layers, so a user who meant it on the
            # output would silently train without any. Once, where the user builds it: not
            # again from a spec (a load, a graph's rebuild, each worker), at asyncnn's line
            warnings.warn(
                f"{owner}: dropout={float(dropout)!r} does nothing with num_layers=1: it drops "
                "each layer's output but the last's, between layers; give num_layers greater "
                f"than 1 for dropout between layers, or dropout=0.0 (an nn.Dropout after the "
                f"{owner} drops its output)",
                UserWarning,
                stacklevel=3,  # (the line that builds it, past the dataclass's __init__)
            )

    @property
    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> list[str]:
        """torch's name suffixes, in its order: ``_l0``, ``_l0_reverse``, ``_l1``..."""
        dirs = ["", "_reverse"][: self._directions]
        return [f"_l{k}{d}" for k in range(self.num_layers) for d in dirs]

    def _expected(self) -> dict[str, Shape]:
        h, gh, dirs = self.hidden_size, self._GATES * self.hidden_size, self._directions
        shapes: dict[str, Shape] = {}
        for sfx in self._suffixes():
            layer = int(sfx[2:].split("_")[0])
            width = self.input_size if layer == 0 else dirs * h
            shapes[f"weight_ih{sfx}"] = (width, gh)
            shapes[f"weight_hh{sfx}"] = (h, gh)
            if self.bias:
                shapes[f"bias_ih{sfx}"] = (gh,)
                shapes[f"bias_hh{sfx}"] = (gh,)
        return shapes

    def init_params(self, init: Initializer) -> Any:
        return _torch_init(init, self.hidden_size, self._expected())

    def _check_input(self, params: Any, x: Any) -> tuple[int, int]:
        check_params(self, params, self._expected())
        shape = _shape(x)
        if len(shape) != 3 or shape[2] != self.input_size:
            raise ValueError(
                f"{self!r} got input of shape {shape}; expected (batch, seq, {self.input_size}) "
                "(batch first)"
            )
        if shape[1] == 0:
            raise ValueError(f"{self!r} got input of shape {shape}: a sequence of no steps")
        if x.dtype.kind in "iub":  # ints, bools: numpy would promote them (int64 to float64)
            raise float_input_error(self, x, params[f"weight_ih{self._suffixes()[0]}"])
        return shape[0], shape[1]

    def _state_part(self, name: str, s: Any, batch: int) -> list[Any]:
        """A torch-layout initial state ``(num_layers * directions, batch, hidden_size)`` as
        one (batch, hidden_size) array per layer and direction."""
        want = (self.num_layers * self._directions, batch, self.hidden_size)
        if _shape(s) != want:
            raise ValueError(
                f"{self!r}: initial state {name} has shape {_shape(s)}, expected {want} "
                "(num_layers * directions, batch, hidden_size), torch's layout"
            )
        return ops.unstack(s, axis=0)

    def _run(
        self, params: Any, x: Any, init: list[Any], rng: Any, step: Callable[..., Any]
    ) -> tuple[Any, list[Any]]:
        """The output (the output sequence, or with ``output="last"`` the last step's) and
        each layer's and direction's last state. ``init`` holds each layer's and direction's
        initial state (a tuple of arrays, the cell's state); ``step(params, suffix, gx_t,
        state) -> state`` is one step of the cell from ``gx_t = x_t @ weight_ih + bias_ih``,
        and the first array of the state it returns is its output."""
        t_len = int(x.shape[1])
        seq = x  # the layer's input, (batch, seq, features)
        finals: list[Any] = []
        sfx = iter(self._suffixes())
        outs: list[list[Any]] = []
        for layer in range(self.num_layers):
            if layer:
                seq = self._joined(outs, rng)
            outs = []
            for direction in range(self._directions):
                s = next(sfx)
                # every step's input product at once, cut into steps by one unstack: its
                # backward gives the sequence one gradient (a slice per step gave one of the
                # whole sequence each, which the backward added: T^2)
                gxs = _sequence_gates(seq, params[f"weight_ih{s}"], params.get(f"bias_ih{s}"))
                state = init[len(finals)]
                out: list[Any] = [None] * t_len
                order = range(t_len - 1, -1, -1) if direction else range(t_len)
                for t in order:
                    state = step(params, s, gxs[t], state)
                    out[t] = state[0]
                outs.append(out)
                finals.append(state)
        if self.output == "last":  # forward's step T - 1, backward's step 0: each one's last
            last = [f[0] for f in finals[-self._directions :]]
            return (last[0] if len(last) == 1 else ops.concatenate(last, axis=1)), finals
        return self._joined(outs, None), finals

    def _joined(self, outs: list[list[Any]], rng: Any) -> Any:
        """A layer's output sequence (batch, seq, directions * hidden_size) from each
        direction's outputs by step, with dropout between layers given an ``rng``."""
        if self.dropout and rng is not None:
            # one mask per step, in step order: a given rng draws the masks it drew when each
            # step's input was its own array
            steps = [
                ops_nn.dropout(v[0] if len(v) == 1 else ops.concatenate(v, axis=1),
                               float(self.dropout), rng)
                for v in zip(*outs, strict=True)
            ]  # fmt: skip
            return ops.stack(steps, axis=1)
        joined = [ops.stack(out, axis=1) for out in outs]
        return joined[0] if len(joined) == 1 else ops.concatenate(joined, axis=2)

    def flops(self, *input_shapes: Any) -> int:
        steps = int(input_shapes[0][1]) if input_shapes and len(input_shapes[0]) > 1 else 1
        gh, h = self._GATES * self.hidden_size, self.hidden_size
        total = 0
        for layer in range(self.num_layers):
            width = self.input_size if layer == 0 else self._directions * h
            total += self._directions * 2 * (width + h) * gh
        return steps * total

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        if self.return_state or len(input_shapes[0]) != 3:
            return None
        n, t, _ = input_shapes[0]
        width = self._directions * self.hidden_size
        return (n, width) if self.output == "last" else (n, t, width)


_SEQUENCE_DOC = """

    Input ``x`` is batch first, (batch, seq, input_size), as a graph needs (it splits its inputs
    into microbatches along the first axis): ``batch_first=False`` is refused (transpose
    time-first input, ``x.transpose(1, 0, 2)``). The output is (batch, seq, directions *
    hidden_size), the last layer's state at every step (both directions' side by side, forward
    first, as torch's); with ``output="last"`` it is (batch, directions * hidden_size), the last
    layer's final state: for one direction its last step, ``output[:, -1]``; bidirectional, the
    forward direction's last step beside the backward direction's step 0 (the last it runs),
    ``concatenate([output[:, -1, :hidden_size], output[:, 0, hidden_size:]], axis=1)``, which is
    torch's ``cat([h_n[-2], h_n[-1]], 1)``, not its ``output[:, -1]``. So a sequence classifier
    is ``Sequential(LSTM(..., output="last"), Linear(...))``, one graph layer.

    Each step runs the cells' math in Python, over the time axis; each layer's input product
    ``x @ weight_ih`` is one product over all its steps (as torch's), and its backward gives
    the sequence one gradient, so the backward's time grows with the sequence's length, as
    the forward's (batch 32, 32 inputs, hidden 64, float64, 2 cores, an LSTM's backward:
    6 ms at 50 steps, 23 ms at 200, 103 ms at 800).

    Params: torch's names and sizes, the weights stored ``(in, out)`` like :class:`Linear`'s
    (the transpose of torch's; ``asyncnn.interop`` transposes them): per layer ``k`` (and
    ``_reverse`` for the backward direction) ``"weight_ih_l{k}"`` (layer input, G * hidden),
    ``"weight_hh_l{k}"`` (hidden, G * hidden), ``"bias_ih_l{k}"`` and ``"bias_hh_l{k}"``
    (G * hidden,), absent with ``bias=False``; G is the number of gates (LSTM 4, GRU 3), and
    a layer's input is ``input_size`` for the first, ``directions * hidden_size`` after it.
    All are initialized ``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))``, as torch's.

    Attributes:
        input_size: the features of each step's input.
        hidden_size: the features of the state.
        num_layers: layers stacked, each reading the one before's output sequence.
        bias: whether the products have biases.
        batch_first: True only (see above); there for code ported from torch.
        dropout: the drop probability of each layer's output but the last's, in training
            (when called with an ``rng``), as torch's (no effect with one layer, which warns
            as torch's does).
        bidirectional: also run each layer backward over the sequence.
        return_state: also return the final state (see the call), in torch's layout. A direct
            call only: a graph's layer gives one array, and a graph refuses a layer that gives
            a pair when it is built.
        output: ``"all"`` (the default): every step's output, (batch, seq, directions *
            hidden_size); ``"last"``: the last step's only, (batch, directions *
            hidden_size) (see above). Any other value is refused (a ValueError naming the
            module and both values).
    """


@dataclass(frozen=True)
class LSTM(_Recurrent):
    __doc__ = (
        """A multi-layer LSTM over a whole sequence, as ``torch.nn.LSTM(batch_first=True)``.

    ``lstm(params, x, state=(h0, c0))``, ``state`` by keyword only (torch's ``lstm(x, (h0,
    c0))`` positional would read as a graph's second input): torch's ``(h0, c0)``, each
    (num_layers * directions, batch, hidden_size), or None for zeros (in a graph the state
    starts at zeros). Returns the output (the sequence, or its last step with
    ``output="last"``), or with ``return_state=True`` ``(output, (h_n, c_n))``, each of those of
    ``state``'s shape. Each step is :class:`LSTMCell`'s."""
        + _SEQUENCE_DOC
    )

    _GATES = 4

    def __call__(self, params: Any, x: Any, *, state: Any = None, rng: Any = None) -> Any:
        n, _ = self._check_input(params, x)
        layers = self.num_layers * self._directions
        if state is None:
            zero = _zeros(x, (n, self.hidden_size))
            init = [(zero, zero)] * layers
        else:
            if not isinstance(state, tuple | list) or len(state) != 2:
                raise ValueError(
                    f"{self!r}: state must be a pair (h0, c0), each (num_layers * directions, "
                    f"batch, hidden_size), or None for zeros; got {type(state).__name__}"
                )
            hs, cs = self._state_part("h0", state[0], n), self._state_part("c0", state[1], n)
            init = list(zip(hs, cs, strict=True))
        size = self.hidden_size

        def step(p: Any, s: str, gx: Any, hc: tuple[Any, Any]) -> tuple[Any, Any]:
            return _lstm_step(gx, hc[0], hc[1], p[f"weight_hh{s}"], p.get(f"bias_hh{s}"), size)

        out, finals = self._run(params, x, init, rng, step)
        if not self.return_state:
            return out
        return out, (ops.stack([f[0] for f in finals]), ops.stack([f[1] for f in finals]))


@dataclass(frozen=True)
class GRU(_Recurrent):
    __doc__ = (
        """A multi-layer GRU over a whole sequence, as ``torch.nn.GRU(batch_first=True)``.

    ``gru(params, x, state=h0)``, ``state`` by keyword only (as ``LSTM``'s): torch's ``h0``,
    (num_layers * directions, batch, hidden_size), or None for zeros (in a graph the state
    starts at zeros). Returns the output (the sequence, or its last step with
    ``output="last"``), or with ``return_state=True`` ``(output, h_n)``, ``h_n`` of ``h0``'s
    shape. Each step is :class:`GRUCell`'s."""
        + _SEQUENCE_DOC
    )

    _GATES = 3

    def __call__(self, params: Any, x: Any, *, state: Any = None, rng: Any = None) -> Any:
        n, _ = self._check_input(params, x)
        if state is None:
            init = [(_zeros(x, (n, self.hidden_size)),)] * (self.num_layers * self._directions)
        else:
            init = [(s,) for s in self._state_part("h0", state, n)]
        size = self.hidden_size

        def step(p: Any, s: str, gx: Any, h: tuple[Any]) -> tuple[Any]:
            return (_gru_step(gx, h[0], p[f"weight_hh{s}"], p.get(f"bias_hh{s}"), size),)

        out, finals = self._run(params, x, init, rng, step)
        if not self.return_state:
            return out
        return out, ops.stack([f[0] for f in finals])
