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

from asyncnn._errors import GraphError
from asyncnn.backends import DevicePool

from ._checks import check_cuda_graphs, check_optimizer, validate
from ._config import RunConfig
from ._graph import Graph
from ._lifecycle import Share, hosting, maybe_pool, open_recorder, recording
from ._loss_reductions import check_loss_reductions
from ._policies import Policy
from ._run import Run
from ._run_guards import checked_max_in_flight
from ._state import RunState, init_state
from ._state_checks import _check_state_shapes, _counts_as_ints, _in_dtype, check_state

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
            is cast to the run's dtype, Adam's and AdamW's moments of float16 weights to
            float32) (those also where ``validated``, and on a cluster); or a state holding a
            finite value that the cast to the run's dtype would make Inf (a weight of 1e5 in a
            float16 run), naming its place.
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
        state = _in_dtype(_counts_as_ints(state), config.dtype, optimizer)
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
    check_loss_reductions(graph, policy)
    if state is None:
        state = init_state(graph, optimizer, config.seed, config.dtype)
    recorder = open_recorder(config, graph, optimizer, policy, state)
    with recording(recorder):
        async with maybe_pool(pool, one_at_a_time=_one_at_a_time(policy, graph)) as the_pool:
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
    check_state(graph, state, optimizer)


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


def _one_at_a_time(policy: Policy, graph: Graph) -> bool:
    """Whether ``policy`` lets one key in flight at a time (``Sync``, ``GPipe(1)``,
    ``OneFOneB(1)``): then one actor computes at a time along a chain, and a small host's cores
    go to its products whole (``maybe_pool``)."""
    try:
        return checked_max_in_flight(policy, len(graph.layers)) == 1
    except Exception:  # noqa: BLE001 - a policy that cannot say: the run will, under its name
        return False
