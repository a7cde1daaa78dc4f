"""Checks of a graph's specs that need no execution: cycles, custom actors named by path, and
the arguments of custom actors."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from asyncnn._errors import GraphError
from asyncnn._math._imports import UntrustedModuleError
from asyncnn._math._nn import Sequential
from asyncnn._math._nn import from_spec as module_from_spec

from ._node import Node

__all__ = [
    "SYNC_HOOKS",
    "actor_from_spec",
    "check_actor_args",
    "check_cycles",
    "check_spec_layout",
    "check_sync_hooks",
]

#: the hooks of a custom actor the run calls synchronously (never awaits)
SYNC_HOOKS = ("setup", "actor_state", "load_actor_state")

# (also, for Graph: _init_offset, _spec_of, _module_from_spec and _actor_from_spec, which read
# and write one node's spec, their errors naming the node)


def check_spec_layout(spec: Any) -> None:
    """Rejects a graph spec whose containers are not what :meth:`Graph.to_spec` writes (a
    damaged trace or checkpoint): a dict with a list of node dicts, each node's ``inputs`` a
    list of names, and a dict of ``outputs``."""
    if not isinstance(spec, dict) or not isinstance(spec.get("nodes"), list):
        raise GraphError(
            f"graph spec: {type(spec).__name__} with nodes {spec.get('nodes') if isinstance(spec, dict) else None!r:.80}; "
            "expected a dict with a list of 'nodes', as Graph.to_spec writes"
        )
    extra = sorted(set(spec) - {"nodes", "outputs"}, key=str)
    if extra:
        raise GraphError(
            f"graph spec: unknown field {extra[0]!r}; a graph spec has 'nodes' and 'outputs'"
        )
    for i, entry in enumerate(spec["nodes"]):
        if not isinstance(entry, dict):
            raise GraphError(f"graph spec: node {i} is {entry!r:.80}, not a dict")
        inputs = entry.get("inputs", [])
        if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
            raise GraphError(
                f"graph spec: node {entry.get('name', i)!r} has inputs {inputs!r:.80}; expected a "
                "list of node names"
            )
        _check_fields(i, entry)
    outputs = spec.get("outputs", {})
    if not isinstance(outputs, dict):
        raise GraphError(f"graph spec: outputs {outputs!r:.80}; expected a dict")
    for name, src in outputs.items():
        if not isinstance(name, str) or not isinstance(src, str):
            raise GraphError(
                f"graph spec: output {name!r:.40}: {src!r:.40}; expected a name and a node name"
            )


#: the fields :meth:`Graph.to_spec` writes for each kind of node (every version has written
#: these), the first ones required: any other field is refused, so that a typo
#: (``stop_gradiant``) or a damaged spec is an error rather than a setting dropped unseen
_FIELDS = {
    "input": (("name", "kind", "shape", "dtype"), ("inputs",)),
    "layer": (
        ("name", "kind", "inputs", "module"),
        ("device", "worker", "actor", "actor_args", "stop_gradient", "recurrent", "init_offset"),
    ),
    "loss": (("name", "kind", "inputs", "module"), ("worker",)),
}


def _check_fields(i: int, entry: dict[str, Any]) -> None:
    """Rejects a node spec with a missing, unknown or mistyped field, naming the node and it."""
    name = entry.get("name")
    node = f"node {i} ({name!r})" if isinstance(name, str) else f"node {i}"
    for field in ("name", "kind"):
        if field not in entry:
            raise GraphError(f"graph spec: {node} is missing the field {field!r}")
    kind = entry["kind"]
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise GraphError(
            f"graph spec: {node} has kind {kind!r:.40}; expected 'input', 'layer' or 'loss'"
        )
    required, optional = _FIELDS[kind]
    missing = [f for f in required if f not in entry]
    if missing:
        raise GraphError(f"graph spec: {kind} {name!r} is missing the field {missing[0]!r}")
    unknown = sorted(set(entry) - set(required) - set(optional), key=str)
    if unknown:
        raise GraphError(
            f"graph spec: {kind} {name!r} has the unknown field {unknown[0]!r:.40}; a {kind} "
            f"node has {', '.join(repr(f) for f in required + optional)}"
        )

    def wrong(field: str, want: str) -> GraphError:
        return GraphError(
            f"graph spec: {kind} {name!r} has {field} {entry[field]!r:.60} (a "
            f"{type(entry[field]).__name__}); expected {want}"
        )

    if kind == "input":
        if entry.get("inputs"):
            raise wrong("inputs", "[] (an input reads no node)")
        if not isinstance(entry["shape"], list | tuple):
            raise wrong("shape", "a list such as [None, 40]")
        if not isinstance(entry["dtype"], str):
            raise wrong("dtype", "a dtype's name such as 'float32'")
        return
    for field in ("stop_gradient", "recurrent"):
        if field in entry and not isinstance(entry[field], bool):
            raise wrong(field, "true or false")
    if "device" in entry and not isinstance(entry["device"], str):
        raise wrong("device", "'cpu' or 'cuda:N'")
    worker = entry.get("worker")
    if worker is not None and (type(worker) is not int or worker < 0):
        raise wrong("worker", "an int >= 0 or None")
    if entry.get("actor") is not None and not isinstance(entry["actor"], str):
        raise wrong("actor", "an import path 'package.module:Class'")
    if entry.get("actor_args") is not None and not isinstance(entry["actor_args"], dict):
        raise wrong("actor_args", "a dict of names to values")


def check_cycles(nodes: list[dict[str, Any]]) -> None:
    """Rejects a spec whose node reads itself or a later node (a cycle, or a wrong order), and
    one with two nodes of one name (which would read as a cycle)."""
    position: dict[Any, int] = {}
    for i, entry in enumerate(nodes):
        name = entry.get("name")
        if name is not None and name in position:
            raise GraphError(
                f"graph spec: nodes {position[name]} and {i} are both named {name!r}; node "
                "names must be unique"
            )
        position[name] = i
    for i, entry in enumerate(nodes):
        for src in entry.get("inputs", []):
            j = position.get(src)
            if j is None or j < i:
                continue
            what = "itself" if j == i else f"{src!r}, which comes after it"
            mark = (
                " (a recurrent edge is marked with 'recurrent': true on a loop node, whose "
                "inputs never name itself: the loop feeds its state back inside)"
            )
            raise GraphError(
                f"graph spec: node {entry.get('name')!r} reads {what}: a cycle. Only a loop "
                f"cell's own recurrent edge may go back, made with g.loop(...){mark}"
            )


#: the built-in role actors as older specs name them: those nodes follow their role instead
_LEGACY_ACTOR_PATHS = frozenset(
    {
        "asyncnn._runtime._routing:RouterActor",
        "asyncnn._runtime._routing:MergeActor",
        "asyncnn._runtime._loops:LoopActor",
    }
)


def actor_from_spec(path: str | None) -> Any:
    """A spec's custom actor class, resolved from its import path by the runtime's actor table
    (only from modules imported or trusted; see ``import_by_path``); the built-in role actors
    older specs name follow the node's role instead (None)."""
    if not path or path in _LEGACY_ACTOR_PATHS:
        return None
    if not isinstance(path, str) or ":" not in path:
        raise GraphError(f"graph spec: actor {path!r} is not an import path 'package.module:Class'")
    from ._actor_table import resolve_actor  # the actors run; the spec only names one

    return resolve_actor(path)


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _as_spec_carries(value: Any) -> Any:
    """A plain value (:func:`_plain`) as a spec carries it to another process: its tuples as
    lists, and its lists and dicts copied (all the way down)."""
    if isinstance(value, list | tuple):
        return [_as_spec_carries(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_spec_carries(v) for k, v in value.items()}
    return value


def check_sync_hooks(name: str, actor: type) -> None:
    """Raises GraphError where the custom actor class of layer ``name`` defines ``setup``,
    ``actor_state`` or ``load_actor_state`` with ``async def``; ``Graph.layer`` checks it when
    the layer is added, the run again when it starts (the same rule, the same message)."""
    for hook in SYNC_HOOKS:
        # an async def would only make a coroutine, dropped unawaited: the actor would run
        # unconfigured (and fail later on an attribute setup never set) or lose its state
        if inspect.iscoroutinefunction(getattr(actor, hook, None)):
            raise GraphError(
                f"layer {name!r}: {actor.__name__}.{hook} is an async def; it must be a "
                "plain def (the run calls it synchronously and never awaits it): write "
                f"`def {hook}(self, ...)`, and do awaited work in on_forward or on_backward"
            )


def check_actor_args(name: str, actor: Any, args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The custom actor's ``setup`` arguments, checked to be plain values it accepts (and the
    actor, to be a ``LayerActor`` subclass whose synchronous hooks are plain defs), as the
    node keeps them: a copy in which every tuple is a list.

    A spec (msgpack) carries a tuple as a list, so ``setup`` got a tuple in the process that
    built the graph and a list after ``Trainer.load``, on a cluster's workers and in a replay;
    taken as a list here, it gets the same list everywhere (and the caller's own lists, changed
    later, are not the graph's)."""
    from ._actors import LayerActor  # the actors run; a graph only names one

    if actor is not None and not (isinstance(actor, type) and issubclass(actor, LayerActor)):
        what = f"the class {actor.__name__}" if isinstance(actor, type) else repr(actor)
        raise GraphError(
            f"layer {name!r}: actor={what:.80} is not a LayerActor subclass; pass a class such "
            "as `class MyActor(ann.LayerActor): ...` (not an instance, nor its name)"
        )
    if actor is not None:
        check_sync_hooks(name, actor)
    if not args:
        return {}
    if actor is None:
        raise GraphError(
            f"layer {name!r}: actor_args={dict(args)!r} but no actor class; pass "
            "actor=YourActor (a LayerActor subclass whose setup takes them)"
        )
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise GraphError(f"layer {name!r}: actor_args must be a dict of names to values")
    bad = [k for k, v in args.items() if not _plain(v)]
    if bad:
        raise GraphError(
            f"layer {name!r}: actor_args {bad} hold values a spec cannot carry "
            f"({', '.join(type(args[k]).__name__ for k in bad)}); use None, bool, int, float, "
            "str, or lists and string-keyed dicts of those"
        )
    setup = getattr(actor, "setup", None)
    if isinstance(actor, type) and getattr(setup, "__qualname__", "") == "LayerActor.setup":
        raise GraphError(
            f"layer {name!r}: {actor.__name__}.setup does not take actor_args {sorted(args)}: "
            "it takes none; override setup(self, ...) to accept them"
        )
    if isinstance(actor, type) and callable(setup):
        try:
            inspect.signature(setup).bind(None, **args)
        except TypeError as exc:
            raise GraphError(
                f"layer {name!r}: {actor.__name__}.setup does not take actor_args "
                f"{sorted(args)}: {exc}"
            ) from exc
    return {k: _as_spec_carries(v) for k, v in args.items()}


def _init_offset(node: Node, offset: Any) -> int | None:
    """A spec's ``init_offset`` of ``node``, checked (see :attr:`Node.init_offset`)."""
    if offset is None:
        return None
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise GraphError(
            f"graph spec: node {node.name!r} has init_offset {offset!r}; it must be an int >= 0"
        )
    if not isinstance(node.module, Sequential):
        raise GraphError(
            f"graph spec: node {node.name!r} has an init_offset but its module is "
            f"{type(node.module).__name__}, not a Sequential (only Graph.sequential's stages "
            "have one)"
        )
    return offset


def _spec_of(node: Node, what: str, to_spec: Any, value: Any) -> Any:
    """``to_spec(value)``, its error naming the node: a spec cannot carry every module or actor
    a run in one process can use (a function, a class defined inside a function, an array)."""
    try:
        return to_spec(value)
    except (TypeError, ValueError) as exc:
        kind = TypeError if isinstance(exc, TypeError) else ValueError
        raise kind(f"{node.kind} {node.name!r}: its {what} cannot be in a spec: {exc}") from exc


def _module_from_spec(entry: dict[str, Any]) -> Any:
    """The module of a node spec, its errors naming the node (an untrusted module's error, which
    says how to trust it, stays a cause of the ``GraphError``, where ``untrusted_cause`` finds
    it)."""
    try:
        return module_from_spec(entry["module"])
    except (TypeError, ValueError) as exc:
        raise GraphError(
            f"graph spec: {entry['kind']} {entry['name']!r} has a module that cannot be "
            f"rebuilt: {exc}"
        ) from exc


def _actor_from_spec(entry: dict[str, Any]) -> Any:
    """The custom actor of a layer spec, its errors naming the node (an untrusted module's
    error, which says how to trust it, passes as it is)."""
    try:
        return actor_from_spec(entry.get("actor"))
    except UntrustedModuleError:
        raise
    except GraphError as exc:
        said = str(exc).removeprefix("graph spec: ")
        raise GraphError(f"graph spec: layer {entry['name']!r}: {said}") from exc
