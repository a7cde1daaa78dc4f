"""Whether a trace's recorded order is one a run can have had: its computes
(:func:`check_orders_possible`, a whole replay's check before it runs: each actor's computes
played out in order, a compute once the computes that send its messages are done; an altered
trace otherwise made the replay wait for a message until its stall timeout) and its
admissions (:func:`check_in_flight`: no more keys in flight than the header's policy lets in).
Apart from the replay's modules because these read only the trace, the graph's wiring and the
policy.
"""

from __future__ import annotations

from typing import Any

from asyncnn._errors import TraceFormatError

from ._read import Trace

__all__ = ["check_in_flight", "check_orders_possible"]

#: an operation of an actor, ``(actor, kind, key)``
_Op = tuple[str, str, int]


def check_orders_possible(trace: Trace, graph: Any) -> None:
    """Refuses, before a whole replay runs, recorded orders that no run can have had: a compute
    (an actor's ``start``) that waits for a message whose sender computes it only after work
    that waits, in turn, for this compute (a backward moved before its key's forward), or for a
    message no recorded compute sends (a second forward of one key). The replay, which has each
    actor follow its recorded order, waited for such a message until its stall timeout.

    Each actor's recorded computes are played out in order, a compute once the computes that
    send its messages are done (as the trace's sends to it say: a forward from its inputs, a
    backward from its consumers; a loss sends its gradients in its forward); the messages of
    the graph's inputs are there from the start, as the replay admits every key at once. Any
    order a run had plays out whole, whatever its policy.

    Raises:
        TraceFormatError: naming the first compute that cannot come, and the chain of waits
            that holds it.
    """
    actors = [*graph.layers, *graph.losses]
    losses = set(graph.losses)
    #: each actor's computes in recorded order: (kind, key, event index, a split backward's
    #: input half)
    orders: dict[str, list[tuple[str, int, int, bool]]] = {a: [] for a in actors}
    #: compute -> {the compute sending one of its messages: the event of that send}
    needs: dict[_Op, dict[_Op, int]] = {}
    for i, e in enumerate(trace.events):
        if e.what == "start" and e.actor in orders:
            orders[e.actor].append((e.kind, e.key, i, e.meta.get("half") == "input"))
        elif e.what == "send" and e.actor in orders and e.peer in orders:
            src, dst = e.actor, e.peer
            # (a send along no edge of the graph is not one the replay's actor waits for)
            wired = graph.nodes[dst if e.kind == "forward" else src].inputs
            if (src if e.kind == "forward" else dst) not in wired:
                continue
            made_in = "forward" if e.kind == "forward" or src in losses else "backward"
            needs.setdefault((dst, e.kind, e.key), {}).setdefault((src, made_in, e.key), i)
    done: dict[_Op, int] = {}  # compute -> its place in its actor's order
    pos = dict.fromkeys(actors, 0)
    blocked: dict[str, _Op | None] = {}  # actor -> the compute it waits for (None: none comes)
    waiting: dict[_Op, list[str]] = {}
    todo = list(actors)
    while todo:
        name = todo.pop()
        order = orders[name]
        while pos[name] < len(order):
            kind, key, _, _ = order[pos[name]]
            op = (name, kind, key)
            if op in done:
                # a key's forward comes once, its backward once or as a split backward's two
                # halves: a further one waits for messages that were taken already
                first = done[op]
                if (
                    kind == "forward"
                    or not order[first][3]
                    or any((k, y) == (kind, key) for k, y, _, _ in order[first + 1 : pos[name]])
                ):
                    blocked[name] = None
                    break
            else:
                missing = next((p for p in needs.get(op, ()) if p not in done), None)
                if missing is not None:
                    blocked[name] = missing
                    waiting.setdefault(missing, []).append(name)
                    break
                done[op] = pos[name]
                todo.extend(waiting.pop(op, ()))
            pos[name] += 1
    stuck = [a for a in actors if pos[a] < len(orders[a])]
    if not stuck:
        return
    first_stuck = min(stuck, key=lambda a: orders[a][pos[a]][2])
    raise TraceFormatError(
        f"{trace.path}: event {orders[first_stuck][pos[first_stuck]][2]} (start of "
        f"{first_stuck!r}) is a compute that no run can have come to in this order: "
        f"{_waits(first_stuck, orders, pos, blocked, done, needs)}; a replay would wait for it "
        "until its stall timeout. The file was altered (its events reordered or changed), or "
        "mixes two runs; summary and to_chrome show what it holds"
    )


