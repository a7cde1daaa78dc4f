"""The checks of what a user's hooks return: a custom actor's ``on_forward`` output (its rows,
trailing shape and dtype: floating where the module's is), its backward hooks' gradients (one
per input slot, each shaped and typed like its input, floating for a floating input), and, with
``check_finite``, its parameters' gradients. Each refuses, under the custom actor's own name
and hook, what would otherwise fail later at another node under that node's name, or train on
without a word. Apart from ``_actors.py``, which holds what each operation computes, because
these only judge its results; asyncnn's own hooks give them right by construction and skip the
checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asyncnn.backends import is_floating

from ._checks import _rows

if TYPE_CHECKING:
    from ._node import Node


class HookChecks:
    """The checks of a custom hook's results, a base of :class:`~._actors.LayerActor` (whose
    set-up gives the attributes below)."""

    #: the trailing shapes of the node's output and inputs the graph checked (None: unknown)
    checked_shapes: tuple[tuple[int, ...], list[tuple[int, ...]]] | None
    #: the actor's context (its ``dtype``: the run's floating dtype, None where not given)
    ctx: Any
    #: key -> each input's (shape, dtype), kept from the forward for its backward's check
    input_sigs: dict[int, list[tuple[tuple[int, ...], Any]]]
    #: (input slot, source node, the source's consumer edge) of each input that gets a gradient
    grad_targets: list[tuple[int, str, int]]
    #: the number of input slots
    n_inputs: int
    #: whether the node's module gives a floating output (None: not asked yet, see
    #: :meth:`_module_output_floating`)
    _output_floating: bool | None = None
    #: the node's parameters, the module applied to them, and a key's random stream
    params: Any
    _apply: Any
    _rng: Any
    #: the actor's backend and stream (its device's work is queued there)
    backend: Any
    stream: Any

    def _check_output(self, out: Any, inputs: list[Any]) -> None:
        """Refuses a custom ``on_forward``'s output whose rows, trailing shape (where the inputs
        have the shapes the graph was checked with) or floating dtype are not those the graph
        expects: its consumers would fail on it under their own names, or train on it."""
        shape = getattr(out, "shape", None)
        if shape is None or out is None or type(out) is tuple or type(out) is list:
            return  # (_outputs says what is wrong with it)
        # (the messages are composed only on the way to an error: this runs every forward)
        hook = f"{type(self).__name__}.on_forward"
        rows = inputs[0].shape[0]
        if not len(shape) or shape[0] != rows:
            got = "no batch dimension" if not len(shape) else _rows(shape[0])
            raise ValueError(
                f"{hook} returned an output of shape {tuple(shape)} for inputs of shape "
                f"{_shapes(inputs)}: "
                f"{got} where its inputs have {_rows(rows)}; return one output row per input "
                "row (the first dimension is the batch, which its consumers read by row)"
            )
        checked = self.checked_shapes
        if checked is not None and tuple(shape[1:]) != checked[0]:
            want, in_trailing = checked
            if all(tuple(x.shape[1:]) == s for x, s in zip(inputs, in_trailing, strict=True)):
                raise ValueError(
                    f"{hook} returned an output of shape {tuple(shape)} for inputs of shape "
                    f"{_shapes(inputs)}, where the graph expects {(rows, *want)} (its module's output, "
                    "which the graph checked its consumers against); return an output of that "
                    "shape"
                )
        dtype = getattr(out, "dtype", None)
        if dtype is None:
            return
        want_dtype = self.ctx.dtype
        if is_floating(dtype):
            # the run's (a layer without floating parameters on integer inputs has nothing
            # else to tell it by)
            if dtype != want_dtype:
                raise TypeError(
                    f"{hook} returned a {dtype} output in a {want_dtype} run; return it in the "
                    f"run's dtype (out.astype({str(want_dtype)!r})): its consumers would compute "
                    f"in {dtype} without a word"
                )
        elif self._module_output_floating(inputs):
            raise TypeError(
                f"{hook} returned an output of dtype {dtype} where the layer's module gives a "
                f"floating one"
                f" ({want_dtype} in this run), which the graph checked its consumers "
                "against and the backward differentiates; return it in the run's dtype "
                f"(out.astype({str(want_dtype)!r})): its consumers would fail on it under "
                "their own names, or compute on truncated values"
            )

    def _module_output_floating(self, inputs: list[Any]) -> bool:
        """Whether the node's module gives a floating output for ``inputs`` (their first row);
        found once, on the first non-floating output a custom ``on_forward`` returns (a module
        may give integers, ids for an Embedding, which a hook then returns rightly)."""
        known = self._output_floating
        if known is None:
            try:
                first = [x[:1] for x in inputs]
                # (on the actor's device and stream, as its own compute runs: on another GPU
                # its parameters would not be at hand)
                with self.backend.activate(self.stream):
                    out = self._apply(self.params, first, self._rng(0))
                known = bool(is_floating(out.dtype))
            except Exception:  # noqa: BLE001 - no answer: the output is let through, as before
                known = False
            self._output_floating = known
        return known

    def _check_grad_shapes(self, hook: str, key: int, grads: list[Any] | None) -> None:
        """Refuses a custom backward hook's gradient whose shape or floating dtype is not that
        of the input it is the gradient of (what the key's forward was given): the layer
        upstream would fail on it under its own name, or train on it."""
        sigs = self.input_sigs.pop(key, None)
        if grads is None or sigs is None:
            return
        for slot, src, _ in self.grad_targets:
            grad = grads[slot]
            shape = getattr(grad, "shape", None)
            if grad is None or shape is None or not len(shape):
                continue  # (_send_grads says what is wrong with a 0-d or shapeless one)
            want, want_dtype = sigs[slot]
            if tuple(shape) != want:
                raise ValueError(
                    f"{self._gave(hook, slot, src)} a gradient of shape {tuple(shape)} for an input of shape {want}; "
                    "return one gradient shaped like its input (None for no gradient)"
                )
            dtype = getattr(grad, "dtype", None)
            if dtype is None or dtype == want_dtype:
                continue
            if is_floating(dtype):
                raise TypeError(
                    f"{self._gave(hook, slot, src)} a {dtype} gradient for a {want_dtype} input; return it in its "
                    f"input's dtype (g.astype({str(want_dtype)!r}))"
                )
            if is_floating(want_dtype):
                raise TypeError(
                    f"{self._gave(hook, slot, src)} a gradient of dtype {dtype} for a {want_dtype} "
                    "input; the gradient "
                    "of a floating input must be floating, in its input's dtype "
                    f"(g.astype({str(want_dtype)!r})): the layer upstream would train on "
                    "truncated values"
                )

    def _gave(self, hook: str, slot: int, src: str) -> str:
        """The start of an error about what ``hook`` gave for input ``slot``."""
        return f"{type(self).__name__}.{hook} gave input slot {slot} (from {src!r})"

    def _checked_grads(self, hook: str, grads: Any) -> list[Any] | None:
        """What a backward hook returned, if it is None or one gradient per input slot (a
        tensor, or a list of another length, would reach the layers upstream as wrong
        gradients, or fail there under their names)."""
        if grads is None:
            return None
        if type(grads) is not list and type(grads) is not tuple:
            raise TypeError(
                f"{type(self).__name__}.{hook} returned {type(grads).__name__}; it must return "
                f"a list of one gradient per input slot ({self.n_inputs}; None for no "
                "gradient), or None"
            )
        if len(grads) != self.n_inputs:
            raise ValueError(
                f"{type(self).__name__}.{hook} returned {len(grads)} gradients for "
                f"{self.n_inputs} input slot(s); return one per slot (None for no gradient)"
            )
        return grads if type(grads) is list else list(grads)


def _shapes(inputs: list[Any]) -> str:
    return ", ".join(str(tuple(x.shape)) for x in inputs)


def _custom_hook(cls: type, name: str) -> bool:
    """Whether ``cls``'s hook ``name`` is a user's, not one of asyncnn's own actors' (whose
    results are right by construction and go unchecked)."""
    module = getattr(getattr(cls, name, None), "__module__", None) or ""
    return not module.startswith("asyncnn._runtime.")


def _checked_shapes(graph: Any, node: Node) -> tuple[tuple[int, ...], list[tuple[int, ...]]] | None:
    """The trailing shape (past the batch) of ``node``'s output and of each of its inputs, as
    the graph's check found them; None where it did not record them."""
    shapes = graph.shapes
    out = shapes.get(node.name)
    ins = [shapes.get(src) for src in node.inputs]
    if out is None or any(s is None for s in ins):
        return None
    return tuple(out[1:]), [tuple(s[1:]) for s in ins if s is not None]
