"""Policies: when keys are admitted, the order of work per stage, and when weights change.

See DESIGN.md section 2 for the semantics of each, and ``docs/policies.md`` for writing one.
"""

from ._runtime._policies import (
    AnyOrder,
    Async,
    GPipe,
    OneFOneB,
    OneFOneBOrder,
    PipeDream,
    Policy,
    RecordedOrder,
    Replay,
    StageOrder,
    Sync,
    policy_from_spec,
)

__all__ = [
    "AnyOrder",
    "Async",
    "GPipe",
    "OneFOneB",
    "OneFOneBOrder",
    "PipeDream",
    "Policy",
    "RecordedOrder",
    "Replay",
    "StageOrder",
    "Sync",
    "policy_from_spec",
]
