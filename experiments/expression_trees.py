"""A tree-structured network over random arithmetic expression trees: evaluate each expression
modulo 10 (a 10-way classification), with trees of different shapes and depths in one key and
several keys in flight under Async.

The runtime has no tree cell: a tree network is a loop (``g.loop``) over each tree's post-order
walk, with a stack of child states in the loop state (``docs/dynamic.md``). The state of a row is
``[stack of `slots` vectors of width d | one-hot stack pointer]``; at a digit token the cell pushes
a leaf embedding, at an operator token (+, -, *) it pops the two top vectors and pushes an MLP of
them and the operator; ``lengths`` is the number of tokens (tree nodes), so a row of 2 leaves
takes 3 steps and one of 6 leaves 11, in the same key. The head classifies the root (slot 0).

Baselines: the majority class of the training labels, and an MLP on the flattened, padded one-hot
post-order token sequence (the same tokens, no structure), trained for as many epochs.

Run ``python experiments/expression_trees.py --help``; ``--quick true`` is a seconds-long smoke
run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import data, nn, ops, optim  # noqa: E402

OPS = ("+", "-", "*")
VOCAB = 10 + len(OPS)  # digits 0-9, then the operators


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0  # data, weights, shuffling
    train_trees: int = 8000  # the 3 operator tables mod 10 need a few thousand trees
    test_trees: int = 1000  # accuracy resolution 0.1%
    min_leaves: int = 2  # the smallest tree: one operator over two digits
    max_leaves: int = 5  # up to 9 tokens and depth 4: shapes vary within a key
    width: int = 64  # state vector per stack slot
    hidden: int = 256  # the combiner MLP's hidden width: it must learn three 10x10 tables
    epochs: int = 30  # the tree network's test accuracy flattens by then
    batch_size: int = 50  # one key: 50 trees of mixed shapes
    lr: float = 3e-3  # Adam, the same for every model and policy
    clip_norm: float = 1.0  # per-actor gradient norm clip against spikes through deep trees
    async_max_active_keys: int = 4  # several keys (of differently shaped trees) in flight
    policies: tuple[str, ...] = ("Sync", "Async")  # the baseline order and the Async
    mlp_width: int = 256  # the token-sequence MLP baseline: 2 hidden layers
    quick: bool = False  # smoke run: 2 epochs, 200 trees, width 16
    out: str = "runs/expression_trees"  # results.json and PNGs


def random_tree(leaves: int, rng: np.random.Generator) -> Any:
    """A random binary tree with ``leaves`` digit leaves: an int, or ``(op, left, right)``."""
    if leaves == 1:
        return int(rng.integers(0, 10))
    left = int(rng.integers(1, leaves))
    return (int(rng.integers(0, len(OPS))), random_tree(left, rng), random_tree(leaves - left, rng))


def evaluate_tree(t: Any) -> int:
    if isinstance(t, int):
        return t
    op, a, b = t[0], evaluate_tree(t[1]), evaluate_tree(t[2])
    return a + b if op == 0 else a - b if op == 1 else a * b


def postorder(t: Any) -> list[int]:
    """Token ids: a digit d is d, operator i is 10 + i; children before their parent."""
    if isinstance(t, int):
        return [t]
    return postorder(t[1]) + postorder(t[2]) + [10 + t[0]]


def depth(t: Any) -> int:
    return 0 if isinstance(t, int) else 1 + max(depth(t[1]), depth(t[2]))


def make_trees(cfg: Config, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` trees: one-hot post-order tokens padded to ``2 * max_leaves - 1``, their lengths, the
    initial loop state (empty stack, pointer at 0), the label (value mod 10) and the depth."""
    steps = 2 * cfg.max_leaves - 1
    tokens = np.full((n, steps), -1, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    y = np.zeros(n, dtype=np.int64)
    depths = np.zeros(n, dtype=np.int64)
    for i in range(n):
        t = random_tree(int(rng.integers(cfg.min_leaves, cfg.max_leaves + 1)), rng)
        seq = postorder(t)
        tokens[i, : len(seq)] = seq
        lengths[i] = len(seq)
        y[i] = evaluate_tree(t) % 10
        depths[i] = depth(t)
    xs = np.zeros((n, steps, VOCAB), dtype=np.float32)
    rows, cols = np.nonzero(tokens >= 0)
    xs[rows, cols, tokens[rows, cols]] = 1.0
    h0 = np.zeros((n, state_size(cfg)), dtype=np.float32)
    h0[:, slots(cfg) * cfg.width] = 1.0  # the pointer's one-hot at slot 0
    return {"xs": xs, "len": lengths, "h0": h0, "y": y, "depth": depths}


def slots(cfg: Config) -> int:
    """Stack depth needed by a post-order walk of at most ``max_leaves`` leaves."""
    return cfg.max_leaves


def state_size(cfg: Config) -> int:
    return slots(cfg) * cfg.width + slots(cfg) + 1


@dataclasses.dataclass(frozen=True)
class TreeCell(nn.Module):
    """One post-order step: a digit pushes ``tanh(leaf(x))``; an operator pops ``l, r`` and pushes
    ``tanh(W2 relu(W1 [l, r, x]))``. The pointer moves by the token (not by any parameter)."""

    width: int
    slots: int
    hidden: int

    def init_params(self, init: nn.Initializer) -> Any:
        d, h = self.width, self.hidden
        b_in, b_hid, b_leaf = (1 / math.sqrt(2 * d + VOCAB), 1 / math.sqrt(h), 1 / math.sqrt(VOCAB))
        return {
            "leaf": init.uniform((VOCAB, d), b_leaf),
            "w1": init.uniform((2 * d + VOCAB, h), b_in),
            "b1": init.uniform((h,), b_in),
            "w2": init.uniform((h, d), b_hid),
            "b2": init.uniform((d,), b_hid),
        }

    def __call__(self, params: Any, h: Any, x: Any, *, rng: Any = None) -> Any:
        n, s, d = int(h.shape[0]), self.slots, self.width
        raw_x = np.asarray(ops.raw(x))
        sp = np.asarray(ops.raw(h))[:, s * d :].argmax(axis=1)  # stack pointer (next free slot)
        is_leaf = raw_x[:, :10].sum(axis=1) > 0
        # Masks from the token and the pointer only: no gradient flows through the structure.
        lft = np.zeros((n, s, 1), np.float32)
        rgt = np.zeros((n, s, 1), np.float32)
        op_rows = np.nonzero(~is_leaf)[0]
        lft[op_rows, sp[op_rows] - 2, 0] = 1.0
        rgt[op_rows, sp[op_rows] - 1, 0] = 1.0
        at = np.where(is_leaf, sp, sp - 2)
        write = np.zeros((n, s, 1), np.float32)
        write[np.arange(n), at, 0] = 1.0
        keep = 1.0 - write - rgt  # an operator also clears its right child's slot
        new_sp = np.where(is_leaf, sp + 1, sp - 1)
        ptr = np.zeros((n, s + 1), np.float32)
        ptr[np.arange(n), new_sp] = 1.0

        stack = ops.reshape(ops.getitem(h, (slice(None), slice(0, s * d))), (n, s, d))
        left = ops.sum(ops.multiply(stack, lft.astype(raw_x.dtype)), axis=1)
        right = ops.sum(ops.multiply(stack, rgt.astype(raw_x.dtype)), axis=1)
        leaf = ops.tanh(ops.matmul(x, params["leaf"]))
        hid = ops.relu(
            ops.add(ops.matmul(ops.concatenate([left, right, x], axis=1), params["w1"]),
                    params["b1"])
        )  # fmt: skip
        comb = ops.tanh(ops.add(ops.matmul(hid, params["w2"]), params["b2"]))
        value = ops.where(is_leaf[:, None], leaf, comb)
        new_stack = ops.add(
            ops.multiply(stack, keep.astype(raw_x.dtype)),
            ops.multiply(ops.expand_dims(value, 1), write.astype(raw_x.dtype)),
        )
        return ops.concatenate(
            [ops.reshape(new_stack, (n, s * d)), ptr.astype(raw_x.dtype)], axis=1
        )


@dataclasses.dataclass(frozen=True)
class Root(nn.Module):
    """The root's vector: slot 0 of the stack (the walk's last push)."""

    width: int

    def __call__(self, params: Any, h: Any, *, rng: Any = None) -> Any:
        return ops.getitem(h, (slice(None), slice(0, self.width)))


def build_tree(cfg: Config) -> ann.Graph:
    """tree (a loop over each tree's post-order tokens) -> head on the root."""
    d = cfg.width
    g = ann.Graph()
    xs = g.input("xs", shape=(None, 2 * cfg.max_leaves - 1, VOCAB))
    lengths = g.input("len", shape=(None,), dtype="int64")
    h0 = g.input("h0", shape=(None, state_size(cfg)))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.loop("tree", TreeCell(d, slots(cfg), cfg.hidden), h0, xs, lengths)
    head = nn.Sequential(Root(d), nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))
    out = g.layer("head", head, h)
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    g.output("logits", out)
    return g


