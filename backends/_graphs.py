"""CUDA-graph capture on cupy: a capture-safe matrix product and the capture of one call.

cupy 14 refuses every cuBLAS call while a stream is being captured. cuBLAS itself captures
fine when it runs on a handle whose workspace is memory the caller owns (cuBLAS would otherwise
allocate one of its own inside the capture). :func:`matmul` is that product: inside
:func:`capture` it calls ``cublasGemmEx`` through ctypes on a handle of this module's, with the
stream and workspace of the capture in progress; outside a capture it is cupy's ``@``.

The products take cuBLAS's default algorithm with the compute type cupy uses for each dtype
(float32 in float32, 16-bit floats in float32, float64 in float64), so a captured product gives
the eager one's values; bit-equality is not promised by cuBLAS across handles and workspaces
(``tests/test_gpu_capture.py`` checks it on the card at hand).

Imported only on cupy arrays (the runtime's capture path). While a capture runs on a thread,
:func:`asyncnn.backends.matmul` on that thread is this module's :func:`matmul`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import cupy
import numpy as np

from ._dispatch import capturing

__all__ = ["CaptureError", "active", "capture", "copy_into", "copy_of", "label_poison", "matmul"]

#: workspace given to cuBLAS for the products of one capture
WORKSPACE_BYTES = 32 << 20

_state = threading.local()
_lib_lock = threading.Lock()
_lib: Any = None

# cudaDataType and cublasComputeType_t
_DATA = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}
_COMPUTE_32F, _COMPUTE_64F = 68, 70
_GEMM_DEFAULT = -1


class CaptureError(RuntimeError):
    """Raised when a call cannot be captured (its caller then runs it eagerly)."""


def active() -> bool:
    """Whether this thread is inside :func:`capture`."""
    return getattr(_state, "capture", None) is not None


def _cublas() -> Any:
    global _lib
    with _lib_lock:
        if _lib is None:
            # cupy's own libcublas, loaded by one small product (no second copy of the library)
            a = cupy.ones((2, 2), dtype=cupy.float32)
            (a @ a).sum()
            with open("/proc/self/maps") as maps:
                path = next((ln.split()[-1] for ln in maps if "libcublas.so" in ln), None)
            if path is None:
                raise CaptureError("libcublas is not loaded in this process")
            lib = ctypes.CDLL(path)
            lib.cublasGemmEx.restype = ctypes.c_int
            _lib = lib
        return _lib


class _Capture:
    """What one capture in progress needs: its stream, a cuBLAS handle and a workspace."""

    def __init__(self, stream: Any, workspace: Any) -> None:
        self.stream = stream
        self.workspace = workspace
        self.lib = _cublas()
        # a handle belongs to the device current when it was made, and one thread (the event
        # loop's) captures for the actors of every GPU: one handle per device and thread
        handles: dict[int, Any] | None = getattr(_state, "handles", None)
        if handles is None:
            handles = _state.handles = {}
        device = int(cupy.cuda.runtime.getDevice())  # the capture's: launches run inside it
        handle = handles.get(device)
        if handle is None:
            handle = ctypes.c_void_p()
            if self.lib.cublasCreate_v2(ctypes.byref(handle)) != 0:
                raise CaptureError(f"cublasCreate failed on cuda:{device}")
            handles[device] = handle
        self.handle = handle

    def bind(self) -> None:
        # cublasSetStream resets the workspace to cuBLAS's own pool: set ours after it
        lib, h = self.lib, self.handle
        if lib.cublasSetStream_v2(h, ctypes.c_void_p(self.stream.ptr)) != 0:
            raise CaptureError("cublasSetStream failed")
        ws = self.workspace
        if lib.cublasSetWorkspace_v2(h, ctypes.c_void_p(ws.data.ptr), ctypes.c_size_t(ws.nbytes)):
            raise CaptureError("cublasSetWorkspace failed")


def _operand(x: Any) -> tuple[Any, bool, int]:
    """``(array, transposed, leading dimension)`` of a 2-D operand as cuBLAS reads it."""
    if x.flags.c_contiguous:
        return x, False, max(1, x.shape[1])
    if x.flags.f_contiguous:
        return x, True, max(1, x.shape[0])
    x = cupy.ascontiguousarray(x)
    return x, False, max(1, x.shape[1])


def matmul(a: Any, b: Any) -> Any:
    """``a @ b``; inside :func:`capture`, 2-D products go to cuBLAS directly (capturable)."""
    cap = getattr(_state, "capture", None)
    if cap is None:
        return a @ b
    if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype or str(a.dtype) not in _DATA:
        raise CaptureError(
            f"no capturable product of {a.dtype}{a.shape} and {b.dtype}{b.shape} (2-D, one dtype)"
        )
    m, k = a.shape
    n = b.shape[1]
    out = cupy.empty((m, n), dtype=a.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        out.fill(0)
        return out
    a, ta, lda = _operand(a)
    b, tb, ldb = _operand(b)
    dt = _DATA[str(a.dtype)]
    one: ctypes.c_double | ctypes.c_float
    zero: ctypes.c_double | ctypes.c_float
    if a.dtype == np.float64:
        compute, one, zero = _COMPUTE_64F, ctypes.c_double(1.0), ctypes.c_double(0.0)
    else:
        compute, one, zero = _COMPUTE_32F, ctypes.c_float(1.0), ctypes.c_float(0.0)
    cap.bind()
    # row-major out = a @ b is column-major out^T = b^T a^T
    rc = cap.lib.cublasGemmEx(
        cap.handle, ctypes.c_int(int(tb)), ctypes.c_int(int(ta)), ctypes.c_int(n),
        ctypes.c_int(m), ctypes.c_int(k), ctypes.byref(one), ctypes.c_void_p(b.data.ptr),
        ctypes.c_int(dt), ctypes.c_int(ldb), ctypes.c_void_p(a.data.ptr), ctypes.c_int(dt),
        ctypes.c_int(lda), ctypes.byref(zero), ctypes.c_void_p(out.data.ptr), ctypes.c_int(dt),
        ctypes.c_int(n), ctypes.c_int(compute), ctypes.c_int(_GEMM_DEFAULT),
    )  # fmt: skip
    if rc != 0:
        raise CaptureError(f"cublasGemmEx failed with status {rc}")
    return out


def copy_into(dst: Any, src: Any) -> None:
    """``dst[...] = src`` on the current stream: one asynchronous memcpy where both are
    contiguous with one dtype and shape (cupy's ``copyto`` checks far more, on the host, for
    each of the several loads of every replayed step), else ``copyto``."""
    if (
        src.shape == dst.shape
        and src.dtype == dst.dtype
        and isinstance(src, cupy.ndarray)
        and src.flags.c_contiguous
        and dst.flags.c_contiguous
        and src.device.id == dst.device.id
    ):
        _memcpy(dst, src)
        return
    cupy.copyto(dst, src)


def copy_of(src: Any) -> Any:
    """A new array equal to ``src``, made on the current stream: ``empty_like`` and one
    asynchronous memcpy where ``src`` is a contiguous cupy array on the current device (a replayed
    step copies its outputs out of the graph's buffers several times: ``ndarray.copy`` took 11-21
    µs of host time a call on the lent H100 hosts, this 9-10 µs), else ``src.copy()``."""
    if (
        isinstance(src, cupy.ndarray)
        and src.flags.c_contiguous
        and src.device.id == cupy.cuda.runtime.getDevice()
    ):
        out = cupy.empty_like(src)
        _memcpy(out, src)
        return out
    return src.copy()


def _memcpy(dst: Any, src: Any) -> None:
    # contiguous arrays of one size on one device (the callers check): one asynchronous copy
    # on the current stream
    if src.nbytes:
        cupy.cuda.runtime.memcpyAsync(
            dst.data.ptr, src.data.ptr, src.nbytes, cupy.cuda.runtime.memcpyDeviceToDevice,
            cupy.cuda.get_current_stream().ptr,
        )  # fmt: skip


def _relaxed() -> int:
    # relaxed: allocations (cudaMalloc from a pool's growth) and module loads stay allowed
    return int(getattr(cupy.cuda.runtime, "streamCaptureModeRelaxed", 2))


@contextlib.contextmanager
def _allocating(pool: Any) -> Iterator[None]:
    with cupy.cuda.using_allocator(pool.malloc):
        yield


def capture(fn: Callable[[], Any], stream: Any, pool: Any, workspace: Any) -> tuple[Any, Any]:
    """Captures ``fn()`` on ``stream`` into a CUDA graph: returns ``(graph, result)``.

    Nothing runs: launch the graph to compute. Every array ``fn`` allocates comes from ``pool``
    (keep it, and ``result``, as long as the graph: the graph writes into that memory on each
    launch). ``workspace`` (device memory, :data:`WORKSPACE_BYTES`) is cuBLAS's scratch for the
    products inside; it must not be shared with a graph that can run at the same time.

    Raises:
        CaptureError: when ``fn`` does something a capture cannot hold (a host sync, a
            non-2-D product, ...); the stream is left usable.
    """
    if active():
        raise CaptureError("captures do not nest")
    _state.capture = _Capture(stream, workspace)
    try:
        with _allocating(pool), stream, capturing(matmul):
            stream.begin_capture(mode=_relaxed())
            try:
                result = fn()
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    stream.end_capture()
                if isinstance(exc, Exception):
                    raise CaptureError(f"{type(exc).__name__}: {exc}") from exc
                raise
            graph = stream.end_capture()
    finally:
        _state.capture = None
    return graph, result


def run_in_pool(fn: Callable[[], Any], pool: Any) -> Any:
    """``fn()`` eagerly with its arrays taken from ``pool`` (warms a capture's pool)."""
    with _allocating(pool):
        return fn()


@functools.cache
def _poison_kernel(dtype_name: str, ctype: str) -> Any:
    # parameter types are numpy names ("float" there would mean float64); casts are C types
    return cupy.ReductionKernel(
        "T y, int64 n, int64 ignore, bool ignoring", f"{dtype_name} out",
        "(!(ignoring && y == ignore) && (y < 0 || y >= n)) ? 1 : 0", "max(a, b)",
        f"out = a ? ({ctype})nan(\"\") : ({ctype})0", "0",
        f"asyncnn_label_poison_{dtype_name}",
    )  # fmt: skip


def label_poison(labels: Any, n_classes: int, dtype: Any, ignore: int | None = None) -> Any:
    """A 0-d array of ``dtype``: NaN when a label is outside ``[0, n_classes)`` (and is not
    ``ignore``, where given), else 0.

    One kernel, no host sync: a loss adds it, so a bad label makes the loss NaN instead of
    costing a round trip to the host on every step.
    """
    name = str(np.dtype(dtype))
    ctype = {"float32": "float", "float64": "double"}[name]
    index = np.int64(0 if ignore is None else ignore)
    return _poison_kernel(name, ctype)(
        labels.reshape(-1), np.int64(n_classes), index, ignore is not None
    )
