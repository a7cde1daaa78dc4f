"""GPU benchmark, in one run on a CUDA machine (ratios against PyTorch eager on the same card):

1. the card's matmul rate (cupy and torch, 8192^2, float32 and the 16-bit types);
2. `Sync` step time of an MLP of width 4096 (4 Linear 4096x4096 + ReLU, a Linear to 10), SGD, at
   batch 1024 and 64, float32 and float16/bfloat16 where cupy has them, against PyTorch eager;
   achieved TFLOP/s;
3. 4 stages on one GPU (one CUDA stream per stage), steady state: the pipelines (`GPipe(4)`,
   `OneFOneB(4)`), `PipeDream(4)` (stashing and recomputing) and `Async`, captured and eager,
   against `Sync` captured on one stage, at float32 batch 1024 and bfloat16 batch 64 (where one
   step leaves most of the card idle); as bounds, `GPipe(4)` on one stage (the microbatches
   with no stages) and PyTorch eager on the whole batch and on 4 microbatches summed
   (``--rows`` picks rows);
4. CUDA graphs: `Sync` with and without ``cuda_graphs=True`` (float32 and bfloat16, batch 1024
   and 64) against PyTorch eager in the same run.

Run: python experiments/bench_gpu.py [--steps N] [--sections 1,2,3,4] [--repeats R] [--rows I,J]
[--profile [DTYPE:BATCH]]
(writes runs/bench_gpu.json; --profile prints where the host time of an eager and a captured
`Sync` step goes, bfloat16 batch 64 unless DTYPE:BATCH says otherwise, e.g. bfloat16:1024, with
the step's wall and CPU time unprofiled beside it)
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import asyncnn as ann
from asyncnn import nn, optim, policies

WIDTH = 4096
LAYERS = 4


def mlp(width: int = WIDTH) -> list[Any]:
    mods: list[Any] = []
    for _ in range(LAYERS):
        mods += [nn.Linear(width, width), nn.ReLU()]
    mods.append(nn.Linear(width, 10))
    return mods


def graph(stages: int) -> ann.Graph:
    """:func:`mlp` in ``stages`` stages, all on cuda:0."""
    return ann.Graph.sequential(
        mlp(), loss=nn.CrossEntropyLoss(), stages=stages, input_shape=(None, WIDTH),
        devices=["cuda:0"] * stages,
    )  # fmt: skip


def data_dtype(dtype: str) -> type[np.floating[Any]]:
    """The dtype the inputs are made in on the GPU: float16 data is cast ahead; bfloat16 data the
    Trainer casts per batch (its input checks take IEEE floats only)."""
    return np.float16 if dtype == "float16" else np.float32


def step_flops(batch: int, width: int = WIDTH) -> float:
    per_layer = 2.0 * batch * width * width
    # forward, and backward (input and weight gradients), except no input gradient for layer 0
    return LAYERS * 3 * per_layer - per_layer + 3 * 2.0 * batch * width * 10


def matmul_rate(dtype: str) -> dict[str, float]:
    import cupy as cp
    import torch

    out = {}
    n = 8192
    cdt = ann.backends.get_backend("cuda:0").dtype(dtype)
    a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cdt)
    b = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cdt)
    seconds = _common.seconds_per_call(
        lambda: a @ b, 10, sync=lambda: cp.cuda.Device().synchronize(), warmup=3
    )
    out["cupy"] = 2 * n**3 / seconds / 1e12
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    ta = torch.randn(n, n, device="cuda", dtype=tdt)
    tb = torch.randn(n, n, device="cuda", dtype=tdt)
    seconds = _common.seconds_per_call(lambda: ta @ tb, 10, sync=torch.cuda.synchronize, warmup=3)
    out["torch"] = 2 * n**3 / seconds / 1e12
    return out


def asyncnn_step(
    policy: Any, stages: int, batch: int, dtype: str, steps: int, on_device: bool = True,
    cuda_graphs: bool = False,
) -> float:  # fmt: skip
    import cupy as cp

    g = graph(stages)
    tr = ann.Trainer(
        g, optimizer=optim.SGD(lr=1e-3), policy=policy, dtype=dtype, cuda_graphs=cuda_graphs
    )
    rng = np.random.default_rng(0)
    data: dict[str, Any] = {"x": rng.standard_normal((batch * steps, WIDTH)).astype(np.float32),
                            "y": rng.integers(0, 10, batch * steps)}  # fmt: skip
    if on_device:  # the dataset lives on the GPU, as torch's tensors do below
        cdt = data_dtype(dtype)
        data = {k: cp.asarray(v).astype(cdt if k == "x" else v.dtype) for k, v in data.items()}
    tr.fit({k: v[: batch * 3] for k, v in data.items()}, batch_size=batch)  # warm-up
    cp.cuda.Device().synchronize()
    start = time.perf_counter()
    tr.fit(data, batch_size=batch)
    # (fit returns once its work is queued on the card: the clock stops when the card is done,
    # as torch_step's does)
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - start) / steps


def torch_step(
    batch: int, dtype: str, steps: int, prof: Any = None, microbatches: int = 1
) -> float:
    """Seconds per PyTorch eager step; ``prof`` (``enable()``/``disable()``) sees the timed ones;
    ``microbatches``: the step's gradient summed over that many slices of the batch, one update
    (what any pipeline computes, so the matmuls' rate at a microbatch's rows bounds it)."""
    import torch

    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    layers: list[Any] = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(WIDTH, 10))
    model = torch.nn.Sequential(*layers).cuda().to(tdt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch * steps, WIDTH, device="cuda", dtype=tdt)
    y = torch.randint(0, 10, (batch * steps,), device="cuda")

    def run(n: int) -> None:
        for i in range(n):
            opt.zero_grad()
            xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
            for xm, ym in zip(xb.chunk(microbatches), yb.chunk(microbatches), strict=True):
                torch.nn.functional.cross_entropy(model(xm).float(), ym).backward()
            opt.step()

    run(3)
    torch.cuda.synchronize()
    if prof is not None:
        prof.enable()
    start = time.perf_counter()
    run(steps)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if prof is not None:
        prof.disable()
    return elapsed / steps


def steady_step(
    batch: int, dtype: str, steps: int, cuda_graphs: bool, prof: Any = None,
    policy: Any = None, stages: int = 1, trace: str | None = None,
    times: dict[str, float] | None = None,
) -> float:  # fmt: skip
    """Seconds per step in steady state (`Sync` on one stage unless ``policy`` and ``stages``
    say otherwise): one run, 10 warm-up steps (capture included), then ``steps`` timed ones
    (batches sliced from data on the GPU, as the torch loop does); ``trace``: record one;
    ``times``: gets this process's CPU seconds per timed step too (``"cpu"``)."""
    import anyio
    import cupy as cp

    policy = policies.Sync() if policy is None else policy
    g = graph(stages)
    rng = np.random.default_rng(0)
    cdt = data_dtype(dtype)
    x = cp.asarray(rng.standard_normal((batch * (steps + 10), WIDTH)).astype(cdt))
    y = cp.asarray(rng.integers(0, 10, batch * (steps + 10)))
    out: dict[str, float] = {}

    async def main() -> None:
        async with ann.open_run(
            g, optim.SGD(lr=1e-3), policy, dtype=dtype, cuda_graphs=cuda_graphs, trace=trace
        ) as run:
            for i in range(10):
                await run.step({"x": x[i * batch : (i + 1) * batch],
                                "y": y[i * batch : (i + 1) * batch]})  # fmt: skip
            await run.drain()
            cp.cuda.Device().synchronize()
            if prof is not None:
                prof.enable()
            start, cpu = time.perf_counter(), time.process_time()
            for i in range(10, steps + 10):
                await run.step({"x": x[i * batch : (i + 1) * batch],
                                "y": y[i * batch : (i + 1) * batch]})  # fmt: skip
            await run.drain()
            cp.cuda.Device().synchronize()
            out["t"] = (time.perf_counter() - start) / steps
            out["cpu"] = (time.process_time() - cpu) / steps
            if prof is not None:
                prof.disable()

    anyio.run(main)
    if times is not None:
        times["cpu"] = out["cpu"]
    return out["t"]


