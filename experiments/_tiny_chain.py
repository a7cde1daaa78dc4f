"""``bench_parallel.py``'s tiny chain: the runtime's own cost where every op is tiny (AMPNet's
regime), against the plain ``value_and_grad`` loop, PyTorch eager and 4 local workers
(``python experiments/bench_parallel.py --only-tiny``; ``--profile-tiny`` profiles it,
``--stage-costs`` times what a stage adds, hook by hook, ``--count-tiny`` counts the work of a
step: bytecodes and calls, which a busy machine does not disturb)."""

from __future__ import annotations

import importlib
import inspect
import os
import statistics
import sys
import time
from typing import Any

import _common
import anyio
import numpy as np

import asyncnn as ann
from asyncnn import nn, optim, policies

# -- the runtime's own cost: a chain of tiny layers ----------------------------------------------
#: 8 pairs: 16 modules, so 1 stage and 4 stages (2 pairs each) split evenly, and enough layers
#: that the per-op cost (autodiff, ~50 small ufuncs a step) and the per-message cost (4 stages:
#: 9 forward and 8 backward hops a step) both show, as in AMPNet's list reduction
TINY_DEPTH = 8
TINY_WIDTH = 8
TINY_BATCH = 4


def tiny_modules() -> list[Any]:
    mods: list[Any] = []
    for _ in range(TINY_DEPTH):
        mods += [nn.Linear(TINY_WIDTH, TINY_WIDTH), nn.Tanh()]
    return mods


