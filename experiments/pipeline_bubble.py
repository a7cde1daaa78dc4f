"""The pipeline bubble of GPipe, OneFOneB, Interleaved1F1B and ZeroBubbleH1, measured against
each schedule's formula.

Each stage is a layer whose forward sleeps ``forward_ms`` and whose backward sleeps
``backward_ms``, half in its input half and half in its weight half (custom ops whose VJP rules
also sleep; in the first stage, whose input is data and not differentiated, the input half is
empty and the weight half sleeps the whole ``backward_ms``), so every stage costs exactly the
same whatever the CPU count: ``time.sleep`` releases the GIL, so stages sleeping on worker
threads overlap like devices even on a 2-core machine. The run gets a device pool with a worker
per stage (the default pool has one per core) and sends every call to a thread (a custom actor),
so no stage ever blocks the event loop.

``K`` is the pipeline's depth, its devices: GPipe and OneFOneB run ``K`` stages, one per device;
the interleaved policies run ``K V`` stages, device ``d`` hosting stages ``d, d + K, ...`` which
take turns in the device's order. The *bubble* of a device is its idle time over its busy time
(Narayanan et al.'s and Qi et al.'s measure): with ``M`` microbatches, ``(K - 1) / M`` for GPipe
and OneFOneB, ``(K - 1) / (M V)`` for Interleaved1F1B and ``(K - 1) / (3 M V)`` for ZeroBubbleH1
when the forward, the input half and the weight half cost the same (the defaults, but for the
first stage's split, which nothing but its own weight half waits for; with other costs no
formula is given), the last two for ``M >= K`` (with fewer microbatches than devices the
interleaved and split orders cannot fill, and no formula is given either). The *idle fraction*
is idle over wall time, ``r / (1 + r)`` for a bubble ``r``: ``(K - 1) / (M + K - 1)`` for a
flush. We measure both per device from the actors' busy counters over the steady part
(minibatches after a warm-up one). Run ``python experiments/pipeline_bubble.py --help``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

import asyncnn as ann
from asyncnn import nn, ops, optim, policies
from asyncnn.backends import open_device_pool

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402


@dataclass(frozen=True)
class Config:
    stages: tuple[int, ...] = (1, 2, 3, 4)  # K: the range; 4 sleeping threads on 2 cores
    microbatches: tuple[int, ...] = (1, 2, 4, 8)  # M: from no pipelining to a nearly full pipe
    # the flush schedules: GPipe and 1F1B (one stage per device), interleaved 1F1B and ZB-H1
    policies: tuple[str, ...] = ("GPipe", "OneFOneB", "Interleaved1F1B", "ZeroBubbleH1")
    virtual: int = 2  # V, stages per device of Interleaved1F1B (ZeroBubbleH1 runs V = 1: ZB-H1)
    zero_bubble_virtual: int = 1  # V of ZeroBubbleH1 (above 1: PyTorch's interleaved ZB)
    forward_ms: float = 10.0  # long enough that ~0.1 ms of message handling stays a small error
    # twice the forward, as for a dense layer (two products vs one): half in the input half,
    # half in the weight half, so each of F, B and W costs forward_ms (the first stage's input
    # half is empty, its input being data: its weight half sleeps the whole backward_ms)
    backward_ms: float = 20.0
    minibatches: int = 6  # measured minibatches per setting; each is identical under a flush
    warmup: int = 1  # minibatches run before measuring: thread start-up, first allocations
    width: int = 8  # features per row: tiny, the arithmetic must not matter next to the sleeps
    trace_example: bool = True  # also trace one setting (largest K, M=4) per policy: timelines
    seed: int = 0  # weights of the one scalar per stage (the sleeps do not depend on it)
    out: str = "runs/pipeline_bubble"  # results.json and the PNGs


# -- the equal-cost stage ----------------------------------------------------------------------


def _sleep_forward(x: Any, *, forward_s: float, backward_s: float) -> tuple[Any, Any]:
    time.sleep(forward_s)
    return x, backward_s


def _sleep_vjp(g: Any, backward_s: float, needs: Any) -> tuple[Any]:
    time.sleep(backward_s)
    return (g,)


sleep_op = ops.Primitive("sleep", _sleep_forward, _sleep_vjp)


@dataclass(frozen=True)
class SleepStage(nn.Module):
    """The identity times two learnt scalars, costing a fixed wall time forward and backward.

    ``y = sleep(x * a) * sleep(b)``: the first sleep's forward takes ``forward_s`` and its VJP
    rule ``backward_s / 2``, in the backward's input half; the second's VJP rule (of a parameter
    alone) takes the other ``backward_s / 2``, in the weight half. In the first stage (whose
    input is data, not differentiated) both run in the weight half.
    """

    forward_s: float
    backward_s: float

    def init_params(self, init: Any) -> dict[str, Any]:
        return {"a": init.ones((1,)), "b": init.ones((1,))}

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        half = self.backward_s / 2
        h = sleep_op(x * params["a"], forward_s=self.forward_s, backward_s=half)
        return h * sleep_op(params["b"], forward_s=0.0, backward_s=half)


class ThreadedActor(ann.LayerActor):
    """A layer actor that sends every compute to a worker thread.

    The runtime runs calls it estimates below 5 MFLOP inline on the event-loop thread (from the
    parameter count); a sleeping stage has one parameter, and inline it would block every other
    actor. ``cost=None`` means "unknown": always a worker.
    """

    async def compute(self, fn: Any, *args: Any, cost: float | None = None) -> Any:
        return await super().compute(fn, *args, cost=None)


def make_graph(cfg: Config, k: int) -> ann.Graph:
    """``k`` sleeping stages in a chain and a mean-squared-error loss."""
    stage = SleepStage(cfg.forward_ms / 1e3, cfg.backward_ms / 1e3)
    g = ann.Graph()
    h = g.input("x", shape=(None, cfg.width))
    y = g.input("y", shape=(None, cfg.width))
    for s in range(k):
        h = g.layer(f"stage{s}", stage, h, actor=ThreadedActor)
    g.loss("loss", nn.MSELoss(), h, y)
    return g


def virtual_of(cfg: Config, name: str) -> int:
    """V, the stages per device ``name`` runs."""
    return {"Interleaved1F1B": cfg.virtual, "ZeroBubbleH1": cfg.zero_bubble_virtual}.get(name, 1)


def make_policy(cfg: Config, name: str, m: int) -> Any:
    if name == "Interleaved1F1B":
        return policies.Interleaved1F1B(m, virtual=cfg.virtual)
    if name == "ZeroBubbleH1":
        return policies.ZeroBubbleH1(m, virtual=cfg.zero_bubble_virtual)
    return {"GPipe": policies.GPipe, "OneFOneB": policies.OneFOneB}[name](microbatches=m)


def theory_bubble(cfg: Config, name: str, k: int, m: int) -> float | None:
    """The bubble (idle over busy time per device) of ``name`` on ``k`` devices, ``m``
    microbatches; None where no formula holds (results.json writes null)."""
    v = virtual_of(cfg, name)
    interleaved = v > 1 or name == "ZeroBubbleH1"
    if interleaved and m < k:
        return None  # fewer microbatches than devices: the schedule cannot fill
    if name != "ZeroBubbleH1":
        return (k - 1) / (m * v)
    if cfg.forward_ms != cfg.backward_ms / 2:
        return None  # the formula holds for equal forward, input and weight halves
    # ZB-H1 leaves (K - 1) F of 1F1B's (K - 1)(F + B + W) idle when F = B = W (Qi et al. 2024)
    return (k - 1) / (3 * m * v)


def device_orders(cfg: Config, name: str, k: int, m: int) -> list[list[tuple[str, int, int]]]:
    """Each device's operations in order, ``(kind, stage, microbatch)``, as the policy runs them
    (the interleaved ones' device orders; one stage per device for GPipe and OneFOneB)."""
    v = virtual_of(cfg, name)
    if name == "Interleaved1F1B":
        return policies.interleaved_1f1b_schedule(k, v, m)
    if name == "ZeroBubbleH1":
        return policies.interleaved_zero_bubble_schedule(k, v, m)
    out = []
    for s in range(k):
        order = policies.OneFOneBOrder(None if name == "GPipe" else k - s - 1, flush=True)
        ops = []
        for _ in range(2 * m):
            kind, key = order.next()
            order.done((kind, key), m)
            ops.append((kind, s, key))
        out.append(ops)
    return out


def simulated_bubble(cfg: Config, name: str, k: int, m: int) -> list[float]:
    """Each device's bubble under its order with the stage costs and no overhead at all: an
    operation starts once its device is free and its inputs are done (a forward after the
    previous stage's, a backward or input half after the next stage's input half and its own
    forward, a weight half after its input half). Holds for every ``M``, where the formulas
    need ``M >= K``. Every stage's input and weight halves cost half the backward each, the
    first stage's too, whose input half the run leaves empty (its weight half sleeps the whole
    backward): moving that half changes none of the default sweep's bubbles, since nothing but
    the first stage's own weight half waits for its input half."""
    orders = device_orders(cfg, name, k, m)
    stages = k * virtual_of(cfg, name)
    f, b = cfg.forward_ms, cfg.backward_ms
    cost = {"forward": f, "backward": b, "backward_input": b / 2, "backward_weight": b / 2}
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * k
    nxt = [0] * k
    while any(nxt[d] < len(orders[d]) for d in range(k)):
        moved = False
        for d in range(k):
            if nxt[d] == len(orders[d]):
                continue
            kind, s, mb = orders[d][nxt[d]]
            if kind == "forward":
                needs = [("forward", s - 1, mb)] if s else []
            elif kind == "backward_weight":
                needs = [("input", s, mb)]
            else:
                needs = [("forward", s, mb)] + ([("input", s + 1, mb)] if s + 1 < stages else [])
            if any(n not in done for n in needs):
                continue
            end = max([free[d]] + [done[n] for n in needs]) + cost[kind]
            free[d] = end
            done[("input" if kind in ("backward", "backward_input") else kind, s, mb)] = end
            nxt[d] += 1
            moved = True
        if not moved:
            raise RuntimeError(f"{name} K={k} M={m}: the device orders deadlock")
    wall = max(free)
    busy = [sum(cost[kind] for kind, _, _ in ops) for ops in orders]
    return [(wall - x) / x for x in busy]


def runnable(cfg: Config, name: str, k: int, m: int) -> bool:
    """Whether ``name`` runs ``m`` microbatches on ``k`` devices (the interleaved orders take
    microbatches in rounds: ``m`` a multiple of ``max(1, m // k)``)."""
    if virtual_of(cfg, name) == 1 and name != "ZeroBubbleH1":
        return True
    return m % max(1, m // k) == 0


# -- one measurement ---------------------------------------------------------------------------


def measure(cfg: Config, policy_name: str, k: int, m: int, trace: str | None = None) -> dict:
    """Bubble and idle fraction of each of ``k`` devices over ``cfg.minibatches`` steady
    minibatches."""
    v = virtual_of(cfg, policy_name)
    graph = make_graph(cfg, k * v)
    policy = make_policy(cfg, policy_name, m)
    # operations per microbatch and stage: forward and backward, or (a split backward, ZB-H1)
    # forward, input half and weight half
    ops_per_microbatch = 3 if policy.splits_backward() else 2
    rng = np.random.default_rng(cfg.seed)
    rows = m  # one row per microbatch: the arithmetic stays negligible
    batch = {
        "x": rng.standard_normal((rows, cfg.width)).astype(np.float32),
        "y": np.zeros((rows, cfg.width), np.float32),
    }
    out: dict[str, Any] = {}

    async def main() -> None:
        async with (
            open_device_pool(cpu_workers=k * v) as pool,
            ann.open_run(
                graph,
                optim.SGD(lr=0.0),  # the weights do not matter; a zero step keeps them fixed
                policy,
                cfg.seed,
                pool=pool,
                trace=trace,
                trace_payloads="none",
            ) as run,
        ):
            for _ in range(cfg.warmup):
                await run.step(batch)
            await run.drain()
            # each minibatch measured alone too (a flush makes them identical): a moment when
            # other processes hold the cores stretches one of them, not the median
            walls, busies = [], []
            t0 = time.perf_counter()
            busy0 = {n: run.statistics()[n].busy_seconds for n in graph.layers}
            for _ in range(cfg.minibatches):
                t = time.perf_counter()
                before = {n: run.statistics()[n].busy_seconds for n in graph.layers}
                await run.step(batch)
                await run.drain()
                walls.append(time.perf_counter() - t)
                busies.append({n: run.statistics()[n].busy_seconds - before[n]
                               for n in graph.layers})  # fmt: skip
            wall = time.perf_counter() - t0
            busy = {n: run.statistics()[n].busy_seconds - busy0[n] for n in graph.layers}
            out.update(wall=wall, busy=busy, walls=walls, busies=busies)

    anyio.run(main, backend="trio")
    wall, busy = out["wall"], out["busy"]
    f, b = cfg.forward_ms / 1e3, cfg.backward_ms / 1e3
    ideal_busy = cfg.minibatches * m * v * (f + b)  # per device
    layers = graph.layers
    device_busy = [sum(busy[n] for n in layers[d::k]) for d in range(k)]
    idle = [1.0 - db / wall for db in device_busy]
    bubble = [(wall - db) / db for db in device_busy]
    # per device, the median over minibatches of each minibatch's own bubble
    per_mb = [
        [(w - sum(b[n] for n in layers[d::k])) / sum(b[n] for n in layers[d::k]) for d in range(k)]
        for w, b in zip(out["walls"], out["busies"], strict=True)
    ]
    median = [float(np.median([mb[d] for mb in per_mb])) for d in range(k)]
    least = [float(min(mb[d] for mb in per_mb)) for d in range(k)]
    r = theory_bubble(cfg, policy_name, k, m)
    simulated = simulated_bubble(cfg, policy_name, k, m)
    return {
        "policy": policy_name,
        "K": k,
        "V": v,
        "M": m,
        "theory_bubble": r,
        "simulated_bubble_per_device": simulated,
        "measured_bubble_mean": float(np.mean(bubble)),
        "measured_bubble_per_device": bubble,
        "median_bubble_per_device": median,  # over minibatches: robust to a moment of load
        # the least disturbed minibatch's (other processes' load mostly adds idle time)
        "least_bubble_per_device": least,
        "theory_idle": None if r is None else r / (1 + r),
        "measured_idle_mean": float(np.mean(idle)),
        "measured_idle_per_device": idle,
        # idle counting any time beyond the sleeps as idle: what the pipe delivers
        "effective_idle": 1.0 - ideal_busy / wall,
        "seconds_per_minibatch": wall / cfg.minibatches,
        "theory_seconds_per_minibatch": None if r is None else (1 + r) * m * v * (f + b),
        "busy_per_op_overhead_ms": 1e3
        * (np.mean(device_busy) - ideal_busy)
        / (ops_per_microbatch * cfg.minibatches * m * v),
    }


# -- the whole experiment ----------------------------------------------------------------------


def _nan(x: float | None) -> float:
    """``x``, or nan for None (no formula): what the table prints and the plot leaves out."""
    return float("nan") if x is None else x


def plot(cfg: Config, rows: list[dict]) -> None:
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, len(cfg.policies), figsize=(5 * len(cfg.policies), 3.8))
    axes = np.atleast_1d(axes)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    mm = np.linspace(min(cfg.microbatches), max(cfg.microbatches), 100)
    for ax, name in zip(axes, cfg.policies, strict=True):
        for i, k in enumerate(cfg.stages):
            sel = [r for r in rows if r["policy"] == name and r["K"] == k]
            c = colors[i % len(colors)]
            theory = np.array([_nan(theory_bubble(cfg, name, k, m)) for m in mm])
            ax.plot(mm, theory / (1 + theory), "-", color=c, alpha=0.5)
            ax.plot([r["M"] for r in sel], [r["measured_idle_mean"] for r in sel], "o", color=c,
                    label=f"K={k}")  # fmt: skip
            ax.plot([r["M"] for r in sel], [r["effective_idle"] for r in sel], "x", color=c)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(cfg.microbatches), [str(m) for m in cfg.microbatches])
        ax.set_xlabel("microbatches M")
        ax.set_ylabel("idle fraction per device")
        ax.set_title(f"{name} (V={virtual_of(cfg, name)}): line theory, o busy, x wall", fontsize=9)
        ax.set_ylim(-0.02, 1.0)
        ax.legend(fontsize=8)
    _common.save_figure(fig, cfg.out, "pipeline_bubble.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    choices = {"policies": ("GPipe", "OneFOneB", "Interleaved1F1B", "ZeroBubbleH1")}

    def check(c: Config) -> str | None:
        if c.forward_ms + c.backward_ms == 0:
            return "--forward-ms and --backward-ms are both 0: a stage must cost some time"
        return None

    positive = ("stages", "microbatches", "virtual", "zero_bubble_virtual", "minibatches", "width")
    cfg = _common.parse_config(
        Config, argv, __doc__, choices=choices, check=check, positive=positive
    )
    os.makedirs(cfg.out, exist_ok=True)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for name in cfg.policies:
        for k in cfg.stages:
            for m in cfg.microbatches:
                if not runnable(cfg, name, k, m):
                    # said and kept, so that a setting asked for is not just missing
                    skipped.append({"policy": name, "K": k, "M": m})
                    print(f"{name:<15} K={k} M={m}: skipped, M is not a multiple of the "
                          f"rounds max(1, M // K) = {max(1, m // k)}")  # fmt: skip
                    continue
                r = measure(cfg, name, k, m)
                rows.append(r)
                theory = _nan(r["theory_seconds_per_minibatch"])
                print(
                    f"{name:<15} K={k} V={r['V']} M={m}: bubble {r['measured_bubble_mean']:.3f} "
                    f"(theory {_nan(r['theory_bubble']):.3f}), idle "
                    f"{r['measured_idle_mean']:.3f} (theory {_nan(r['theory_idle']):.3f}, "
                    f"wall-based {r['effective_idle']:.3f}), {1e3 * r['seconds_per_minibatch']:.1f}"
                    f" ms per minibatch (theory {1e3 * theory:.1f})"
                )
    plot(cfg, rows)
    timelines = {}
    if cfg.trace_example:
        k, m = max(cfg.stages), 4
        for name in cfg.policies:
            path = os.path.join(cfg.out, f"{name}.trace")
            measure(dataclasses.replace(cfg, minibatches=2, warmup=0), name, k, m, trace=path)
            folder = os.path.join(cfg.out, f"timeline_{name}")
            s = ann.trace.summary(path, plots=folder)
            final = os.path.join(cfg.out, f"timeline_{name}.png")
            os.replace(os.path.join(folder, "busy.png"), final)
            timelines[name] = {
                "png": final,
                "busy_fraction": {a: v["busy_fraction"] for a, v in s["actors"].items()},
            }
    return _common.finish(cfg.out, cfg, {"rows": rows, "skipped": skipped, "timelines": timelines})


if __name__ == "__main__":
    # A trace names the graph's modules and actors by import path, and one defined in __main__
    # can be rebuilt (asyncnn.replay) only by this script: run the importable copy of this file.
    import pipeline_bubble

    pipeline_bubble.main()
