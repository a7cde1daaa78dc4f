"""Eager 2-D matrix products on cupy, one ``cublasGemmEx`` call each.

An eager GPU step is bound by its host time, and cupy's ``a @ b`` costs about 45-70 µs of it per
product on the lent hosts (``profile_gpu_step.py --matmul-rows``: a bfloat16 product of 64 rows
takes as long as one of 1,024), most of it in cupy's general matmul (broadcasting, batching,
dtype and layout checks). An MLP step runs about three products per layer. :func:`matmul` takes
the common case, two 2-D arrays of one floating dtype, straight to ``cublasGemmEx`` on cupy's own
cuBLAS handle (cupy's binding sets the handle's stream to the current one) and leaves every
other case to ``a @ b``. :func:`sum_rows` does a bias gradient's column sums the same way.

The product is cupy's: the same handle, cuBLAS's default algorithm and the compute type cupy
uses for each dtype (float64 in float64, float32 and the 16-bit floats in float32; cupy's opt-in
TF32 mode, ``CUPY_TF32=1``, is not followed), so it is also what the products inside a CUDA graph
capture compute (:mod:`._graphs`, which shares :func:`plan`).

Imported only on cupy arrays (:func:`asyncnn.backends.matmul` routes them here).
"""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np
from cupy_backends.cuda.libs import cublas

from ._parallel import capturing_now
from ._parallel import matmul as _product

__all__ = [
    "COMPUTE_32F",
    "COMPUTE_64F",
    "DATA_TYPES",
    "GEMM_DEFAULT",
    "matmul",
    "plan",
    "sum_rows",
]

#: cudaDataType of each dtype the products take
DATA_TYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}
#: cublasComputeType_t: float32 and float64 accumulation
COMPUTE_32F, COMPUTE_64F = 68, 70
#: cublasGemmAlgo_t: cuBLAS's heuristic choice
GEMM_DEFAULT = -1
#: cublasPointerMode_t: alpha and beta in host memory
_POINTER_MODE_HOST = 0

# alpha = 1 and beta = 0 in host memory, for the handle's host pointer mode
_ONES: dict[int, np.ndarray[Any, Any]] = {32: np.ones(1, np.float32), 64: np.ones(1, np.float64)}
_ZEROS: dict[int, np.ndarray[Any, Any]] = {
    32: np.zeros(1, np.float32),
    64: np.zeros(1, np.float64),
}
_SCALARS = {bits: (_ONES[bits].ctypes.data, _ZEROS[bits].ctypes.data) for bits in (32, 64)}


def _operand(x: Any) -> tuple[Any, bool, int]:
    """``(array, transposed, leading dimension)`` of a 2-D operand as cuBLAS reads it."""
    if x.flags.c_contiguous:
        return x, False, max(1, x.shape[1])
    if x.flags.f_contiguous:
        return x, True, max(1, x.shape[0])
    x = cupy.ascontiguousarray(x)
    return x, False, max(1, x.shape[1])


def plan(a: Any, b: Any) -> tuple[Any, Any, tuple[int, ...]] | None:
    """``(out, (b, a) operands, arguments)`` of ``a @ b`` as one column-major ``GemmEx``, or
    None where it is not one (not both 2-D, mixed or non-float dtypes, an empty dimension).

    The arguments are ``(transb, transa, n, m, k, ldb, lda, ldc, data type, compute type)``:
    row-major ``out = a @ b`` is column-major ``out^T = b^T a^T``."""
    if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype:
        return None
    dt = DATA_TYPES.get(a.dtype.name)
    if dt is None:
        return None
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return None
    a, ta, lda = _operand(a)
    b, tb, ldb = _operand(b)
    out = cupy.empty((m, n), dtype=a.dtype)
    compute = COMPUTE_64F if dt == 1 else COMPUTE_32F
    return out, (b, a), (int(tb), int(ta), n, m, k, ldb, lda, n, dt, compute)


def matmul(a: Any, b: Any) -> Any:
    """``a @ b``: one ``cublasGemmEx`` on cupy's handle for two 2-D arrays of one floating
    dtype, cupy's ``@`` otherwise."""
    if type(a) is not cupy.ndarray or type(b) is not cupy.ndarray:
        return a @ b
    device = cupy.cuda.runtime.getDevice()
    if a.data.device_id != device or b.data.device_id != device:
        return a @ b  # cupy's own error, or its peer access
    planned = plan(a, b)
    if planned is None:
        return a @ b
    out, (b, a), (tb, ta, n, m, k, ldb, lda, ldc, dt, compute) = planned
    one, zero = _SCALARS[64 if compute == COMPUTE_64F else 32]
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, _POINTER_MODE_HOST)
    cublas.gemmEx(
        handle, tb, ta, n, m, k, one, b.data.ptr, dt, ldb, a.data.ptr, dt, lda, zero,
        out.data.ptr, dt, ldc, compute, GEMM_DEFAULT,
    )  # fmt: skip
    return out


#: rows of ones by (device, length, dtype), for :func:`sum_rows` outside captures
_ONE_ROWS: dict[tuple[int, int, str], Any] = {}
_MAX_ONE_ROWS = 64


def sum_rows(x: Any) -> Any:
    """``x.sum(axis=0)`` of a 2-D floating cupy array as the product of a row of ones with it
    (accumulated in float64 for float64, in float32 otherwise, and rounded once: what
    ``acc_sum`` gives), one launch where cupy's reduction costs several times its host time
    and 16-bit floats add a cast; None for anything else. Inside a CUDA graph capture the row
    comes from the capture's pool and the product is the capture's."""
    if type(x) is not cupy.ndarray or x.dtype.name not in DATA_TYPES or 0 in x.shape:
        return None
    m = x.shape[0]
    if capturing_now():
        ones = cupy.ones((1, m), dtype=x.dtype)
    else:
        key = (x.data.device_id, m, x.dtype.name)
        ones = _ONE_ROWS.get(key)
        if ones is None:
            if len(_ONE_ROWS) >= _MAX_ONE_ROWS:
                _ONE_ROWS.clear()
            with cupy.cuda.Device(x.data.device_id):
                ones = cupy.ones((1, m), dtype=x.dtype)
                # other streams read it later: its fill must be done first
                cupy.cuda.get_current_stream().synchronize()
            _ONE_ROWS[key] = ones
    return _product(ones, x).reshape(-1)
