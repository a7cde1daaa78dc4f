"""Where two runs parted: the first message an actor processed in a different order, or the
first tensor whose digest differs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from asyncnn._errors import TraceFormatError
from asyncnn._math._nn._spec import BUILTINS

from ._compare import Divergence, loss_divergences, send_divergences, update_divergences
from ._event import Event
from ._read import Trace, read

__all__ = ["diff"]


def _starts(trace: Trace) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for e in trace.events:
        if e.what == "start":
            out.setdefault(e.actor, []).append(e)
    for ops in out.values():
        ops.sort(key=lambda e: e.seq)
    return out


def _check_comparable(trace: Trace) -> None:
    """Every compute start and send names its kind and key (a start also its sequence number):
    what the comparison reads."""
    for i, e in enumerate(trace.events):
        if e.what in ("start", "send"):
            need = ("k", "key", "seq") if e.what == "start" else ("k", "key")
            lacking = [f for f in need if f not in e]
            if lacking:
                raise TraceFormatError(
                    f"{trace.path}: event {i} ({e['ev']} of {e['a']!r}) lacks {lacking}; two "
                    "traces are compared by these fields"
                )


#: the fields of a graph's node that make its structure (which actors there are and which
#: messages they exchange); the others (a layer's module, device, custom actor) may differ
#: between two runs that diff compares
_STRUCTURE = ("name", "kind", "inputs")

#: the header's fields besides the graph that two runs diff compares may differ in, named
#: beside the divergence
_SETTINGS = ("policy", "optimizer", "seed", "dtype")


def _graph_nodes(header: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """``{name: node spec}`` of the header's graph, or None where it holds none to compare (a
    header written by hand, or not as the format says)."""
    graph = header.get("graph")
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    if not isinstance(nodes, list) or not all(
        isinstance(n, dict) and isinstance(n.get("name"), str) for n in nodes
    ):
        return None
    return {n["name"]: n for n in nodes}


def _first_difference(x: Any, y: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first place where the specs ``x`` and ``y`` differ (``path``: its dotted keys and
    list indices, ``""`` at the top), with both values there (:data:`_ABSENT` for a key one
    lacks), or None where they are equal. Two specs of one built-in module take an argument
    that one lacks as its default: a spec written before the module took that argument
    (``AvgPool2d``'s ``divisor_override``) means the default, as loading it does."""
    if isinstance(x, dict) and isinstance(y, dict):
        defaults = _arg_defaults(x, y)
        for k in [*x, *(k for k in y if k not in x)]:
            where = f"{path}.{k}" if path else str(k)
            u, v = x.get(k, _ABSENT), y.get(k, _ABSENT)
            if k == "args" and defaults:  # (a built-in module's: an absent one is its default)
                u = {**defaults, **u} if isinstance(u, dict) else u
                v = {**defaults, **v} if isinstance(v, dict) else v
            found = _first_difference(u, v, where)
            if found is not None:
                return found
        return None
    if isinstance(x, list | tuple) and isinstance(y, list | tuple) and len(x) == len(y):
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            found = _first_difference(u, v, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if x == y and type(x) is type(y) else (path, x, y)


def _arg_defaults(x: dict[str, Any], y: dict[str, Any]) -> dict[str, Any]:
    """The defaults of the built-in module that both module specs ``x`` and ``y`` (``{"type":
    name, "args": {...}}``) name, as a spec writes them; ``{}`` where they are no such pair (a
    class of the user's is never imported here)."""
    name = x.get("type")
    if name != y.get("type") or set(x) != {"type", "args"} or set(y) != {"type", "args"}:
        return {}
    cls = BUILTINS.get(name) if isinstance(name, str) else None
    if cls is None:
        return {}
    # (only the simple values a spec carries as they are: None, bools, numbers, strings)
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.init and isinstance(f.default, bool | int | float | str | type(None))
    }


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _said(path: str, x: Any, y: Any) -> str:
    values = f"{x!r:.80} and {y!r:.80}"
    return f"{path} {values}" if path else values


def _names(names: list[str], most: int = 8) -> str:
    """``names`` as a list, the first ``most`` of a longer one and how many more."""
    if len(names) <= most:
        return str(names)
    return f"{names[:most]} and {len(names) - most} more"


