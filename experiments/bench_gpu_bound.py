"""The GPU's own bound, zero host cost, for issue 18's target: an MLP of width 4096 (4 x
[Linear(4096, 4096) + ReLU], Linear(4096, 10), softmax cross-entropy), bfloat16, batch 64, SGD,
in 4 stages on one GPU (a CUDA stream each), several keys in flight, each stage updating right
after its backward of each key (AMPNet, Async, PipeDream), must reach 2x the samples/s of a
synchronous step. Our runtime's host cost per key bounds it today; here each configuration is
captured into ONE CUDA graph and replayed, leaving the card's own time:

A. sync: one stream, per key a whole step (forward, loss, backward, update of every parameter);
B. async pipeline: a stream per stage, 1F1B order per stage, events between stages;
C. B's order on one stream (what the streams' overlap buys);
D. a stream per stage, no dependency between stages (the ideal overlap);
and A's matrix products alone and its SGD updates alone, to explain the bound. Per key: graphs
of K and 2K keys, and (t(2K) - t(K)) / K without the fill and drain. Last, the memory traffic a
key needs under any schedule that updates at every key (the weights read by the products; the
weight gradients written and read back by the update, as the runtime does, or the update fused
into the weight gradient's product) over the card's copy rate: what no such schedule goes
under, short of the L2 cache keeping weights between reads.

No asyncnn code: cuBLAS's products (cublasGemmEx, default algorithm, through ctypes: cupy
refuses its own cuBLAS calls while a stream captures; bias gradients as products with a row of
ones) and five cupy ElementwiseKernels, so they approximate, not equal, the runtime's kernels.

Run: python3 experiments/bench_gpu_bound.py [--dtype bfloat16] [--batch 64] [--width 4096]
[--keys 32] [--stages 4] [--repeats 5] [--seconds 0.3] [--out runs/bench_gpu_bound.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

LAYERS = 4
CLASSES = 10
LR = 1e-3
WORKSPACE_BYTES = 32 << 20  # cuBLAS's scratch per stream (its recommendation for Hopper)
_CUDA_TYPE = {"float32": 0, "float16": 2, "bfloat16": 14}  # cudaDataType
_COMPUTE_32F, _GEMM_DEFAULT = 68, -1  # float32 accumulation, as cupy's own products

#: one unit of work: ("F" forward (+ loss on the last stage) or "B" backward + update, stage, key)
Op = tuple[str, int, int]

# (softmax(logits) - onehot(y)) * scale for row i, in float32
_XENT = """const ptrdiff_t r = i * ncls; float m = (float)logits[r], s = 0.0f;
for (int c = 1; c < ncls; ++c) m = fmaxf(m, (float)logits[r + c]);
for (int c = 0; c < ncls; ++c) s += expf((float)logits[r + c] - m);
for (int c = 0; c < ncls; ++c)
  dlogits[r + c] = (T)((expf((float)logits[r + c] - m) / s - (c == y ? 1.0f : 0.0f)) * scale);"""


def one_f_one_b(stages: int, keys: int) -> list[list[tuple[str, int]]]:
    """Each stage's order: ``stages - s`` forwards, then backward of the oldest key and
    forward of the next alternately, then the remaining backwards."""
    per = []
    for s in range(stages):
        warm = min(stages - s, keys)
        ops = [("F", k) for k in range(warm)]
        for k in range(keys):
            ops.append(("B", k))
            if k + warm < keys:
                ops.append(("F", k + warm))
        per.append(ops)
    return per


def issue_order(per_stage: list[list[tuple[str, int]]]) -> list[Op]:
    """The stages' orders merged round-robin into one host order where each op comes after the
    op of another stage it waits for (a stream waits on an event's latest record, so the
    record must be issued first)."""
    stages, pos, done, order = len(per_stage), [0] * len(per_stage), set(), []
    while len(order) < sum(map(len, per_stage)):
        before = len(order)
        for s in range(stages):
            if pos[s] == len(per_stage[s]):
                continue
            kind, k = per_stage[s][pos[s]]
            need = ("F", s - 1, k) if kind == "F" else ("B", s + 1, k)
            if not 0 <= need[1] < stages or need in done:
                order.append((kind, s, k))
                done.add((kind, s, k))
                pos[s] += 1
        if len(order) == before:
            raise RuntimeError("the schedule deadlocks")
    return order


def _load_cublas(cp: Any) -> Any:
    a = cp.ones((2, 2), dtype=cp.float32)
    (a @ a).sum()  # cupy loads its libcublas: call that same copy
    cp.cuda.Device().synchronize()
    with open("/proc/self/maps") as maps:
        paths = [ln.split()[-1] for ln in maps if "libcublas.so" in ln]
    for name in [*paths, "libcublas.so.12", "libcublas.so.13", "libcublas.so"]:
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name)
    raise RuntimeError("libcublas not found")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


class Blas:
    """Row-major products through cuBLAS, one handle and workspace per stream (a shared one
    would be scratch for products running at once on different streams)."""

    def __init__(self, cp: Any, streams: list[Any]) -> None:
        lib = self.lib = _load_cublas(cp)
        vp, i = ctypes.c_void_p, ctypes.c_int
        lib.cublasGemmEx.argtypes = [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i]
        lib.cublasGemmEx.restype = i
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
        self.one, self.zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.handles: dict[int, Any] = {}
        self.workspaces: list[Any] = []
        for st in streams:
            handle = vp()
            _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
            _check(lib.cublasSetStream_v2(handle, st.ptr), "cublasSetStream")
            # after setStream, which resets the workspace to cuBLAS's own (allocated in capture)
            ws = cp.empty(WORKSPACE_BYTES, dtype=cp.uint8)
            _check(lib.cublasSetWorkspace_v2(handle, ws.data.ptr, ws.nbytes), "cublasSetWorkspace")
            self.handles[st.ptr] = handle
            self.workspaces.append(ws)

    def gemm(self, stream: Any, a: Any, ta: bool, b: Any, tb: bool, c: Any) -> None:
        """``c = op(a) @ op(b)`` on ``stream`` (op transposes where ``ta``/``tb``).

        Args:
            stream: the stream whose handle runs it (one given to the constructor).
            a, b: C-contiguous 2-D operands of one dtype; c: the C-contiguous result.
        """
        m, k = (a.shape[1], a.shape[0]) if ta else a.shape
        n = b.shape[0] if tb else b.shape[1]
        assert (b.shape[1] if tb else b.shape[0]) == k and c.shape == (m, n), (a.shape, b.shape)
        assert a.flags.c_contiguous and b.flags.c_contiguous and c.flags.c_contiguous
        dt = _CUDA_TYPE[str(a.dtype)]
        # row-major c (m x n) is column-major c^T = op(b)^T op(a)^T: b goes first
        _check(self.lib.cublasGemmEx(
            self.handles[stream.ptr], int(tb), int(ta), n, m, k, ctypes.addressof(self.one),
            b.data.ptr, dt, b.shape[1], a.data.ptr, dt, a.shape[1], ctypes.addressof(self.zero),
            c.data.ptr, dt, n, _COMPUTE_32F, _GEMM_DEFAULT), "cublasGemmEx")  # fmt: skip


def kernels(cp: Any) -> dict[str, Any]:
    """The elementwise kernels, float32 arithmetic on any dtype (as our fused SGD does)."""
    ek = cp.ElementwiseKernel
    return {
        "bias_relu": ek("T z, T b", "T h", "float v = (float)z + (float)b; "
                        "h = (T)(v > 0.0f ? v : 0.0f);", "bound_bias_relu"),
        "bias": ek("T z, T b", "T o", "o = (T)((float)z + (float)b);", "bound_bias"),
        "relu_grad": ek("T g, T h", "T dz", "dz = (float)h > 0.0f ? g : (T)0.0f;",
                        "bound_relu_grad"),
        "sgd": ek("T g, float32 lr", "T p", "p = (T)((float)p - lr * (float)g);", "bound_sgd"),
        "xent": ek("raw T logits, int64 y, float32 scale, int32 ncls", "raw T dlogits", _XENT,
                   "bound_xent_grad"),
    }  # fmt: skip


def to_device(cp: Any, host: np.ndarray, dtype: Any) -> Any:
    """``host`` cast to ``dtype`` by numpy, copied as raw bytes (no cupy cast kernel)."""
    h = np.ascontiguousarray(host.astype(dtype))
    out = cp.empty(h.shape, dtype=dtype)
    out.data.copy_from_host(h.ctypes.data, h.nbytes)
    return out


def to_host(a: Any) -> np.ndarray:
    """A host copy of ``a``, raw bytes (the card idle)."""
    h = np.empty(a.shape, dtype=a.dtype)
    a.data.copy_to_host(h.ctypes.data, a.nbytes)
    return h


class Net:
    """Parameters, gradients, and 2K batches of inputs and labels, all on the GPU."""

    def __init__(self, cp: Any, dtype: Any, width: int, batch: int, batches: int, blas: Blas):
        rng = np.random.default_rng(0)
        self.cp, self.dtype, self.width, self.batch, self.blas = cp, dtype, width, batch, blas
        self.kern = kernels(cp)

        def normal(*shape: int, scale: float = 1.0) -> Any:
            return to_device(cp, rng.standard_normal(shape, dtype=np.float32) * scale, dtype)

        self.W = [normal(width, width, scale=(2 / width) ** 0.5) for _ in range(LAYERS)]
        self.b = [cp.zeros(width, dtype=dtype) for _ in range(LAYERS)]
        self.Wo, self.bo = normal(width, CLASSES, scale=width**-0.5), cp.zeros(CLASSES, dtype)
        self.params = [*self.W, *self.b, self.Wo, self.bo]
        self.dW = [cp.zeros((width, width), dtype) for _ in range(LAYERS)]
        self.db = [cp.zeros(width, dtype) for _ in range(LAYERS)]
        self.db2 = [g.reshape(1, width) for g in self.db]  # views, as products' outputs
        self.dWo, self.dbo = cp.zeros((width, CLASSES), dtype), cp.zeros(CLASSES, dtype)
        self.dbo2 = self.dbo.reshape(1, CLASSES)
        self.ones = to_device(cp, np.ones((1, batch), np.float32), dtype)
        self.X = normal(batches, batch, width)
        self.Y = cp.asarray(rng.integers(0, CLASSES, (batches, batch)).astype(np.int64))
        self.init = [cp.empty_like(p) for p in self.params]
        for p, q in zip(self.init, self.params, strict=True):
            p.data.copy_from_device(q.data, q.nbytes)

    def reset(self) -> None:
        """Parameters back to their initial values (the card idle before and after)."""
        self.cp.cuda.Device().synchronize()
        for p, q in zip(self.params, self.init, strict=True):
            p.data.copy_from_device(q.data, q.nbytes)
        self.cp.cuda.Device().synchronize()

    def snapshot(self) -> list[np.ndarray]:
        """Host copies of the parameters once the card is idle."""
        self.cp.cuda.Device().synchronize()
        return [to_host(p) for p in self.params]


class Plan:
    """The layers split in ``stages`` (the last one also holds the head and the loss), with
    activations in ``stages`` key slots (a stage has at most that many keys in flight) and
    scratch per stage. ``independent``: each stage reads private inputs and output gradients
    and writes a private input gradient, so no stage waits on or races with another (D)."""

    def __init__(self, net: Net, stages: int, independent: bool) -> None:
        cp, B, W, dt = net.cp, net.batch, net.width, net.dtype
        self.net, self.S, self.independent = net, stages, independent
        self.groups = [list(range(s * LAYERS // stages, (s + 1) * LAYERS // stages))
                       for s in range(stages)]  # fmt: skip

        rng = np.random.default_rng(1)

        def slots(fill: bool = False) -> list[Any]:
            if fill:  # D's private inputs and gradients: values like the real ones
                return [to_device(cp, np.abs(rng.standard_normal((B, W), dtype=np.float32)), dt)
                        for _ in range(self.S)]  # fmt: skip
            return [cp.zeros((B, W), dtype=dt) for _ in range(self.S)]

        self.act = [slots() for _ in range(LAYERS)]  # each layer's ReLU output, per slot
        self.gact = {self.groups[s][-1]: slots() for s in range(stages - 1)}  # grads across
        self.z, self.gh, self.dz = ([cp.zeros((B, W), dt) for _ in range(stages)] for _ in "zgd")
        self.zlog, self.logits, self.dlogits = (cp.zeros((B, CLASSES), dt) for _ in "zld")
        if independent:
            self.pin = {s: slots(True) for s in range(1, stages)}
            self.pgout = {s: slots(True) for s in range(stages - 1)}
            self.pgin = {s: slots() for s in range(1, stages)}

    def inp(self, s: int, k: int) -> Any:
        """Stage ``s``'s input for key ``k``."""
        if s == 0:
            return self.net.X[k]
        if self.independent:
            return self.pin[s][k % self.S]
        return self.act[self.groups[s][0] - 1][k % self.S]

    def forward(self, s: int, k: int, st: Any, mm_only: bool = False) -> None:
        """Stage ``s``'s forward of key ``k`` on ``st`` (the last stage: and the loss
        gradient); ``mm_only``: its products alone."""
        n, kern, slot = self.net, self.net.kern, k % self.S
        x = self.inp(s, k)
        with st:
            for l in self.groups[s]:
                n.blas.gemm(st, x, False, n.W[l], False, self.z[s])
                if not mm_only:
                    kern["bias_relu"](self.z[s], n.b[l], self.act[l][slot])
                x = self.act[l][slot]
            if s == self.S - 1:
                n.blas.gemm(st, x, False, n.Wo, False, self.zlog)
                if not mm_only:
                    kern["bias"](self.zlog, n.bo, self.logits)
                    kern["xent"](self.logits, n.Y[k], 1.0 / n.batch, CLASSES, self.dlogits)

    def backward(self, s: int, k: int, st: Any, mm_only: bool = False) -> None:
        """Stage ``s``'s backward of key ``k`` on ``st``: its parameters' gradients and (but
        on stage 0) the gradient of its input."""
        n, kern, slot, group = self.net, self.net.kern, k % self.S, self.groups[s]
        with st:
            if s == self.S - 1:
                h = self.act[LAYERS - 1][slot]
                n.blas.gemm(st, h, True, self.dlogits, False, n.dWo)
                n.blas.gemm(st, n.ones, False, self.dlogits, False, n.dbo2)
                n.blas.gemm(st, self.dlogits, False, n.Wo, True, self.gh[s])
                g = self.gh[s]
            else:
                g = (self.pgout[s] if self.independent else self.gact[group[-1]])[slot]
            for l in reversed(group):
                if not mm_only:
                    kern["relu_grad"](g, self.act[l][slot], self.dz[s])
                x = self.act[l - 1][slot] if l > group[0] else self.inp(s, k)
                n.blas.gemm(st, x, True, self.dz[s], False, n.dW[l])
                n.blas.gemm(st, n.ones, False, self.dz[s], False, n.db2[l])
                if l > 0:  # no input gradient for the first layer
                    if l > group[0]:
                        g = self.gh[s]
                    else:
                        g = (self.pgin[s] if self.independent else self.gact[l - 1])[slot]
                    n.blas.gemm(st, self.dz[s], False, n.W[l], True, g)

    def update(self, s: int, st: Any) -> None:
        """SGD on stage ``s``'s parameters, in place, one kernel per parameter."""
        n, sgd = self.net, self.net.kern["sgd"]
        with st:
            for l in self.groups[s]:
                sgd(n.dW[l], LR, n.W[l])
                sgd(n.db[l], LR, n.b[l])
            if s == self.S - 1:
                sgd(n.dWo, LR, n.Wo)
                sgd(n.dbo, LR, n.bo)


