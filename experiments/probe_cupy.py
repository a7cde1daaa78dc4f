"""What the device's cupy can do: bfloat16 (through ml_dtypes) and CUDA-graph stream capture.

Run on a CUDA machine: python3 experiments/probe_cupy.py   (prints one line per check)
"""

from __future__ import annotations

import inspect
import time
import traceback
from collections.abc import Callable
from typing import Any

import cupy as cp
import numpy as np


def check(name: str, fn: Callable[[], Any]) -> Any:
    try:
        out = fn()
        print(f"OK   {name}: {out}")
        return out
    except Exception as exc:  # noqa: BLE001 - a probe reports everything
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}")
        return None


def bf16() -> None:
    import ml_dtypes

    bf = np.dtype(ml_dtypes.bfloat16)
    check("np.dtype('bfloat16') after import", lambda: np.dtype("bfloat16"))
    check("kind/itemsize", lambda: (bf.kind, bf.itemsize, bf.name))
    a = check("cp.zeros bf16", lambda: cp.zeros(4, dtype=bf))
    check("asarray from numpy bf16", lambda: cp.asarray(np.arange(4, dtype=bf)))
    x = cp.random.standard_normal((256, 256), dtype=cp.float32)
    xb = check("astype f32->bf16", lambda: x.astype(bf).dtype)
    xb = x.astype(bf)
    check(
        "matmul bf16 dtype/err",
        lambda: ((xb @ xb).dtype, float(cp.abs((xb @ xb).astype(cp.float32) - x @ x).max())),
    )
    check("matmul bf16 3D@2D", lambda: (cp.ones((2, 3, 4), bf) @ cp.ones((4, 5), bf)).dtype)
    for op in ("add", "multiply", "maximum", "subtract", "divide"):
        check(f"ufunc {op}", lambda op=op: getattr(cp, op)(xb, xb).dtype)
    for op in ("exp", "log", "tanh", "sqrt", "negative", "abs", "sign", "expm1", "log1p", "erf"):
        f = getattr(cp, op, None) or getattr(__import__("cupyx.scipy.special").scipy.special, op)
        check(f"ufunc {op}", lambda f=f: f(cp.abs(xb)).dtype)
    check("scalar mult python float", lambda: (xb * 0.5).dtype)
    check("x > 0 / where", lambda: cp.where(xb > 0, xb, cp.zeros((), bf)).dtype)
    ones = cp.ones(100000, dtype=bf)
    check("sum of 1e5 ones (bf16 accumulates in?)", lambda: (ones.sum().dtype, float(ones.sum())))
    check("sum dtype=float32", lambda: float(ones.sum(dtype=cp.float32)))
    check("mean bf16", lambda: float(ones.mean()))
    h = cp.ones(100000, dtype=cp.float16)
    check("fp16 sum of 1e5 ones", lambda: (h.sum().dtype, float(h.sum())))
    check("max / argmax", lambda: (float(xb.max()), int(xb.argmax())))
    check("take_along_axis", lambda: cp.take_along_axis(xb, cp.zeros((256, 1), cp.int64), 1).dtype)
    check(
        "astype bf16->f32 / f64", lambda: (xb.astype(cp.float32).dtype, xb.astype(cp.float64).dtype)
    )
    check("get()", lambda: xb[:2, :2].get().dtype)
    check("result_type(bf16, f32)", lambda: cp.result_type(bf, cp.float32))
    check("empty_like / copyto", lambda: cp.copyto(cp.empty_like(xb), xb))
    check("inplace += *=", lambda: (xb.copy().__iadd__(xb), xb.copy().__imul__(0.5))[0].dtype)
    check("xp.asarray(0.5, dtype=bf16)", lambda: cp.asarray(0.5, dtype=bf).dtype)
    check("ones_like / zeros_like", lambda: cp.ones_like(xb).dtype)
    check("broadcast bias add", lambda: (xb + cp.ones(256, bf)).dtype)
    check("sum axis 0 (bias grad)", lambda: xb.sum(axis=0).dtype)
    check(
        "ElementwiseKernel bf16",
        lambda: cp.ElementwiseKernel("T x", "T y", "y = x * (T)2", "dbl")(xb).dtype,
    )
    n = 8192
    for dt in (cp.float16, bf):
        a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(dt)
        for _ in range(3):
            a @ a
        cp.cuda.Device().synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        cp.cuda.Device().synchronize()
        print(
            f"     matmul 8192^2 {np.dtype(dt).name}: {20 * n**3 / (time.perf_counter() - t) / 1e12:.1f} TFLOP/s"
        )


