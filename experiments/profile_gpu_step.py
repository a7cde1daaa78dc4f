"""Where a GPU training step spends its time: matmuls, the plain loop over value_and_grad with
the data already on the device, and one host-to-device copy of a 16 MB batch; with
``--kernels``, the GPU kernels of steady `Sync` steps (eager and with CUDA graphs) and of
PyTorch eager steps, as PyTorch's profiler (CUPTI) sees them, which records cupy's kernels too.

With ``--timeline``, the GPU timeline of rows of ``bench_gpu.py``'s section 3 (several actors
on one GPU, each on its own stream): every kernel and device copy on the device clock, written
as a Chrome trace (a row per stream; open it in https://ui.perfetto.dev), and the overlap
measured from it: the work's summed time against the time at least one piece runs (their
union), and the share of the span from the first piece to the last that the card is busy.
``--host-profile`` gives the same rows' host time by function (cProfile), and
``--matmul-rows`` the card's rate for one layer's products at the row counts microbatches give.
``--own-timeline`` traces the same rows with asyncnn's own trace (its "device" events: each
actor's work on the card's clock), prints the trace's cost per step and the overlap that
``asyncnn trace summary`` reads from it, and writes the Chrome export (a device row per actor).

Run on a CUDA machine: python experiments/profile_gpu_step.py [--kernels float32:1024,...]
[--timeline bfloat16:64 --rows 0,9 --out runs/] [--matmul-rows float32,bfloat16]
[--host-profile bfloat16:64 --rows 1,2,9] [--own-timeline bfloat16:64 --rows 0,9,10]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn, optim

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

cp: Any = None  # cupy: imported once the flags are read (--help needs no GPU)
import bench_gpu  # noqa: E402
from bench_gpu import WIDTH  # noqa: E402

BATCH = 1024


def timeit(f: Callable[[], Any], n: int = 10) -> float:
    """Milliseconds per call, after a warm-up, synchronising the device around the loop."""
    return 1e3 * _common.seconds_per_call(f, n, sync=lambda: cp.cuda.Device().synchronize())


def profile(dtype: str) -> None:
    a = cp.random.standard_normal((BATCH, WIDTH)).astype(dtype)
    w = cp.random.standard_normal((WIDTH, WIDTH)).astype(dtype)
    print(
        dtype,
        "x@w ms",
        round(timeit(lambda: a @ w), 3),
        "x.T@x ms",
        round(timeit(lambda: a.T @ a), 3),
    )
    model = nn.Sequential(*bench_gpu.mlp())
    opt = optim.SGD(lr=1e-3)
    state = {"p": model.init(0, backend="cuda:0", dtype=dtype)}
    state["s"] = opt.init(state["p"])
    y = cp.asarray(np.random.default_rng(0).integers(0, 10, BATCH))
    vg = ann.value_and_grad(lambda q: nn.CrossEntropyLoss()({}, model(q, a), y))

    def step() -> None:
        _, g = vg(state["p"])
        state["p"], state["s"] = opt.update(state["p"], g, state["s"])

    print(dtype, "plain loop step ms", round(timeit(step), 2))
    print(dtype, "forward ms", round(timeit(lambda: model(state["p"], a)), 2))
    host = np.ones((BATCH, WIDTH), np.float32)
    print("host->device 16 MB ms", round(timeit(lambda: cp.asarray(host)), 2))


def matmul_by_rows(dtype: str) -> None:
    """The card's rate for the products of one layer of width WIDTH at the row counts a
    microbatch gives (a pipeline of M microbatches multiplies M times fewer rows at a time)."""
    dt = ann.backends.get_backend("cuda:0").dtype(dtype)  # (bfloat16: ml_dtypes')
    for rows in (1024, 256, 64, 16):
        a = cp.random.standard_normal((rows, WIDTH)).astype(np.float32).astype(dt)
        w = cp.random.standard_normal((WIDTH, WIDTH)).astype(np.float32).astype(dt)
        flops = 2.0 * rows * WIDTH * WIDTH
        for name, f in (("x@w", lambda a=a, w=w: a @ w), ("g@w.T", lambda a=a, w=w: a @ w.T),
                        ("x.T@g", lambda a=a: a.T @ a)):  # fmt: skip
            ms = timeit(f, 50)
            print(f"{dtype} rows {rows:5d} {name:6s} {ms * 1e3:8.1f} us "
                  f"{flops / (ms * 1e-3) / 1e12:7.1f} TFLOP/s")  # fmt: skip


class Window:
    """PyTorch's profiler of the GPU (CUPTI), as the enable/disable hooks that the bench's step
    loops call around the timed steps."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        self.prof = torch_profile(activities=[ProfilerActivity.CUDA])

    def enable(self) -> None:
        self.prof.start()

    def disable(self) -> None:
        self.prof.stop()


