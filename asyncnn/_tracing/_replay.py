"""Replay: rerun a recorded run with every actor processing its messages in the recorded order.

Actors are deterministic functions of the messages they process and of the order they process
them in, so forcing each actor's recorded order (and feeding the recorded inputs) reproduces the
run bit for bit, whatever its policy. Every tensor an actor sends is checked against the recorded
digest, and so are the weights each update made; the first difference is reported.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np

from asyncnn._errors import TraceFormatError
from asyncnn._math._imports import trusted_modules as trusting
from asyncnn._math._pytree import tree_flatten, tree_map
from asyncnn._runtime._graph import Graph
from asyncnn._runtime._lifecycle import maybe_pool
from asyncnn._runtime._messages import Message
from asyncnn._runtime._open_run import open_run
from asyncnn._runtime._policies import policy_from_spec
from asyncnn._runtime._recorder import decode_tree
from asyncnn._runtime._run import Run, RunState
from asyncnn._runtime._wrapped import Replay
from asyncnn.backends import get_backend

from ._event import Event
from ._read import Trace, payload_array, read
from ._replayable import check_replayable

__all__ = ["Divergence", "ReplayResult", "replay"]


@dataclass(frozen=True)
class Divergence:
    """Where a replay (or a second run) first differs from a recorded run.

    Attributes:
        actor: the actor whose output differed first (by recorded time).
        seq: that actor's processing sequence number (its ``seq``-th piece of work).
        key: the key it was working on; ``kind``: forward or backward, or ``"update"`` where
            the weights an update made differ (``key``: the backward that made it).
        peer: where the differing message went (empty for an update).
        expected / got: the digests (or, for a reordering, the operations) that differ.
        max_abs_diff: the size of the difference where both payloads were kept, else None.
        reason: one line saying what differed.
    """

    actor: str
    seq: int
    key: int
    kind: str
    peer: str = ""
    expected: Any = None
    got: Any = None
    max_abs_diff: float | None = None
    reason: str = ""

    def __str__(self) -> str:
        size = (
            f"; max |difference| {self.max_abs_diff:.3g}" if self.max_abs_diff is not None else ""
        )
        to = f" to {self.peer!r}" if self.peer else ""
        return (
            f"first divergence at actor {self.actor!r}, sequence {self.seq}: the {self.kind} of "
            f"key {self.key}{to}: {self.reason}{size}"
        )


@dataclass
class ReplayResult:
    """The outcome of :func:`replay`.

    Attributes:
        identical: every sent tensor, and the weights every update made, matched their
            recorded digests (so the final weights are the run's too). A trace written before
            updates carried digests checks an update only where a later send uses its weights.
        events_checked: how many sends and updates were compared.
        first_divergence: the first difference, or None.
        params: the parameters at the end of the replay (``{layer: params}``, numpy).
        stopped_at: ``(actor, seq, kind, key)`` where a hook stopped the replay, or None.
    """

    identical: bool
    events_checked: int
    first_divergence: Divergence | None
    params: dict[str, Any] = field(default_factory=dict)
    stopped_at: tuple[str, int, str, int] | None = None


class _Stop(Exception):
    pass


def _orders(trace: Trace, layers: list[str]) -> dict[str, list[tuple[str, int]]]:
    starts: dict[str, list[tuple[int, str, int]]] = {name: [] for name in layers}
    for e in trace.events:
        if e.what == "start" and e.actor in starts:
            starts[e.actor].append((e.seq, e.kind, e.key))
    return {name: [(k, key) for _, k, key in sorted(ops)] for name, ops in starts.items()}


def _initial_state(trace: Trace, graph: Graph) -> RunState:
    if trace.state is None:
        raise ValueError(f"{trace.path}: the trace holds no initial state record; cannot replay")
    st = trace.state
    params = decode_tree(st["params"])
    opt_states = decode_tree(st["opt_states"])
    start = trace.header.get("start", {})
    for name in graph.layers:
        backend = get_backend(graph.nodes[name].device)
        params[name] = tree_map(backend.asarray, params[name])
        opt_states[name] = _on_device(opt_states[name], graph.nodes[name].device)
    pending: dict[str, tuple[Any, int]] = {}
    for name, (acc, count) in decode_tree(st.get("pending", {"dict": {}})).items():
        backend = get_backend(graph.nodes[name].device)
        pending[name] = (tree_map(backend.asarray, acc), int(count))
    return RunState(
        params,
        opt_states,
        dict(st["versions"]),
        start.get("minibatches", 0),
        start.get("keys", 0),
        pending,
        _actor_states(st, graph),
    )


def _actor_states(st: dict[str, Any], graph: Graph) -> dict[str, Any]:
    """The custom actors' own states the run started from (``{}`` for a trace written before
    they were recorded, or where no actor keeps one), on each layer's device (the record was
    checked by :func:`check_replayable`)."""
    encoded = st.get("actor_states")
    if encoded is None:
        return {}
    return {n: _on_device(s, graph.nodes[n].device) for n, s in decode_tree(encoded).items()}


def _on_device(tree: Any, device: Any) -> Any:
    """``tree``'s arrays on ``device`` (its other leaves as they are)."""
    b = get_backend(device)
    return tree_map(lambda x: b.asarray(x) if isinstance(x, np.ndarray) else x, tree)


