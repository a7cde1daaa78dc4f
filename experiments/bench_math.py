"""Benchmark of the math layer: the plain training loop over ``asyncnn.value_and_grad``.

One step = ``value_and_grad`` of CrossEntropyLoss on the MLP 784-1024-1024-1024-10 (ReLU, float32)
followed by ``optim.SGD.update``. It is timed, in the same process and interleaved round by round
(so that background load hits every contestant alike), against:

- a hand-written numpy forward/backward/SGD of the same MLP (``experiments/_numpy_mlp.py``);
- PyTorch eager on all cores (``zero_grad``, forward, ``backward``, ``SGD.step``), when importable,
  in a child process of its own, so that its OpenMP thread pool and numpy's OpenBLAS pool never
  compete inside one process (the asyncnn/torch ratio is then a ratio of medians, not per round).

The process calls ``asyncnn.backends.tune_allocator()`` first; glibc's thresholds cannot be undone
in-process, so the same measurement without tuning runs, on every call, in a child process that
this script starts itself (``--child untuned``, for its own use).

Run: python experiments/bench_math.py [--quick] [--out runs/bench_math.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import threadpoolctl

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402
import _numpy_mlp  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import nn, optim  # noqa: E402
from asyncnn.backends import tune_allocator  # noqa: E402

SIZES = [784, 1024, 1024, 1024, 10]


@dataclass(frozen=True)
class Config:
    batches: tuple[int, ...] = (256, 32)  # 256: BLAS-bound; 32: framework overhead shows
    # 0 = one BLAS/torch thread per core (the default); 1 = single-threaded, which a shared,
    # loaded machine disturbs far less (no thread barrier inside every matrix product)
    threads: tuple[int, ...] = (0, 1)
    seconds_per_round: float = 0.5  # each contestant runs ~this long per timed round
    rounds: int = 5  # median over rounds; min and max show the spread under load
    warmup_steps: int = 3  # first steps pay page faults and BLAS buffer set-up
    lr: float = 0.01  # small enough that 1000s of steps on random data stay finite
    seed: int = 0


Step = Callable[[], Any]


def _data(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, SIZES[0]), dtype=np.float32)
    return x, rng.integers(0, SIZES[-1], batch)


def numpy_step(x: np.ndarray, y: np.ndarray, cfg: Config) -> Step:
    params = _numpy_mlp.init(SIZES, cfg.seed)
    return lambda: _numpy_mlp.sgd_step(params, x, y, cfg.lr)


def asyncnn_step(x: np.ndarray, y: np.ndarray, cfg: Config) -> Step:
    mods: list[Any] = []
    params: list[Any] = []
    for i, (w, b) in enumerate(_numpy_mlp.init(SIZES, cfg.seed)):
        mods.append(nn.Linear(*w.shape))
        params.append({"weight": w, "bias": b})
        if i < len(SIZES) - 2:
            mods.append(nn.ReLU())
            params.append({})
    model = nn.Sequential(*mods)
    loss = nn.CrossEntropyLoss()
    opt = optim.SGD(lr=cfg.lr)
    state = opt.init(params)
    vg = ann.value_and_grad(lambda p, xb, yb: loss({}, model(p, xb), yb))

    def step() -> float:
        nonlocal params, state
        value, grads = vg(params, x, y)
        params, state = opt.update(params, grads, state)
        return float(value)

    return step


def torch_step(x: np.ndarray, y: np.ndarray, cfg: Config, threads: int) -> Step | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    layers: list[Any] = []
    for i, (w, b) in enumerate(_numpy_mlp.init(SIZES, cfg.seed)):
        lin = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))  # torch stores (out, in)
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    topt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> float:
        topt.zero_grad()
        out = torch.nn.functional.cross_entropy(model(xt), yt)
        out.backward()
        topt.step()
        return float(out.detach())

    return step


def check_same_losses(steps: dict[str, Step], n: int = 3) -> dict[str, list[float]]:
    """The contestants start from the same weights: their first losses must agree (float32)."""
    losses = {name: [float(fn()) for _ in range(n)] for name, fn in steps.items()}
    ref = np.array(losses.get("numpy") or losses["reference numpy"])
    for name, got in losses.items():
        if not np.allclose(got, ref, rtol=1e-4, atol=1e-5):
            raise SystemExit(f"{name} computes other losses than numpy: {got} vs {list(ref)}")
    return losses


def measure(batch: int, threads: int, cfg: Config, steps: dict[str, Step]) -> dict[str, Any]:
    losses = check_same_losses(steps)
    steps = {k: v for k, v in steps.items() if k != "reference numpy"}
    for fn in steps.values():
        for _ in range(cfg.warmup_steps):
            fn()
    start = time.perf_counter()
    for fn in steps.values():
        fn()
    reps = max(3, int(cfg.seconds_per_round * len(steps) / (time.perf_counter() - start)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    ratios: dict[str, list[float]] = {
        f"asyncnn/{n}": [] for n in steps if n != "asyncnn" and "asyncnn" in steps
    }
    for _ in range(cfg.rounds):
        # Alternating step by step, every contestant sees the same background load.
        total = dict.fromkeys(steps, 0.0)
        for _ in range(reps):
            for name, fn in steps.items():
                start = time.perf_counter()
                fn()
                total[name] += time.perf_counter() - start
        for name in steps:
            samples[name].append(total[name] / reps)
        for key in ratios:
            ratios[key].append(total["asyncnn"] / total[key.split("/")[1]])
    return {
        "batch": batch,
        "threads": threads,
        "steps_per_round": reps,
        "first_losses": losses,
        "step_ms": {n: _summary(v, 1e3) for n, v in samples.items()},
        "ratio": {k: _summary(v, 1.0) for k, v in ratios.items()},
    }


def _summary(values: list[float], scale: float) -> dict[str, float]:
    return {
        "median": statistics.median(values) * scale,
        "min": min(values) * scale,
        "max": max(values) * scale,
    }


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            model,
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    blas = [
        {k: d.get(k) for k in ("internal_api", "version", "num_threads", "threading_layer")}
        for d in threadpoolctl.threadpool_info()
    ]
    info: dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas,
        "loadavg_at_start": os.getloadavg(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def _cases(cfg: Config) -> list[tuple[int, int]]:
    cores = os.cpu_count() or 1
    return [(t or cores, b) for t in cfg.threads for b in cfg.batches]


def run(cfg: Config, tuned: bool) -> dict[str, Any]:
    """asyncnn against numpy, interleaved round by round in this process."""
    applied = tune_allocator() if tuned else False
    results = []
    for threads, batch in _cases(cfg):
        x, y = _data(batch, cfg.seed)
        with threadpoolctl.threadpool_limits(threads):
            steps = {"asyncnn": asyncnn_step(x, y, cfg), "numpy": numpy_step(x, y, cfg)}
            results.append(measure(batch, threads, cfg, steps))
    return {"allocator_tuned": applied, "results": results, "loadavg_at_end": os.getloadavg()}


def run_torch(cfg: Config) -> dict[str, Any] | None:
    """PyTorch alone (see the module docstring for why), checked against numpy's losses first."""
    results = []
    for threads, batch in _cases(cfg):
        x, y = _data(batch, cfg.seed)
        t = torch_step(x, y, cfg, threads)
        if t is None:
            return None
        ref = numpy_step(x, y, cfg)
        results.append(measure(batch, threads, cfg, {"torch": t, "reference numpy": ref}))
    return {"results": results, "loadavg_at_end": os.getloadavg()}


