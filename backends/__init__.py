"""Compute backends (numpy, cupy) and the device pool that runs work on them.

This package is the seam between asyncnn and its compute engines. It is imported as
``asyncnn.backends``; cupy is imported only when a CUDA device is first used.
"""

from ._alloc import allocator_tuning, tune_allocator
from ._base import Backend, Device, parse_device
from ._checks import MAX_POOL_WORKERS
from ._dispatch import batched_product
from ._dtypes import BFLOAT16, acc_mean, acc_sum, is_compute_float, is_floating, is_half
from ._parallel import (
    ComputeTeam,
    TeamStatistics,
    current_team,
    elementwise,
    matmul,
    split_bounds,
    using_team,
)
from ._pool import (
    DEFAULT_INLINE_FLOPS,
    DevicePool,
    InlineCounter,
    PoolStatistics,
    open_device_pool,
)
from ._registry import (
    array_namespace,
    backend_of,
    fused_nn_kernels_of,
    get_backend,
    is_cupy_array,
    scatter_add,
    to_numpy,
)

__all__ = [
    "BFLOAT16",
    "DEFAULT_INLINE_FLOPS",
    "MAX_POOL_WORKERS",
    "Backend",
    "ComputeTeam",
    "Device",
    "DevicePool",
    "InlineCounter",
    "PoolStatistics",
    "TeamStatistics",
    "acc_mean",
    "acc_sum",
    "allocator_tuning",
    "array_namespace",
    "backend_of",
    "batched_product",
    "current_team",
    "elementwise",
    "fused_nn_kernels_of",
    "get_backend",
    "is_cupy_array",
    "is_compute_float",
    "is_floating",
    "is_half",
    "matmul",
    "open_device_pool",
    "parse_device",
    "scatter_add",
    "split_bounds",
    "to_numpy",
    "tune_allocator",
    "using_team",
]
