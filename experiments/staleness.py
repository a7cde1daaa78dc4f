"""How stale gradients hurt: PipeDream with and without weight stashing, and Async with a growing
number of keys in flight, on MNIST-1D with a 4-stage MLP.

Every setting trains the same model (40-256-256-256-10, ReLU, one Linear per stage) from the same
weights with Adam and batches of 100, one update per batch per stage, so they differ only in how
old the weights are that a gradient was computed against. Staleness is measured from a trace of
each run: at a stage, its version at a key's backward minus its version at that key's forward.
Run ``python experiments/staleness.py --help``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

import asyncnn as ann
from asyncnn import nn, optim, policies

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402


@dataclass(frozen=True)
class Config:
    width: int = 256  # the 40-256-256-256-10 MLP
    epochs: int = 30  # Sync's test accuracy has about plateaued by then (~2 min for all)
    batch_size: int = 100  # the MNIST-1D paper's batch size
    lr: float = 1e-3  # the Adam rate
    pipedream_microbatches: int = 1  # one key per batch: every setting updates once per 100 rows
    max_active_keys: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # Async depth, 1 = no staleness
    num_samples: int = 5000  # the published MNIST-1D: 4,000 train / 1,000 test
    train_samples: int = 0  # 0: all; fewer for a quick smoke run
    seed: int = 0  # weights, shuffling: the same start for every setting
    out: str = "runs/staleness"  # results.json, traces and PNGs


class Widths(Protocol):
    """What :func:`make_graph` reads of a config (policy_zoo.py passes its own Config)."""

    @property
    def width(self) -> int: ...


def make_graph(cfg: Widths) -> ann.Graph:
    """One Linear (+ ReLU) per stage: 40-w, w-w, w-w, w-10."""
    w = cfg.width
    return ann.Graph.sequential(
        [nn.Linear(40, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
         nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10)],
        loss=nn.CrossEntropyLoss(),
        stages=[2, 2, 2, 1],
        input_shape=(None, 40),
    )  # fmt: skip


def settings(cfg: Config) -> list[tuple[str, Any]]:
    m = cfg.pipedream_microbatches
    out: list[tuple[str, Any]] = [
        ("Sync", policies.Sync()),
        ("PipeDream stash", policies.PipeDream(microbatches=m, stash=True)),
        ("PipeDream no stash", policies.PipeDream(microbatches=m, stash=False)),
    ]
    out += [(f"Async A={a}", policies.Async(max_active_keys=a)) for a in cfg.max_active_keys]
    return out


def train_one(cfg: Config, name: str, policy: Any, data: dict[str, Any]) -> dict[str, Any]:
    slug = name.lower().replace(" ", "_").replace("=", "")
    trace = os.path.join(cfg.out, f"{slug}.trace")
    tr = ann.Trainer(
        make_graph(cfg), optim.Adam(lr=cfg.lr), policy, seed=cfg.seed, trace=trace,
        trace_payloads="none",
    )  # fmt: skip
    train = {"x": data["x_train"], "y": data["y_train"]}
    test = {"x": data["x_test"], "y": data["y_test"]}
    losses: list[float] = []
    test_acc: list[float] = []
    seconds = 0.0
    stale: dict[str, list[float]] = {}
    for _ in range(cfg.epochs):
        hist = tr.fit(train, epochs=1, batch_size=cfg.batch_size, shuffle=True)
        losses += hist.losses
        seconds += hist.seconds
        final = tr.evaluate(test)  # after the last epoch: the final weights' metrics
        test_acc.append(final["accuracy"])
        s = ann.trace.summary(tr.traces[-1])
        for layer in tr.graph.layers:
            a = s["actors"][layer]
            stale.setdefault(layer, []).append(a["staleness_mean"])
            stale.setdefault(layer + ":max", []).append(a["staleness_max"])
        os.remove(tr.traces[-1])  # one trace per fit; the summary is all we keep
    layers = tr.graph.layers
    per_stage = {n: float(np.mean(stale[n])) for n in layers}
    result = {
        "setting": name,
        "policy": repr(policy),
        "losses": losses,
        "test_accuracy_per_epoch": test_acc,
        "final_test_accuracy": final["accuracy"],
        "final_test_loss": final["loss"],
        "final_train_loss": float(np.mean(losses[-len(losses) // cfg.epochs :])),
        "staleness_mean_per_stage": per_stage,
        "staleness_max_per_stage": {n: int(max(stale[n + ":max"])) for n in layers},
        "staleness_mean": float(np.mean(list(per_stage.values()))),
        "seconds": seconds,
    }
    print(
        f"{name:<20} test accuracy {final['accuracy']:.3f}, staleness mean "
        f"{result['staleness_mean']:.2f} (per stage "
        + " ".join(f"{v:.2f}" for v in per_stage.values())
        + f"), {seconds:.1f} s"
    )
    return result


def plot(cfg: Config, rows: list[dict[str, Any]]) -> list[str]:
    plt = _common.pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    window = max(1, len(rows[0]["losses"]) // (4 * cfg.epochs))  # a quarter-epoch running mean
    for r in rows:
        y = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
        style = "--" if r["setting"].startswith("PipeDream") else "-"
        lw = 2.5 if r["setting"] == "Sync" else 1.2
        ax.plot(np.arange(len(y)) + window, y, style, lw=lw, label=r["setting"])
    ax.set_yscale("log")
    ax.set_xlabel("minibatch (100 rows)")
    ax.set_ylabel(f"training loss (running mean of {window})")
    ax.set_title("MNIST-1D, 4-stage MLP: loss per setting")
    ax.legend(fontsize=8, ncol=2)
    paths.append(_common.save_figure(fig, cfg.out, "staleness_loss.png"))

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        marker = "s" if r["setting"].startswith("PipeDream") else "o"
        ax.plot(r["staleness_mean"], r["final_test_accuracy"], marker, ms=7)
        below = r["setting"] in ("Sync", "PipeDream no stash")  # they share a point with another
        ax.annotate(r["setting"], (r["staleness_mean"], r["final_test_accuracy"]),
                    textcoords="offset points", xytext=(5, -11 if below else 4),
                    fontsize=8)  # fmt: skip
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("measured staleness (versions, mean over stages and backwards)")
    ax.set_ylabel(f"test accuracy after {cfg.epochs} epochs")
    ax.set_title("Final accuracy vs staleness")
    paths.append(_common.save_figure(fig, cfg.out, "staleness_accuracy.png"))
    return paths


def check(cfg: Config) -> str | None:
    """What is wrong with ``cfg`` that argparse cannot see (a usage error, before any
    training), or None."""
    return _common.num_samples_problem(cfg.num_samples)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    positive = ("width", "epochs", "batch_size", "pipedream_microbatches", "max_active_keys",
                "num_samples", "lr")  # fmt: skip
    cfg = _common.parse_config(Config, argv, __doc__, check=check, positive=positive)
    os.makedirs(cfg.out, exist_ok=True)
    data = ann.data.load_mnist1d(num_samples=cfg.num_samples)
    if cfg.train_samples:
        data = {**data, "x_train": data["x_train"][: cfg.train_samples],
                "y_train": data["y_train"][: cfg.train_samples]}  # fmt: skip
    rows = [train_one(cfg, name, policy, data) for name, policy in settings(cfg)]
    plots = plot(cfg, rows)
    return _common.finish(cfg.out, cfg, {"rows": rows, "plots": plots})


if __name__ == "__main__":
    main()