def _events_by_actor(trace: Trace, actors: set[str], what: str) -> dict[str, list[Event]]:
    """Each actor's events of kind ``what``, in the order written (an actor's updates are
    written in the order it made them)."""
    out: dict[str, list[Event]] = {a: [] for a in actors}
    for e in trace.events:
        if e.what == what and e.actor in out:
            out[e.actor].append(e)
    return out


def _sends_by_actor(trace: Trace, actors: set[str]) -> dict[str, list[Event]]:
    out = _events_by_actor(trace, actors, "send")
    for sends in out.values():
        sends.sort(key=lambda e: e.seq)  # stable: sends of one op keep their order
    return out


def compare_sends(
    recorded: Trace, replayed: Trace, actors: set[str], prefix: bool = False
) -> tuple[int, Divergence | None]:
    """Compares every actor's sent tensors, in processing order; returns (checked, first).

    With ``prefix``, a replay that sent less (it was stopped) is compared as far as it went.
    """
    checked, found = _send_divergences(recorded, replayed, actors, prefix)
    return checked, _earliest(found)


def _earliest(found: list[tuple[float, Divergence]]) -> Divergence | None:
    """The divergence of the earliest recorded time (each actor's first), or None."""
    return min(found, key=lambda f: f[0])[1] if found else None


def _send_divergences(
    recorded: Trace, replayed: Trace, actors: set[str], prefix: bool
) -> tuple[int, list[tuple[float, Divergence]]]:
    """The sends compared, and each actor's first differing send with its recorded time."""
    a = _sends_by_actor(recorded, actors)
    b = _sends_by_actor(replayed, actors)
    checked = 0
    found: list[tuple[float, Divergence]] = []
    for actor in sorted(actors):
        for i, ea in enumerate(a[actor]):
            if i >= len(b[actor]):
                if prefix:
                    break
                found.append((ea.time, Divergence(actor, ea.seq, ea.key, ea.kind,
                              ea.peer, reason="the replay sent nothing here")))  # fmt: skip
                break
            eb = b[actor][i]
            checked += 1
            same_op = (ea.kind, ea.key, ea.get("p")) == (eb.kind, eb.key, eb.get("p"))
            da = [x and x["h"] for x in ea.tensors]
            db = [x and x["h"] for x in eb.tensors]
            if same_op and da == db:
                continue
            if not same_op:
                reason = f"the replay sent the {eb.kind} of key {eb.key} to {eb.get('p')!r} instead"
                div = Divergence(actor, ea.seq, ea.key, ea.kind, ea.peer,
                                 (ea.kind, ea.key), (eb.kind, eb.key), None, reason)  # fmt: skip
            else:
                div = Divergence(actor, ea.seq, ea.key, ea.kind, ea.peer,
                                 da, db, _max_abs_diff(ea, eb), _what_differs(ea, eb))  # fmt: skip
            found.append((ea.time, div))
            break
        else:
            if len(b[actor]) > len(a[actor]):
                eb = b[actor][len(a[actor])]
                found.append((float("inf"), Divergence(actor, eb.seq, eb.key, eb.kind,
                              eb.peer, reason="the replay sent more than the run")))  # fmt: skip
    return checked, found


