"""A sparse mixture-of-experts classifier on MNIST-1D (router + expert actors, top-1 and top-2)
against a dense MLP of equal compute per sample: test accuracy, expert load balance, samples/s.

Every model shares a trunk ``Linear(40, 256)-ReLU-Dropout`` and ends in a ``Linear(., 10)`` head.
In between, the MoE has a router (a learned ``Linear(256, experts)`` gate, softmax gate weights)
and ``experts`` expert actors ``Linear(256, w)-ReLU-Dropout`` whose outputs a merge gathers by
row. The gate is either a plain ``Linear(256, experts)`` ("MoE") or the same with its scores
standardised over the rows of the key ("MoE balanced": each expert's score has mean 0 and
variance 1 across the key's rows, so every expert wins about as many rows; evaluation also goes
by keys of 256 rows); the dense model has one ``Linear(256, k * w)-ReLU-Dropout``: each row of a top-k MoE goes
through k experts of width w, so the dense layer of width k * w does the same multiply-adds per
row (the MoE adds the 256 x experts gate; the dense head is k times wider, 10 x w per extra
expert). The MoE has ``experts / k`` times the middle layer's parameters. No auxiliary load
balancing loss is used: with the plain gate the load is what training makes of it (reported). Each model is
trained under ``Sync`` and under ``Async`` (every actor free-running), from the same seed.

Run ``python experiments/moe_mnist1d.py --help``; ``--quick true`` is a seconds-long smoke run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import data, nn, ops, optim  # noqa: E402

MODELS = ("dense", "moe", "moe_balanced")


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1)  # two seeds show the spread of accuracy and load
    experts: int = 4  # the 4-8 expert actors (4: each gets ~25 rows of a 100-row key)
    top_k: tuple[int, ...] = (1, 2)  # the top-1 and top-2
    expert_width: int = 256  # top-1's dense twin is then the 40-256-256-10 MLP of mnist1d_table
    trunk_width: int = 256  # the MLP's first layer, shared by every model
    dropout: float = 0.3  # the MNIST-1D MLP overfits 4,000 rows without it
    capacity_factor: float = 0.0  # 0: unlimited (no row dropped); e.g. 1.25 to cap each expert
    epochs: int = 40  # the MLP plateaus at ~70% after 30-40 epochs (ampnet_sweep.md)
    batch_size: int = 100  # the paper's; one Async key is one minibatch
    lr: float = 3e-3  # Adam, as in mnist1d_table.py, for every model and policy
    async_max_active_keys: int = 4  # a few minibatches in flight (ampnet_sweep's best K)
    policies: tuple[str, ...] = ("Sync", "Async")  # the baseline order, and the Async
    quick: bool = False  # smoke run: 1 epoch, 400 rows, one seed (flags given win)
    out: str = "runs/moe_mnist1d"  # results.json and PNGs


@dataclasses.dataclass(frozen=True)
class CenteredGate(nn.Module):
    """``Linear(d, experts)`` scores standardised per expert over the key's rows: a router that
    balances its load by construction (top-1 picks each expert for about rows / experts rows)."""

    d: int
    experts: int

    def init_params(self, init: nn.Initializer) -> Any:
        return nn.Linear(self.d, self.experts).init_params(init)

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        s = nn.Linear(self.d, self.experts)(params, x)
        c = ops.subtract(s, ops.mean(s, axis=0, keepdims=True))
        return ops.divide(c, ops.sqrt(ops.add(ops.mean(ops.square(c), axis=0, keepdims=True),
                                              1e-5)))  # fmt: skip


def build(cfg: Config, model: str, k: int) -> ann.Graph:
    """``model`` "moe" / "moe_balanced" (top-``k`` over ``experts``, plain or centred gate) or
    "dense" (width ``k * expert_width``)."""
    t, w, p = cfg.trunk_width, cfg.expert_width, cfg.dropout
    g = ann.Graph()
    x = g.input("x", shape=(None, 40))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("trunk", nn.Sequential(nn.Linear(40, t), nn.ReLU(), nn.Dropout(p)), x)
    if model != "dense":
        cap = cfg.capacity_factor if cfg.capacity_factor > 0 else None
        gate = nn.Linear(t, cfg.experts) if model == "moe" else CenteredGate(t, cfg.experts)
        r = g.router("gate", gate, h, experts=cfg.experts, k=k, capacity_factor=cap)
        branches = [
            g.layer(f"expert{e}", nn.Sequential(nn.Linear(t, w), nn.ReLU(), nn.Dropout(p)), r)
            for e in range(cfg.experts)
        ]
        mid = g.merge("combine", r, *branches)
        width = w
    else:
        width = k * w
        mid = g.layer("dense", nn.Sequential(nn.Linear(t, width), nn.ReLU(), nn.Dropout(p)), h)
    out = g.layer("head", nn.Linear(width, 10), mid)
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    g.output("logits", out)
    return g


def run_one(
    cfg: Config, model: str, k: int, policy: str, seed: int, train: Any, test: Any
) -> dict[str, Any]:
    """Trains one (model, k, policy, seed) cell; returns its accuracy, throughput and load."""
    graph = build(cfg, model, k)
    pol = _common.sync_or_async(policy, cfg.async_max_active_keys)
    tr = ann.Trainer(graph, optimizer=optim.Adam(lr=cfg.lr), policy=pol, seed=seed)
    hist = tr.fit(train, epochs=cfg.epochs, batch_size=cfg.batch_size, shuffle=True)
    metrics = tr.evaluate(test)
    res: dict[str, Any] = {
        "model": model, "k": k, "policy": policy, "seed": seed,
        "label": LABELS[model].format(k=k),
        "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"],
        "train_accuracy": tr.evaluate(train.arrays)["accuracy"],
        "samples_per_second": hist.samples_per_second, "seconds": hist.seconds,
        "params": sum(graph.nodes[n].module.num_params(p) for n, p in tr.params.items()),
    }  # fmt: skip
    if model != "dense":
        gate = hist.statistics["gate"]
        assert isinstance(gate, ann.dynamic.RouterStatistics)  # a router's: its own counters
        rows = np.array([gate.expert_rows.get(f"expert{e}", 0) for e in range(cfg.experts)])
        share = rows / max(rows.sum(), 1)
        res["expert_share"] = share.tolist()
        res["max_over_mean_load"] = float(share.max() * cfg.experts)
        res["dropped_rows"] = int(gate.dropped_total)
        # Load of the trained router on the test rows (what the experts would see next).
        res["test_expert_share"] = test_share(cfg, tr, graph, test, k, model)
    print(
        f"{res['label']:>10} {policy:>5} seed {seed}: test {res['test_accuracy']:.3f} "
        f"(train {res['train_accuracy']:.3f}), {res['samples_per_second']:7.0f} samples/s"
        + (f", load {np.round(res['expert_share'], 2).tolist()}" if model != "dense" else ""),
        flush=True,
    )
    return res


LABELS = {"dense": "dense k={k}", "moe": "MoE top-{k}", "moe_balanced": "MoE bal. top-{k}"}


def test_share(
    cfg: Config, tr: ann.Trainer, graph: ann.Graph, test: Any, k: int, model: str
) -> list[float]:
    """The fraction of the test rows' choices each expert gets from the trained gate (keys of
    256 rows, as ``evaluate`` makes them)."""
    params = tr.params
    trunk = graph.nodes["trunk"].module
    gate = graph.nodes["gate"].module.gate
    choices = []
    for i in range(0, len(test["x"]), 256):
        h = np.asarray(trunk(params["trunk"], test["x"][i : i + 256].astype(np.float32)))
        scores = np.asarray(ops.raw(gate(params["gate"], h)))
        choices.append(np.argsort(-scores, axis=1, kind="stable")[:, :k])
    choice = np.concatenate(choices)
    counts = np.bincount(choice.reshape(-1), minlength=cfg.experts)
    return (counts / counts.sum()).tolist()


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean over seeds of every (label, policy) cell."""
    table: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        for pol in dict.fromkeys(r["policy"] for r in runs):
            mine = [r for r in runs if r["label"] == label and r["policy"] == pol]
            if not mine:
                continue
            cell: dict[str, Any] = {
                "test_accuracy": float(np.mean([r["test_accuracy"] for r in mine])),
                "test_accuracy_each": [r["test_accuracy"] for r in mine],
                "samples_per_second": float(np.mean([r["samples_per_second"] for r in mine])),
                "samples_per_second_each": [r["samples_per_second"] for r in mine],
                "params": mine[0]["params"],
            }
            if "expert_share" in mine[0]:
                cell["max_over_mean_load_each"] = [r["max_over_mean_load"] for r in mine]
                cell["expert_share_each"] = [r["expert_share"] for r in mine]
            table[f"{label} / {pol}"] = cell
    return table


