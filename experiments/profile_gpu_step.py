"""Where a GPU training step spends its time: matmuls, the plain loop over value_and_grad with
the data already on the device, and one host-to-device copy of a 16 MB batch.

Run on a CUDA machine: python experiments/profile_gpu_step.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import cupy as cp
import numpy as np

import asyncnn as ann
from asyncnn import nn, optim

WIDTH = 4096
BATCH = 1024


def timeit(f: Callable[[], Any], n: int = 10) -> float:
    """Milliseconds per call, after a warm-up, synchronising the device around the loop."""
    f()
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t) / n * 1e3


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
    mods: list[Any] = []
    for _ in range(4):
        mods += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    mods.append(nn.Linear(WIDTH, 10))
    model = nn.Sequential(*mods)
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


if __name__ == "__main__":
    for dt in ("float32", "float16"):
        profile(dt)