def issue(plan: Plan, order: list[Op], streams: list[Any], events: dict[Op, Any],
          what: str = "all") -> None:  # fmt: skip
    """Issues ``order`` on ``streams`` (stage s on ``streams[s]``); with ``events``, a forward
    waits for the previous stage's forward of its key, a backward for the next stage's
    backward. ``what``: "all", "mm" (products alone) or "update" (updates alone)."""
    last = plan.S - 1
    for kind, s, k in order:
        st = streams[s]
        if kind == "F":
            if what == "update":
                continue
            if events and s > 0:
                st.wait_event(events["F", s - 1, k])
            plan.forward(s, k, st, what == "mm")
            if events and s < last:
                st.record(events["F", s, k])
        else:
            if events and s < last:
                st.wait_event(events["B", s + 1, k])
            if what != "update":
                plan.backward(s, k, st, what == "mm")
            # the input gradient goes upstream before the update, as an actor sends it (the
            # update writes only this stage's weights, which no other stage reads)
            if events and s > 0:
                st.record(events["B", s, k])
            if what != "mm":
                plan.update(s, st)  # right after its backward, on its stream


def run(cp: Any, origin: Any, side: list[Any], body: Callable[[], None], capture: bool) -> Any:
    """``body``'s work forked from ``origin`` to the ``side`` streams and joined back: captured
    into one CUDA graph (returned), else run now (returns None once the card is idle)."""
    fork = cp.cuda.Event(disable_timing=True)
    joins = [cp.cuda.Event(disable_timing=True) for _ in side]
    if capture:
        origin.begin_capture()
    try:
        origin.record(fork)
        for st in side:
            st.wait_event(fork)  # joins the capture
        body()
        for st, ev in zip(side, joins, strict=True):
            st.record(ev)
            origin.wait_event(ev)
    except BaseException:
        if capture:
            with contextlib.suppress(Exception):
                origin.end_capture()
        raise
    if capture:
        return origin.end_capture()
    cp.cuda.Device().synchronize()
    return None


