"""Gradient clipping: hand values, edge cases and 16-bit gradients, against torch's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asyncnn import optim
from asyncnn.backends import Backend

from _optim_cases import _half


def test_clip_grad_norm_hand_values(backend: Backend) -> None:
    grads = {"a": backend.asarray(np.array([3.0])), "b": [backend.asarray(np.array([[4.0]]))]}
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    assert float(norm) == pytest.approx(5.0, rel=1e-15)
    coef = 1.0 / (5.0 + 1e-6)
    np.testing.assert_allclose(backend.to_numpy(clipped["a"]), [3.0 * coef], rtol=1e-15)
    np.testing.assert_allclose(backend.to_numpy(clipped["b"][0]), [[4.0 * coef]], rtol=1e-15)
    np.testing.assert_array_equal(backend.to_numpy(grads["a"]), [3.0])  # not modified
    unclipped, norm = optim.clip_grad_norm(grads, 10.0)
    assert float(norm) == pytest.approx(5.0, rel=1e-15)
    np.testing.assert_array_equal(backend.to_numpy(unclipped["b"][0]), [[4.0]])
    assert unclipped["a"] is not grads["a"]


def test_clip_grad_norm_keeps_float32_and_handles_empty(backend: Backend) -> None:
    grads = [backend.asarray(np.full((4, 4), 2.0, np.float32))]
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    assert clipped[0].dtype == np.float32 and norm.dtype == np.float32
    np.testing.assert_allclose(backend.to_numpy(clipped[0]), np.full((4, 4), 0.25), rtol=1e-6)
    empty, norm = optim.clip_grad_norm({}, 1.0)
    assert empty == {} and float(norm) == 0.0
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm(grads, -1.0)


def test_clip_grad_norm_many_leaves(backend: Backend) -> None:
    grads = [backend.asarray(np.full(2, 0.5)) for _ in range(100)]
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    assert float(norm) == pytest.approx(math.sqrt(50.0), rel=1e-14)
    np.testing.assert_allclose(backend.to_numpy(clipped[99]), 0.5 / (math.sqrt(50.0) + 1e-6))


CLIP_CASES = {
    # name: (gradient leaves, max_norm, expected total norm, expected clipped leaves)
    "zero": ([[0.0, 0.0], [0.0]], 1.0, 0.0, [[0.0, 0.0], [0.0]]),
    "max_norm 0": ([[3.0], [4.0]], 0.0, 5.0, [[0.0], [0.0]]),
    "inf": ([[math.inf, 1.0], [2.0]], 1.0, math.inf, [[math.nan, 0.0], [0.0]]),
    "-inf": ([[-math.inf], [2.0]], 1.0, math.inf, [[math.nan], [0.0]]),
    "nan": ([[math.nan, 1.0], [2.0]], 1.0, math.nan, [[math.nan, math.nan], [math.nan]]),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CLIP_CASES)
def test_clip_grad_norm_edge_cases(backend: Backend, case: str, dtype: str) -> None:
    # as torch's default: nothing raised, and with filterwarnings=error no numpy warning either
    leaves, max_norm, norm, expected = CLIP_CASES[case]
    grads = [backend.asarray(np.asarray(g, dtype)) for g in leaves]
    clipped, total = optim.clip_grad_norm(grads, max_norm)
    np.testing.assert_array_equal(float(total), norm)
    for a, e in zip(clipped, expected, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(a), np.asarray(e, dtype))
    torch = pytest.importorskip("torch")
    ts = [torch.zeros(len(g), dtype=getattr(torch, dtype), requires_grad=True) for g in leaves]
    for t, g in zip(ts, leaves, strict=True):
        t.grad = torch.tensor(g, dtype=getattr(torch, dtype))
    np.testing.assert_array_equal(torch.nn.utils.clip_grad_norm_(ts, max_norm).item(), norm)
    for t, a in zip(ts, clipped, strict=True):
        np.testing.assert_array_equal(t.grad.numpy(), backend.to_numpy(a))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_clip_grad_norm_sums_16_bit_squares_in_float32(backend: Backend, name: str) -> None:
    # 256 * 16**2 = 65536 overflows float16 (max 65504): the norm was inf, the gradients zeroed
    dt = _half(backend, name)
    grads = [backend.asarray(np.full(256, 16.0, dt)), backend.asarray(np.ones((), dt))]
    clipped, norm = optim.clip_grad_norm(grads, 1.0)
    assert norm.dtype == np.float32 and float(norm) == pytest.approx(math.sqrt(65537.0), 1e-7)
    coef = 1.0 / (math.sqrt(65537.0) + 1e-6)
    for a, g in zip(clipped, [16.0, 1.0], strict=True):
        assert a.dtype == dt
        np.testing.assert_allclose(np.asarray(backend.to_numpy(a), np.float64), g * coef, 4e-3)
    if name == "float16":  # torch's norm accumulates in float32 too
        torch = pytest.importorskip("torch")
        ts = [torch.zeros(256, dtype=torch.float16, requires_grad=True)]
        ts[0].grad = torch.full((256,), 16.0, dtype=torch.float16)
        assert torch.nn.utils.clip_grad_norm_(ts, 1.0).item() == 256.0
