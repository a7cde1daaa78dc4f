"""Where two runs parted: the first message an actor processed in a different order, or the
first tensor whose digest differs."""

from __future__ import annotations

import dataclasses
import os

from asyncnn._errors import TraceFormatError

from ._compare import Divergence, compare_sends, update_divergences
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
    found: list[tuple[float, Divergence]] = []
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
            found.append(
                (
                    ref["t"],
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
    _, first_value = compare_sends(ta, tb, actors)
    if first_value is not None:
        t = _time_of(ta, first_value)
        found.append((t, _of_two_runs(first_value)))
    # the weights each update made: a run that differs only in a layer's last update (which no
    # later send shows) does not agree (traces written before updates carried digests: skipped)
    _, updates = update_divergences(ta, tb, actors, prefix=False)
    found.extend((t, _of_two_runs(d)) for t, d in updates)
    cut = [t for t in (ta, tb) if t.truncated]
    if not found:
        if not cut:
            return None
        return _at_the_cut(cut)
    first = min(found, key=lambda f: f[0])[1]
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


def _time_of(trace: Trace, d: Divergence) -> float:
    for e in trace.events:
        if e.what == "send" and e.actor == d.actor and e.get("seq") == d.seq:
            return e.time
    return float("inf")
