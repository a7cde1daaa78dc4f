"""A new actor's set-up: its custom ``setup`` hook called with its node's ``actor_args``, then
its own state given back through ``load_actor_state``, each failure said under the actor's name
and hook. Apart from ``_run.py``, which starts the actors, because it is the one place a run
calls a user's set-up code."""

from __future__ import annotations

import copy
import inspect
from typing import Any

from asyncnn._errors import ActorError, GraphError

from ._hook_checks import _custom_hook
from ._specs import check_sync_hooks

__all__ = ["_hook_failed", "_set_up"]


def _set_up(actor: Any, node: Any, state: Any) -> None:
    """Runs a new actor's ``setup`` with its node's arguments, then restores its own state
    (a copy: an actor that changes it in place must not change the caller's ``RunState``)."""
    cls = type(actor)
    check_sync_hooks(node.name, cls)  # (a graph whose node was given its actor later)
    where = f"layer {node.name!r}: "
    try:
        inspect.signature(actor.setup).bind(**node.actor_args)
    except TypeError as exc:  # the arguments do not fit the hook: the graph's fault
        raise GraphError(f"{where}{cls.__name__}.setup: {exc}") from exc
    try:  # a copy: a setup that changes a list argument in place must not change the graph
        done = actor.setup(**copy.deepcopy(node.actor_args))
    except TypeError as exc:
        said = str(exc)
        if said.startswith(where):  # the base's own refusal, which names the layer and class
            raise GraphError(said) from exc
        # (a TypeError of the user's own code, len(3): the actor's error, as any other)
        raise _hook_failed(node.name, cls, "setup", exc) from exc
    except Exception as exc:  # the user's set-up failed: as its actor's error, by name
        raise _hook_failed(node.name, cls, "setup", exc) from exc
    if inspect.isawaitable(done):  # an awaitable made another way than by an async def
        getattr(done, "close", lambda: None)()
        raise GraphError(
            f"layer {node.name!r}: {cls.__name__}.setup returned an awaitable, which the run "
            "does not await; setup must be a plain def that configures the actor and returns "
            "None"
        )
    if state is not None:
        state = copy.deepcopy(state)
        if not _custom_hook(cls, "load_actor_state"):
            actor.load_actor_state(state)  # (asyncnn's own: its refusal names the layer)
            return
        try:
            actor.load_actor_state(state)
        except Exception as exc:
            raise _hook_failed(node.name, cls, "load_actor_state", exc) from exc


def _hook_failed(name: str, cls: type, hook: str, exc: Exception) -> ActorError:
    """The error of a custom actor's set-up hook that raised (it names no layer itself)."""
    return ActorError(
        name, hook, None,
        f"actor {name!r} failed in {cls.__name__}.{hook}: {type(exc).__name__}: {exc}",
    )  # fmt: skip
