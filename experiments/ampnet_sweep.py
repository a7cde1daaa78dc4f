"""AMPNet-style asynchronous training (Gaunt et al. 2017): time to a target test accuracy.

The MNIST-1D MLP (40-256-256-10, ReLU, dropout) is cut into 3 stages and trained free-running under
``policies.Async(max_active_keys=K, min_update_frequency=F)`` for a grid of K and F, and under
``Sync`` on the same graph (3 stages) and on one stage, all on the same cores in one process.
Every epoch the current weights are evaluated on the 1,000 test rows *without draining the run*
(the keys in flight keep flying, as in AMPNet, which evaluates a snapshot); the evaluation's time
is left out of the wall clock. Time to target is the training wall time at the first epoch whose
test accuracy reaches ``target``.

Run ``python experiments/ampnet_sweep.py --help``; ``--quick true`` is a seconds-long smoke run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import data, nn, optim, policies  # noqa: E402
from asyncnn.backends import open_device_pool  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1)  # async runs depend on timing: two seeds show the spread
    max_active_keys: tuple[int, ...] = (
        1,
        2,
        4,
        8,
        16,
    )  # AMPNet's knob: keys (minibatches) in flight
    min_update_frequency: tuple[int, ...] = (1, 2, 4)  # gradients averaged per update, per actor
    stash: bool = False  # Async's default: a backward recomputes at the latest weights (AMPNet)
    target: float = 0.65  # a little under the MLP's ~71% plateau: reached by every sane setting
    max_epochs: int = 40  # Sync reaches the target in ~15 epochs; room for the slower settings
    stages: int = 3  # one stage per Linear (balanced by parameter count)
    width: int = 256  # as in mnist1d_table.py (experiments/train_mnist1d.py: ~71% at 60 epochs)
    dropout: float = 0.3  # idem: without it the MLP overfits 4,000 samples
    batch_size: int = 100  # the paper's; one Async key is one minibatch
    lr: float = 3e-3  # Adam, as in mnist1d_table.py; the same for every setting (not retuned)
    # The runtime gives a lone stage every core's BLAS threads; on a shared 2-core machine those
    # two threads wait on each other at every small product (25x slower at load 5): 1 thread is
    # what each staged actor gets. 0 keeps the runtime's choice.
    one_stage_blas_threads: int = 1
    # smoke run: 2 epochs, 400 rows, K in (1, 4), F in (1,), one seed (flags given win)
    quick: bool = False
    out: str = "runs/ampnet_sweep"  # results.json and PNGs


QUICK = {"seeds": Config.seeds[:1], "max_active_keys": (1, 4), "min_update_frequency": (1,),
         "max_epochs": 2}  # fmt: skip


def modules(cfg: Config) -> list[Any]:
    """The MLP's layers, in order."""
    w, p = cfg.width, cfg.dropout
    return [
        nn.Linear(40, w), nn.ReLU(), nn.Dropout(p),
        nn.Linear(w, w), nn.ReLU(), nn.Dropout(p),
        nn.Linear(w, 10),
    ]  # fmt: skip


