"""AMPNet's list-reduction task (Gaunt et al. 2017): a recurrent cell reads variable-length lists of
digits and reduces them (here: the sum modulo 10), under Sync and Async; time to a target accuracy.

The graph has three actors doing real work, so that keys in flight can overlap across them:
``embed`` (a per-digit MLP over the whole padded list), ``cell`` (a loop, ``g.loop``, running
each list for its own length with a multiplicative recurrent cell) and ``head`` (an MLP on the
final state). Lists of every length share a key. Every ``eval_every`` keys' worth of lists the
current weights are evaluated on the test lists *without draining the run* (as in
``ampnet_sweep.py``); the evaluation's time is left out of the clock. Time to target is the
training wall time at the first snapshot whose test accuracy reaches ``target``.

The test lists are drawn from the same distribution as the training lists, leaving out every
list that occurs in the training set (:func:`make_lists`' ``exclude``): a held-out set. All 10
lists of length 1 and all 100 of length 2 occur among the 6,000 training lists, so the test set
has none of those lengths and fewer of length 3; each run reports its final accuracy by length.

The settings: ``Async`` for each number of keys in flight (``max_active_keys``) and each update
interval (``update_every``: AMPNet's ``min_update_interval``, gradients of that many keys per
update), and ``Sync`` on minibatches of one key and of each interval's worth of keys (the same
lists per update). Each setting runs ``repeats`` times (interleaved), for the spread.

Run ``python experiments/list_reduction.py --help``; ``--quick true`` is a seconds-long smoke run
(flags given with it win over its sizes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Collection
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import data, nn, ops, optim, policies  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0  # data, weights and shuffling; repeats differ only in the run's timing
    repeats: int = 3  # Async depends on timing and the machine is shared: three runs each
    train_lists: int = 6000  # enough lists that the cell generalises instead of memorising
    test_lists: int = 1000  # 1,000 test lists: accuracy resolution 0.1%
    min_len: int = 1  # AMPNet's lists vary in length; one key holds every length
    max_len: int = 10  # padded length T; a row runs only its own steps
    width: int = 256  # state and embedding width: work per step large enough to leave the GIL
    batch_size: int = 100  # one key is one minibatch of lists
    lr: float = 2e-3  # Adam; the same for every policy (not retuned)
    clip_norm: float = 1.0  # per-actor gradient norm clip: the multiplicative cell spikes
    # Staleness acts as extra momentum (Mitliagkas et al. 2016): 0.5 instead of Adam's 0.9 keeps
    # Async stable, and Sync also solves the task sooner with it (docs page: the 0.9 runs).
    beta1: float = 0.5
    max_epochs: int = 10  # Sync reaches the target in 3-4 epochs; room for staleness
    eval_every: int = 10  # evaluate a snapshot every 10 keys (1,000 lists): time resolution
    target: float = 0.90  # test accuracy of "solved" (chance is 10%)
    max_active_keys: tuple[int, ...] = (2, 4)  # AMPNet's knob: keys (minibatches) in flight
    # AMPNet's other knob, its "min_update_interval": gradients of this many keys per update
    # (Async's min_update_frequency); each value also adds Sync on minibatches this many times
    # larger, the same lists per update, as the fair control for it
    update_every: tuple[int, ...] = (1, 2)
    stash: bool = True  # a backward uses its forward's weights: no recomputation of the unroll
    # smoke run: 2 epochs, 300 lists, width 32, one repeat, eval every 3 (flags given win)
    quick: bool = False
    out: str = "runs/list_reduction"  # results.json and PNGs


@dataclasses.dataclass(frozen=True)
class MulCell(nn.Module):
    """A multiplicative recurrent cell (Sutskever et al. 2011):
    ``h <- tanh((h @ w_h + b_h) * (x @ w_x) + x @ u + b)``: the input picks the transition,
    which is what a reduction over digits needs (one state map per digit)."""

    width: int

    def init_params(self, init: nn.Initializer) -> Any:
        d = self.width
        bound = 1.0 / math.sqrt(d)
        return {
            "w_h": init.uniform((d, d), bound),
            "b_h": init.uniform((d,), bound),
            "w_x": init.uniform((d, d), bound),
            "u": init.uniform((d, d), bound),
            "b": init.uniform((d,), bound),
        }

    def __call__(self, params: Any, h: Any, x: Any, *, rng: Any = None) -> Any:
        gate = ops.multiply(
            ops.add(ops.matmul(h, params["w_h"]), params["b_h"]), ops.matmul(x, params["w_x"])
        )
        return ops.tanh(ops.add(ops.add(gate, ops.matmul(x, params["u"])), params["b"]))


QUICK = {"repeats": 1, "train_lists": 300, "test_lists": 100, "width": 32, "max_epochs": 2,
         "eval_every": 3}  # fmt: skip


def list_keys(lengths: np.ndarray, digits: np.ndarray) -> list[bytes]:
    """One key per list (its length and its digits, the padding zeroed): equal keys, equal
    lists."""
    return [row.tobytes() for row in np.concatenate([lengths[:, None], digits], 1).astype(np.int8)]


def make_lists(
    cfg: Config, n: int, rng: np.random.Generator, exclude: Collection[bytes] = ()
) -> dict[str, np.ndarray]:
    """``n`` lists: one-hot digits padded to ``max_len``, their lengths, zero states, labels,
    and each list's key (``key``, :func:`list_keys`).

    ``exclude``: keys of lists not to draw (the training set's, for a test set disjoint from
    it): lists are drawn ``n`` at a time, those in ``exclude`` dropped, until ``n`` are found
    (the same lists for the same ``rng`` state). Raises ValueError if 100 rounds of ``n``
    draws do not find ``n`` (nearly every possible list is excluded)."""
    lengths, digits = np.zeros(0, np.int64), np.zeros((0, cfg.max_len), np.int64)
    for _ in range(100):
        more = rng.integers(cfg.min_len, cfg.max_len + 1, n)
        dig = rng.integers(0, 10, (n, cfg.max_len))
        dig[np.arange(cfg.max_len)[None, :] >= more[:, None]] = 0  # padding never read
        if exclude:
            keep = np.array([k not in exclude for k in list_keys(more, dig)], dtype=bool)
            more, dig = more[keep], dig[keep]
        lengths, digits = np.concatenate([lengths, more]), np.concatenate([digits, dig])
        if len(lengths) >= n:
            break
    else:
        raise ValueError(
            f"only {len(lengths)} of {n} test lists of lengths {cfg.min_len}-{cfg.max_len} "
            f"found outside the training set in 100 rounds of draws: raise --max-len or lower "
            f"--train-lists or --test-lists"
        )
    lengths, digits = lengths[:n], digits[:n]
    xs = np.eye(10, dtype=np.float32)[digits]
    xs[np.arange(cfg.max_len)[None, :] >= lengths[:, None]] = 0.0
    y = np.where(np.arange(cfg.max_len)[None, :] < lengths[:, None], digits, 0).sum(1) % 10
    h0 = np.zeros((n, cfg.width), dtype=np.float32)
    return {"xs": xs, "len": lengths.astype(np.int64), "h0": h0, "y": y.astype(np.int64),
            "key": np.array(list_keys(lengths, digits), dtype=object)}  # fmt: skip


def build(cfg: Config) -> ann.Graph:
    """embed (per digit) -> cell (loop over each list's length) -> head."""
    d, t = cfg.width, cfg.max_len
    g = ann.Graph()
    xs = g.input("xs", shape=(None, t, 10))
    lengths = g.input("len", shape=(None,), dtype="int64")
    h0 = g.input("h0", shape=(None, d))
    y = g.input("y", shape=(None,), dtype="int64")
    e = g.layer("embed", nn.Sequential(nn.Linear(10, d), nn.ReLU(), nn.Linear(d, d), nn.Tanh()), xs)
    h = g.loop("cell", MulCell(d), h0, e, lengths)
    out = g.layer("head", nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 10)), h)
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    g.output("logits", out)
    return g


