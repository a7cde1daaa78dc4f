"""Functional optimizers (torch.optim semantics), learning-rate schedules and gradient clipping.

``SGD``, ``Adam``, ``AdamW``, ``RMSprop`` and ``Adagrad``, with torch's update rules and
defaults (but ``SGD``'s ``lr``, 0.1 here). ``opt = optim.Adam(lr=1e-3)``,
``state = opt.init(params)``, then every step
``params, state = opt.update(params, grads, state)``: new arrays, nothing modified in place.

The updates equal torch.optim's to rounding, not bit for bit: torch's CPU kernels fuse
multiply-adds (``add(alpha=)``, and ``lerp`` for Adam's first moment), which numpy cannot; here
every operation rounds, in the order each optimizer's docstring writes, on the CPU and the GPU
alike. 16-bit parameters are updated in float32 and rounded once (torch computes each operation
in float32 but rounds every intermediate to 16 bits). Adam's and AdamW's moments of float16
parameters are kept in float32: in float16 a second moment underflows to 0 for gradients below
about 5e-3, and the next step would divide by ``eps``; so are RMSprop's and Adagrad's buffers.
"""

from ._math._optim import SGD, Optimizer, clip_grad_norm
from ._math._optim_adam import Adam, AdamW
from ._math._optim_rms import Adagrad, RMSprop
from ._math._optim_spec import from_spec
from ._math._schedules import (
    CosineAnnealing,
    LinearWarmup,
    Schedule,
    StepLR,
    schedule_from_spec,
)

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "CosineAnnealing",
    "LinearWarmup",
    "Optimizer",
    "RMSprop",
    "Schedule",
    "StepLR",
    "clip_grad_norm",
    "from_spec",
    "schedule_from_spec",
]
