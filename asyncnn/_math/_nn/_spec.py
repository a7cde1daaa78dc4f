"""Modules as plain, msgpack-able specs: ``{"type": "Linear", "args": {...}}`` and back.

Built-in modules are named by class name; any other ``Module`` subclass by its import path
``"package.module:Class"``, so a worker process rebuilds it by importing that module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .._imports import class_path, import_by_path
from ._activations import (
    ELU,
    GELU,
    Hardtanh,
    Identity,
    LeakyReLU,
    LogSoftmax,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Softplus,
    Tanh,
)
from ._attention import MultiHeadAttention
from ._containers import Residual, Sequential
from ._conv import (
    AvgPool1d,
    AvgPool2d,
    Conv1d,
    Conv2d,
    MaxPool1d,
    MaxPool2d,
    MaxUnpool1d,
    MaxUnpool2d,
)
from ._linear import Embedding, Linear
from ._loops import Loop, RNNCell
from ._losses import CrossEntropyLoss, MSELoss
from ._module import Module, _check_dataclass, rebuilding
from ._norm import GroupNorm, LayerNorm
from ._recurrent import GRU, LSTM, GRUCell, LoopCell, LSTMCell
from ._reshape import Dropout, Flatten
from ._routing import Merge, Router

__all__ = ["BUILTINS", "from_spec", "to_spec"]

BUILTINS: dict[str, type[Module]] = {
    cls.__name__: cls
    for cls in (
        AvgPool1d, AvgPool2d, Conv1d, Conv2d, CrossEntropyLoss, Dropout, ELU, Embedding,
        Flatten, GELU, GRU, GRUCell, GroupNorm, Hardtanh, Identity, LayerNorm, LeakyReLU, Linear,
        LogSoftmax, Loop, LoopCell, LSTM, LSTMCell, MaxPool1d, MaxPool2d, MaxUnpool1d,
        MaxUnpool2d, Merge, MSELoss, MultiHeadAttention, ReLU, Residual, RNNCell, Router,
        Sequential, SiLU, Sigmoid, Softmax, Softplus, Tanh,
    )
}  # fmt: skip


def _type_name(cls: type) -> str:
    if BUILTINS.get(cls.__name__) is cls:
        return cls.__name__
    try:
        return class_path(cls)
    except ValueError as exc:
        raise ValueError(f"to_spec: {exc}") from None


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, Module):
        return to_spec(value)
    if isinstance(value, tuple | list):
        return [_encode(v, where) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"to_spec: {where} holds a {type(value).__name__}, which a spec cannot carry; module "
        "fields must be None, bool, int, float, str, modules, or tuples of those"
    )


def to_spec(module: Module) -> dict[str, Any]:
    """A plain dict describing ``module`` (msgpack-able; nested modules nested).

    Raises:
        TypeError: when ``module`` is not an nn.Module dataclass, or a field holds a value a
            spec cannot carry.
    """
    if not isinstance(module, Module):
        raise TypeError(f"to_spec needs an nn.Module, got {type(module).__name__}")
    cls = type(module)
    _check_dataclass(cls)
    name = _type_name(cls)
    # A field the constructor does not take (``field(init=False)``, derived in __post_init__)
    # is left out: from_spec could not pass it back, and the rebuilt module derives it again.
    args = {
        f.name: _encode(getattr(module, f.name), f"{cls.__name__}.{f.name}")
        for f in dataclasses.fields(module)
        if f.init
    }
    return {"type": name, "args": args}


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return from_spec(value)
    if isinstance(value, list | tuple):
        return tuple(_decode(v) for v in value)
    return value


def _resolve(name: str) -> type[Module]:
    if ":" not in name:
        cls = BUILTINS.get(name)
        if cls is None:
            raise ValueError(
                f"from_spec: unknown module type {name!r}; built-ins are {sorted(BUILTINS)}, "
                "other classes are named 'package.module:Class'"
            )
        return cls
    try:
        imported: type[Module] = import_by_path(name, Module, "module type")
    except ValueError as exc:
        raise ValueError(f"from_spec: {exc}") from exc
    return imported


def _check_args(name: str, cls: type[Module], args: Mapping[str, Any]) -> None:
    """Refuses args the class's constructor would not take, before calling it (which would
    raise a bare TypeError, or a KeyError for Sequential)."""
    _check_dataclass(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = sorted(str(k) for k in args if k not in names)
    missing = [
        f.name
        for f in fields
        if f.name not in args
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if unknown or missing:
        problems = []
        if missing:
            problems.append(f"lack {missing}")
        if unknown:
            problems.append(f"have unknown {unknown}")
        raise ValueError(
            f"from_spec: the args of {name!r} {' and '.join(problems)}; it takes "
            f"{[f.name for f in fields]} (was the spec written for another version of it?)"
        )


def from_spec(spec: dict[str, Any]) -> Module:
    """Rebuilds a module from :func:`to_spec`'s output (lists become tuples).

    Raises:
        ValueError: on a malformed spec, a type that cannot be found, or args its class does
            not take (missing or unknown names), naming them.
    """
    if (
        not isinstance(spec, dict)
        or set(spec) != {"type", "args"}
        or not isinstance(spec["type"], str)
        or not isinstance(spec["args"], Mapping)
    ):
        raise ValueError(
            f"from_spec: a module spec is {{'type': str, 'args': {{...}}}}, got {spec!r:.200}"
        )
    cls = _resolve(spec["type"])
    _check_args(spec["type"], cls, spec["args"])
    # (a rebuild: the user was warned of its arguments where they built it, see is_rebuilding)
    with rebuilding():
        args = {k: _decode(v) for k, v in spec["args"].items()}
        from_args = getattr(cls, "_from_args", None)
        return from_args(args) if from_args is not None else cls(**args)