def tiny_batches(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (steps, TINY_BATCH, TINY_WIDTH)
    x = rng.standard_normal(shape, dtype=np.float32)
    y = rng.standard_normal(shape, dtype=np.float32)
    return [{"x": x[i], "y": y[i]} for i in range(steps)]


def tiny_graph(stages: int, workers: list[int | None] | None = None) -> Any:
    return ann.Graph.sequential(
        tiny_modules(), loss=nn.MSELoss(), stages=stages, input_shape=(None, TINY_WIDTH),
        label_shape=(None, TINY_WIDTH), label_dtype="float32", workers=workers,
    )  # fmt: skip


class _Clock:
    """Wall and CPU time (this process, every thread) of a timed window, per step."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def per_step(self, steps: int) -> tuple[float, float]:
        return (
            (time.perf_counter() - self.wall) / steps,
            (time.process_time() - self.cpu) / steps,
        )


def tiny_plain(batches: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """(wall, CPU) seconds per step of the plain loop: ``value_and_grad`` of the composed chain
    and the same SGD update, over the same minibatches."""
    step = _common.plain_step(nn.Sequential(*tiny_modules()), nn.MSELoss(), optim.SGD(lr=0.01))
    for b in batches[:20]:  # warm-up
        step(b["x"], b["y"])
    clock = _Clock()
    for b in batches:
        step(b["x"], b["y"])
    return clock.per_step(len(batches))


def tiny_torch(batches: list[dict[str, np.ndarray]]) -> tuple[float, float] | None:
    """(wall, CPU) seconds per step of PyTorch eager (one thread: the tensors are far too small
    to split)."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    layers: list[Any] = []
    for _ in range(TINY_DEPTH):
        layers += [torch.nn.Linear(TINY_WIDTH, TINY_WIDTH), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tb = [(torch.from_numpy(b["x"]), torch.from_numpy(b["y"])) for b in batches]

    def step(x: Any, y: Any) -> None:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    for x, y in tb[:20]:
        step(x, y)
    clock = _Clock()
    for x, y in tb:
        step(x, y)
    return clock.per_step(len(tb))


def tiny_run(
    batches: list[dict[str, np.ndarray]], graph: Any, cluster: Any = None
) -> tuple[float, float]:
    """(wall, CPU) seconds per step of ``Sync`` through ``open_run``: the steps after 20
    warm-up ones, up to the end of the drain (CPU time of this process only: with a cluster,
    the driver's)."""

    async def main() -> tuple[float, float]:
        policy = policies.Sync()
        async with ann.open_run(graph, optim.SGD(lr=0.01), policy, cluster=cluster) as run:
            for b in batches[:20]:
                await run.step(b)
            await run.drain()
            clock = _Clock()
            for b in batches:
                await run.step(b)
            await run.drain()
            return clock.per_step(len(batches))

    return anyio.run(main, backend="trio")


def tiny_fit(batches: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """(wall, CPU) seconds per step of ``Trainer.fit`` with 1 stage (the run's start and end
    included)."""
    data_ = {k: np.concatenate([b[k] for b in batches]) for k in ("x", "y")}
    tr = ann.Trainer(tiny_graph(1), optimizer=optim.SGD(lr=0.01), policy=policies.Sync())
    tr.fit({k: v[: 20 * TINY_BATCH] for k, v in data_.items()}, epochs=1, batch_size=TINY_BATCH)
    clock = _Clock()
    tr.fit(data_, epochs=1, batch_size=TINY_BATCH)
    return clock.per_step(len(batches))


CLUSTER_ROW = "Sync, 4 stages, LocalCluster(4)"


def tiny_table(steps: int, repeats: int, cluster_steps: int) -> dict[str, Any]:
    """ms per step (wall and CPU) of every tiny-chain run, medians of ``repeats`` interleaved
    rounds."""
    batches = tiny_batches(steps)
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with ann.cluster.LocalCluster(workers=4) as cluster:
        g1, g4 = tiny_graph(1), tiny_graph(4)
        g4w = tiny_graph(4, workers=[0, 1, 2, 3])
        for _ in range(repeats):
            rows = [
                ("plain loop (value_and_grad + SGD)", lambda: tiny_plain(batches)),
                ("PyTorch eager (1 thread)", lambda: tiny_torch(batches)),
                ("Sync, 1 stage", lambda: tiny_run(batches, g1)),
                ("Sync, 1 stage, Trainer.fit", lambda: tiny_fit(batches)),
                ("Sync, 4 stages", lambda: tiny_run(batches, g4)),
                (CLUSTER_ROW, lambda: tiny_run(batches[:cluster_steps], g4w, cluster)),
            ]
            for name, fn in rows:
                value = fn()
                if value is not None:
                    wall.setdefault(name, []).append(value[0] * 1e3)
                    cpu.setdefault(name, []).append(value[1] * 1e3)
    return {
        "ms_per_step": {k: statistics.median(v) for k, v in wall.items()},
        "cpu_ms_per_step": {k: statistics.median(v) for k, v in cpu.items()},
        "all_repeats_ms": wall,
        "all_repeats_cpu_ms": cpu,
        "load_average": os.getloadavg(),
    }


def show_tiny(result: dict[str, Any], repeats: int) -> None:
    ms = result["ms_per_step"]
    cpu = result["cpu_ms_per_step"]
    plain = ms["plain loop (value_and_grad + SGD)"]
    plain_cpu = cpu["plain loop (value_and_grad + SGD)"]
    four = ms["Sync, 4 stages"]
    print(
        f"tiny chain: {TINY_DEPTH} x (Linear({TINY_WIDTH}, {TINY_WIDTH}) + Tanh), batch "
        f"{TINY_BATCH}, float32, MSE, SGD ({len(os.sched_getaffinity(0))} cores, median of {repeats}; load "
        f"{' '.join(f'{x:.2f}' for x in result['load_average'])}):"
    )
    print(f"   {'run':<36} {'ms/step':>8} {'x plain':>8} {'CPU ms':>7} {'x plain':>8}")
    for k, v in ms.items():
        if k == CLUSTER_ROW:  # the CPU time would be the driver's alone
            extra = f"{'-':>7} {'-':>8}   {v / four:.2f}x the same 4 stages in one process"
        else:
            extra = f"{cpu[k]:7.3f} {cpu[k] / plain_cpu:8.2f}"
        print(f"   {k:<36} {v:8.3f} {v / plain:8.2f} {extra}")
    print("   targets: Sync 1 stage <= 1.25x plain, 4 stages <= 2.0x plain,")
    print("            LocalCluster(4) <= 2.0x the same 4 stages in one process")
    print("   (CPU ms: this process's CPU time, less disturbed than wall time on a busy machine)")


def profile_tiny(steps: int) -> None:
    """cProfile of the plain loop and of ``Sync`` with 1 stage: the functions with the most own
    time, per step."""
    import cProfile
    import pstats

    batches = tiny_batches(steps)
    for name, fn in [
        ("plain loop", lambda: tiny_plain(batches)),
        ("Sync, 1 stage", lambda: tiny_run(batches, tiny_graph(1))),
    ]:
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        print(f"--- profile of {name} ({steps} steps), by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


#: the hooks ``stage_costs`` times, each inclusive of those indented under it
_TIMED_HOOKS = [
    ("on_forward", "asyncnn._runtime._actors", "LayerActor", "on_forward", 0),
    ("forward trace (_vjp)", "asyncnn._runtime._actors", "LayerActor", "_vjp", 1),
    ("on_backward", "asyncnn._runtime._actors", "LayerActor", "on_backward", 0),
    ("accumulate", "asyncnn._runtime._weight_versions", "WeightVersions", "accumulate", 1),
    ("apply_gradients", "asyncnn._runtime._weight_versions", "WeightVersions",
     "apply_gradients", 2),
    ("optimizer update", "asyncnn._math._optim", "Optimizer", "update", 3),
]  # fmt: skip


def _timed(fn: Any, totals: dict[str, float], label: str) -> Any:
    if inspect.iscoroutinefunction(fn):

        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start

        return timed_async

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    return timed


def stage_costs(steps: int, repeats: int) -> None:
    """Where a stage's time goes: ``Sync`` on 1 and on 4 stages with a timer around each hook
    of :data:`_TIMED_HOOKS` (inclusive times, µs per step; the timers add about a microsecond a
    call), and what the 3 stages more than one add to each. The rest of a step is the messages,
    hand-overs, the loss actor and the run's admission."""
    batches = tiny_batches(steps)
    totals = {label: 0.0 for label, *_ in _TIMED_HOOKS}
    saved = []
    for label, module, cls_name, attr, _ in _TIMED_HOOKS:
        cls = getattr(importlib.import_module(module), cls_name)
        saved.append((cls, attr, cls.__dict__[attr]))
        setattr(cls, attr, _timed(cls.__dict__[attr], totals, label))
    try:
        rows: dict[int, list[dict[str, float]]] = {1: [], 4: []}
        for _ in range(repeats):
            for stages in (1, 4):
                g = tiny_graph(stages)
                tiny_run(batches[:20], g)
                for label in totals:
                    totals[label] = 0.0
                wall, _cpu = tiny_run(batches, g)
                row = {label: v / steps * 1e6 for label, v in totals.items()}
                row["whole step"] = wall * 1e6
                rows[stages].append(row)
    finally:
        for cls, attr, fn in saved:
            setattr(cls, attr, fn)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in rows.items()}
    print(f"where a stage's time goes: tiny chain, Sync, {steps} steps, median of {repeats} "
          "(µs per step, inclusive)")  # fmt: skip
    print(f"   {'':<34} {'1 stage':>8} {'4 stages':>9} {'added':>8}")
    lines = [("whole step", 0)] + [(label, depth) for label, *_, depth in _TIMED_HOOKS]
    for label, depth in lines:
        one, four = med[1][label], med[4][label]
        print(f"   {'  ' * depth + label:<34} {one:8.1f} {four:9.1f} {four - one:8.1f}")
    rest = {s: m["whole step"] - m["on_forward"] - m["on_backward"] for s, m in med.items()}
    print(f"   {'the rest (messages, loss, admission)':<34} {rest[1]:8.1f} {rest[4]:9.1f} "
          f"{rest[4] - rest[1]:8.1f}")  # fmt: skip


class _WorkCounter:
    """Counts the Python bytecodes executed and the calls made (Python functions, a
    coroutine's resume counted as a call; C functions such as numpy's ufuncs) on this thread
    between :meth:`start` and :meth:`stop`, each function's bytecodes in :attr:`by_function`: a
    measure of work that a busy machine does not disturb (counted, a step runs some 50 times
    slower)."""

    def __init__(self) -> None:
        self.counts = {"bytecodes": 0, "python calls": 0, "C calls": 0}
        self.by_function: dict[str, int] = {}

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.counts["bytecodes"] += 1
            code = frame.f_code
            name = f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_name}"
            self.by_function[name] = self.by_function.get(name, 0) + 1
        return self._trace

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.counts["python calls"] += 1
        elif event == "c_call":
            self.counts["C calls"] += 1

    def start(self) -> None:
        sys.setprofile(self._profile)
        sys.settrace(self._trace)

    def stop(self) -> None:
        sys.settrace(None)
        sys.setprofile(None)


def count_tiny(steps: int, top: int = 25) -> dict[str, Any]:
    """Work per step of the plain loop and of ``Sync`` on 1 and 4 stages, counted, not timed
    (:class:`_WorkCounter`): within 0.2% run to run (the event loop's timing-driven work
    moves a few bytecodes) and under any load, so a change to the runtime's own cost shows in
    one run on a shared machine. Printed with the functions whose
    bytecodes a step of 1 stage, and of 4 stages, adds most."""
    batches = tiny_batches(20 + steps)
    warm, counted = batches[:20], batches[20:]
    counters: dict[str, _WorkCounter] = {}

    step = _common.plain_step(nn.Sequential(*tiny_modules()), nn.MSELoss(), optim.SGD(lr=0.01))
    for b in warm:
        step(b["x"], b["y"])
    counter = counters["plain"] = _WorkCounter()
    counter.start()
    try:
        for b in counted:
            step(b["x"], b["y"])
    finally:
        counter.stop()
    for stages in (1, 4):
        counter = counters[f"Sync, {stages} stage{'s' if stages > 1 else ''}"] = _WorkCounter()

        async def main(stages: int = stages, counter: _WorkCounter = counter) -> None:
            graph = tiny_graph(stages)
            async with ann.open_run(graph, optim.SGD(lr=0.01), policies.Sync()) as run:
                for b in warm:
                    await run.step(b)
                await run.drain()
                # started in the run's task: the frames already running then (the event
                # loop's own) are not traced, the functions they call from then on are (the
                # steps run inline here under Sync in one process)
                counter.start()
                try:
                    for b in counted:
                        await run.step(b)
                    await run.drain()
                finally:
                    counter.stop()

        anyio.run(main, backend="trio")
    plain = counters["plain"].counts["bytecodes"]
    print(f"tiny chain: work per step, counted over {steps} steps (not timed: load-proof):")
    print(f"   {'run':<16} {'bytecodes':>10} {'x plain':>8} {'Python calls':>13} {'C calls':>8}")
    for name, c in counters.items():
        n = c.counts
        print(
            f"   {name:<16} {n['bytecodes'] / steps:10.0f} {n['bytecodes'] / plain:8.3f} "
            f"{n['python calls'] / steps:13.0f} {n['C calls'] / steps:8.0f}"
        )
    for a, b in (("plain", "Sync, 1 stage"), ("Sync, 1 stage", "Sync, 4 stages")):
        fa, fb = counters[a].by_function, counters[b].by_function
        added = sorted(((fb.get(k, 0) - fa.get(k, 0), k) for k in set(fa) | set(fb)), reverse=True)
        print(f"   bytecodes per step that '{b}' adds to '{a}', by function (top {top}):")
        for n_added, k in added[:top]:
            print(f"      {n_added / steps:7.0f}  {k}")
    return {
        name: {**c.counts, "per step": {k: v / steps for k, v in c.counts.items()}}
        for name, c in counters.items()
    }