def seconds_per_launch(cp: Any, graph: Any, stream: Any, seconds: float) -> float:
    """Wall seconds per replay of ``graph`` on ``stream``, over about ``seconds`` of replays
    (launches back to back, the card synchronized before and after)."""
    sync = cp.cuda.Device().synchronize

    def launch() -> None:
        graph.launch(stream)

    one = _common.seconds_per_call(launch, 1, sync=sync)  # (its warm-up launch uploads it)
    n = max(1, round(seconds / max(one, 1e-6)))
    return _common.seconds_per_call(launch, n, sync=sync, warmup=0)


def copy_rate(cp: Any, stream: Any, repeats: int) -> float:
    """Bytes per second the card moves in a 1 GiB device-to-device copy (read and write
    counted), the median of ``repeats``: what a memory-bound pass can reach here."""
    n = 1 << 30
    src, dst = cp.empty(n, dtype=cp.uint8), cp.empty(n, dtype=cp.uint8)
    rates = []
    with stream:
        cp.copyto(dst, src)  # (warm)
        for _ in range(max(1, repeats)):
            stream.synchronize()
            t = time.perf_counter()
            cp.copyto(dst, src)
            stream.synchronize()
            rates.append(2 * n / (time.perf_counter() - t))
    del src, dst
    return float(np.median(rates))


