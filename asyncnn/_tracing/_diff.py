"""Where two runs parted: the first message an actor processed in a different order, or the
first tensor whose digest differs."""

from __future__ import annotations

import os

from asyncnn._errors import TraceFormatError

from ._event import Event
from ._read import Trace, read
from ._replay import Divergence, compare_sends

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
    (earliest in ``a``'s time): a reordered message, or a tensor that differs.

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
        found.append((t, first_value))
    if not found:
        return None
    return min(found, key=lambda f: f[0])[1]


def _time_of(trace: Trace, d: Divergence) -> float:
    for e in trace.events:
        if e.what == "send" and e.actor == d.actor and e.get("seq") == d.seq:
            return e.time
    return float("inf")
