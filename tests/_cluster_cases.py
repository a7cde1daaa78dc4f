"""Graphs, data, a fit, and the fault helpers (a liveness probe, a slow layer) that several
test_cluster*.py files share."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

import asyncnn as ann
from asyncnn import nn, optim


def chain(workers: list[int | None], width: int = 16, loss_worker: int | None = None) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 12))
    y = g.input("y", shape=(None,), dtype="int64")
    h = x
    for i, w in enumerate(workers):
        last = i == len(workers) - 1
        mod = nn.Linear(12 if i == 0 else width, 4 if last else width)
        h = g.layer(f"s{i}", mod if last else nn.Sequential(mod, nn.Tanh()), h, worker=w)
    g.loss("loss", nn.CrossEntropyLoss(), h, y, worker=loss_worker)
    g.output("logits", h)
    return g


def data(n: int = 96, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 12)).astype("float32"), "y": rng.integers(0, 4, n)}


def fit(graph: ann.Graph, policy: Any, cluster: Any = None, epochs: int = 2, **kw: Any) -> Any:
    tr = ann.Trainer(
        graph, optimizer=optim.SGD(lr=0.1, momentum=0.9), policy=policy, cluster=cluster, **kw
    )
    hist = tr.fit(data(), epochs=epochs, batch_size=32)
    return tr, hist


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@dataclasses.dataclass(frozen=True)
class _Slow(nn.Module):
    """An identity that sleeps, so the test can act mid-run."""

    def __call__(self, params: Any, x: Any, *, rng: Any = None) -> Any:
        time.sleep(0.02)
        return x


def slow_chain(name: str = "slow", wait: nn.Module | None = None) -> ann.Graph:
    """Two layers on workers 0 and 1, the second, ``name``, starting with ``wait`` (default
    :class:`_Slow`), an identity that takes its time."""
    g = ann.Graph()
    x = g.input("x", shape=(None, 12))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("s0", nn.Sequential(nn.Linear(12, 16), nn.Tanh()), x, worker=0)
    wait = _Slow() if wait is None else wait
    h = g.layer(name, nn.Sequential(wait, nn.Linear(16, 4)), h, worker=1)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g