def build_mlp(cfg: Config) -> ann.Graph:
    """The structure-blind baseline: an MLP on the flattened padded one-hot tokens."""
    w, t = cfg.mlp_width, 2 * cfg.max_leaves - 1
    layers = [
        nn.Flatten(), nn.Linear(t * VOCAB, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
        nn.Linear(w, 10),
    ]  # fmt: skip
    return ann.Graph.sequential(
        layers, loss=nn.CrossEntropyLoss(), stages=2, input_shape=(None, t, VOCAB)
    )


def run_one(cfg: Config, model: str, pol: str, train: dict[str, Any], test: dict[str, Any]
            ) -> dict[str, Any]:  # fmt: skip
    """Trains one model under one policy, evaluating on the test trees after every epoch."""
    if model == "tree":
        graph = build_tree(cfg)
        keys = ("xs", "len", "h0", "y")
    else:
        graph = build_mlp(cfg)
        train = {"x" if k == "xs" else k: v for k, v in train.items()}
        test = {"x" if k == "xs" else k: v for k, v in test.items()}
        keys = ("x", "y")
    ds = data.ArrayDataset({k: train[k] for k in keys})
    tst = {k: test[k] for k in keys}
    adam = optim.Adam(lr=cfg.lr, clip_norm=cfg.clip_norm or None)
    tr = ann.Trainer(
        graph,
        optimizer=adam,
        policy=_common.sync_or_async(pol, cfg.async_max_active_keys),
        seed=cfg.seed,
    )
    curve, seconds = [], 0.0
    for epoch in range(cfg.epochs):
        hist = tr.fit(ds, epochs=1, batch_size=cfg.batch_size, shuffle=True)
        seconds += hist.seconds
        curve.append({"epoch": epoch + 1, "seconds": seconds,
                      "test_accuracy": tr.evaluate(tst)["accuracy"]})  # fmt: skip
    pred = tr.predict({k: v for k, v in tst.items() if k != "y"})["logits"].argmax(axis=1)
    right = pred == tst["y"]
    by_depth = {
        int(dp): float(right[test["depth"] == dp].mean()) for dp in np.unique(test["depth"])
    }
    res = {
        "model": model, "policy": pol, "curve": curve,
        "test_accuracy": curve[-1]["test_accuracy"],
        "train_accuracy": tr.evaluate({k: v for k, v in train.items() if k in keys})["accuracy"],
        "accuracy_by_depth": by_depth,
        "samples_per_second": len(ds) * cfg.epochs / seconds, "seconds": seconds,
    }  # fmt: skip
    if model == "tree":
        st = hist.statistics["tree"]
        res["row_steps_last_epoch"] = st.row_steps
        res["batched_steps_last_epoch"] = st.steps
    print(f"{model:>5} {pol:>5}: test {res['test_accuracy']:.3f} (train "
          f"{res['train_accuracy']:.3f}), {res['samples_per_second']:6.0f} trees/s, "
          f"{seconds:.1f} s", flush=True)  # fmt: skip
    return res


def plot(cfg: Config, runs: list[dict[str, Any]], majority: float) -> list[str]:
    """Test accuracy against epochs for every run, and accuracy by tree depth."""
    plt = _common.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    styles = {"Sync": "-", "Async": "--"}
    for i, r in enumerate(runs):
        c = plt.get_cmap("tab10")(0 if r["model"] == "tree" else 1)
        label = f"{'tree net' if r['model'] == 'tree' else 'token MLP'} {r['policy']}"
        ax.plot([p["epoch"] for p in r["curve"]], [p["test_accuracy"] for p in r["curve"]],
                styles.get(r["policy"], ":"), color=c, label=label)  # fmt: skip
        dep = sorted(r["accuracy_by_depth"], key=int)
        off = (i - (len(runs) - 1) / 2) * 0.8 / len(runs)
        bx.bar([int(k) + off for k in dep], [r["accuracy_by_depth"][k] for k in dep],
               0.8 / len(runs), color=c, alpha=1.0 if r["policy"] == "Sync" else 0.5,
               label=label)  # fmt: skip
    for a in (ax, bx):
        a.axhline(majority, color="k", lw=0.8, ls=":", label="majority class")
        a.set_ylim(0, 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (value mod 10)")
    ax.legend(fontsize=8)
    bx.set_xlabel("tree depth")
    bx.set_ylabel("test accuracy at the end")
    bx.set_ylim(0, 1.3)
    bx.set_xticks(sorted({int(k) for r in runs for k in r["accuracy_by_depth"]}))
    bx.legend(fontsize=7, loc="upper center", ncol=3)
    fig.suptitle(f"expression trees of {cfg.min_leaves}-{cfg.max_leaves} leaves (2-core CPU)")
    return [_common.save_figure(fig, cfg.out, "expression_trees.png")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = _common.parse_config(Config, argv, __doc__)
    if cfg.quick:
        cfg = dataclasses.replace(cfg, train_trees=200, test_trees=100, width=16, hidden=32,
                                  mlp_width=32, epochs=2)  # fmt: skip
    rng = np.random.default_rng(cfg.seed)
    train = make_trees(cfg, cfg.train_trees, rng)
    test = make_trees(cfg, cfg.test_trees, rng)
    counts = np.bincount(train["y"], minlength=10)
    majority = float((test["y"] == counts.argmax()).mean())
    before = _common.machine()
    runs = []
    for model in ("tree", "mlp"):
        for pol in cfg.policies:
            runs.append(run_one(cfg, model, pol, train, test))
    results: dict[str, Any] = {
        "machine_at_start": before, "majority_class_test_accuracy": majority,
        "label_counts_train": counts.tolist(),
        "test_trees_by_depth": {int(d): int((test["depth"] == d).sum())
                                for d in np.unique(test["depth"])},
        "runs": runs,
    }  # fmt: skip
    results["figures"] = plot(cfg, runs, majority)
    return _common.finish(cfg.out, cfg, results)


if __name__ == "__main__":
    main()
