"""Optimizers from their specs (:meth:`Optimizer.to_spec`): the built-ins by name, others by
import path."""

from __future__ import annotations

from typing import Any

from ._optim import SGD, Optimizer
from ._optim_adam import Adam, AdamW
from ._optim_rms import Adagrad, RMSprop
from ._schedules import build_from_spec, resolve_class, schedule_from_spec

__all__ = ["BUILTINS", "from_spec"]

BUILTINS: dict[str, type[Optimizer]] = {
    cls.__name__: cls for cls in (SGD, Adam, AdamW, RMSprop, Adagrad)
}


def from_spec(spec: dict[str, Any]) -> Optimizer:
    """The optimizer described by ``spec`` (from :meth:`Optimizer.to_spec`).

    Built-ins are named ``"SGD"``, ``"Adam"``, ``"AdamW"``, ``"RMSprop"``, ``"Adagrad"``; other
    :class:`Optimizer` subclasses by import path, ``"package.module:Class"``.

    Raises:
        ValueError: for an unknown name or hyperparameters the optimizer does not take.
    """
    cls = resolve_class(spec, BUILTINS, Optimizer, "optimizer")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if isinstance(kwargs.get("lr"), dict):
        kwargs["lr"] = schedule_from_spec(kwargs["lr"])
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    return build_from_spec(cls, kwargs, spec)
