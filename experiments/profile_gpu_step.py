"""Where a GPU training step spends its time: matmuls, the plain loop over value_and_grad with
the data already on the device, and one host-to-device copy of a 16 MB batch; with
``--kernels``, the GPU kernels of steady `Sync` steps (eager and with CUDA graphs) and of
PyTorch eager steps, as PyTorch's profiler (CUPTI) sees them, which records cupy's kernels too.

Run on a CUDA machine: python experiments/profile_gpu_step.py [--kernels float32:1024,...]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import cupy as cp
import numpy as np

import asyncnn as ann
from asyncnn import nn, optim

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402
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


def kernels(dtype: str, batch: int, steps: int = 10) -> None:
    """Prints the GPU kernels of ``steps`` steady steps: asyncnn eager, with graphs, torch."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    class Window:  # the enable/disable hooks of the bench's step loops, around the timed steps
        def __init__(self) -> None:
            self.prof = torch_profile(activities=[ProfilerActivity.CUDA])

        def enable(self) -> None:
            self.prof.start()

        def disable(self) -> None:
            self.prof.stop()

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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernels", default="", help="dtype:batch,... to list kernels of")
    args = ap.parse_args()
    if args.kernels:
        for spec in args.kernels.split(","):
            dt, b = spec.split(":")
            kernels(dt, int(b))
    else:
        for dt in ("float32", "float16"):
            profile(dt)
