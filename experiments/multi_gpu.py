"""Pipelines across several GPUs (issue 9): samples/s for K = 1, 2, 4, 8 GPUs against one GPU,
and the rate at which tensors move between GPUs, against what torch/NCCL reach in the same run.

1. Throughput. An MLP of K stages, each ``layers_per_stage`` Linear(width, width) + ReLU (the
   last stage ends in a Linear to 10 classes), one stage per GPU, trained under GPipe, OneFOneB
   and PipeDream with M = 4K microbatches of ``microbatch`` rows, in one process (devices
   cuda:0..K-1; peer copies ordered by events) and across K worker processes (LocalCluster, stage
   i on worker i's cuda:i; tensors between processes go through the host over TCP). The
   reference is the same K-stage model as one stage on one GPU under Sync, at the same minibatch
   (M x microbatch rows): speedup = samples/s on K GPUs / samples/s on one. Targets: >= 0.8 K for
   OneFOneB and PipeDream; GPipe (and OneFOneB, which also flushes) is bounded by the bubble,
   K (1 - (K-1)/(5K-1)) at M = 4K.
2. Transfer rates between two GPUs (MB/s counted once per byte moved): cupy's peer copy (what an
   actor's ``backend.asarray`` does) and torch's device-to-device copy in one process; NCCL
   send/recv between two processes (torch.distributed); and asyncnn's effective stage-to-stage
   rate (activation forward + gradient back, per step time of a two-stage graph with almost no
   compute) in one process and across two worker processes.

On one GPU it runs K = 1 (and, with ``--same-gpu true``, K stages sharing cuda:0: a stand-in
for the code paths, not for the scaling); transfers are then same-GPU copies, and NCCL is
skipped (it refuses two ranks on one GPU). Without a GPU it exits saying so, unless
``--cpu-smoke true`` (the whole script on the CPU at toy sizes, to check the script itself: width
32, one layer per stage, microbatches of 4 rows, one timed step, 1 MiB copies; flags given with
it win).

NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the device machines require.

Run: python experiments/multi_gpu.py [--max-k 8] [--out runs/multi_gpu]
     (writes multi_gpu.json and multi_gpu.md into --out; bash experiments/multi_gpu.sh on the device)
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before torch or cupy load NCCL, and inherited by children

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import nn, optim, policies  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    max_k: int = 8  # the largest K tried (capped by the GPUs present)
    width: int = 4096  # a 4096-wide float32 layer at 256 rows keeps an H100's matmul units busy
    layers_per_stage: int = 4  # ~2 ms of compute per stage and microbatch on an H100 (float32)
    microbatch: int = 256  # rows per microbatch; the minibatch is 4K of them
    steps: int = 8  # timed minibatches per configuration
    warmup: int = 2  # untimed minibatches first (kernel caches, memory pools)
    dtype: str = "float32"  # of the weights and the messages
    policies: tuple[str, ...] = ("gpipe", "1f1b", "pipedream")  # the schedules timed
    modes: tuple[str, ...] = ("process", "workers")  # one process; K worker processes
    same_gpu: bool = False  # stand-in: every stage on cuda:0, K up to max_k
    copy_mib: tuple[int, ...] = (4, 64, 256)  # message sizes for the transfer rates
    copy_reps: int = 20  # copies timed per message size and GPU pair
    time_budget_s: float = 300.0  # configurations past this are skipped (tests + this < 600 s)
    # the whole script on the CPU at toy sizes (checks the script; flags given win)
    cpu_smoke: bool = False
    out: str = "runs/multi_gpu"  # multi_gpu.json and multi_gpu.md


# what 0 makes meaningless (an empty table, an empty batch, a copy never timed); --warmup 0 is fine
POSITIVE = ("max_k", "width", "layers_per_stage", "microbatch", "steps", "copy_mib", "copy_reps",
            "time_budget_s")  # fmt: skip

# --cpu-smoke's sizes: seconds on a CPU
SMOKE = {"width": 32, "layers_per_stage": 1, "microbatch": 4, "steps": 1, "warmup": 1,
         "copy_mib": (1,), "copy_reps": 2}  # fmt: skip

POLICIES = {"gpipe": policies.GPipe, "1f1b": policies.OneFOneB, "pipedream": policies.PipeDream}


# -- the machine ----------------------------------------------------------------------------------


def gpu_info() -> dict[str, Any]:
    """GPU count, names, and which pairs can reach each other's memory (peer access)."""
    import cupy

    rt = cupy.cuda.runtime
    n = int(rt.getDeviceCount())
    names = [_common.card_name(i) for i in range(n)]
    peer = [[i == j or bool(rt.deviceCanAccessPeer(i, j)) for j in range(n)] for i in range(n)]
    return {"count": n, "names": names, "peer_access": peer, "cupy": cupy.__version__}


