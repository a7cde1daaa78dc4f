"""How a compute team's cut of a large product compares with OpenBLAS's own threads, on the
products of one SGD step of the 16-core MLP (784-2048x4-10, float32): the team's cut along the
larger output dimension (what :meth:`~asyncnn.backends.ComputeTeam.matmul` does), cuts into a
grid of output blocks (each part multiplies a block of rows by a block of columns, so it packs
a part of each operand, not the whole of one), and one call on OpenBLAS's threads. Each figure
is the best of ``--repeats`` timings of all of the step's products, in ms, with GFLOP/s; each
cut is checked to equal the uncut one-thread product bit for bit.

Run: python experiments/bench_product_cuts.py [--batch 1024] [--repeats 5]
(on a GPU host, with CUDA_VISIBLE_DEVICES= so that nothing touches the GPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _step_parts import step_products  # noqa: E402

from asyncnn.backends import ComputeTeam, split_bounds  # noqa: E402

#: blocks of whole 16 rows or columns, as the team cuts (BLAS kernels work in such blocks)
ALIGN = 16

SIZES = [784, 2048, 2048, 2048, 2048, 10]


def grid_matmul(team: ComputeTeam, a: np.ndarray, b: np.ndarray, rows: int, cols: int) -> Any:
    """``a @ b`` cut into ``rows`` x ``cols`` output blocks (whole 16-wide blocks), one part
    each, on the team's threads."""
    m, n = a.shape[0], b.shape[1]
    rb = split_bounds(m, rows, ALIGN)
    cb = split_bounds(n, cols, ALIGN)
    if min(m, n) < 2 * ALIGN:  # (a product to 10 classes: whole, as the team leaves it)
        return a @ b
    out = np.empty((m, n), dtype=a.dtype)
    blocks = [(r, c) for r in range(len(rb) - 1) for c in range(len(cb) - 1)]

    def part(i: int) -> None:
        r, c = blocks[i]
        np.matmul(
            a[rb[r] : rb[r + 1]],
            b[:, cb[c] : cb[c + 1]],
            out=out[rb[r] : rb[r + 1], cb[c] : cb[c + 1]],
        )

    team.run_parts(part, len(blocks))
    return out


def best_ms(fn: Any, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    prods = step_products(SIZES, args.batch)
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in prods)
    grids = [(r, cores // r) for r in (1, 2, 4, 8, 16) if cores % r == 0 and r <= cores]
    print(
        f"{cores} cores, batch {args.batch}: the step's {len(prods)} products, {flops / 1e9:.1f} GFLOP"
    )
    results: dict[str, float] = {}
    results["OpenBLAS, all threads, one call each"] = best_ms(
        lambda: [a @ b for a, b in prods], args.repeats
    )
    with ComputeTeam(cores) as team:
        want = [a @ b for a, b in prods]  # (one BLAS thread while the team is open)
        results["team, cut along the larger output dimension (today)"] = best_ms(
            lambda: [team.matmul(a, b) for a, b in prods], args.repeats
        )
        same = all(
            np.array_equal(team.matmul(a, b), w) for (a, b), w in zip(prods, want, strict=True)
        )
        print(f"   today's cut equals the one-thread products bit for bit: {same}")
        for r, c in grids:
            name = f"team, grid of {r} x {c} output blocks"
            results[name] = best_ms(
                lambda r=r, c=c: [grid_matmul(team, a, b, r, c) for a, b in prods], args.repeats
            )
            same = all(
                np.array_equal(grid_matmul(team, a, b, r, c), w)
                for (a, b), w in zip(prods, want, strict=True)
            )
            print(f"   {r} x {c} equals the one-thread products bit for bit: {same}")
    for k, v in results.items():
        print(f"   {k:<56} {v:8.2f} ms {flops / v / 1e6:8.0f} GFLOP/s")


if __name__ == "__main__":
    main()
