"""Where a training step's time goes on the compute team, and what two other layouts would give.

For the MLP of ``bench_parallel.py`` (784-2048x4-10 on hosts of more than 4 cores, else
784-1024x3-10; float32, SGD, batch ``--batch``), in ms per step, medians of ``--repeats``
interleaved rounds:

- ``numpy by hand``: ``_numpy_mlp.sgd_step`` with OpenBLAS's own threads (the reference);
- ``numpy on the team`` and ``value_and_grad on the team``: products and large elementwise
  passes cut across a :class:`~asyncnn.backends.ComputeTeam` (one worker per core, one BLAS
  thread each), the runtime's layout;
- ``Sync, 1 stage``: ``open_run`` on a shared pool (``open_device_pool(cpu_workers=cores,
  blas_threads=1)``);
- ``products on BLAS threads``: the same three with every product whole on OpenBLAS's own
  threads (one thread per core) and only the elementwise passes on the team: a layout for
  one computing actor at a time, which ``bench_parallel.py``'s step parts suggested;
- with ``--part-elements``, ``value_and_grad on the team`` for teams cutting elementwise passes
  into parts of at least that many elements;
- PyTorch eager on every core, when installed.

Each line also splits the step: the time inside the team's products (``matmul``), elementwise
passes (``elementwise``) and column sums (``sum_rows``), timed around the calls, and the rest
(the loss, the optimizer's update, small ops, Python).

Run: python experiments/profile_team_step.py [--batch 1024] [--steps 12] [--repeats 3]
[--part-elements 131072,524288]
(on a lent GPU machine's CPU: ``CUDA_VISIBLE_DEVICES= python ...``)
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
import _numpy_mlp  # noqa: E402
import anyio  # noqa: E402
import numpy as np  # noqa: E402
import threadpoolctl  # noqa: E402
from _mlp_references import cores, data, numpy_step_on_team, torch_eager  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import nn, optim, policies  # noqa: E402
from asyncnn.backends import ComputeTeam, open_device_pool, tune_allocator, using_team  # noqa: E402

#: the team's methods whose time each line splits out
KINDS = ("matmul", "elementwise", "sum_rows")


class Timers:
    """Time spent inside :class:`ComputeTeam`'s :data:`KINDS` (from any thread), and whether
    its products run whole on BLAS's own threads instead of being cut across the team."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.whole_products = False
        self._real = {k: getattr(ComputeTeam, k) for k in KINDS}
        for kind in KINDS:
            setattr(ComputeTeam, kind, self._timed(kind))

    def _timed(self, kind: str) -> Callable[..., Any]:
        real = self._real[kind]
        seconds = self.seconds

        def call(team: ComputeTeam, *args: Any) -> Any:
            start = time.perf_counter()
            try:
                if kind == "matmul" and self.whole_products:
                    return np.matmul(args[0], args[1])
                return real(team, *args)
            finally:
                seconds[kind] += time.perf_counter() - start

        return call

    @contextmanager
    def products_on_blas_threads(self, on: bool) -> Iterator[None]:
        """Within the block (``on``), products go whole to BLAS on one thread per core."""
        if not on:
            yield
            return
        with threadpoolctl.threadpool_limits(cores(), user_api="blas"):
            self.whole_products = True
            try:
                yield
            finally:
                self.whole_products = False


def sync_step_seconds(
    timers: Timers, sizes: list[int], batch: int, steps: int, whole: bool
) -> tuple[float, dict[str, float]]:
    """ms a step of ``Sync`` on one stage through ``open_run`` on a shared pool, and its split."""
    g = ann.Graph.sequential(
        _common.mlp_modules(sizes), loss=nn.CrossEntropyLoss(), input_shape=(None, sizes[0])
    )
    d = data(sizes, batch * steps)
    batches = [{k: v[i * batch : (i + 1) * batch] for k, v in d.items()} for i in range(steps)]

    async def main() -> tuple[float, dict[str, float]]:
        async with open_device_pool(cpu_workers=cores(), blas_threads=1) as pool:
            async with ann.open_run(g, optim.SGD(lr=0.01), policies.Sync(), pool=pool) as run:
                for b in batches[:2]:  # warm-up
                    await run.step(b)
                await run.drain()
                with timers.products_on_blas_threads(whole):
                    timers.seconds.clear()
                    start = time.perf_counter()
                    for b in batches:
                        await run.step(b)
                    await run.drain()
                    wall = time.perf_counter() - start
        return wall / steps, {k: v / steps for k, v in timers.seconds.items()}

    return anyio.run(main, backend="trio")


