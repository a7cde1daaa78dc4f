"""The fused cross-entropy kernels on the GPU (``backends/_fused_nn.py``) against the array code
they replace, which the same op runs with the fused kernels turned off: every reduction, 2-D and
spatial logits, every float dtype, views, labels outside the classes, rows too long for them;
and the fused ReLU gradient and 16-bit sums against their array code. Skips without cupy and a
GPU (run it with ``bash experiments/device_tests.sh``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import ops
from asyncnn.backends import BFLOAT16

from conftest import HAS_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")]


def _counting(m: Any, name: str) -> list[int]:
    """Counts, in ``m``'s context, the calls of the fused kernel ``name`` (of the module the
    runtime's cupy backend hands out: ``asyncnn.backends._fused_nn``; ``backends._fused_nn``,
    imported under the folder's name, would be a second copy the runtime never calls)."""
    from asyncnn.backends import _fused_nn

    calls: list[int] = []
    real = getattr(_fused_nn, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    m.setattr(_fused_nn, name, spy)
    return calls


def _unfused(m: Any) -> None:
    """In ``m``'s context the cupy backend has no fused kernels: the array code runs."""
    from asyncnn.backends._cupy import CupyBackend

    m.setattr(CupyBackend, "fused_nn_kernels", lambda self: None)


def _value_and_grad(logits: Any, labels: Any, reduction: str, fused: bool, mp: Any) -> Any:
    import cupy

    from asyncnn.backends import _fused_nn

    with mp.context() as m:
        calls = _counting(m, "cross_entropy_rows")
        if not fused:
            _unfused(m)
        loss, pullback = ann.vjp(lambda x: ops.cross_entropy(x, labels, reduction), logits)
        seed = loss.copy() if reduction == "none" else None
        if seed is not None:
            # (cupy takes no numpy array on the right of an assignment)
            seed[...] = cupy.linspace(0.5, 1.5, seed.size).reshape(seed.shape).astype(seed.dtype)
        (grad,) = pullback(1.0 if seed is None else seed)
    # the fused kernels ran exactly where asked (and where the rows fit them)
    assert len(calls) == (1 if fused and logits.shape[1] <= _fused_nn.MAX_CLASSES else 0)
    return loss, grad


def _close(got: Any, want: Any, dtype: str) -> None:
    import cupy

    tol = {"float64": 1e-13, "float32": 1e-6}.get(dtype, 1e-6)
    got, want = cupy.asnumpy(got).astype(np.float64), cupy.asnumpy(want).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


DTYPES = ["float64", "float32", "float16"] + (["bfloat16"] if BFLOAT16 is not None else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(64, 10), (5, 3, 4, 2)], ids=["rows", "spatial"])
def test_fused_cross_entropy_equals_the_array_code(
    dtype: str, reduction: str, shape: tuple[int, ...], monkeypatch: Any
) -> None:
    import cupy

    rng = np.random.default_rng(0)
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    logits = cupy.asarray((3 * rng.standard_normal(shape)).astype(np.float32)).astype(dt)
    labels = cupy.asarray(rng.integers(0, shape[1], (shape[0], *shape[2:])))
    loss, grad = _value_and_grad(logits, labels, reduction, True, monkeypatch)
    want_loss, want_grad = _value_and_grad(logits, labels, reduction, False, monkeypatch)
    assert loss.dtype == want_loss.dtype and loss.shape == want_loss.shape
    assert grad.dtype == want_grad.dtype == logits.dtype and grad.shape == logits.shape
    _close(loss, want_loss, dtype)
    # 16-bit gradients: the same float32 value rounded once, or one rounding apart
    if dtype in ("float64", "float32"):
        _close(grad, want_grad, dtype)
    else:
        g, w = (cupy.asnumpy(a.astype(np.float32)) for a in (grad, want_grad))
        np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-3)


def test_views_int32_labels_and_long_rows(monkeypatch: Any) -> None:
    import cupy

    from asyncnn.backends import _fused_nn

    rng = np.random.default_rng(1)
    wide = cupy.asarray(rng.standard_normal((32, 24)))
    view = wide[:, ::2]  # not contiguous: read through a copy
    labels = cupy.asarray(rng.integers(0, 12, 32).astype(np.int32))
    loss, grad = _value_and_grad(view, labels, "mean", True, monkeypatch)
    want_loss, want_grad = _value_and_grad(view, labels, "mean", False, monkeypatch)
    _close(loss, want_loss, "float64")
    _close(grad, want_grad, "float64")
    # rows longer than the kernels take go through the array code, still right
    long_rows = cupy.asarray(rng.standard_normal((4, _fused_nn.MAX_CLASSES + 1)))
    assert not _fused_nn.fits(long_rows, labels[:4])
    loss, _ = _value_and_grad(long_rows, labels[:4], "sum", True, monkeypatch)
    z = cupy.asnumpy(long_rows)
    y = cupy.asnumpy(labels[:4])
    want = (np.log(np.exp(z).sum(1)) - z[np.arange(4), y]).sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-12)


