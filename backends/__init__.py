"""Compute backends (numpy, cupy) and the device pool that runs work on them.

This package is the seam between asyncnn and its compute engines. It is imported as
``asyncnn.backends``; cupy is imported only when a CUDA device is first used.
"""

from ._base import Backend, Device, parse_device
from ._registry import array_namespace, get_backend, is_cupy_array, scatter_add, to_numpy

__all__ = [
    "Backend",
    "Device",
    "array_namespace",
    "get_backend",
    "is_cupy_array",
    "parse_device",
    "scatter_add",
    "to_numpy",
]
