"""Reading a trace: the header, the initial state, the events; streaming or all at once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asyncnn._errors import TraceFormatError
from asyncnn._runtime._traceformat import VERSION, iter_frames

__all__ = ["Trace", "TraceReader", "open_trace", "payload_array", "read"]


@dataclass
class Trace:
    """A whole trace in memory.

    Attributes:
        header: the first record: format, version, graph/policy/optimizer specs, seed, dtype,
            package versions, devices, where the run started (``start``).
        events: every event record, in the order written (see docs/trace_format.md).
        state: the weights and optimizer states the run started from (encoded), if recorded.
        truncated: the file was cut off mid-record; ``events`` holds every whole record before.
        path: where it was read from.
    """

    header: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] | None = None
    truncated: bool = False
    path: str = ""

    def __repr__(self) -> str:
        cut = ", truncated" if self.truncated else ""
        return f"<Trace {self.path!r}: {len(self.events)} events{cut}>"


class TraceReader:
    """Streams a trace: ``header`` and ``state`` are read on opening, events on iteration, so a
    large trace can be summarised without loading it. ``truncated`` is known after iterating."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close() / iteration
        self._frames = iter_frames(self._file, self.path)
        self.truncated = False
        self.state: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        try:
            self.header: dict[str, Any] = self._read_header()
            # the second record is the initial state, when one was recorded
            second = self._next_record()
        except BaseException:
            self.close()  # a damaged header or state record must not leak the open file
            raise
        if second is not None and "state" in second:
            self.state = second["state"]
        else:
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
                f"{size} bytes do not hold a whole first record"
            )
        header = first[1]
        if header.get("version") != VERSION:
            raise TraceFormatError(
                f"{self.path} is an asyncnn trace of format version {header.get('version')!r}; "
                f"this asyncnn reads version {VERSION} (read it with the asyncnn that wrote it)"
            )
        return header

    def _next_record(self) -> dict[str, Any] | None:
        item = next(self._frames, None)
        if item is None:
            return None
        if item[1] is None:
            self.truncated = True
            return None
        return item[1]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            if self._pending is not None:
                yield self._pending
                self._pending = None
            while True:
                rec = self._next_record()
                if rec is None:
                    return
                yield rec
        finally:
            self.close()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_trace(path: str | os.PathLike[str]) -> TraceReader:
    """A streaming reader of the trace at ``path`` (see :class:`TraceReader`)."""
    return TraceReader(path)


def read(path: str | os.PathLike[str]) -> Trace:
    """Reads a whole trace.

    A file cut off mid-record (a run that crashed while writing) reads up to its last whole
    record, with ``truncated=True``. A damaged file raises :class:`~asyncnn.TraceFormatError`
    saying which record and at which byte.
    """
    reader = TraceReader(path)
    events = list(reader)
    return Trace(reader.header, events, reader.state, reader.truncated, reader.path)


def payload_array(event: dict[str, Any], i: int = 0) -> np.ndarray[Any, Any] | None:
    """The ``i``-th tensor an event carried, as a numpy array, if its payload was recorded."""
    payloads = event.get("pl")
    info = event.get("x")
    # payloads are aligned with "x" (a None tensor has a None payload)
    if not payloads or not info or i >= len(payloads) or info[i] is None or payloads[i] is None:
        return None
    meta = info[i]
    return np.frombuffer(payloads[i], dtype=np.dtype(meta["d"])).reshape(meta["s"])