def capture() -> None:
    s = cp.cuda.Stream(non_blocking=True)
    check("begin_capture signature", lambda: str(inspect.signature(s.begin_capture)))
    check("Graph attrs", lambda: [m for m in dir(cp.cuda.graph.Graph) if not m.startswith("_")])
    w = cp.random.standard_normal((512, 512), dtype=cp.float32)
    x = cp.random.standard_normal((64, 512), dtype=cp.float32)
    cp.cuda.Device().synchronize()

    def fn() -> Any:
        h = x
        for _ in range(20):
            h = cp.maximum(h @ w, 0) * 0.01 + 1.0
        return h

    with s:
        ref = fn()
    s.synchronize()
    pool = cp.cuda.MemoryPool()
    for label, alloc in (("default pool", None), ("private pool", pool.malloc)):
        try:
            with s:
                if alloc is not None:
                    with cp.cuda.using_allocator(alloc):
                        fn()  # warm the private pool
                        s.begin_capture()
                        out = fn()
                        g = s.end_capture()
                else:
                    s.begin_capture()
                    out = fn()
                    g = s.end_capture()
            out.fill(0)
            g.launch(s)
            s.synchronize()
            print(f"OK   capture with {label}: equal={bool(cp.array_equal(out, ref))}")
        except Exception as exc:  # noqa: BLE001
            print(f"FAIL capture with {label}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=2)
            try:
                s.end_capture()
            except Exception:  # noqa: BLE001
                pass
            continue
        for name, f in (("eager", lambda: fn()), ("graph", lambda g=g: g.launch(s))):
            with s:
                f()
            s.synchronize()
            t = time.perf_counter()
            with s:
                for _ in range(200):
                    f()
            s.synchronize()
            print(
                f"     {label} {name}: {(time.perf_counter() - t) / 200 * 1e6:.1f} us per 60 kernels"
            )
    check("is_capturing", lambda: s.is_capturing())
    # a host sync inside a capture must fail cleanly
    try:
        with s:
            s.begin_capture()
            float(x.sum())
    except Exception as exc:  # noqa: BLE001
        print(f"OK   host sync in capture raises {type(exc).__name__}: {str(exc)[:120]}")
    try:
        g2 = s.end_capture()
        print("     end_capture after failure gave", type(g2))
    except Exception as exc:  # noqa: BLE001
        print(f"     end_capture after failure raises {type(exc).__name__}: {str(exc)[:160]}")
    check("stream usable afterwards", lambda: (s.synchronize(), float((x * 2).sum()))[1])


def cublas_by_ctypes() -> None:
    """cupy refuses cuBLAS inside a capture; does cuBLAS itself, called through ctypes, capture?"""
    import ctypes

    (cp.ones((2, 2)) @ cp.ones((2, 2))).sum()  # loads cupy's libcublas
    path = next(line.split()[-1] for line in open("/proc/self/maps") if "libcublas.so" in line)
    lib = ctypes.CDLL(path)
    h = ctypes.c_void_p()
    assert lib.cublasCreate_v2(ctypes.byref(h)) == 0
    ws = cp.empty(32 << 20, dtype=cp.uint8)
    assert (
        lib.cublasSetWorkspace_v2(h, ctypes.c_void_p(ws.data.ptr), ctypes.c_size_t(ws.nbytes)) == 0
    )
    n = 512
    a = cp.random.standard_normal((n, n), dtype=cp.float32)
    b = cp.random.standard_normal((n, n), dtype=cp.float32)
    c = cp.empty((n, n), dtype=cp.float32)
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
    s = cp.cuda.Stream(non_blocking=True)
    assert lib.cublasSetStream_v2(h, ctypes.c_void_p(s.ptr)) == 0

    def gemm() -> int:  # row-major C = A @ B is column-major C^T = B^T A^T
        return lib.cublasSgemm_v2(
            h,
            0,
            0,
            n,
            n,
            n,
            ctypes.byref(one),
            ctypes.c_void_p(b.data.ptr),
            n,
            ctypes.c_void_p(a.data.ptr),
            n,
            ctypes.byref(zero),
            ctypes.c_void_p(c.data.ptr),
            n,
        )

    with s:
        s.begin_capture()
        rc = gemm()
        g = s.end_capture()
    c.fill(0)
    g.launch(s)
    s.synchronize()
    err = float(cp.abs(c - a @ b).max())
    print(f"OK   ctypes cublasSgemm in a capture: rc={rc}, max error {err:.2e}")


if __name__ == "__main__":
    print("cupy", cp.__version__, "numpy", np.__version__)
    bf16()
    capture()
    check("ctypes cuBLAS capture", cublas_by_ctypes)