def _max_abs_diff(ea: Event, eb: Event) -> float | None:
    """The largest difference between the first tensors of two sends whose digests differ
    (complex numbers by modulus), where both payloads were kept, have one shape and can be read
    here (an extension dtype needs ml_dtypes); else None."""
    for i, (xa, xb) in enumerate(zip(ea.tensors, eb.tensors, strict=False)):
        if (xa and xa["h"]) == (xb and xb["h"]):
            continue
        try:
            pa, pb = payload_array(ea, i), payload_array(eb, i)
        except TraceFormatError:  # (a dtype numpy does not know here: ml_dtypes missing)
            return None
        if pa is None or pb is None or pa.shape != pb.shape or pa.size == 0:
            return None  # (no bytes, no digest to differ: a damaged digest)
        wide = np.complex128 if "complex" in pa.dtype.name + pb.dtype.name else np.float64
        return float(np.max(np.abs(pa.astype(wide) - pb.astype(wide))))
    return None


def _update_divergences(
    recorded: Trace, replayed: Trace, actors: set[str], prefix: bool
) -> tuple[int, list[tuple[float, Divergence]]]:
    """The updates compared, and each actor's first differing update with its recorded time."""
    a = _events_by_actor(recorded, actors, "update")
    b = _events_by_actor(replayed, actors, "update")
    checked = 0
    found: list[tuple[float, Divergence]] = []
    for actor in sorted(actors):
        ups_a, ups_b = a[actor], b[actor]
        if not any("x" in e for e in ups_a):
            continue  # an older trace: no digests of the weights
        for i, ea in enumerate(ups_a):
            if i >= len(ups_b):
                if not prefix:
                    found.append((ea.time, _update_divergence(
                        ea, ea, None, f"the replay made no update to version {ea.version}")))  # fmt: skip
                break
            eb = ups_b[i]
            checked += 1
            da = [x and x["h"] for x in ea.tensors]
            db = [x and x["h"] for x in eb.tensors]
            if da == db and ea.version == eb.version:
                continue
            if ea.version != eb.version:
                reason = f"the replay's update made version {eb.version}, the run's {ea.version}"
            else:
                reason = f"the weights of version {ea.version} differ: " + _which_leaf(ea, eb)
            found.append((ea.time, _update_divergence(ea, ea, eb, reason)))
            break
        else:
            if len(ups_b) > len(ups_a):
                eb = ups_b[len(ups_a)]
                found.append((float("inf"), _update_divergence(
                    eb, None, eb, f"the replay made more updates than the run (to version "
                    f"{eb.version})")))  # fmt: skip
    return checked, found


def _which_leaf(ea: Event, eb: Event) -> str:
    """The first parameter array whose digest (or count) differs between two updates."""
    xa, xb = ea.tensors, eb.tensors
    for i, (a, b) in enumerate(zip(xa, xb, strict=False)):
        if (a and a["h"]) != (b and b["h"]):
            shape = tuple(a["s"]) if a else None
            return (
                f"parameter array {i} of {len(xa)} (shape {shape}; the leaves of the layer's "
                "parameter tree, dict keys sorted) has another digest"
            )
    return f"the run's update holds {len(xa)} parameter arrays, the replay's {len(xb)}"


def _update_divergence(
    at: Event, recorded: Event | None, replayed: Event | None, reason: str
) -> Divergence:
    """A divergence at the update ``at`` (kind ``"update"``; the key and ``seq`` of the backward
    that made it), with the digests of the recorded and the replayed update where there are."""

    def digests(e: Event | None) -> list[Any] | None:
        return None if e is None else [x and x["h"] for x in e.tensors]

    return Divergence(
        at.actor, at.seq, at.key, "update", "", digests(recorded), digests(replayed), None, reason
    )


