"""The pipeline bubble of GPipe and OneFOneB, measured against (K - 1) / (M + K - 1).

Each of K stages is a layer whose forward sleeps ``forward_ms`` and whose backward sleeps
``backward_ms`` (a custom op whose VJP rule also sleeps), so every stage costs exactly the same
whatever the CPU count: ``time.sleep`` releases the GIL, so K stages sleeping on K worker threads
overlap like K devices even on a 2-core machine. The run gets a device pool of K workers (the
default pool has one per core) and sends every call to a thread (a custom actor), so no stage ever
blocks the event loop.

Under a flush, each minibatch costs ``(M + K - 1) * (f + b)`` of wall time of which each stage is
busy ``M * (f + b)``: idle fraction ``(K - 1) / (M + K - 1)``, for GPipe's order and for 1F1B's
alike. We measure it per stage from the actors' busy counters over the steady part (minibatches
after a warm-up one). Run ``python experiments/pipeline_bubble.py --help``.
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
    policies: tuple[str, ...] = ("GPipe", "OneFOneB")  # the two flush schedules of the issue
    forward_ms: float = 10.0  # long enough that ~0.1 ms of message handling stays a small error
    backward_ms: float = 20.0  # twice the forward, as for a dense layer (two products vs one)
    minibatches: int = 6  # measured minibatches per setting; each is identical under a flush
    warmup: int = 1  # minibatches run before measuring: thread start-up, first allocations
    width: int = 8  # features per row: tiny, the arithmetic must not matter next to the sleeps
    trace_example: bool = True  # also trace one setting (K=4, M=4) per policy for a timeline
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
    """The identity times a learnt scalar, costing a fixed wall time forward and backward.

    The scalar makes the input traced even in the first stage (whose input is data, not
    differentiated), so that the sleeping op's VJP rule runs there too.
    """

    forward_s: float
    backward_s: float

    def init_params(self, init: Any) -> dict[str, Any]:
        return {"scale": init.ones((1,))}

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return sleep_op(x * params["scale"], forward_s=self.forward_s, backward_s=self.backward_s)


class ThreadedActor(ann.LayerActor):
    """A layer actor that sends every compute to a worker thread.

    The runtime runs calls it estimates below 5 MFLOP inline on the event-loop thread (from the
    parameter count); a sleeping stage has one parameter, and inline it would block every other
    actor. ``cost=None`` means "unknown": always a worker.
    """

    async def compute(self, fn: Any, *args: Any, cost: float | None = None) -> Any:
        return await super().compute(fn, *args, cost=None)


def make_graph(cfg: Config, k: int) -> ann.Graph:
    """K sleeping stages in a chain and a mean-squared-error loss."""
    stage = SleepStage(cfg.forward_ms / 1e3, cfg.backward_ms / 1e3)
    g = ann.Graph()
    h = g.input("x", shape=(None, cfg.width))
    y = g.input("y", shape=(None, cfg.width))
    for s in range(k):
        h = g.layer(f"stage{s}", stage, h, actor=ThreadedActor)
    g.loss("loss", nn.MSELoss(), h, y)
    return g


def make_policy(name: str, m: int) -> Any:
    return {"GPipe": policies.GPipe, "OneFOneB": policies.OneFOneB}[name](microbatches=m)


# -- one measurement ---------------------------------------------------------------------------


def measure(cfg: Config, policy_name: str, k: int, m: int, trace: str | None = None) -> dict:
    """Idle fraction of each stage over ``cfg.minibatches`` steady minibatches."""
    graph = make_graph(cfg, k)
    rng = np.random.default_rng(cfg.seed)
    rows = m  # one row per microbatch: the arithmetic stays negligible
    batch = {
        "x": rng.standard_normal((rows, cfg.width)).astype(np.float32),
        "y": np.zeros((rows, cfg.width), np.float32),
    }
    out: dict[str, Any] = {}

    async def main() -> None:
        async with (
            open_device_pool(cpu_workers=k) as pool,
            ann.open_run(
                graph,
                optim.SGD(lr=0.0),  # the weights do not matter; a zero step keeps them fixed
                make_policy(policy_name, m),
                cfg.seed,
                pool=pool,
                trace=trace,
                trace_payloads="none",
            ) as run,
        ):
            for _ in range(cfg.warmup):
                await run.step(batch)
            await run.drain()
            t0 = time.perf_counter()
            busy0 = {n: run.statistics()[n].busy_seconds for n in graph.layers}
            for _ in range(cfg.minibatches):
                await run.step(batch)
            await run.drain()
            wall = time.perf_counter() - t0
            busy = {n: run.statistics()[n].busy_seconds - busy0[n] for n in graph.layers}
            out["wall"] = wall
            out["busy"] = busy

    anyio.run(main, backend="trio")
    wall, busy = out["wall"], out["busy"]
    f, b = cfg.forward_ms / 1e3, cfg.backward_ms / 1e3
    ideal_busy = cfg.minibatches * m * (f + b)
    idle = [1.0 - busy[n] / wall for n in graph.layers]
    return {
        "policy": policy_name,
        "K": k,
        "M": m,
        "theory_idle": (k - 1) / (m + k - 1),
        "measured_idle_mean": float(np.mean(idle)),
        "measured_idle_per_stage": idle,
        # idle counting any time beyond the sleeps as idle: what the pipe delivers
        "effective_idle": 1.0 - ideal_busy / wall,
        "seconds_per_minibatch": wall / cfg.minibatches,
        "theory_seconds_per_minibatch": (m + k - 1) * (f + b),
        "busy_per_op_overhead_ms": 1e3
        * (np.mean(list(busy.values())) - ideal_busy)
        / (2 * cfg.minibatches * m),
    }


# -- the whole experiment ----------------------------------------------------------------------


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
            ax.plot(mm, (k - 1) / (mm + k - 1), "-", color=c, alpha=0.5)
            ax.plot([r["M"] for r in sel], [r["measured_idle_mean"] for r in sel], "o", color=c,
                    label=f"K={k}")  # fmt: skip
            ax.plot([r["M"] for r in sel], [r["effective_idle"] for r in sel], "x", color=c)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(cfg.microbatches), [str(m) for m in cfg.microbatches])
        ax.set_xlabel("microbatches M")
        ax.set_ylabel("idle fraction per stage")
        ax.set_title(f"{name}: line (K-1)/(M+K-1), o busy counters, x wall")
        ax.set_ylim(-0.02, 1.0)
        ax.legend(fontsize=8)
    _common.save_figure(fig, cfg.out, "pipeline_bubble.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = _common.parse_config(Config, argv, __doc__)
    os.makedirs(cfg.out, exist_ok=True)
    rows = []
    for name in cfg.policies:
        for k in cfg.stages:
            for m in cfg.microbatches:
                r = measure(cfg, name, k, m)
                rows.append(r)
                print(
                    f"{name:<8} K={k} M={m}: idle {r['measured_idle_mean']:.3f} "
                    f"(theory {r['theory_idle']:.3f}, wall-based {r['effective_idle']:.3f}), "
                    f"{1e3 * r['seconds_per_minibatch']:.1f} ms per minibatch "
                    f"(theory {1e3 * r['theory_seconds_per_minibatch']:.1f})"
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
    return _common.finish(cfg.out, cfg, {"rows": rows, "timelines": timelines})


if __name__ == "__main__":
    main()
