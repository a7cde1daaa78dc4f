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

__all__ = ["_hook_failed", "_set_up", "record_setup_failure"]


def _set_up(actor: Any, node: Any, state: Any) -> None:
    """Runs a new actor's ``setup`` with its node's arguments, then restores its own state
    (a copy: an actor that changes it in place must not change the caller's ``RunState``).
    A failure of either is written to the run's trace as the actor's error (kind ``"setup"``
    or ``"load_actor_state"``) before it is raised: it fails the run before the actors serve,
    where the run's own reporting (``hosting``) writes nothing, and the trace of such a run
    said nothing of why it did nothing."""
    hook = "setup"
    try:
        _setup(actor, node)
        if state is not None:
            hook = "load_actor_state"
            _load(actor, node, state)
    except Exception as exc:
        _record_failure(actor, node.name, hook, exc)
        raise


def _setup(actor: Any, node: Any) -> None:
    """Calls ``actor.setup`` with ``node``'s arguments, each failure named."""
    cls = type(actor)
    check_sync_hooks(node.name, cls)  # (a graph whose node was given its actor later)
    where = f"layer {node.name!r}: "
    try:
        inspect.signature(actor.setup).bind(**node.actor_args)
    except TypeError as exc:  # the arguments do not fit the hook: the graph's fault
        raise GraphError(f"{where}{cls.__name__}.setup: {exc}") from exc
    # what the runtime gave the actor before its setup: a setup that rebinds one of them
    # (self.events = [], self.acc = 0.0: natural names for an actor's own state) broke the
    # run later, with an error that named none of it
    given = dict(vars(actor))
    settable = {n: getattr(actor, n) for n in _runtime_setters(cls)}
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
    now = vars(actor)
    rebound = [n for n, v in given.items() if n not in now or now[n] is not v]
    rebound += [n for n, v in settable.items() if getattr(actor, n) is not v]
    if rebound:
        # (a property's setter rebinds a private attribute too: name the one set)
        rebound = [n for n in rebound if not n.startswith("_")] or rebound
        names = ", ".join(f"self.{n}" for n in sorted(rebound))
        raise GraphError(
            f"layer {node.name!r}: {cls.__name__}.setup set {names}, which the runtime keeps "
            "there for the actor itself (its messages, weights and counters): the run would "
            "fail or train wrong later, far from here. Give the actor's own state a name of "
            f"its own (self._my_{sorted(rebound)[0]}, say); change weights with "
            "apply_gradients"
        )


def _runtime_setters(cls: type) -> list[str]:
    """The properties with a setter that asyncnn's own bases of ``cls`` define (``acc``): a
    setup's assignment to one goes through it, not into the instance's attributes."""
    return sorted(
        {
            name
            for base in cls.__mro__
            if base.__module__.startswith("asyncnn.")
            for name, v in vars(base).items()
            if isinstance(v, property) and v.fset is not None
        }
    )


def _load(actor: Any, node: Any, state: Any) -> None:
    """Gives ``actor`` a copy of its own ``state`` (``load_actor_state``), a failure named."""
    cls = type(actor)
    state = copy.deepcopy(state)
    if not _custom_hook(cls, "load_actor_state"):
        actor.load_actor_state(state)  # (asyncnn's own: its refusal names the layer)
        return
    try:
        actor.load_actor_state(state)
    except Exception as exc:
        raise _hook_failed(node.name, cls, "load_actor_state", exc) from exc


def _record_failure(actor: Any, name: str, hook: str, error: Exception) -> None:
    """Writes the error of layer ``name``'s set-up ``hook`` to the run's trace, as an actor's
    error is written (``record_error``): the layer, the hook as its kind, no key, the text.
    Not on a cluster's worker: the driver's trace records a worker's failure."""
    record_setup_failure(getattr(getattr(actor, "ctx", None), "recorder", None), name, hook, error)


def record_setup_failure(recorder: Any, name: str, hook: str, error: Exception) -> None:
    """:func:`_record_failure` given the run's recorder (an actor that could not be made has
    none to ask: the runtime's own refusals as it is built, kind ``"setup"``)."""
    if recorder is None or not recorder.records_errors:
        return
    recorder.event(name, "error", hook, -1, meta={"error": str(error) or type(error).__name__})


def _hook_failed(name: str, cls: type, hook: str, exc: Exception) -> ActorError:
    """The error of a custom actor's set-up hook that raised (it names no layer itself)."""
    return ActorError(
        name, hook, None,
        f"actor {name!r} failed in {cls.__name__}.{hook}: {type(exc).__name__}: {exc}",
    )  # fmt: skip
