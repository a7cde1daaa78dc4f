"""Message traces: read them, summarise them, export them to Perfetto, diff two of them.

Record one with ``Trainer(..., trace="run.trace")`` or ``open_run(..., trace=...)``; replay it
with :func:`asyncnn.replay`. The format is specified in ``docs/trace_format.md``.
"""

from ._runtime._traceformat import iter_frames
from ._tracing._chrome import to_chrome
from ._tracing._diff import diff
from ._tracing._read import Trace, TraceReader, open_trace, payload_array, read
from ._tracing._replay import Divergence, ReplayResult
from ._tracing._summary import summary

__all__ = [
    "Divergence",
    "ReplayResult",
    "Trace",
    "TraceReader",
    "diff",
    "iter_frames",
    "open_trace",
    "payload_array",
    "read",
    "summary",
    "to_chrome",
]