def _waits(
    name: str,
    orders: dict[str, list[tuple[str, int, int, bool]]],
    pos: dict[str, int],
    blocked: dict[str, _Op | None],
    done: dict[_Op, int],
    needs: dict[_Op, dict[_Op, int]],
) -> str:
    """The chain of waits that holds actor ``name`` (see :func:`check_orders_possible`),
    followed until it comes round to an actor named before (a cycle) or to a message that
    never comes."""

    def compute(actor: str, n: int) -> str:
        kind, key, i, _ = orders[actor][n]
        return f"{actor!r} compute {n} (the {kind} of key {key}, event {i})"

    links: list[str] = []
    named: set[str] = set()
    cycle = False
    while True:
        named.add(name)
        here = compute(name, pos[name])
        kind, key, _, _ = orders[name][pos[name]]
        want = blocked[name]
        if want is None:
            took = compute(name, done[(name, kind, key)])
            links.append(
                f"{here} is its second forward of key {key}, after {took}, which took that "
                "key's inputs: none come for a second"
                if kind == "forward"
                else f"{here} is a further backward of key {key}, after {took}, which took "
                "that key's gradients (only a split backward has a second, its weight half, "
                "right after its input half): none come for another"
            )
            break
        src, made_in, _ = want
        at = next(
            (n for n, (k, y, _, _) in enumerate(orders[src]) if (k, y) == (made_in, key)), None
        )
        if at is None:
            links.append(
                f"{here} waits for the {kind} of key {key} from {src!r}, which {src!r} never "
                f"computes: its computes hold no {made_in} of key {key} (the send of event "
                f"{needs[(name, kind, key)][want]} is all the trace holds of it)"
            )
            break
        later = "" if at == pos[src] else f", which comes only after {compute(src, pos[src])}"
        links.append(
            f"{here} waits for the {kind} of key {key} from {src!r}, sent in "
            f"{compute(src, at)}{later}"
        )
        if src in named:
            cycle = True
            break
        name = src
    if cycle:
        links.append("and so round: a cycle of computes, each waiting for another's later work")
    return "; ".join(links)


def check_in_flight(trace: Trace, graph: Any, policy: Any) -> None:
    """Refuses events that hold more keys in flight than the header's policy lets in
    (``policy.max_in_flight``: an altered ``max_active_keys`` or ``microbatches``), which the
    replay, following the recorded admissions, replayed as identical. A key is in flight from
    its ``admit`` until every layer has begun its backward of it (a run frees the key's place
    within the last of those computes, so an admission it allowed comes after that ``start``).

    Only a trace of one process is checked: a cluster's is merged by time from clocks that
    may differ by half a round trip (docs/trace_format.md), which can put a worker's last backward
    after the admission it allowed.

    Raises:
        TraceFormatError: naming the admission, the keys in flight, the policy and its limit.
    """
    from asyncnn._runtime._run_guards import checked_max_in_flight

    workers = trace.header.get("workers")
    if isinstance(workers, dict) and any(w is not None for w in workers.values()):
        return
    try:
        limit = checked_max_in_flight(policy, len(graph.layers))
    except Exception:  # noqa: BLE001 - a custom policy that cannot say here: nothing to check
        return
    layers = set(graph.layers)
    in_flight: dict[int, set[str]] = {}  # key -> the layers that have begun its backward
    for i, e in enumerate(trace.events):
        if e.what == "admit":
            if len(in_flight) >= limit:
                keys = sorted(in_flight)
                raise TraceFormatError(
                    f"{trace.path}: event {i} (admit of key {e.key}) makes {len(keys) + 1} keys "
                    f"in flight ({keys} admitted before it and not yet through every layer's "
                    f"backward), but the header's policy lets at most {limit} be in flight: "
                    f"{_limit_source(policy, len(graph.layers), limit)}. The run could not have "
                    "admitted it: the header's policy or the events were altered, or the file "
                    "mixes two runs"
                )
            in_flight[e.key] = set()
        elif e.what == "start" and e.kind == "backward" and e.actor in layers:
            begun = in_flight.get(e.key)
            if begun is not None:
                begun.add(e.actor)
                if len(begun) == len(layers):
                    del in_flight[e.key]


def _limit_source(policy: Any, num_stages: int, limit: int) -> str:
    """Which field of ``policy`` (or of a policy it wraps) sets its in-flight ``limit``."""
    from asyncnn._runtime._policies import Policy

    inner = policy
    for _ in range(16):  # (remedies nest; a wrapper that wraps itself must not loop)
        # (Async's limit is its max_active_keys; the default max_in_flight, its microbatches)
        field = "max_active_keys"
        if getattr(inner, field, None) != limit:
            field = "microbatches"
            if getattr(type(inner), "max_in_flight", None) is not Policy.max_in_flight:
                field = ""
        if field and getattr(inner, field, None) == limit:
            return f"{type(inner).__name__}'s {field}={limit} ({policy!r:.160})"
        inner = getattr(inner, "wrapped", None)
        if inner is None:
            break
    return (
        f"{type(policy).__name__}.max_in_flight({num_stages}) is {limit} for its {num_stages} "
        f"layers ({policy!r:.160})"
    )