def kernels(dtype: str, batch: int, steps: int = 10) -> None:
    """Prints the GPU kernels of ``steps`` steady steps: asyncnn eager, with graphs, torch."""
    import torch

    def show(label: str, run: Callable[[Window], float]) -> None:
        window = Window()
        per_step = run(window)
        prof = window.prof
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        gpu_us = sum(e.device_time_total for e in events) / steps
        print(f"--- {label}: {per_step * 1e3:.3f} ms per step, kernels {gpu_us / 1e3:.3f} ms "
              f"per step (sum of kernel times), {sum(e.count for e in events) / steps:.0f} "
              "kernels per step")  # fmt: skip
        for e in sorted(events, key=lambda e: -e.device_time_total)[:14]:
            print(f"   {e.device_time_total / steps:9.1f} us  x{e.count / steps:5.1f}  "
                  f"{e.key[:110]}")  # fmt: skip

    for graphs in (False, True):
        show(
            f"asyncnn Sync {dtype} batch {batch} cuda_graphs={graphs}",
            lambda w, g=graphs: bench_gpu.steady_step(batch, dtype, steps, g, w),
        )
    show(
        f"torch eager {dtype} batch {batch}",
        lambda w: bench_gpu.torch_step(batch, dtype, steps, w),
    )
    torch.cuda.synchronize()


def busy_union(spans: list[tuple[float, float]]) -> float:
    """The time covered by at least one of ``spans`` ((start, end) pairs)."""
    total, end = 0.0, -math.inf
    for s, e in sorted(spans):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def host_profile(dtype: str, batch: int, rows: list[int], steps: int = 60) -> None:
    """Where the host time of steady steps of section 3's ``rows`` goes (cProfile, by own
    time): at small batches the host, not the card, bounds a step of several actors."""
    for index in rows:
        label, policy, stages, graphs = bench_gpu.PIPELINE_ROWS[index]
        bench_gpu.profile_step(dtype, batch, steps, policy, stages, (graphs,), label)


#: the Chrome trace categories of the device's own work (PyTorch's profiler, Kineto)
_DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def timeline(dtype: str, batch: int, rows: list[int], out: str, steps: int = 20) -> None:
    """Writes the GPU timeline of each of section 3's ``rows`` (indices into
    ``bench_gpu.PIPELINE_ROWS``) to ``out`` and prints how much the actors' kernels overlap."""
    import json

    os.makedirs(out, exist_ok=True)
    for index in rows:
        label, policy, stages, graphs = bench_gpu.PIPELINE_ROWS[index]
        window = Window()
        per_step = bench_gpu.steady_step(batch, dtype, steps, graphs, window, policy, stages)
        prof = window.prof
        name = "".join(c if c.isalnum() else "_" for c in f"{dtype}_{batch}_{label}")
        path = os.path.join(out, f"timeline_{name}.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
        # kernels, and the device's copies and fills (the graphs' input loads, a stash's
        # weight copy, the outputs copied out): all of it is the card's work
        work = [e for e in trace.get("traceEvents", []) if e.get("cat") in _DEVICE_WORK]
        spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in work]
        copies = sum(float(e["dur"]) for e in work if e.get("cat") != "kernel")
        streams = sorted({e.get("args", {}).get("stream") for e in work}, key=str)
        summed = sum(e - s for s, e in spans)
        union = busy_union(spans)
        span = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else math.nan
        print(f"--- {dtype} batch {batch} {label}: {per_step * 1e3:.3f} ms per step; device "
              f"work {summed / steps / 1e3:.3f} ms per step summed (copies and fills "
              f"{copies / steps / 1e3:.3f}), {union / steps / 1e3:.3f} ms busy (union): "
              f"overlap {summed / union if union else math.nan:.2f}x, busy "
              f"{union / span if span else math.nan:.0%} of the span from the first to the "
              f"last; {len(work) / steps:.0f} kernels and copies per step on {len(streams)} "
              f"streams; timeline: {path}")  # fmt: skip


