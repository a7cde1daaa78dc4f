"""Eager products on cupy through one ``cublasGemmEx`` (``backends/_gemm.py``): every layout and
floating dtype gives cupy's ``a @ b``, and what the fast path does not take (batches, mixed or
integer dtypes, empty dimensions, vectors) still gives it. Skipped without cupy and a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from asyncnn import backends

from conftest import HAS_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs cupy and a GPU")]

_TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


def _pair(dtype, m, k, n, layout, seed=0):
    import cupy as cp

    rng = np.random.default_rng(seed)
    a = cp.asarray(rng.standard_normal((m, k)), dtype=cp.float32).astype(dtype)
    b = cp.asarray(rng.standard_normal((k, n)), dtype=cp.float32).astype(dtype)
    if layout == "transposed":  # F-contiguous views, as a vjp's x.T and w.T
        a = cp.ascontiguousarray(a.T).T
        b = cp.ascontiguousarray(b.T).T
    elif layout == "strided":  # neither C- nor F-contiguous: copied first
        a = cp.ascontiguousarray(cp.concatenate([a, a], axis=1))[:, ::2]
        b = cp.ascontiguousarray(cp.concatenate([b, b], axis=1))[:, ::2]
    elif layout == "row-slice":  # a view with an offset into its buffer
        a = cp.concatenate([a, a])[m:]
    return a, b


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "row-slice"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(64, 96, 33), (1, 7, 1), (300, 1, 5)], ids=str)
def test_the_fast_product_is_cupys(dtype, layout, shape):
    from backends import _gemm

    a, b = _pair(dtype, *shape, layout)
    assert _gemm.plan(a, b) is not None
    got = backends.matmul(a, b)
    want = a @ b
    assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous
    np.testing.assert_allclose(
        got.astype("float64").get(), want.astype("float64").get(), rtol=_TOL[dtype],
        atol=_TOL[dtype] * shape[1] ** 0.5,
    )  # fmt: skip
    # deterministic: the same call gives the same bits
    assert bool((backends.matmul(a, b) == got).all())


def test_what_the_fast_product_does_not_take_goes_to_cupy():
    import cupy as cp

    from backends import _gemm

    rng = np.random.default_rng(1)
    f32 = cp.asarray(rng.standard_normal((3, 4, 5)), dtype=cp.float32)
    w = cp.asarray(rng.standard_normal((5, 2)), dtype=cp.float32)
    cases = [
        (f32, w),  # a batch
        (f32[0], w.astype(cp.float64)),  # mixed dtypes
        (cp.arange(12).reshape(3, 4), cp.arange(8).reshape(4, 2)),  # integers
        (f32[0, 0], w),  # a vector
        (f32[0, :0], w),  # no rows: (0, 5) @ (5, 2)
        (f32[0][:, :0], w[:0]),  # k = 0: (4, 0) @ (0, 2), zeros
    ]
    for a, b in cases:
        if a.ndim == 2 and b.ndim == 2 and a.dtype == b.dtype:
            assert _gemm.plan(a, b) is None
        got = backends.matmul(a, b)
        want = a @ b
        assert got.dtype == want.dtype and got.shape == want.shape
        assert bool((got == want).all())


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_column_sums_by_a_product_equal_the_reduction(dtype, layout):
    import cupy as cp

    from asyncnn.backends import acc_sum

    x, _ = _pair(dtype, 300, 17, 1, layout, seed=2)
    for keepdims in (False, True):
        got = acc_sum(x, (0,), keepdims)
        want = x.sum(axis=0, keepdims=keepdims, dtype=cp.float64)  # the exact sums, rounded
        assert got.dtype == x.dtype and got.shape == want.shape
        np.testing.assert_allclose(
            got.astype("float64").get(), want.get(), rtol=_TOL[dtype], atol=_TOL[dtype] * 20
        )
    # a batch of rows, or integers, take the reduction
    assert acc_sum(x[None], (0,)).shape == x.shape
    ints = cp.arange(12).reshape(4, 3)
    assert bool((acc_sum(ints, (0,)) == ints.sum(axis=0)).all())
