"""Exporting a trace to the Chrome trace event format (Perfetto, chrome://tracing).

One row (thread) per actor; a complete slice per compute; flow arrows from each send to the
compute that consumed the message; counters for keys in flight and, per layer, stored activations
and parameter versions held. A GPU actor of a traced run has a second row, "(device)", under
its own: when its queued work ran on the device's clock (its "device" events), so the overlap
of actors on one GPU shows beside the host's view. Written while the trace streams by, so
memory stays bounded by what is in flight, not by the length of the run. See "What you see
in Perfetto" in docs/trace_format.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import deque
from typing import IO, Any

from ._read import open_trace
from ._summary import Occupancy, node_kinds, sent_bytes

__all__ = ["to_chrome"]

_PID = 1
_US = 1e6  # trace seconds -> Chrome microseconds
_INSIDE = 0.01  # µs: where a flow lands inside its slice (past the start, so it binds to it)


def _us(t: float) -> float:
    return round(t * _US, 3)


class _Refused:
    """Says an ``OSError`` raised inside (a full disk, a read-only folder) of ``out``, the file
    asked for: the one raised names the temporary file beside it, or no file at all."""

    def __init__(self, out: str) -> None:
        self.out = out

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if not isinstance(exc, OSError):
            return
        why = exc.strerror or str(exc)
        message = f"to_chrome: writing {self.out!r} failed ({why}); it is left as it was"
        # (OSError of an errno picks its subclass: PermissionError, FileNotFoundError...)
        raise (OSError(message) if exc.errno is None else OSError(exc.errno, message)) from exc


class _Export:
    """The JSON file written beside ``out`` (at ``tmp``) and renamed into place once whole: what
    the disk refuses is said of ``out`` (:class:`_Refused`)."""

    def __init__(self, out: str, tmp: str) -> None:
        self.refused = _Refused(out)
        self.out, self.tmp = out, tmp
        with self.refused:
            self.f: IO[str] = open(tmp, "w")  # noqa: SIM115 - closed in close()

    def write(self, text: str) -> None:
        with self.refused:
            self.f.write(text)

    def __enter__(self) -> _Export:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:  # (the error under way says enough: closed all the same)
            with contextlib.suppress(OSError):
                self.f.close()
            return
        with self.refused:
            self.f.close()  # (flushes the last buffer: a full disk fails here too)

    def replace(self) -> None:
        """Renames the whole file into place."""
        with self.refused:
            os.replace(self.tmp, self.out)


class _Writer:
    def __init__(self, f: _Export) -> None:
        self.f = f
        self.first = True
        self.count = 0

    def __call__(self, event: dict[str, Any]) -> None:
        self.f.write("\n" if self.first else ",\n")
        self.first = False
        self.f.write(_json(event))
        self.count += 1


def _json(value: Any) -> str:
    # what msgpack can hold and JSON cannot is made JSON: bytes and non-text keys as text, a
    # NaN or infinite number (a loss that went NaN) as null; json.dumps would write bare NaN
    # and Infinity tokens, which JSON.parse in Perfetto and chrome://tracing rejects
    try:
        return json.dumps(value, separators=(",", ":"), default=_plain, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_as_json(value), separators=(",", ":"), default=_plain, allow_nan=False)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return repr(value)


def _as_json(value: Any) -> Any:
    """``value`` with text keys and its non-finite floats as None (JSON's null)."""
    if isinstance(value, dict):
        return {str(k): _as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def folder_end(path: str) -> str | None:
    """What ``path`` ends in that makes it name a folder whether or not that folder exists (a
    separator, or a separator and ``.`` or ``..``), or None. Such a path cannot be written as
    a file, yet its "folder" (``os.path.dirname``) is the folder itself, not its parent."""
    for sep in filter(None, (os.sep, os.altsep)):
        for end in (sep, sep + ".", sep + ".."):
            if path.endswith(end):
                return end
    return None


def to_chrome(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, int]:
    """Writes the trace at ``path`` as Chrome trace event JSON to ``out``.

    Open the result in https://ui.perfetto.dev (or chrome://tracing). Timestamps are
    microseconds since the run started.

    Returns:
        Counts of what was written: ``slices`` (computes), ``device_slices`` (work on a
        device's clock), ``flows`` (messages with an arrow),
        ``unmatched_sends`` (sends whose receive is not in the trace: a truncated or failed run),
        ``events`` (JSON events in all).

    Raises:
        TraceFormatError: the trace is damaged (``out`` is then left as it was: the JSON is
            written beside it and renamed into place only when whole).
        ValueError: ``out`` is the trace itself (the export would replace it).
        OSError: ``out`` is a folder (or names one: it ends in ``/``), or its folder does not
            exist or is a file (said of ``out``).
    """
    out = os.fspath(out)
    # said of the path given, not of the temporary file beside it that the write goes through
    if os.path.isdir(out):
        raise IsADirectoryError(f"to_chrome: {out!r} is a folder; name the JSON file to write")
    end = folder_end(out)
    if end is not None:  # (its folder is not its parent: the parent may well exist)
        raise IsADirectoryError(
            f"to_chrome: {out!r} ends in {end!r}, so it names a folder; name the JSON file to write"
        )
    if os.path.exists(out) and os.path.exists(path) and os.path.samefile(path, out):
        raise ValueError(
            f"to_chrome: {out!r} is the trace itself: name another file for the JSON (e.g. "
            f"{os.path.splitext(out)[0] + '.json'!r})"
        )
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        # the nearest part of the folder's path that exists: a file, or the folder is missing
        where = folder
        while not os.path.exists(where) and os.path.dirname(where) != where:
            where = os.path.dirname(where)
        if os.path.exists(where) and not os.path.isdir(where):
            raise NotADirectoryError(
                f"to_chrome: {where} is a file, not a folder, so {out!r} cannot be written under it"
            )
        raise FileNotFoundError(f"to_chrome: the folder of {out!r} ({folder}) does not exist")
    reader = open_trace(path)
    kinds = node_kinds(reader.header)
    tids: dict[str, int] = {}
    # written beside, then renamed: a trace that turns out damaged halfway leaves no half file
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        with _Export(out, tmp) as f:
            f.write('{"displayTimeUnit":"ms","otherData":')
            policy = reader.header.get("policy", {})
            f.write(_json({"source": str(path), "format": "asyncnn-trace", "policy": policy}))
            f.write(',"traceEvents":[')
            emit = _Writer(f)
            emit({"ph": "M", "pid": _PID, "name": "process_name", "args": {"name": "asyncnn run"}})

            def tid(actor: str, device: bool = False) -> int:
                row = f"{actor} (device)" if device else actor
                if row not in tids:
                    # an actor's device row sorts right under its own
                    order = 2 * tid(actor) + 1 if device else 2 * (len(tids) + 1)
                    tids[row] = len(tids) + 1
                    name = row if device or actor not in kinds else f"{actor} ({kinds[actor]})"
                    emit({"ph": "M", "pid": _PID, "tid": tids[row], "name": "thread_name",
                          "args": {"name": name}})  # fmt: skip
                    emit({"ph": "M", "pid": _PID, "tid": tids[row], "name": "thread_sort_index",
                          "args": {"sort_index": order}})  # fmt: skip
                return tids[row]

            # rows in graph order: the scheduler, then the nodes as the graph lists them
            tid("scheduler")
            for name in kinds:
                tid(name)
            counts = _export(reader, kinds, emit, tid)
            f.write("\n]}\n")
        f.replace()
    finally:
        reader.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    counts["events"] = emit.count
    return counts


def _export(reader: Any, kinds: dict[str, str], emit: _Writer, tid: Any) -> dict[str, int]:
    occ = Occupancy(kinds)
    # an open compute per actor: (start event, flows that end in it)
    open_: dict[str, tuple[dict[str, Any], list[int]]] = {}
    # a message's send and receive are matched FIFO per (sender, receiver, kind, key), whichever
    # comes first in the trace: in a cluster run's trace, a receive whose process's clock runs
    # behind the sender's comes before its send. Flow ids of sends awaiting their receive, and
    # of receives awaiting their send:
    sends: dict[tuple[str, str, str, int], deque[int]] = {}
    early: dict[tuple[str, str, str, int], deque[int]] = {}
    # each flow's "s" event, until it is bound to the compute that consumed the message
    tails: dict[int, dict[str, Any]] = {}
    # flows bound to a compute before their send came, and those whose compute also ended then
    # (its slice and the place of the arrow's head: (actor, ts))
    untailed: set[int] = set()
    heads: dict[int, tuple[str, float]] = {}
    # received messages awaiting the compute that consumes them, per (actor, kind, key)
    waiting: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    next_id = 1
    slices = flows = device_slices = 0
    t_last = 0.0

    def end_flow(fid: int, actor: str, ts: float) -> None:
        # the arrow's head, bound to the slice that encloses ts
        nonlocal flows
        emit({"ph": "f", "bp": "e", "cat": "message", "name": "message", "id": fid,
              "pid": _PID, "tid": tid(actor), "ts": ts})  # fmt: skip
        flows += 1

    def marker(actor: str, t: float, name: str, args: dict[str, Any]) -> None:
        # a zero-length slice for a flow to bind to where no compute encloses the message
        emit({"ph": "X", "cat": "message", "name": name, "pid": _PID, "tid": tid(actor),
              "ts": _us(t), "dur": 0, "args": args})  # fmt: skip

    def bind(fid: int) -> None:
        # the flow's head is in a compute now: its tail is written, or is to come with its send
        if fid in tails:
            emit(tails.pop(fid))
        else:
            untailed.add(fid)

    def land(fid: int, actor: str, ts: float) -> None:
        # the flow's compute ended: its head is written, or waits for its send
        if fid in untailed:
            untailed.discard(fid)
            heads[fid] = (actor, ts)
        else:
            end_flow(fid, actor, ts)

    def match(
        pending: dict[tuple[str, str, str, int], deque[int]],
        other: dict[tuple[str, str, str, int], deque[int]],
        route: tuple[str, str, str, int],
    ) -> tuple[int, bool]:
        # (flow id, whether the other side came first): the oldest of the other side's
        # pending flows on this route, else a new one pending on this side
        nonlocal next_id
        queue = other.get(route)
        if queue:
            fid = queue.popleft()
            if not queue:
                del other[route]  # kept, these would grow with the keys of the run
            return fid, True
        fid, next_id = next_id, next_id + 1
        pending.setdefault(route, deque()).append(fid)
        return fid, False

    for e in reader:
        a = e.actor
        ev = e.what
        if ev == "close":
            continue  # (written as the trace closed, after the run: its end is the last event's)
        t = float(e.get("t", t_last))
        t_last = max(t_last, t)
        kind = e.kind
        key = e.key
        for change in occ.feed(e):
            if change[0] == "in_flight":
                emit({"ph": "C", "pid": _PID, "name": "keys in flight", "ts": _us(t),
                      "args": {"keys": change[1]}})  # fmt: skip
            else:
                emit({"ph": "C", "pid": _PID, "name": f"{change[0]} stored", "ts": _us(t),
                      "args": {"activations": change[1]}})  # fmt: skip
                emit({"ph": "C", "pid": _PID, "name": f"{change[0]} versions held",
                      "ts": _us(t), "args": {"versions": change[2]}})  # fmt: skip
        if ev == "start":
            open_[a] = (e, [])
            for fid, _ in waiting.pop((a, kind, key), []):
                open_[a][1].append(fid)
                bind(fid)
        elif ev == "end" and a in open_:
            start, ends = open_.pop(a)
            ts, dur = _us(float(start["t"])), max(0.0, round(_us(t) - _us(float(start["t"])), 3))
            args = {"key": key, "version": e.get("v"), "seq": e.get("seq")}
            if start.get("v") != e.get("v"):
                args["version at start"] = start.get("v")
            if "m" in e:
                args.update(e.meta)
            emit({"ph": "X", "cat": "compute", "name": f"{kind} k{key}", "pid": _PID,
                  "tid": tid(a), "ts": ts, "dur": dur, "args": args})  # fmt: skip
            slices += 1
            inside = ts + min(_INSIDE, dur / 2)
            for fid in ends:
                land(fid, a, inside)
        elif ev == "send":
            peer = e.peer
            fid, received = match(sends, early, (a, peer, kind, key))
            nbytes = sent_bytes(e)
            if a not in open_:
                marker(a, t, f"send {kind} k{key} → {peer}", {"key": key, "bytes": nbytes})
            tails[fid] = {"ph": "s", "cat": "message", "name": "message", "id": fid,
                          "pid": _PID, "tid": tid(a), "ts": _us(t),
                          "args": {"from": a, "to": peer, "kind": kind, "key": key,
                                   "version": e.get("v"), "bytes": nbytes}}  # fmt: skip
            if fid in untailed:  # received and bound to its compute before it was sent
                untailed.discard(fid)
                emit(tails.pop(fid))
            elif fid in heads:  # ... and that compute has ended
                emit(tails.pop(fid))
                end_flow(fid, *heads.pop(fid))
        elif ev == "receive":
            fid, _ = match(early, sends, (e.peer, a, kind, key))
            if a in open_ and open_[a][0].get("k") == kind and open_[a][0].get("key") == key:
                open_[a][1].append(fid)
                bind(fid)
            else:
                waiting.setdefault((a, kind, key), []).append((fid, t))
        elif ev == "device":
            row = tid(a, device=True)
            for start_t, end_t in e.meta.get("spans", []):
                ts = _us(float(start_t))
                emit({"ph": "X", "cat": "device", "name": f"{kind} k{key}", "pid": _PID,
                      "tid": row, "ts": ts, "dur": max(0.0, round(_us(float(end_t)) - ts, 3)),
                      "args": {"key": key, "seq": e.get("seq")}})  # fmt: skip
                device_slices += 1
        elif ev == "update":
            emit({"ph": "i", "s": "t", "cat": "update", "name": f"update → v{e.get('v')}",
                  "pid": _PID, "tid": tid(a), "ts": _us(t), "args": {"version": e.get("v")}})  # fmt: skip
        elif ev in ("admit", "flush", "error", "missing"):
            args = e.meta
            if key >= 0:
                args["key"] = key
            name = f"admit k{key}" if ev == "admit" else str(ev)
            emit({"ph": "i", "s": "g" if ev == "error" else "t", "cat": str(ev), "name": name,
                  "pid": _PID, "tid": tid(a), "ts": _us(t), "args": args})  # fmt: skip
    # cut off: computes still open end at the last event; received messages never consumed
    # end on a marker where they were received
    for a, (start, ends) in open_.items():
        ts = _us(float(start["t"]))
        dur = max(0.0, round(_us(t_last) - ts, 3))
        emit({"ph": "X", "cat": "compute", "name": f"{start.get('k', '')} k{start.get('key')}",
              "pid": _PID, "tid": tid(a), "ts": ts, "dur": dur,
              "args": {"key": start.get("key"), "version": start.get("v"), "seq": start.get("seq"),
                       "unfinished": True}})  # fmt: skip
        slices += 1
        for fid in ends:
            land(fid, a, ts + min(_INSIDE, dur / 2))
    for (a, kind, key), items in waiting.items():
        for fid, t in items:
            marker(a, t, f"receive {kind} k{key} (never computed)", {"key": key})
            if fid in tails:  # (a receive whose send the trace lacks gets no arrow)
                emit(tails.pop(fid))
                end_flow(fid, a, _us(t))
    unmatched = sum(len(q) for q in sends.values())
    return {
        "slices": slices,
        "device_slices": device_slices,
        "flows": flows,
        "unmatched_sends": unmatched,
    }
