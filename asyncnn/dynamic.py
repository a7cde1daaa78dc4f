"""Dynamic graphs: data-dependent routing (sparse experts, branches) and recurrent loops.

Build them with :meth:`asyncnn.Graph.router`, :meth:`asyncnn.Graph.merge` and
:meth:`asyncnn.Graph.loop`; this namespace holds the pieces behind those methods (modules, actor
classes, statistics) and a ready-made cell. The modules (``Router``, ``Merge``, ``Loop``,
``RNNCell``) are pure math; the actor classes are the runtime's. See ``docs/dynamic.md``.
"""

from ._math._nn._loops import Loop, RNNCell, planned_row_steps
from ._math._nn._routing import Merge, Router, assign_rows, topk_experts
from ._runtime._loops import LoopActor, LoopStatistics
from ._runtime._routing import MergeActor, RouterActor, RouterStatistics

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
