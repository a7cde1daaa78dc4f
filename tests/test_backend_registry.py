"""backend_of: the backend of arrays, the math's one way to reach a device's fast paths."""

from __future__ import annotations

import numpy as np
import pytest

from asyncnn.backends import backend_of, get_backend


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