def graphs_section(
    dtypes: list[str], steps: int, repeats: int, rates: dict[str, Any]
) -> list[dict[str, Any]]:
    """Section 4: `Sync` eager, `Sync` with CUDA graphs, and torch eager, same run; each
    measured ``repeats`` times, interleaved, and the medians compared (a shared host's step
    times wander by tens of percent from one run to the next, torch's as much as ours)."""
    print(f"4. CUDA graphs: Sync, MLP width 4096, steady state (ms per step, median of "
          f"{repeats}; ratio to torch eager)")  # fmt: skip
    rows = []
    for dt in [d for d in ("float32", "bfloat16") if d in dtypes]:
        for batch in (1024, 64):
            runs: dict[str, list[float]] = {"eager": [], "graphs": [], "torch": []}
            for _ in range(repeats):
                runs["eager"].append(steady_step(batch, dt, steps, False) * 1e3)
                runs["graphs"].append(steady_step(batch, dt, steps, True) * 1e3)
                runs["torch"].append(torch_step(batch, dt, steps) * 1e3)
            eager, graphs, t = (float(np.median(runs[k])) for k in ("eager", "graphs", "torch"))
            best = min(eager, graphs)
            tflops = step_flops(batch) / (best * 1e-3) / 1e12
            peak = rates.get(dt, {}).get("cupy", math.nan)
            row = {"dtype": dt, "batch": batch, "eager_ms": eager, "graphs_ms": graphs,
                   "torch_ms": t, "graphs_ratio": graphs / t, "eager_ratio": eager / t,
                   "tflops": tflops, "fraction_of_matmul_rate": tflops / peak,
                   "runs_ms": runs}  # fmt: skip
            rows.append(row)
            print(f"   {dt:<9} batch {batch:5d}: eager {eager:7.2f}  graphs {graphs:7.2f}  "
                  f"torch {t:7.2f}   graphs/torch {graphs / t:5.2f}  eager/torch "
                  f"{eager / t:5.2f}   {tflops:6.1f} TFLOP/s"
                  + ("" if math.isnan(peak) else f" ({tflops / peak:4.0%} of matmul)")
                  + "   [runs: " + "; ".join(
                      f"{k} " + " ".join(f"{v:.2f}" for v in vs) for k, vs in runs.items())
                  + "]")  # fmt: skip
    return rows


