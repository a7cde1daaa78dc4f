"""Neural-network modules, equinox-style: a module is a frozen dataclass of hyperparameters,
its parameters a pytree made by ``init`` and passed on every call.

Example:
    >>> from asyncnn import nn
    >>> model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> params = model.init(0)                 # [{"weight", "bias"}, {}, {"weight", "bias"}]
    >>> logits = model(params, x)              # evaluation; pass rng=... to train with dropout
"""

from ._math._nn import (
    ELU,
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
    GroupNorm,
    GRUCell,
    Hardtanh,
    Identity,
    Initializer,
    LayerNorm,
    LeakyReLU,
    Linear,
    LogSoftmax,
    LSTMCell,
    MaxPool1d,
    MaxPool2d,
    MaxUnpool1d,
    MaxUnpool2d,
    Module,
    MSELoss,
    MultiHeadAttention,
    ReLU,
    Residual,
    Sequential,
    Sigmoid,
    SiLU,
    Softmax,
    Softplus,
    Tanh,
    from_spec,
    to_spec,
)  # fmt: skip

__all__ = [
    "AvgPool1d", "AvgPool2d", "Conv1d", "Conv2d", "CrossEntropyLoss", "Dropout", "ELU", "Embedding",
    "Flatten", "GELU", "GRU", "GRUCell", "GroupNorm", "Hardtanh", "Identity", "Initializer", "LSTM",
    "LSTMCell", "LayerNorm", "LeakyReLU", "Linear", "LogSoftmax", "MSELoss", "MaxPool1d",
    "MaxPool2d", "MaxUnpool1d", "MaxUnpool2d", "Module", "MultiHeadAttention", "ReLU", "Residual",
    "Sequential", "SiLU", "Sigmoid", "Softmax", "Softplus", "Tanh", "from_spec", "to_spec",
]  # fmt: skip
