"""Compute backends (numpy, cupy) and the device pool that runs work on them.

This package is the seam between asyncnn and its compute engines. It is imported as
``asyncnn.backends``; cupy is imported only when a CUDA device is first used.
"""

from ._alloc import allocator_tuning, tune_allocator
from ._base import Backend, Device, parse_device
from ._pool import DEFAULT_INLINE_FLOPS, DevicePool, PoolStatistics, open_device_pool
from ._registry import array_namespace, get_backend, is_cupy_array, scatter_add, to_numpy

__all__ = [
    "DEFAULT_INLINE_FLOPS",
    "Backend",
    "Device",
    "DevicePool",
    "PoolStatistics",
    "allocator_tuning",
    "array_namespace",
    "get_backend",
    "is_cupy_array",
    "open_device_pool",
    "parse_device",
    "scatter_add",
    "to_numpy",
    "tune_allocator",
]