def synchronize(devices: list[str]) -> None:
    for d in sorted(set(devices)):
        if d.startswith("cuda"):
            ann.backends.get_backend(d).synchronize()


# -- 1. throughput ----------------------------------------------------------------------------------


def model(k: int, cfg: Config) -> tuple[list[Any], list[int]]:
    """K stages of ``layers_per_stage`` Linear+ReLU; the last also has the Linear to 10 classes."""
    modules: list[Any] = []
    sizes = []
    for s in range(k):
        for _ in range(cfg.layers_per_stage):
            modules += [nn.Linear(cfg.width, cfg.width), nn.ReLU()]
        sizes.append(2 * cfg.layers_per_stage + (1 if s == k - 1 else 0))
    modules.append(nn.Linear(cfg.width, 10))
    return modules, sizes


def dataset(rows: int, cfg: Config, on_gpu: bool) -> dict[str, Any]:
    if on_gpu:  # the data lives on stage 0's GPU, as a torch user's would
        import cupy

        with cupy.cuda.Device(0):
            rng = cupy.random.default_rng(0)
            x = rng.standard_normal((rows, cfg.width), dtype=cupy.float32)
            return {"x": x, "y": rng.integers(0, 10, rows).astype(cupy.int64)}
    rng_np = np.random.default_rng(0)
    return {"x": rng_np.standard_normal((rows, cfg.width)).astype(np.float32),
            "y": rng_np.integers(0, 10, rows)}  # fmt: skip


def timed_fit(tr: ann.Trainer, data: dict[str, Any], rows: int, cfg: Config,
              devices: list[str]) -> float:  # fmt: skip
    """Fits the first ``warmup`` minibatches of ``rows`` of ``data`` untimed, then the rest;
    returns the seconds of the rest (the devices synchronised before and after)."""
    if cfg.warmup:
        tr.fit({k: v[: rows * cfg.warmup] for k, v in data.items()}, batch_size=rows)
    synchronize(devices)
    start = time.perf_counter()
    tr.fit({k: v[rows * cfg.warmup :] for k, v in data.items()}, batch_size=rows)
    synchronize(devices)
    return time.perf_counter() - start


def samples_per_second(
    graph: ann.Graph, policy: Any, rows: int, cfg: Config, devices: list[str], cluster: Any = None
) -> float:
    """Trains ``warmup`` then ``steps`` minibatches of ``rows``; samples/s of the timed part."""
    on_gpu = cluster is None and not cfg.cpu_smoke
    data = dataset(rows * (cfg.warmup + cfg.steps), cfg, on_gpu)
    # eager in every row: worker processes cannot capture, and one GPU would by default, so
    # rows in one process and across workers compare like with like
    tr = ann.Trainer(graph, optimizer=optim.SGD(lr=1e-3), policy=policy, dtype=cfg.dtype,
                     cluster=cluster, cuda_graphs=False)  # fmt: skip
    return rows * cfg.steps / timed_fit(tr, data, rows, cfg, devices)


def stage_devices(k: int, cfg: Config) -> list[str]:
    if cfg.cpu_smoke:
        return ["cpu"] * k
    return ["cuda:0"] * k if cfg.same_gpu else [f"cuda:{i}" for i in range(k)]


def gpipe_bound(k: int, m: int) -> float:
    """The fraction of a flush schedule's time that a stage computes: 1 - (K-1)/(M+K-1)."""
    return 1.0 - (k - 1) / (m + k - 1)


