"""The graphs, data and trace rewriting shared by tests/test_replay*.py."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn
from asyncnn._runtime._traceformat import encode_record, iter_frames

from _reference import assert_params_equal


@dataclass(frozen=True)
class Jittery(nn.Linear):
    """A Linear that sleeps a random while: two runs under Async then differ in timing."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        time.sleep(float(np.random.default_rng().uniform(0, 0.002)))
        return super().__call__(params, x)


def _graph() -> ann.Graph:
    return ann.Graph.sequential(
        [Jittery(5, 8), nn.Tanh(), Jittery(8, 8), nn.Tanh(), Jittery(8, 3)],
        loss=nn.CrossEntropyLoss(),
        stages=[2, 2, 1],
        input_shape=(None, 5),
    )


def _data(n: int = 48):
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 5)), "y": rng.integers(0, 3, n)}


def _equal(p, q):
    try:
        assert_params_equal(p, q)
        return True
    except AssertionError:
        return False


def _rewrite(path, out, change):
    """Copies a trace, letting ``change(record)`` edit records (re-framed with valid checksums)."""
    with open(path, "rb") as f:
        records = [r for _, r in iter_frames(f)]
    with open(out, "wb") as f:
        for r in records:
            f.write(encode_record(change(r)))


def _routed() -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    r = g.router("gate", nn.Linear(5, 3), x, experts=3, k=2, capacity=3)
    experts = [g.layer(f"e{i}", nn.Sequential(nn.Linear(5, 4), nn.Tanh()), r) for i in range(3)]
    head = g.layer("head", nn.Linear(4, 3), g.merge("merge", r, *experts))
    g.loss("loss", nn.CrossEntropyLoss(), head, y)
    return g


def _plain_graph() -> ann.Graph:
    return ann.Graph.sequential(
        [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)],
        loss=nn.CrossEntropyLoss(),
        stages=2,
        input_shape=(None, 5),
    )