def own_timeline(dtype: str, batch: int, rows: list[int], out: str, steps: int = 20) -> None:
    """Each of section 3's ``rows`` traced by asyncnn itself: the step time with and without
    the trace (its cost), the overlap of the actors' work on the card from the trace's
    "device" events (``asyncnn trace summary``), and the Chrome export with a device row per
    actor."""
    os.makedirs(out, exist_ok=True)
    for index in rows:
        label, policy, stages, graphs = bench_gpu.PIPELINE_ROWS[index]
        name = "".join(c if c.isalnum() else "_" for c in f"{dtype}_{batch}_{label}")
        path = os.path.join(out, f"trace_{name}.trace")
        plain = bench_gpu.steady_step(batch, dtype, steps, graphs, None, policy, stages)
        traced = bench_gpu.steady_step(batch, dtype, steps, graphs, None, policy, stages, path)
        counts = ann.trace.to_chrome(path, path.replace(".trace", ".json"))
        use = ann.trace.summary(path)["devices"]
        overlap = ", ".join(
            f"{d}: {u['overlap']:.2f} actors at once, busy {u['active_seconds']:.3f} s"
            for d, u in use.items()
        )
        print(f"--- {dtype} batch {batch} {label}: {plain * 1e3:.3f} ms per step, traced "
              f"{traced * 1e3:.3f} ({traced / plain:.2f}x); whole run (warm-up included) "
              f"{overlap}; {counts['device_slices']} device slices; {path}")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernels", default="", help="dtype:batch,... to list kernels of")
    ap.add_argument("--timeline", default="", help="dtype:batch of section 3 rows to draw")
    ap.add_argument("--rows", default="0,1,9", help="indices of PIPELINE_ROWS (--timeline, "
                    "--host-profile)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs", help="--timeline: the folder of the traces")
    ap.add_argument("--matmul-rows", default="", help="dtypes to time the products by rows of")
    ap.add_argument("--host-profile", default="", help="dtype:batch of section 3 rows to profile")
    ap.add_argument("--own-timeline", default="", help="dtype:batch of section 3 rows to trace "
                    "with asyncnn's own device events")  # fmt: skip
    args = ap.parse_args()
    cp = _common.need_cupy("profile_gpu_step.py")
    if args.matmul_rows:
        for dt in args.matmul_rows.split(","):
            matmul_by_rows(dt)
    elif args.host_profile:
        dt, b = args.host_profile.split(":")
        host_profile(dt, int(b), [int(r) for r in args.rows.split(",")], args.steps)
    elif args.own_timeline:
        dt, b = args.own_timeline.split(":")
        own_timeline(dt, int(b), [int(r) for r in args.rows.split(",")], args.out, args.steps)
    elif args.timeline:
        dt, b = args.timeline.split(":")
        timeline(dt, int(b), [int(r) for r in args.rows.split(",")], args.out, args.steps)
    elif args.kernels:
        for spec in args.kernels.split(","):
            dt, b = spec.split(":")
            kernels(dt, int(b))
    else:
        for dt in ("float32", "float16"):
            profile(dt)
