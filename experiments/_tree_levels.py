"""The ``levels`` tree network of ``expression_trees.py``: each tree unrolled by node height, one
actor per (height, operator) behind a router per height (that script's docstring says how), and
its tree-by-tree reference. ``cfg`` is that script's ``Config`` (``min_leaves``, ``max_leaves``,
``width``, ``hidden``, ``levels_align``)."""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn, ops

OPS = ("+", "-", "*")
OP_NAMES = ("add", "sub", "mul")  # the levels model's actor names: levelL_add, ...
VOCAB = 10 + len(OPS)  # digits 0-9, then the operators


def levels(cfg: Any) -> int:
    """The greatest depth of a tree of ``max_leaves`` leaves (a chain): the levels model's
    number of levels."""
    return cfg.max_leaves - 1


def node_levels(cfg: Any, t: Any) -> tuple[dict[tuple[int, ...], Any], list[tuple[int, ...]]]:
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
def positions(cfg: Any) -> list[int]:
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


def level_inputs(cfg: Any, lv: int) -> list[int]:
    """The levels whose vectors the nodes of level ``lv`` read, after the leaves (level 0): every
    lower level (``align="height"``), or the one below (``"root"``)."""
    if cfg.levels_align == "height":
        return list(range(lv))
    return [0] if lv == 1 else [0, lv - 1]


def levels_layout(cfg: Any, t: Any) -> tuple[list[int], dict[int, list[tuple[int, int, int]]]]:
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


def build_levels(cfg: Any, workers: int = 0) -> ann.Graph:
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


def reference_logits(cfg: Any, params: dict[str, Any], trees: list[Any]) -> Any:
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
