"""The cupy backend (``backends/_cupy.py``) where it can run without a GPU: loaded here over a
numpy stand-in for the ``cupy`` module, which refuses a dtype as cupy does (both ask numpy). On a
GPU, ``tests/test_fused_nn.py`` runs the real one."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import types
from typing import Any

import numpy as np
import pytest

import asyncnn.backends
from asyncnn.backends import BFLOAT16
from asyncnn.backends._base import Device


def _stand_in_backend(monkeypatch: Any) -> Any:
    """A ``CupyBackend`` of ``backends/_cupy.py`` loaded over a stand-in ``cupy`` whose arrays
    are numpy's (the module is loaded afresh under another name: the real one is never
    imported on a machine without cupy)."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray = type("ndarray", (), {})  # type: ignore[attr-defined]
    cupy.asarray = np.asarray  # type: ignore[attr-defined]
    cupy.zeros = np.zeros  # type: ignore[attr-defined]
    cupy.__version__ = "stand-in"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    path = os.path.join(asyncnn.backends.__path__[0], "_cupy.py")
    spec = importlib.util.spec_from_file_location("asyncnn.backends._cupy_stand_in", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backend = object.__new__(module.CupyBackend)  # (its __init__ asks CUDA for devices)
    backend.device = Device("cuda", 0)
    backend._cuda_device = contextlib.nullcontext()
    backend._dtype_lock = threading.Lock()
    backend._checked_dtypes = {}
    return backend


@pytest.mark.skipif(BFLOAT16 is not None, reason="ml_dtypes is installed: numpy knows bfloat16")
def test_cupy_asarray_of_bfloat16_without_ml_dtypes_says_to_install_it(monkeypatch: Any) -> None:
    # (cupy's own TypeError was "data type 'bfloat16' not understood", with no way out)
    backend = _stand_in_backend(monkeypatch)
    with pytest.raises(ValueError, match=r"'bfloat16' needs .*pip install ml_dtypes"):
        backend.asarray([1.0, 2.0], dtype="bfloat16")


def test_cupy_asarray_names_an_unknown_dtype_and_keeps_other_errors(monkeypatch: Any) -> None:
    backend = _stand_in_backend(monkeypatch)
    with pytest.raises(ValueError, match=r"unknown dtype 'float33'"):
        backend.asarray([1.0], dtype="float33")
    with pytest.raises(ValueError, match="inhomogeneous"):  # the data's fault: cupy's error
        backend.asarray([[1.0], [1.0, 2.0]], dtype="float32")
    np.testing.assert_array_equal(backend.asarray([1, 2], dtype="float32"), [1.0, 2.0])
