"""Reading a trace: the header, the initial state, the events; streaming or all at once."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from asyncnn._errors import TraceFormatError
from asyncnn._runtime._config import PAYLOAD_MODES as _PAYLOAD_MODES
from asyncnn._runtime._traceformat import VERSION, iter_frames
from asyncnn.backends import MAX_POOL_WORKERS

from ._event import Event

__all__ = [
    "Trace",
    "TraceReader",
    "check_event",
    "check_header",
    "missing_workers",
    "open_trace",
    "payload_array",
    "read",
    "unclosed_reason",
]

#: fields of an event and their types (docs/trace_format.md); unknown fields are ignored
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "t": (int, float),
    "a": str,
    "ev": str,
    "k": str,
    "key": int,
    "v": int,
    "p": str,
    "seq": int,
    "x": list,
    "pl": list,
    "m": dict,
}
#: facts in ``m`` that readers interpret, and their types
_META: dict[str, type | tuple[type, ...]] = {
    "minibatch": int,
    "mb_keys": int,
    "rows": int,
    "mb_rows": int,
    "slot": int,
    "loss": (int, float),
    "error": str,
    "workers": list,
    "spans": list,
}
# MAX_POOL_WORKERS: the most worker threads a trace's pool may name. A replay opens the
# recorded pool whatever the host (its products must be cut as the run's were), so a crafted
# header could otherwise start any number of threads; a pool refuses more when it opens, so
# no run records more (it lives with the pool, in asyncnn.backends)
_DTYPES: dict[str, int] = {}  # dtype strings seen valid -> item size
#: the item sizes of the extension dtypes of ml_dtypes that a trace names (bfloat16, the 8-,
#: 6- and 4-bit floats, the small ints: numpy keeps each in whole bytes; the 16-bit complex
#: numbers), so that a trace of them reads where ml_dtypes is not installed: only their
#: payloads need it
_EXTENSION_SIZES: dict[str, int] = {
    "bfloat16": 2,
    "complex32": 4,
    "bcomplex32": 4,
    **dict.fromkeys(
        "float8_e3m4 float8_e4m3 float8_e4m3b11fnuz float8_e4m3fn float8_e4m3fnuz float8_e5m2 "
        "float8_e5m2fnuz float8_e5m3fnu float8_e8m0fnu float6_e2m3fn float6_e3m2fn "
        "float4_e2m1fn int1 int2 int4 uint1 uint2 uint4".split(),
        1,
    ),
}


def _is_span(s: Any) -> bool:
    return (
        isinstance(s, list)
        and len(s) == 2
        and all(isinstance(t, int | float) and not isinstance(t, bool) for t in s)
        and math.isfinite(s[0])
        and math.isfinite(s[1])
        and s[0] <= s[1]
    )


def _is_number(dt: np.dtype[Any]) -> bool:
    """A numeric dtype: numpy's own, or an extension's scalar type (ml_dtypes' bfloat16 is of
    kind ``"V"`` like raw bytes, but its type is its own, not ``numpy.void``)."""
    if dt.kind in "biufc":
        return True
    return dt.kind == "V" and dt.names is None and dt.subdtype is None and dt.type is not np.void


def _dtype_size(d: str) -> int | None:
    size = _DTYPES.get(d)
    if size is None:
        try:
            dt = np.dtype(d)
        except (TypeError, ValueError):
            size = _EXTENSION_SIZES.get(d)  # (ml_dtypes is not installed here)
            if size is not None:
                _DTYPES[d] = size
            return size
        if not _is_number(dt):
            return None
        size = _DTYPES[d] = dt.itemsize
    return size


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def check_event(rec: dict[str, Any], where: str) -> None:
    """Checks an event record's fields against the format (docs/trace_format.md).

    Raises:
        TraceFormatError: naming ``where`` (file, record, byte) and the field that is wrong.
    """
    if "format" in rec:
        raise TraceFormatError(f"{where} is a second header: a trace has exactly one")
    for name in ("t", "a", "ev"):
        if name not in rec:
            raise TraceFormatError(f"{where} is not an event: it has no {name!r} field")
    for name, value in rec.items():
        kind = _FIELDS.get(name)
        if kind is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TraceFormatError(
                f"{where}: field {name!r} is {type(value).__name__} {value!r:.60}, expected "
                f"{_type_name(kind)}"
            )
    if not math.isfinite(rec["t"]):
        raise TraceFormatError(f"{where}: its time 't' is {rec['t']!r}")
    m = rec.get("m")
    if m is not None:
        for name, value in m.items():
            if not isinstance(name, str):
                raise TraceFormatError(
                    f"{where}: field 'm' has a key {name!r:.60} that is not text"
                )
            kind = _META.get(name)
            if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise TraceFormatError(
                    f"{where}: m[{name!r}] is {type(value).__name__} {value!r:.60}, expected "
                    f"{_type_name(kind)}"
                )
            if name == "spans" and not all(_is_span(s) for s in value):
                raise TraceFormatError(
                    f"{where}: m['spans'] is {value!r:.60}, expected a list of [start, end] "
                    "pairs of finite numbers, start <= end"
                )
    x = rec.get("x")
    if x is not None:
        for i, info in enumerate(x):
            if info is not None:
                _check_tensor(info, f"{where}: tensor {i}")
        pl = rec.get("pl")
        if pl is not None:
            if len(pl) != len(x):
                raise TraceFormatError(
                    f"{where}: {len(pl)} payloads for {len(x)} tensors (they must align)"
                )
            for i, (payload, info) in enumerate(zip(pl, x, strict=True)):
                if payload is None:
                    continue
                if not isinstance(payload, bytes) or info is None or len(payload) != info["n"]:
                    raise TraceFormatError(
                        f"{where}: payload {i} is not the {info and info['n']} bytes its tensor "
                        "announces"
                    )
    elif "pl" in rec:
        raise TraceFormatError(f"{where}: payloads without tensor descriptions ('x')")


def _check_tensor(info: Any, where: str) -> None:
    if not isinstance(info, dict):
        raise TraceFormatError(f"{where} is {type(info).__name__}, expected a map or nil")
    shape, d, n, h = info.get("s"), info.get("d"), info.get("n"), info.get("h")
    if not isinstance(shape, list) or not all(
        isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in shape
    ):
        raise TraceFormatError(f"{where}: its shape 's' is {shape!r:.60}")
    size = _dtype_size(d) if isinstance(d, str) else None
    if size is None:
        raise TraceFormatError(
            f"{where}: its dtype 'd' is {d!r:.60}, not a numeric numpy dtype (nor one of "
            "ml_dtypes' extension types)"
        )
    if not isinstance(n, int) or isinstance(n, bool) or n != math.prod(shape) * size:
        raise TraceFormatError(f"{where}: its byte count 'n' is {n!r:.60}, not shape x item size")
    if not isinstance(h, int) or isinstance(h, bool):
        raise TraceFormatError(f"{where}: its digest 'h' is {h!r:.60}, expected an int")


def check_header(header: dict[str, Any], path: str) -> None:
    """Checks the header fields readers interpret (graph nodes, policy, counters).

    Raises:
        TraceFormatError: naming the field.
    """

    def bad(what: str) -> TraceFormatError:
        return TraceFormatError(f"{path}: the header's {what}")

    graph = header.get("graph")
    if graph is not None:
        if not isinstance(graph, dict) or not isinstance(graph.get("nodes", []), list):
            raise bad("'graph' is not a graph spec (a map with a list of 'nodes')")
        for node in graph.get("nodes", []):
            if not isinstance(node, dict) or not isinstance(node.get("name"), str):
                raise bad(f"graph has a node {node!r:.60} without a 'name'")
            if not isinstance(node.get("kind", ""), str):
                raise bad(f"graph node {node['name']!r} has a 'kind' that is not text")
    for name, kind in (("policy", dict), ("optimizer", dict), ("seed", int), ("dtype", str),
                       ("start", dict), ("payloads", str), ("workers", dict),
                       ("writes_close", bool)):  # fmt: skip
        if name in header and not isinstance(header[name], kind):
            raise bad(f"{name!r} is {type(header[name]).__name__}, expected {kind.__name__}")
    if header.get("payloads", "inputs") not in _PAYLOAD_MODES:
        raise bad(f"'payloads' is {header['payloads']!r:.60}, not one of {_PAYLOAD_MODES}")
    for name in ("minibatches", "keys"):
        value = header.get("start", {}).get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"start[{name!r}] is {value!r:.60}, expected an int")
    _check_config(header, bad)
    pool = header.get("pool", {})
    if not isinstance(pool, dict):
        raise bad(f"'pool' is {type(pool).__name__}, expected dict")
    for name in ("cpu_workers", "part_flops"):
        value = pool.get(name, 1)
        if not _is_int(value) or value < 1:
            raise bad(f"pool[{name!r}] is {value!r:.60}, expected an int of at least 1")
    if pool.get("cpu_workers", 1) > MAX_POOL_WORKERS:
        raise bad(
            f"pool['cpu_workers'] is {pool['cpu_workers']!r:.60}, expected an int from 1 to "
            f"{MAX_POOL_WORKERS} (a replay starts that many threads: no run records more)"
        )
    plan = pool.get("plan_workers")
    if plan is not None and (not _is_int(plan) or not 1 <= plan <= MAX_POOL_WORKERS):
        raise bad(
            f"pool['plan_workers'] is {plan!r:.60}, expected an int from 1 to "
            f"{MAX_POOL_WORKERS} (the team size the run planned its products for)"
        )
    if not isinstance(pool.get("split", False), bool):
        raise bad(f"pool['split'] is {pool['split']!r:.60}, expected true or false")
    # (a replay opens its pool with it; a trace without it ran on the default)
    inline = pool.get("inline_flops", 0)
    if isinstance(inline, bool) or not isinstance(inline, int | float) or inline != inline:
        raise bad(f"pool['inline_flops'] is {inline!r:.60}, expected a number (not NaN)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(header: dict[str, Any], bad: Callable[[str], TraceFormatError]) -> None:
    """The header's ``config`` (``RunConfig.to_spec()``): a map whose known fields have the
    types of the run's options (a replay reads ``cuda_graphs`` and ``check_finite`` from it;
    fields this version does not know are left to the reader)."""
    if "config" not in header:
        return  # (a trace written before the run's options were one record)
    config = header["config"]
    if not isinstance(config, dict):
        raise bad(f"'config' is {type(config).__name__}, expected dict")
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "seed": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
        "dtype": (lambda v: isinstance(v, str), "text"),
        "stall_timeout": (
            lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
            "a number > 0",
        ),
        "check_finite": (lambda v: isinstance(v, bool), "true or false"),
        "trace": (lambda v: v is None or isinstance(v, str), "text or nil"),
        "trace_payloads": (lambda v: v in _PAYLOAD_MODES, f"one of {_PAYLOAD_MODES}"),
        "cuda_graphs": (lambda v: v is None or isinstance(v, bool), "true, false or nil"),
    }
    for name, (fits, expected) in checks.items():
        if name in config and not fits(config[name]):
            raise bad(f"config[{name!r}] is {config[name]!r:.60}, expected {expected}")


class _Bounded:
    """A file whose reads never ask for more than it holds: a record that claims more bytes
    than remain is read as a truncation, without allocating the claim."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._left = os.fstat(f.fileno()).st_size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            # the file may have grown since (a trace still being written): look again
            self._left = max(0, os.fstat(self._f.fileno()).st_size - self._f.tell())
            n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data


