"""Neural-network modules: frozen descriptions whose parameters are passed on every call."""

from ._activations import (
    ELU,
    GELU,
    Hardtanh,
    Identity,
    LeakyReLU,
    LogSoftmax,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Softplus,
    Tanh,
)
from ._attention import MultiHeadAttention
from ._containers import Residual, Sequential
from ._conv import (
    AvgPool1d,
    AvgPool2d,
    Conv1d,
    Conv2d,
    MaxPool1d,
    MaxPool2d,
    MaxUnpool1d,
    MaxUnpool2d,
)
from ._linear import Embedding, Linear
from ._losses import CrossEntropyLoss, MSELoss
from ._module import Initializer, Module
from ._norm import GroupNorm, LayerNorm
from ._recurrent import GRU, LSTM, GRUCell, LSTMCell
from ._reshape import Dropout, Flatten
from ._spec import from_spec, to_spec

__all__ = [
    "AvgPool1d", "AvgPool2d", "Conv1d", "Conv2d", "CrossEntropyLoss", "Dropout", "ELU", "Embedding",
    "Flatten", "GELU", "GRU", "GRUCell", "GroupNorm", "Hardtanh", "Identity", "Initializer", "LSTM",
    "LSTMCell", "LayerNorm", "LeakyReLU", "Linear", "LogSoftmax", "MSELoss", "MaxPool1d",
    "MaxPool2d", "MaxUnpool1d", "MaxUnpool2d", "Module", "MultiHeadAttention", "ReLU", "Residual",
    "Sequential", "SiLU", "Sigmoid", "Softmax", "Softplus", "Tanh", "from_spec", "to_spec",
]  # fmt: skip