#: section 3's rows: (label, policy, stages, CUDA graphs asked for)
PIPELINE_ROWS: list[tuple[str, Any, int, bool]] = [
    ("Sync, 1 stage, graphs", policies.Sync(), 1, True),
    ("Sync, 4 stages, graphs", policies.Sync(), 4, True),
    ("GPipe(4), graphs", policies.GPipe(4), 4, True),
    ("OneFOneB(4), graphs", policies.OneFOneB(4), 4, True),
    ("OneFOneB(4), eager", policies.OneFOneB(4), 4, False),
    ("PipeDream(4), eager", policies.PipeDream(4), 4, False),
    ("PipeDream(4), graphs", policies.PipeDream(4), 4, True),
    ("PipeDream(4, stash=False), graphs", policies.PipeDream(4, stash=False), 4, True),
    ("Async(4), eager", policies.Async(max_active_keys=4), 4, False),
    ("Async(4), graphs", policies.Async(max_active_keys=4), 4, True),
    ("Async(4, stash), graphs", policies.Async(max_active_keys=4, stash=True), 4, True),
    ("Async(8), graphs", policies.Async(max_active_keys=8), 4, True),
    # the microbatches' own cost, with no stages: what a pipeline on one GPU cannot beat
    ("GPipe(4), 1 stage, graphs", policies.GPipe(4), 1, True),
]


#: section 3's reference rows, PyTorch eager: the whole batch, and 4 microbatches summed
TORCH_ROWS = [("torch eager", 1), ("torch eager, 4 microbatches", 4)]


