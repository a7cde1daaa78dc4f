"""Neural-network modules, equinox-style: a module is a frozen dataclass of hyperparameters,
its parameters a pytree made by ``init`` and passed on every call.

Example:
    >>> from asyncnn import nn
    >>> model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> params = model.init(0)                 # [{"weight", "bias"}, {}, {"weight", "bias"}]
    >>> logits = model(params, x)              # evaluation; pass rng=... to train with dropout
"""

from ._math._nn import (
    GELU,
    GRU,
    LSTM,
    AvgPool1d,
    AvgPool2d,
    Conv1d,
    Conv2d,
    CrossEntropyLoss,
    Dropout,
    Embedding,
    Flatten,
    GRUCell,
    Identity,
    Initializer,
    LayerNorm,
    Linear,
    LogSoftmax,
    LSTMCell,
    MaxPool1d,
    MaxPool2d,
    Module,
    MSELoss,
    MultiHeadAttention,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
    from_spec,
    to_spec,
)  # fmt: skip

__all__ = [
    "AvgPool1d", "AvgPool2d", "Conv1d", "Conv2d", "CrossEntropyLoss", "Dropout", "Embedding",
    "Flatten", "GELU", "GRU", "GRUCell", "Identity", "Initializer", "LSTM", "LSTMCell",
    "LayerNorm", "Linear", "LogSoftmax", "MSELoss", "MaxPool1d", "MaxPool2d", "Module",
    "MultiHeadAttention", "ReLU", "Residual", "Sequential", "Sigmoid", "Softmax", "Tanh",
    "from_spec", "to_spec",
]  # fmt: skip