def _what_differs(ea: Event, eb: Event) -> str:
    """Why two sends of the same message differ: the first tensor whose shape or dtype differs
    (two graphs of other sizes), else its digest."""
    for i, (xa, xb) in enumerate(zip(ea.tensors, eb.tensors, strict=False)):
        if xa is None or xb is None:
            continue
        if (xa.get("s"), xa.get("d")) != (xb.get("s"), xb.get("d")):
            return (
                f"tensor {i} has shape {tuple(xa.get('s', ()))} {xa.get('d')} in the first "
                f"run and {tuple(xb.get('s', ()))} {xb.get('d')} in the second"
            )
    if len(ea.tensors) != len(eb.tensors):
        return f"the first run sent {len(ea.tensors)} tensors, the second {len(eb.tensors)}"
    return "the tensor's digest differs"


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
        hook: called as ``hook(actor, seq, kind, key, params)`` after each piece of work; a true
            return value stops the replay there (for stepping through a layer's history).
        stop_at_key: stop once an actor has processed any work of this key (a shortcut for a
            hook).
        trusted_modules: modules whose classes the trace's header may name besides asyncnn's
            own and those already imported (see ``docs/security.md``).

    Returns:
        A :class:`ReplayResult`: ``identical``, ``events_checked``, ``first_divergence``,
        the final ``params``.
    """
    from asyncnn.optim import from_spec as optimizer_from_spec

    trace = read(path)
    # a truncated, incomplete or malformed trace is refused here, before anything runs
    check_replayable(trace, trusted_modules)
    h = trace.header
    with trusting(trusted_modules):
        graph = Graph.from_spec(h["graph"])
        policy = policy_from_spec(h["policy"])
        recorded_opt = optimizer_from_spec(h["optimizer"])
    opt = optimizer if optimizer is not None else recorded_opt
    state = _initial_state(trace, graph)
    if optimizer is not None:
        _check_optimizer(optimizer, recorded_opt, state, trace.path)
    orders = _orders(trace, graph.layers)
    if stop_at_key is not None:
        user_hook = hook

        def hook(a: str, seq: int, kind: str, key: int, params: Any) -> bool:  # noqa: F811
            stop = user_hook(a, seq, kind, key, params) if user_hook is not None else False
            return bool(stop) or key == stop_at_key

    if actor is not None and actor not in graph.layers and actor not in graph.losses:
        raise ValueError(
            f"replay: no actor named {actor!r}; layers: {graph.layers}, losses: {graph.losses}"
        )
    if actor is None and stop_at_key is None:
        _check_finished(trace, set(graph.layers) | set(graph.losses))
    payloads = h.get("payloads", "inputs")
    if actor is not None and payloads != "all":
        raise ValueError(
            f"replaying actor {actor!r} alone needs the payload of every message it received; "
            f"this trace kept {payloads!r}: record with trace_payloads='all'"
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "replay.trace")
        stopped: list[Any] = []
        params: dict[str, Any] = {}
        running: list[Run] = []  # the run, once open (the hook reads its weights)
        finished = anyio.Event()  # the actor replayed alone has done all its recorded work
        # (a loss actor follows no order of the policy's: its recorded work is counted here)
        loss_ops = _orders(trace, [actor])[actor] if actor in graph.losses else None
        alone = 0 if actor is None else len(orders.get(actor, []) if loss_ops is None else loss_ops)

        def on_op(name: str, seq: int, kind: str, key: int) -> None:
            if name == actor and seq + 1 >= alone:
                finished.set()
            # (a loss actor has no parameters)
            if hook is not None and hook(
                name, seq, kind, key, getattr(running[0].actors[name], "params", {})
            ):
                # the weights where it stopped, before the stop cancels the run
                params.update(running[0].params)
                raise _Stop((name, seq, kind, key))

        max_keys = sum(1 for e in trace.events if e.what == "admit") + 1
        replayed_policy = Replay(policy, orders, max_keys, actor, on_op)

        config = h.get("config", {})

        recorded_pool = h.get("pool", {})

        async def main() -> None:
            # the run's pool, whatever this host's cores: its products are cut the same way
            # (a trace without one, written before pools were recorded: this host's)
            async with maybe_pool(
                None, recorded_pool.get("cpu_workers"),
                part_flops=recorded_pool.get("part_flops", 0), split=recorded_pool.get("split"),
            ) as pool, open_run(
                graph, opt, replayed_policy, h["seed"], h["dtype"], state=state, validated=True,
                trace=out, trace_payloads="all" if payloads == "all" else "none",
                stall_timeout=30.0, cuda_graphs=config.get("cuda_graphs", False),
                # a run that check_finite stopped fails at the same actor again
                check_finite=config.get("check_finite", False) is True, pool=pool,
            ) as run:  # fmt: skip
                running.append(run)
                if actor is not None and loss_ops is not None:
                    _follow_loss(run, actor, loss_ops, on_op)
                try:
                    if actor is None:
                        await _feed_inputs(run, trace)
                        await run.drain()
                    else:
                        await _feed_actor(run, trace, actor)
                        if alone:
                            await finished.wait()
                except _Stop as stop:
                    stopped.append(stop.args[0])
                params.update(run.params)

        try:
            anyio.run(main, backend="trio")
        except _Stop as stop:
            stopped.append(stop.args[0])
        replayed = read(out)
    actors = {actor} if actor is not None else set(graph.layers) | set(graph.losses)
    # a replay stopped by a hook is checked as far as it went
    sends, found = _send_divergences(trace, replayed, actors, bool(stopped))
    updates, found_at_updates = _update_divergences(trace, replayed, actors, bool(stopped))
    first = _earliest(found + found_at_updates)
    return ReplayResult(
        first is None, sends + updates, first, params, stopped[0] if stopped else None
    )


def _follow_loss(
    run: Run, name: str, ops: list[tuple[str, int]], on_op: Callable[[str, int, str, int], None]
) -> None:
    """Has the loss actor ``name``, replayed alone, report each piece of work it finishes to
    ``on_op`` (as a layer's recorded order does), through the progress it reports after each
    (its context's ``touch``, outside the compute, so that a hook's stop is not taken for the
    loss failing). Its losses need nothing: the run drops those of minibatches it never
    admitted, as a replay of one actor admits none."""
    target = run.actors[name]
    touch = target.ctx.touch
    done = [0]

    def progress() -> None:
        touch()
        while done[0] < target.seq:
            seq = done[0]
            done[0] += 1
            kind, key = ops[seq] if seq < len(ops) else ("forward", -1)
            on_op(name, seq, kind, key)

    target.ctx = dataclasses.replace(target.ctx, touch=progress)


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


def _check_finished(trace: Trace, actors: set[str]) -> None:
    """Refuses, before anything runs, a trace whose run stopped with a message that an actor
    never processed (the run was cancelled, or failed outside the actors): a replay of the
    whole run would wait for that work forever. A failure in an actor is not refused: the
    replay reproduces it there."""
    errors = [e for e in trace.events if e.what == "error"]
    if any(e.actor in actors for e in errors):
        return
    started = {(e.actor, e.kind, e.key) for e in trace.events if e.what == "start"}
    for e in trace.events:
        if e.what == "send" and e.peer in actors and (e.peer, e.kind, e.key) not in started:
            how = (
                f"it ended with the error {errors[-1].meta.get('error', '')!r:.200}"
                if errors
                else "it was cancelled or interrupted: it recorded no error"
            )
            raise TraceFormatError(
                f"{trace.path}: the run stopped before {e.peer!r} processed the {e.kind} of key "
                f"{e.key} that {e.actor!r} sent it ({how}), so a replay of the whole run would "
                "wait for that work forever. Replay needs a run that finished, or one that "
                "failed in an actor (the replay reproduces the failure); replay one actor "
                "alone, or stop earlier with stop_at_key; summary and to_chrome show what it "
                "holds"
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


async def _feed_actor(run: Any, trace: Trace, name: str) -> None:
    """Replays one actor: sends it the recorded messages (the replay policy keeps its sends from
    being delivered, so the other actors stay idle)."""
    metas = {e.key: e.meta for e in trace.events if e.what == "admit"}
    inputs = set(run.graph.inputs)
    data = _input_data(trace, inputs)
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
