"""Functional optimizers (torch.optim semantics), learning-rate schedules and gradient clipping.

``opt = optim.Adam(lr=1e-3)``, ``state = opt.init(params)``, then every step
``params, state = opt.update(params, grads, state)``: new arrays, nothing modified in place.
"""

from ._math._optim import SGD, Adam, AdamW, Optimizer, clip_grad_norm, from_spec
from ._math._schedules import (
    CosineAnnealing,
    LinearWarmup,
    Schedule,
    StepLR,
    schedule_from_spec,
)

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "CosineAnnealing",
    "LinearWarmup",
    "Optimizer",
    "Schedule",
    "StepLR",
    "clip_grad_norm",
    "from_spec",
    "schedule_from_spec",
]
