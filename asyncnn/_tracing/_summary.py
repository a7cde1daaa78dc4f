"""What a trace says about a run: who was busy, what moved, how stale the gradients were.

Everything is computed in one streaming pass over the events, so a trace of any size can be
summarised; the plots (optional) keep one interval per compute.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ._event import Event
from ._read import open_trace, unclosed_reason

__all__ = ["Occupancy", "format_summary", "node_kinds", "sent_bytes", "summary"]


def node_kinds(header: dict[str, Any]) -> dict[str, str]:
    """``{node name: "input" | "layer" | "loss"}`` from the header's graph spec (empty without)."""
    graph = header.get("graph")
    if not isinstance(graph, dict):
        return {}
    return {str(n["name"]): str(n.get("kind", "")) for n in graph.get("nodes", []) if "name" in n}


def node_devices(header: dict[str, Any]) -> dict[str, str]:
    """``{node name: its device}`` from the header's graph spec (empty without)."""
    graph = header.get("graph")
    if not isinstance(graph, dict):
        return {}
    return {
        str(n["name"]): str(n["device"])
        for n in graph.get("nodes", [])
        if "name" in n and "device" in n
    }


def _union_seconds(starts: array[float], ends: array[float]) -> float:
    """The time covered by the intervals ``[starts[i], ends[i]]``."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(zip(starts, ends, strict=True)):
        if b <= reach:
            continue
        total += b - max(a, reach)
        reach = b
    return total


def sent_bytes(e: Event) -> int:
    """The bytes of the tensors a ``send`` event carried."""
    return sum(int(x["n"]) for x in e.get("x") or () if x is not None)


class Occupancy:
    """Follows what the runtime holds as events stream by: keys in flight (admitted and not yet
    through every layer's backward), and per layer the stored activations and the parameter
    versions they reference (the same counting as :class:`~asyncnn.ActorStatistics` where
    forwards keep their pullbacks; under ``stash=False`` a stored key keeps its inputs, not
    its weights, and ``ActorStatistics`` counts the latest version alone, where this counts the
    versions the stored keys computed with, as ``docs/trace_format.md`` defines the counter).
    Each actor's events are on its own process's clock, so a cluster run's merged trace counts
    as one process's does.

    :meth:`feed` returns what changed: ``("in_flight", n)`` or ``(actor, stored, versions)``.

    Events are taken in the trace's order, which is by time; in a cluster run's trace each
    worker's times are on the driver's clock only as closely as that clock was matched, so a
    worker's backward of a key may come before the driver's admit of it. Such backwards are
    counted for the key when it is admitted (one that every layer has ended by then is never
    counted in flight), instead of leaving the key in flight for good.
    """

    def __init__(self, kinds: dict[str, str]) -> None:
        self.layers = {n for n, k in kinds.items() if k == "layer"}
        self.known = bool(kinds)
        self.in_flight = 0
        self._done: dict[int, int] = {}
        self._admitted: set[int] = set()
        self.stored: dict[str, int] = {}
        self._fwd_version: dict[tuple[str, int], int] = {}
        # the version each forward under way computes with, from its start event (a pinned
        # one under PipeDream2BW, below the actor's latest that its end event says)
        self._computing_with: dict[tuple[str, int], int] = {}
        self._refs: dict[str, dict[int, int]] = {}
        self.version: dict[str, int] = {}

    def _is_layer(self, actor: str) -> bool:
        if self.known:
            return actor in self.layers
        return actor != "scheduler"

    def versions_held(self, actor: str) -> int:
        refs = self._refs.get(actor, {})
        return len(refs) + (self.version.get(actor, 0) not in refs)

    def feed(self, e: Event) -> list[tuple[Any, ...]]:
        ev = e.what
        a = e.actor
        changes: list[tuple[Any, ...]] = []
        if ev == "admit" and "key" in e:
            if self._done.get(e.key, 0) >= max(1, self._layers_to_end()):
                del self._done[e.key]  # through every backward before its admit, by the clocks
            else:
                self._admitted.add(e.key)
                self.in_flight += 1
                changes.append(("in_flight", self.in_flight))
        elif ev == "update" and "v" in e:
            self.version[a] = e.version
            if a in self._refs:
                changes.append((a, self.stored.get(a, 0), self.versions_held(a)))
        elif ev in ("start", "end") and self._is_layer(a) and "key" in e:
            key = e.key
            # a split backward (ZeroBubbleH1) is two computes, its input half then its weight
            # half: the key's residuals are held, and its backward goes on, until the second
            whole = _whole_backward(e)
            refs = self._refs.setdefault(a, {})
            if ev == "start" and e.kind == "forward":
                self._computing_with[(a, key)] = int(e.get("v", 0))
            elif ev == "end" and e.kind == "forward":
                # the stored key holds the version its forward computed with (docs/
                # trace_format.md), which its start event says; the end's may be later
                started = self._computing_with.pop((a, key), None)
                v = int(e.get("v", 0)) if started is None else started
                self._fwd_version[(a, key)] = v
                refs[v] = refs.get(v, 0) + 1
                self.stored[a] = self.stored.get(a, 0) + 1
                changes.append((a, self.stored[a], self.versions_held(a)))
            elif ev == "start" and e.kind == "backward" and whole:
                held = self._fwd_version.pop((a, key), None)
                if held is not None:
                    refs[held] -= 1
                    if not refs[held]:
                        del refs[held]
                    self.stored[a] -= 1
                    changes.append((a, self.stored[a], self.versions_held(a)))
            elif ev == "end" and e.kind == "backward" and whole:
                n = self._done.get(key, 0) + 1
                if n >= self._layers_to_end() and key in self._admitted:
                    self._done.pop(key, None)
                    self._admitted.discard(key)
                    self.in_flight -= 1
                    changes.append(("in_flight", self.in_flight))
                else:  # more layers to go, or (another process's clock) its admit still to come
                    self._done[key] = n
        return changes

    def _layers_to_end(self) -> int:
        # the backwards that end a key; without a graph in the header, the first layer's
        return len(self.layers) if self.known else 1


def _whole_backward(e: Event) -> bool:
    """Whether a backward's ``start`` or ``end`` event is of a whole one, or of the weight half
    that ends a split one (false for the input half, which a weight half follows)."""
    meta = e.get("m")
    return not (isinstance(meta, dict) and meta.get("half") == "input")


@dataclass
class _Actor:
    kind: str = ""
    busy: float = 0.0
    forwards: int = 0
    backwards: int = 0
    messages_in: int = 0
    messages_out: int = 0
    bytes_out: int = 0
    updates: int = 0
    # version at a backward minus version at its key's forward: the staleness of a trace whose
    # updates do not list their gradients' delays (written by another tool)
    staleness: list[int] = field(default_factory=list)
    # the delays the update events list: the forward's version as the actor used it (a pinned
    # or stashed one, which a start event's version is not), as ActorStatistics counts them
    delays: list[int] = field(default_factory=list)
    lists_delays: bool = False
    peak_stored: int = 0
    peak_versions_held: int = 0
    device_busy: float = 0.0
    open: tuple[float, str, int] | None = None
    fwd_version: dict[int, int] = field(default_factory=dict)
    intervals: list[tuple[float, float, str]] = field(default_factory=list)


def _device_use(busy: float, active: float) -> dict[str, float]:
    # the spans' sum is never below their union's length, but the two add in different orders:
    # several actors' spans meeting end to end gave 0.9999999999999999 on an H100
    return {
        "busy_seconds": busy,
        "active_seconds": active,
        "overlap": max(1.0, busy / active) if active > 0 else 0.0,
    }


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def summary(
    path: str | os.PathLike[str], plots: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Summarises a trace in one streaming pass.

    Args:
        path: the trace file.
        plots: a folder to write ``in_flight.png`` (keys in flight over time) and
            ``busy.png`` (each actor's computes on a timeline) into, with matplotlib.

    Returns:
        A dict: ``path``, ``truncated`` (cut off mid-record, or without its closing record),
        ``closed`` (:attr:`~asyncnn.trace.Trace.closed`: False where the trace lacks the
        closing record its writer writes, as that of a killed process does; None for a trace
        whose writer writes none), ``cut_mid_record`` (the file ends inside a record: its
        writer stopped mid-write), ``missing_workers`` (workers of a failed or
        interrupted cluster run whose events the trace lacks), ``events``, ``seconds`` (time of
        the last event), ``run_seconds`` (the run's span: from its first ``admit`` to its last
        event; the set-up before the first admit, tens of milliseconds for a process's first
        run, is not part of it; for a trace without admits, from its first compute),
        ``policy``, ``keys`` (admitted), ``minibatches``, ``bytes_moved`` (sum of the bytes of
        every sent tensor), ``in_flight`` (``max`` and ``mean``, weighted by time over
        ``run_seconds``, of the keys in flight), ``losses`` (count, ``first``, ``last``),
        ``errors`` (messages), ``plots`` (paths written) and ``actors``: per actor its
        ``kind``, ``busy_seconds``, ``idle_seconds`` (``run_seconds`` less ``busy_seconds``: an
        actor is idle from the run's first admit on, as :class:`~asyncnn.ActorStatistics`
        counts from the actor's start; on a cluster that includes a worker's set-up after the
        driver's first admit; 0 for an input), ``busy_fraction`` (``busy_seconds`` over
        ``run_seconds``), ``forwards``, ``backwards`` (the two halves of a split one count
        once), ``updates``, ``messages_in``, ``messages_out``, ``bytes_out``,
        ``staleness_mean`` / ``staleness_max`` (over the gradients its updates applied: the
        delays its ``update`` events list, the version at the update minus the version the
        key's forward used, as ``ActorStatistics.delays`` counts them; for a trace whose
        updates list none, over its backwards: its version at the backward minus its version
        at the key's forward),
        ``peak_stored`` and ``peak_versions_held``, and ``device_busy_seconds`` (the time
        its work ran on its device's clock: a traced GPU actor's "device" events; 0 without).
        ``devices``: per device that "device" events name, ``busy_seconds`` (the sum over
        its actors), ``active_seconds`` (the time at least one of them ran) and ``overlap``
        (their ratio: how many actors' work ran at once on average, 1.0 when none
        overlapped).
    """
    keep = plots is not None
    reader = open_trace(path)
    kinds = node_kinds(reader.header)
    occ = Occupancy(kinds)
    actors: dict[str, _Actor] = {n: _Actor(kind=k) for n, k in kinds.items()}
    events = 0
    t_last = 0.0
    keys = 0
    minibatches: set[int] = set()
    losses: list[float] = []
    errors: list[str] = []
    missing: set[int] = set()
    flight: list[tuple[float, int]] = [(0.0, 0)]
    flight_area = 0.0
    # where the run begins: its first admit (the set-up before it is no one's idle time), or
    # an earlier compute (a cluster worker's clock matches the driver's only to a millisecond)
    begin: float | None = None
    flight_max = 0
    devices = node_devices(reader.header)
    # each device's spans of work, for the time any ran (a union: kept until the end)
    spans: dict[str, tuple[array[float], array[float]]] = {}
    for e in reader:
        events += 1
        a = e.actor
        ev = e.what
        if ev == "close":
            continue  # (written as the trace closed, after the run: not a time of the run)
        t = float(e.get("t", t_last))
        t_last = max(t_last, t)
        if ev in ("admit", "start") and "t" in e and (begin is None or t < begin):
            begin = t
        for change in occ.feed(e):
            if change[0] == "in_flight":
                t0, n0 = flight[-1]
                flight_area += n0 * (t - t0)
                flight.append((t, int(change[1])))
                flight_max = max(flight_max, int(change[1]))
                if not keep:
                    del flight[:-1]
            else:
                st = actors.setdefault(change[0], _Actor())
                st.peak_stored = max(st.peak_stored, change[1])
                st.peak_versions_held = max(st.peak_versions_held, change[2])
        if ev == "admit":
            keys += 1
            if "minibatch" in e.meta:
                minibatches.add(int(e.meta["minibatch"]))
            continue
        if ev == "error":
            errors.append(str(e.meta.get("error", "")))
            continue
        if ev == "missing":
            missing.update(w for w in e.meta.get("workers", []) if isinstance(w, int))
            continue
        if a == "scheduler" or ev == "flush":
            continue
        st = actors.setdefault(a, _Actor())
        if ev == "receive":
            st.messages_in += 1
        elif ev == "send":
            st.messages_out += 1
            st.bytes_out += sent_bytes(e)
        elif ev == "update":
            st.updates += 1
            delays = e.meta.get("delays")
            if isinstance(delays, list):
                st.lists_delays = True
                st.delays.extend(int(d) for d in delays if isinstance(d, int))
        elif ev == "device":
            starts, ends = spans.setdefault(devices.get(a, "device"), (array("d"), array("d")))
            for t0, t1 in e.meta.get("spans", []):
                starts.append(float(t0))
                ends.append(float(t1))
                st.device_busy += float(t1) - float(t0)
        elif ev == "start":
            kind, key = e.kind, e.key
            st.open = (t, kind, key)
            v = int(e.get("v", 0))
            if kind == "forward":
                st.fwd_version[key] = v
            elif kind == "backward" and key in st.fwd_version:
                st.staleness.append(v - st.fwd_version.pop(key))
        elif ev == "end" and st.open is not None:
            t0, kind, _ = st.open
            st.open = None
            st.busy += t - t0
            if kind == "forward":
                st.forwards += 1
                if "loss" in e.meta:
                    losses.append(float(e.meta["loss"]))
            elif _whole_backward(e):
                st.backwards += 1
            if keep:
                st.intervals.append((t0, t, kind))
    t0, n0 = flight[-1]
    flight_area += n0 * (t_last - t0)  # (none in flight before the first admit: no area)
    span = t_last - (t_last if begin is None else min(begin, t_last))
    out_actors: dict[str, dict[str, Any]] = {}
    for name, st in actors.items():
        if st.open is not None:  # cut off mid-compute: count it up to the end
            st.busy += t_last - st.open[0]
        stale = st.delays if st.lists_delays else st.staleness
        out_actors[name] = {
            "kind": st.kind,
            "busy_seconds": st.busy,
            "idle_seconds": max(0.0, span - st.busy) if st.kind != "input" else 0.0,
            "busy_fraction": st.busy / span if span > 0 else 0.0,
            "forwards": st.forwards,
            "backwards": st.backwards,
            "updates": st.updates,
            "messages_in": st.messages_in,
            "messages_out": st.messages_out,
            "bytes_out": st.bytes_out,
            "staleness_mean": _mean(stale),
            "staleness_max": max(stale, default=0),
            "peak_stored": st.peak_stored,
            "peak_versions_held": st.peak_versions_held,
            "device_busy_seconds": st.device_busy,
        }
    policy = reader.header.get("policy")
    result: dict[str, Any] = {
        "path": str(path),
        "truncated": reader.truncated,
        "closed": reader.closed,
        "cut_mid_record": reader.cut_mid_record,
        "missing_workers": sorted(missing),
        "events": events,
        "seconds": t_last,
        "run_seconds": span,
        "policy": policy.get("type", "") if isinstance(policy, dict) else "",
        "keys": keys,
        "minibatches": len(minibatches),
        "bytes_moved": sum(st.bytes_out for st in actors.values()),
        "in_flight": {"max": flight_max, "mean": flight_area / span if span > 0 else 0.0},
        "losses": {
            "count": len(losses),
            "first": losses[0] if losses else None,
            "last": losses[-1] if losses else None,
        },
        "errors": errors,
        "actors": out_actors,
        "devices": {
            device: _device_use(
                sum(
                    st.device_busy for n, st in actors.items() if devices.get(n, "device") == device
                ),
                _union_seconds(*got),
            )
            for device, got in spans.items()
        },
        "plots": [],
    }
    if plots is not None:
        flight.append((t_last, flight[-1][1]))
        result["plots"] = _plot(str(plots), flight, actors, t_last)
    return result


def _plot(
    folder: str, flight: list[tuple[float, int]], actors: dict[str, _Actor], span: float
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.step([t for t, _ in flight], [n for _, n in flight], where="post")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("keys in flight")
    ax.set_title("Keys in flight")
    ax.set_xlim(0, span or 1.0)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    path = os.path.join(folder, "in_flight.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    rows = [n for n, st in actors.items() if st.kind != "input" and st.intervals]
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.5))
    colors = {"forward": "tab:blue", "backward": "tab:orange"}
    for i, name in enumerate(rows):
        for kind in ("forward", "backward"):
            bars = [(t0, t1 - t0) for t0, t1, k in actors[name].intervals if k == kind]
            if bars:
                ax.broken_barh(
                    bars, (i - 0.4, 0.8), color=colors[kind], label=kind if i == 0 else None
                )
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started")
    ax.set_title("Computes per actor (forward blue, backward orange)")
    ax.set_xlim(0, span or 1.0)
    fig.tight_layout()
    path = os.path.join(folder, "busy.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def format_summary(s: dict[str, Any]) -> str:
    """The dict of :func:`summary` as a readable table."""
    lines = [
        f"{s['path']}: {s['events']} events over {s['seconds']:.3f} s"
        + (
            f" (the run: {s['run_seconds']:.3f} s from its first admit, which idle and busy count)"
            if "run_seconds" in s
            else ""
        )
        + (
            f" (TRUNCATED: {unclosed_reason(s.get('closed'), s.get('cut_mid_record', False))})"
            if s["truncated"]
            else ""
        ),
        *(
            [
                f"INCOMPLETE: the events of workers {s['missing_workers']} are missing (the run "
                "failed or was interrupted before they could be collected)"
            ]
            if s.get("missing_workers")
            else []
        ),
        f"policy {s['policy'] or '?'}; {s['keys']} keys in {s['minibatches']} minibatches; "
        f"keys in flight: max {s['in_flight']['max']}, mean {s['in_flight']['mean']:.2f}; "
        f"{_bytes(s['bytes_moved'])} moved",
    ]
    if s["losses"]["count"]:
        lines.append(
            f"loss: {s['losses']['count']} reports, first {s['losses']['first']:.4f}, "
            f"last {s['losses']['last']:.4f}"
        )
    lines.append("")
    lines.append(
        f"{'actor':<12} {'kind':<6} {'busy s':>8} {'idle s':>8} {'busy':>6} {'fwd':>5} {'bwd':>5} "
        f"{'upd':>5} {'in':>6} {'out':>6} {'sent':>9} {'stale':>11} {'stored':>6} {'vers':>4}"
    )
    for name, a in s["actors"].items():
        if a["kind"] == "input":
            compute = f"{'-':>8} {'-':>8} {'-':>6} {'-':>5} {'-':>5} {'-':>5}"
            stale = "-"
        else:
            compute = (
                f"{a['busy_seconds']:8.3f} {a['idle_seconds']:8.3f} {a['busy_fraction']:6.1%} "
                f"{a['forwards']:5d} {a['backwards']:5d} {a['updates']:5d}"
            )
            stale = f"{a['staleness_mean']:.2f}/{a['staleness_max']}" if a["backwards"] else "-"
        lines.append(
            f"{name:<12} {a['kind'] or '?':<6} {compute} {a['messages_in']:6d} "
            f"{a['messages_out']:6d} {_bytes(a['bytes_out']):>9} {stale:>11} "
            f"{a['peak_stored']:6d} {a['peak_versions_held']:4d}"
        )
    lines.append("")
    lines.append(
        "stale: gradient staleness mean/max in versions (the version an update applied a "
        "gradient at minus the version its forward used); stored, vers: peak activations "
        "stored and parameter versions held"
    )
    for device, use in s.get("devices", {}).items():
        lines.append(
            f"{device}: actors' work ran {use['active_seconds']:.3f} s of the device's clock, "
            f"{use['busy_seconds']:.3f} s in all: {use['overlap']:.2f} actors at once on average"
        )
    for err in s["errors"]:
        lines.append(f"error: {err}")
    for p in s["plots"]:
        lines.append(f"wrote {p}")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
