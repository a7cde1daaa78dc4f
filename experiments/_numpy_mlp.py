"""A hand-written numpy MLP (forward, backward, SGD): the reference the benchmarks measure
asyncnn against. ReLU hidden layers, softmax cross-entropy, float32, weights as (in, out)."""

from __future__ import annotations

from typing import Any

import numpy as np


def init(
    sizes: list[int], seed: int = 0, dtype: Any = np.float32
) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(dtype)
        b = rng.uniform(-bound, bound, (fan_out,)).astype(dtype)
        params.append((w, b))
    return params


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """The mean softmax cross-entropy of ``logits`` against integer labels ``y``, and its
    gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    expd = np.exp(shifted)
    total = expd.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(np.mean(np.log(total[:, 0]) - shifted[np.arange(n), y]))
    g = expd / total
    g[np.arange(n), y] -= 1
    g /= n
    return loss, g


def sgd_step(
    params: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, y: np.ndarray, lr: float
) -> float:
    """One forward/backward/update, written as one would by hand; returns the mean loss."""
    acts = [x]
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        if i < len(params) - 1:
            h = np.maximum(h, 0)
        acts.append(h)
    loss, g = softmax_cross_entropy(acts[-1], y)
    for i in range(len(params) - 1, -1, -1):
        w, b = params[i]
        gw = acts[i].T @ g
        gb = g.sum(axis=0)
        if i > 0:
            g = g @ w.T
            g *= acts[i] > 0
        params[i] = (w - lr * gw, b - lr * gb)
    return loss
