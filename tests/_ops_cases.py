"""Plain numpy references of conv, pool and log-softmax, for tests/test_ops.py and
tests/test_ops_forward.py."""

from __future__ import annotations

import numpy as np

Ints = tuple[int, ...]


def ref_conv(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: Ints, padding: Ints, dilation: Ints
) -> np.ndarray:
    """Direct cross-correlation over every output position (any number of spatial axes)."""
    sp = x.ndim - 2
    xp_ = np.pad(x, [(0, 0), (0, 0)] + [(padding[i], padding[i]) for i in range(sp)])
    k = w.shape[2:]
    out_shape = [
        (xp_.shape[2 + i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(sp)
    ]
    out = np.zeros((x.shape[0], w.shape[0], *out_shape))
    for pos in np.ndindex(*out_shape):
        idx = tuple(
            slice(
                pos[i] * stride[i], pos[i] * stride[i] + dilation[i] * (k[i] - 1) + 1, dilation[i]
            )
            for i in range(sp)
        )
        patch = xp_[(slice(None), slice(None), *idx)]  # (N, C, *k)
        out[(slice(None), slice(None), *pos)] = np.tensordot(
            patch, w, axes=(range(1, 2 + sp), range(1, 2 + sp))
        )
    if b is not None:
        out += b.reshape((-1,) + (1,) * sp)
    return out


def ref_pool(x: np.ndarray, k: Ints, s: Ints, p: Ints, how: str) -> np.ndarray:
    sp = x.ndim - 2
    fill = -np.inf if how == "max" else 0.0
    xp_ = np.pad(x, [(0, 0), (0, 0)] + [(p[i], p[i]) for i in range(sp)], constant_values=fill)
    out_shape = [(xp_.shape[2 + i] - k[i]) // s[i] + 1 for i in range(sp)]
    out = np.zeros((*x.shape[:2], *out_shape))
    for pos in np.ndindex(*out_shape):
        idx = tuple(slice(pos[i] * s[i], pos[i] * s[i] + k[i]) for i in range(sp))
        win = xp_[(slice(None), slice(None), *idx)].reshape(*x.shape[:2], -1)
        out[(slice(None), slice(None), *pos)] = win.max(-1) if how == "max" else win.mean(-1)
    return out


def ref_log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))
