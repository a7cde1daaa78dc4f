"""A routed graph (a gate, experts, a merge, a head), its data, and the plain loop over rows
that routing is checked against, for tests/test_routing*.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn, ops

from _reference import microbatched_sgd

D, H, C = 5, 4, 3


def moe_graph(experts: int = 4, k: int = 2, **kw: Any) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, D))
    y = g.input("y", (None,), dtype="int64")
    r = g.router("gate", nn.Linear(D, experts), x, experts=experts, k=k, **kw)
    outs = [g.layer(f"e{i}", nn.Sequential(nn.Linear(D, H), nn.Tanh()), r) for i in range(experts)]
    m = g.merge("merge", r, *outs)
    o = g.layer("head", nn.Linear(H, C), m)
    g.loss("loss", nn.CrossEntropyLoss(), o, y)
    g.output("logits", o)
    return g


def _row_choices(scores: np.ndarray, k: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    return order[:k]


def reference_loss(
    graph: ann.Graph, p: dict[str, Any], x: Any, y: Any, k: int, gates: str, cap: int | None
) -> Any:
    """The mean loss of one key, each row through its own experts, one row at a time."""
    mods = {n: graph.nodes[n].module for n in graph.layers}
    gate = mods["gate"].gate
    experts = mods["gate"].experts
    rows = x.shape[0]
    chosen = []
    for i in range(rows):
        s = np.asarray(ops.raw(gate(p["gate"], x[i : i + 1])))[0]
        chosen.append(_row_choices(s, k))
    kept = [[True] * k for _ in range(rows)]
    if cap is not None:  # first choices of all rows first, then second choices
        load = [0] * experts
        for j in range(k):
            for i in range(rows):
                e = chosen[i][j]
                kept[i][j] = load[e] < cap
                load[e] += kept[i][j]
    total = 0.0
    for i in range(rows):
        xi = x[i : i + 1]
        s = gate(p["gate"], xi)
        idx = np.array(chosen[i])
        if gates == "softmax":
            w = ops.take(ops.softmax(s, axis=-1), idx, axis=1)
        elif gates == "normalized":
            w = ops.softmax(ops.take(s, idx, axis=1), axis=-1)
        else:
            w = None
        out = None
        for j, e in enumerate(chosen[i]):
            if not kept[i][j]:
                continue
            ye = mods[f"e{e}"](p[f"e{e}"], xi)
            term = ye if w is None else ye * w[:, j : j + 1]
            out = term if out is None else out + term
        if out is None:
            out = xi[:, :H] * 0
        logits = mods["head"](p["head"], out)
        total = total + nn.CrossEntropyLoss()({}, logits, y[i : i + 1])
    return total / rows


def reference_fit(graph, params, batches, k, gates, cap, microbatches, lr=0.1):
    """Plain SGD: one step per minibatch; the gradient of the minibatch mean loss, with the
    capacity applied per microbatch (the runtime's key), like numpy.array_split."""
    return microbatched_sgd(
        params, batches, microbatches,
        lambda q, b, lo, hi: reference_loss(graph, q, b["x"][lo:hi], b["y"][lo:hi], k, gates, cap),
        lr,
    )  # fmt: skip


def _data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, D)), "y": rng.integers(0, C, n)}


@dataclass(frozen=True)
class NanFromRow2(nn.Module):
    """Scores from the first two features, NaN from the third row on (the graph's check runs
    two rows, so only a key of more rows meets it)."""

    def init_params(self, init):
        return {}

    def __call__(self, params, x, *, rng=None):
        s = np.array(ops.raw(x)[:, :2])
        s[2:, 1] = np.nan
        return s