def loop_seconds(
    timers: Timers, step: Callable[[], object], steps: int, team: ComputeTeam | None, whole: bool
) -> tuple[float, dict[str, float]]:
    with using_team(team), timers.products_on_blas_threads(whole):
        for _ in range(2):  # warm-up
            step()
        timers.seconds.clear()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    return wall / steps, {k: v / steps for k, v in timers.seconds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--part-elements", default="",
        help="comma-separated part sizes of elementwise passes to compare (value_and_grad)",
    )  # fmt: skip
    args = ap.parse_args()
    tune_allocator()
    n = cores()
    sizes = [784, 2048, 2048, 2048, 2048, 10] if n > 4 else [784, 1024, 1024, 1024, 10]
    batch, steps = args.batch, args.steps
    timers = Timers()
    d = data(sizes, batch)
    params = _numpy_mlp.init(sizes)
    model = nn.Sequential(*_common.mlp_modules(sizes))
    vg_step = _common.plain_step(model, nn.CrossEntropyLoss(), optim.SGD(lr=0.01))
    sweep = [int(p) for p in args.part_elements.split(",") if p]
    teams = {pe: ComputeTeam(n, blas_threads=1, part_elements=pe).start() for pe in sweep}
    team = ComputeTeam(n, blas_threads=1).start()

    def by_hand() -> None:
        _numpy_mlp.sgd_step(params, d["x"], d["y"], 0.01)

    def on_team() -> None:
        numpy_step_on_team(params, d["x"], d["y"], 0.01)

    def vg() -> None:
        vg_step(d["x"], d["y"])

    runs: dict[str, Callable[[], tuple[float, dict[str, float]]]] = {
        "numpy by hand (BLAS threads)": lambda: loop_seconds(timers, by_hand, steps, None, False),
    }
    for whole, tag in ((False, ""), (True, ", products on BLAS threads")):
        runs[f"numpy on the team{tag}"] = lambda w=whole: loop_seconds(
            timers, on_team, steps, team, w
        )
        runs[f"value_and_grad on the team{tag}"] = lambda w=whole: loop_seconds(
            timers, vg, steps, team, w
        )
        runs[f"Sync, 1 stage, shared pool{tag}"] = lambda w=whole: sync_step_seconds(
            timers, sizes, batch, steps, w
        )
    for pe, t in teams.items():
        runs[f"value_and_grad on the team, parts >= {pe} elements"] = lambda t=t: loop_seconds(
            timers, vg, steps, t, False
        )
    found: dict[str, list[tuple[float, dict[str, float]]]] = collections.defaultdict(list)
    for _ in range(args.repeats):
        for name, run in runs.items():
            found[name].append(run())
            time.sleep(0.5)  # (OpenBLAS's idle threads spin a while after a call)
    team.close()
    for t in teams.values():
        t.close()
    print(
        f"MLP {'-'.join(map(str, sizes))}, batch {batch}, {n} cores, ms a step "
        f"(median of {args.repeats}); inside the team's calls, and the rest:"
    )
    for name, results in found.items():
        step = statistics.median(r[0] for r in results)
        split = {k: statistics.median(r[1].get(k, 0.0) for r in results) for k in KINDS}
        rest = step - sum(split.values())
        parts = "  ".join(f"{k} {v * 1e3:6.1f}" for k, v in split.items())
        print(f"  {name:58s} {step * 1e3:7.1f}   {parts}  rest {rest * 1e3:6.1f}")
    rate = torch_eager(sizes, batch, steps)
    if rate is not None:
        print(f"  {'PyTorch eager':58s} {batch / rate * 1e3:7.1f}")


if __name__ == "__main__":
    main()