def train_curve(
    cfg: Config,
    label: str,
    policy: policies.Policy,
    stages: int,
    seed: int,
    train: ann.data.ArrayDataset,
    test: dict[str, np.ndarray],
    epochs: int,
) -> dict[str, Any]:
    """Trains one setting for ``epochs``, evaluating a snapshot after each; returns the curve."""
    graph = ann.Graph.sequential(
        modules(cfg), loss=nn.CrossEntropyLoss(), stages=stages, input_shape=(None, 40)
    )
    whole = nn.Sequential(*modules(cfg))  # the same layers in one model, to evaluate snapshots
    curve: list[dict[str, Any]] = []
    out: dict[str, Any] = {}

    async def main() -> None:
        async with AsyncExitStack() as stack:
            pool = None
            if stages == 1 and cfg.one_stage_blas_threads > 0:
                pool = await stack.enter_async_context(
                    open_device_pool(cpu_workers=1, blas_threads=cfg.one_stage_blas_threads)
                )
            await run_epochs(pool)

    async def run_epochs(pool: Any) -> None:
        adam = optim.Adam(lr=cfg.lr)
        async with ann.open_run(graph, optimizer=adam, policy=policy, seed=seed, pool=pool) as run:
            start = time.perf_counter()
            eval_seconds = 0.0
            for epoch in range(epochs):
                for batch in train.batches(cfg.batch_size, True, seed, epoch):
                    await run.step(batch)
                # No drain: a snapshot of whatever each stage holds now, keys still in flight.
                t0 = time.perf_counter()
                trained = t0 - start - eval_seconds
                params = [p for name in graph.layers for p in run.params[name]]
                metrics = ann.evaluate(whole, params, test)
                versions = [run.state().versions[n] for n in graph.layers]
                eval_seconds += time.perf_counter() - t0
                curve.append(
                    {
                        "epoch": epoch + 1,
                        "seconds": trained,
                        "test_accuracy": metrics["accuracy"],
                        "test_loss": metrics["loss"],
                        "updates": versions,
                    }
                )
            await run.drain()
            wall = time.perf_counter() - start - eval_seconds
            stats = run.statistics()
            busy = sum(stats[n].busy_seconds for n in graph.layers)
            out["train_seconds"] = wall
            out["samples_per_second"] = run.samples / wall
            # Sum of the stages' busy time over wall time: >1 only if stages overlapped.
            out["stage_concurrency"] = busy / wall

    anyio.run(main, backend="trio")
    first, summary = _common.target_summary(curve, cfg.target)
    out.update(
        {
            "label": label,
            "policy": policy.to_spec(),
            "stages": stages,
            "seed": seed,
            "curve": curve,
            **summary,
            "updates_to_target": first["updates"][0] if first else None,
        }
    )
    ttt = f"{first['seconds']:5.1f} s (epoch {first['epoch']})" if first else "not reached"
    print(
        f"{label:>14} seed {seed}: target {ttt}, final {out['final_test_accuracy']:.3f}, "
        f"{out['samples_per_second']:7.0f} samples/s, concurrency {out['stage_concurrency']:.2f}",
        flush=True,
    )
    return out


def settings(cfg: Config) -> list[tuple[str, policies.Policy, int]]:
    """(label, policy, stages) of every run: the two Sync baselines, then the Async grid."""
    runs: list[tuple[str, policies.Policy, int]] = [
        ("Sync 1 stage", policies.Sync(), 1),
        (f"Sync {cfg.stages} stages", policies.Sync(), cfg.stages),
    ]
    for f in cfg.min_update_frequency:
        for k in cfg.max_active_keys:
            pol = policies.Async(max_active_keys=k, min_update_frequency=f, stash=cfg.stash)
            runs.append((f"Async K={k} F={f}", pol, cfg.stages))
    return runs


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median over seeds of each setting's time to target, final accuracy and throughput."""
    table: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        times = [r["seconds_to_target"] for r in mine]
        table[label] = {
            "seconds_to_target": float(np.median(times)) if None not in times else None,
            "seconds_to_target_each": times,
            "epochs_to_target_each": [r["epochs_to_target"] for r in mine],
            "final_test_accuracy": float(np.median([r["final_test_accuracy"] for r in mine])),
            "samples_per_second": float(np.median([r["samples_per_second"] for r in mine])),
            "stage_concurrency": float(np.median([r["stage_concurrency"] for r in mine])),
        }
    return table