def throughput(ks: list[int], cfg: Config, deadline: float) -> list[dict[str, Any]]:
    rows_out = []
    for k in ks:
        m = 4 * k
        rows = m * cfg.microbatch
        modules, sizes = model(k, cfg)
        devices = stage_devices(k, cfg)
        one = stage_devices(1, cfg)
        if time.perf_counter() > deadline:
            print(f"K={k}: skipped, past the time budget")
            rows_out.append({"k": k, "skipped": "time budget"})
            continue
        ref_graph = ann.Graph.sequential(modules, loss=nn.CrossEntropyLoss(), stages=1,
                                         input_shape=(None, cfg.width), devices=one)  # fmt: skip
        base = samples_per_second(ref_graph, policies.Sync(), rows, cfg, one)
        print(
            f"K={k}: one GPU, Sync, {len(modules)} modules, minibatch {rows}: {base:,.0f} samples/s"
        )
        for mode in cfg.modes:
            cluster = ann.cluster.LocalCluster(workers=k) if mode == "workers" else None
            try:
                for name in cfg.policies:
                    if time.perf_counter() > deadline:
                        rows_out.append({"k": k, "mode": mode, "policy": name,
                                         "skipped": "time budget"})  # fmt: skip
                        continue
                    graph = ann.Graph.sequential(
                        modules, loss=nn.CrossEntropyLoss(), stages=sizes,
                        input_shape=(None, cfg.width), devices=devices,
                        workers=list(range(k)) if cluster is not None else None,
                    )  # fmt: skip
                    rate = samples_per_second(graph, POLICIES[name](m), rows, cfg, devices, cluster)
                    speedup = rate / base
                    row = {"k": k, "m": m, "mode": mode, "policy": name,
                           "samples_per_s": rate, "one_gpu_samples_per_s": base,
                           "speedup": speedup, "efficiency": speedup / k,
                           "target_speedup": (0.8 * k if name != "gpipe" else None),
                           "bubble_bound_speedup": k * gpipe_bound(k, m),
                           "devices": devices}  # fmt: skip
                    rows_out.append(row)
                    print(f"   {mode:<8} {name:<9} M={m:<3} {rate:12,.0f} samples/s   "
                          f"speedup {speedup:5.2f} (K={k}; bubble bound "
                          f"{k * gpipe_bound(k, m):.2f})")  # fmt: skip
            finally:
                if cluster is not None:
                    cluster.close()
    return rows_out


# -- 2. transfer rates --------------------------------------------------------------------------------


def cupy_copy_rate(src: int, dst: int, mib: int, reps: int) -> float:
    """MB/s of ``backend.copy_to`` from cuda:src to cuda:dst (a plain copy when they are one)."""
    import cupy

    n = mib * 2**20 // 4
    with cupy.cuda.Device(src):
        x = cupy.ones(n, dtype=cupy.float32)
    backend = ann.backends.get_backend(f"cuda:{src}")
    with cupy.cuda.Device(dst):
        stream = cupy.cuda.Stream(non_blocking=True)

    def copy() -> None:
        with cupy.cuda.Device(dst), stream:
            backend.copy_to(x, f"cuda:{dst}") if src != dst else x.copy()

    seconds = _common.seconds_per_call(copy, reps, sync=stream.synchronize)
    return n * 4 / seconds / 1e6


