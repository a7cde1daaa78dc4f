"""Three cuts in an eager GPU step's kernel launches, each against the code it replaced, in one
process: the optimizer's update in one launch for all leaves (``sgd_many``/``adam_many`` in
``backends/_fused.py``) against a launch per leaf; the ReLU's gradient in one kernel
(``relu_grad`` in ``backends/_fused_nn.py``) against its array code (a comparison, a product
and, for 16-bit floats, a cast); a 16-bit bias gradient's sum in one kernel (``half_sum``)
against a sum and a cast.

First the update of ``bench_gpu.py``'s MLP (10 leaves, width 4096) alone, SGD and Adam: host µs
to launch it, and µs per update with the device's work. Then eager `Sync` steps of that MLP
with the cuts on and off, and PyTorch eager's step, interleaved (medians of ``--repeats``): wall
ms per step, and this process's CPU ms per step (host work; a co-tenant's steal of the host's
cores does not count there, which makes it the steadier figure where the step is host-bound).

It switches private kernels on and off, so it imports private modules (listed in
``tests/test_layering.py``'s PRIVATE_BENCHMARKS). Run on a CUDA machine with torch:
python experiments/bench_launch_cuts.py --cases bfloat16:1024,float32:1024,bfloat16:64
(each case's eager runs set the MLP up afresh, a few seconds each: about a minute a case on the
lent H100 with the defaults).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

from asyncnn import nn, optim
from asyncnn._math._rules_elementwise import _relu_grad

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402
import bench_gpu  # noqa: E402

# cupy and the backend's fused kernels (which import cupy), and the kernels the cuts switch
# back to: set by main once the flags are read (--help needs no GPU)
cp: Any = None
_fused: Any = None
_fused_nn: Any = None
_ON: tuple[Any, ...] = ()


def _apart(*args: Any) -> None:
    return None  # no launch for many leaves: the optimizer updates them one by one


def _sum_and_cast(x: Any, axis: Any, keepdims: bool) -> Any:
    # acc_sum's own 16-bit path before the one-kernel sum (not a function of its own there)
    return x.sum(axis=axis, keepdims=keepdims, dtype=np.float32).astype(x.dtype)


def cuts(on: bool) -> None:
    """Turns the three cuts on, or back to the code before them."""
    _fused._apply_many, _fused_nn.relu_grad, _fused_nn.half_sum = (
        _ON if on else (_apart, _relu_grad, _sum_and_cast)
    )


def update_us(opt: Any, params: Any, n: int = 100) -> tuple[float, float]:
    """µs per update of ``params`` (gradients: the parameters themselves): host time to launch,
    and time with the device's work."""
    state = opt.init(params)
    opt.update(params, params, state)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        opt.update(params, params, state)
    t1 = time.perf_counter()
    cp.cuda.Device().synchronize()
    return (t1 - t0) / n * 1e6, (time.perf_counter() - t0) / n * 1e6


def case(dtype: str, batch: int, steps: int, repeats: int) -> None:
    params = nn.Sequential(*bench_gpu.mlp()).init(0, backend="cuda:0", dtype=dtype)
    for opt in (optim.SGD(lr=1e-3), optim.Adam(lr=1e-3)):
        runs: dict[str, list[tuple[float, float]]] = {"one launch": [], "a launch per leaf": []}
        for _ in range(repeats):
            for label, on in (("one launch", True), ("a launch per leaf", False)):
                cuts(on)
                runs[label].append(update_us(opt, params))
        cuts(True)
        line = "; ".join(
            f"{k}: host {np.median([r[0] for r in v]):.0f} µs, with the device "
            f"{np.median([r[1] for r in v]):.0f} µs"
            for k, v in runs.items()
        )
        print(f"{type(opt).__name__} update of 10 {dtype} leaves: {line}", flush=True)
    wall: dict[str, list[float]] = {"on": [], "off": [], "torch": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(repeats):
        for label, on in (("on", True), ("off", False)):
            cuts(on)
            times: dict[str, float] = {}
            wall[label].append(bench_gpu.steady_step(batch, dtype, steps, False, times=times) * 1e3)
            cpu[label].append(times["cpu"] * 1e3)
        cuts(True)
        wall["torch"].append(bench_gpu.torch_step(batch, dtype, steps) * 1e3)
    w = {k: float(np.median(v)) for k, v in wall.items()}
    c = {k: float(np.median(v)) for k, v in cpu.items()}
    print(
        f"eager Sync {dtype} batch {batch}: wall ms per step, cuts on {w['on']:.2f}, off "
        f"{w['off']:.2f}, torch {w['torch']:.2f} (eager/torch {w['on'] / w['torch']:.2f}, off "
        f"{w['off'] / w['torch']:.2f}); CPU ms per step, on {c['on']:.2f}, off {c['off']:.2f} "
        f"(off/on {c['off'] / c['on']:.2f})",
        flush=True,
    )
    for k, vs in [*wall.items(), *((f"CPU {k}", v) for k, v in cpu.items())]:
        print(f"   {k:>8}: " + " ".join(f"{v:.2f}" for v in vs))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", default="bfloat16:1024,float32:1024,bfloat16:64,float32:64",
                    help="dtype:batch,...")  # fmt: skip
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    global cp, _fused, _fused_nn, _ON
    cp = _common.need_cupy("bench_launch_cuts.py")
    from asyncnn.backends import _fused, _fused_nn

    _ON = (_fused._apply_many, _fused_nn.relu_grad, _fused_nn.half_sum)
    for spec in args.cases.split(","):
        dtype, batch = spec.split(":")
        case(dtype, int(batch), args.steps, args.repeats)


if __name__ == "__main__":
    main()