def pipeline_section(
    dtypes: list[str], steps: int, repeats: int, only: list[int] | None = None
) -> list[dict[str, Any]]:
    """Section 3: 4 stages on one GPU against `Sync` captured on one stage (the first row,
    always run), steady state, each row measured ``repeats`` times, interleaved; medians
    compared. ``only``: the indices into :data:`PIPELINE_ROWS` to run (all by default); the
    torch rows run when torch is installed."""
    print(f"3. 4 stages on one GPU, MLP width 4096, steady state (ms per step, median of "
          f"{repeats}; samples/s against Sync captured on 1 stage)")  # fmt: skip
    chosen = [r for i, r in enumerate(PIPELINE_ROWS) if only is None or i == 0 or i in only]
    try:
        import torch  # noqa: F401
    except ImportError:
        references: list[tuple[str, int]] = []
    else:
        references = TORCH_ROWS
    rows = []
    cases = [("float32", 1024), ("bfloat16", 64)]
    for dt, batch in [(d, b) for d, b in cases if d in dtypes]:
        # each row's measurement, asyncnn's and torch's alike: seconds per step
        timed: list[tuple[str, Callable[[], float]]] = []
        timed += [
            (label, functools.partial(steady_step, batch, dt, steps, graphs, policy=policy,
                                      stages=stages))
            for label, policy, stages, graphs in chosen
        ]  # fmt: skip
        timed += [
            (label, functools.partial(torch_step, batch, dt, steps, microbatches=micro))
            for label, micro in references
        ]
        runs: dict[str, list[float]] = {label: [] for label, _ in timed}
        for rep in range(repeats):
            for label, measure in timed:
                try:
                    ms = measure() * 1e3
                except Exception as exc:  # noqa: BLE001 - one row's failure keeps the others
                    print(f"   {label}: failed: {type(exc).__name__}: {exc}", flush=True)
                    ms = math.nan
                runs[label].append(ms)
                print(f"   ({dt} batch {batch}, repeat {rep + 1}: {label} {ms:.2f} ms)", flush=True)
        base = float(np.median(runs[chosen[0][0]]))
        for label in runs:
            ms = float(np.median(runs[label]))
            row = {"dtype": dt, "batch": batch, "run": label, "ms": ms,
                   "samples_per_s": batch / (ms * 1e-3), "x_sync_graphs_1_stage": base / ms,
                   "runs_ms": runs[label]}  # fmt: skip
            rows.append(row)
            print(f"   {dt:<9} batch {batch:5d}  {label:<34} {ms:8.2f} ms  "
                  f"{batch / (ms * 1e-3):10.0f} samples/s  {base / ms:5.2f}x   [runs: "
                  + " ".join(f"{v:.2f}" for v in runs[label]) + "]")  # fmt: skip
        if references:
            whole, split = (float(np.median(runs[label])) for label, _ in references)
            print(f"   {dt:<9} batch {batch:5d}  torch's 4 microbatches take {split / whole:.2f}x "
                  "its whole-batch step")  # fmt: skip
    return rows