def torch_copy_rate(src: int, dst: int, mib: int, reps: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    x = torch.ones(mib * 2**20 // 4, device=f"cuda:{src}")
    target = torch.device(f"cuda:{dst}")

    def copy() -> None:
        x.to(target) if src != dst else x.clone()

    def sync() -> None:
        torch.cuda.synchronize(src)
        torch.cuda.synchronize(dst)

    return x.numel() * 4 / _common.seconds_per_call(copy, reps, sync=sync) / 1e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nccl_rank(rank: int, port: int, sizes: list[int], reps: int, path: str) -> None:
    """One rank of the NCCL send/recv measurement (rank 0 sends to rank 1 on GPU 1)."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rates = {}
    for mib in sizes:
        t = torch.ones(mib * 2**20 // 4, device=f"cuda:{rank}")
        for i in range(reps + 2):  # two untimed rounds set the connection up
            if i == 2:
                torch.cuda.synchronize()
                dist.barrier()
                start = time.perf_counter()
            if rank == 0:
                dist.send(t, 1)
            else:
                dist.recv(t, 0)
        torch.cuda.synchronize()
        rates[str(mib)] = t.numel() * 4 * reps / (time.perf_counter() - start) / 1e6
    dist.destroy_process_group()
    if rank == 1:
        with open(path, "w") as f:
            json.dump(rates, f)


def nccl_rates(sizes: list[int], reps: int) -> dict[str, float] | str:
    """MB/s of torch.distributed NCCL send/recv between two processes on GPUs 0 and 1."""
    try:
        import torch.multiprocessing as mp
    except ImportError:
        return "not measured: torch is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "nccl.json")
        mp.spawn(_nccl_rank, args=(_free_port(), sizes, reps, path), nprocs=2, join=True)
        with open(path) as f:
            return dict(json.load(f))


def asyncnn_stage_rate(mib: int, cfg: Config, devices: list[str], workers: bool) -> float:
    """Effective MB/s between two stages: (activation + gradient bytes) x steps / time.

    Stage 0 is Linear(16, width) (its input is small), stage 1 a ReLU, the loss a cross-entropy
    over ``width`` classes: the step is mostly the two tensors crossing the boundary."""
    rows = max(1, mib * 2**20 // (4 * cfg.width))
    graph = ann.Graph.sequential(
        [nn.Linear(16, cfg.width), nn.ReLU()], loss=nn.CrossEntropyLoss(), stages=[1, 1],
        input_shape=(None, 16), devices=devices, workers=[0, 1] if workers else None,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    n = rows * (cfg.warmup + cfg.steps)
    data = {"x": rng.standard_normal((n, 16)).astype(np.float32),
            "y": rng.integers(0, cfg.width, n)}  # fmt: skip
    cluster = ann.cluster.LocalCluster(workers=2) if workers else None
    try:  # eager, as in samples_per_second
        tr = ann.Trainer(graph, optimizer=optim.SGD(lr=1e-3), policy=policies.Sync(),
                         cluster=cluster, cuda_graphs=False)  # fmt: skip
        seconds = timed_fit(tr, data, rows, cfg, devices)
    finally:
        if cluster is not None:
            cluster.close()
    return 2 * rows * cfg.width * 4 * cfg.steps / seconds / 1e6


def transfers(n_gpus: int, cfg: Config) -> dict[str, Any]:
    dst = 1 if n_gpus >= 2 else 0
    pair = f"cuda:0 -> cuda:{dst}" + ("" if dst else " (one GPU: same-device copies, a stand-in)")
    if cfg.cpu_smoke:
        pair = "cpu -> cpu (smoke run)"
    out: dict[str, Any] = {"pair": pair, "mib": list(cfg.copy_mib), "MB_per_s": {}}
    rates = out["MB_per_s"]
    devices = ["cpu", "cpu"] if cfg.cpu_smoke else ["cuda:0", f"cuda:{dst}"]
    if not cfg.cpu_smoke:
        rates["cupy peer copy (one process)"] = [
            cupy_copy_rate(0, dst, m, cfg.copy_reps) for m in cfg.copy_mib
        ]
        torch_rates = [torch_copy_rate(0, dst, m, cfg.copy_reps) for m in cfg.copy_mib]
        if all(r is not None for r in torch_rates):
            rates["torch device-to-device copy (one process)"] = torch_rates
        if n_gpus >= 2:
            nccl = nccl_rates(list(cfg.copy_mib), cfg.copy_reps)
            if isinstance(nccl, str):
                out["nccl"] = nccl
            else:
                rates["torch.distributed NCCL send/recv (two processes)"] = [
                    nccl[str(m)] for m in cfg.copy_mib
                ]
        else:
            out["nccl"] = "not measured: NCCL needs two GPUs for two ranks"
    rates["asyncnn stage to stage (one process)"] = [
        asyncnn_stage_rate(m, cfg, devices, workers=False) for m in cfg.copy_mib
    ]
    rates["asyncnn stage to stage (two workers, host-staged TCP)"] = [
        asyncnn_stage_rate(m, cfg, devices, workers=True) for m in cfg.copy_mib
    ]
    for name, values in rates.items():
        print(f"   {name:<52} " + "  ".join(f"{v:10,.0f}" for v in values))
    return out


# -- the report ------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Card: {report['card']}; GPUs: {report['gpus']['count']}; "
             f"peer access: {report['gpus']['peer_access']}", "",
             "| K | M | mode | policy | samples/s | one GPU | speedup | target | bubble bound |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in report["throughput"]:
        if "skipped" in r:
            lines.append(f"| {r['k']} | | {r.get('mode', '')} | {r.get('policy', '')} | "
                         f"skipped ({r['skipped']}) | | | | |")  # fmt: skip
            continue
        target = f"{r['target_speedup']:.1f}" if r["target_speedup"] is not None else "-"
        lines.append(
            f"| {r['k']} | {r['m']} | {r['mode']} | {r['policy']} | {r['samples_per_s']:,.0f} | "
            f"{r['one_gpu_samples_per_s']:,.0f} | {r['speedup']:.2f} | {target} | "
            f"{r['bubble_bound_speedup']:.2f} |"
        )
    t = report["transfers"]
    lines += ["", f"Transfer rates, {t['pair']}, MB/s (10^6 bytes moved per second):", "",
              "| path | " + " | ".join(f"{m} MiB" for m in t["mib"]) + " |",
              "| --- |" + " --- |" * len(t["mib"])]  # fmt: skip
    for name, values in t["MB_per_s"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:,.0f}" for v in values) + " |")
    if "nccl" in t:
        lines += ["", f"NCCL: {t['nccl']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    choices = {"policies": tuple(POLICIES), "modes": ("process", "workers")}
    cfg = _common.parse_config(
        Config, argv, __doc__, choices=choices, positive=POSITIVE, presets={"cpu_smoke": SMOKE}
    )
    info: dict[str, Any]  # gpu_info()'s
    if cfg.cpu_smoke:
        n_gpus, info = 0, {"count": 0, "names": [], "peer_access": [], "cupy": None}
        card = "CPU (smoke run: sizes and numbers mean nothing)"
        ks = [k for k in (1, 2) if k <= cfg.max_k]
    else:
        try:
            info = gpu_info()
        except Exception as exc:  # noqa: BLE001 - no cupy, no driver, no device: all say the same
            print(f"multi_gpu.py needs CUDA GPUs and cupy; this machine has none usable "
                  f"({type(exc).__name__}: {exc}). Run it on a GPU machine: "
                  "bash experiments/multi_gpu.sh (see its header), or check the script here "
                  "with --cpu-smoke true.", file=sys.stderr)  # fmt: skip
            return 2
        n_gpus = info["count"]
        if n_gpus == 0:
            print("multi_gpu.py: CUDA reports no GPU; run it on a GPU machine", file=sys.stderr)
            return 2
        card = info["names"][0]
        limit = cfg.max_k if cfg.same_gpu else min(cfg.max_k, n_gpus)
        ks = [k for k in (1, 2, 4, 8) if k <= limit]
    deadline = time.perf_counter() + cfg.time_budget_s
    print(f"card: {card}; GPUs: {n_gpus}; K: {ks}; same GPU: {cfg.same_gpu}")
    print(f"peer access: {info['peer_access']}")
    print("1. throughput (samples/s; speedup against one GPU running the same model)")
    rows = throughput(ks, cfg, deadline)
    print("2. transfer rates, MB/s, for " + ", ".join(f"{m} MiB" for m in cfg.copy_mib))
    report = {"card": card, "gpus": info, "ks": ks, "same_gpu": cfg.same_gpu,
              "config": dataclasses.asdict(cfg), "machine": _common.machine(),
              "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
              "throughput": rows, "transfers": transfers(n_gpus, cfg)}  # fmt: skip
    table = markdown(report)
    print(table)
    _common.write_json(os.path.join(cfg.out, "multi_gpu.json"), report)
    with open(os.path.join(cfg.out, "multi_gpu.md"), "w") as f:
        f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
