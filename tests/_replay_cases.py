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


def assert_same_tree(got: Any, want: Any, where: str = "tree") -> None:
    """``got`` is ``want`` exactly: the same container types, dict keys of the same types in
    the same order, numpy scalars as numpy scalars of the same dtype, arrays of the same dtype,
    shape and bytes (what a replay must hand an actor that the run handed it)."""
    assert type(got) is type(want), (
        f"{where}: a {type(got).__name__}, expected {type(want).__name__}"
    )
    if isinstance(want, dict):
        got_keys, want_keys = list(got), list(want)
        assert [(type(k), k) for k in got_keys] == [(type(k), k) for k in want_keys], (
            f"{where}: keys {got_keys!r}, expected {want_keys!r}"
        )
        for k in want_keys:
            assert_same_tree(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{where}: {len(got)} entries, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_tree(g, w, f"{where}[{i}]")
    elif isinstance(want, np.ndarray | np.generic):
        assert (got.dtype, got.shape) == (want.dtype, want.shape), (
            f"{where}: {got.dtype} {got.shape}, expected {want.dtype} {want.shape}"
        )
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), f"{where}: other bytes"
    else:
        assert got == want, f"{where}: {got!r}, expected {want!r}"
