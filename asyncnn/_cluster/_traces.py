"""One trace from a distributed run: the driver's and each worker's events, merged by time.

Every process stamps its events on the driver's clock (a worker's clock is set at the start of the
run from the driver's, less the one-way latency measured when the cluster started), so a stable
sort by time interleaves them while keeping each process's own order.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator, Sequence
from typing import Any

from asyncnn._runtime._traceformat import encode_record
from asyncnn._tracing._read import TraceReader

__all__ = ["merge_traces"]


def merge_traces(path: str, worker_files: Sequence[str]) -> None:
    """Rewrites the driver's trace at ``path`` with the events of ``worker_files`` merged in."""
    if not worker_files:
        return
    readers = [TraceReader(path), *(TraceReader(f) for f in worker_files)]
    driver = readers[0]
    tmp = path + ".merging"
    try:
        with open(tmp, "wb", buffering=1 << 20) as out:
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
        os.replace(tmp, path)
    finally:
        for r in readers:
            r.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