def _check_same_graph(ta: Trace, tb: Trace) -> None:
    """Refuses two traces whose graphs have other nodes or wire them otherwise: their actors
    and messages cannot be paired, and each difference read as "one run did more work"."""
    na, nb = _graph_nodes(ta.header), _graph_nodes(tb.header)
    if na is None or nb is None:
        return  # (nothing to compare: the comparison of the events says what it finds)
    what = ""
    if set(na) != set(nb):
        only_a, only_b = [n for n in na if n not in nb], [n for n in nb if n not in na]
        what = "; ".join(
            f"only the {which} has the nodes {_names(names)}"
            for which, names in (("first", only_a), ("second", only_b))
            if names
        )
    else:
        for name, node in na.items():
            other = nb[name]
            if node.get("kind") != other.get("kind"):
                what = (
                    f"node {name!r} is a {node.get('kind')} in the first graph, a "
                    f"{other.get('kind')} in the second"
                )
            elif node.get("inputs") != other.get("inputs"):
                what = (
                    f"node {name!r} reads {node.get('inputs')} in the first graph and "
                    f"{other.get('inputs')} in the second"
                )
            if what:
                break
    if what:
        raise ValueError(
            f"diff: {ta.path} and {tb.path} are traces of different graphs: {what}. diff pairs "
            "two runs' actors by name and their messages by kind and key, so it compares two "
            "runs of one graph (whose layers' modules, policy, optimizer, seed and dtype may "
            "differ: the divergence names them)"
        )


def _settings_note(ta: Trace, tb: Trace) -> str:
    """What the two runs' headers say differently besides the graph's structure (the first
    difference of each: a layer's module, the policy, the optimizer, the seed, the dtype), as
    a note for the divergence's reason; ``""`` where they agree."""
    found: list[str] = []
    na, nb = _graph_nodes(ta.header), _graph_nodes(tb.header)
    if na is not None and nb is not None:
        for name, node in na.items():
            other = nb.get(name)
            if other is None:
                continue
            for field in [*node, *(f for f in other if f not in node)]:
                if field in _STRUCTURE:
                    continue
                d = _first_difference(node.get(field, _ABSENT), other.get(field, _ABSENT))
                if d is not None:
                    found.append(f"graph: {node.get('kind')} {name!r}'s {field}: {_said(*d)}")
                    break
            if found:
                break
    for field in _SETTINGS:
        if field in ta.header and field in tb.header:
            d = _first_difference(ta.header[field], tb.header[field])
            if d is not None:
                found.append(f"{field}: {_said(*d)}")
    return f"; the runs' headers differ: {'; '.join(found)}" if found else ""


