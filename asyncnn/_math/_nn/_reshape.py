"""Flatten and Dropout: parameterless layers that are not plain activations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import _ops as ops
from .. import _ops_nn as ops_nn
from ._args import as_int
from ._module import NO_DTYPE, Module, Shape, float_input_error

__all__ = ["Dropout", "Flatten"]


@dataclass(frozen=True)
class Flatten(Module):
    """Merges the axes ``start_dim .. end_dim`` into one (torch's defaults keep the batch axis)."""

    start_dim: int = 1
    end_dim: int = -1

    def __post_init__(self) -> None:
        for name in ("start_dim", "end_dim"):
            value = getattr(self, name)
            axis = as_int(value)  # (a numpy integer is stored as a plain int)
            if axis is None:
                raise ValueError(
                    f"Flatten: {name} must be an int (an axis; negative counts from the end), "
                    f"got {value!r}"
                )
            object.__setattr__(self, name, axis)

    def _span(self, ndim: int) -> tuple[int, int]:
        start = self.start_dim + ndim if self.start_dim < 0 else self.start_dim
        end = self.end_dim + ndim if self.end_dim < 0 else self.end_dim
        if not 0 <= start <= end < ndim:
            raise ValueError(
                f"{self!r} cannot flatten an input with {ndim} dimensions: dims {self.start_dim}"
                f"..{self.end_dim} are not a valid range there"
            )
        return start, end

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        shape = input_shapes[0]
        start, end = self._span(len(shape))
        return (*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :])

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        shape = tuple(x.shape)
        out = self._output_shape(shape)
        assert out is not None
        return ops.reshape(x, out)


@dataclass(frozen=True)
class Dropout(Module):
    """Zeroes each entry with probability ``p`` and scales the rest by ``1/(1-p)``.

    Active only when called with an ``rng`` (training); without one it is the identity.
    ``p=1`` zeroes every entry in training, and its gradient, as torch's ``Dropout(p=1)``. Takes
    floating-point input only, in either mode: integers cannot hold the scaled values (numpy
    would truncate the scale ``1/(1-p)`` to the input's dtype, to 1 for any ``p < 0.5``, leaving
    the output unscaled; torch refuses them in training), and a graph's check, which runs in
    evaluation, then finds an integer input before the first training step does.
    """

    p: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, int | float):
            raise ValueError(
                f"Dropout: p must be a Python float in [0, 1], got {self.p!r} of type "
                f"{type(self.p).__name__}; pass float(p)"
            )
        if not 0 <= self.p <= 1:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {self.p!r}")

    @property
    def stochastic(self) -> bool:
        return True

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        if getattr(x, "dtype", NO_DTYPE).kind in "iub":  # scaled ints would be wrong values
            raise float_input_error(self, x)
        if rng is not None and not hasattr(rng, "random"):
            # (a list of generators is Sequential's form; anything else fails later, unnamed)
            raise TypeError(
                f"{self!r} got rng={type(rng).__name__}, not a Generator: pass one numpy or "
                "cupy Generator (backend.rng(seed)) to train, None to evaluate; a list of them, "
                "one per module, is for nn.Sequential only"
            )
        return ops_nn.dropout(x, float(self.p), rng)

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        return input_shapes[0]