def train_curve(
    cfg: Config,
    label: str,
    policy: policies.Policy,
    repeat: int,
    train: data.ArrayDataset,
    test: dict[str, np.ndarray],
    epochs: int,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Trains one setting for ``epochs``, evaluating a snapshot every ``eval_every`` keys of
    ``cfg.batch_size`` lists (as many lists whatever ``batch_size``, the key size here);
    returns the curve."""
    batch_size = batch_size or cfg.batch_size
    eval_lists = cfg.eval_every * cfg.batch_size
    graph = build(cfg)
    judge = ann.Trainer(graph, optimizer=optim.Adam(lr=cfg.lr), policy=policies.Sync())
    curve: list[dict[str, Any]] = []
    out: dict[str, Any] = {}

    async def main() -> None:
        adam = optim.Adam(lr=cfg.lr, betas=(cfg.beta1, 0.999), clip_norm=cfg.clip_norm or None)
        async with ann.open_run(graph, optimizer=adam, policy=policy, seed=cfg.seed) as run:
            start = time.perf_counter()
            eval_seconds = 0.0
            keys = lists = 0
            per_epoch = train.num_batches(batch_size)
            for epoch in range(epochs):
                for batch in train.batches(batch_size, True, cfg.seed, epoch):
                    await run.step(batch)
                    keys += 1
                    before, lists = lists, lists + len(batch["y"])
                    if lists // eval_lists == before // eval_lists and keys != epochs * per_epoch:
                        continue
                    # No drain: a snapshot of whatever each actor holds, keys still in flight.
                    t0 = time.perf_counter()
                    trained = t0 - start - eval_seconds
                    judge.params = {n: run.params[n] for n in graph.layers}
                    metrics = judge.evaluate(test)
                    eval_seconds += time.perf_counter() - t0
                    curve.append(
                        {
                            "keys": keys,
                            "epoch": keys / per_epoch,
                            "seconds": trained,
                            "test_accuracy": metrics["accuracy"],
                            "test_loss": metrics["loss"],
                        }
                    )
            await run.drain()
            wall = time.perf_counter() - start - eval_seconds
            stats = run.statistics()
            busy = {n: stats[n].busy_seconds for n in graph.layers}
            out["train_seconds"] = wall
            out["samples_per_second"] = run.samples / wall
            out["busy_seconds"] = busy
            # Sum of the actors' busy time over wall time: >1 only if actors overlapped.
            out["actor_concurrency"] = sum(busy.values()) / wall
            cell = stats["cell"]
            assert isinstance(cell, ann.dynamic.LoopStatistics)  # a loop's: its own counters
            out["row_steps"] = cell.row_steps
            judge.params = {n: run.params[n] for n in graph.layers}
            logits = judge.predict({k: test[k] for k in ("xs", "len", "h0")})["logits"]
            right = logits.argmax(axis=1) == test["y"]
            out["accuracy_by_length"] = {
                int(n): float(right[test["len"] == n].mean()) for n in np.unique(test["len"])
            }

    anyio.run(main, backend="trio")
    first, summary = _common.target_summary(curve, cfg.target)
    out.update(
        {"label": label, "policy": policy.to_spec(), "repeat": repeat, "curve": curve, **summary}
    )
    ttt = f"{first['seconds']:5.1f} s (epoch {first['epoch']:.1f})" if first else "not reached"
    print(
        f"{label:>26} repeat {repeat}: target {ttt}, final {out['final_test_accuracy']:.3f}, "
        f"{out['samples_per_second']:6.0f} lists/s, concurrency {out['actor_concurrency']:.2f}",
        flush=True,
    )
    return out


def settings(cfg: Config) -> list[tuple[str, policies.Policy, int]]:
    """(label, policy, key size) of every run: Sync on minibatches of ``batch_size`` times each
    ``update_every``, then Async for each number of keys in flight and each update interval."""
    return _common.interval_settings(
        ("Sync", "Async"), cfg.batch_size, cfg.max_active_keys, cfg.update_every, cfg.stash
    )


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median, min and max over repeats of each setting's time to target and throughput."""
    table: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        times = [r["seconds_to_target"] for r in mine]
        table[label] = {
            "seconds_to_target": float(np.median(times)) if None not in times else None,
            "seconds_to_target_each": times,
            "epochs_to_target_each": [r["epochs_to_target"] for r in mine],
            "final_test_accuracy_each": [r["final_test_accuracy"] for r in mine],
            "samples_per_second_each": [r["samples_per_second"] for r in mine],
            "samples_per_second": float(np.median([r["samples_per_second"] for r in mine])),
            "actor_concurrency": float(np.median([r["actor_concurrency"] for r in mine])),
        }
    return table


def plot(cfg: Config, runs: list[dict[str, Any]], table: dict[str, Any]) -> list[str]:
    """Accuracy against wall time (every repeat) and time to target per setting."""
    plt = _common.pyplot()
    labels = list(table)
    colors = {lab: plt.get_cmap("tab10")(i) for i, lab in enumerate(labels)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in runs:
        xs = [c["seconds"] for c in r["curve"]]
        ys = [c["test_accuracy"] for c in r["curve"]]
        ax.plot(xs, ys, "-o", ms=2, lw=1, color=colors[r["label"]],
                label=r["label"] if r["repeat"] == 0 else None)  # fmt: skip
    ax.axhline(cfg.target, color="r", lw=0.6, ls=":")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("test accuracy (sum mod 10)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("accuracy against wall time, every repeat", fontsize=9)
    for i, lab in enumerate(labels):
        each = [t for t in table[lab]["seconds_to_target_each"] if t is not None]
        bx.scatter([i] * len(each), each, color=colors[lab], s=18)
        if table[lab]["seconds_to_target"] is not None:
            bx.hlines(table[lab]["seconds_to_target"], i - 0.25, i + 0.25, color=colors[lab])
    bx.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    bx.set_ylim(bottom=0)
    bx.set_ylabel(f"seconds to {cfg.target:.0%} (dots: repeats)")
    bx.set_title("time to target", fontsize=9)
    fig.suptitle(
        f"list reduction, lengths {cfg.min_len}-{cfg.max_len}, width {cfg.width} ({_common.cpu_label()})"
    )
    return [_common.save_figure(fig, cfg.out, "list_reduction.png")]


POSITIVE = ("repeats", "train_lists", "test_lists", "min_len", "max_len", "width", "batch_size",
            "max_epochs", "eval_every", "max_active_keys", "update_every", "lr")  # fmt: skip


def check(c: Config) -> str | None:
    """What is wrong with ``c`` that argparse cannot see, or None."""
    if c.min_len > c.max_len:
        return f"need --min-len <= --max-len, got {c.min_len} and {c.max_len}"
    return _common.fraction_problem("--beta1", c.beta1) or _common.fraction_problem(
        "--target", c.target, one=True
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = _common.parse_config(
        Config, argv, __doc__, check=check, positive=POSITIVE, presets={"quick": QUICK}
    )
    rng = np.random.default_rng(cfg.seed)
    lists = make_lists(cfg, cfg.train_lists, rng)
    try:  # held out: no test list is a training list
        test = make_lists(cfg, cfg.test_lists, rng, exclude=set(lists.pop("key")))
    except ValueError as exc:
        print(f"list_reduction.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    del test["key"]
    train = data.ArrayDataset(lists)
    before = _common.machine()
    # Untimed warm-up: the first run of a process pays for imports, threads and page faults.
    warm_lists = make_lists(cfg, 200, np.random.default_rng(99))
    del warm_lists["key"]
    warm = data.ArrayDataset(warm_lists)
    train_curve(cfg, "warm-up", policies.Async(max_active_keys=2), 0, warm, test, 1)
    runs = []
    for repeat in range(cfg.repeats):  # interleaved, so load changes hit every setting alike
        for label, policy, size in settings(cfg):
            runs.append(train_curve(cfg, label, policy, repeat, train, test, cfg.max_epochs, size))
    table = summarise(runs)
    results = {
        "machine_at_start": before, "table": table, "runs": runs,
        "test_lists_by_length": {int(n): int((test["len"] == n).sum())
                                 for n in np.unique(test["len"])},
    }  # fmt: skip
    results["figures"] = plot(cfg, runs, table)
    return _common.finish(cfg.out, cfg, results)


if __name__ == "__main__":
    main()
