"""Checks of the arguments given to :class:`~asyncnn._runtime._graph.Graph`'s builders (a
node's module and worker; ``Graph.sequential``'s modules and stages), as each node is added:
apart from the graph, which wires the nodes, so that what each argument may be is read in one
place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncnn._errors import GraphError
from asyncnn._math._nn import Module, Sequential

__all__ = ["check_module", "checked_worker", "checked_modules", "checked_stages"]


def checked_stages(stages: Any) -> int | list[int]:
    """``Graph.sequential``'s ``stages``, checked: an int (numpy's too), or a list of ints."""
    if isinstance(stages, Sequence | np.ndarray) and not isinstance(stages, str):
        parts = list(stages)
        if all(isinstance(s, int | np.integer) and not isinstance(s, bool) for s in parts):
            return [int(s) for s in parts]
    elif isinstance(stages, int | np.integer) and not isinstance(stages, bool):
        return int(stages)
    raise GraphError(
        f"sequential: stages={stages!r}; give the number of stages (an int) or the number of "
        "modules in each stage (a list of ints, e.g. [2, 3])"
    )


def check_module(who: str, module: Any) -> None:
    """Refuses a module's class given for the module (``nn.Linear`` for ``nn.Linear(4, 8)``),
    and a recurrent layer that gives its state beside its output (``return_state=True``): a
    graph's layer gives one array, and the pair failed only later, in the module after it."""
    if isinstance(module, type):
        raise GraphError(
            f"{who}: got the class {module.__name__}, not a module; pass an instance, e.g. "
            f"{module.__name__}(...) with its arguments"
        )
    paired = _gives_state(module)
    if paired is not None:
        raise GraphError(
            f"{who}: {paired!r} gives a pair, (output, state) (return_state=True), where a "
            "graph's layer gives one array; drop return_state (in a graph each sequence starts "
            'at zero state), and give output="last" for the last step\'s output alone'
        )


def _gives_state(module: Any) -> Any:
    """The recurrent layer in ``module`` (itself, or in a Sequential or Residual, nested ones
    too) built with ``return_state=True``, or None."""
    from asyncnn._math._nn import Residual
    from asyncnn._math._nn._recurrent import _Recurrent

    if isinstance(module, _Recurrent):
        return module if module.return_state else None
    children = (
        module.modules
        if isinstance(module, Sequential)
        else (module.module,)
        if isinstance(module, Residual)
        else ()
    )
    for child in children:
        found = _gives_state(child)
        if found is not None:
            return found
    return None


def checked_worker(who: str, worker: Any) -> int | None:
    """A node's ``worker=``, checked when the node is added: None (the driver) or an int >= 0
    (numpy's too, as ``workers=np.arange(2)`` gives), returned as a Python int so that specs
    stay plain JSON. Without a cluster ``worker=`` is ignored, so a wrong one is refused here,
    not only when a cluster runs the graph. A bool is refused: ``True`` is no worker's number."""
    if worker is None:
        return None
    if isinstance(worker, int | np.integer) and not isinstance(worker, bool | np.bool_):
        if worker >= 0:
            return int(worker)
    raise GraphError(
        f"{who} is placed on worker={worker!r:.40} (of type {type(worker).__name__}): worker= "
        "takes an int >= 0 (the worker's number), or None for the driver"
    )


def checked_modules(modules: Any) -> list[Any]:
    """``Graph.sequential``'s ``modules``, checked: a list (or other iterable) of module
    instances, each named by its place in the list where it is not one."""
    try:
        if isinstance(modules, Module) and not isinstance(modules, Sequential):
            raise TypeError("one module, not a list of them")
        listed = list(modules)
    except TypeError:
        raise GraphError(
            f"sequential: modules={modules!r:.80}; give a list of modules, e.g. "
            "[nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10)]"
        ) from None
    for i, m in enumerate(listed):
        if isinstance(m, type):
            raise GraphError(
                f"sequential: modules[{i}] is the class {m.__name__}, not a module; pass an "
                f"instance, e.g. {m.__name__}(...) with its arguments"
            )
        if not isinstance(m, Module):
            raise GraphError(
                f"sequential: modules[{i}] is {type(m).__name__} ({m!r:.40}), not an nn.Module"
            )
    return listed
