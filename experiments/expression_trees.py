"""A tree-structured network over random arithmetic expression trees: evaluate each expression
modulo 10 (a 10-way classification), with trees of different shapes and depths in one key and
several keys in flight under Async; and whether Async reaches a target accuracy sooner than Sync.

Two tree networks, both genuine: the structure of each tree decides the computation.

- ``loop``: ONE loop actor (``g.loop``) walks each tree in post-order with a stack of child states
  in the loop state (``docs/dynamic.md``). The state of a row is ``[stack of `slots` vectors of
  width d | one-hot stack pointer]``; at a digit token the cell pushes a leaf embedding, at an
  operator token (+, -, *) it pops the two top vectors and pushes an MLP of them and the
  operator; ``lengths`` is the number of tokens (tree nodes). The head classifies the root.
- ``levels``: the tree unrolled by node height (after AMPNet's node-type actors). A ``leaves`` actor
  embeds every digit; then for each height L = 1 .. max_leaves - 1: ``childrenL`` gathers the two
  children of every node of height L (at most ``max_leaves // (L + 1)`` such nodes per tree),
  ``routeL`` (a router with a parameterless gate, ``gates="none"``) sends each tree to the actor
  of each operator it has at that height, ``levelL_add`` / ``levelL_sub`` / ``levelL_mul``
  combine (``tanh(W2 relu(W1 [left, right]))``), ``levelL_none`` passes trees without a node of
  that height, and ``mergeL`` gathers them by row. The head reads each tree's root (the node of
  its greatest height). Different operators of one key, and different heights of different keys,
  are different actors, so they can run at once. Weights are per (height, operator): untied.
  (``levels_align="root"`` numbers the levels from the root instead: every root at the last.)

Baselines: the majority class of the training labels, and an MLP on the flattened, padded one-hot
post-order token sequence (the same tokens, no structure), trained for as many epochs.

The test trees are drawn from the same distribution as the training trees, leaving out every tree
that occurs in the training set (:func:`draw_trees`' ``exclude``): a held-out set. The 300
single-operator trees (depth 1) all occur among the 8,000 training trees, so the test set has
no tree of depth 1; each run reports its accuracy by depth.

Every run trains up to ``epochs`` epochs with one ``Trainer.fit`` per epoch and evaluates the test
trees between them (the time of evaluating is left out of the clock); time to target is the
training wall time at the first epoch whose test accuracy reaches ``target``. ``workers`` N > 0
runs the tree networks on ``ann.cluster.LocalCluster(N)`` (actors placed round-robin with
``worker=``); each run reports its actor concurrency (the actors' busy time over wall time).
Before the timed runs, each model runs one untimed epoch on 100 trees in each placement (one
process, each cluster): the first run there pays for start-up (imports, threads, page faults).

Run ``python experiments/expression_trees.py --help``; ``--quick true`` is a seconds-long smoke
run (flags given with it win over its sizes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Collection
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402
from _tree_levels import (  # noqa: E402  (the levels network)
    OPS,
    VOCAB,
    build_levels,
    levels,
    levels_layout,
    placer,
    positions,
)

import asyncnn as ann  # noqa: E402
from asyncnn import data, nn, ops, optim, policies  # noqa: E402

MODELS = ("loop", "levels", "mlp")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0  # data, weights, shuffling; repeats differ only in the run's timing
    train_trees: int = 8000  # the 3 operator tables mod 10 need a few thousand trees
    test_trees: int = 1000  # accuracy resolution 0.1%
    min_leaves: int = 2  # the smallest tree: one operator over two digits
    max_leaves: int = 5  # up to 9 tokens and depth 4: shapes vary within a key
    width: int = 64  # a node's vector (and a stack slot's)
    hidden: int = 256  # the combiner MLP's hidden width: it must learn three 10x10 tables
    epochs: int = 30  # the loop network's test accuracy flattens by then
    batch_size: int = 50  # one key: 50 trees of mixed shapes
    lr: float = 3e-3  # Adam, the same for every model and policy
    beta1: float = 0.9  # Adam's first moment (list_reduction.py: 0.5 keeps Async steadier)
    clip_norm: float = 1.0  # per-actor gradient norm clip against spikes through deep trees
    models: tuple[str, ...] = ("loop", "levels", "mlp")  # tree networks and the token MLP
    policies: tuple[str, ...] = ("Sync", "Async")  # Async: one setting per max_active_keys
    max_active_keys: tuple[int, ...] = (4,)  # Async's keys (of differently shaped trees) in flight
    # AMPNet's min_update_interval: gradients of this many keys per update (Async's
    # min_update_frequency); a value above 1 also adds Sync on minibatches that many keys large
    # (the same trees per update), as its control
    update_every: tuple[int, ...] = (1,)
    stash: bool = False  # Async's default: a backward recomputes at the latest weights
    workers: tuple[int, ...] = (0,)  # 0: one process; N: the tree networks on LocalCluster(N)
    repeats: int = 1  # runs of each setting (interleaved); the table gives medians
    target: float = 0.95  # test accuracy of "solved" (the majority class scores 16.3%)
    stop_at_target: bool = False  # end a run at its first epoch at or over the target
    # the levels model's schedule: "root" (a node's level: levels - its distance from the root;
    # every root is at the last level) or "height" (its height; weights untied either way)
    levels_align: str = "height"
    mlp_width: int = 256  # the token-sequence MLP baseline: 2 hidden layers
    quick: bool = False  # smoke run: 2 epochs, 200 trees, width 16 (flags given win)
    out: str = "runs/expression_trees"  # results.json and PNGs


QUICK = {"train_trees": 200, "test_trees": 100, "width": 16, "hidden": 32, "mlp_width": 32,
         "epochs": 2}  # fmt: skip


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


def draw_trees(
    cfg: Config, n: int, rng: np.random.Generator, exclude: Collection[Any] = ()
) -> list[Any]:
    """``n`` random trees of ``min_leaves`` to ``max_leaves`` leaves, none of them in ``exclude``
    (the training trees, for a test set disjoint from them; the same trees for the same ``rng``
    state). Raises ValueError if ``100 n`` draws do not find ``n`` (nearly every possible tree
    is excluded)."""
    trees: list[Any] = []
    for _ in range(100 * n):
        t = random_tree(int(rng.integers(cfg.min_leaves, cfg.max_leaves + 1)), rng)
        if t not in exclude:
            trees.append(t)
            if len(trees) == n:
                return trees
    raise ValueError(
        f"only {len(trees)} of {n} test trees of {cfg.min_leaves}-{cfg.max_leaves} leaves found "
        f"outside the training set in {100 * n} draws: raise --max-leaves or lower "
        f"--train-trees or --test-trees"
    )


def make_trees(
    cfg: Config, n: int, rng: np.random.Generator, exclude: Collection[Any] = ()
) -> dict[str, np.ndarray]:
    """``n`` random trees (:func:`draw_trees`), encoded by :func:`encode`."""
    return encode(cfg, draw_trees(cfg, n, rng, exclude))


def encode(cfg: Config, trees: list[Any]) -> dict[str, np.ndarray]:
    """The inputs of every model for ``trees``: for the loop, one-hot post-order tokens padded to
    ``2 * max_leaves - 1`` (``xs``), their number (``len``) and the initial loop state (``h0``:
    empty stack, pointer at 0); for the levels model, the one-hot digits of the leaves
    (``digits``) and each node's place (``struct``, see :func:`levels_layout`); the label
    (``y``: value mod 10) and the depth."""
    n, steps = len(trees), 2 * cfg.max_leaves - 1
    tokens = np.full((n, steps), -1, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    y = np.zeros(n, dtype=np.int64)
    depths = np.zeros(n, dtype=np.int64)
    digits = np.zeros((n, cfg.max_leaves, 10), dtype=np.float32)
    struct = np.full((n, levels(cfg), max(positions(cfg)), 3), -1, dtype=np.int64)
    for i, t in enumerate(trees):
        seq = postorder(t)
        tokens[i, : len(seq)] = seq
        lengths[i] = len(seq)
        y[i] = evaluate_tree(t) % 10
        depths[i] = depth(t)
        leaves, nodes = levels_layout(cfg, t)
        digits[i, np.arange(len(leaves)), leaves] = 1.0
        for lv, here in nodes.items():
            struct[i, lv - 1, : len(here)] = here
    xs = np.zeros((n, steps, VOCAB), dtype=np.float32)
    rows, cols = np.nonzero(tokens >= 0)
    xs[rows, cols, tokens[rows, cols]] = 1.0
    h0 = np.zeros((n, state_size(cfg)), dtype=np.float32)
    h0[:, slots(cfg) * cfg.width] = 1.0  # the pointer's one-hot at slot 0
    return {"xs": xs, "len": lengths, "h0": h0, "y": y, "depth": depths, "digits": digits,
            "struct": struct}  # fmt: skip


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


def build_loop(cfg: Config, workers: int = 0) -> ann.Graph:
    """tree (a loop over each tree's post-order tokens) -> head on the root."""
    d, at = cfg.width, placer(workers)
    g = ann.Graph()
    xs = g.input("xs", shape=(None, 2 * cfg.max_leaves - 1, VOCAB))
    lengths = g.input("len", shape=(None,), dtype="int64")
    h0 = g.input("h0", shape=(None, state_size(cfg)))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.loop("tree", TreeCell(d, slots(cfg), cfg.hidden), h0, xs, lengths, worker=at(0))
    head = nn.Sequential(Root(d), nn.Linear(d, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))
    out = g.layer("head", head, h, worker=at(1))
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


INPUTS = {"loop": ("xs", "len", "h0", "y"), "levels": ("digits", "struct", "y"), "mlp": ("x", "y")}


def where(workers: int) -> str:
    return "1 process" if workers == 0 else f"LocalCluster({workers})"


def run_one(cfg: Config, model: str, setting: tuple[str, Any, int], workers: int, cluster: Any,
            repeat: int, train: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Trains one model under one setting (``(label, policy, key size)``, one of
    :func:`settings`) for up to ``epochs``, one ``fit`` per epoch, evaluating on the test trees
    after each."""
    label, policy, batch_size = setting
    if model == "mlp":
        graph = build_mlp(cfg)
        train = {"x" if k == "xs" else k: v for k, v in train.items()}
        test = {"x" if k == "xs" else k: v for k, v in test.items()}
    else:
        graph = (build_loop if model == "loop" else build_levels)(cfg, workers)
    keys = INPUTS[model]
    ds = data.ArrayDataset({k: train[k] for k in keys})
    tst = {k: test[k] for k in keys}
    adam = optim.Adam(lr=cfg.lr, betas=(cfg.beta1, 0.999), clip_norm=cfg.clip_norm or None)
    tr = ann.Trainer(graph, optimizer=adam, policy=policy, seed=cfg.seed, cluster=cluster)
    curve: list[dict[str, Any]] = []
    seconds, busy = 0.0, dict.fromkeys(graph.layers, 0.0)
    for epoch in range(cfg.epochs):
        hist = tr.fit(ds, epochs=1, batch_size=batch_size, shuffle=True)
        seconds += hist.seconds
        for n in graph.layers:
            busy[n] += hist.statistics[n].busy_seconds
        curve.append({"epoch": epoch + 1, "seconds": seconds,
                      "test_accuracy": tr.evaluate(tst)["accuracy"]})  # fmt: skip
        if cfg.stop_at_target and curve[-1]["test_accuracy"] >= cfg.target:
            break
    pred = tr.predict({k: v for k, v in tst.items() if k != "y"})["logits"].argmax(axis=1)
    right = pred == tst["y"]
    by_depth = {
        int(dp): float(right[test["depth"] == dp].mean()) for dp in np.unique(test["depth"])
    }
    first, summary = _common.target_summary(curve, cfg.target)
    res = {
        "model": model, "policy": label, "workers": workers, "repeat": repeat, "curve": curve,
        "test_accuracy": curve[-1]["test_accuracy"], **summary,
        "train_accuracy": tr.evaluate({k: v for k, v in train.items() if k in keys})["accuracy"],
        "accuracy_by_depth": by_depth,
        "samples_per_second": len(ds) * len(curve) / seconds, "seconds": seconds,
        "busy_seconds": busy,
        # the actors' busy time over wall time: above 1 only where actors computed at once
        "actor_concurrency": sum(busy.values()) / seconds,
    }  # fmt: skip
    if model == "loop":
        st = hist.statistics["tree"]
        assert isinstance(st, ann.dynamic.LoopStatistics)  # a loop's: its own counters
        res["row_steps_last_epoch"] = st.row_steps
        res["batched_steps_last_epoch"] = st.steps
    ttt = f"{first['seconds']:5.1f} s (epoch {first['epoch']})" if first else "not reached"
    print(f"{model:>6} {label:>26} {where(workers):>15} #{repeat}: test "
          f"{res['test_accuracy']:.3f} (train {res['train_accuracy']:.3f}), {cfg.target:.0%} "
          f"at {ttt}, {res['samples_per_second']:6.0f} trees/s, {seconds:.1f} s, concurrency "
          f"{res['actor_concurrency']:.2f}, load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    return res


def settings(cfg: Config) -> list[tuple[str, policies.Policy, int]]:
    """``(label, policy, key size)`` of each setting: ``Sync`` (and ``Sync, batch N`` for each
    update interval above 1), and ``Async K=k`` (``Async K=k, update every m``) for each of
    ``max_active_keys`` and of ``update_every``, as ``policies`` asks."""
    return _common.interval_settings(
        cfg.policies, cfg.batch_size, cfg.max_active_keys, cfg.update_every, cfg.stash
    )


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per (model, policy, placement): the median over repeats of the time to target (None if
    a repeat missed it), throughput and actor concurrency, and each repeat's figures."""
    table: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(f"{r['model']} {r['policy']}, {where(r['workers'])}" for r in runs):
        mine = [r for r in runs if f"{r['model']} {r['policy']}, {where(r['workers'])}" == name]
        times = [r["seconds_to_target"] for r in mine]
        table[name] = {
            "seconds_to_target": float(np.median(times)) if None not in times else None,
            "seconds_to_target_each": times,
            "epochs_to_target_each": [r["epochs_to_target"] for r in mine],
            "final_test_accuracy_each": [r["final_test_accuracy"] for r in mine],
            "samples_per_second": float(np.median([r["samples_per_second"] for r in mine])),
            "actor_concurrency": float(np.median([r["actor_concurrency"] for r in mine])),
            "actor_concurrency_each": [r["actor_concurrency"] for r in mine],
        }
    return table


def plot(cfg: Config, runs: list[dict[str, Any]], majority: float) -> list[str]:
    """Test accuracy against training wall time for every run, and accuracy by tree depth at the
    end (the first repeat)."""
    plt = _common.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(dict.fromkeys(f"{r['model']} {r['policy']}, {where(r['workers'])}"
                               for r in runs))  # fmt: skip
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    first = [r for r in runs if r["repeat"] == 0]
    for r in runs:
        name = f"{r['model']} {r['policy']}, {where(r['workers'])}"
        ax.plot([p["seconds"] for p in r["curve"]], [p["test_accuracy"] for p in r["curve"]],
                "-o", ms=2, lw=1, color=colors[name],
                label=name if r["repeat"] == 0 else None)  # fmt: skip
    for i, r in enumerate(first):
        name = f"{r['model']} {r['policy']}, {where(r['workers'])}"
        dep = sorted(r["accuracy_by_depth"], key=int)
        off = (i - (len(first) - 1) / 2) * 0.8 / len(first)
        bx.bar([int(k) + off for k in dep], [r["accuracy_by_depth"][k] for k in dep],
               0.8 / len(first), color=colors[name], label=name)  # fmt: skip
    for a in (ax, bx):
        a.axhline(majority, color="k", lw=0.8, ls=":", label="majority class")
        a.set_ylim(0, 1)
    ax.axhline(cfg.target, color="r", lw=0.6, ls=":")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("test accuracy (value mod 10)")
    ax.legend(fontsize=6)
    bx.set_xlabel("tree depth")
    bx.set_ylabel("test accuracy at the end")
    bx.set_ylim(0, 1.4)
    bx.set_xticks(sorted({int(k) for r in runs for k in r["accuracy_by_depth"]}))
    bx.legend(fontsize=6, loc="upper center", ncol=3)
    fig.suptitle(f"expression trees of {cfg.min_leaves}-{cfg.max_leaves} leaves "
                 f"({_common.cpu_label()})")  # fmt: skip
    return [_common.save_figure(fig, cfg.out, "expression_trees.png")]


POSITIVE = ("train_trees", "test_trees", "min_leaves", "max_leaves", "width", "hidden", "epochs",
            "batch_size", "max_active_keys", "update_every", "repeats", "mlp_width", "lr")  # fmt: skip


def check(c: Config) -> str | None:
    """What is wrong with ``c`` that argparse cannot see, or None."""
    if not 2 <= c.min_leaves <= c.max_leaves:
        # a lone digit has no operator: the levels network would have no root to classify
        return (
            f"need 2 <= --min-leaves <= --max-leaves (a tree has an operator), got "
            f"{c.min_leaves} and {c.max_leaves}"
        )
    return _common.fraction_problem("--beta1", c.beta1) or _common.fraction_problem(
        "--target", c.target, one=True
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    choices = {"models": MODELS, "policies": ("Sync", "Async"), "levels_align": ("root", "height")}
    cfg = _common.parse_config(
        Config, argv, __doc__, choices=choices, check=check, positive=POSITIVE,
        presets={"quick": QUICK},
    )  # fmt: skip
    rng = np.random.default_rng(cfg.seed)
    train_trees = draw_trees(cfg, cfg.train_trees, rng)
    try:  # held out: no test tree is a training tree
        test = make_trees(cfg, cfg.test_trees, rng, exclude=set(train_trees))
    except ValueError as exc:
        print(f"expression_trees.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    train = encode(cfg, train_trees)
    counts = np.bincount(train["y"], minlength=10)
    majority = float((test["y"] == counts.argmax()).mean())
    before = _common.machine()
    runs = []
    with contextlib.ExitStack() as stack:
        clusters = {w: stack.enter_context(ann.cluster.LocalCluster(workers=w)) if w else None
                    for w in cfg.workers}  # fmt: skip
        # Untimed warm-up of each model in each placement: the first run there pays for imports
        # (the workers' too), threads and page faults, and it would always be Sync's repeat 0.
        warm = dataclasses.replace(cfg, epochs=1, stop_at_target=False)
        few = {k: v[:100] for k, v in train.items()}
        for w in cfg.workers:
            for model in cfg.models:
                if not (model == "mlp" and w):
                    run_one(warm, model, ("warm-up", policies.Async(max_active_keys=2),
                                          cfg.batch_size), w, clusters[w], 0, few, few)  # fmt: skip
        for repeat in range(cfg.repeats):  # interleaved, so load changes hit every setting alike
            for w in cfg.workers:
                for model in cfg.models:
                    if model == "mlp" and w:
                        continue  # the baseline runs in one process only
                    for setting in settings(cfg):
                        runs.append(run_one(cfg, model, setting, w, clusters[w], repeat, train,
                                            test))  # fmt: skip
    results: dict[str, Any] = {
        "machine_at_start": before, "majority_class_test_accuracy": majority,
        "label_counts_train": counts.tolist(),
        "test_trees_by_depth": {int(d): int((test["depth"] == d).sum())
                                for d in np.unique(test["depth"])},
        "table": summarise(runs), "runs": runs,
    }  # fmt: skip
    results["figures"] = plot(cfg, runs, majority)
    return _common.finish(cfg.out, cfg, results)


if __name__ == "__main__":
    # Worker processes import the modules of the graph by name, and cannot import __main__:
    # run the importable copy of this file.
    import expression_trees

    expression_trees.main()
