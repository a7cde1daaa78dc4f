"""Benchmark of the actor runtime, in one run (ratios against references measured here too):

1. per-hop message overhead: tiny tensors through a chain of 8 actors (forward and backward hops);
2. ``Sync`` step time on the MLP 784-1024-1024-1024-10 (float32) against the plain loop over
   ``value_and_grad`` and a hand-written numpy step, at batch 256;
3. samples/s of a 2-stage ``PipeDream`` pipeline against ``Sync``, and against PyTorch eager on
   the same MLP when torch is installed.

Run: python experiments/bench_runtime.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402
import _numpy_mlp  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import nn, optim, policies  # noqa: E402
from asyncnn.backends import tune_allocator  # noqa: E402

SIZES = [784, 1024, 1024, 1024, 10]


def mlp_modules() -> list[Any]:
    return _common.mlp_modules(SIZES)


def data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, SIZES[0]), dtype=np.float32), "y": rng.integers(0, 10, n)}


def per_hop_overhead(keys: int) -> dict[str, dict[str, float]]:
    """Per message hop: the total, the actors' own work on it (a vjp or pullback, bookkeeping,
    the send) and the rest: channels, task switches, the scheduler. Best of 3 runs."""
    g = ann.Graph.sequential(
        [nn.Identity() for _ in range(7)] + [nn.Linear(1, 1)],
        loss=nn.MSELoss(),
        stages=8,
        input_shape=(None, 1),
        label_shape=(None, 1),
        label_dtype="float32",
    )
    d = {"x": np.ones((keys, 1), np.float32), "y": np.ones((keys, 1), np.float32)}
    hops = keys * (8 + 1 + 8)  # 8 layers and the loss forward, 8 backward hops
    out = {}
    for name, policy in [
        ("Async(max_active_keys=16)", policies.Async(16)),
        ("Sync", policies.Sync()),
    ]:
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.0), policy=policy)
        tr.fit(d, epochs=1, batch_size=1)  # warm-up
        best: dict[str, float] | None = None
        for _ in range(3):
            start = time.perf_counter()
            hist = tr.fit(d, epochs=1, batch_size=1)
            wall = time.perf_counter() - start
            busy = sum(s.busy_seconds for s in hist.statistics.values())
            r = {
                "total": wall / hops * 1e6,
                "actors_work": busy / hops * 1e6,
                "messaging": (wall - busy) / hops * 1e6,
            }
            if best is None or r["total"] < best["total"]:
                best = r
        assert best is not None
        out[name] = best
    return out


def step_times(batch: int, steps: int) -> dict[str, float]:
    d = data(batch * steps)
    one = {k: v[:batch] for k, v in d.items()}
    results = {}
    params = _numpy_mlp.init(SIZES)
    results["numpy by hand"] = _common.seconds_per_call(
        lambda: _numpy_mlp.sgd_step(params, one["x"], one["y"], 0.01), steps
    )

    loss = nn.CrossEntropyLoss()
    plain = _common.plain_step(nn.Sequential(*mlp_modules()), loss, optim.SGD(lr=0.01))
    results["plain loop (value_and_grad)"] = _common.seconds_per_call(
        lambda: plain(one["x"], one["y"]), steps
    )
    for k in (1, 2):
        g = ann.Graph.sequential(mlp_modules(), loss=loss, stages=k, input_shape=(None, SIZES[0]))
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.01), policy=policies.Sync())
        tr.fit(one, epochs=1, batch_size=batch)
        start = time.perf_counter()
        tr.fit(d, epochs=1, batch_size=batch)
        results[f"Sync, {k} stage(s)"] = (time.perf_counter() - start) / steps
    return results


def pipeline_throughput(batch: int, steps: int, microbatches: int) -> dict[str, float]:
    d = data(batch * steps)
    out = {}
    loss = nn.CrossEntropyLoss()
    for name, k, policy in [
        ("Sync, 1 stage", 1, policies.Sync()),
        ("Sync, 2 stages", 2, policies.Sync()),
        (f"PipeDream(M={microbatches}), 2 stages", 2, policies.PipeDream(microbatches)),
        (f"OneFOneB(M={microbatches}), 2 stages", 2, policies.OneFOneB(microbatches)),
    ]:
        g = ann.Graph.sequential(
            mlp_modules(), loss=loss, stages=k, input_shape=(None, SIZES[0]), balance="params"
        )
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.01), policy=policy)
        tr.fit({k_: v[: batch * 2] for k_, v in d.items()}, epochs=1, batch_size=batch)  # warm-up
        hist = tr.fit(d, epochs=1, batch_size=batch)
        out[name] = hist.samples_per_second
    try:
        import torch
    except ImportError:
        return out
    torch.set_num_threads(os.cpu_count() or 1)
    layers: list[Any] = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    topt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs = torch.from_numpy(d["x"])
    ys = torch.from_numpy(d["y"])

    def epoch() -> None:
        for i in range(steps):
            topt.zero_grad()
            torch.nn.functional.cross_entropy(
                model(xs[i * batch : (i + 1) * batch]), ys[i * batch : (i + 1) * batch]
            ).backward()
            topt.step()

    epoch()
    start = time.perf_counter()
    epoch()
    out["PyTorch eager (all cores)"] = batch * steps / (time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--out", default="runs/bench_runtime.json")
    args = ap.parse_args()
    tune_allocator()
    steps = 3 if args.quick else 20
    report: dict[str, Any] = {}
    # null where torch is present
    report["torch_missing"] = _common.torch_missing("no PyTorch eager row in section 3")

    hop = per_hop_overhead(50 if args.quick else 500)
    report["per_hop_us"] = hop
    print("1. per-hop overhead, chain of 8 actors, tiny tensors (target <= 20 us), us per hop:")
    for k, v in hop.items():
        print(
            f"   {k:<28} total {v['total']:6.1f} = actors' work {v['actors_work']:6.1f}"
            f" + messaging and scheduling {v['messaging']:6.1f}"
        )

    st = step_times(256, steps)
    report["step_seconds_batch256"] = st
    base = st["plain loop (value_and_grad)"]
    hand = st["numpy by hand"]
    print(
        "2. step time, MLP 784-1024-1024-1024-10, float32, batch 256 (target Sync <= 1.10x plain):"
    )
    for k, v in st.items():
        print(f"   {k:<28} {v * 1e3:7.2f} ms   {v / base:5.2f}x plain   {v / hand:5.2f}x numpy")

    report["samples_per_second"] = {}
    for batch, n in ((256, steps * 2), (1024, max(4, steps // 2))):
        tp = pipeline_throughput(batch, n, 4)
        report["samples_per_second"][f"batch {batch}"] = tp
        ref = tp["Sync, 1 stage"]
        one = tp["Sync, 2 stages"]  # one stage at a time: one core's worth of BLAS
        print(f"3. throughput, batch {batch}, 4 microbatches (samples/s):")
        for k, v in tp.items():
            print(
                f"   {k:<36} {v:9.0f}   {v / ref:5.2f}x Sync 1 stage   {v / one:5.2f}x Sync 2 stages"
            )
    _common.write_json(args.out, report)


if __name__ == "__main__":
    main()