def profile_step(
    dtype: str, batch: int, steps: int, policy: Any = None, stages: int = 1,
    graph_modes: tuple[bool, ...] = (False, True), label: str = "Sync",
) -> None:  # fmt: skip
    """Prints where the host time of steady steps goes (cProfile; `Sync` on one stage unless
    ``policy`` and ``stages`` say otherwise), eager and with CUDA graphs (``graph_modes``)."""
    import cProfile
    import pstats

    for graphs in graph_modes:
        # unprofiled first: a step whose CPU time is its wall time is host-bound (or waits on
        # the card in a spin; the profile below tells which)
        times: dict[str, float] = {}
        plain = steady_step(batch, dtype, steps, graphs, None, policy, stages, times=times)
        prof = cProfile.Profile()
        t = steady_step(batch, dtype, steps, graphs, prof, policy, stages)
        print(f"profile: {label}, {dtype} batch {batch} cuda_graphs={graphs}: "
              f"{t * 1e3:.2f} ms per step profiled; unprofiled {plain * 1e3:.2f} ms, "
              f"CPU {times['cpu'] * 1e3:.2f} ms")  # fmt: skip
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
        if graphs:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(45)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="sections 3, 4: runs per row (median)")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated")
    ap.add_argument("--out", default="runs/bench_gpu.json")
    ap.add_argument("--sections", default="1,2,3,4", help="which sections to run")
    ap.add_argument(
        "--profile", nargs="?", const="bfloat16:64", default=None, metavar="DTYPE:BATCH",
        help="cProfile eager and captured Sync steps (default bfloat16:64)",
    )  # fmt: skip
    ap.add_argument(
        "--rows", default=None, help="section 3: comma-separated indices into PIPELINE_ROWS"
    )
    args = ap.parse_args()
    sections = {int(x) for x in args.sections.split(",")}
    _common.need_cupy("bench_gpu.py")
    card = _common.card_name()
    report: dict[str, Any] = {"card": card, "matmul_tflops": {}, "sync": [], "pipeline": []}
    print(f"card: {card}")
    dtypes: list[str] = []
    # bfloat16 comes from ml_dtypes, which cupy 14 computes with
    for candidate in [d for d in args.dtypes.split(",") if d]:
        try:
            ann.backends.get_backend("cuda:0").dtype(candidate)  # allocates one: raises if not
            dtypes.append(candidate)
        except Exception as exc:  # noqa: BLE001 - report what cupy lacks
            print(f"{candidate}: not available in cupy here ({type(exc).__name__}: {exc})")
    if args.profile is not None:
        dtype, _, batch = args.profile.partition(":")
        if dtype not in dtypes:
            ap.error(f"--profile {args.profile}: {dtype!r} is not among the dtypes here {dtypes}")
        profile_step(dtype, int(batch or 64), args.steps)
    if 1 in sections or 2 in sections:
        print("1. matmul 8192^2, TFLOP/s")
    for dt in dtypes if 1 in sections or 2 in sections else []:
        rate = matmul_rate(dt)
        report["matmul_tflops"][dt] = rate
        print(f"   {dt:<9} cupy {rate['cupy']:7.1f}   torch {rate['torch']:7.1f}")
    if 2 in sections:
        print("2. Sync step, MLP width 4096 (ms; ratio asyncnn/torch; achieved TFLOP/s)")
    for dt in dtypes if 2 in sections else []:
        for batch in (1024, 64):
            a = asyncnn_step(policies.Sync(), 1, batch, dt, args.steps)
            host = math.nan
            if dt == "float32" and batch == 1024:
                host = asyncnn_step(policies.Sync(), 1, batch, dt, args.steps, on_device=False)
            t = torch_step(batch, dt, args.steps)
            tflops = step_flops(batch) / a / 1e12
            peak = report["matmul_tflops"][dt]["cupy"]
            row = {"dtype": dt, "batch": batch, "asyncnn_ms": a * 1e3, "torch_ms": t * 1e3,
                   "asyncnn_host_data_ms": host * 1e3,
                   "ratio": a / t, "tflops": tflops, "fraction_of_matmul_rate": tflops / peak}  # fmt: skip
            report["sync"].append(row)
            print(f"   {dt:<9} batch {batch:5d}: asyncnn {a * 1e3:8.2f}  torch {t * 1e3:8.2f}  "
                  f"ratio {a / t:5.2f}   {tflops:6.1f} TFLOP/s ({tflops / peak:4.0%} of matmul)"
                  f"   [data on the host: {host * 1e3:.2f} ms]")  # fmt: skip
    if 4 in sections:
        report["graphs"] = graphs_section(dtypes, args.steps, args.repeats, report["matmul_tflops"])
    if 3 in sections:
        only = None if args.rows is None else [int(x) for x in args.rows.split(",")]
        report["pipeline"] = pipeline_section(dtypes, args.steps, args.repeats, only)
    _common.write_json(args.out, report)


if __name__ == "__main__":
    main()