@dataclass
class Trace:
    """A whole trace in memory.

    Attributes:
        header: the first record: format, version, graph/policy/optimizer specs, seed, dtype,
            package versions, devices, where the run started (``start``).
        events: every event record, in the order written (see docs/trace_format.md).
        state: the weights and optimizer states the run started from (encoded), if recorded.
        truncated: the run did not finish writing the file: it was cut off mid-record, or
            (``closed`` False) it ends without its closing record, as the trace of a process
            that was killed does; ``events`` holds every whole record before.
        path: where it was read from.
        closed: True where the trace ends with its closing ``close`` event; False where its
            writer writes one (the header's ``writes_close``) and it is missing (``truncated``
            is then True); None for a trace whose writer writes none (written before closing
            events were), which reads as whole unless cut off mid-record.
        cut_mid_record: the file ends inside a record (``truncated`` is then True): its writer
            stopped mid-write, as on a full disk, where a killed process leaves whole records.
    """

    header: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    state: dict[str, Any] | None = None
    truncated: bool = False
    path: str = ""
    closed: bool | None = None
    cut_mid_record: bool = False

    def __repr__(self) -> str:
        cut = ", truncated" if self.truncated else ""
        return f"<Trace {self.path!r}: {len(self.events)} events{cut}>"


def unclosed_reason(closed: bool | None, cut_mid_record: bool = False) -> str:
    """Why a trace is cut off, in words (for a ``truncated`` one): it ends inside a record (its
    writer stopped mid-write: a full disk, a crash while writing), or on a whole record without
    its closing one (``closed`` False: a killed process, whose writer had flushed whole
    records)."""
    if cut_mid_record or closed is not False:
        return (
            "the file ends inside a record (its writer stopped mid-write: a full disk, or the "
            "process died while writing; or the file was copied before the run closed it)"
        )
    return (
        "it ends without its closing record (the process that wrote it was killed, or the "
        "file was copied or read before the run closed it)"
    )


