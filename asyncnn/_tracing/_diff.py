"""Where two runs parted: the first message an actor processed in a different order, or the
first tensor whose digest differs."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from asyncnn._errors import TraceFormatError

from ._compare import Divergence, send_divergences, update_divergences
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


def diff(a: str | os.PathLike[str] | Trace, b: str | os.PathLike[str] | Trace) -> Divergence | None:
    """Compares two traces of the same graph; returns None if every actor processed the same
    messages in the same order with the same results, else the first :class:`Divergence`
    (earliest in ``a``'s time): a reordered message, a tensor that differs, or an update that
    made other weights (``kind="update"``; traces whose updates carry the weights' digests).
    Every candidate is ranked on ``a``'s clock alone (``b``'s starts elsewhere): work, a message
    or an update that only ``b`` has counts where ``a``'s events of its actor end (where ``a``
    ends, for an actor it has no events of or an ``a`` cut off), after a divergence ``a`` shows
    there.

    A trace cut off mid-record (:attr:`Trace.truncated`: its run did not finish writing) lacks
    the rest of its run, which then looks like a divergence where it ends: the divergence's
    ``reason`` says which trace is cut off. Two traces that agree as far as a cut one goes are
    not said to agree: the result is a divergence at the cut trace's last compute.

    Raises:
        TraceFormatError: a trace is damaged, or an event lacks what the comparison reads.
    """
    ta = a if isinstance(a, Trace) else read(a)
    tb = b if isinstance(b, Trace) else read(b)
    _check_comparable(ta)
    _check_comparable(tb)
    sa, sb = _starts(ta), _starts(tb)
    ends = _actor_ends(ta)
    # every candidate is ranked on a's clock alone (b's reads from another start): (time in a,
    # what a lacks of it, seq); work a lacks sits where a's events of its actor end, after any
    # divergence a shows at that point, and a send or update of an op a started before an op
    # a never started
    found: list[tuple[tuple[float, int, int], Divergence]] = []
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
                reason = "one run did more work here than the other"
            else:
                reason = (
                    f"first run processed the {ea.kind} of key {ea.key}, the second the "
                    f"{eb.kind} of key {eb.key}"
                )
            rank = (ea.time, 0, i) if ea is not None else (ends(actor), 2, i)
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
    for t, d in sends + updates:
        if t == float("inf"):
            ops = sa.get(d.actor, [])
            started = d.seq < len(ops) and ops[d.seq].seq == d.seq
            rank = (ends(d.actor), 1 if started else 2, d.seq)
        else:
            rank = (t, 0, d.seq)
        found.append((rank, _of_two_runs(d)))
    cut = [t for t in (ta, tb) if t.truncated]
    if not found:
        if not cut:
            return None
        return _at_the_cut(cut)
    first = min(found, key=lambda f: f[0])[1]  # (the first found of equal rank)
    if cut:  # the other run's later work then looks like a divergence
        first = dataclasses.replace(
            first,
            reason=f"{first.reason}; note: {_cut_note(cut)}, so a divergence where it ends may "
            "be only the cut",
        )
    return first


def _cut_note(cut: list[Trace]) -> str:
    return "; ".join(
        f"{t.path} is cut off after {len(t.events)} events (its run did not finish writing)"
        for t in cut
    )


def _of_two_runs(d: Divergence) -> Divergence:
    """``d`` as found by the comparison that replay makes, said of two runs."""
    reason = {
        "the replay sent nothing here": "the second run sent nothing here",
        "the replay sent more than the run": "the second run sent more than the first",
    }.get(d.reason, d.reason)
    if reason.startswith("the replay sent the "):  # (a message sent to another actor)
        reason = "the second run sent the " + reason.removeprefix("the replay sent the ")
    if d.kind == "update":  # (the update comparison's words, said of two runs)
        reason = (
            reason.replace("the replay's update", "the second run's update")
            .replace("the run's", "the first run's")
            .replace("the replay made", "the second run made")
            .replace("than the run", "than the first")
        )
    return dataclasses.replace(d, reason=reason)


def _at_the_cut(cut: list[Trace]) -> Divergence:
    """Where the first of the cut traces ends: its last compute (or nothing, where it has
    none), with the reason that the traces cannot be said to agree."""
    last = next((e for e in reversed(cut[0].events) if e.what == "start"), None)
    reason = (
        f"the runs agree as far as the traces go, but {_cut_note(cut)}: whether they part "
        "after that cannot be told"
    )
    if last is None:
        return Divergence("", -1, -1, "", reason=reason)
    return Divergence(last.actor, last.seq, last.key, last.kind, reason=reason)


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
