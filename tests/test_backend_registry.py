"""backend_of: the backend of arrays, the math's one way to reach a device's fast paths; and
scatter_add, the one sum of the registry's (repeated indices accumulate)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from asyncnn.backends import BFLOAT16, backend_of, get_backend, scatter_add, to_numpy


def test_numpy_arrays_and_scalars_belong_to_the_numpy_backend() -> None:
    assert backend_of(np.zeros(3), 1.0) is get_backend("cpu")
    assert backend_of() is get_backend("cpu")
    assert get_backend("cpu").fused_kernels() is None  # numpy code is its own fast path


@pytest.mark.gpu
def test_a_cupy_array_picks_its_gpu_and_its_fused_kernels() -> None:
    cp = pytest.importorskip("cupy")
    x = cp.zeros(3)
    assert backend_of(np.zeros(2), x) is get_backend("cuda:0")
    fused = backend_of(x).fused_kernels()
    assert hasattr(fused, "sgd_leaf") and hasattr(fused, "adam_leaf")


def test_an_unhashable_device_gets_the_unknown_device_message():
    # (a bare "unhashable type: 'list'" from the cache's lookup)
    with pytest.raises(ValueError, match=r"unknown device \['cpu'\]: use 'cpu', 'cuda'"):
        get_backend(["cpu"])  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_scatter_add_sums_16_bit_floats_in_float32_and_others_as_numpy(
    backend: Any, dtype: str
) -> None:
    # numpy's add.at adds in the array's dtype: 2048 + 1 is 2048 in float16 (256 + 1 is 256 in
    # bfloat16), so 5,000 ones at one place summed to 2048 (or 256). A 16-bit sum accumulates
    # in float32 and is rounded once, as every other 16-bit sum; float32 and float64 are
    # numpy's add.at, bit for bit (cupy's: atomics, in their own order).
    if dtype == "bfloat16":
        if BFLOAT16 is None:
            pytest.skip("bfloat16 needs the optional ml_dtypes package")
        dt = BFLOAT16
    else:
        dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    index = np.concatenate([np.full(5000, 2), rng.integers(0, 4, 50)])
    values = rng.uniform(0.5, 1.5, (index.size, 3)).astype(dt)
    start = np.arange(12.0).reshape(4, 3).astype(dt)
    out = backend.asarray(start.copy())  # (numpy: no copy of its own)
    scatter_add(out, backend.asarray(index), backend.asarray(values))
    got = to_numpy(out)
    assert got.dtype == dt
    if dtype in ("float32", "float64"):
        want = start.copy()
        np.add.at(want, index, values)
        if backend.xp is np:
            np.testing.assert_array_equal(got, want)
        else:  # (cupy's add.at adds with atomics, in an order of its own: a sum of 5,000
            # terms in another order, within their count's rounding steps)
            np.testing.assert_allclose(got, want, rtol=index.size * np.finfo(dt).eps)
        return
    exact = start.astype(np.float64)
    np.add.at(exact, index, values.astype(np.float64))
    # rounded once from float32 (whose own rounding of these sums is ~1e-7 of them)
    np.testing.assert_allclose(
        got.astype(np.float64),
        exact,
        rtol=np.finfo(np.float16).eps if dtype == "float16" else 2**-8,
    )
    # and in place of a view (a gradient scattered along another axis fills its array)
    base = backend.xp.zeros((3, 4), dtype=dt)
    scatter_add(
        backend.xp.moveaxis(base, 1, 0),
        backend.asarray(np.full(5000, 1)),
        backend.asarray(np.ones((5000, 3), dt)),
    )
    # (5000 rounded once: 4992 in bfloat16)
    np.testing.assert_array_equal(to_numpy(base)[:, 1], np.full(3, 5000.0).astype(dt))