class TraceReader:
    """Streams a trace: ``header`` and ``state`` are read on opening, events on iteration, so a
    large trace can be summarised without loading it. ``truncated`` and ``closed`` (see
    :class:`Trace`) are known after iterating."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        if os.path.isdir(self.path):
            raise IsADirectoryError(_folder_given(self.path))
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close() / iteration
        self._frames = iter_frames(_Bounded(self._file), self.path)  # type: ignore[arg-type]
        self._offset = 0
        self._index = 0
        self.truncated = False
        self.cut_mid_record = False
        self.state: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self.closed: bool | None = None
        try:
            self.header: dict[str, Any] = self._read_header()
            if self.header.get("writes_close") is True:
                self.closed = False  # (until its closing event is read)
            # the second record is the initial state, when one was recorded
            second = self._next_record()
        except BaseException:
            self.close()  # a damaged header or state record must not leak the open file
            raise
        if second is not None and "state" in second and "ev" not in second:
            if not isinstance(second["state"], dict):
                self.close()
                raise TraceFormatError(f"{self.path}: record 1 (the state) is not a map")
            self.state = second["state"]
        else:
            try:
                if second is not None:
                    check_event(second, self._where())
            except BaseException:
                self.close()
                raise
            self._pending = second

    def _read_header(self) -> dict[str, Any]:
        try:
            first = next(self._frames, None)
        except TraceFormatError as exc:
            if "is not an asyncnn trace" in str(exc):
                raise
            raise TraceFormatError(
                f"{self.path} is not an asyncnn trace, or its header is damaged ({exc})"
            ) from exc
        size = os.path.getsize(self.path)
        if first is None:
            raise TraceFormatError(f"{self.path} is not an asyncnn trace: the file is empty")
        if first[1] is None:
            raise TraceFormatError(
                f"{self.path} is not an asyncnn trace, or was cut off inside its header: its "
                f"{size} bytes do not hold a whole first record (record 0 at byte 0)"
            )
        header = first[1]
        self._offset, self._index = first[0], 0
        if header.get("version") != VERSION:
            raise TraceFormatError(
                f"{self.path} is an asyncnn trace of format version {header.get('version')!r}; "
                f"this asyncnn reads version {VERSION} (read it with the asyncnn that wrote it)"
            )
        check_header(header, self.path)
        return header

    def _where(self) -> str:
        return f"{self.path}: record {self._index} at byte {self._offset}"

    def _next_record(self) -> dict[str, Any] | None:
        item = next(self._frames, None)
        if item is None:
            return None
        self._offset = item[0]
        self._index += 1
        if item[1] is None:
            self.truncated = self.cut_mid_record = True
            return None
        return item[1]

    def __iter__(self) -> Iterator[Event]:
        try:
            if self._pending is not None:
                self._note(self._pending)
                yield Event(self._pending)
                self._pending = None
            while True:
                rec = self._next_record()
                if rec is None:
                    # a trace that ends on a whole record without its closing event was not
                    # finished: the writer flushes whole records, so a killed process leaves
                    # one that ends on a record boundary
                    if self.closed is False:
                        self.truncated = True
                    return
                check_event(rec, self._where())
                self._note(rec)
                yield Event(rec)
        finally:
            self.close()

    def _note(self, rec: dict[str, Any]) -> None:
        # (a cluster run's trace holds each process's closing event, merged by time: any one
        # says the file was finished, as the driver's trace is merged only once it closed)
        if rec["ev"] == "close" and rec["a"] == "scheduler":
            self.closed = True

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _folder_given(path: str) -> str:
    """What to say of a folder given where a trace file is due (the OS's words only said
    "Is a directory"), naming the traces in it, if any."""
    try:
        found = sorted(n for n in os.listdir(path) if n.endswith(".trace"))
    except OSError:
        found = []
    inside = (
        f"; the traces in it: {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}"
        if found
        else ""
    )
    return (
        f"{path!r} is a folder, not a trace: pass the file a traced run wrote (its trace= or "
        f"--trace path){inside}"
    )


def open_trace(path: str | os.PathLike[str]) -> TraceReader:
    """A streaming reader of the trace at ``path`` (see :class:`TraceReader`)."""
    return TraceReader(path)


def read(path: str | os.PathLike[str]) -> Trace:
    """Reads a whole trace.

    A file cut off mid-record (a run that crashed while writing), or one that ends without its
    closing record (its process was killed: ``closed`` False), reads up to its last whole
    record, with ``truncated=True``. A damaged file raises :class:`~asyncnn.TraceFormatError`
    saying which record and at which byte.
    """
    reader = TraceReader(path)
    events = list(reader)
    return Trace(
        reader.header, events, reader.state, reader.truncated, reader.path, reader.closed,
        reader.cut_mid_record,
    )  # fmt: skip


def payload_array(event: dict[str, Any], i: int = 0) -> np.ndarray[Any, Any] | None:
    """The ``i``-th tensor an event carried, as a numpy array, if its payload was recorded."""
    payloads = event.get("pl")
    info = event.get("x")
    # payloads are aligned with "x" (a None tensor has a None payload)
    if not payloads or not info or i >= len(payloads) or info[i] is None or payloads[i] is None:
        return None
    meta = info[i]
    try:
        dtype = np.dtype(meta["d"])
    except TypeError as exc:
        if meta.get("d") in _EXTENSION_SIZES:
            raise TraceFormatError(
                f"the payload of a {event.get('ev')} event of {event.get('a')!r} is of dtype "
                f"{meta['d']!r}, which numpy knows only through the ml_dtypes package: pip "
                "install ml_dtypes to read it"
            ) from exc
        raise TraceFormatError(
            f"the payload of a {event.get('ev')} event of {event.get('a')!r} has the dtype "
            f"{meta.get('d')!r:.40}, unknown to numpy: {exc}"
        ) from exc
    except KeyError as exc:
        raise TraceFormatError(
            f"the payload of a {event.get('ev')} event of {event.get('a')!r} does not fit its "
            f"description {meta!r:.80}: {exc}"
        ) from exc
    try:
        return np.frombuffer(payloads[i], dtype=dtype).reshape(meta["s"])
    except (TypeError, ValueError, KeyError) as exc:
        raise TraceFormatError(
            f"the payload of a {event.get('ev')} event of {event.get('a')!r} does not fit its "
            f"description {meta!r:.80}: {exc}"
        ) from exc


def missing_workers(trace: Trace) -> list[int]:
    """The workers whose events a (failed or interrupted) cluster run's trace lacks, as its
    ``missing`` event records them; empty for a complete trace."""
    out: list[int] = []
    for e in trace.events:
        if e.what == "missing":
            out.extend(w for w in e.meta.get("workers", []) if isinstance(w, int))
    return sorted(set(out))
