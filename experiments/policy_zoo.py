"""The policy zoo: every schedule and staleness remedy of asyncnn on MNIST-1D, at equal epochs.

Every setting trains the same 4-stage MLP (40-256-256-256-10, ReLU, one Linear per stage) from the
same weights, on the same shuffled batches of 100, for the same number of epochs, in one ``fit``.
Per setting it records the test accuracy, the delay of the gradients each stage applied
(``ActorStatistics.delays``: the stage's version at the update minus the version its forward
used), the stages' idle fraction, and the peak stored activations and parameter versions.
The remedies wrap ``Async(max_active_keys=16)``, the most stale setting of the staleness
experiment, and PipeDream. Run ``python experiments/policy_zoo.py --help``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

import asyncnn as ann
from asyncnn import optim, policies

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402
from staleness import make_graph  # noqa: E402 - the staleness experiment's chain, as there


@dataclass(frozen=True)
class Config:
    width: int = 256  # the staleness experiment's 40-256-256-256-10 MLP
    epochs: int = 30  # equal for every setting, as in the staleness experiment (~3 min in all)
    batch_size: int = 100  # the MNIST-1D paper's batch size
    optimizers: tuple[str, ...] = ("sgd", "adam")  # the lr remedies scale SGD's step, not Adam's
    sgd_lr: float = 0.05  # SGD with momentum 0.9: Sync's test accuracy plateaus by 30 epochs
    adam_lr: float = 1e-3  # the staleness experiment's Adam rate
    microbatches: int = 4  # keys per minibatch of the pipelined schedules (PipeDream: 1)
    max_active_keys: int = 16  # Async's depth: its staleness is what the remedies fight
    async_repeats: int = 3  # Async depends on thread timing: its settings run this often
    dc_strength: float = 2.0  # DC-ASGD's lambda
    pipemare_warmup: int = 500  # PipeMare's T, in updates of a stage (~1/2 of the run's updates)
    num_samples: int = 5000  # the published MNIST-1D: 4,000 train / 1,000 test
    train_samples: int = 0  # 0: all; fewer for a quick smoke run
    only: str = ""  # comma-separated setting names to run (empty: all)
    seed: int = 0  # weights, shuffling: the same start for every setting
    out: str = "runs/policy_zoo"  # results.json and PNGs


@dataclass(frozen=True)
class ConstantScale(policies.Remedy):
    """A baseline remedy: every stale gradient scaled by one constant (for SGD, a smaller
    learning rate for the stale updates only), against which the delay-aware ones compare."""

    scale: float = 1.0
    name: ClassVar[str] = "ConstantScale"

    def correct(self, grads: Any, delay: int, version: int, weights: Any, forward: Any) -> Any:
        return _scaled(grads, self.scale)


def _scaled(tree: Any, scale: float) -> Any:
    if isinstance(tree, dict):
        return {k: _scaled(v, scale) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_scaled(v, scale) for v in tree)
    return None if tree is None else tree * scale


def settings(cfg: Config) -> list[tuple[str, Any]]:
    m = cfg.microbatches
    stale = policies.Async(max_active_keys=cfg.max_active_keys)
    pipe = policies.PipeDream(microbatches=1)
    a = f"Async A={cfg.max_active_keys}"
    out: list[tuple[str, Any]] = [
        ("Sync", policies.Sync()),
        (f"GPipe M={m}", policies.GPipe(m)),
        (f"OneFOneB M={m}", policies.OneFOneB(m)),
        (f"Interleaved1F1B M={m} V=2", policies.Interleaved1F1B(m, virtual=2)),
        ("PipeDream", pipe),
        (f"PipeDream2BW M={m}", policies.PipeDream2BW(m)),
        (a, stale),
        (f"{a} + DelayCompensation", policies.DelayCompensation(stale, strength=cfg.dc_strength)),
        (f"{a} + StalenessScaledLR", policies.StalenessScaledLR(stale)),
        (f"{a} + ConstantScale 1/A", ConstantScale(stale, scale=1 / cfg.max_active_keys)),
        (f"{a} + PipeMareLR", policies.PipeMareLR(stale, warmup_updates=cfg.pipemare_warmup)),
        (f"{a} + DiscrepancyCorrection", policies.DiscrepancyCorrection(stale, decay=0.9)),
        (
            f"{a} + WeightPrediction",
            policies.WeightPrediction(
                policies.Async(max_active_keys=cfg.max_active_keys, stash=True)
            ),
        ),  # fmt: skip
        ("PipeDream + DelayCompensation", policies.DelayCompensation(pipe, cfg.dc_strength)),
        ("PipeDream + WeightPrediction", policies.WeightPrediction(pipe)),
    ]
    if cfg.only:
        wanted = {s.strip() for s in cfg.only.split(",")}
        out = [(n, p) for n, p in out if n in wanted]
    return out


def make_optimizer(cfg: Config, name: str) -> Any:
    if name == "sgd":
        return optim.SGD(lr=cfg.sgd_lr, momentum=0.9)
    if name == "adam":
        return optim.Adam(lr=cfg.adam_lr)
    raise ValueError(f"--optimizers {name!r}: use sgd or adam")


def train_one(
    cfg: Config, name: str, policy: Any, opt: str, data: dict[str, Any]
) -> dict[str, Any]:
    tr = ann.Trainer(make_graph(cfg), make_optimizer(cfg, opt), policy, seed=cfg.seed)
    train = {"x": data["x_train"], "y": data["y_train"]}
    start = time.perf_counter()
    try:
        hist = tr.fit(train, epochs=cfg.epochs, batch_size=cfg.batch_size, shuffle=True)
    except Exception as exc:  # noqa: BLE001 - a setting this runtime cannot run is reported
        print(f"{opt:<5}{name:<36} not run: {type(exc).__name__}: {exc}")
        return {"setting": name, "optimizer": opt, "policy": repr(policy),
                "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
    wall = time.perf_counter() - start
    final = tr.evaluate({"x": data["x_test"], "y": data["y_test"]})
    layers = tr.graph.layers
    st = {n: hist.statistics[n] for n in layers}
    epoch_keys = len(hist.losses) // cfg.epochs
    result = {
        "setting": name,
        "optimizer": opt,
        "policy": repr(policy),
        "final_test_accuracy": final["accuracy"],
        "final_test_loss": final["loss"],
        "final_train_loss": float(np.mean(hist.losses[-epoch_keys:])),
        "losses": hist.losses,
        "delay_mean_per_stage": {n: st[n].mean_delay for n in layers},
        "delay_max_per_stage": {n: st[n].max_delay for n in layers},
        "delay_histogram_per_stage": {n: dict(st[n].delays) for n in layers},
        "delay_mean": float(np.mean([st[n].mean_delay for n in layers])),
        "idle_fraction": float(
            np.mean(
                [s.idle_seconds / max(s.idle_seconds + s.busy_seconds, 1e-12) for s in st.values()]
            )
        ),  # fmt: skip
        "peak_stored_per_stage": {n: st[n].peak_stored for n in layers},
        "peak_versions_per_stage": {n: st[n].peak_versions_held for n in layers},
        "updates_per_stage": {n: st[n].updates for n in layers},
        "seconds": wall,
    }
    print(
        f"{opt:<5}{name:<36} test accuracy {final['accuracy']:.3f}, delay mean per stage "
        + " ".join(f"{v:.2f}" for v in result["delay_mean_per_stage"].values())
        + f", {wall:.1f} s"
    )
    return result


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs of a setting: the first run's record, with the mean and the
    spread of the final test accuracy over all of them."""
    row = dict(runs[0])
    accs = [r["final_test_accuracy"] for r in runs if "error" not in r]
    if accs:
        row["final_test_accuracy"] = float(np.mean(accs))
        row["accuracy_runs"] = accs
        row["accuracy_std"] = float(np.std(accs))
    return row


