"""Whether a trace can be replayed: checked before anything runs, so that a trace that cannot
is refused at once with the reason, instead of stalling or failing halfway through."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from asyncnn._errors import TraceFormatError

from ._orders import check_in_flight
from ._read import Trace, missing_workers

if TYPE_CHECKING:
    from asyncnn._runtime._graph import Graph

__all__ = ["Checked", "check_replayable", "optimizer_misfit"]


class Checked(NamedTuple):
    """What :func:`check_replayable` rebuilt and decoded, for the replay to start from as they
    are: decoding the initial state again copied every parameter and optimizer buffer twice.
    The replay takes them over (its start moves the arrays to each layer's device, in place).

    Attributes:
        graph: the header's graph.
        policy: the header's policy.
        optimizer: the header's optimizer.
        params: ``{layer: params}`` (numpy, host).
        opt_states: ``{layer: optimizer state}`` (numpy, host).
        pending: ``{layer: (gradient sum, count)}`` (``{}`` where the record holds none).
        actor_states: ``{layer: state}`` of the custom actors that keep one (``{}`` where none).
        earlier: ``{layer: {version: params}}``, the earlier versions that forwards are pinned
            to (``RunState.earlier_params``; ``{}`` where the record holds none).
        pending_delays: ``{layer: [delay, ...]}``, the delays of the ``pending`` gradients
            (``RunState.pending_delays``; ``{}`` where the record holds none).
    """

    graph: Graph
    policy: Any
    optimizer: Any
    params: dict[str, Any]
    opt_states: dict[str, Any]
    pending: dict[str, Any]
    actor_states: dict[str, Any]
    earlier: dict[str, Any] = {}  # noqa: RUF012 - a NamedTuple's default, never changed
    pending_delays: dict[str, Any] = {}  # noqa: RUF012 - as earlier's


def check_replayable(trace: Trace, trusted_modules: Any = None) -> Checked:
    """Checks, before anything runs, that :func:`asyncnn.replay` can use ``trace``: it is whole
    (not cut off mid-record nor without its closing record, no worker's events missing), its
    header's specs rebuild, its initial state decodes, and its events are consistent (keys
    admitted in sequence with their data, each actor's computes numbered in order); its graph
    passes the check a Trainer makes (``validate``, in the run's dtype; it sets the graph's
    ``shapes``, as the run's were), and each layer's output there has the shape its recorded
    sends had past the batch dimension. A trace that fails is refused at once with the reason,
    instead of stalling or blaming the wrong setting (or the wrong layer) halfway through a
    replay.

    Args:
        trace: a trace from :func:`read`.
        trusted_modules: modules whose classes the header may name (see
            :func:`~asyncnn._math._imports.trusted_modules`).

    Returns:
        The specs it rebuilt and the initial state it decoded, for the replay to use.

    Raises:
        TraceFormatError: naming the trace and what makes it unusable.
        UntrustedModuleError: the header names a class of a module neither imported nor trusted.
    """
    from asyncnn._math._imports import UntrustedModuleError, untrusted_cause
    from asyncnn._math._imports import trusted_modules as trusting
    from asyncnn._math._optim_spec import from_spec as optimizer_from_spec
    from asyncnn._runtime._graph import Graph
    from asyncnn._runtime._policies import policy_from_spec
    from asyncnn._runtime._recorder import decode_tree
    from asyncnn.backends._dtypes import unknown_dtype_hint

    path = trace.path
    if trace.truncated and trace.closed is False and not trace.cut_mid_record:
        # (the file ends on a whole record: the reader cannot tell what is missing, and the
        # replay blamed an alteration of the file for the work the killed run left undone)
        raise TraceFormatError(
            f"{path} is truncated: the trace ends without its closing record, after "
            f"{len(trace.events)} whole events: the process was killed while it ran (kill -9, "
            "the OOM killer, a batch system's time limit), or the file was copied before the "
            "run closed it. Replay needs a whole trace; summary and to_chrome show what it holds"
        )
    if trace.truncated:
        raise TraceFormatError(
            f"{path} is truncated: the file ends inside a record, after {len(trace.events)} "
            "whole events (its writer stopped mid-write: a full disk, or the process died while "
            "writing; or the file was copied before it was closed). Replay needs a whole trace; "
            "summary and to_chrome show what it holds"
        )
    missing = missing_workers(trace)
    if missing:
        raise TraceFormatError(
            f"{path} lacks the events of workers {missing}: the cluster run failed or was "
            "interrupted before they could be collected, or their parts end early (their trace "
            "writer failed). Replay needs every actor's events; summary and to_chrome show what "
            "it holds"
        )
    h = trace.header
    for name in ("graph", "policy", "optimizer", "seed", "dtype"):
        if name not in h:
            raise TraceFormatError(f"{path}: the header has no {name!r}; cannot replay")
    try:
        np.dtype(h["dtype"])
    except TypeError as exc:
        raise TraceFormatError(
            f"{path}: the run's dtype {h['dtype']!r:.40} is unknown to numpy here: {exc}"
            f"{unknown_dtype_hint(h['dtype'])}"
        ) from exc
    try:
        with trusting(trusted_modules):
            graph = Graph.from_spec(h["graph"])
            policy = policy_from_spec(h["policy"])
            optimizer = optimizer_from_spec(h["optimizer"])
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        untrusted = untrusted_cause(exc)
        if untrusted is not None:
            raise UntrustedModuleError(f"{path}: {untrusted}") from None
        raise TraceFormatError(f"{path}: the header's specs cannot be rebuilt: {exc}") from exc
    if trace.state is None:
        raise TraceFormatError(f"{path}: the trace holds no initial state record; cannot replay")
    try:
        st = trace.state
        params, opt_states = decode_tree(st["params"]), decode_tree(st["opt_states"])
        lacking = [n for n in graph.layers if n not in params or n not in opt_states]
        for name in graph.layers:
            if name not in lacking and not isinstance(st["versions"][name], int):
                raise ValueError(f"the version of {name!r} is {st['versions'][name]!r:.40}")
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise TraceFormatError(f"{path}: the initial state record is malformed: {exc}") from exc
    if lacking:  # (a bare KeyError named the layer alone)
        raise TraceFormatError(
            f"{path}: the initial state holds no parameters or optimizer state for the layers "
            f"{lacking} of the trace's graph (it holds those of {sorted(params)}), so that "
            "graph is not the one that ran (the file was altered, or mixes two runs)"
        )
    # the graph's check a Trainer makes (and open_run, which the replay tells to skip it):
    # made here, with the run's dtype, so that a graph that cannot run is refused before the
    # replay instead of failing halfway at another actor; its error waits until the checks
    # that say more of the cause (the parameters, the events) have had their say
    made: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype[Any]] = {}
    graph_error = _check_graph(graph, h["dtype"], made, shapes, dtypes)
    _check_params_fit(path, graph, params, made)
    misfit = optimizer_misfit(optimizer, params, opt_states)
    if misfit is not None:
        raise TraceFormatError(
            f"{path}: the initial state record's 'opt_states' does not fit the header's "
            f"optimizer: {misfit}. The header's optimizer or the recorded state was altered "
            "(or the optimizer's class changed since the run): replay with the code the run "
            "used, from an unaltered trace"
        )
    # the optional fields, each named: a malformed one failed the replay's start with a bare
    # KeyError or TypeError (or, for actor_states, only once the replay had begun)
    optional: dict[str, dict[str, Any]] = {
        "pending": {}, "actor_states": {}, "earlier": {}, "pending_delays": {},
    }  # fmt: skip
    checks: tuple[tuple[str, Callable[[Any, Any], None]], ...] = (
        ("pending", _check_pending),
        ("actor_states", _check_actor_states),
        ("earlier", lambda e, g: _check_earlier(e, g, params, st["versions"])),
        ("pending_delays", lambda d, g: _check_pending_delays(d, g, optional["pending"])),
    )
    for field_name, check in checks:
        if trace.state.get(field_name) is None:
            continue  # (a trace written before the field existed, or nothing to hold)
        try:
            try:
                decoded = optional[field_name] = decode_tree(trace.state[field_name])
            except (TypeError, KeyError, AttributeError) as exc:  # (a bare KeyError: 'value')
                raise ValueError(
                    f"not a tree as the trace encodes one ({type(exc).__name__}: {exc})"
                ) from exc
            check(decoded, graph)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise TraceFormatError(
                f"{path}: the initial state record's {field_name!r} is malformed: {exc}"
            ) from exc
    _check_events(trace, graph)
    check_in_flight(trace, graph, policy)
    _check_outputs(trace, graph, shapes, dtypes, graph_error)
    return Checked(
        graph, policy, optimizer, params, opt_states, optional["pending"],
        optional["actor_states"], optional["earlier"], optional["pending_delays"],
    )  # fmt: skip


def _check_graph(
    graph: Graph,
    dtype: str,
    made: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, np.dtype[Any]],
) -> Exception | None:
    """Checks the header's graph as a Trainer checks its own (``validate``, with the run's
    ``dtype``; it sets ``graph.shapes``, which the run had too); returns the check's error, or
    None. ``made``, ``shapes`` and ``dtypes``: filled with each layer's parameters as the check
    made them (shapes and dtypes only), each node's output shape and each layer's output
    dtype, as far as it got."""
    from asyncnn._errors import GraphError
    from asyncnn._runtime._run import validate  # (as the trainer imports it)
    from asyncnn.backends import get_backend

    # a device this host lacks (a GPU run's trace on a CPU-only host) is said as the replay's
    # start said it, not as a graph that fails its check
    for name in graph.layers:
        get_backend(graph.nodes[name].device)
    try:
        validate(graph, dtype, param_shapes=made, out_shapes=shapes, out_dtypes=dtypes)
    except GraphError as exc:
        return exc
    return None


def _check_params_fit(
    path: str, graph: Any, params: dict[str, Any], made: dict[str, Any] | None = None
) -> None:
    """Refuses initial parameters that the modules of the header's graph cannot take: the
    replay failed at the first forward, inside the actor. Compared with the parameters the
    graph's check made (``made``: their shapes), or where it did not get to a layer, with fresh
    ones its module makes (once, on the host)."""
    for name in graph.layers:
        module = graph.nodes[name].module
        if made is not None and name in made:
            fresh = made[name]
        else:
            try:
                fresh = module.init(0, backend="numpy", dtype="float32")
            except Exception:  # noqa: BLE001 - a module that cannot here: its forward tells
                continue
        misfit = _misfit(fresh, params[name], f"[{name!r}]")
        if misfit is not None:
            raise TraceFormatError(
                f"{path}: the recorded parameters of layer {name!r} do not fit its module in "
                f"the trace's graph, {module!r:.160}: {misfit}. The module is rebuilt from the "
                "header's spec: its class has changed since the run was recorded (its code or "
                "its defaults), or the file was altered; replay with the code the run used"
            )


def _check_outputs(
    trace: Trace,
    graph: Graph,
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, np.dtype[Any]],
    graph_error: Exception | None,
) -> None:
    """Refuses a graph whose check failed (``graph_error``, from :func:`_check_graph`), and one
    whose layers' outputs, as the check found them (``shapes`` and ``dtypes``: as far as it
    got), are not of the shape or dtype the run sent: the replay failed halfway, at the actor
    that read the changed output, not the one that made it, or ran and reported every send of
    that layer as a divergence. Of the first layer (in the graph's order) whose output differs,
    both shapes (or both dtypes) are named, so that where the check failed, the layer that
    changed is named rather than the one after it that could not take it.

    Only what cannot vary is compared: the shape past the batch dimension (a key's rows vary,
    as do the rows a router sends each expert) and the dtype, of the layers' sends of one
    tensor (a router's send to its merge carries the route too), and only where the run's sends
    of a layer all had the same one. A dtype is compared only where the check ran the layer on
    the backend the run did (a layer placed on a worker's GPU is checked on this host's CPU).

    Raises:
        TraceFormatError: naming the layer, its module, both shapes or dtypes, and the check's
            error.
    """
    from asyncnn._runtime._recorder import dtype_code

    rec_shapes, rec_dtypes = _recorded_outputs(trace, graph)
    path = trace.path
    changed: tuple[str, str, str, str, Any] | None = None
    for name in graph.layers:
        if name in rec_shapes and name in shapes:
            sent, e = rec_shapes[name]
            now = shapes[name]
            if tuple(now[1:]) != tuple(sent[1:]):
                changed = (
                    name,
                    f"an output of shape {tuple(now)} for a batch of {now[0]} rows",
                    f"outputs of shape {tuple(sent)}",
                    "past the batch dimension they differ",
                    e,
                )
                break
        if name in rec_dtypes and name in dtypes and _checked_where_run(graph, name):
            code, e = rec_dtypes[name]
            if dtype_code(dtypes[name]) != code:
                changed = (
                    name,
                    f"an output of dtype {_dtype_name(dtype_code(dtypes[name]))}",
                    f"outputs of dtype {_dtype_name(code)}",
                    "the dtypes differ",
                    e,
                )
                break
    if changed is not None:
        name, now_text, sent_text, differ, e = changed
        then = (
            f"; with it, the graph's check fails: {graph_error}" if graph_error is not None else ""
        )
        raise TraceFormatError(
            f"{path}: layer {name!r} ({graph.nodes[name].module!r:.160}) gives {now_text} in "
            f"the graph's check, where the run sent {sent_text} (its forward of key {e.key} to "
            f"{e.peer!r}): {differ}. The module is rebuilt from the header's spec: its class "
            "has changed since the run was recorded (its code or its defaults), or the file was "
            f"altered; replay with the code the run used{then}"
        ) from graph_error
    if graph_error is not None:
        raise TraceFormatError(
            f"{path}: the trace's graph fails the check a Trainer makes before it runs: "
            f"{graph_error}. The graph is rebuilt from the header's spec: a class it names has "
            "changed since the run was recorded (its code or its defaults), or the file was "
            "altered; replay with the code the run used"
        ) from graph_error


def _checked_where_run(graph: Graph, name: str) -> bool:
    """Whether the graph's check ran layer ``name`` on the backend its run did (it checks a
    layer placed on a worker on this host's CPU, whatever the worker's device)."""
    node = graph.nodes[name]
    return node.worker is None or node.device == "cpu"


def _dtype_name(code: str) -> str:
    """A trace's dtype code (``"<f4"``, ``"bfloat16"``) as its name (``float32``)."""
    try:
        return np.dtype(code).name
    except TypeError:
        return code  # (an extension dtype's name, where ml_dtypes is not installed)


def _recorded_outputs(
    trace: Trace, graph: Graph
) -> tuple[dict[str, tuple[tuple[int, ...], Any]], dict[str, tuple[str, Any]]]:
    """``({layer: (shape, event)}, {layer: (dtype code, event)})``: the shape and the dtype of
    each layer's forward sends of one tensor and the first such send, where every such send of
    the layer has one shape past the batch dimension (and one dtype: a layer whose sends vary
    there is left out, as its output cannot be told from the graph's check)."""
    layers = set(graph.layers)
    found: dict[str, tuple[tuple[int, ...], Any]] = {}
    found_dtypes: dict[str, tuple[str, Any]] = {}
    varies: set[str] = set()
    dtype_varies: set[str] = set()
    for e in trace.events:
        if e.what != "send" or e.kind != "forward" or e.actor not in layers:
            continue
        x = e.tensors
        if len(x) != 1 or not isinstance(x[0], dict) or not isinstance(x[0].get("s"), list):
            continue
        shape = tuple(x[0]["s"])
        if not shape:
            continue
        first = found.setdefault(e.actor, (shape, e))[0]
        if first[1:] != shape[1:]:
            varies.add(e.actor)
        code = x[0].get("d")
        if isinstance(code, str) and found_dtypes.setdefault(e.actor, (code, e))[0] != code:
            dtype_varies.add(e.actor)
    return (
        {name: v for name, v in found.items() if name not in varies},
        {name: v for name, v in found_dtypes.items() if name not in dtype_varies},
    )


def optimizer_misfit(
    optimizer: Any, params: dict[str, Any], opt_states: dict[str, Any]
) -> str | None:
    """How the optimizer states ``opt_states`` (``{layer: state}``) differ from those
    ``optimizer.init`` makes for ``params`` (another structure, or a buffer of another shape:
    what ``optimizer.update`` refuses, halfway through a replay), or None where they fit."""
    from asyncnn._math._pytree import tree_flatten

    def keys(tree: Any) -> Any:
        return sorted(tree) if isinstance(tree, dict) else type(tree).__name__

    for name, layer_params in params.items():
        try:
            fresh = optimizer.init(layer_params)
        except Exception:  # noqa: BLE001 - an optimizer that cannot here: its update tells
            continue
        kept = opt_states.get(name)
        (want, want_def), (got, got_def) = tree_flatten(fresh), tree_flatten(kept)
        if want_def != got_def:
            return (
                f"the optimizer state of layer {name!r} is {keys(kept)}, the header's optimizer "
                f"{optimizer!r:.120} keeps {keys(fresh)} for it"
            )
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            if hasattr(w, "shape") and tuple(getattr(g, "shape", ())) != tuple(w.shape):
                return (
                    f"buffer {i} of the optimizer state of layer {name!r} has shape "
                    f"{tuple(getattr(g, 'shape', ()))}, the header's optimizer {optimizer!r:.120} "
                    f"keeps one of shape {tuple(w.shape)} (the leaves of the state's tree, dict "
                    "keys sorted)"
                )
    return None


def _misfit(want: Any, got: Any, where: str) -> str | None:
    """How the parameter tree ``got`` differs from ``want`` in structure or array shapes (the
    first difference, at ``params`` + ``where``), or None."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(want) != set(got):
            has = sorted(got) if isinstance(got, dict) else f"a {type(got).__name__}"
            return f"params{where} has {has}, the module's {sorted(want)}"
        for k in sorted(want):
            misfit = _misfit(want[k], got[k], f"{where}[{k!r}]")
            if misfit is not None:
                return misfit
        return None
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(want):
            has = f"{len(got)} entries" if isinstance(got, list | tuple) else type(got).__name__
            return f"params{where} has {has}, the module's {len(want)} entries"
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            misfit = _misfit(w, g, f"{where}[{i}]")
            if misfit is not None:
                return misfit
        return None
    if hasattr(want, "shape") and tuple(getattr(got, "shape", ())) != tuple(want.shape):
        return (
            f"params{where} has shape {tuple(getattr(got, 'shape', ()))}, the module's "
            f"{tuple(want.shape)}"
        )
    return None


def _check_pending(pending: Any, graph: Any) -> None:
    """``pending`` (the gradients accumulated but not yet applied, ``{layer: (sum, count)}``)."""
    if not isinstance(pending, dict):
        raise TypeError(f"a {type(pending).__name__}, not a map of layers")
    for name, entry in pending.items():
        if name not in graph.layers:
            raise ValueError(f"no layer {name!r} in the graph; layers: {graph.layers}")
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            raise ValueError(f"layer {name!r} has {entry!r:.40}, not a (sum, count) pair")
        count = entry[1]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"layer {name!r} has a count of {count!r:.40}, not an int >= 0")


def _check_pending_delays(delays: Any, graph: Any, pending: dict[str, Any]) -> None:
    """``pending_delays`` (``{layer: [delay, ...]}``, the delays of the ``pending`` gradients):
    layers of the graph, ints >= 0, no more than the layer's pending count."""
    if not isinstance(delays, dict):
        raise TypeError(f"a {type(delays).__name__}, not a map of layers")
    for name, entry in delays.items():
        if name not in graph.layers:
            raise ValueError(f"no layer {name!r} in the graph; layers: {graph.layers}")
        if not isinstance(entry, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry
        ):
            raise ValueError(f"layer {name!r} has {entry!r:.40}, not a list of ints >= 0")
        count = pending[name][1] if name in pending else 0
        if len(entry) > count:
            raise ValueError(
                f"layer {name!r} has {len(entry)} delays, more than the {count} gradients its "
                "'pending' entry sums"
            )


def _check_earlier(earlier: Any, graph: Any, params: dict[str, Any], versions: Any) -> None:
    """``earlier`` (``{layer: {version: params}}``, the earlier versions forwards are pinned to):
    layers of the graph, versions below the layer's, parameters shaped as the layer's."""
    if not isinstance(earlier, dict):
        raise TypeError(f"a {type(earlier).__name__}, not a map of layers")
    for name, held in earlier.items():
        if name not in graph.layers:
            raise ValueError(f"no layer {name!r} in the graph; layers: {graph.layers}")
        if not isinstance(held, dict):
            raise ValueError(f"layer {name!r} has {held!r:.40}, not a map of versions")
        for v, p in held.items():
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < versions[name]:
                raise ValueError(
                    f"layer {name!r} holds version {v!r:.40}, not an earlier one (an int below "
                    f"its version, {versions[name]})"
                )
            misfit = _misfit(params[name], p, f"[{name!r}]")
            if misfit is not None:
                raise ValueError(f"the parameters of {name!r} at version {v}: {misfit}")


def _check_actor_states(states: Any, graph: Any) -> None:
    """``actor_states`` (``{layer: state}`` of the custom actors that keep one)."""
    from asyncnn._runtime._actors import LayerActor

    if not isinstance(states, dict):
        raise TypeError(f"a {type(states).__name__}, not a map of layers")
    for name in states:
        if name not in graph.layers:
            raise ValueError(f"no layer {name!r} in the graph; layers: {graph.layers}")
        cls = graph.nodes[name].custom_actor or LayerActor
        if cls.load_actor_state is LayerActor.load_actor_state:
            raise ValueError(
                f"layer {name!r} has a state, but its actor {cls.__name__} keeps none (it does "
                "not override load_actor_state)"
            )


def _check_events(trace: Trace, graph: Any) -> None:
    path = trace.path
    inputs = set(graph.inputs)
    actors = set(graph.layers) | set(graph.losses)
    next_key = trace.header.get("start", {}).get("keys", 0)
    admitted: set[int] = set()
    minibatches: dict[int, list[int]] = {}  # minibatch -> [keys announced, keys seen]
    fed: dict[int, set[str]] = {}
    seqs: dict[str, int] = {}
    open_: dict[str, int] = {}
    # a cluster run's events are merged by time across processes: a worker's event may come
    # before the driver's admit of its key, so the keys are gathered first
    for e in trace.events:
        if e.what == "admit" and isinstance(e.get("key"), int):
            admitted.add(e.key)
    for i, e in enumerate(trace.events):
        ev, a = e.what, e.actor

        def bad(what: str, e: dict[str, Any] = e, i: int = i) -> TraceFormatError:
            return TraceFormatError(f"{path}: event {i} ({e['ev']} of {e['a']!r}) {what}")

        if ev == "admit":
            m = e.meta
            if e.get("key") != next_key:
                raise bad(f"admits key {e.get('key')!r}, expected {next_key} (keys in sequence)")
            if not isinstance(m.get("minibatch"), int) or not isinstance(m.get("mb_keys"), int):
                raise bad("lacks its minibatch and its count of keys ('m')")
            if m["mb_keys"] < 1:
                raise bad(f"says its minibatch has {m['mb_keys']} keys")
            # the loss actor scales each key's loss by its share of the minibatch's rows
            if not isinstance(m.get("rows"), int) or not isinstance(m.get("mb_rows"), int):
                raise bad(
                    "lacks its count of rows ('m': 'rows', 'mb_rows'), which the loss actor "
                    "reads; the file was altered"
                )
            if not 1 <= m["rows"] <= m["mb_rows"]:
                raise bad(
                    f"says it holds {m['rows']} of its minibatch's {m['mb_rows']} rows; a key "
                    "holds at least 1 row and at most its minibatch's"
                )
            count = minibatches.setdefault(m["minibatch"], [m["mb_keys"], 0])
            count[1] += 1
            if count[0] != m["mb_keys"] or count[1] > count[0]:
                raise bad(f"disagrees with the {count[0]} keys announced for its minibatch")
            next_key += 1
        elif ev in ("send", "start", "end"):
            if e.get("key") not in admitted:
                raise bad(f"names key {e.get('key')!r}, which was never admitted")
            if e.get("k") not in ("forward", "backward"):
                raise bad(f"has the message kind {e.get('k')!r}")
            if ev == "send" and a in inputs and e.get("pl"):
                node = graph.nodes[a]
                info = e["x"][0] if e.get("x") else None
                shape = tuple(info["s"]) if info else ()
                if len(shape) != len(node.shape) or any(
                    want is not None and got != want
                    for got, want in zip(shape, node.shape, strict=True)
                ):
                    raise bad(f"carries data of shape {shape}; input {a!r} is {node.shape}")
                fed.setdefault(e.key, set()).add(a)
            elif ev == "start":
                if a not in actors:  # (its work was left out, and the replay waited for it)
                    raise bad(
                        f"is the work of an actor the trace's graph lacks (its layers: "
                        f"{graph.layers}, losses: {graph.losses}), so that graph is not the one "
                        "that ran (the file was altered, or mixes two runs)"
                    )
                if e.get("seq") != seqs.get(a, 0) or a in open_:
                    raise bad(f"has sequence number {e.get('seq')!r}, expected {seqs.get(a, 0)}")
                open_[a] = e.seq
                seqs[a] = e.seq + 1
            elif ev == "end" and a in actors:
                if open_.pop(a, None) != e.get("seq"):
                    raise bad(f"ends compute {e.get('seq')!r}, which did not start")
    failed = any(e.what == "error" for e in trace.events)
    if open_ and not failed:
        raise TraceFormatError(f"{path}: the computes {sorted(open_.items())} never end")
    for mb, (announced, seen) in minibatches.items():
        if seen != announced and not failed:
            raise TraceFormatError(
                f"{path}: minibatch {mb} announced {announced} keys, {seen} were admitted"
            )
    if trace.header.get("payloads", "inputs") != "none":
        for key in sorted(admitted):
            if fed.get(key, set()) != inputs and not failed:
                lacking = sorted(inputs - fed.get(key, set()))
                raise TraceFormatError(
                    f"{path}: key {key} has no recorded data for {lacking}, though the trace "
                    "keeps its inputs' payloads; the file was altered"
                )