def diff(a: str | os.PathLike[str] | Trace, b: str | os.PathLike[str] | Trace) -> Divergence | None:
    """Compares two traces of the same graph; returns None if every actor processed the same
    messages in the same order with the same results, else the first :class:`Divergence`
    (earliest in ``a``'s time): a reordered message, a tensor that differs, an update that
    made other weights (``kind="update"``; traces whose updates carry the weights' digests),
    or a loss of another value (``kind="loss"``, bit for bit, NaN equal to NaN; found at the
    gradient first where that differs too).
    Every candidate is ranked on ``a``'s clock alone (``b``'s starts elsewhere): work, a message
    or an update that only ``b`` has counts, after a divergence ``a`` shows there, where the
    runs part: for work of a key that ``a`` never admitted, at the admit where the two runs'
    admits part (``a``'s admit of another key there, or where ``a``'s run ends), and of such
    work the first that ``b`` did (the key's first compute, not the actor whose events end
    first in ``a``), its ``reason`` naming that admit; for other work, where ``a``'s events of
    its actor end (where ``a`` ends, for an actor it has no events of or an ``a`` cut off).

    A trace cut off mid-record (:attr:`Trace.truncated`: its run did not finish writing) lacks
    the rest of its run, which then looks like a divergence where it ends: the divergence's
    ``reason`` says which trace is cut off. Two traces that agree as far as a cut one goes are
    not said to agree: the result is a divergence at the cut trace's last compute.

    The two runs may differ in anything but the graph's structure: the layers' modules (a
    width, an activation), devices and custom actors, the policy, the optimizer, the seed, the
    dtype. Where their headers say so, the divergence's ``reason`` ends with a note naming the
    first difference of each (``; the runs' headers differ: policy: type 'Sync' and
    'GPipe'; seed: 0 and 3``), which is likely why the runs parted; runs that processed the
    same messages with the same results agree (None) whatever their headers say. Two traces of
    different graphs (other nodes, or nodes that read other inputs) are refused: their actors
    cannot be paired.

    Raises:
        TraceFormatError: a trace is damaged, or an event lacks what the comparison reads.
        ValueError: the traces' graphs differ in their nodes or their wiring (the message
            names the first difference).
    """
    ta = a if isinstance(a, Trace) else read(a)
    tb = b if isinstance(b, Trace) else read(b)
    _check_same_graph(ta, tb)
    note = _settings_note(ta, tb)
    _check_comparable(ta)
    _check_comparable(tb)
    sa, sb = _starts(ta), _starts(tb)
    ends = _actor_ends(ta)
    parting = _Parting(ta, tb)
    b_time = {(actor, e.seq): e.time for actor, ops in sb.items() for e in ops}

    def lacked(actor: str, key: int) -> float:
        # where work that a lacks sits on a's clock: work of a key a never admitted where the
        # runs part (the admit that differs, or a's end), before any divergence a shows after
        # that; other work where a's events of its actor end
        at = parting.at(key)
        return ends(actor) if at is None else at

    # every candidate is ranked on a's clock alone (b's reads from another start): (time in a,
    # what a lacks of it, time in b, seq); work a lacks sits as `lacked` says, after any
    # divergence a shows at that point, a send or update of an op a started before an op a
    # never started, and of two that a lacks, the one b did first (the first work of the key
    # where the runs part, not the actor whose events happen to end first in a)
    found: list[tuple[tuple[float, int, float, int], Divergence]] = []
    for actor in sorted(set(sa) | set(sb)):
        ops_a, ops_b = sa.get(actor, []), sb.get(actor, [])
        for i in range(max(len(ops_a), len(ops_b))):
            ea = ops_a[i] if i < len(ops_a) else None
            eb = ops_b[i] if i < len(ops_b) else None
            if ea is not None and eb is not None and (ea.kind, ea.key) == (eb.kind, eb.key):
                continue
            ref = ea if ea is not None else eb
            assert ref is not None
            if ea is None or eb is None:
                reason = "one run did more work here than the other" + parting.note(ref.key)
            else:
                reason = (
                    f"first run processed the {ea.kind} of key {ea.key}, the second the "
                    f"{eb.kind} of key {eb.key}"
                )
            rank = (
                (ea.time, 0, 0.0, i) if ea is not None else (lacked(actor, ref.key), 2, ref.time, i)
            )
            found.append(
                (
                    rank,
                    Divergence(
                        actor, i, ref["key"], ref["k"], "",
                        None if ea is None else (ea.kind, ea.key),
                        None if eb is None else (eb.kind, eb.key), None,
                        "processing order differs: " + reason,
                    ),
                )
            )  # fmt: skip
            break
    actors = {e.actor for e in ta.events if e.what == "start"}
    # each actor's first differing send, and the weights each update made: a run that differs
    # only in a layer's last update (which no later send shows) does not agree (traces written
    # before updates carried digests: skipped). One that only b made is at time inf there.
    _, sends = send_divergences(ta, tb, actors, prefix=False)
    _, updates = update_divergences(ta, tb, actors, prefix=False)
    # and each loss actor's first differing loss (a change that moved a loss and not its
    # gradient shows nowhere else; ranked at the loss compute's end, after the gradient it sent)
    _, losses = loss_divergences(ta, tb, actors, prefix=False)
    for t, d in sends + updates + losses:
        if t == float("inf"):
            ops = sa.get(d.actor, [])
            started = d.seq < len(ops) and ops[d.seq].seq == d.seq
            at_b = b_time.get((d.actor, d.seq), float("inf"))
            rank = (lacked(d.actor, d.key), 1 if started else 2, at_b, d.seq)
        else:
            rank = (t, 0, 0.0, d.seq)
        found.append((rank, _of_two_runs(d)))
    cut = [t for t in (ta, tb) if t.truncated]
    if not found:
        if not cut:
            return None
        first = _at_the_cut(cut)
        return dataclasses.replace(first, reason=first.reason + note) if note else first
    first = min(found, key=lambda f: f[0])[1]  # (the first found of equal rank)
    if cut:  # the other run's later work then looks like a divergence
        first = dataclasses.replace(
            first,
            reason=f"{first.reason}; note: {_cut_note(cut)}, so a divergence where it ends may "
            "be only the cut",
        )
    return dataclasses.replace(first, reason=first.reason + note) if note else first


def _cut_note(cut: list[Trace]) -> str:
    by_path = {t.path: t for t in cut}  # (a trace diffed with itself: said once)
    return "; ".join(
        f"{path} is cut off after {len(t.events)} events (its run did not finish writing)"
        for path, t in by_path.items()
    )


#: how the reason begins where the traces agree as far as a cut one goes (no divergence found,
#: only the end of what can be compared): ``asyncnn trace diff`` says that without "divergence"
AGREE_SO_FAR = "the runs agree as far as the traces go, but "


