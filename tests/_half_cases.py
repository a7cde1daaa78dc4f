"""The op and module cases that 16-bit floats must keep their dtype through, forward and
backward: run on the CPU by test_cpu_half.py and on the GPU by test_gpu_dtypes.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from asyncnn import nn, ops


def rand(shape: tuple[int, ...], seed: int, positive: bool = False) -> np.ndarray[Any, Any]:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.abs(x) + 0.5 if positive else x


LABELS = np.array([0, 2, 1, 3, 2])
IDS = np.array([[0, 4], [3, 3], [1, 2]])

# name: (function of the float arguments, their shapes, whether they must be positive). Each
# op's output is in its inputs' dtype (cross-entropy: float32), each gradient in its argument's.
OPS: dict[str, tuple[Callable[..., Any], list[tuple[int, ...]], bool]] = {
    "add": (ops.add, [(4, 5), (5,)], False),
    "subtract": (ops.subtract, [(4, 5), (4, 1)], False),
    "multiply": (ops.multiply, [(4, 5), (4, 5)], False),
    "divide": (ops.divide, [(4, 5), (5,)], True),
    "scalar arithmetic": (lambda x: 2.0 * x - x / 3.0 + 1.5, [(4, 5)], False),
    "negative": (ops.negative, [(4, 5)], False),
    "power": (lambda x: ops.power(x, 3.0), [(4, 5)], True),
    "square": (ops.square, [(4, 5)], False),
    "exp": (ops.exp, [(4, 5)], False),
    "log": (ops.log, [(4, 5)], True),
    "tanh": (ops.tanh, [(4, 5)], False),
    "sigmoid": (ops.sigmoid, [(4, 5)], False),
    "relu": (ops.relu, [(4, 5)], False),
    "gelu": (ops.gelu, [(4, 5)], False),
    "gelu tanh": (lambda x: ops.gelu(x, "tanh"), [(4, 5)], False),
    "sqrt": (ops.sqrt, [(4, 5)], True),
    "abs": (ops.abs, [(4, 5)], False),
    "log1p": (ops.log1p, [(4, 5)], True),
    "expm1": (ops.expm1, [(4, 5)], False),
    "sin": (ops.sin, [(4, 5)], False),
    "cos": (ops.cos, [(4, 5)], False),
    "clip": (lambda x: ops.clip(x, -0.5, 0.3), [(4, 5)], False),
    "clip min": (lambda x: ops.clip(x, min=0.1), [(4, 5)], False),
    "leaky_relu": (lambda x: ops.leaky_relu(x, 0.1), [(4, 5)], False),
    "elu": (ops.elu, [(4, 5)], False),
    "silu": (ops.silu, [(4, 5)], False),
    "softplus": (ops.softplus, [(4, 5)], False),
    "softplus beta": (lambda x: ops.softplus(x, 2.0, 1.0), [(4, 5)], False),
    "maximum": (ops.maximum, [(4, 5), (4, 5)], False),
    "minimum": (ops.minimum, [(4, 5), (5,)], False),
    "where": (lambda a, b: ops.where(ops.raw(a) > 0, a, b), [(4, 5), (4, 5)], False),
    "astype round trip": (
        lambda x: ops.astype(ops.astype(x, np.float32), x.dtype),
        [(4, 5)],
        False,
    ),
    "sum": (lambda x: ops.sum(x, axis=1), [(4, 5)], False),
    "sum all": (ops.sum, [(4, 5)], False),
    "mean": (lambda x: ops.mean(x, axis=0, keepdims=True), [(4, 5)], False),
    "max": (lambda x: ops.max(x, axis=1), [(4, 5)], False),
    "min": (ops.min, [(4, 5)], False),
    "reshape": (lambda x: ops.reshape(x, (5, 4)), [(4, 5)], False),
    "transpose": (ops.transpose, [(4, 5)], False),
    "expand squeeze": (lambda x: ops.squeeze(ops.expand_dims(x, 1)), [(4, 5)], False),
    "broadcast_to": (lambda x: ops.broadcast_to(x, (3, 4, 5)), [(4, 5)], False),
    "getitem": (lambda x: ops.getitem(x, (slice(1, 3), np.array([0, 0, 4]))), [(4, 5)], False),
    "take": (lambda x: ops.take(x, np.array([1, 1, 3]), axis=1), [(4, 5)], False),
    "concatenate": (lambda a, b: ops.concatenate([a, b], axis=1), [(4, 5), (4, 2)], False),
    "stack": (lambda a, b: ops.stack([a, b]), [(4, 5), (4, 5)], False),
    "matmul": (ops.matmul, [(4, 5), (5, 3)], False),
    "matmul operator": (lambda a, b: a @ b, [(4, 5), (5, 3)], False),
    "matmul batched": (ops.matmul, [(2, 4, 5), (5, 3)], False),
    "matmul vector": (ops.matmul, [(5,), (5, 3)], False),
    "matmul vectors": (ops.matmul, [(5,), (5,)], False),
    "softmax": (ops.softmax, [(4, 5)], False),
    "log_softmax": (lambda x: ops.log_softmax(x, axis=0), [(4, 5)], False),
    "logsumexp": (ops.logsumexp, [(4, 5)], False),
    "conv1d": (lambda x, w, b: ops.conv1d(x, w, b, padding=1), [(2, 3, 7), (4, 3, 3), (4,)], False),
    "conv2d": (
        lambda x, w: ops.conv2d(x, w, stride=2, padding=1),
        [(2, 3, 6, 5), (4, 3, 3, 3)],
        False,
    ),
    "max_pool1d": (lambda x: ops.max_pool1d(x, 2), [(2, 3, 6)], False),
    "max_pool2d": (lambda x: ops.max_pool2d(x, 2, padding=1), [(2, 3, 5, 5)], False),
    "avg_pool1d": (lambda x: ops.avg_pool1d(x, 3, 1, 1), [(2, 3, 6)], False),
    "avg_pool2d": (lambda x: ops.avg_pool2d(x, 2), [(2, 3, 4, 4)], False),
    "layer_norm": (ops.layer_norm, [(4, 5), (5,), (5,)], False),
    "group_norm": (lambda x, w, b: ops.group_norm(x, 2, w, b), [(2, 4, 5), (4,), (4,)], False),
    "var": (lambda x: ops.var(x, axis=1, ddof=1), [(4, 5)], False),
    "std": (lambda x: ops.std(x, keepdims=True), [(4, 5)], False),
    "dropout": (lambda x: ops.dropout(x, 0.5, np.random.default_rng(0)), [(4, 5)], False),
    "embedding": (lambda w: ops.embedding(w, IDS), [(5, 3)], False),
    "mse_loss": (ops.mse_loss, [(4, 5), (4, 5)], False),
    "mse_loss none": (lambda a, b: ops.mse_loss(a, b, "none"), [(4, 5), (4, 5)], False),
    "cross_entropy": (lambda z: ops.cross_entropy(z, LABELS), [(5, 4)], False),
    "cross_entropy sum": (lambda z: ops.cross_entropy(z, LABELS, "sum"), [(5, 4)], False),
}


MODULES: dict[str, tuple[nn.Module, tuple[int, ...]]] = {
    "linear": (nn.Linear(8, 6), (5, 8)),
    "linear 3-d": (nn.Linear(8, 6, bias=False), (2, 5, 8)),
    "conv1d": (nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7)),
    "conv2d": (nn.Conv2d(3, 4, 3, stride=2), (2, 3, 7, 7)),
    "attention": (nn.MultiHeadAttention(8, 2), (2, 3, 8)),
    "layernorm": (nn.LayerNorm(8), (5, 8)),
    "groupnorm": (nn.GroupNorm(2, 4), (3, 4, 3, 2)),
    "mlp": (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.GELU(), nn.Linear(16, 3)), (5, 8)),
    "residual": (nn.Residual(nn.Sequential(nn.Linear(8, 8), nn.Tanh())), (5, 8)),
    "activations": (nn.Sequential(nn.Sigmoid(), nn.Softmax(), nn.LogSoftmax()), (5, 8)),
    "more activations": (
        nn.Sequential(nn.LeakyReLU(0.2), nn.ELU(), nn.SiLU(), nn.Softplus(), nn.Hardtanh(-0.5, 2)),
        (5, 8),
    ),
    "pools": (nn.Sequential(nn.MaxPool1d(2), nn.AvgPool1d(2), nn.Flatten()), (2, 3, 8)),
}