def plot(cfg: Config, rows: list[dict[str, Any]]) -> list[str]:
    plt = _common.pyplot()
    names = list(dict.fromkeys(r["setting"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.5))
    height = 0.8 / max(1, len(cfg.optimizers))
    for j, opt in enumerate(cfg.optimizers):
        acc = {r["setting"]: r.get("final_test_accuracy", np.nan) for r in rows
               if r["optimizer"] == opt}  # fmt: skip
        ys = np.arange(len(names)) + j * height
        ax.barh(ys, [acc.get(n, np.nan) for n in names], height=height, label=opt)
    ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"test accuracy after {cfg.epochs} epochs")
    ax.set_title("MNIST-1D, 4-stage MLP: the policy zoo")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return [_common.save_figure(fig, cfg.out, "policy_zoo.png")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = _common.parse_config(Config, argv, __doc__)
    os.makedirs(cfg.out, exist_ok=True)
    data = ann.data.load_mnist1d(num_samples=cfg.num_samples)
    if cfg.train_samples:
        data = {**data, "x_train": data["x_train"][: cfg.train_samples],
                "y_train": data["y_train"][: cfg.train_samples]}  # fmt: skip
    rows = []
    for opt in cfg.optimizers:
        for name, policy in settings(cfg):
            repeats = cfg.async_repeats if policy.deterministic is False else 1
            runs = [train_one(cfg, name, policy, opt, data) for _ in range(repeats)]
            rows.append(_merge(runs))
    plots = plot(cfg, rows)
    return _common.finish(cfg.out, cfg, {"rows": rows, "plots": plots})


if __name__ == "__main__":
    main()
