"""Finding the backend for a device, and the array namespace of an array."""

from __future__ import annotations

import sys
import threading
from types import ModuleType
from typing import Any

import numpy as np

from ._base import Backend, Device, parse_device

__all__ = [
    "array_namespace",
    "backend_of",
    "get_backend",
    "host_array",
    "is_cupy_array",
    "scatter_add",
    "to_numpy",
]

_lock = threading.Lock()
_backends: dict[Device, Backend] = {}
# the same backends by the key a caller passed ("cuda:0", Device(...), "cupy"): the device pool
# asks on every GPU compute and wait, and parsing the name each time would cost more
_by_key: dict[Any, Backend] = {}


def get_backend(device: str | Device = "cpu") -> Backend:
    """The backend for a device (``"cpu"``, ``"cuda:N"``) or a name (``"numpy"``, ``"cupy"``).

    cupy is imported the first time a CUDA device is asked for, never before.
    """
    try:
        backend = _by_key.get(device)
    except TypeError:  # (unhashable: a list) named as any device it cannot parse
        parse_device(device)
        raise
    if backend is not None:
        return backend
    key = device
    if device == "numpy":
        device = "cpu"
    elif device == "cupy":
        device = "cuda:0"
    dev = parse_device(device)
    with _lock:
        backend = _backends.get(dev)
        if backend is None:
            if dev.kind == "cpu":
                from ._numpy import NumpyBackend

                backend = NumpyBackend()
            else:
                from ._cupy import CupyBackend

                backend = CupyBackend(dev.index)
            _backends[dev] = backend
        _by_key[key] = backend
    return backend


def is_cupy_array(x: Any) -> bool:
    """Whether ``x`` is a cupy array (answered without importing cupy)."""
    return type(x).__module__.startswith("cupy")


def array_namespace(*xs: Any) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) that the arrays ``xs`` belong to.

    Python scalars and numpy arrays give numpy; any cupy array among them gives cupy.
    """
    for x in xs:
        if type(x) is not np.ndarray and is_cupy_array(x):
            return sys.modules["cupy"]
    return np


def backend_of(*xs: Any) -> Backend:
    """The backend of the arrays ``xs``: that of the GPU holding the first cupy array among
    them, else numpy's (Python scalars and numpy arrays)."""
    for x in xs:
        if type(x) is not np.ndarray and is_cupy_array(x):
            return get_backend(f"cuda:{x.device.id}")
    return get_backend("cpu")


def fused_nn_kernels_of(x: Any) -> Any:
    """The fused network kernels of the backend holding ``x`` (see
    :meth:`Backend.fused_nn_kernels`), or None: numpy arrays, Python scalars, and backends whose
    array code is already the fast path."""
    if type(x) is np.ndarray:  # (the common case on the CPU, answered first)
        return None
    return backend_of(x).fused_nn_kernels()


def to_numpy(x: Any) -> Any:
    """A numpy copy of a cupy array; numpy arrays and other values are returned as they are."""
    if is_cupy_array(x):
        return x.get()
    return x


def host_array(x: Any) -> np.ndarray[Any, Any]:
    """``x`` as a C-ordered numpy array on the host, of its own shape (``np.ascontiguousarray``
    would make a 0-d array 1-d); copied only from a GPU or where not C-ordered."""
    host = np.asarray(to_numpy(x))
    return host if host.flags.c_contiguous else np.ascontiguousarray(host)


def scatter_add(out: Any, index: Any, values: Any) -> None:
    """``out[index] += values`` where repeated indices accumulate (numpy's ``add.at``).

    A 16-bit ``out`` (float16 or bfloat16, numpy's or cupy's) accumulates in float32 and is
    rounded once, as every other sum of 16-bit floats: ``add.at`` adds in ``out``'s dtype, where
    a sum of ones stalls at 2048 (float16) or 256 (bfloat16), so an ``Embedding`` row looked up
    20,000 times had a gradient of 2048 (and cupy's ``add.at`` takes no bfloat16 at all). Other
    dtypes are ``add.at``'s own, bit for bit.
    """
    xp = array_namespace(out)
    dtype = out.dtype
    # (16-bit floats, told apart here without backends._dtypes, which imports this module)
    if dtype.itemsize == 2 and (dtype.kind == "f" or dtype.name == "bfloat16"):
        wide = out.astype(np.float32)
        xp.add.at(wide, index, values.astype(np.float32))
        out[...] = wide.astype(dtype)
        return
    xp.add.at(out, index, values)  # cupy implements ufunc.at as numpy does