#: the loss and update comparisons' words (made for a replay against its run), said of two
#: runs, in the order they are replaced
_OF_TWO_RUNS = {
    "loss": (
        ("the run's loss", "the first run's loss"),
        ("the replay's", "the second's"),
        ("the replay computed", "the second run computed"),
        ("than the run", "than the first"),
    ),
    "update": (
        ("the replay's update", "the second run's update"),
        ("the run's", "the first run's"),
        ("the replay made", "the second run made"),
        ("than the run", "than the first"),
    ),
}


def _of_two_runs(d: Divergence) -> Divergence:
    """``d`` as found by the comparison that replay makes, said of two runs."""
    reason = {
        "the replay sent nothing here": "the second run sent nothing here",
        "the replay sent more than the run": "the second run sent more than the first",
    }.get(d.reason, d.reason)
    if reason.startswith("the replay sent the "):  # (a message sent to another actor)
        reason = "the second run sent the " + reason.removeprefix("the replay sent the ")
    for old, new in _OF_TWO_RUNS.get(d.kind, ()):
        reason = reason.replace(old, new)
    return dataclasses.replace(d, reason=reason)


def _at_the_cut(cut: list[Trace]) -> Divergence:
    """Where the first of the cut traces ends: its last compute (or nothing, where it has
    none), with the reason that the traces cannot be said to agree."""
    last = next((e for e in reversed(cut[0].events) if e.what == "start"), None)
    reason = f"{AGREE_SO_FAR}{_cut_note(cut)}: whether they part after that cannot be told"
    if last is None:
        return Divergence("", -1, -1, "", reason=reason)
    return Divergence(last.actor, last.seq, last.key, last.kind, reason=reason)


class _Parting:
    """Where the two runs' admits part: the first admit whose key differs, or where one run's
    admits end and the other's go on."""

    def __init__(self, a: Trace, b: Trace) -> None:
        admits_a = [e for e in a.events if e.what == "admit" and "key" in e]
        admits_b = [e for e in b.events if e.what == "admit" and "key" in e]
        self.admitted_a = {e.key for e in admits_a}
        self.admitted_b = {e.key for e in admits_b}
        j = next(
            (
                i
                for i, (ea, eb) in enumerate(zip(admits_a, admits_b, strict=False))
                if ea.key != eb.key
            ),
            min(len(admits_a), len(admits_b)),
        )
        self.last_a = admits_a[j - 1].key if j else None
        self.instead = admits_a[j].key if j < len(admits_a) else None
        self.first_b = admits_b[j].key if j < len(admits_b) else None
        # on a's clock: a's admit there, or where a's run ends (its last event before the
        # closing record, which is written after the run)
        if j < len(admits_a):
            self.time: float = admits_a[j].time
        else:
            times = [e.time for e in a.events if "t" in e and e.what != "close"]
            self.time = max(times, default=float("inf"))

    def at(self, key: int) -> float | None:
        """Where work of ``key`` that only the second run did sits on the first's clock: where
        the runs part, for a key the first never admitted; else None."""
        return self.time if key in self.admitted_b and key not in self.admitted_a else None

    def note(self, key: int) -> str:
        """What a divergence of work of ``key`` that one run alone did says of the admits."""
        if key not in self.admitted_a and key in self.admitted_b:
            also = "" if key == self.first_b else f"; the first run never admitted key {key}"
            if self.instead is not None:
                return (
                    f": the runs part at the second run's admit of key {self.first_b}, where "
                    f"the first admitted key {self.instead}{also}"
                )
            after = "" if self.last_a is None else f" (its admits end at key {self.last_a})"
            return (
                f": the runs part at the second run's admit of key {self.first_b}, which the "
                f"first run never admitted{after}{also}"
            )
        if key in self.admitted_a and key not in self.admitted_b and self.admitted_b:
            return f": the first run admitted key {key}, which the second never did"
        return ""


def _actor_ends(trace: Trace) -> Callable[[str], float]:
    """``ends(actor)``: where work of ``actor`` that ``trace`` lacks is ranked, on its clock:
    the time of its last event there (of any kind: a message received and not yet processed
    too), or the trace's end where it has none. In a trace cut off (:attr:`Trace.truncated`),
    the end of the trace for every actor: its actors' work stops there only because the record
    does, not where their last events are."""
    last: dict[str, float] = {}
    end = float("-inf")
    for e in trace.events:
        if "t" not in e:
            continue
        t = e.time
        end = max(end, t)
        if e.actor:
            last[e.actor] = max(last.get(e.actor, t), t)
    if trace.truncated:
        return lambda actor: end
    return lambda actor: last.get(actor, end)
