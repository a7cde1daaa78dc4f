"""asyncnn: asynchronous neural-network research.

Layers run as async actors that exchange tensors over channels; a scheduler routes backprop
messages and a policy decides when work is admitted and when weights change.
"""

from . import callbacks, cluster, data, dynamic, interop, nn, ops, optim, policies, trace
from ._checkpoint import CheckpointError
from ._errors import (
    ActorError,
    GraphError,
    RemoteError,
    StallError,
    TraceFormatError,
    TraceWriteError,
    WorkerError,
)
from ._math._autodiff import vjp
from ._math._autodiff_grad import grad, value_and_grad
from ._math._imports import UntrustedModuleError
from ._math._loop import evaluate, predict, train_loop
from ._notebook import replay  # runs on a worker thread inside a running event loop
from ._runtime._actors import LayerActor
from ._runtime._config import RunConfig
from ._runtime._context import ActorContext
from ._runtime._graph import Graph
from ._runtime._node import TensorRef
from ._runtime._open_run import open_run
from ._runtime._run import Run, RunState
from ._runtime._statistics import ActorStatistics
from ._train import History, Trainer
from ._version import __version__ as __version__

__all__ = [
    "ActorContext",
    "CheckpointError",
    "RunConfig",
    "UntrustedModuleError",
    "ActorError",
    "ActorStatistics",
    "Graph",
    "GraphError",
    "History",
    "LayerActor",
    "RemoteError",
    "Run",
    "RunState",
    "StallError",
    "TensorRef",
    "TraceFormatError",
    "TraceWriteError",
    "Trainer",
    "WorkerError",
    "callbacks",
    "cluster",
    "data",
    "dynamic",
    "evaluate",
    "grad",
    "interop",
    "nn",
    "open_run",
    "ops",
    "optim",
    "policies",
    "predict",
    "replay",
    "value_and_grad",
    "trace",
    "train_loop",
    "vjp",
]
