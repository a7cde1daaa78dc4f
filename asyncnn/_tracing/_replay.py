"""Replay: rerun a recorded run with every actor processing its messages in the recorded order.

Actors are deterministic functions of the messages they process and of the order they process
them in, so forcing each actor's recorded order (and feeding the recorded inputs) reproduces the
run bit for bit, whatever its policy. Every tensor an actor sends is checked against the recorded
digest, and so are the weights each update made (and where it was made) and each loss value;
the first difference is reported. A run that failed in an actor fails there again: in a
module's or hook's work as it replays, in a custom actor's ``actor_state`` (which a fit calls as
it goes) once the actor has done its recorded work, where the replay reads it as the run did.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from asyncnn._errors import StallError, TraceFormatError
from asyncnn._math._pytree import tree_flatten, tree_map
from asyncnn._runtime._lifecycle import internal_trace, maybe_pool, run_trio
from asyncnn._runtime._messages import Message
from asyncnn._runtime._open_run import open_run
from asyncnn._runtime._run import Run, RunState
from asyncnn._runtime._setup import _hook_failed
from asyncnn._runtime._wrapped import Replay
from asyncnn.backends import get_backend

from ._compare import (
    Divergence,
    earliest,
    loss_divergences,
    losses_of,
    send_divergences,
    update_divergences,
)
from ._event import Event
from ._orders import check_orders_possible
from ._read import Trace, payload_array, read
from ._replayable import Checked, check_replayable

__all__ = ["Divergence", "ReplayResult", "replay"]


@dataclass
class ReplayResult:
    """The outcome of :func:`replay`.

    Attributes:
        identical: every sent tensor, and the weights every update made, matched their
            recorded digests (so the final weights are the run's too), every update came at
            the compute the run made it in, and every loss value matched the recorded one bit
            for bit (NaN matches NaN). A trace written before updates carried digests checks
            an update only where a later send uses its weights.
        events_checked: how many sends, updates and losses were compared.
        first_divergence: the first difference, or None.
        params: the parameters at the end of the replay (``{layer: params}``, numpy): where a
            hook stopped it, those at ``stopped_at``, however far other actors had got.
        stopped_at: ``(actor, seq, kind, key)`` where a hook stopped the replay, or None.
        losses: the losses the replay computed, ``{loss actor: {key: loss}}`` (floats, as the
            trace records them): every loss actor's in a whole replay (those it got to, where
            a hook stopped it), the actor's own where a loss actor is replayed alone, empty
            where a layer is.
        recorded_error: the error the recorded run ended with (the text of its trace's first
            ``error`` event), which this replay did not raise: a failure of an actor it did
            not replay (one actor replayed alone), one a hook's stop came before, one outside
            the actors (a callback's), or an ``actor_state`` that returned in the replay (then
            also ``first_divergence``, of kind ``"actor_state"``); None where the run recorded
            no error. (A replay that reaches the failure raises it, as the run did.)
    """

    identical: bool
    events_checked: int
    first_divergence: Divergence | None
    params: dict[str, Any] = field(default_factory=dict)
    stopped_at: tuple[str, int, str, int] | None = None
    losses: dict[str, dict[int, float]] = field(default_factory=dict)
    recorded_error: str | None = None


class _Stop(Exception):
    pass


class _StatesRead(Exception):
    """The actors whose ``actor_state`` raised in the recorded run returned in the replay (it
    ends the replay's run, which may hold keys in flight that no recorded work finishes)."""


def _state_failures(trace: Trace, actors: set[str], layers: list[str]) -> dict[str, Event]:
    """The recorded ``error`` events of a custom actor's ``actor_state`` (kind
    ``"actor_state"``) among ``actors``, by layer: a fit reads its actors' states as it goes,
    and such a run failed at a read, with no work of that actor left undone."""
    return {
        e.actor: e
        for e in trace.events
        if e.what == "error" and e.kind == "actor_state" and e.actor in actors
        and e.actor in layers
    }  # fmt: skip


def _read_failed_states(run: Run, failed: dict[str, Event]) -> None:
    """Reads the state of each actor whose ``actor_state`` raised in the recorded run, as the
    run did once that actor's recorded work was done: raises the same error
    (:class:`~asyncnn.ActorError`, kind ``"actor_state"``, the exception as its cause), or
    :class:`_StatesRead` where every one returned."""
    for name in run.layers:  # (in the order a run reads them)
        if name in failed:
            a = run.local[name]
            try:
                a.actor_state()
            except Exception as exc:
                raise _hook_failed(name, type(a), "actor_state", exc) from exc
    raise _StatesRead


def _unraised(
    failed: dict[str, Event], orders: dict[str, list[tuple[str, int]]]
) -> list[tuple[float, Divergence]]:
    """The divergence of each actor whose ``actor_state`` raised in the recorded run and
    returned in the replay, at the recorded error's time (after the actor's work)."""
    return [
        (
            e.time,
            Divergence(
                name,
                len(orders[name]),
                -1,
                "actor_state",
                expected=str(e.meta.get("error", "")),
                got=None,
                reason=(
                    f"the recorded run failed here, reading the actor's own state: "
                    f"{e.meta.get('error', '')!r:.300}; the replay's actor_state() returned, "
                    f"after the same {len(orders[name])} computes"
                ),
            ),
        )
        for name, e in failed.items()
    ]


def _orders(trace: Trace, actors: list[str]) -> dict[str, list[tuple[str, int]]]:
    """Each actor's recorded operations, ``(kind, key)`` in processing order: the order of its
    ``start`` events, numbered 0, 1, ... (:func:`check_replayable` checked it)."""
    starts: dict[str, list[tuple[str, int]]] = {name: [] for name in actors}
    for e in trace.events:
        if e.what == "start" and e.actor in starts:
            starts[e.actor].append((e.kind, e.key))
    return starts


def _initial_state(trace: Trace, checked: Checked) -> RunState:
    """The state the run started from, on each layer's device: the arrays that
    :func:`check_replayable` decoded (checked there), not copied out of the record again."""
    graph, st = checked.graph, trace.state
    assert st is not None  # (check_replayable refused a trace without one)
    params, opt_states = checked.params, checked.opt_states
    start = trace.header.get("start", {})
    for name in graph.layers:
        backend = get_backend(graph.nodes[name].device)
        params[name] = tree_map(backend.asarray, params[name])
        opt_states[name] = _on_device(opt_states[name], graph.nodes[name].device)
    pending: dict[str, tuple[Any, int]] = {}
    for name, (acc, count) in checked.pending.items():
        backend = get_backend(graph.nodes[name].device)
        pending[name] = (tree_map(backend.asarray, acc), int(count))
    actor_states = {
        n: _on_device(s, graph.nodes[n].device) for n, s in checked.actor_states.items()
    }
    # (check_replayable checked the versions are ints below the layers')
    earlier = {n: _on_device(held, graph.nodes[n].device) for n, held in checked.earlier.items()}
    return RunState(
        params,
        opt_states,
        dict(st["versions"]),
        start.get("minibatches", 0),
        start.get("keys", 0),
        pending,
        actor_states,
        earlier,
        {n: list(ds) for n, ds in checked.pending_delays.items()},
    )


def _on_device(tree: Any, device: Any) -> Any:
    """``tree``'s arrays on ``device``, its other leaves as they are (numpy scalars too), its
    dicts with their keys in their order: the tree the run's actor had (``tree_map`` sorted
    a dict's keys, and refused int keys among str ones)."""
    b = get_backend(device)

    def move(x: Any) -> Any:
        kind = type(x)  # (a decoded tree holds these exact types, as the trace writes them)
        if kind is dict:
            return {k: move(v) for k, v in x.items()}
        if kind is list:
            return [move(v) for v in x]
        if kind is tuple:
            return tuple(move(v) for v in x)
        return b.asarray(x) if isinstance(x, np.ndarray) else x

    return move(tree)


def replay(
    path: str | os.PathLike[str],
    actor: str | None = None,
    *,
    optimizer: Any = None,
    hook: Callable[[str, int, str, int, Any], bool | None] | None = None,
    stop_at_key: int | None = None,
    trusted_modules: Iterable[str] | None = None,
) -> ReplayResult:
    """Reruns a recorded run and checks it against its trace.

    Args:
        path: a trace written with ``Trainer(..., trace=path)`` or ``open_run(..., trace=path)``.
        actor: replay this actor (a layer or a loss) alone, from the messages it received (the
            trace needs ``trace_payloads="all"``); by default the whole graph is replayed from
            the recorded inputs.
        optimizer: use this optimizer instead of the recorded one (to see where a change shows).
        hook: called as ``hook(actor, seq, kind, key, params)`` after each piece of work of
            every actor, in the recorded order of each (a loss actor's too, with ``params``
            ``{}``); a true return value stops the replay there (for stepping through a
            layer's history): the hook is called no more, the rest of the run is cancelled,
            and the result's ``params`` are the weights at that point.
        stop_at_key: stop once an actor has processed any work of this key (a shortcut for a
            hook).
        trusted_modules: modules whose classes the trace's header may name besides asyncnn's
            own and those already imported (see ``docs/security.md``).

    Returns:
        A :class:`ReplayResult`: ``identical``, ``events_checked``, ``first_divergence``,
        the final ``params``, the replayed ``losses``.
    """
    trace = read(path)
    # a truncated, incomplete or malformed trace is refused here, before anything runs
    # (which rebuilds the header's specs and decodes the initial state: the replay starts from
    # those, so that each buffer is copied out of the record once)
    checked = check_replayable(trace, trusted_modules)
    h = trace.header
    graph, policy, recorded_opt = checked.graph, checked.policy, checked.optimizer
    opt = optimizer if optimizer is not None else recorded_opt
    state = _initial_state(trace, checked)
    if optimizer is not None:
        _check_optimizer(optimizer, recorded_opt, state, trace.path)
    # (a loss's order too: a policy orders the layers only, so the replay gives the losses
    # theirs itself, once the run is open)
    orders = _orders(trace, [*graph.layers, *graph.losses])
    if stop_at_key is not None:
        if not isinstance(stop_at_key, int | np.integer) or isinstance(stop_at_key, bool):
            raise TypeError(
                f"replay: stop_at_key must be a key (an int), got {stop_at_key!r:.40} "
                f"({type(stop_at_key).__name__})"
            )
        stop_at_key = int(stop_at_key)
        user_hook = hook

        def hook(a: str, seq: int, kind: str, key: int, params: Any) -> bool:  # noqa: F811
            stop = user_hook(a, seq, kind, key, params) if user_hook is not None else False
            return bool(stop) or key == stop_at_key

    if actor is not None and actor not in graph.layers and actor not in graph.losses:
        raise ValueError(
            f"replay: no actor named {actor!r}; layers: {graph.layers}, losses: {graph.losses}"
        )
    if actor is None:
        check_orders_possible(trace, graph)
        _check_finished(trace, set(graph.layers) | set(graph.losses), stop_at_key)
        _check_receives_sent(trace, set(graph.layers) | set(graph.losses))
    if stop_at_key is not None:
        _check_stop_key(trace, set(graph.layers) | set(graph.losses), actor, stop_at_key)
    payloads = h.get("payloads", "inputs")
    if actor is not None and payloads != "all":
        raise ValueError(
            f"replaying actor {actor!r} alone needs the payload of every message it received; "
            f"this trace kept {payloads!r}: record with trace_payloads='all' (asyncnn train "
            "--trace-payloads all on the command line)"
        )
    fed: dict[int, dict[str, Any]] = {}
    if actor is not None:
        fed = _check_fed(trace, graph, actor)
    actors = {actor} if actor is not None else set(graph.layers) | set(graph.losses)
    # a custom actor's actor_state that raised in the run: read again where the run read it
    state_failures = _state_failures(trace, actors, graph.layers)
    unraised: list[tuple[float, Divergence]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "replay.trace")
        stopped: list[tuple[str, int, str, int]] = []  # where the hook first stopped the replay
        params: dict[str, Any] = {}
        running: list[Run] = []  # the run, once open (the hook reads its weights)
        # the actors whose recorded work the replay waits for (rather than for its keys to
        # finish): the actor replayed alone; every actor where the run failed reading an
        # actor's state, with keys in flight that no recorded work finishes (a read by the
        # fit's own on_loss)
        waited = (
            [actor] if actor is not None
            else [*graph.layers, *graph.losses] if state_failures else []
        )  # fmt: skip
        progress = dict.fromkeys(waited, 0)  # each one's ops done (its wait's progress)
        unfinished = {n for n in waited if orders[n]}
        finished = anyio.Event()  # the actors waited for have done all their recorded work
        if not unfinished:
            finished.set()

        def on_op(name: str, seq: int, kind: str, key: int) -> None:
            if stopped:
                # stopped already: the other actors' work in hand when the stop came (until
                # its cancellation reaches them) neither calls the hook nor takes the weights
                # again, which are those at the stop
                raise _Stop(stopped[0])
            if name in progress:
                progress[name] = seq + 1
                if seq + 1 >= len(orders[name]):
                    unfinished.discard(name)
                    if not unfinished:
                        finished.set()
            # (a loss actor has no parameters)
            if hook is not None and hook(
                name, seq, kind, key, getattr(running[0].actors[name], "params", {})
            ):
                # the weights where it stopped, before the stop cancels the run
                params.update(running[0].params)
                stopped.append((name, seq, kind, key))
                raise _Stop(stopped[0])

        max_keys = sum(1 for e in trace.events if e.what == "admit") + 1
        replayed_policy = Replay(policy, orders, max_keys, actor, on_op)

        config = h.get("config", {})

        recorded_pool = h.get("pool", {})
        plan_workers = recorded_pool.get("plan_workers")  # (checked by the reader)

        async def main() -> None:
            # the run's pool, whatever this host's cores: its products are cut the same way,
            # and the same work runs inline (uncut) on the loop's thread (a trace without
            # one, written before pools were recorded: this host's; without inline_flops,
            # written before it was recorded: the default, which such runs had unless they
            # opened their own pool). A cluster's processes planned their products for another
            # size than their threads (plan_workers): so does the replay's pool; a trace
            # without it planned for its cpu_workers.
            async with maybe_pool(
                None, recorded_pool.get("cpu_workers"),
                part_flops=recorded_pool.get("part_flops", 0), split=recorded_pool.get("split"),
                inline_flops=recorded_pool.get("inline_flops"), plan_workers=plan_workers,
                blas_threads=recorded_pool.get("blas_threads"),
            ) as pool, open_run(
                graph, opt, replayed_policy, h["seed"], h["dtype"], state=state, validated=True,
                trace=out, trace_payloads="all" if payloads == "all" else "none",
                stall_timeout=30.0, cuda_graphs=config.get("cuda_graphs", False),
                # a run that check_finite stopped fails at the same actor again
                check_finite=config.get("check_finite", False) is True, pool=pool,
            ) as run:  # fmt: skip
                if run.recorder is not None:  # (no trace= of the caller's names this file)
                    run.recorder.advice = (
                        "it is the replay's own trace, a temporary file: free space in the "
                        f"temporary folder ({tempfile.gettempdir()}), or set TMPDIR to another"
                    )
                running.append(run)
                _follow_losses(run, graph.losses, replayed_policy)
                # a stop (raised here too, where the feed runs an actor's work directly) cancels
                # the run: a drain would go on with the work admitted
                if actor is None:
                    await _feed_inputs(run, trace)
                else:
                    await _feed_actor(run, trace, actor, fed)
                if waited:
                    await _wait_recorded(finished, progress, orders, actor, trace.path)
                else:
                    await run.drain()
                if not stopped:
                    params.update(run.params)
                    if state_failures:  # raises the run's error, or _StatesRead
                        _read_failed_states(run, state_failures)

        try:
            # (its trace is the replay's own: a warning that it names classes of __main__ is
            # not for the user, whose run the recorded trace is; trio runs main in a copy of
            # this context)
            with internal_trace(out):
                run_trio(main)
        except _Stop:
            pass  # (``stopped`` holds the first stop, which every later one names)
        except _StatesRead:
            unraised = _unraised(state_failures, orders)
        replayed = read(out)
    # a replay stopped by a hook is checked as far as it went
    sends, found = send_divergences(trace, replayed, actors, bool(stopped))
    updates, found_at_updates = update_divergences(trace, replayed, actors, bool(stopped))
    losses, found_at_losses = loss_divergences(trace, replayed, actors, bool(stopped))
    first = earliest(found + found_at_updates + found_at_losses + unraised)
    errors = [e for e in trace.events if e.what == "error"]
    return ReplayResult(
        first is None, sends + updates + losses, first, params,
        stopped[0] if stopped else None, losses_of(replayed, actors),
        str(errors[0].meta.get("error", "")) if errors else None,
    )  # fmt: skip


def _follow_losses(run: Run, losses: list[str], policy: Replay) -> None:
    """Has each loss actor process its keys in the recorded order, and report each to
    ``on_op`` (the hook, and the end of an actor replayed alone), as a layer's recorded order
    does. Set before any key is admitted or fed: the actors are still waiting for their first
    message. A loss replayed alone needs nothing more: the run drops the losses of minibatches
    it never admitted, as a replay of one actor admits none."""
    for name in losses:
        run.actors[name].follow(policy.order_for(name, 0, 0))


def _check_optimizer(optimizer: Any, recorded: Any, state: RunState, path: str) -> None:
    """Refuses, before anything runs, an ``optimizer=`` that cannot continue from the recorded
    optimizer states (another kind, or options that keep other buffers)."""
    if not all(callable(getattr(optimizer, m, None)) for m in ("init", "update", "to_spec")):
        raise TypeError(
            f"replay: optimizer must be an asyncnn.optim optimizer (such as "
            f"optim.SGD(lr=0.1)), got {optimizer!r:.80}"
        )
    for name, params in state.params.items():
        fresh, kept = optimizer.init(params), state.opt_states[name]
        if tree_flatten(fresh)[1] != tree_flatten(kept)[1]:

            def keys(tree: Any) -> Any:
                return sorted(tree) if isinstance(tree, dict) else type(tree).__name__

            raise ValueError(
                f"replay: optimizer={optimizer!r:.120} cannot continue the run of {path}: its "
                f"state for layer {name!r} has {keys(fresh)}, that of the recorded "
                f"{recorded!r:.120} has {keys(kept)}. Pass an optimizer of the recorded kind "
                "with options that keep the same state (others, such as lr, may change)"
            )


def _check_stop_key(trace: Trace, actors: set[str], actor: str | None, key: int) -> None:
    """Refuses a ``stop_at_key`` that no actor of the run (or ``actor``, replayed alone)
    processed work of: the replay would never stop there, and went on to the end, calling the
    whole run identical.

    Raises:
        ValueError: naming the key and the keys the run processed.
    """
    who = actors if actor is None else {actor}
    keys = sorted({e.key for e in trace.events if e.what == "start" and e.actor in who})
    if key in keys:
        return
    held = f"processed work of keys {keys[0]} to {keys[-1]}" if keys else "did no work"
    said = (
        f"no actor of this run processed any work of key {key} (its actors {held})"
        if actor is None
        else f"actor {actor!r} processed no work of key {key} (it {held})"
    )
    raise ValueError(
        f"replay: stop_at_key={key}, but {said}: the replay would never stop there; pass a "
        "key the run processed (summary and to_chrome show them)"
    )


def _check_finished(trace: Trace, actors: set[str], stop_at_key: int | None = None) -> None:
    """Refuses, before anything runs, a trace whose run stopped with a message that an actor
    never processed (the run was cancelled, or failed outside the actors): a replay of the
    whole run would wait for that work forever. A failure in an actor is not refused: the
    replay reproduces it there. Nor is a ``stop_at_key`` that some actor of the run processed
    work of: everything recorded before that work ran, so the replay gets there and stops."""
    errors = [e for e in trace.events if e.what == "error"]
    if any(e.actor in actors for e in errors):
        return
    starts = [e for e in trace.events if e.what == "start" and e.actor in actors]
    started = {(e.actor, e.kind, e.key) for e in starts}
    for e in trace.events:
        if e.what == "send" and e.peer in actors and (e.peer, e.kind, e.key) not in started:
            how = (
                f"it ended with the error {errors[-1].meta.get('error', '')!r:.200}"
                if errors
                else "it was cancelled or interrupted: it recorded no error"
            )
            stopped = (
                f"the run stopped before {e.peer!r} processed the {e.kind} of key {e.key} that "
                f"{e.actor!r} sent it ({how})"
            )
            if stop_at_key is None:
                raise TraceFormatError(
                    f"{trace.path}: {stopped}, so a replay of the whole run would wait for that "
                    "work forever. Replay needs a run that finished, or one that failed in an "
                    "actor (the replay reproduces the failure); replay one actor alone, or stop "
                    "earlier with stop_at_key; summary and to_chrome show what it holds"
                )
            keys = sorted({s.key for s in starts})
            if stop_at_key in keys:
                return
            held = f"processed work of keys {keys[0]} to {keys[-1]}" if keys else "did no work"
            raise TraceFormatError(
                f"{trace.path}: stop_at_key={stop_at_key}, but no actor of this run processed "
                f"any work of key {stop_at_key} (its actors {held}): {stopped}, so a "
                f"replay would wait for that work forever and never reach key {stop_at_key}. "
                "Pass a stop_at_key of a key the run processed, or replay one actor alone; "
                "summary and to_chrome show what it holds"
            )


#: how long an actor replayed alone (or the actors of a whole replay that waits for their
#: recorded work, see :func:`_wait_recorded`) may wait for its next recorded op without any
#: work done before the replay stops naming it (the run's stall watchdog looks only at keys in
#: flight, and a replay of one actor admits none); the replay's own stall timeout
ALONE_STALL_SECONDS = 30.0


async def _wait_recorded(
    finished: anyio.Event,
    progress: dict[str, int],
    orders: dict[str, list[tuple[str, int]]],
    alone: str | None,
    path: str,
) -> None:
    """Waits until the actors of ``progress`` (each one's ops done so far) have done their
    recorded ``orders``: actor ``alone`` replayed alone, or every actor of a whole replay;
    raises a :class:`StallError` naming the op an actor waits for once none has done anything
    for :data:`ALONE_STALL_SECONDS` (a message the trace lacks, which :func:`_check_fed` did
    not catch: it would otherwise wait forever)."""
    while not finished.is_set():
        before = sum(progress.values())
        with anyio.move_on_after(ALONE_STALL_SECONDS):
            await finished.wait()
        if not finished.is_set() and sum(progress.values()) == before:
            name = next(n for n, done in progress.items() if done < len(orders[n]))
            at = progress[name]
            kind, key = orders[name][at]
            who = f"the replay of {name!r} alone" if alone is not None else "the replay"
            waits = "it waits" if alone is not None else f"{name!r} waits"
            raise StallError(
                f"{path}: {who} did nothing for {ALONE_STALL_SECONDS:g} s: {waits} for its "
                f"compute {at} (the {kind} of key {key}), whose messages the trace does not "
                "all hold; the file was altered, or mixes two runs"
            )


def _check_fed(trace: Trace, graph: Any, name: str) -> dict[int, dict[str, Any]]:
    """Refuses, before anything runs, a recorded message that actor ``name`` replayed alone
    could not take as it was sent: a slot that its forward's inputs (or its backward's
    gradients) do not have, which failed in its mailbox with a bare IndexError, or was taken
    as a Python index from the end; or a tensor without its payload, which was fed as None.
    Refuses too a compute of ``name`` that no recorded message feeds: one that it received a
    message for (its ``receive`` events) whose ``send`` the trace lacks, or one that no send
    feeds at all; the replay would wait for it forever. Returns the inputs' recorded data
    (:func:`_input_data`), which the feed then sends."""
    _check_every_compute_fed(trace, name)
    node = graph.nodes[name]
    inputs = set(graph.inputs)
    data = _input_data(trace, inputs)
    slots = {
        "forward": ("input", list(node.inputs)),
        "backward": ("gradient", [c for c, _ in node.consumers]),
    }
    for i, e in enumerate(trace.events):
        if e.what != "send" or e.get("p") != name:
            continue

        def bad(what: str, e: Any = e, i: int = i) -> TraceFormatError:
            return TraceFormatError(
                f"{trace.path}: event {i} (send of {e.actor!r}) {what}; the file was altered"
            )

        slot = e.meta.get("slot", 0)
        what, senders = slots[e.kind]  # (check_replayable refused any other kind)
        if not 0 <= slot < len(senders):
            raise bad(
                f"sends the {e.kind} of key {e.key} to slot {slot} of {name!r}, whose {e.kind} "
                f"takes {len(senders)} {what}(s), in slots 0 to {len(senders) - 1} (from "
                f"{senders})"
            )
        if e.actor in inputs:  # (an input's data is kept with its first send)
            if data.get(e.key, {}).get(e.actor) is None:
                raise bad(f"sends key {e.key} of input {e.actor!r}, whose data was not recorded")
            continue
        tensors, payloads = e.tensors, e.payloads
        if not tensors:
            raise bad(f"describes no tensor, though {name!r} replayed alone is fed its tensors")
        for j, info in enumerate(tensors):
            # (a tensor recorded as None, a gradient not sent, has no payload to feed)
            if info is not None and (j >= len(payloads) or payloads[j] is None):
                raise bad(
                    f"carries no payload for its tensor {j}, which {name!r} replayed alone is fed"
                )
    return data


def _check_receives_sent(trace: Trace, actors: set[str]) -> None:
    """Refuses, before a whole replay runs, a ``receive`` of an actor whose ``send`` the trace
    lacks (deleted or altered): the replay sends that message, and then reported a divergence
    of the replay at the sender's next send, blaming the replay for a record the file lacks."""
    sent: Counter[tuple[str, str, str, int]] = Counter()
    for e in trace.events:
        if e.what == "send":
            sent[(e.actor, e.peer, e.kind, e.key)] += 1
    received: Counter[tuple[str, str, str, int]] = Counter()
    for i, e in enumerate(trace.events):
        if e.what == "receive" and e.actor in actors:
            route = (e.peer, e.actor, e.kind, e.key)
            received[route] += 1
            if received[route] > sent[route]:
                raise TraceFormatError(
                    f"{trace.path}: event {i} (receive of {e.actor!r}) took the {e.kind} of key "
                    f"{e.key} from {e.peer!r}, whose send the trace does not hold; the file was "
                    "altered, or mixes two runs"
                )


def _check_every_compute_fed(trace: Trace, name: str) -> None:
    """Refuses a compute of ``name`` (its recorded ``start``) that the trace's sends to it do not
    feed: a message it received (a ``receive`` event, from its sender) that no ``send`` of the
    trace matches, or no send of its kind and key at all. Fed alone, the actor would wait for
    that message forever."""
    sent: Counter[tuple[str, str, int]] = Counter()
    for e in trace.events:
        if e.what == "send" and e.peer == name:
            sent[(e.actor, e.kind, e.key)] += 1
    fed = {(kind, key) for _, kind, key in sent}
    unmatched: Counter[tuple[str, int]] = Counter()
    received: Counter[tuple[str, str, int]] = Counter()
    for e in trace.events:
        if e.what == "receive" and e.actor == name:
            route = (e.peer, e.kind, e.key)
            received[route] += 1
            if received[route] > sent[route]:
                unmatched[(e.kind, e.key)] += 1
    for e in trace.events:
        if e.what != "start" or e.actor != name:
            continue
        op = (e.kind, e.key)
        if op in unmatched or op not in fed:
            lacks = (
                "a message it received for it (its receive event) has no send in the trace"
                if op in unmatched
                else "no send of the trace feeds it"
            )
            raise TraceFormatError(
                f"{trace.path}: {name!r} replayed alone could not do its compute {e.seq} (the "
                f"{e.kind} of key {e.key}): {lacks}, so the replay would wait for it forever; "
                "the file was altered, or mixes two runs"
            )


def _input_data(trace: Trace, inputs: set[str]) -> dict[int, dict[str, Any]]:
    """``{key: {input: its recorded data}}`` (the data is kept with an input's first send)."""
    data: dict[int, dict[str, Any]] = {}
    for e in trace.events:
        if e.what == "send" and e.actor in inputs:
            arr = payload_array(e)
            if arr is not None:
                data.setdefault(e.key, {})[e.actor] = arr
    return data


async def _feed_inputs(run: Any, trace: Trace) -> None:
    """Admits the recorded keys, in order, with their recorded data."""
    inputs = set(run.graph.inputs)
    data = _input_data(trace, inputs)
    for e in trace.events:
        if e.what != "admit":
            continue
        key, meta = e.key, e.meta
        parts = data.get(key, {})
        missing = inputs - set(parts)
        if missing:
            raise ValueError(
                f"{trace.path}: key {key} has no recorded data for {sorted(missing)}; replay needs "
                "traces recorded with trace_payloads='inputs' or 'all'"
            )
        got = await run.admit(parts, meta)
        if got != key:
            raise ValueError(f"{trace.path}: keys out of sequence (recorded {key}, replayed {got})")


async def _feed_actor(run: Any, trace: Trace, name: str, data: dict[int, dict[str, Any]]) -> None:
    """Replays one actor: sends it the recorded messages (the replay policy keeps its sends from
    being delivered, so the other actors stay idle); ``data``: the inputs' recorded data."""
    metas = {e.key: e.meta for e in trace.events if e.what == "admit"}
    inputs = set(run.graph.inputs)
    target = run.actors[name]
    for e in trace.events:
        if e.what == "send" and e.get("p") == name:
            if e.actor in inputs:
                tensors: tuple[Any, ...] = (data.get(e.key, {}).get(e.actor),)
            else:  # every tensor the message carried (a router's to its merge: weights, route)
                tensors = tuple(payload_array(e, i) for i in range(max(1, len(e.tensors))))
            slot = int(e.meta.get("slot", 0))
            msg = Message(e.kind, e.key, e.get("v", 0), e.actor, name, slot, tensors, metas[e.key])
            await target.send_channel.send(msg)
