"""A recurrent graph and its data, the plain loop over instances it is checked against, and a
loop of cells run until a stop condition, shared by tests/test_loops*.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn, ops
from asyncnn.dynamic import RNNCell

from _reference import microbatched_sgd

T, DX, DC, H, C = 5, 3, 2, 4, 3


def rnn_graph(output: str = "last") -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, T, DX))
    c = g.input("c", (None, DC))
    lens = g.input("len", (None,), dtype="int64")
    y = g.input("y", (None,), dtype="int64") if output == "last" else g.input("y", (None, T, C))
    h0 = g.layer("enc", nn.Sequential(nn.Linear(DC, H), nn.Tanh()), c)
    xe = g.layer("embed", nn.Linear(DX, DX), x)
    h = g.loop("rnn", RNNCell(DX, H), h0, xe, lens, output=output)
    o = g.layer("head", nn.Linear(H, C), h)
    g.loss("loss", nn.CrossEntropyLoss() if output == "last" else nn.MSELoss(), o, y)
    g.output("logits", o)
    return g


def _data(n=8, seed=0, output="last"):
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, T + 1, n)
    lens[:3] = [0, T, 2]  # an empty sequence, a full one, a short one in the same key
    y = rng.integers(0, C, n) if output == "last" else rng.standard_normal((n, T, C))
    return {"x": rng.standard_normal((n, T, DX)), "c": rng.standard_normal((n, DC)),
            "len": lens, "y": y}  # fmt: skip


def reference_loss(g, p, d, lo, hi, output):
    """One instance at a time: its own number of steps, a plain Python loop."""
    m = {n: g.nodes[n].module for n in g.layers}
    cell = m["rnn"].cell
    total = 0.0
    for i in range(lo, hi):
        h = m["enc"](p["enc"], d["c"][i : i + 1])
        states = []
        for t in range(int(d["len"][i])):
            h = cell(p["rnn"], h, m["embed"](p["embed"], d["x"][i : i + 1, t]))
            states.append(h)
        if output == "last":
            total = total + nn.CrossEntropyLoss()({}, m["head"](p["head"], h), d["y"][i : i + 1])
        else:
            zeros = d["x"][i : i + 1, 0, :1] * 0 + np.zeros((1, H))
            seq = ops.stack(states + [zeros] * (T - len(states)), axis=1)
            o = m["head"](p["head"], seq)
            total = total + ops.sum(ops.square(o - d["y"][i : i + 1])) / (T * C)
    return total / (hi - lo)


def reference_fit(g, start, batches, microbatches, output="last", lr=0.1):
    return microbatched_sgd(
        start, batches, microbatches,
        lambda q, b, lo, hi: reference_loss(g, q, b, lo, hi, output), lr,
    )  # fmt: skip


@dataclass(frozen=True)
class Halt(nn.Module):
    """Stops a row once its first state component exceeds 0.3 (no parameters)."""

    def init_params(self, init):
        return {}

    def __call__(self, params, h, *, rng=None):
        return ops.raw(h)[:, 0] > 0.3


@dataclass(frozen=True)
class Step(nn.Module):
    """``h <- tanh(h @ w + b)``: a cell without per-step input."""

    size: int

    def init_params(self, init):
        return {"w": init.normal((self.size, self.size), 0.8), "b": init.normal((self.size,), 0.5)}

    def __call__(self, params, h, *, rng=None):
        return ops.tanh(ops.add(ops.matmul(h, params["w"]), params["b"]))


def loop_graph(until: Any, name: str = "loop", size: int = H) -> ann.Graph:
    """An encoder, a loop ``name`` of :class:`Step` cells that runs until ``until`` says stop
    (at most 6 steps), then a head and a loss."""
    g = ann.Graph()
    c = g.input("c", (None, DC))
    y = g.input("y", (None,), dtype="int64")
    h0 = g.layer("enc", nn.Linear(DC, size), c)
    h = g.loop(name, Step(size), h0, until=until, max_steps=6)
    g.loss("loss", nn.CrossEntropyLoss(), g.layer("head", nn.Linear(size, C), h), y)
    return g