def plot(cfg: Config, runs: list[dict[str, Any]]) -> list[str]:
    """Accuracy and samples/s per model and policy; the experts' load per MoE run."""
    plt = _common.pyplot()
    labels = list(dict.fromkeys(r["label"] for r in runs))
    pols = list(dict.fromkeys(r["policy"] for r in runs))
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(14, 3.8))
    width = 0.8 / len(pols)
    for j, pol in enumerate(pols):
        for i, lab in enumerate(labels):
            mine = [r for r in runs if r["label"] == lab and r["policy"] == pol]
            acc = [r["test_accuracy"] for r in mine]
            sps = [r["samples_per_second"] for r in mine]
            xpos = i + (j - (len(pols) - 1) / 2) * width
            c = plt.get_cmap("tab10")(j)
            ax.bar(xpos, np.mean(acc), width, color=c, label=pol if i == 0 else None)
            ax.scatter([xpos] * len(acc), acc, color="k", s=8, zorder=3)
            bx.bar(xpos, np.mean(sps), width, color=c, label=pol if i == 0 else None)
            bx.scatter([xpos] * len(sps), sps, color="k", s=8, zorder=3)
    for a in (ax, bx):
        a.set_xticks(range(len(labels)), labels, fontsize=7, rotation=20)
        a.legend(fontsize=8)
    ax.set_ylim(0.4, 0.8)
    ax.set_ylabel("test accuracy (dots: seeds)")
    bx.set_ylabel("training samples/s (dots: seeds)")
    moes = [r for r in runs if r["model"] != "dense"]
    for i, r in enumerate(moes):
        bottom = 0.0
        for e, s in enumerate(r["expert_share"]):
            cx.bar(i, s, 0.7, bottom=bottom, color=plt.get_cmap("Set2")(e),
                   label=f"expert{e}" if i == 0 else None)  # fmt: skip
            bottom += s
    names = [f"{'bal' if r['model'] == 'moe_balanced' else 'plain'} top-{r['k']} "
             f"{r['policy']} s{r['seed']}" for r in moes]  # fmt: skip
    cx.set_xticks(range(len(moes)), names, fontsize=6, rotation=90)
    cx.set_ylabel("share of routed rows (training)")
    cx.set_ylim(0, 1.25)
    cx.legend(fontsize=7, loc="upper center", ncol=4)
    fig.suptitle(f"MNIST-1D, {cfg.experts} experts of width {cfg.expert_width} vs dense of equal "
                 f"compute ({_common.cpu_label()})")  # fmt: skip
    return [_common.save_figure(fig, cfg.out, "moe_mnist1d.png")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def check(c: Config) -> str | None:
        if max(c.top_k) > c.experts:
            return f"argument --top-k: each row goes to k of --experts {c.experts}, got {list(c.top_k)}"
        return _common.fraction_problem("--dropout", c.dropout)

    positive = ("experts", "top_k", "expert_width", "trunk_width", "epochs", "batch_size",
                "async_max_active_keys", "lr")  # fmt: skip
    cfg = _common.parse_config(
        Config, argv, __doc__, choices={"policies": ("Sync", "Async")}, check=check,
        positive=positive, presets={"quick": {"seeds": Config.seeds[:1], "epochs": 1}},
    )  # fmt: skip
    ds = data.load_mnist1d()
    rows = 400 if cfg.quick else len(ds["y_train"])
    train = data.ArrayDataset({"x": ds["x_train"][:rows], "y": ds["y_train"][:rows]})
    test = {"x": ds["x_test"], "y": ds["y_test"]}
    before = _common.machine()
    runs = []
    for seed in cfg.seeds:
        for k in cfg.top_k:
            for model in MODELS:
                for pol in cfg.policies:
                    runs.append(run_one(cfg, model, k, pol, seed, train, test))
    table = summarise(runs)
    results = {"machine_at_start": before, "train_rows": rows, "table": table, "runs": runs}
    results["figures"] = plot(cfg, runs)
    return _common.finish(cfg.out, cfg, results)


if __name__ == "__main__":
    main()