def test_a_label_outside_the_classes_makes_its_loss_nan() -> None:
    import cupy

    from asyncnn.backends import _fused_nn

    logits = cupy.asarray(np.random.default_rng(2).standard_normal((4, 3)))
    labels = cupy.asarray(np.array([0, 3, 1, -1]))
    _, rows = _fused_nn.cross_entropy_rows(logits, labels, logits.dtype)
    got = cupy.asnumpy(rows)
    assert np.isnan(got[[1, 3]]).all() and np.isfinite(got[[0, 2]]).all()
    assert np.isnan(float(ops.cross_entropy(logits, labels)))


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_fused_relu_gradient_equals_the_array_code_bit_for_bit(
    dtype: str, monkeypatch: Any
) -> None:
    import cupy

    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(5)
    x = cupy.asarray(rng.standard_normal((37, 65)), dtype=cupy.float32).astype(dt)
    x[0, :4] = 0  # relu's output is 0 there: no gradient
    seed = cupy.asarray(rng.standard_normal((37, 65)), dtype=cupy.float32).astype(dt)
    seed[1, :3] = cupy.asarray([np.nan, -0.0, np.inf], dtype=cupy.float32).astype(dt)
    seed = seed[:, ::-1]  # a view: the kernel takes any layout

    def grad(fused: bool) -> Any:
        with monkeypatch.context() as m:
            calls = _counting(m, "relu_grad")
            if not fused:
                _unfused(m)
            _, pullback = ann.vjp(ops.relu, x)
            (g,) = pullback(seed)
        assert len(calls) == int(fused)
        return g

    got, want = grad(True), grad(False)
    assert got.dtype == want.dtype == dt and got.shape == want.shape
    bits = {2: cupy.uint16, 4: cupy.uint32, 8: cupy.uint64}[dt.itemsize]
    got, want = cupy.ascontiguousarray(got), cupy.ascontiguousarray(want)
    nan = cupy.isnan(want.astype(cupy.float64))
    assert bool((cupy.isnan(got.astype(cupy.float64)) == nan).all()) and int(nan.sum()) >= 1
    # every other value to the bit, the signs of zeros included (NaN payloads may differ)
    assert bool(((got.view(bits) == want.view(bits)) | nan).all())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    ("shape", "axis", "keepdims"),
    [((64, 4096), (0,), False), ((37, 65), 0, True), ((3, 5, 129), (0, 1), False),
     ((3, 5, 129), 2, False)],
)  # fmt: skip
def test_16_bit_sums_in_one_kernel_equal_a_sum_and_a_cast(
    dtype: str, shape: tuple[int, ...], axis: Any, keepdims: bool, monkeypatch: Any
) -> None:
    import cupy

    from asyncnn.backends import acc_sum

    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    x = cupy.asarray(np.random.default_rng(6).standard_normal(shape), dtype=cupy.float32)
    x = x.astype(dt)
    with monkeypatch.context() as m:
        calls = _counting(m, "half_sum")
        got = acc_sum(x, axis, keepdims)
        assert len(calls) == 1
        _unfused(m)
        want = acc_sum(x, axis, keepdims)
        assert len(calls) == 1
    assert got.dtype == want.dtype == dt and got.shape == want.shape
    # the same float32 sum rounded once, or (where cupy's sum adds in another order, as CUB's
    # reductions may) one rounding apart: neighbouring 16-bit floats of one sign
    g_bits, w_bits = (cupy.asnumpy(a.view(cupy.uint16)).astype(np.int64) for a in (got, want))
    assert np.abs(g_bits - w_bits).max() <= 1
    # and it is the float32 sum, rounded once
    ref = cupy.asnumpy(x.astype(cupy.float32)).astype(np.float64).sum(axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(cupy.asnumpy(got.astype(cupy.float32)), ref, rtol=1e-2, atol=1e-2)
