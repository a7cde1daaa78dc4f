"""Local learning (decoupled greedy learning, Belilovsky et al. 2020) against end-to-end backprop.

Each hidden stage of an MLP on MNIST-1D has its own auxiliary head (a Linear to the 10 classes)
and its own cross-entropy loss node; every stage after the first is a stop-gradient layer
(``g.layer(..., stop_gradient=True)``), so no gradient crosses from one stage to the one below and
no stage waits for a backward message from the stages above it: each learns from its own head. The baseline trains the same stages end to end from the last head alone. Both run
under ``Sync``, ``PipeDream`` and ``Async``; we measure test accuracy (final head and every
stage's head) and wall time.

Run ``python experiments/local_learning.py --help``; results go to ``runs/local_learning``
(``results.json``, the PNGs, and ``local_learning.md``: the docs page's table).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn, optim, policies

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0  # weights and shuffling: every run starts from the same weights
    width: int = 256  # the MLP width of the MNIST-1D baseline (experiments/train_mnist1d.py)
    stages: int = 3  # hidden stages, each Linear+ReLU with its own head in local learning
    epochs: int = 30  # backprop's test accuracy plateaus by then; a run: 5-9 s on the 2-core VM
    batch_size: int = 100  # the MNIST-1D paper's batch size
    lr: float = 1e-3  # Adam, the same for both methods
    policies: tuple[str, ...] = ("Sync", "PipeDream", "Async")  # both methods under each
    async_keys: int = 4  # Async's keys in flight: one per stage, as PipeDream holds
    num_samples: int = 5000  # the published MNIST-1D size: 4,000 train / 1,000 test
    out: str = "runs/local_learning"  # results.json and the PNGs


COLORS = {"backprop": "C0", "local": "C1"}  # one colour per method in the plots
STYLES = {"Sync": "-", "PipeDream": "--", "Async": ":"}  # one line style per policy


def build_graph(cfg: Config, local: bool) -> ann.Graph:
    """``stages`` blocks Linear+ReLU. Local: a head and a loss node per block, each block after
    the first cut from the one below. End to end: one head after the last block, one loss."""
    g = ann.Graph()
    h = g.input("x", shape=(None, 40))
    y = g.input("y", shape=(None,), dtype="int64")
    width_in = 40
    for i in range(cfg.stages):
        block = nn.Sequential(nn.Linear(width_in, cfg.width), nn.ReLU())
        h = g.layer(f"block{i}", block, h, stop_gradient=local and i > 0)
        width_in = cfg.width
        if local or i == cfg.stages - 1:
            logits = g.layer(f"head{i}", nn.Linear(cfg.width, 10), h)
            g.loss(f"loss{i}", nn.CrossEntropyLoss(), logits, y)  # the losses add up
            g.output(f"head{i}", logits)
    return g


def make_policy(name: str, cfg: Config) -> Any:
    """One key per minibatch in each: the policies differ in order and in flushing only."""
    if name == "Sync":
        return policies.Sync()
    if name == "PipeDream":
        return policies.PipeDream(microbatches=1)
    if name == "Async":
        return policies.Async(max_active_keys=cfg.async_keys)
    raise ValueError(f"unknown policy {name!r}: use Sync, PipeDream or Async")


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of numpy logits (for the test curves)."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def train_one(cfg: Config, data: dict[str, np.ndarray], local: bool, policy: str) -> dict[str, Any]:
    """Trains one (method, policy) pair epoch by epoch; returns its curves and totals."""
    tr = ann.Trainer(
        build_graph(cfg, local), optimizer=optim.Adam(lr=cfg.lr), policy=make_policy(policy, cfg),
        seed=cfg.seed,
    )  # fmt: skip
    train = {"x": data["x_train"], "y": data["y_train"]}
    heads = [f"head{i}" for i in range(cfg.stages)] if local else [f"head{cfg.stages - 1}"]
    final = heads[-1]
    acc: dict[str, list[float]] = {h: [] for h in heads}
    test_loss: list[float] = []
    seconds, busy = 0.0, 0.0
    for _ in range(cfg.epochs):
        hist = tr.fit(train, epochs=1, batch_size=cfg.batch_size, shuffle=True)
        seconds += hist.seconds
        busy += sum(s.busy_seconds for s in hist.statistics.values())
        outs = tr.predict({"x": data["x_test"]})
        for h in heads:
            acc[h].append(float((outs[h].argmax(1) == data["y_test"]).mean()))
        test_loss.append(cross_entropy(outs[final], data["y_test"]))
    method = "local" if local else "backprop"
    label = f"{method} / {policy}"
    print(
        f"{label:20s} final head test accuracy {acc[final][-1]:.3f}; per stage "
        + ", ".join(f"{h} {v[-1]:.3f}" for h, v in acc.items())
        + f"; {seconds:.1f} s ({busy / seconds:.2f} actors busy on average)"
    )
    return {
        "method": method,
        "policy": policy,
        "label": label,
        "test_accuracy": acc[final][-1],
        "best_test_accuracy": max(acc[final]),
        # counted from 1, as the curves' x axis: the epoch after which the best was measured
        "best_epoch": int(np.argmax(acc[final])) + 1,
        "head_test_accuracy": {h: v[-1] for h, v in acc.items()},
        "seconds": round(seconds, 2),
        "samples_per_second": round(cfg.epochs * len(train["y"]) / seconds, 1),
        "mean_busy_actors": round(busy / seconds, 3),
        "test_accuracy_per_epoch": acc[final],
        "head_test_accuracy_per_epoch": acc,
        "test_loss_per_epoch": test_loss,
    }


def markdown_table(cfg: Config, runs: list[dict[str, Any]]) -> str:
    """The results as the docs page's table: one row per run, the better final-head accuracy of
    each policy's two methods in bold, "best (epoch)" the final head's best test accuracy and
    the epoch (from 1) it was measured after, "–" for a head that backprop's graph lacks."""
    heads = [f"head{i}" for i in range(cfg.stages)]
    lines = [
        "| method / policy | final head test acc. | best (epoch) | " + " | ".join(heads)
        + " | wall time (s) | samples/s | actors busy (mean) |",
        "| --- |" + " --- |" * (len(heads) + 5),
    ]  # fmt: skip
    for r in runs:
        rivals = [o["test_accuracy"] for o in runs if o["policy"] == r["policy"]]
        acc = f"{r['test_accuracy']:.3f}"
        if len(rivals) > 1 and r["test_accuracy"] == max(rivals):
            acc = f"**{acc}**"
        per_head = [
            f"{r['head_test_accuracy'][h]:.3f}" if h in r["head_test_accuracy"] else "–"
            for h in heads
        ]
        lines.append(
            f"| {r['label']} | {acc} | {r['best_test_accuracy']:.3f} ({r['best_epoch']}) | "
            + " | ".join(per_head)
            + f" | {r['seconds']:.2f} | {r['samples_per_second']:,.0f} | "
            f"{r['mean_busy_actors']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(cfg: Config, runs: list[dict[str, Any]], out: str) -> list[str]:
    """Final-head curves of every run; per-stage head accuracy; wall time per policy."""
    plt = _common.pyplot()
    epochs = np.arange(1, cfg.epochs + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in runs:
        look = {"color": COLORS[r["method"]], "ls": STYLES[r["policy"]], "label": r["label"]}
        ax_loss.plot(epochs, r["test_loss_per_epoch"], **look)
        ax_acc.plot(epochs, r["test_accuracy_per_epoch"], **look)
    ax_loss.set(xlabel="epoch", ylabel="final head: test cross-entropy")
    ax_acc.set(xlabel="epoch", ylabel="final head: test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MNIST-1D, {cfg.stages} stages of {cfg.width}: local learning vs backprop")
    curves = _common.save_figure(fig, out, "local_learning_curves.png")

    fig, (ax_head, ax_time) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in runs:
        if r["method"] != "local":
            continue
        names = list(r["head_test_accuracy"])
        ax_head.plot(range(len(names)), [r["head_test_accuracy"][n] for n in names], "o",
                     ls=STYLES[r["policy"]], color=COLORS["local"], label=r["label"])  # fmt: skip
    for r in runs:
        if r["method"] == "backprop":
            ax_head.axhline(r["test_accuracy"], ls=STYLES[r["policy"]], lw=1,
                            color=COLORS["backprop"], label=r["label"])  # fmt: skip
    ax_head.set_xticks(range(cfg.stages), [f"head{i}" for i in range(cfg.stages)])
    ax_head.set(ylabel="test accuracy", title="test accuracy of each head")
    ax_head.grid(alpha=0.3)
    ax_head.legend(fontsize=8)
    pols = list(cfg.policies)
    x = np.arange(len(pols))
    for j, method in enumerate(("backprop", "local")):
        secs = [
            next(r["seconds"] for r in runs if r["method"] == method and r["policy"] == p)
            for p in pols
        ]
        ax_time.bar(x + (j - 0.5) * 0.38, secs, 0.38, label=method)
    ax_time.set_xticks(x, pols)
    ax_time.set(ylabel=f"wall time, {cfg.epochs} epochs (s)", title="training time")
    ax_time.legend(fontsize=8)
    heads = _common.save_figure(fig, out, "local_learning_heads_time.png")
    return [curves, heads]


def check(cfg: Config) -> str | None:
    """What is wrong with ``cfg`` that argparse cannot see (a usage error, before any
    training), or None."""
    return _common.num_samples_problem(cfg.num_samples)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    choices = {"policies": ("Sync", "PipeDream", "Async")}
    positive = ("width", "stages", "epochs", "batch_size", "async_keys", "num_samples", "lr")
    cfg = _common.parse_config(
        Config, argv, __doc__, choices=choices, check=check, positive=positive
    )
    data = ann.data.load_mnist1d(num_samples=cfg.num_samples)
    runs = [train_one(cfg, data, local, p) for p in cfg.policies for local in (False, True)]
    figures = plot(cfg, runs, cfg.out)
    table = markdown_table(cfg, runs)
    print(table)
    with open(os.path.join(cfg.out, "local_learning.md"), "w") as f:
        f.write(table)
    return _common.finish(cfg.out, cfg, {"runs": runs, "figures": figures, "table": table})


if __name__ == "__main__":
    main()