def _child(cfg_flag: list[str], what: str) -> Any:
    cmd = [sys.executable, __file__, "--child", what, *cfg_flag]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def add_torch(report: dict[str, Any], torch_report: dict[str, Any] | None) -> None:
    """Puts torch's times beside asyncnn's: the ratio of medians from separate processes."""
    if torch_report is None:
        return
    for r, t in zip(report["results"], torch_report["results"], strict=True):
        assert (r["batch"], r["threads"]) == (t["batch"], t["threads"])
        ms = t["step_ms"]["torch"]
        r["step_ms"]["torch"] = ms
        a = r["step_ms"]["asyncnn"]["median"]
        r["ratio"]["asyncnn/torch"] = {
            "median": a / ms["median"],
            "min": a / ms["max"],
            "max": a / ms["min"],
        }


def print_table(title: str, report: dict[str, Any]) -> None:
    print(title)
    print(
        f"  {'threads':>7} {'batch':>5} {'asyncnn ms':>16} {'numpy ms':>16} {'torch ms':>16}"
        f" {'asyncnn/numpy':>20} {'asyncnn/torch':>20}"
    )
    for r in report["results"]:
        ms, ra = r["step_ms"], r["ratio"]

        def cell(d: dict[str, float] | None, fmt: str) -> str:
            if d is None:
                return "-"
            return f"{d['median']:{fmt}} [{d['min']:{fmt}}-{d['max']:{fmt}}]"

        print(
            f"  {r['threads']:>7} {r['batch']:>5} {cell(ms['asyncnn'], '.1f'):>16} {cell(ms['numpy'], '.1f'):>16}"
            f" {cell(ms.get('torch'), '.1f'):>16} {cell(ra['asyncnn/numpy'], '.3f'):>20}"
            f" {cell(ra.get('asyncnn/torch'), '.3f'):>20}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short rounds (a smoke run)")
    ap.add_argument("--out", default="runs/bench_math.json")
    ap.add_argument(
        "--child",
        choices=["untuned", "torch"],
        help="internal: print one JSON part of the report (asyncnn/numpy untuned, or torch)",
    )
    args = ap.parse_args()
    cfg = Config(seconds_per_round=0.1, rounds=3) if args.quick else Config()
    if args.child:
        part = run(cfg, tuned=False) if args.child == "untuned" else run_torch(cfg)
        json.dump(part, sys.stdout)
        return
    quick = ["--quick"] if args.quick else []
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": started,
        "config": asdict(cfg),
        "machine": machine(),
    }
    # null where torch is present; its "torch" part is then null too
    report["torch_missing"] = _common.torch_missing("the PyTorch columns are skipped ('-')")
    report["tuned"] = run(cfg, tuned=True)
    report["torch"] = _child(quick, "torch")
    report["untuned"] = _child(quick, "untuned")
    add_torch(report["tuned"], report["torch"])
    add_torch(report["untuned"], report["torch"])
    print_table(
        "step time, MLP 784-1024-1024-1024-10 float32, value_and_grad + SGD "
        "(median [min-max] over rounds), tune_allocator() on:",
        report["tuned"],
    )
    print_table("same, tune_allocator() off (child process):", report["untuned"])
    print(f"load average: start {report['machine']['loadavg_at_start']}, end {os.getloadavg()}")
    _common.write_json(args.out, report)


if __name__ == "__main__":
    main()
