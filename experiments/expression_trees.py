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

Every run trains up to ``epochs`` epochs with one ``Trainer.fit`` per epoch and evaluates the test
trees between them (the time of evaluating is left out of the clock); time to target is the
training wall time at the first epoch whose test accuracy reaches ``target``. ``workers`` N > 0
runs the tree networks on ``ann.cluster.LocalCluster(N)`` (actors placed round-robin with
``worker=``); each run reports its actor concurrency (the actors' busy time over wall time).

Run ``python experiments/expression_trees.py --help``; ``--quick true`` is a seconds-long smoke
run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import asyncnn as ann  # noqa: E402
from asyncnn import data, nn, ops, optim, policies  # noqa: E402

OPS = ("+", "-", "*")
OP_NAMES = ("add", "sub", "mul")  # the levels model's actor names: levelL_add, ...
VOCAB = 10 + len(OPS)  # digits 0-9, then the operators
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
    stash: bool = False  # Async's default: a backward recomputes at the latest weights
    workers: tuple[int, ...] = (0,)  # 0: one process; N: the tree networks on LocalCluster(N)
    repeats: int = 1  # runs of each setting (interleaved); the table gives medians
    target: float = 0.95  # test accuracy of "solved" (the majority class: 17%)
    stop_at_target: bool = False  # end a run at its first epoch at or over the target
    # the levels model's schedule: "root" (a node's level: levels - its distance from the root;
    # every root is at the last level) or "height" (its height; weights untied either way)
    levels_align: str = "height"
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
    """``n`` random trees of ``min_leaves`` to ``max_leaves`` leaves, encoded by :func:`encode`."""
    trees = [random_tree(int(rng.integers(cfg.min_leaves, cfg.max_leaves + 1)), rng)
             for _ in range(n)]  # fmt: skip
    return encode(cfg, trees)


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


def levels(cfg: Config) -> int:
    """The greatest depth of a tree of ``max_leaves`` leaves (a chain): the levels model's
    number of levels."""
    return cfg.max_leaves - 1


def node_levels(cfg: Config, t: Any) -> tuple[dict[tuple[int, ...], Any], list[tuple[int, ...]]]:
    """Every node of ``t`` by its path from the root (1: left, 2: right): a leaf's entry is
    ``("leaf", its index left to right, digit)``, an operator's ``(level, operator)``; and the
    operators' paths in post-order. ``align="height"``: an operator's level is its height (1 +
    its taller child's); ``"root"``: ``levels(cfg)`` minus its distance from the root, so every
    root is at the last level and an operator's operator children one level below it. Either way
    children come at lower levels than their parent."""
    info: dict[tuple[int, ...], Any] = {}
    order: list[tuple[int, ...]] = []
    count = [0]

    def walk(u: Any, path: tuple[int, ...]) -> int:  # the height
        if isinstance(u, int):
            info[path] = ("leaf", count[0], u)
            count[0] += 1
            return 0
        h = 1 + max(walk(u[1], (*path, 1)), walk(u[2], (*path, 2)))
        info[path] = (h if cfg.levels_align == "height" else levels(cfg) - len(path), u[0])
        order.append(path)
        return h

    walk(t, ())
    return info, order


@functools.lru_cache(maxsize=16)
def positions(cfg: Config) -> list[int]:
    """The most operator nodes at each level (1 .. levels) in one tree, over every tree shape
    of ``min_leaves`` to ``max_leaves`` leaves (enumerated: 22 shapes for 2-5 leaves)."""

    def shapes(n: int) -> list[Any]:
        if n == 1:
            return [0]
        return [(0, a, b) for i in range(1, n) for a in shapes(i) for b in shapes(n - i)]

    most = [0] * levels(cfg)
    for n in range(cfg.min_leaves, cfg.max_leaves + 1):
        for t in shapes(n):
            info, order = node_levels(cfg, t)
            for lv, c in collections.Counter(info[q][0] for q in order).items():
                most[lv - 1] = max(most[lv - 1], c)
    return [max(m, 1) for m in most]


def level_inputs(cfg: Config, lv: int) -> list[int]:
    """The levels whose vectors the nodes of level ``lv`` read, after the leaves (level 0): every
    lower level (``align="height"``), or the one below (``"root"``)."""
    if cfg.levels_align == "height":
        return list(range(lv))
    return [0] if lv == 1 else [0, lv - 1]


def levels_layout(cfg: Config, t: Any) -> tuple[list[int], dict[int, list[tuple[int, int, int]]]]:
    """A tree's leaves (digits, left to right) and, for each level, its nodes there in
    post-order, each as ``(operator, left child's slot, right child's slot)``. A slot numbers the
    vectors that level reads (:func:`level_inputs`), concatenated: the leaves first
    (``max_leaves`` slots), then ``positions(cfg)[L - 1]`` slots for each level L read."""
    info, order = node_levels(cfg, t)
    leaves = [v[2] for v in sorted(v for v in info.values() if v[0] == "leaf")]
    pos: dict[tuple[int, ...], int] = {}
    nodes: dict[int, list[tuple[int, int, int]]] = {}
    for q in order:
        pos[q] = len(nodes.setdefault(info[q][0], []))
        nodes[info[q][0]].append((info[q][1], -1, -1))

    def slot(q: tuple[int, ...], lv: int) -> int:
        if info[q][0] == "leaf":
            return int(info[q][1])
        offset = cfg.max_leaves
        for read in level_inputs(cfg, lv)[1:]:
            if read == info[q][0]:
                return offset + pos[q]
            offset += positions(cfg)[read - 1]
        raise AssertionError(f"level {lv} does not read level {info[q][0]}")

    for q in order:
        lv, op = info[q]
        nodes[lv][pos[q]] = (op, slot((*q, 1), lv), slot((*q, 2), lv))
    return leaves, nodes


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


@dataclasses.dataclass(frozen=True)
class LeafEmbed(nn.Module):
    """Every leaf's vector, ``tanh(digit @ leaf)``: ``(rows, leaves, 10) -> (rows, leaves * d)``
    (a missing leaf, all zeros, gives zeros; no node reads it)."""

    width: int
    leaves: int

    def init_params(self, init: nn.Initializer) -> Any:
        return {"leaf": init.uniform((10, self.width), 1 / math.sqrt(10))}

    def __call__(self, params: Any, digits: Any, *, rng: Any = None) -> Any:
        n = int(digits.shape[0])
        flat = ops.reshape(digits, (n * self.leaves, 10))
        return ops.reshape(
            ops.tanh(ops.matmul(flat, params["leaf"])), (n, self.leaves * self.width)
        )


@dataclasses.dataclass(frozen=True)
class Children(nn.Module):
    """The inputs of the nodes of height ``level``: reads the vectors of every lower slot (the
    leaves, then the merge of each lower level) and ``struct``, and gives, per position ``p``,
    ``[left_p, right_p]`` then each position's operator one-hot: ``(rows, P * 2d + P * 3)``. A
    position without a node gathers slot 0 and has no operator (its value is never used)."""

    width: int
    level: int
    positions: int

    def __call__(self, params: Any, *inputs: Any, rng: Any = None) -> Any:
        *vectors, struct = inputs
        d, npos = self.width, self.positions
        n = int(struct.shape[0])
        cat = ops.concatenate(list(vectors), axis=1) if len(vectors) > 1 else vectors[0]
        nslots = int(cat.shape[1]) // d
        st = np.asarray(ops.raw(struct))[:, self.level - 1, :npos, :]  # (rows, P, 3)
        has = st[:, :, 0] >= 0
        base = (np.arange(n) * nslots)[:, None]
        left = np.where(has, base + st[:, :, 1], base)
        right = np.where(has, base + st[:, :, 2], base)
        idx = np.stack([left, right], axis=2).reshape(-1)  # rows, then positions, then l/r
        kids = ops.take(ops.reshape(cat, (n * nslots, d)), idx, axis=0)
        onehot = np.zeros((n, npos, len(OPS)), dtype=np.asarray(ops.raw(cat)).dtype)
        r, q = np.nonzero(has)
        onehot[r, q, st[r, q, 0]] = 1.0
        return ops.concatenate(
            [ops.reshape(kids, (n, npos * 2 * d)), onehot.reshape(n, npos * len(OPS))], axis=1
        )


@dataclasses.dataclass(frozen=True)
class ByOperator(nn.Module):
    """The router's gate (no parameters): a row's score for each operator is how many of its
    nodes at this level have it; the last expert (no node) scores 0.5. With ``k = min(P, 3)``
    each row goes to every operator it has (and to the no-node expert when it has fewer)."""

    width: int
    positions: int

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        raw = np.asarray(ops.raw(x))
        n, npos = raw.shape[0], self.positions
        counts = raw[:, npos * 2 * self.width :].reshape(n, npos, len(OPS)).sum(axis=1)
        return np.concatenate([counts, np.full((n, 1), 0.5, raw.dtype)], axis=1)


@dataclasses.dataclass(frozen=True)
class Combine(nn.Module):
    """The actor of one operator at one height: ``tanh(W2 relu(W1 [left, right] + b1) + b2)`` at
    each position whose operator is ``op``, zeros at the others: ``(rows, P * d)``."""

    width: int
    hidden: int
    positions: int
    op: int

    def init_params(self, init: nn.Initializer) -> Any:
        d, h = self.width, self.hidden
        b_in, b_hid = 1 / math.sqrt(2 * d), 1 / math.sqrt(h)
        return {
            "w1": init.uniform((2 * d, h), b_in),
            "b1": init.uniform((h,), b_in),
            "w2": init.uniform((h, d), b_hid),
            "b2": init.uniform((d,), b_hid),
        }

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        n, d, npos = int(x.shape[0]), self.width, self.positions
        kids = ops.reshape(ops.getitem(x, (slice(None), slice(0, npos * 2 * d))), (n * npos, 2 * d))
        hid = ops.relu(ops.add(ops.matmul(kids, params["w1"]), params["b1"]))
        val = ops.reshape(ops.tanh(ops.add(ops.matmul(hid, params["w2"]), params["b2"])),
                          (n, npos * d))  # fmt: skip
        if npos == 1:  # the router sent only rows whose one node has this operator
            return val
        raw = np.asarray(ops.raw(x))
        mine = raw[:, npos * 2 * d :].reshape(n, npos, len(OPS))[:, :, self.op]
        return ops.multiply(val, np.repeat(mine, d, axis=1))


@dataclasses.dataclass(frozen=True)
class NoNode(nn.Module):
    """The expert of rows without a node of this height (or with fewer operators than ``k``):
    zeros, ``(rows, P * d)``."""

    width: int
    positions: int

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        return ops.multiply(ops.getitem(x, (slice(None), slice(0, self.positions * self.width))),
                            0.0)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RootHead(nn.Module):
    """The 10 logits ``W2 relu(W1 root + b1) + b2`` of each tree's root. ``align="root"``: reads
    the last level's merge, where every root is (position 0). ``"height"``: reads the merge of
    every level and ``struct``; a root is position 0 of its tree's greatest level (a tree of depth
    D has nodes at every height 1..D, one at D)."""

    width: int
    hidden: int
    align: str = "root"

    def init_params(self, init: nn.Initializer) -> Any:
        d, h = self.width, self.hidden
        return {
            "w1": init.uniform((d, h), 1 / math.sqrt(d)),
            "b1": init.uniform((h,), 1 / math.sqrt(d)),
            "w2": init.uniform((h, 10), 1 / math.sqrt(h)),
            "b2": init.uniform((10,), 1 / math.sqrt(h)),
        }

    def __call__(self, params: Any, *inputs: Any, rng: Any = None) -> Any:
        if self.align == "root":
            root = ops.getitem(inputs[0], (slice(None), slice(0, self.width)))
        else:
            root = self._root_by_height(inputs)
        hid = ops.relu(ops.add(ops.matmul(root, params["w1"]), params["b1"]))
        return ops.add(ops.matmul(hid, params["w2"]), params["b2"])

    def _root_by_height(self, inputs: Any) -> Any:
        *merged, struct = inputs
        st = np.asarray(ops.raw(struct))
        top = (st[:, :, 0, 0] >= 0).sum(axis=1)  # the tree's depth: its root's level
        root = None
        for lv, m in enumerate(merged, start=1):
            mask = (top == lv).astype(np.asarray(ops.raw(m)).dtype)[:, None]
            part = ops.multiply(ops.getitem(m, (slice(None), slice(0, self.width))), mask)
            root = part if root is None else ops.add(root, part)
        return root


def placer(workers: int) -> Any:
    """``worker=`` of the i-th place: None in one process, else round-robin over the workers."""
    return lambda i: None if workers == 0 else i % workers


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


def build_levels(cfg: Config, workers: int = 0) -> ann.Graph:
    """leaves -> per level L: childrenL -> routeL -> levelL_{add,sub,mul,none} -> mergeL -> head.

    Levels are as in :func:`node_levels`. With workers, level L's children, router and merge go
    to worker L - 1 (mod N) and its
    operators to the next workers round-robin, so that a key's operators, and different keys'
    heights, compute in different processes."""
    d, at = cfg.width, placer(workers)
    g = ann.Graph()
    digits = g.input("digits", shape=(None, cfg.max_leaves, 10))
    struct = g.input("struct", shape=(None, levels(cfg), max(positions(cfg)), 3), dtype="int64")
    y = g.input("y", shape=(None,), dtype="int64")
    leaves = LeafEmbed(d, cfg.max_leaves)
    vectors = [g.layer("leaves", leaves, digits, worker=at(0))]
    for lv, npos in enumerate(positions(cfg), start=1):
        home = at(lv - 1)
        reads = [vectors[i] for i in level_inputs(cfg, lv)]
        x = g.layer(f"children{lv}", Children(d, lv, npos), *reads, struct, worker=home)
        r = g.router(f"route{lv}", ByOperator(d, npos), x, experts=len(OPS) + 1,
                     k=min(npos, len(OPS)), gates="none", worker=home)  # fmt: skip
        branches = [
            g.layer(
                f"level{lv}_{name}",
                Combine(d, cfg.hidden, npos, op),
                r,
                worker=at(lv + op),
            )  # fmt: skip
            for op, name in enumerate(OP_NAMES)
        ]
        branches.append(g.layer(f"level{lv}_none", NoNode(d, npos), r, worker=home))
        vectors.append(g.merge(f"merge{lv}", r, *branches, worker=home))
    head = RootHead(d, cfg.hidden, cfg.levels_align)
    ins = [vectors[-1]] if cfg.levels_align == "root" else [*vectors[1:], struct]
    out = g.layer("head", head, *ins, worker=at(levels(cfg)))
    g.loss("loss", nn.CrossEntropyLoss(), out, y)
    g.output("logits", out)
    return g


def reference_logits(cfg: Config, params: dict[str, Any], trees: list[Any]) -> Any:
    """The levels model's logits computed tree by tree by recursion (no routing, no slots): an
    operator node at level L (:func:`node_levels`) with operator o is ``levelL_o``'s MLP of its
    children. Written with ``asyncnn.ops``, so it runs on plain numpy arrays and under
    ``ann.value_and_grad``."""
    dtype = np.asarray(ops.raw(params["leaves"]["leaf"])).dtype

    def value(u: Any, path: tuple[int, ...], info: dict[tuple[int, ...], Any]) -> Any:
        if isinstance(u, int):
            onehot = np.zeros((1, 10), dtype=dtype)
            onehot[0, u] = 1.0
            return ops.tanh(ops.matmul(onehot, params["leaves"]["leaf"]))
        a, b = value(u[1], (*path, 1), info), value(u[2], (*path, 2), info)
        p = params[f"level{info[path][0]}_{OP_NAMES[u[0]]}"]
        hid = ops.relu(ops.add(ops.matmul(ops.concatenate([a, b], axis=1), p["w1"]), p["b1"]))
        return ops.tanh(ops.add(ops.matmul(hid, p["w2"]), p["b2"]))

    roots = ops.concatenate([value(t, (), node_levels(cfg, t)[0]) for t in trees], axis=0)
    q = params["head"]
    hid = ops.relu(ops.add(ops.matmul(roots, q["w1"]), q["b1"]))
    return ops.add(ops.matmul(hid, q["w2"]), q["b2"])


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


def run_one(cfg: Config, model: str, label: str, workers: int, cluster: Any, repeat: int,
            train: dict[str, Any], test: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Trains one model under one policy (``label``: ``Sync`` or ``Async K=k``) for up to
    ``epochs``, one ``fit`` per epoch, evaluating on the test trees after each."""
    if model == "mlp":
        graph = build_mlp(cfg)
        train = {"x" if k == "xs" else k: v for k, v in train.items()}
        test = {"x" if k == "xs" else k: v for k, v in test.items()}
    else:
        graph = (build_loop if model == "loop" else build_levels)(cfg, workers)
    keys = INPUTS[model]
    ds = data.ArrayDataset({k: train[k] for k in keys})
    tst = {k: test[k] for k in keys}
    k_active = int(label.split("=")[1]) if label.startswith("Async") else 0
    policy = (policies.Async(max_active_keys=k_active, stash=cfg.stash) if k_active
              else policies.Sync())  # fmt: skip
    adam = optim.Adam(lr=cfg.lr, betas=(cfg.beta1, 0.999), clip_norm=cfg.clip_norm or None)
    tr = ann.Trainer(graph, optimizer=adam, policy=policy, seed=cfg.seed, cluster=cluster)
    curve: list[dict[str, Any]] = []
    seconds, busy = 0.0, dict.fromkeys(graph.layers, 0.0)
    for epoch in range(cfg.epochs):
        hist = tr.fit(ds, epochs=1, batch_size=cfg.batch_size, shuffle=True)
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
        res["row_steps_last_epoch"] = st.row_steps
        res["batched_steps_last_epoch"] = st.steps
    ttt = f"{first['seconds']:5.1f} s (epoch {first['epoch']})" if first else "not reached"
    print(f"{model:>6} {label:>9} {where(workers):>15} #{repeat}: test "
          f"{res['test_accuracy']:.3f} (train {res['train_accuracy']:.3f}), {cfg.target:.0%} "
          f"at {ttt}, {res['samples_per_second']:6.0f} trees/s, {seconds:.1f} s, concurrency "
          f"{res['actor_concurrency']:.2f}, load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    return res


def settings(cfg: Config) -> list[str]:
    """The policy labels: ``Sync``, and ``Async K=k`` for each of ``max_active_keys``."""
    out = []
    for pol in cfg.policies:
        if pol == "Sync":
            out.append("Sync")
        elif pol == "Async":
            out.extend(f"Async K={k}" for k in cfg.max_active_keys)
        else:
            raise ValueError(f"unknown policy {pol!r}; use Sync or Async")
    return out


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
                 f"({os.cpu_count()}-core CPU)")  # fmt: skip
    return [_common.save_figure(fig, cfg.out, "expression_trees.png")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = _common.parse_config(Config, argv, __doc__)
    if cfg.quick:
        cfg = dataclasses.replace(cfg, train_trees=200, test_trees=100, width=16, hidden=32,
                                  mlp_width=32, epochs=2)  # fmt: skip
    for m in cfg.models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r} in --models; use some of {', '.join(MODELS)}")
    if any(w < 0 for w in cfg.workers):
        raise ValueError(f"--workers must be >= 0 (0: one process), got {list(cfg.workers)}")
    rng = np.random.default_rng(cfg.seed)
    train = make_trees(cfg, cfg.train_trees, rng)
    test = make_trees(cfg, cfg.test_trees, rng)
    counts = np.bincount(train["y"], minlength=10)
    majority = float((test["y"] == counts.argmax()).mean())
    before = _common.machine()
    runs = []
    with contextlib.ExitStack() as stack:
        clusters = {w: stack.enter_context(ann.cluster.LocalCluster(workers=w)) if w else None
                    for w in cfg.workers}  # fmt: skip
        for repeat in range(cfg.repeats):  # interleaved, so load changes hit every setting alike
            for w in cfg.workers:
                for model in cfg.models:
                    if model == "mlp" and w:
                        continue  # the baseline runs in one process only
                    for label in settings(cfg):
                        runs.append(run_one(cfg, model, label, w, clusters[w], repeat, train,
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