def plot(cfg: Config, runs: list[dict[str, Any]], table: dict[str, Any]) -> list[str]:
    """Accuracy against wall time (first seed) and a heatmap of time to target over (K, F)."""
    plt = _common.pyplot()
    paths = []
    fig, axes = plt.subplots(1, len(cfg.min_update_frequency), figsize=(11, 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("viridis")
    seed = cfg.seeds[0]
    for ax, f in zip(axes, cfg.min_update_frequency, strict=True):
        for r in runs:
            if r["seed"] != seed:
                continue
            xs = [c["seconds"] for c in r["curve"]]
            ys = [c["test_accuracy"] for c in r["curve"]]
            spec = r["policy"]
            if spec["type"] == "Sync":
                style = "-" if r["stages"] == 1 else "--"
                ax.plot(xs, ys, style, color="k", lw=1.2, label=r["label"])
            elif spec["args"]["min_update_frequency"] == f:
                k = spec["args"]["max_active_keys"]
                i = cfg.max_active_keys.index(k) / max(len(cfg.max_active_keys) - 1, 1)
                ax.plot(xs, ys, color=cmap(0.9 * i), lw=1, label=f"Async K={k}")
        ax.axhline(cfg.target, color="r", lw=0.6, ls=":")
        ax.set_title(f"min_update_frequency F={f}", fontsize=9)
        ax.set_xlabel("training wall time (s)")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_ylim(0.2, 0.8)
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"MNIST-1D MLP, {cfg.stages} stages, seed {seed}: accuracy vs time "
                 f"({_common.cpu_label()})")  # fmt: skip
    paths.append(_common.save_figure(fig, cfg.out, "ampnet_curves.png"))

    grid = np.full((len(cfg.min_update_frequency), len(cfg.max_active_keys)), np.nan)
    for i, f in enumerate(cfg.min_update_frequency):
        for j, k in enumerate(cfg.max_active_keys):
            t = table[f"Async K={k} F={f}"]["seconds_to_target"]
            grid[i, j] = np.nan if t is None else t
    sync = table[f"Sync {cfg.stages} stages"]["seconds_to_target"]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    cmap = plt.get_cmap("viridis_r").with_extremes(bad="lightgrey")  # grey: not reached
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            nr = np.isnan(grid[i, j])
            text = "not\nreached" if nr else f"{grid[i, j]:.1f}"
            ax.text(j, i, text, ha="center", va="center", color="k" if nr else "w", fontsize=8)
    ax.set_xticks(range(len(cfg.max_active_keys)), [str(k) for k in cfg.max_active_keys])
    ax.set_yticks(range(len(cfg.min_update_frequency)), [str(f) for f in cfg.min_update_frequency])
    ax.set_xlabel("max_active_keys K")
    ax.set_ylabel("min_update_frequency F")
    sync_text = "n/r" if sync is None else f"{sync:.1f} s"
    ax.set_title(
        f"seconds to {cfg.target:.0%} test accuracy (median over seeds); "
        f"Sync {cfg.stages} stages: {sync_text}",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax)
    paths.append(_common.save_figure(fig, cfg.out, "ampnet_heatmap.png"))
    return paths


POSITIVE = ("max_active_keys", "min_update_frequency", "max_epochs", "stages", "width",
            "batch_size", "lr")  # fmt: skip


def check(cfg: Config) -> str | None:
    """What is wrong with ``cfg`` that argparse cannot see, or None."""
    if cfg.stages > 7:
        return f"argument --stages: the MLP has 7 modules, got {cfg.stages} stages"
    return _common.fraction_problem("--dropout", cfg.dropout) or _common.fraction_problem(
        "--target", cfg.target, one=True
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = _common.parse_config(
        Config, argv, __doc__, check=check, positive=POSITIVE, presets={"quick": QUICK}
    )
    ds = data.load_mnist1d()
    rows = 400 if cfg.quick else len(ds["y_train"])
    train = data.ArrayDataset({"x": ds["x_train"][:rows], "y": ds["y_train"][:rows]})
    test = {"x": ds["x_test"], "y": ds["y_test"]}
    before = _common.machine()
    # Untimed warm-up: the first run of a process pays for imports, threads and page faults.
    warm = data.ArrayDataset({"x": ds["x_train"][:200], "y": ds["y_train"][:200]})
    train_curve(cfg, "warm-up", policies.Async(max_active_keys=2), cfg.stages, 0, warm, test, 1)
    runs = []
    for seed in cfg.seeds:
        for label, policy, stages in settings(cfg):
            runs.append(train_curve(cfg, label, policy, stages, seed, train, test, cfg.max_epochs))
    table = summarise(runs)
    results = {"machine_at_start": before, "train_rows": rows, "table": table, "runs": runs}
    results["figures"] = plot(cfg, runs, table)
    return _common.finish(cfg.out, cfg, results)


if __name__ == "__main__":
    main()
