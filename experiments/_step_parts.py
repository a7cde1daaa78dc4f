"""``bench_parallel.py``'s look inside one step of the MLP: whether the team's split products
equal the uncut single-threaded ones bit for bit (:func:`bit_identity`), what the step's
products and large elementwise passes take alone (:func:`breakdown`), the BLAS libraries
loaded (:func:`blas_info`), and OpenBLAS's kernels on this host (:func:`blas_kernels`,
``--blas-kernels``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import _common
import numpy as np
from _mlp_references import cores, relu_grad, sgd_update

from asyncnn.backends import ComputeTeam, acc_sum, elementwise, matmul, using_team


def blas_info() -> list[dict[str, Any]]:
    from threadpoolctl import threadpool_info

    keep = ("user_api", "internal_api", "version", "architecture", "num_threads", "threading_layer")
    return [{k: lib.get(k) for k in keep} for lib in threadpool_info()]


#: a child's 2048^2 float32 product on every core: its best of 5 in GFLOP/s, and the kernel
#: threadpoolctl reports for OpenBLAS
_GEMM_PROBE = """
import json, time
import numpy as np
from threadpoolctl import threadpool_info
a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
a @ a
best = 1e9
for _ in range(5):
    t = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t)
kernels = [i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"]
print(json.dumps({"gflops": 2 * 2048**3 / best / 1e9, "kernel": kernels}))
"""


def blas_kernels(names: list[str]) -> dict[str, Any]:
    """The product rate under each ``OPENBLAS_CORETYPE`` in ``names`` ("" for the environment's
    own setting), each in a child process (OpenBLAS reads it once, as it loads): whether the
    host's BLAS runs the fastest kernel its CPU has (a host may force an older one)."""
    out: dict[str, Any] = {}
    for name in names:
        env = dict(os.environ)
        if name:
            env["OPENBLAS_CORETYPE"] = name
        proc = subprocess.run(
            [sys.executable, "-c", _GEMM_PROBE], env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        label = name or f"(environment: {os.environ.get('OPENBLAS_CORETYPE')})"
        if proc.returncode == 0:
            out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            out[label] = {"error": proc.stderr.strip()[-300:]}
    return out


def bit_identity(sizes: list[int], batch: int) -> dict[str, bool]:
    """Whether the team's split products equal the uncut single-threaded ones bit for bit, for
    the three products of each layer (forward, input gradient, weight gradient)."""
    rng = np.random.default_rng(1)
    out = {}
    with ComputeTeam(cores()) as team:
        for fan_in, fan_out in sorted(set(zip(sizes[:-1], sizes[1:], strict=True))):
            x = rng.standard_normal((batch, fan_in), dtype=np.float32)
            w = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
            g = rng.standard_normal((batch, fan_out), dtype=np.float32)
            for name, a, b in [("x@w", x, w), ("g@w.T", g, w.T), ("x.T@g", x.T, g)]:
                split = team.matmul(a, b)
                parts = len(team.product_plan(a.shape[0], b.shape[1], a.shape[1])[1]) - 1
                key = f"{name} {a.shape}x{b.shape} in {parts} parts"
                out[key] = bool(np.array_equal(split, a @ b))  # (the team holds one BLAS thread)
    return out


def step_products(sizes: list[int], batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The products of one SGD step of the MLP: forward, input gradient (not of the first layer)
    and weight gradient of each layer."""
    rng = np.random.default_rng(2)
    out = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        x = rng.standard_normal((batch, fan_in), dtype=np.float32)
        w = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
        g = rng.standard_normal((batch, fan_out), dtype=np.float32)
        out += [(x, w), (x.T, g)] + ([(g, w.T)] if i > 0 else [])
    return out


def breakdown(sizes: list[int], batch: int, reps: int) -> dict[str, float]:
    """ms per step of the step's products alone (GFLOP/s beside) and of its large elementwise
    passes alone: BLAS on every core, the team, and torch when installed."""
    prods = step_products(sizes, batch)
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in prods)
    h = np.random.default_rng(3).standard_normal((batch, sizes[1]), dtype=np.float32)
    bias = np.ones(sizes[1], np.float32)
    ws = [np.ones((a, b), np.float32) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]

    def passes() -> None:  # what the step does elementwise, per hidden layer and per weight
        for _ in sizes[1:-1]:
            y = elementwise(np.add, h, bias)
            y = elementwise(np.maximum, y, 0)
            elementwise(relu_grad, h, y)
            acc_sum(h, (0,))
        for w in ws:
            elementwise(sgd_update, w, w, 0.01)

    def products() -> None:
        for a, b in prods:
            matmul(a, b)

    out: dict[str, float] = {"GFLOP per step": flops / 1e9}
    out["products, BLAS on all cores (ms)"] = 1e3 * _common.seconds_per_call(products, reps)
    out["elementwise, numpy (ms)"] = 1e3 * _common.seconds_per_call(passes, reps)
    with ComputeTeam(cores()) as team, using_team(team):
        out["products, team (ms)"] = 1e3 * _common.seconds_per_call(products, reps)
        out["elementwise, team (ms)"] = 1e3 * _common.seconds_per_call(passes, reps)
    # what a pipeline of 8 microbatches does instead, on one core: the same products in 8
    # pieces of batch/8 rows, and an SGD update of every weight after each piece
    from threadpoolctl import threadpool_limits

    micro = step_products(sizes, max(1, batch // 8))
    weights = [np.ones((a, b), np.float32) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    grads = [np.full_like(w, 1e-3) for w in weights]

    def microbatches() -> None:
        for _ in range(8):
            for a, b in micro:
                a @ b

    def update() -> None:  # as SGD does on the CPU: new arrays (a stash may hold the old ones)
        for w, g in zip(weights, grads, strict=True):
            d = np.multiply(g, -0.01)
            d += w

    def team_microbatches() -> None:
        for _ in range(8):
            for a, b in micro:
                matmul(a, b)

    def team_update() -> None:
        for w, g in zip(weights, grads, strict=True):
            elementwise(sgd_update, w, g, 0.01)

    with ComputeTeam(cores()) as team, using_team(team):
        out["products of 8 microbatches, team (ms)"] = 1e3 * _common.seconds_per_call(
            team_microbatches, reps
        )
        out["SGD update of every weight, team (ms)"] = 1e3 * _common.seconds_per_call(
            team_update, reps
        )
    with threadpool_limits(1):
        out["products, 1 thread (ms)"] = 1e3 * _common.seconds_per_call(products, reps)
        out["products of 8 microbatches, 1 thread (ms)"] = 1e3 * _common.seconds_per_call(
            microbatches, reps
        )
        out["SGD update of every weight, 1 thread (ms)"] = 1e3 * _common.seconds_per_call(
            update, reps
        )
    out.update(pipedream_estimates(out))
    try:
        import torch
    except ImportError:
        return out
    torch.set_num_threads(cores())
    tprods = [(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(b)) for a, b in prods]
    out["products, torch (ms)"] = 1e3 * _common.seconds_per_call(
        lambda: [torch.mm(a, b) for a, b in tprods], reps
    )
    return out


def pipedream_estimates(parts: dict[str, float]) -> dict[str, float]:
    """The least time ``PipeDream(8)``'s own work can take a minibatch, from the parts of
    :func:`breakdown` (ms; estimates, not runs): it takes the step's products in 8
    microbatches and updates every weight 8 times, where ``Sync`` takes them whole and updates
    once; both make the same other elementwise passes.

    - "each op alone on every core": each part at the team's rate, one after the other, as a
      schedule of one op at a time runs them;
    - "one-thread ops, perfectly overlapped": the parts' one-thread times added and spread
      over every core with no loss: the least for any schedule whose ops each run on one
      thread (updates side by side share the memory's bandwidth: more in practice).

    :func:`pipedream_bound` sets them against a measured ``Sync`` step.
    """
    n = cores()
    update_team = parts["SGD update of every weight, team (ms)"]
    other_team = max(0.0, parts["elementwise, team (ms)"] - update_team)
    update_1 = parts["SGD update of every weight, 1 thread (ms)"]
    other_1 = max(0.0, parts["elementwise, numpy (ms)"] - update_1)
    return {
        "PipeDream(8)'s work, each op alone on every core (ms)": (
            parts["products of 8 microbatches, team (ms)"] + other_team + 8 * update_team
        ),
        "PipeDream(8)'s work, one-thread ops perfectly overlapped (ms)": (
            parts["products of 8 microbatches, 1 thread (ms)"] + other_1 + 8 * update_1
        )
        / n,
    }


def pipedream_bound(parts: dict[str, float], sync_ms: float) -> dict[str, float]:
    """``PipeDream(8)``'s samples/s against a ``Sync`` step of ``sync_ms`` (x) at each estimate
    of :func:`pipedream_estimates`: its ops one at a time, each on every core (what a schedule
    without overlap reaches), and the most that one-thread ops perfectly overlapped allow."""
    est = list(pipedream_estimates(parts).values())
    return {
        "PipeDream(8) / Sync 1 stage, its ops one at a time on every core (x)": sync_ms / est[0],
        "PipeDream(8) / Sync 1 stage at most, one-thread ops perfectly overlapped (x)": (
            sync_ms / est[1]
        ),
    }
