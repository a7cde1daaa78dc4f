"""The async face of a run: :func:`open_run` checks its options, sends the run to a cluster's
workers or keeps it in this process, and holds the :class:`Run` open for an ``async with`` block.

Assembling a run (options, validation, the first state, the trace recorder, the device pool, the
hosting of the actors) happens once per run and needs most of the runtime; the :class:`Run` it
yields (``_run.py``) is the scheduler, on the path of every key. Apart, each reads top to bottom
as one job, and the scheduler does not import what only the assembling needs.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np

from asyncnn._errors import GraphError
from asyncnn._math._optim import keeps_base_state
from asyncnn._math._pytree import tree_leaves, tree_map
from asyncnn.backends import DevicePool, is_floating

from ._checks import check_cuda_graphs, check_optimizer, validate
from ._config import RunConfig
from ._graph import Graph
from ._lifecycle import Share, hosting, maybe_pool, open_recorder, recording
from ._param_checks import check_params
from ._policies import Policy
from ._run import Run
from ._state import RunState, init_state

__all__ = ["open_run"]


@asynccontextmanager
async def open_run(
    graph: Graph,
    optimizer: Any,
    policy: Policy,
    seed: int = 0,
    dtype: str = "float32",
    *,
    state: RunState | None = None,
    pool: DevicePool | None = None,
    stall_timeout: float = 60.0,
    check_finite: bool = False,
    on_loss: Any = None,
    validated: bool = False,
    trace: str | None = None,
    trace_payloads: str = "inputs",
    cluster: Any = None,
    cuda_graphs: bool | None = None,
    config: RunConfig | None = None,
) -> AsyncIterator[Run]:
    """Starts the actors of ``graph`` and yields the :class:`Run`; stops them on exit.

    Usable from any running trio or asyncio loop (a notebook, a server)::

        async with ann.open_run(g, optimizer=optim.SGD(lr=0.1), policy=policies.GPipe(4)) as run:
            for batch in batches:
                await run.step(batch)
            await run.drain()
        print(run.losses)

    Leaving the block drains the run (every admitted key finishes). An exception in any actor
    cancels the whole run and is raised here as one :class:`~asyncnn.ActorError`; no progress for
    ``stall_timeout`` seconds raises :class:`~asyncnn.StallError`.

    Args:
        graph: the network.
        optimizer: an ``asyncnn.optim`` optimizer; each layer keeps its own state.
        policy: an ``asyncnn.policies`` policy.
        seed: seeds parameter initialisation (per module of a sequential chain, else per
            node) and dropout.
        dtype: the floating dtype of parameters and float inputs.
        state: start from these weights and optimizer states (default: fresh ones); their
            floating arrays, and integer weights, are cast to ``dtype`` (as
            ``Trainer.params = ...`` casts), and numpy-int versions and counters taken as ints,
            in a new state: the one given is left as it is. Its ``earlier_params`` (the
            versions before the latest that ``PipeDream2BW`` pins forwards to, from
            ``run.state()``) let the run go on pinning as one unbroken run (a trace records
            them, so that its replay starts from them too; a cluster sends each worker its
            layers' ones). Its
            ``pending_delays`` are the delays of its ``pending_grads``, counted by the update
            that applies them; those of a layer without pending gradients are dropped.
        pool: an open device pool to use, from ``open_device_pool()`` (default: one opened
            for the run).
        stall_timeout: seconds without progress, while keys are in flight, before failing.
        check_finite: check every tensor for NaN/Inf and name the first actor producing one.
        on_loss: called as ``on_loss(minibatch, loss, rows)`` when a minibatch's loss is known;
            an exception it raises ends the run as an :class:`~asyncnn.ActorError` whose
            ``actor`` is ``"on_loss"`` (kind ``"callback"``), with that exception as its cause.
        validated: skip the checks of :func:`validate` (the caller has run them).
        trace: write a message trace of the run to this file (see ``asyncnn.trace``).
        trace_payloads: which tensors the trace keeps besides their digests: ``"inputs"`` (the
            data fed in, enough to replay), ``"all"`` (every message, enough to replay one actor
            alone) or ``"none"``.
        cluster: run the graph's nodes on this cluster's worker processes
            (``asyncnn.cluster.LocalCluster`` or ``RayCluster``; nodes placed with ``worker=``;
            the scheduler and nodes without ``worker`` stay in this process).
        cuda_graphs: capture each GPU actor's forward, backward and update as CUDA graphs once
            its input shapes repeat, and replay them (far fewer kernel launches at small
            batches). ``None`` (the default) captures where the run's GPU actors share one GPU
            and there is no ``cluster``; ``False`` keeps every actor eager; ``True`` asks for it
            (also across several GPUs in one process) and refuses a ``cluster``. Used where
            :meth:`Policy.allows_capture` says (flushes between minibatches, or keys streaming
            at the latest or at stashed weights: ``Sync``, ``GPipe``, ``OneFOneB``,
            ``PipeDream``, ``Async``), with or without a trace; elsewhere, and on CPU actors, the
            run is eager (:attr:`Run.cuda_graphs_active` says which). See ``docs/gpus.md``.
        config: every option above at once, as a :class:`RunConfig` (``Trainer`` passes its
            own); the separate options must then keep their defaults.

    Raises:
        TypeError: ``graph``, ``optimizer``, ``policy``, ``state``, ``pool`` or ``on_loss``
            is not what it must be (a class where an instance is due, say); ``cuda_graphs``
            is not a bool or None; the state's ``earlier_params``, ``pending_grads`` or
            ``pending_delays`` is not a dict by layer, as ``run.state()`` gives it.
        ValueError: a closed ``pool``, ``cuda_graphs=True`` with a ``cluster`` (graphs need one process), a bad
            option, options given both separately and in ``config``, or a ``state`` that lacks
            some of the graph's layers or has others, whose versions, ``minibatches`` or
            ``keys`` are not ints >= 0, whose parameters hold a weight as a list of numbers, or
            whose parameters have another structure or shapes than the graph's (checked with
            the graph, so not where ``validated``), or whose
            ``earlier_params`` name another layer, a version that is not below the layer's, or
            parameters of another structure or shapes than the layer's in the state, whose
            ``pending_grads`` name another layer, a count that is not an int >= 0 or a sum of
            another structure or shapes than the layer's parameters in the state, whose
            ``pending_delays`` name another layer, a delay that is not an int >= 0 or more
            delays than the layer's pending count, or whose
            ``opt_states`` the optimizer's update would refuse (for an ``asyncnn.optim``
            optimizer: other keys than its ``init`` makes, or buffers of another structure or
            shapes than the layer's parameters in the state, or of ints or bools: a float one
            is cast to the run's dtype) (those also where ``validated``,
            and on a cluster).
    """
    _check_arguments(graph, optimizer, policy, state, on_loss)
    _check_pool(pool)
    given = RunConfig(seed, dtype, stall_timeout, check_finite, trace, trace_payloads, cuda_graphs)
    if config is None:
        config = given
    elif given != RunConfig():
        raise ValueError(
            "open_run: pass the run's options either in config= or separately, not both "
            f"(config={config}, and separately {given})"
        )
    check_cuda_graphs(config.cuda_graphs, cluster)
    if state is not None:
        state = _in_dtype(_counts_as_ints(state), config.dtype)
        earlier = state.earlier_params
        if earlier and not policy.versions_kept():
            # a policy that pins no forwards uses none (and its run's state drops them): a
            # trace would hold a second copy of the weights for nothing
            state = dataclasses.replace(state, earlier_params={})
        elif any(type(v) is not int for held in earlier.values() for v in held):
            # numpy ints (checked above) as ints: the trace and the wire keep int keys only
            state = dataclasses.replace(
                state,
                earlier_params={n: {int(v): p for v, p in h.items()} for n, h in earlier.items()},
            )
        if state.pending_delays:
            # only those of gradients carried (a state whose pending_grads were dropped drops
            # their delays), as ints (numpy ints, checked above: the trace and the wire keep
            # ints only)
            pending = state.pending_grads
            state = dataclasses.replace(
                state,
                pending_delays={
                    n: [int(d) for d in ds]
                    for n, ds in state.pending_delays.items()
                    if ds and n in pending and pending[n][1]
                },
            )
    if cluster is not None:
        # the workers' actors stay eager: graphs need every actor in one process
        if config.cuda_graphs is None:
            config = config.replace(cuda_graphs=False)
        defined_in_main = graph.main_classes()
        if defined_in_main:
            raise GraphError(
                f"the graph names {defined_in_main}, defined in __main__ (this script or "
                "notebook), which worker processes cannot import; move them to a module (a .py "
                "file on the path) and import them from there"
            )
        async with cluster.open_run(
            graph, optimizer, policy, config, state=state, pool=pool, on_loss=on_loss,
            validated=validated,
        ) as remote_run:  # fmt: skip
            yield remote_run
        return
    if not validated:
        # (the layers' parameters as validation makes them anyway: a state is checked against
        # their shapes at no further cost)
        like: dict[str, Any] | None = None if state is None else {}
        validate(graph, config.dtype, param_shapes=like)
        if state is not None and like is not None:
            _check_state_shapes(graph, state, like)
    if state is None:
        state = init_state(graph, optimizer, config.seed, config.dtype)
    recorder = open_recorder(config, graph, optimizer, policy, state)
    with recording(recorder):
        async with maybe_pool(pool) as the_pool:
            run = Run(
                graph, optimizer, policy, state, the_pool, config, on_loss=on_loss,
                recorder=recorder,
            )  # fmt: skip
            async with hosting(run, Share()):
                yield run


def _check_arguments(graph: Any, optimizer: Any, policy: Any, state: Any, on_loss: Any) -> None:
    """Refuses, before anything starts, what would otherwise fail inside the run under another
    name (an ``on_loss`` that is not callable failed as the loss actor's error; a state of
    another graph as a bare ``KeyError``)."""
    if not isinstance(graph, Graph):
        # (cut: a graph's spec or a module would print whole)
        hint = (
            "; build one from a graph's spec with Graph.from_spec"
            if isinstance(graph, dict)
            else ""
        )
        raise TypeError(f"open_run: graph must be an asyncnn.Graph, got {graph!r:.80}{hint}")
    check_optimizer(optimizer, "open_run: ")
    if isinstance(policy, type):
        raise TypeError(
            f"open_run: policy must be an instance, got the class {policy.__name__}; call it "
            f"with its options: policy={policy.__name__}(...)"
        )
    if not isinstance(policy, Policy):
        raise TypeError(f"open_run: policy must be an asyncnn.policies policy, got {policy!r}")
    if on_loss is not None and not callable(on_loss):
        raise TypeError(
            f"open_run: on_loss must be a function on_loss(minibatch, loss, rows) or None, got "
            f"{on_loss!r}"
        )
    if on_loss is not None and (
        inspect.iscoroutinefunction(on_loss) or inspect.iscoroutinefunction(type(on_loss).__call__)
    ):
        # (its coroutine was made and never awaited: the body never ran, without a word)
        raise TypeError(
            f"open_run: on_loss is an async function ({on_loss!r:.80}), which the run would call "
            "and never await: give a plain function on_loss(minibatch, loss, rows), called as "
            "each loss arrives (send async work to a task of your own, e.g. through a memory "
            "channel's send_nowait)"
        )
    if state is None:
        return
    if not isinstance(state, RunState):
        raise TypeError(
            f"open_run: state must be an asyncnn.RunState (run.state(), Trainer.state) or None, "
            f"got {type(state).__name__}"
        )
    check_state_counts(graph, state)
    _check_weights_are_arrays(graph, state)
    _check_earlier_versions(graph, state)
    _check_pending_grads(graph, state)
    _check_pending_delays(graph, state)
    _check_opt_states(graph, state, optimizer)


def _check_pool(pool: Any) -> None:
    """Refuses, before anything starts, a ``pool`` the run could not compute on: it failed
    inside the run with an ``AttributeError`` (a ``ComputeTeam``, a device name), and a closed
    pool as the first actor's error, or never where all the work ran inline.

    Raises:
        TypeError: ``pool`` is not a :class:`~asyncnn.backends.DevicePool` (nor None).
        ValueError: the pool is closed.
    """
    if pool is None:
        return
    if not isinstance(pool, DevicePool):
        raise TypeError(
            "open_run: pool must be a DevicePool from open_device_pool() (async with "
            f"asyncnn.backends.open_device_pool() as pool: ...) or None, got {pool!r:.80}"
        )
    if not pool.is_open:
        raise ValueError(
            f"open_run: pool {pool!r} is closed; open the run inside the pool's 'async with "
            "open_device_pool() as pool:' block, or pass pool=None for one opened for the run"
        )


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


def _in_dtype(state: RunState, dtype: str) -> RunState:
    """``state`` with its floating arrays (weights, earlier ones, optimizer buffers, pending
    gradients) in the run's ``dtype``, as ``Trainer.params = ...`` and
    ``Trainer.load(dtype=...)`` convert them, and its integer weights too, as
    ``Trainer.params = ...`` casts them (as ints they have no gradient: the layer failed at its
    first backward): a state of another dtype would otherwise keep its weights and updates in
    that dtype for the whole run, with the inputs in the run's. An optimizer's integer buffer is
    refused instead (:func:`_check_opt_states`). ``state`` itself where nothing differs (no
    copy); else a new one (the caller's is left as it was)."""
    want = np.dtype(dtype)

    def differs(leaf: Any) -> bool:
        got = getattr(leaf, "dtype", None)
        return got is not None and got != want and is_floating(got)

    def weight_differs(leaf: Any) -> bool:
        got = getattr(leaf, "dtype", None)
        return got is not None and got != want and (is_floating(got) or got.kind in "iu")

    def cast(leaf: Any) -> Any:
        return leaf.astype(want) if differs(leaf) else leaf

    def cast_weight(leaf: Any) -> Any:
        return leaf.astype(want) if weight_differs(leaf) else leaf

    # (a pending entry is (sum, count): the sum is cast, never the count, a numpy int as decoded)
    sums = [entry[0] for entry in state.pending_grads.values()]
    weights = (state.params, sums, state.earlier_params)
    if not any(weight_differs(leaf) for tree in weights for leaf in tree_leaves(tree)) and not any(
        differs(leaf) for leaf in tree_leaves(state.opt_states)
    ):
        return state
    return dataclasses.replace(
        state,
        params=tree_map(cast_weight, state.params),
        opt_states=tree_map(cast, state.opt_states),
        pending_grads={
            n: (tree_map(cast_weight, acc), count)
            for n, (acc, count) in state.pending_grads.items()
        },
        earlier_params=tree_map(cast_weight, state.earlier_params),
    )