def resolve_dtype(cp: Any, name: str, blas: Blas, stream: Any) -> Any:
    """``name``'s numpy dtype once a small product and two kernels ran in it (bfloat16 falls
    back to float16 when they fail)."""
    try:
        if name == "bfloat16":
            import ml_dtypes  # noqa: F401 - teaches numpy the name "bfloat16"
        dt = np.dtype(name)
        kern = kernels(cp)
        x, w = (to_device(cp, np.ones(s, np.float32), dt) for s in ((8, 16), (16, 16)))
        b = to_device(cp, np.full(16, -1.0, np.float32), dt)
        z, h = cp.zeros((8, 16), dt), cp.zeros((8, 16), dt)
        blas.gemm(stream, x, False, w, False, z)
        with stream:
            kern["bias_relu"](z, b, h)
            kern["sgd"](h, 0.5, z)  # 16 - 0.5 * 15
        stream.synchronize()
        got = (to_host(h).astype(np.float32), to_host(z).astype(np.float32))
        if not (np.all(got[0] == 15.0) and np.all(got[1] == 8.5)):
            raise RuntimeError(f"probe gave {got[0].flat[0]}, {got[1].flat[0]} (15, 8.5)")
        return dt
    except Exception as exc:
        if name != "bfloat16":
            raise
        print(f"note: bfloat16 failed ({type(exc).__name__}: {exc}); using float16 instead")
        return resolve_dtype(cp, "float16", blas, stream)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--keys", type=int, default=32, help="K: keys per graph (and 2K)")
    ap.add_argument("--stages", type=int, default=4, help=f"1 to {LAYERS}")
    ap.add_argument("--repeats", type=int, default=5, help="timings per graph (median)")
    ap.add_argument("--seconds", type=float, default=0.3, help="replay time per timing")
    ap.add_argument("--out", default="runs/bench_gpu_bound.json")
    args = ap.parse_args()
    if not 1 <= args.stages <= LAYERS or min(args.batch, args.width, args.keys) < 1:
        ap.error(f"--stages must be 1 to {LAYERS}; --batch, --width, --keys at least 1")
    cp = _common.need_cupy("bench_gpu_bound.py")

    S, K, B = args.stages, args.keys, args.batch
    origin = cp.cuda.Stream(non_blocking=True)  # captures; A, C and the bounds run on it
    stage = [cp.cuda.Stream(non_blocking=True) for _ in range(S)]
    blas = Blas(cp, [origin, *stage])
    dtype = resolve_dtype(cp, args.dtype, blas, origin)
    card = _common.card_name()
    print(f"card: {card}; {dtype} batch {B} width {args.width}, {S} stages, K = {K} keys")
    net = Net(cp, dtype, args.width, B, 2 * K, blas)
    sync_plan, pipe, ind = Plan(net, 1, False), Plan(net, S, False), Plan(net, S, True)

    def make(name: str, keys: int) -> tuple[Callable[[], None], list[Any]]:
        if name in ("A", "products", "updates"):  # a sync step per key: 1 stage, 1 stream
            order = [(kind, 0, k) for k in range(keys) for kind in "FB"]
            what = {"A": "all", "products": "mm", "updates": "update"}[name]
            return (lambda: issue(sync_plan, order, [origin], {}, what)), []
        if name == "D":
            order = [(kind, s, k) for k in range(keys) for s in range(S) for kind in "FB"]
            return (lambda: issue(ind, order, stage, {})), stage
        order = issue_order(one_f_one_b(S, keys))
        if name == "C":
            return (lambda: issue(pipe, order, [origin] * S, {})), []
        events = {op: cp.cuda.Event(disable_timing=True) for op in order}
        return (lambda: issue(pipe, order, stage, events)), stage

    def guarded(name: str) -> tuple[Any, list[np.ndarray], list[np.ndarray]]:
        body, side = make(name, K)
        net.reset()
        run(cp, origin, side, body, False)
        eager = net.snapshot()
        net.reset()
        graph = run(cp, origin, side, body, True)
        graph.launch(origin)
        return graph, eager, net.snapshot()

    def compare(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
        diff = max(float(np.max(np.abs(x.astype(np.float32) - y.astype(np.float32))))
                   for x, y in zip(a, b, strict=True))  # fmt: skip
        same = all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
        return {"max_abs_diff": diff, "bit_equal": same}

    graphs: dict[tuple[str, int], Any] = {}
    graphs["A", K], a_eager, a_graph = guarded("A")
    graphs["B", K], b_eager, b_graph = guarded("B")
    graphs["C", K], _, c_graph = guarded("C")
    checks = {"A graph vs A eager": compare(a_eager, a_graph),
              "B graph vs B eager": compare(b_eager, b_graph),
              "C graph (1 stream) vs B eager": compare(b_eager, c_graph)}  # fmt: skip
    del a_eager, a_graph, b_eager, b_graph, c_graph
    for label, c in checks.items():
        print(f"check, {K} keys from the same parameters: {label}: max |diff| "
              f"{c['max_abs_diff']:.3g}, bit-equal {c['bit_equal']}")  # fmt: skip
    names = ["A", "B", "C", "D", "products", "updates"]
    for name in names:
        for keys in (K, 2 * K):
            if (name, keys) not in graphs:
                body, side = make(name, keys)
                run(cp, origin, side, body, False)  # compiles and loads what the graph runs
                graphs[name, keys] = run(cp, origin, side, body, True)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in graphs}
    for _ in range(args.repeats):  # interleaved: drifts of the card touch every row alike
        for key, graph in graphs.items():
            times[key].append(seconds_per_launch(cp, graph, origin, args.seconds))
    labels = {"A": "A sync, 1 stream", "B": f"B async 1F1B, {S} streams",
              "C": "C B's order, 1 stream", "D": f"D {S} streams, independent",
              "products": "A's products alone", "updates": "A's SGD updates alone"}  # fmt: skip
    med = {key: float(np.median(v)) for key, v in times.items()}
    # (a nonpositive difference, a noisy card, reads as NaN rather than a huge rate)
    steady = {n: (med[n, 2 * K] - med[n, K]) / K for n in names}
    steady = {n: t if t > 0 else float("nan") for n, t in steady.items()}
    print(f"{'configuration':<28} {'ms/key K':>9} {'ms/key 2K':>10} {'steady ms':>10} "
          f"{'samples/s':>10} {'x A':>6}   (median of {args.repeats}; "
          "steady: (t(2K)-t(K))/K)")  # fmt: skip
    rows = []
    for n in names:
        row = {"config": labels[n], "ms_per_key_K": med[n, K] / K * 1e3,
               "ms_per_key_2K": med[n, 2 * K] / (2 * K) * 1e3, "steady_ms": steady[n] * 1e3,
               "samples_per_s": B / steady[n], "x_sync": steady["A"] / steady[n],
               "runs_ms_K": [t * 1e3 for t in times[n, K]],
               "runs_ms_2K": [t * 1e3 for t in times[n, 2 * K]]}  # fmt: skip
        rows.append(row)
        print(f"{labels[n]:<28} {row['ms_per_key_K']:9.3f} {row['ms_per_key_2K']:10.3f} "
              f"{row['steady_ms']:10.3f} {row['samples_per_s']:10.0f} "
              f"{row['x_sync']:6.2f}")  # fmt: skip
    W, item = args.width, np.dtype(dtype).itemsize
    flops = 2.0 * B * (LAYERS * 3 * W * W - W * W + 3 * W * CLASSES + LAYERS * W + CLASSES)
    params = LAYERS * (W * W + W) + W * CLASSES + CLASSES
    update_bytes = 3 * item * params  # read p, g; write p
    tflops, gbps = flops / steady["products"] / 1e12, update_bytes / steady["updates"] / 1e9
    print(f"products: {tflops:.1f} TFLOP/s, {steady['products'] / steady['A']:.0%} of A's step; "
          f"updates: {gbps:.0f} GB/s, "
          f"{steady['updates'] / steady['A']:.0%} of A's step")  # fmt: skip
    # the memory traffic of a key under any schedule that updates at every key: the forward's
    # products read every weight, the input gradients' every weight matrix but the first;
    # then either the weight gradients go through memory (written, read back by the update
    # with the weights, the weights written: what the runtime does) or the update is fused
    # into the weight gradient's product (C = W, alpha = -lr, beta = 1: each weight read and
    # written once more). Activations (about 3% here) are left out, and the L2 cache (50 MB on
    # an H100) may keep a layer between two reads: lower bounds of the traffic, over the card's
    # copy rate (which read-mostly traffic may exceed a little)
    mats = (LAYERS - 1) * W * W + W * CLASSES  # the matrices an input gradient reads
    stored = item * (params + mats + params + 3 * params)
    fused = item * (params + mats + 2 * params)
    rate = copy_rate(cp, origin, args.repeats)
    for label, traffic in (("gradients through memory", stored), ("update fused", fused)):
        print(f"traffic per key, {label}: {traffic / 1e6:.0f} MB, at the card's copy rate "
              f"({rate / 1e9:.0f} GB/s, a 1 GiB device copy) {traffic / rate * 1e3:.3f} ms, "
              f"{steady['A'] * rate / traffic:.2f}x A's step here")  # fmt: skip
    best = max(rows[1:4], key=lambda r: r["x_sync"])
    print(f"2x target: B reaches {rows[1]['x_sync']:.2f}x A; best of B, C, D "
          f"{best['x_sync']:.2f}x ({best['config']})")  # fmt: skip
    report = {"card": card, "dtype": str(dtype), "batch": B, "width": W, "stages": S,
              "keys": K, "repeats": args.repeats, "lr": LR, "checks": checks, "rows": rows,
              "products_tflops": tflops, "updates_gb_per_s": gbps,
              "traffic_bytes_per_key": {"stored": stored, "fused": fused},
              "copy_bytes_per_s": rate}  # fmt: skip
    _common.write_json(args.out, report)


if __name__ == "__main__":
    main()
