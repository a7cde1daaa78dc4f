"""The checks of a :class:`RunState` given to ``open_run`` (a trainer's, a checkpoint's, a
user's): its counters, its weights as arrays, its earlier versions, pending gradients and
delays, its optimizer states against the optimizer's own, and its arrays' shapes against the
graph's, each refused naming the layer and the field before a run starts from it; and the
state as the run takes it (counts as ints, floats in the run's dtype). Apart from
``_open_run.py`` because they judge one value, the state, and ``_checkpoint.py`` reads them
too."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from asyncnn._math._optim import keeps_base_state, state_dtype
from asyncnn._math._pytree import leaf_name, tree_flatten, tree_leaves, tree_unflatten
from asyncnn.backends import array_namespace, is_floating, to_numpy

from ._checks import _may_overflow
from ._graph import Graph
from ._param_checks import check_params
from ._state import RunState

__all__ = ["cast_refusing_overflow", "check_cast_finite", "check_state", "check_state_counts"]


def check_state(graph: Graph, state: RunState, optimizer: Any) -> None:
    """Refuses a ``state`` that ``graph``'s run under ``optimizer`` cannot start from: its
    counters, its weights (arrays), its earlier versions, pending gradients and delays, and
    its optimizer states, each named by layer and field."""
    check_state_counts(graph, state)
    _check_weights_are_arrays(graph, state)
    _check_earlier_versions(graph, state)
    _check_pending_grads(graph, state)
    _check_pending_delays(graph, state)
    _check_opt_states(graph, state, optimizer)


def check_state_counts(graph: Graph, state: RunState) -> None:
    """Refuses a ``state`` that lacks some of the graph's layers or has others, or whose
    versions, ``minibatches`` or ``keys`` are not ints >= 0 (a float version read back from
    JSON trained, and the checkpoint saved after it did not load again). ``Trainer.save``
    checks the same before it writes.

    Raises:
        ValueError: naming the field and the layer.
    """
    for field in ("params", "opt_states", "versions"):
        held = getattr(state, field)
        missing = [n for n in graph.layers if n not in held]
        if missing:
            raise ValueError(
                f"open_run: state.{field} has nothing for the graph's layers {missing} (it has "
                f"{sorted(held)}); pass the state of a run of this graph, or state=None for "
                "fresh weights"
            )
        extra = sorted(str(n) for n in held if n not in graph.layers)
        if extra:
            raise ValueError(
                f"open_run: state.{field} has layers {extra}, which the graph lacks (its layers: "
                f"{graph.layers}); pass the state of a run of this graph, or drop those"
            )
    for name in graph.layers:
        v = state.versions[name]
        if not _is_count(v):
            raise ValueError(
                f"open_run: state.versions[{name!r}] is {v!r:.40}, which is not a version (an "
                "int >= 0: the updates the layer has had)"
            )
    for field in ("minibatches", "keys"):
        n = getattr(state, field)
        if not _is_count(n):
            raise ValueError(
                f"open_run: state.{field} is {n!r:.40}, which is not a count (an int >= 0: the "
                f"{field} the runs so far admitted)"
            )


def _check_weights_are_arrays(graph: Graph, state: RunState) -> None:
    """Refuses a weight given as a (nested) list of numbers in ``state.params``: the run would
    compute on a list, and the optimizer state's check, which reads the parameters' structure
    from them, blamed the optimizer state. ``Trainer.params = ...`` converts such lists (it
    knows the layer's structure); a state is taken as a run gives it.

    Raises:
        ValueError: naming the layer and the place in its parameters.
    """

    def walk(tree: Any, path: str) -> None:
        if isinstance(tree, dict):
            for k, sub in tree.items():
                walk(sub, f"{path}[{k!r}]")
        elif isinstance(tree, list | tuple):
            if tree and all(_numbers(t) for t in tree):
                raise ValueError(
                    f"open_run: {path} is a list of numbers, not an array; give the weights as "
                    "arrays (np.asarray(w, dtype='float32')), or set them with Trainer.params = "
                    "..., which converts them"
                )
            for i, sub in enumerate(tree):
                walk(sub, f"{path}[{i}]")

    for name in graph.layers:
        walk(state.params[name], f"state.params[{name!r}]")


def _numbers(value: Any) -> bool:
    """Whether ``value`` is a Python number or a (nested, non-empty) list of them."""
    if isinstance(value, list | tuple):
        return bool(value) and all(_numbers(v) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    """Whether ``value`` is an int >= 0 (a numpy integer too; a bool is not one): a version, a
    count of gradients, an optimizer's step."""
    return (
        isinstance(value, int | np.integer)
        and not isinstance(value, bool | np.bool_)
        and bool(value >= 0)
    )


def _check_layer_named(graph: Graph, field: str, name: Any) -> None:
    """Refuses a ``state.<field>`` entry for ``name`` where the graph has no such layer."""
    if name not in graph.layers:
        raise ValueError(
            f"open_run: state.{field} names {name!r}, which is no layer of the graph "
            f"(its layers: {graph.layers}); pass the state of a run of this graph"
        )


def _check_earlier_versions(graph: Graph, state: RunState) -> None:
    """Refuses ``state.earlier_params`` that name another layer, or a version that is not an
    earlier one of the layer's (a run would pin forwards to weights that never were).

    Raises:
        TypeError: it is not ``{layer: {version: parameters}}``.
        ValueError: naming the layer and the version.
    """
    earlier = state.earlier_params
    if not isinstance(earlier, dict) or not all(isinstance(e, dict) for e in earlier.values()):
        raise TypeError(
            "open_run: state.earlier_params must be {layer: {version: parameters}} (as "
            f"run.state() gives it), got {earlier!r:.80}"
        )
    for name, versions in earlier.items():
        _check_layer_named(graph, "earlier_params", name)
        latest = state.versions[name]
        for v in versions:
            if not _is_count(v):
                raise ValueError(
                    f"open_run: state.earlier_params[{name!r}] holds version {v!r:.40}, which "
                    "is not a version (an int >= 0); its keys are the versions of the earlier "
                    "parameters it holds"
                )
            if v >= latest:
                raise ValueError(
                    f"open_run: state.earlier_params[{name!r}] holds version {v}, which is not "
                    f"below the layer's version {latest} (state.versions[{name!r}]): it holds "
                    "the parameters of earlier versions only; pass the state of a run "
                    "(run.state(), Trainer.state) as it was given"
                )
            # against the layer's own weights in the state: checked also where the caller
            # validated the graph (a fit) and on a cluster, where a misfit failed mid-run
            try:
                check_params(
                    name, state.params[name], versions[v],
                    place=f"state.earlier_params[{name!r}][{v}]",
                )  # fmt: skip
            except ValueError as exc:
                raise ValueError(
                    f"open_run: {exc}; pass the state of a run of this graph (run.state(), "
                    "Trainer.state)"
                ) from None


def _check_pending_grads(graph: Graph, state: RunState) -> None:
    """Refuses ``state.pending_grads`` that name another layer, whose count is not a count, or
    whose sum does not fit the layer's parameters in the state: the sum is added into the
    layer's next gradient, where numpy broadcast a sum of another shape with no error. Checked
    also where the caller validated the graph (a fit) and on a cluster, as the earlier versions
    are.

    Raises:
        TypeError: it is not ``{layer: (sum, count)}``.
        ValueError: naming the layer, and the place in the sum and what differs.
    """
    pending = state.pending_grads
    if not isinstance(pending, dict):
        raise TypeError(
            "open_run: state.pending_grads must be {layer: (sum, count)} (as run.state() gives "
            f"it), got {pending!r:.80}"
        )
    for name, entry in pending.items():
        _check_layer_named(graph, "pending_grads", name)
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            raise ValueError(
                f"open_run: state.pending_grads[{name!r}] must be a pair (sum, count): the "
                "parameter gradients summed and not applied yet (None for none), and how many "
                f"gradients they sum; got {entry!r:.80}"
            )
        acc, count = entry
        if not _is_count(count):
            raise ValueError(
                f"open_run: state.pending_grads[{name!r}] counts {count!r:.40} gradients, which "
                "is not a count (an int >= 0): the second of its pair is how many gradients its "
                "sum holds"
            )
        if acc is None:
            continue  # (the keys that reached the layer with no rows sum no array)
        try:
            check_params(name, state.params[name], acc, place=f"state.pending_grads[{name!r}][0]")
        except ValueError as exc:
            raise ValueError(
                f"open_run: {exc} (in state.params[{name!r}]): the sum is of gradients of the "
                "layer's parameters; pass the state of a run of this graph (run.state(), "
                "Trainer.state)"
            ) from None


def _check_pending_delays(graph: Graph, state: RunState) -> None:
    """Refuses ``state.pending_delays`` that name another layer, hold a delay that is not a
    count, or more delays than the layer's pending gradients count (each gradient summed has at
    most one: a skipped key's none): the update that applies them would average them into a
    remedy's correction.

    Raises:
        TypeError: it is not ``{layer: [delay, ...]}``.
        ValueError: naming the layer and what is wrong.
    """
    delays = state.pending_delays
    if not isinstance(delays, dict):
        raise TypeError(
            "open_run: state.pending_delays must be {layer: [delay, ...]} (as run.state() gives "
            f"it), got {delays!r:.80}"
        )
    for name, entry in delays.items():
        _check_layer_named(graph, "pending_delays", name)
        if not isinstance(entry, list | tuple):
            raise ValueError(
                f"open_run: state.pending_delays[{name!r}] must be a list of the delays of the "
                f"layer's pending gradients (ints >= 0), got {entry!r:.80}"
            )
        bad = [d for d in entry if not _is_count(d)]
        if bad:
            raise ValueError(
                f"open_run: state.pending_delays[{name!r}] holds the delay {bad[0]!r:.40}, which "
                "is not an int >= 0 (a gradient's delay is the layer's version at its update "
                "minus its forward's)"
            )
        pending = state.pending_grads.get(name)
        count = int(pending[1]) if pending is not None else 0
        if count and len(entry) > count:
            raise ValueError(
                f"open_run: state.pending_delays[{name!r}] holds {len(entry)} delays, more than "
                f"the {count} gradients state.pending_grads[{name!r}] sums; pass the state of a "
                "run (run.state(), Trainer.state), or drop the delays"
            )


def _check_opt_states(graph: Graph, state: RunState, optimizer: Any) -> None:
    """Refuses ``state.opt_states`` that the optimizer's update would refuse at the layer's
    first update, inside the run, after the compute before it: for an ``asyncnn.optim``
    optimizer whose ``init`` and ``update`` are the base's (so its state's layout is known),
    the keys :meth:`Optimizer.init` makes, a step count, and floating buffers of the structure
    and shapes of the layer's parameters in the state. Another optimizer's update checks its own state.
    Checked also where the caller validated the graph (a fit) and on a cluster.

    Raises:
        ValueError: naming the layer, and the place in its state and what differs.
    """
    if not keeps_base_state(optimizer):
        return
    cls = type(optimizer)
    buffers = optimizer.buffer_names()
    keys = sorted({"step", *buffers})
    fix = (
        f"pass the state of a run of this graph under {cls.__name__} with these options "
        "(run.state(), Trainer.state); Trainer.load(path, optimizer=...) gives another "
        "optimizer a fresh state"
    )
    for name in graph.layers:
        opt_state = state.opt_states[name]
        where = f"state.opt_states[{name!r}]"
        if not isinstance(opt_state, dict) or set(opt_state) != set(keys):
            found = sorted(opt_state) if isinstance(opt_state, dict) else type(opt_state).__name__
            raise ValueError(
                f"open_run: {where} must be a dict with keys {keys}, as {cls.__name__}.init"
                f"(params) makes it; got {found}; {fix}"
            )
        step = opt_state["step"]
        if not _is_count(step):
            raise ValueError(
                f"open_run: {where}['step'] must be an int >= 0 (the updates made), got "
                f"{step!r:.40}; {fix}"
            )
        for buffer in buffers:
            try:
                # (a float buffer is cast to the run's dtype; one of ints never is)
                check_params(
                    name, state.params[name], opt_state[buffer], place=f"{where}[{buffer!r}]",
                    floating="an optimizer's buffer is a floating array of its parameter's shape",
                )  # fmt: skip
            except ValueError as exc:
                raise ValueError(f"open_run: {exc} (in state.params[{name!r}]); {fix}") from None


def _check_state_shapes(graph: Graph, state: RunState, like: dict[str, Any]) -> None:
    """Refuses a ``state`` whose parameters have another structure or shapes than the graph's
    layers (``like``: :func:`validate`'s), as ``Trainer.params = ...`` does; a layer would
    otherwise fail on them at its first forward, under its own name, or broadcast them.

    Raises:
        ValueError: naming the layer, the place in its parameters and what differs.
    """
    for name in graph.layers:
        try:
            check_params(name, like[name], state.params[name], owner="state.params")
        except ValueError as exc:
            raise ValueError(
                f"open_run: {exc}; pass the state of a run of this graph (run.state(), "
                "Trainer.state), or state=None for fresh weights"
            ) from None


def _counts_as_ints(state: RunState) -> RunState:
    """``state`` with numpy-int versions, ``minibatches`` and ``keys`` (checked counts, as a
    decoder gives them) as ints: the trace, the wire and a checkpoint keep ints only."""
    if (
        type(state.minibatches) is int
        and type(state.keys) is int
        and all(type(v) is int for v in state.versions.values())
    ):
        return state
    return dataclasses.replace(
        state,
        versions={n: int(v) for n, v in state.versions.items()},
        minibatches=int(state.minibatches),
        keys=int(state.keys),
    )


def _in_dtype(state: RunState, dtype: str, optimizer: Any = None) -> RunState:
    """``state`` with its floating arrays (weights, earlier ones, optimizer buffers, pending
    gradients) in the run's ``dtype`` (the optimizer's buffers in the dtype ``optimizer`` keeps
    them in for weights of ``dtype``: :func:`~asyncnn._math._optim.state_dtype`, float32 for
    Adam's moments of float16 weights, which a cast to float16 would flush to 0), as
    ``Trainer.params = ...`` and
    ``Trainer.load(dtype=...)`` convert them, and its integer weights too, as
    ``Trainer.params = ...`` casts them (as ints they have no gradient: the layer failed at its
    first backward): a state of another dtype would otherwise keep its weights and updates in
    that dtype for the whole run, with the inputs in the run's. An optimizer's integer buffer is
    refused instead (:func:`_check_opt_states`). ``state`` itself where nothing differs (no
    copy); else a new one (the caller's is left as it was).

    Raises:
        ValueError: a finite value that the cast makes Inf (a float32 weight of 1e5 in a
            float16 run), naming its place in the state, the value and the dtype's largest, as
            the data's check refuses one; a value the cast makes 0 is kept.
    """
    want = np.dtype(dtype)
    buffers_want = np.dtype(state_dtype(optimizer, want))

    def differs(leaf: Any) -> bool:
        got = getattr(leaf, "dtype", None)
        return got is not None and got != buffers_want and is_floating(got)

    def weight_differs(leaf: Any) -> bool:
        got = getattr(leaf, "dtype", None)
        return got is not None and got != want and (is_floating(got) or got.kind in "iu")

    def cast(leaf: Any) -> Any:
        return leaf.astype(buffers_want) if differs(leaf) else leaf

    def cast_weight(leaf: Any) -> Any:
        return leaf.astype(want) if weight_differs(leaf) else leaf

    # (a pending entry is (sum, count): the sum is cast, never the count, a numpy int as decoded)
    sums = [entry[0] for entry in state.pending_grads.values()]
    weights = (state.params, sums, state.earlier_params)
    if not any(weight_differs(leaf) for tree in weights for leaf in tree_leaves(tree)) and not any(
        differs(leaf) for leaf in tree_leaves(state.opt_states)
    ):
        return state

    def checked(fn: Callable[[Any], Any], tree: Any, place: str, what: str) -> Any:
        # (the cast of each leaf as before; a finite value it makes Inf refused, by its place)
        fix = f"rescale {what}, or run in a wider dtype (dtype='{{wider}}' on open_run)"
        return cast_refusing_overflow(
            lambda leaf, _: fn(leaf), tree, f"open_run: {place}", "the run's", fix
        )

    return dataclasses.replace(
        state,
        params={
            n: checked(cast_weight, p, f"state.params[{n!r}]", "the weights")
            for n, p in state.params.items()
        },
        opt_states={
            n: checked(cast, o, f"state.opt_states[{n!r}]", "the optimizer's buffers")
            for n, o in state.opt_states.items()
        },
        pending_grads={
            n: (
                checked(
                    cast_weight, acc, f"state.pending_grads[{n!r}][0]", "the pending gradients"
                ),
                count,
            )
            for n, (acc, count) in state.pending_grads.items()
        },
        earlier_params={
            n: {
                v: checked(cast_weight, p, f"state.earlier_params[{n!r}][{v}]", "the weights")
                for v, p in e.items()
            }
            for n, e in state.earlier_params.items()
        },
    )


def cast_refusing_overflow(
    cast: Callable[[Any, int], Any], tree: Any, place: str, owner: str, fix: str
) -> Any:
    """``tree`` with ``cast(leaf, k)`` applied to each leaf (``k``: its index in flattening
    order; a weight or a buffer cast to a run's dtype),
    refusing a finite value that the cast makes Inf, as the data's check refuses one: the run
    would compute on Inf weights, or divide by an Inf buffer, from its first step. ``place``
    names the tree (``state.params['stage0']``), ``owner`` the dtype's (``"the run's"``), and
    ``fix`` ends the message, its ``{wider}`` replaced by the narrowest of float32 and float64
    that holds the value. A value too small for the dtype becomes 0 (or a subnormal), as a
    cast makes it: no error; nor is a NaN or Inf the tree holds itself (``check_finite``'s).

    Raises:
        ValueError: naming the place of the first leaf that overflows, the value, the dtype and
            its largest value, and ``fix``.
    """
    leaves, treedef = tree_flatten(tree)
    out = []
    for k, leaf in enumerate(leaves):
        with np.errstate(over="ignore", invalid="ignore"):  # (reported below, by its place)
            new = cast(leaf, k)
        if new is not leaf:
            check_cast_finite(leaf, new, leaf_name(treedef, k, place), owner, fix)
        out.append(new)
    return tree_unflatten(treedef, out)


def check_cast_finite(before: Any, after: Any, where: str, owner: str, fix: str) -> None:
    """Refuses ``after``, the array ``before`` cast to another dtype, where the cast made a
    finite value of ``before`` Inf. Looked at only where the cast may overflow (float32 to
    float16 or bfloat16, float64 to float32, integers to float16): a cast to a dtype as wide
    costs nothing more.

    Raises:
        ValueError: ``"{where} has {value}, which overflows {owner} dtype {dtype} to Inf (its
            largest value is ...): {fix}"``, ``fix``'s ``{wider}`` replaced as
            :func:`cast_refusing_overflow` says.
    """
    got = getattr(before, "dtype", None)
    want = getattr(after, "dtype", None)
    if got is None or want is None or not is_floating(want) or not _may_overflow(got, want):
        return
    xp = array_namespace(after)
    overflow = ~_finite(xp, after) & _finite(xp, before)
    if not bool(overflow.any()):
        return
    value = float(to_numpy(before.reshape(-1)[int(xp.argmax(overflow.reshape(-1)))]))
    largest = float(np.finfo(want).max)
    wider = "float32" if abs(value) <= float(np.finfo(np.float32).max) else "float64"
    raise ValueError(
        f"{where} has {value:g}, which overflows {owner} dtype {np.dtype(want)} to "
        f"{'-' if value < 0 else ''}Inf (its largest value is {largest:g}): "
        + fix.replace("{wider}", wider)
    )


def _finite(xp: Any, a: Any) -> Any:
    """``isfinite(a)``; integers are finite, and a 16-bit float is asked in float32 (cupy's
    isfinite takes no bfloat16)."""
    if a.dtype.kind in "iub":
        return xp.ones(a.shape, dtype=bool)
    return xp.isfinite(a.astype(np.float32) if a.dtype.itemsize == 2 else a)
