"""asyncnn: asynchronous neural-network research.

Layers run as async actors that exchange tensors over channels; a scheduler routes backprop
messages and a policy decides when work is admitted and when weights change.
"""

from . import ops
from ._math._autodiff import grad, value_and_grad, vjp

__version__ = "0.1.0.dev0"

__all__ = ["grad", "ops", "value_and_grad", "vjp"]
