"""Policies: when keys are admitted, the order of work per stage, and when weights change.

See DESIGN.md section 2 for the semantics of each, and ``docs/policies.md`` for writing one.
"""

from ._runtime._interleaved import (
    Interleaved1F1B,
    ZeroBubbleH1,
    interleaved_1f1b_schedule,
    interleaved_zero_bubble_schedule,
)
from ._runtime._policies import (
    AnyOrder,
    Async,
    GPipe,
    OneFOneB,
    OneFOneBOrder,
    PipeDream,
    PipeDream2BW,
    Policy,
    RecordedOrder,
    StageOrder,
    Sync,
    policy_from_spec,
)
from ._runtime._remedies import (
    DelayCompensation,
    DiscrepancyCorrection,
    PipeMareLR,
    Remedy,
    SpikeCompensation,
    StalenessScaledLR,
    WeightPrediction,
)
from ._runtime._turns import DeviceTurns
from ._runtime._wrapped import Replay, WrappedPolicy

__all__ = [
    "AnyOrder",
    "Async",
    "DelayCompensation",
    "DeviceTurns",
    "DiscrepancyCorrection",
    "GPipe",
    "Interleaved1F1B",
    "OneFOneB",
    "OneFOneBOrder",
    "PipeDream",
    "PipeDream2BW",
    "PipeMareLR",
    "Policy",
    "RecordedOrder",
    "Remedy",
    "Replay",
    "SpikeCompensation",
    "StageOrder",
    "WrappedPolicy",
    "StalenessScaledLR",
    "Sync",
    "WeightPrediction",
    "ZeroBubbleH1",
    "interleaved_1f1b_schedule",
    "interleaved_zero_bubble_schedule",
    "policy_from_spec",
]
