"""Benchmark of message tracing: what recording a trace costs a training step.

The ``Sync`` MLP 784-1024-1024-1024-10 (float32, batch 256, SGD) is trained untraced and traced,
alternating round by round in one process (so background load hits every variant alike): one run
(``open_run``, ``--steps`` minibatches, drain) per variant per round, after a warm-up run each,
each run continuing from the last one's weights. Two times per variant: the step time (from the
``--skip``-th step to the end of the drain, over those steps: the hot path, once the initial
weights are written) and the fit time over the steps
(opening and closing the run too, which for a traced run is writing the header and the initial
weights, and waiting for the writer thread to finish: what ``Trainer.fit`` costs). Variants, on 1 stage (the target) and on 2 stages (more
and larger messages: 1 MB activations and gradients cross between the stages):

- untraced;
- traced, digests on, payloads ``"inputs"`` (the default: enough to replay) — target <= 5% more
  step time than untraced;
- traced with payloads ``"all"`` and ``"none"``, for information.

Reported per variant: the median step time over rounds, its min and max, the overhead against
untraced (ratio of medians, and the spread of the per-round ratios), and the trace's size: bytes per
step and per message (a message = one recorded ``send`` event), counting the events only: the
header and the initial weights are written once per trace (here 11.7 MB: the MLP's
parameters).

Run: python experiments/bench_trace.py [--quick] [--out runs/bench_trace.json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402
from bench_runtime import SIZES, data, mlp_modules  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import nn, optim, policies  # noqa: E402
from asyncnn.backends import tune_allocator  # noqa: E402

BATCH = 256
TRACED = ("inputs", "all", "none")


class Variant:
    """One graph, untraced or traced with a payload mode, whose runs are timed."""

    def __init__(self, stages: int, payloads: str | None, workdir: str) -> None:
        self.stages = stages
        self.payloads = payloads
        self.name = f"{stages} stage(s), " + (
            "untraced" if payloads is None else f"traced, payloads={payloads!r}"
        )
        self.graph = ann.Graph.sequential(
            mlp_modules(),
            loss=nn.CrossEntropyLoss(),
            stages=stages,
            input_shape=(None, SIZES[0]),
            balance="params",
        )
        self.trace = (
            None if payloads is None else os.path.join(workdir, f"s{stages}_{payloads}.trace")
        )
        self.state: Any = None  # carried from run to run, like Trainer.fit does
        # the step time leaves out the first steps of a run, while the writer thread writes the
        # initial weights (a cost per run, which the fit time includes)
        self.skip = 0
        self.step_seconds: list[float] = []  # from the first step to the end of the drain
        self.fit_seconds: list[float] = []  # opening and closing the run (and trace) too
        self.sizes: list[dict[str, float]] = []

    def fit(self, batches: list[dict[str, np.ndarray]], timed: bool) -> None:
        times: list[float] = []

        async def main() -> None:
            times.append(time.perf_counter())
            async with ann.open_run(
                self.graph,
                optim.SGD(lr=0.01),
                policies.Sync(),
                state=self.state,
                trace=self.trace,
                trace_payloads=self.payloads or "inputs",
            ) as run:
                times.append(time.perf_counter())
                for i, b in enumerate(batches):
                    await run.step(b)
                    if i == self.skip:
                        # under Sync, step() returns once minibatch i is admitted, after the
                        # ones before it finished: from here, steps - skip minibatches remain
                        times.append(time.perf_counter())
                await run.drain()
                times.append(time.perf_counter())
            times.append(time.perf_counter())
            self.state = run.state()

        anyio.run(main, backend="trio")
        steps = len(batches)
        if timed:
            self.step_seconds.append((times[3] - times[2]) / (steps - self.skip))
            self.fit_seconds.append((times[4] - times[0]) / steps)
        if self.trace is not None:
            if timed and not self.sizes:  # sizes are the same every round: measure once
                self.sizes.append(trace_size(self.trace, steps))
            os.remove(self.trace)  # keep the disk (page cache) in the same state every round


def trace_size(path: str, steps: int) -> dict[str, float]:
    """Sizes in the trace: the start (header and initial weights, written once) apart from the
    events (what grows with every step)."""
    total = os.path.getsize(path)
    events = sends = payload_bytes = 0
    first_event = total
    with open(path, "rb") as f:
        for i, (offset, rec) in enumerate(ann.trace.iter_frames(f, path)):
            assert rec is not None, "the trace is truncated"
            if i == 0 or "state" in rec:
                continue
            first_event = min(first_event, offset)
            events += 1
            if rec["ev"] == "send":
                sends += 1
                payload_bytes += sum(len(b) for b in rec.get("pl", []) if b is not None)
    body = total - first_event
    return {
        "bytes": total,
        "start_bytes": first_event,
        "event_bytes": body,
        "events": events,
        "messages": sends,
        "events_per_step": events / steps,
        "messages_per_step": sends / steps,
        "bytes_per_step": body / steps,
        "bytes_per_message": body / max(1, sends),
        "payload_bytes_per_step": payload_bytes / steps,
        "metadata_bytes_per_event": (body - payload_bytes) / max(1, events),
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model
            )
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "asyncnn": ann.__version__,
        "loadavg_at_start": os.getloadavg(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


#: ``--rounds``, ``--steps`` and ``--skip`` by default, and with ``--quick`` (flags given win)
DEFAULTS = (15, 30, 5)
QUICK = (2, 4, 1)


def parser() -> argparse.ArgumentParser:
    """The command line (one-line errors)."""
    ap = _common.OneLineParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true",
                    help="few rounds and steps (a smoke run: --rounds 2 --steps 4 --skip 1 "
                         "unless given)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=None, help=f"default {DEFAULTS[0]}")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"minibatches per timed run (default {DEFAULTS[1]})")  # fmt: skip
    ap.add_argument("--skip", type=int, default=None,
                    help=f"first steps left out of the step time (default {DEFAULTS[2]})")  # fmt: skip
    ap.add_argument("--out", default="runs/bench_trace.json")
    ap.add_argument("--tmp", default=None, help="where the traces go (default: a temp dir)")
    return ap


def settings(args: argparse.Namespace) -> tuple[int, int, int]:
    """``(rounds, steps, skip)``: those given, the rest ``--quick``'s or the defaults."""
    base = QUICK if args.quick else DEFAULTS
    given = (args.rounds, args.steps, args.skip)
    rounds, steps, skip = (b if g is None else g for g, b in zip(given, base, strict=True))
    return rounds, steps, skip


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    rounds, steps, skip = settings(args)
    for flag, value in (("--rounds", rounds), ("--steps", steps)):
        if value < 1:
            ap.error(f"argument {flag}: must be >= 1, got {value}")
    if not 0 <= skip < steps:
        # the step time is taken from the skip-th step: at least one step must be left
        ap.error(f"argument --skip: must be in 0..{steps - 1} (below --steps {steps}), got {skip}")
    tune_allocator()
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv)}
    report["config"] = {
        "batch": BATCH,
        "steps_per_run": steps,
        "steps_left_out_of_step_time": skip,
        "rounds": rounds,
        "mlp": SIZES,
    }
    d = data(BATCH * steps)
    batches = [{k: v[i * BATCH : (i + 1) * BATCH] for k, v in d.items()} for i in range(steps)]
    workdir = tempfile.mkdtemp(prefix="bench_trace_", dir=args.tmp)
    try:
        variants = [Variant(1, p, workdir) for p in (None, *TRACED)]
        variants += [Variant(2, p, workdir) for p in (None, *TRACED)]
        for v in variants:
            v.fit(batches[:2], timed=False)
            v.skip = skip
        for r in range(rounds):
            # rotate the order, so that no variant always runs right after another
            for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                v.fit(batches, timed=True)
            print(f"round {r + 1}/{rounds} done", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    results: dict[str, Any] = {}
    for stages in (1, 2):
        group = [v for v in variants if v.stages == stages]
        base = group[0]
        print(f"\nSync, {stages} stage(s), MLP {SIZES}, float32, batch {BATCH}, ms per step:")
        print(f"  {'':<40} {'step: median [min-max]':>24}  {'overhead (per round)':>24}"
              f"  {'fit/steps':>9}  {'overhead':>8}  {'trace per step':>14}  {'per message':>11}")  # fmt: skip
        for v in group:
            row: dict[str, Any] = {}
            line = f"  {v.name:<40}"
            for what, mine, theirs in (
                ("step", v.step_seconds, base.step_seconds),
                ("fit", v.fit_seconds, base.fit_seconds),
            ):
                s = summary(mine)
                row[f"{what}_ms"] = {k: x * 1e3 for k, x in s.items()}
                row[f"{what}_ms_samples"] = [x * 1e3 for x in mine]
                if what == "step":
                    line += (
                        f" {s['median'] * 1e3:7.2f} [{s['min'] * 1e3:6.2f}-{s['max'] * 1e3:6.2f}]"
                    )
                else:
                    line += f"  {s['median'] * 1e3:9.2f}"
                if v is base:
                    line += " " * (26 if what == "step" else 10)
                    continue
                ratios = [t / u for t, u in zip(mine, theirs, strict=True)]
                row[f"{what}_overhead_pct_of_medians"] = (
                    s["median"] / statistics.median(theirs) - 1
                ) * 100
                row[f"{what}_overhead_pct_per_round"] = {
                    k: (x - 1) * 100 for k, x in summary(ratios).items()
                }
                per = row[f"{what}_overhead_pct_per_round"]
                if what == "step":
                    line += (
                        f"  {row['step_overhead_pct_of_medians']:+6.1f}% "
                        f"({per['min']:+5.1f}..{per['max']:+5.1f}%)"
                    )
                else:
                    line += f"  {row['fit_overhead_pct_of_medians']:+7.1f}%"
            if v.sizes:
                row["size"] = v.sizes[0]
                line += (
                    f"  {v.sizes[0]['bytes_per_step'] / 1e3:11.1f} kB"
                    f"  {v.sizes[0]['bytes_per_message']:9.0f} B"
                )
            results[v.name] = row
            print(line)
    report["results"] = results
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    _common.write_json(args.out, report)


if __name__ == "__main__":
    main()
