"""Message traces: read them, summarise them, export them to Perfetto, diff two of them.

Record one with ``Trainer(..., trace="run.trace")`` or ``open_run(..., trace=...)``; replay it
with :func:`asyncnn.replay`. The format is specified in ``docs/trace_format.md``.

Reading a trace never runs code: a class path in its header resolves only to asyncnn's own
modules, modules already imported, or those trusted with :func:`trusted_modules` (see
``docs/security.md``).
"""

from ._math._imports import UntrustedModuleError, trusted_modules
from ._runtime._traceformat import iter_frames
from ._tracing._chrome import to_chrome
from ._tracing._diff import diff
from ._tracing._event import Event
from ._tracing._read import Trace, TraceReader, open_trace, payload_array, read
from ._tracing._replay import Divergence, ReplayResult
from ._tracing._summary import summary

__all__ = [
    "Divergence",
    "Event",
    "ReplayResult",
    "Trace",
    "TraceReader",
    "UntrustedModuleError",
    "diff",
    "iter_frames",
    "open_trace",
    "payload_array",
    "read",
    "summary",
    "to_chrome",
    "trusted_modules",
]
