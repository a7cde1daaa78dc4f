"""Benchmark of the shared CPU compute team (issue 15), in one run, samples/s of SGD on an MLP:

- a hand-written numpy step (``numpy by hand``), and the same step with its products and large
  elementwise passes split over a :class:`~asyncnn.backends.ComputeTeam` (one worker per core,
  one BLAS thread each);
- PyTorch eager on all cores, when torch is installed;
- asyncnn's plain ``value_and_grad`` loop, without and with the team (``using_team``);
- ``Sync`` with 1 and 4 stages, ``PipeDream(8)``, ``Async(4)`` and ``Async(4, stash=True)`` with 4
  stages, through the public API: once as the runtime sizes its pool today (``Trainer.fit``),
  once on a shared pool passed to ``open_run`` (``open_device_pool(cpu_workers=cores,
  blas_threads=1)``: every core a worker, large products and elementwise passes split across the
  free ones), with each worker's utilisation;
- on hosts of 8 cores or more, ``Async(4, stash)``, ``Async(8, stash)`` and ``PipeDream(8)`` with
  the 4 stages on ``LocalCluster(4)`` (one stage a worker process, ``cores // 4`` threads each:
  past one interpreter's lock), against the faster of the two one-process ``Sync`` runs on 1
  stage.

The main table is the MLP 784-2048x4-10 (float32) at batch 1024 and 64 on every core of this
process (``--batches`` picks them); ``--two-core`` adds the CI machine's case (784-1024x3-10,
batch 256) in a child process pinned to 2 cores. Ratios are against references measured in the
same run; each figure is the median of ``--repeats`` interleaved repeats.

``--tiny`` adds (``--only-tiny`` runs alone) the runtime's own cost where every op is tiny
(AMPNet's regime): a chain of 8 ``Linear(8, 8)``/``Tanh`` pairs, batch 4, float32, MSE loss, SGD,
in ms per step (wall, and this process's CPU time): the plain ``value_and_grad`` loop with the
same optimizer update, ``Sync`` with 1 and 4 stages in this process (``open_run``, and
``Trainer.fit`` for 1 stage), the 4 stages on ``LocalCluster(4)`` (one stage a worker), and
PyTorch eager (one thread) when installed, with ratios. ``--profile-tiny`` prints where the time
of ``Sync`` with 1 stage and of the plain loop goes (cProfile, by own time), and
``--stage-costs`` what 3 more stages add to each hook's time (timers around them).
``--blas-kernels ,Haswell,SkylakeX`` only compares OpenBLAS's kernels on this host (a 2048^2
product under each ``OPENBLAS_CORETYPE``; a host may force an older kernel than its CPU runs).
``--async-configs`` only compares asynchronous runs of the MLP across stage counts and keys in
flight (``ASYNC_CONFIGS``, each key's weights stashed, and ``PipeDream(4)``) with ``Sync`` on
one stage, at each of ``--batches``.

Run: python experiments/bench_parallel.py [--quick] [--two-core | --only-two-core] [--cores N]
[--tiny] [--batches 1024,64] [--blas-kernels NAMES] [--stage-costs] [--async-configs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402  (standard library only: loads no BLAS)


def cores_to_pin(argv: list[str]) -> list[int] | None:
    """The cores ``--cores N`` (or ``--cores=N``) in ``argv`` asks for: the first N this process
    may use; None without the flag. A value outside 1..(those cores) is a one-line usage error."""
    pre = _common.OneLineParser(prog=os.path.basename(__file__), add_help=False)
    pre.add_argument("--cores", type=int, default=None)
    n = pre.parse_known_args(argv)[0].cores
    if n is None:
        return None
    have = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(have):
        pre.error(f"argument --cores: must be in 1..{len(have)} (the cores this process may use), "
                  f"got {n}")  # fmt: skip
    return have[:n]


if __name__ == "__main__" and (_pin := cores_to_pin(sys.argv[1:])) is not None:
    os.sched_setaffinity(0, _pin)  # before numpy loads OpenBLAS, which sizes its threads then

import anyio  # noqa: E402
import numpy as np  # noqa: E402
from _mlp_references import by_hand, cores, data, torch_eager, value_and_grad_loop  # noqa: E402
from _step_parts import bit_identity, blas_info, blas_kernels, breakdown, pipedream_bound  # noqa: E402
from _tiny_chain import count_tiny, profile_tiny, show_tiny, stage_costs, tiny_table  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import nn, optim, policies  # noqa: E402
from asyncnn.backends import ComputeTeam, open_device_pool, tune_allocator  # noqa: E402

BIG = [784, 2048, 2048, 2048, 2048, 10]
SMALL = [784, 1024, 1024, 1024, 10]


#: the pause before each measurement of :func:`table` (see there)
SETTLE_SECONDS = 0.5

RUNS = [
    ("Sync, 1 stage", 1, lambda: policies.Sync()),
    ("Sync, 4 stages", 4, lambda: policies.Sync()),
    ("PipeDream(8), 4 stages", 4, lambda: policies.PipeDream(8)),
    ("Async(4), 4 stages", 4, lambda: policies.Async(4)),
    # the weights of each key's forward kept for its backward: no forward computed twice
    ("Async(4, stash), 4 stages", 4, lambda: policies.Async(4, stash=True)),
]

#: the same on 4 local worker processes (one stage each, ``cores // 4`` threads per worker): past
#: one interpreter's lock, which bounds the runs above at small batch (on hosts of 8 cores or more)
CLUSTER_WORKERS = 4
CLUSTER_RUNS = [
    ("Async(4, stash), 4 stages", lambda: policies.Async(4, stash=True)),
    ("Async(8, stash), 4 stages", lambda: policies.Async(8, stash=True)),
    ("PipeDream(8), 4 stages", lambda: policies.PipeDream(8)),
]


#: ``--async-configs``: the asynchronous runs tried against ``Sync`` on one stage, each key's
#: weights stashed (no forward computed twice), across stage counts and keys in flight
ASYNC_CONFIGS = [
    (f"Async({k}, stash), {s} stages", s, lambda k=k: policies.Async(k, stash=True))
    for s, k in [(2, 2), (2, 4), (3, 3), (3, 6), (4, 4), (4, 8), (5, 5), (5, 10), (7, 7), (9, 9)]
] + [("PipeDream(4), 4 stages", 4, lambda: policies.PipeDream(4))]


def async_configs(sizes: list[int], batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """samples/s of ``Sync`` on one stage and of each of :data:`ASYNC_CONFIGS`, through
    ``Trainer.fit`` and on a shared pool, interleaved over ``repeats`` rounds (medians)."""
    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, stages, policy in [("Sync, 1 stage", 1, lambda: policies.Sync())] + ASYNC_CONFIGS:
            samples.setdefault(f"{name}, Trainer.fit", []).append(
                runtime_today(sizes, batch, steps, stages, policy())
            )
            time.sleep(SETTLE_SECONDS)
            samples.setdefault(f"{name}, shared pool", []).append(
                runtime_shared(sizes, batch, steps, stages, policy())[0]
            )
            time.sleep(SETTLE_SECONDS)
    return {"samples_per_second": {k: statistics.median(v) for k, v in samples.items()},
            "all_repeats": samples}  # fmt: skip


def show_async_configs(title: str, result: dict[str, Any]) -> None:
    sps = result["samples_per_second"]
    print(title)
    print(f"   {'run':<46} {'samples/s':>10} {'x Sync 1':>9}   (each repeat)")
    for k, v in sps.items():
        ref = sps[f"Sync, 1 stage, {'shared pool' if k.endswith('shared pool') else 'Trainer.fit'}"]
        each = " ".join(f"{x:.0f}" for x in result["all_repeats"][k])
        print(f"   {k:<46} {v:10.0f} {v / ref:9.2f}   {each}")


def graph(sizes: list[int], stages: int, workers: list[int] | None = None) -> Any:
    return ann.Graph.sequential(
        _common.mlp_modules(sizes),
        loss=nn.CrossEntropyLoss(),
        stages=stages,
        input_shape=(None, sizes[0]),
        workers=workers,
    )


def runtime_today(sizes: list[int], batch: int, steps: int, stages: int, policy: Any) -> float:
    """samples/s of ``Trainer.fit``: the pool the runtime opens for itself today."""
    d = data(sizes, batch * steps)
    tr = ann.Trainer(graph(sizes, stages), optimizer=optim.SGD(lr=0.01), policy=policy)
    tr.fit({k: v[: batch * 2] for k, v in d.items()}, epochs=1, batch_size=batch)  # warm-up
    return float(tr.fit(d, epochs=1, batch_size=batch).samples_per_second)


def runtime_cluster(sizes: list[int], batch: int, steps: int, policy: Any, cluster: Any) -> float:
    """samples/s of ``Trainer.fit`` with stage i of :data:`CLUSTER_WORKERS` on worker i of
    ``cluster`` (a ``LocalCluster``: tensors between stages through shared memory)."""
    d = data(sizes, batch * steps)
    g = graph(sizes, CLUSTER_WORKERS, workers=list(range(CLUSTER_WORKERS)))
    tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.01), policy=policy, cluster=cluster)
    tr.fit({k: v[: batch * 2] for k, v in d.items()}, epochs=1, batch_size=batch)  # warm-up
    return float(tr.fit(d, epochs=1, batch_size=batch).samples_per_second)


def runtime_shared(
    sizes: list[int],
    batch: int,
    steps: int,
    stages: int,
    policy: Any,
    one_worker: bool = False,
) -> tuple[float, list[float]]:
    """samples/s of ``open_run`` on a shared pool (every core a worker, work split across them),
    and each worker's busy share of the timed window. ``one_worker``: a pool of one worker with
    BLAS on every core and products whole instead (the layout for one computing actor at a time,
    OpenBLAS's own threads doing the products)."""
    d = data(sizes, batch * steps)
    g = graph(sizes, stages)
    batches = [{k: v[i * batch : (i + 1) * batch] for k, v in d.items()} for i in range(steps)]
    shape = (
        {"cpu_workers": 1, "blas_threads": cores(), "split": False}
        if one_worker
        else {"cpu_workers": cores(), "blas_threads": 1}
    )

    async def main() -> tuple[float, list[float]]:
        async with open_device_pool(**shape) as pool:
            async with ann.open_run(g, optim.SGD(lr=0.01), policy, pool=pool) as run:
                for b in batches[:2]:  # warm-up
                    await run.step(b)
                await run.drain()
                busy0 = pool.statistics().busy_seconds
                start = time.perf_counter()
                for b in batches:
                    await run.step(b)
                await run.drain()
                wall = time.perf_counter() - start
                busy1 = pool.statistics().busy_seconds
        util = [(b1 - b0) / wall for b0, b1 in zip(busy0, busy1, strict=True)]
        return batch * steps / wall, util

    return anyio.run(main, backend="trio")


def table(sizes: list[int], batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """Every measurement of one (model, batch), interleaved over ``repeats`` rounds."""
    n = cores()
    samples: dict[str, list[float]] = {}
    utilisation: dict[str, list[float]] = {}

    def add(name: str, value: float | None) -> None:
        if value is not None:
            samples.setdefault(name, []).append(value)
        # OpenBLAS's (and torch's OpenMP) idle threads spin for about 0.1 s after a call and
        # take cores from whatever is measured next: each measurement starts after they sleep
        time.sleep(SETTLE_SECONDS)

    with contextlib.ExitStack() as stack:
        cluster = None
        if n >= 2 * CLUSTER_WORKERS:
            from asyncnn.cluster import LocalCluster

            cluster = stack.enter_context(
                LocalCluster(CLUSTER_WORKERS, threads_per_worker=n // CLUSTER_WORKERS)
            )
        for _ in range(repeats):
            _round(sizes, batch, steps, n, add, utilisation, cluster)
    return {
        "samples_per_second": {k: statistics.median(v) for k, v in samples.items()},
        "all_repeats": samples,
        "worker_utilisation_last_repeat": utilisation,
    }


def _round(
    sizes: list[int],
    batch: int,
    steps: int,
    n: int,
    add: Callable[[str, float | None], None],
    utilisation: dict[str, list[float]],
    cluster: Any,
) -> None:
    """One round of :func:`table`: the references, then the runs."""
    # the references first, with BLAS on every core; then the same on a team (which holds
    # BLAS at one thread while it is open); then the runs
    add("numpy by hand", by_hand(sizes, batch, steps, None))
    add("value_and_grad loop", value_and_grad_loop(sizes, batch, steps, None))
    with ComputeTeam(n) as team:
        t0 = time.perf_counter()
        add("numpy by hand, on the team", by_hand(sizes, batch, steps, team))
        wall = time.perf_counter() - t0
        utilisation["numpy by hand, on the team"] = [
            b / wall for b in team.statistics().busy_seconds
        ]
        add("value_and_grad loop, on the team", value_and_grad_loop(sizes, batch, steps, team))
    # the runs in the same round as the references: a drift of the machine between rounds
    # (a 2-vCPU VM's BLAS rate moves by 30% between quiet runs) moves both alike
    add("PyTorch eager", torch_eager(sizes, batch, steps))
    for name, stages, policy in RUNS:
        add(
            f"{name}, runtime's pool today",
            runtime_today(sizes, batch, steps, stages, policy()),
        )
        rate, util = runtime_shared(sizes, batch, steps, stages, policy())
        add(f"{name}, shared pool", rate)
        utilisation[f"{name}, shared pool"] = util
        if name.startswith("Sync"):  # one actor computes at a time
            rate, _ = runtime_shared(sizes, batch, steps, stages, policy(), one_worker=True)
            add(f"{name}, one worker, BLAS threads", rate)
    if cluster is not None:
        for name, policy in CLUSTER_RUNS:
            add(
                f"{name}, LocalCluster({CLUSTER_WORKERS})",
                runtime_cluster(sizes, batch, steps, policy(), cluster),
            )


def _mlp_steps(batch: int, quick: bool) -> int:
    """Steps timed per run of the 16-core MLP at ``batch`` (a large batch's step is long)."""
    if batch >= 512:
        return 2 if quick else 8
    return 5 if quick else 40


def show(title: str, result: dict[str, Any]) -> None:
    sps = result["samples_per_second"]
    hand = sps["numpy by hand"]
    torch_sps = sps.get("PyTorch eager")
    sync1 = {
        "today": sps["Sync, 1 stage, runtime's pool today"],
        "shared": sps["Sync, 1 stage, shared pool"],
    }
    print(title)
    head = f"   {'run':<46} {'samples/s':>10} {'x numpy':>8} {'x torch':>8} {'x Sync 1':>9}"
    print(head)
    for k, v in sps.items():
        if "LocalCluster" in k:  # against the faster of the two one-process Sync runs
            ref1 = max(sync1.values())
        else:
            ref1 = sync1["shared"] if k.endswith("shared pool") else sync1["today"]
        tt = f"{v / torch_sps:8.2f}" if torch_sps else f"{'-':>8}"
        print(f"   {k:<46} {v:10.0f} {v / hand:8.2f} {tt} {v / ref1:9.2f}")
    print("   busy share of each worker (last repeat):")
    for k, util in result["worker_utilisation_last_repeat"].items():
        print(f"   {k:<46} mean {np.mean(util):4.2f}  " + " ".join(f"{u:.2f}" for u in util))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="few steps, one repeat (a smoke run)")
    ap.add_argument("--two-core", action="store_true", help="add the 2-core case (child process)")
    ap.add_argument(
        "--only-two-core",
        action="store_true",
        help="run only the 2-core case, in this process (with --cores 2 on a larger host)",
    )
    ap.add_argument("--cores", type=int, default=None, help="pin to the first N cores")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--batches", default="1024,64", help="the main table's batch sizes (comma-separated)"
    )
    ap.add_argument("--tiny", action="store_true", help="add the tiny chain (runtime's cost)")
    ap.add_argument("--only-tiny", action="store_true", help="run only the tiny chain")
    ap.add_argument("--profile-tiny", action="store_true", help="profile the tiny chain")
    ap.add_argument(
        "--count-tiny", action="store_true",
        help="count the tiny chain's work per step (bytecodes and calls, not time: about the "
             "same under any load), by function",
    )  # fmt: skip
    ap.add_argument(
        "--stage-costs", action="store_true",
        help="time the tiny chain's hooks on 1 and 4 stages: what a stage adds, hook by hook",
    )  # fmt: skip
    ap.add_argument(
        "--blas-kernels", default=None, metavar="NAMES",
        help="only compare OpenBLAS kernels: a 2048^2 product's GFLOP/s under each "
             "OPENBLAS_CORETYPE named (comma-separated, e.g. ,Haswell,SkylakeX; empty: the "
             "environment's own)",
    )  # fmt: skip
    ap.add_argument(
        "--async-configs", action="store_true",
        help="only compare asynchronous configurations (stages, keys in flight; stashed "
             "weights) with Sync on one stage, at each of --batches",
    )  # fmt: skip
    ap.add_argument("--out", default="runs/bench_parallel.json")
    args = ap.parse_args()
    if args.blas_kernels is not None:
        kernels = blas_kernels(args.blas_kernels.split(","))
        for name, r in kernels.items():
            rate = f"{r['gflops']:8.0f} GFLOP/s, kernel {r['kernel']}" if "gflops" in r else r
            print(f"OPENBLAS_CORETYPE={name}: {rate}")
        _common.write_json(args.out, {"machine": _common.machine(), "blas kernels": kernels})
        return
    tune_allocator()
    repeats = 1 if args.quick else args.repeats
    report: dict[str, Any] = {"machine": _common.machine(), "cores": cores(), "blas": blas_info()}
    if args.stage_costs:
        stage_costs(200 if args.quick else 2000, repeats)
        return
    if args.profile_tiny:
        profile_tiny(200 if args.quick else 1000)
        return
    if args.count_tiny:
        report["tiny chain counted"] = count_tiny(10 if args.quick else 50)
        _common.write_json(args.out, report)
        return
    if args.tiny or args.only_tiny:
        steps = 100 if args.quick else 1000
        tiny = tiny_table(steps, repeats, steps // 4)
        report["tiny chain"] = tiny
        show_tiny(tiny, repeats)
        if args.only_tiny:
            _common.write_json(args.out, report)
            return
    print(f"{cores()} cores; BLAS: {json.dumps(report['blas'])}")
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
    if args.async_configs:
        for b in (int(x) for x in args.batches.split(",")):
            steps = _mlp_steps(b, args.quick)
            title = f"MLP 784-2048x4-10, float32, batch {b}: asynchronous configurations"
            result = async_configs(BIG, b, steps, repeats)
            report[title] = result
            show_async_configs(f"{title} ({cores()} cores, median of {repeats}):", result)
        _common.write_json(args.out, report)
        return
    cases = (
        [("2-core case: MLP 784-1024x3-10, batch 256", SMALL, 256, 3 if args.quick else 30)]
        if args.only_two_core
        else [
            (f"MLP 784-2048x4-10, float32, batch {b}", BIG, b, _mlp_steps(b, args.quick))
            for b in (int(x) for x in args.batches.split(","))
        ]
    )  # fmt: skip
    for title, sizes, batch, steps in cases:
        ident = bit_identity(sizes, batch)
        print(f"split products bit-identical to uncut 1-thread ones, batch {batch}:")
        for k, v in ident.items():
            print(f"   {k:<48} {v}")
        parts = breakdown(sizes, batch, max(2, steps // 2))
        print(f"one step's parts alone, batch {batch}:")
        for k, v in parts.items():
            rate = f"  {parts['GFLOP per step'] / v * 1e3:7.0f} GFLOP/s" if "products" in k else ""
            print(f"   {k:<40} {v:9.2f}{rate}")
        result = table(sizes, batch, steps, repeats)
        result["bit_identical"] = ident
        result["breakdown"] = parts
        sps = result["samples_per_second"]
        sync_ms = 1e3 * batch / max(sps["Sync, 1 stage, runtime's pool today"],
                                    sps["Sync, 1 stage, shared pool"])  # fmt: skip
        result["PipeDream(8) bound"] = pipedream_bound(parts, sync_ms)
        report[title] = result
        show(f"{title} ({cores()} cores, median of {repeats}):", result)
        print(
            f"   what PipeDream(8)'s own work allows, against the faster Sync 1 stage ({sync_ms:.1f} ms a step):"
        )
        for k, v in result["PipeDream(8) bound"].items():
            print(f"   {k:<78} {v:5.2f}")
    if args.two_core and not args.only_two_core:
        out2 = os.path.splitext(args.out)[0] + "_2core.json"
        cmd = [sys.executable, __file__, "--only-two-core", "--cores", "2", "--out", out2]
        cmd += ["--repeats", str(repeats)] + (["--quick"] if args.quick else [])
        subprocess.run(cmd, check=True)
    _common.write_json(args.out, report)


if __name__ == "__main__":
    main()
