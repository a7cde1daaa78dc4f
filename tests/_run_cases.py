"""Data, a two-stage run and trainer, and a graph with a layer that never answers, shared by
tests/test_run*.py."""

from __future__ import annotations

import anyio
import numpy as np

import asyncnn as ann
from asyncnn import nn, optim, policies

from _reference import chain_graph


def _data(n=16, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, features)), "y": rng.integers(0, classes, n)}


def _sync_run():
    """``open_run`` of a two-stage chain under ``Sync`` (SGD, defaults otherwise)."""
    return ann.open_run(chain_graph(2), optimizer=optim.SGD(lr=0.1), policy=policies.Sync())


def _trainer(**kw):
    return ann.Trainer(
        chain_graph(2),
        optimizer=optim.SGD(lr=0.1),
        policy=kw.pop("policy", policies.GPipe(2)),
        dtype="float64",
        **kw,
    )


class Silent(ann.LayerActor):
    """A custom actor that never answers."""

    async def on_forward(self, key, inputs, meta):
        await anyio.sleep_forever()


def _silent_graph() -> ann.Graph:
    """A Linear layer, then a Silent one, then the loss."""
    g = ann.Graph()
    x = g.input("x", shape=(None, 5))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("first", nn.Linear(5, 3), x)
    h = g.layer("silent", nn.Identity(), h, actor=Silent)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g
