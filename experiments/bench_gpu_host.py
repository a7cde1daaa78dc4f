"""Where an eager GPU step's host time goes: microseconds of host time a call of each kernel that
an eager `Sync` step of ``bench_gpu.py``'s MLP launches, with the cheaper spellings beside the
ones they replaced (an eager step on a GPU is bound by its launches from Python).

Each op runs on its own arrays of the step's shapes (activations (batch, 4096), weights (4096,
4096), ten classes), on a non-blocking stream as an actor's would, in rounds of ``--calls``
calls, the stream synchronised between rounds and never inside one; the table gives the
fastest round and the median one, in microseconds of host time a call. Host times on a shared
machine move by tens of percent from one run to the next: compare rows of one run only.

Run: python experiments/bench_gpu_host.py [--dtypes float32,bfloat16] [--batch 1024]
[--calls 50] [--rounds 5] (writes runs/bench_gpu_host.json)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import asyncnn as ann  # noqa: E402

WIDTH = 4096
CLASSES = 10


def host_microseconds(fn: Callable[[], Any], stream: Any, calls: int, rounds: int) -> list[float]:
    """Host microseconds a call of ``fn``, one figure per round of ``calls`` calls."""
    fn()
    stream.synchronize()
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls * 1e6)
        stream.synchronize()  # the queue drained between rounds, so no launch waits for room
    return out


def cases(dtype: str, batch: int) -> list[tuple[str, Callable[[], Any]]]:
    """The ops of an eager step, by name, on arrays of its shapes (made on the current
    stream); where the runtime replaced a spelling, both are listed, the old one marked."""
    import cupy as cp

    backend = ann.backends.get_backend("cuda:0")
    fused = backend.fused_nn_kernels()
    dt = backend.dtype(dtype)
    cp.random.seed(0)

    def rand(*shape: int) -> Any:
        return cp.random.standard_normal(shape, dtype=cp.float32)

    x, g, w, b = (
        rand(*s).astype(dt) for s in ((batch, WIDTH), (batch, WIDTH), (WIDTH, WIDTH), (WIDTH,))
    )
    x32, logits, rows = rand(batch, WIDTH), rand(batch, CLASSES), rand(batch)
    labels = cp.random.randint(0, CLASSES, batch)
    gf = cp.asfortranarray(g)
    zero = cp.zeros((), dt)
    trivial_raw = cp.RawKernel('extern "C" __global__ void k(float* a) {}', "k")
    trivial_elementwise = cp.ElementwiseKernel("T x", "T y", "y = x", "asyncnn_trivial")
    small = cp.zeros(32, cp.float32)
    half = dt.itemsize == 2
    out: list[tuple[str, Callable[[], Any]]] = [
        ("product x @ W", lambda: x @ w),
        ("product g @ W.T", lambda: g @ w.T),
        ("product x.T @ g", lambda: x.T @ g),
        ("bias add", lambda: x + b),
        ("ReLU, one kernel (now)", lambda: fused.relu(x)),
        ("ReLU, maximum with a zero (before)", lambda: cp.maximum(x, cp.zeros((), dt) if half else 0)),
        ("  of which the zero array", lambda: cp.zeros((), dt)),
        ("  maximum with a kept zero", lambda: cp.maximum(x, zero if half else 0)),
        ("ReLU gradient, one kernel", lambda: fused.relu_grad(g, x)),
        ("cross-entropy rows, one kernel", lambda: fused.cross_entropy_rows(logits, labels, cp.float32)),
        ("loss mean, one raw kernel (now)", lambda: fused.reduce_losses(rows, "mean")),
        ("loss mean, cupy's mean (before)", lambda: rows.mean()),
        ("cast of the batch from float32", lambda: x32.astype(dt)),
        ("empty_like (an output)", lambda: cp.empty_like(x)),
        ("trivial raw kernel", lambda: trivial_raw((1,), (32,), (small,))),
        ("trivial elementwise kernel", lambda: trivial_elementwise(small)),
    ]  # fmt: skip
    if half:
        out[9:9] = [
            ("bias gradient, raw column kernel (now)", lambda: fused.half_sum(g, (0,), False)),
            # not C-contiguous: the reduction kernel every bias gradient took before
            ("bias gradient, reduction kernel (before)", lambda: fused.half_sum(gf, (0,), False)),
        ]
    else:
        out[9:9] = [("bias gradient, cupy's sum", lambda: g.sum(axis=0))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=50, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="runs/bench_gpu_host.json")
    args = ap.parse_args()
    cp = _common.need_cupy("bench_gpu_host.py")

    card = _common.card_name()
    report: dict[str, Any] = {"card": card, "batch": args.batch, "rows": []}
    print(f"card: {card}; host microseconds a call (fastest round / median round), batch "
          f"{args.batch}, {args.rounds} rounds of {args.calls} calls")  # fmt: skip
    stream = cp.cuda.Stream(non_blocking=True)
    for dtype in [d for d in args.dtypes.split(",") if d]:
        print(f"{dtype}:")
        with stream:
            for name, fn in cases(dtype, args.batch):
                times = host_microseconds(fn, stream, args.calls, args.rounds)
                best, median = min(times), statistics.median(times)
                report["rows"].append(
                    {"dtype": dtype, "op": name, "best_us": best, "median_us": median}
                )
                print(f"   {name:<42} {best:7.1f} {median:7.1f}", flush=True)
    _common.write_json(args.out, report)


if __name__ == "__main__":
    main()
