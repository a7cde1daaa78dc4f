"""Containers: Sequential and Residual."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import _ops as ops
from ._args import check_int
from ._module import Initializer, Module, Shape, shape_of

if TYPE_CHECKING:
    from asyncnn.backends import Backend

__all__ = ["Residual", "Sequential"]


@dataclass(frozen=True, init=False)
class Sequential(Module):
    """Applies modules one after another: ``Sequential(m1, m2, ...)`` (or ``modules=[...]``).

    Params: a list with one entry per module (``{}`` for modules without parameters). An ``rng``
    passed to the call is passed on to every module in turn, or given per module as a list (how
    ``Graph.sequential``'s stages draw each module's masks by its place in the whole chain).
    """

    modules: tuple[Module, ...]

    def __init__(self, *args: Module, modules: Sequence[Module] | None = None) -> None:
        # ``modules=`` is the dataclass field's own name: what dataclasses.replace passes
        if modules is not None:
            if args:
                raise TypeError(
                    "Sequential: pass the modules as separate arguments or as modules=[...], "
                    "not both"
                )
            if not isinstance(modules, list | tuple):
                raise TypeError(
                    f"Sequential: modules= takes a list or tuple of nn.Module, got "
                    f"{type(modules).__name__}"
                )
            args = tuple(modules)
        for i, m in enumerate(args):
            if not isinstance(m, Module):
                raise TypeError(
                    f"Sequential: argument {i} is {type(m).__name__}, not an nn.Module; pass "
                    "modules as separate arguments: Sequential(nn.Linear(4, 8), nn.ReLU())"
                )
            if i and getattr(args[i - 1], "return_indices", False) is True:
                # the next module would take the pair for one array (the ops take a tuple of
                # arrays as their stack): the indices trained on as values, without a word
                raise ValueError(
                    f"Sequential: module {i - 1}, {args[i - 1]!r}, gives (values, indices), "
                    f"which module {i} ({m!r}) would take for one array; give it "
                    "return_indices=False, or call the pool yourself (its indices are for a "
                    "MaxUnpool)"
                )
        object.__setattr__(self, "modules", tuple(args))

    @classmethod
    def _from_args(cls, args: dict[str, Any]) -> Sequential:
        return cls(*args["modules"])

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.modules)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return Sequential(*self.modules[index])
        return self.modules[index]

    def __repr__(self) -> str:
        return f"Sequential({', '.join(repr(m) for m in self.modules)})"

    def init(
        self,
        seed: int,
        backend: str | Backend = "numpy",
        dtype: Any = "float32",
        offset: int = 0,
    ) -> Any:
        """Creates a fresh parameter list (see :meth:`Module.init`).

        Args:
            seed: a non-negative int; module ``i`` draws from the ``i``-th child stream of
                ``numpy.random.SeedSequence(seed)``.
            backend: ``"numpy"``, ``"cupy"``, a device or a Backend.
            dtype: a floating-point dtype.
            offset: seeds the modules as the places ``offset``, ``offset + 1``, ... of a longer
                chain, so that ``Sequential(*ms[k:]).init(s, offset=k)`` equals
                ``Sequential(*ms).init(s)[k:]`` (how ``Graph.sequential``'s stages start
                from the same weights wherever the chain is cut).

        Raises:
            ValueError: a bad seed, dtype or offset.
        """
        start = check_int("Sequential.init", "offset", offset, 0)  # (a numpy int too)
        init = self._initializer(seed, backend, dtype)
        return self._init_children(init.spawn(start + len(self.modules))[start:])

    def init_params(self, init: Initializer) -> Any:
        return self._init_children(init.spawn(len(self.modules)))

    def _init_children(self, inits: list[Initializer]) -> list[Any]:
        return [m.init_params(i) for m, i in zip(self.modules, inits, strict=True)]

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        """Applies the modules in order.

        Args:
            params: one entry per module (see :meth:`init`).
            x: the input of the first module.
            rng: None (evaluation), one Generator that the modules draw from in turn, or a list
                or tuple with one entry per module (a Generator, or None for a module that
                draws nothing): each module draws from its own entry only.

        Returns:
            The last module's output.

        Raises:
            ValueError: ``params``, or a list of ``rng``, not one entry per module.
        """
        modules = self.modules
        if not isinstance(params, list | tuple) or len(params) != len(modules):
            got = f"a {type(params).__name__}"
            if isinstance(params, list | tuple):
                got += f" of length {len(params)}"
            raise ValueError(
                f"Sequential of {len(self.modules)} modules expects params as a list of "
                f"{len(self.modules)} entries (one per module, {{}} where a module has none), "
                f"got {got}; create them with Sequential.init(seed)"
            )
        if isinstance(rng, list | tuple):
            if len(rng) != len(self.modules):
                raise ValueError(
                    f"Sequential of {len(self.modules)} modules expects rng as one Generator or "
                    f"a list of {len(self.modules)} entries (one per module, None where a "
                    f"module draws nothing), got a {type(rng).__name__} of length {len(rng)}"
                )
        if not self._bias_relus:
            if isinstance(rng, list | tuple):
                for m, p, r in zip(modules, params, rng, strict=True):
                    x = m(p, x, rng=r)
                return x
            for m, p in zip(modules, params, strict=True):
                x = m(p, x, rng=rng)
            return x
        fused = self._bias_relus
        per_module = isinstance(rng, list | tuple)
        i = 0
        while i < len(modules):
            if i in fused:  # a Linear with a bias, then a ReLU (which draws nothing): one op
                x = modules[i]._then_relu(params[i], x)  # type: ignore[attr-defined]
                i += 2
                continue
            x = modules[i](params[i], x, rng=rng[i] if per_module else rng)
            i += 1
        return x

    @functools.cached_property
    def _bias_relus(self) -> frozenset[int]:
        """The places of the Linears with a bias that a ReLU follows (exact types: a subclass
        may compute otherwise), which :meth:`__call__` applies with that ReLU as one op."""
        from ._activations import ReLU
        from ._linear import Linear

        modules = self.modules
        found: set[int] = set()
        i = 0
        while i + 1 < len(modules):
            m = modules[i]
            if type(m) is Linear and m.bias and type(modules[i + 1]) is ReLU:
                found.add(i)
                i += 2
            else:
                i += 1
        return frozenset(found)

    def flops(self, *input_shapes: Any) -> int:
        shape = tuple(1 if d is None else int(d) for d in input_shapes[0])
        total = 0
        for m in self.modules:
            total += m.flops(shape)
            shape = shape_of(m, shape)
        return total

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        shape = input_shapes[0]
        for m in self.modules:
            shape = shape_of(m, shape)
        return shape


@dataclass(frozen=True)
class Residual(Module):
    """``x + module(x)``. Params: the wrapped module's own params."""

    module: Module

    def __post_init__(self) -> None:
        if not isinstance(self.module, Module):
            raise TypeError(f"Residual wraps an nn.Module, got {type(self.module).__name__}")

    def init_params(self, init: Initializer) -> Any:
        return self.module.init_params(init)

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        y = self.module(params, x, rng=rng)
        if tuple(y.shape) != tuple(x.shape):
            raise ValueError(
                f"Residual: {self.module!r} maps shape {tuple(x.shape)} to {tuple(y.shape)}; "
                "x + module(x) needs it to keep the shape"
            )
        return ops.add(x, y)

    def flops(self, *input_shapes: Any) -> int:
        return self.module.flops(*input_shapes)

    def _output_shape(self, *input_shapes: Shape) -> Shape | None:
        shape = tuple(input_shapes[0])
        inner = shape_of(self.module, shape)
        if inner != shape:  # (a Sequential's flops would otherwise go on with a wrong shape)
            raise ValueError(
                f"Residual: {self.module!r} maps shape {shape} to {inner}; x + module(x) needs "
                "it to keep the shape"
            )
        return shape
