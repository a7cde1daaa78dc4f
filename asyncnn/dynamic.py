"""Dynamic graphs: data-dependent routing (sparse experts, branches) and recurrent loops.

Build them with :meth:`asyncnn.Graph.router`, :meth:`asyncnn.Graph.merge` and
:meth:`asyncnn.Graph.loop`; this namespace holds the pieces behind those methods (modules, actor
classes, statistics) and a ready-made cell. See ``docs/dynamic.md``.
"""

from ._runtime._loops import Loop, LoopActor, LoopStatistics, RNNCell, planned_row_steps
from ._runtime._routing import (
    Merge,
    MergeActor,
    Router,
    RouterActor,
    RouterStatistics,
    assign_rows,
    topk_experts,
)

__all__ = [
    "Loop",
    "LoopActor",
    "LoopStatistics",
    "Merge",
    "MergeActor",
    "RNNCell",
    "Router",
    "RouterActor",
    "RouterStatistics",
    "assign_rows",
    "planned_row_steps",
    "topk_experts",
]
