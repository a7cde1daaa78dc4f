"""One trace from a distributed run: the driver's and each worker's events, merged by time.

Every process stamps its events on the driver's clock (a worker is sent the run's start on its own
clock: the same instant where it shares the driver's host, whose processes read one clock; else
estimated from the quickest of a few clock queries, to within half its round trip), so a stable
sort by time interleaves them while keeping each process's own order, and on one host puts every
receive after its send.
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections.abc import Iterator, Sequence
from typing import Any

from asyncnn._errors import TraceWriteError
from asyncnn._runtime._traceformat import encode_record
from asyncnn._tracing._read import TraceReader

__all__ = ["merge_traces"]


@contextlib.contextmanager
def refused_as_trace(path: str, advice: str) -> Iterator[None]:
    """Raises an ``OSError`` of a write inside (a full disk) as the
    :class:`~asyncnn._errors.TraceWriteError` of the trace ``path``, as the recorder says its
    own, with ``advice`` (what became of the trace, what to do); the disk's error its cause."""
    try:
        yield
    except OSError as exc:
        raise TraceWriteError(
            f"writing the trace {path!r} failed ({type(exc).__name__}: {exc}); {advice}",
            path, exc.errno, exc.strerror,
        ) from exc  # fmt: skip


class _Merged:
    """The merged trace being written beside ``path`` (at ``tmp``): a write or the last flush
    that the disk refuses is said of the trace, not of the temporary file (and a worker's part
    that fails to read is not taken for one)."""

    def __init__(self, path: str, tmp: str) -> None:
        self._advice = (
            "the workers' events were not merged into it, which holds the driver's events as "
            "they were: free space in its folder, or pass trace= another path"
        )
        with refused_as_trace(path, self._advice):
            self._file = open(tmp, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        self._path, self._tmp = path, tmp

    def write(self, data: bytes) -> None:
        with refused_as_trace(self._path, self._advice):
            self._file.write(data)

    def close(self) -> None:
        with refused_as_trace(self._path, self._advice):
            self._file.close()  # (flushes the last buffer: a full disk fails here too)

    def __enter__(self) -> _Merged:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # the error under way says enough: the file is closed all the same
            with contextlib.suppress(OSError):
                self._file.close()

    def replace(self) -> None:
        """Renames the merged file (closed) into the trace's place."""
        with refused_as_trace(self._path, self._advice):
            os.replace(self._tmp, self._path)


def merge_traces(path: str, worker_files: Sequence[str]) -> None:
    """Rewrites the driver's trace at ``path`` with the events of ``worker_files`` merged in.

    Raises:
        TraceWriteError: the disk refused the merged trace (a full disk); ``path`` holds the
            driver's events as it did, and no file is left beside it.
    """
    if not worker_files:
        return
    readers = [TraceReader(path), *(TraceReader(f) for f in worker_files)]
    driver = readers[0]
    tmp = path + ".merging"
    try:
        with _Merged(path, tmp) as out:
            out.write(encode_record(driver.header))
            if driver.state is not None:
                out.write(encode_record({"state": driver.state}))

            def stream(i: int, r: TraceReader) -> Iterator[tuple[float, int, int, dict[str, Any]]]:
                for n, rec in enumerate(r):
                    yield float(rec.get("t", 0.0)), i, n, rec

            last = 0.0
            for t, _, _, rec in heapq.merge(*(stream(i, r) for i, r in enumerate(readers))):
                out.write(encode_record(rec))
                last = t
            # a worker's part cut off (its writer failed, or the process died) would be hidden
            # by the other processes' close events: say whose events the trace lacks, as for a
            # worker whose part never came (summary and replay report it)
            cut = sorted(
                r.header.get("worker", i - 1) for i, r in enumerate(readers)
                if i and (r.truncated or r.closed is False)
            )  # fmt: skip
            if cut:
                out.write(encode_record({
                    "t": last, "a": "scheduler", "ev": "missing",
                    "m": {"workers": cut, "error": "these workers' parts of the trace end early "
                          "(their writer failed or their process died)"},
                }))  # fmt: skip
        out.replace()
    finally:
        for r in readers:
            r.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
