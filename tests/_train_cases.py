"""Data and a three-stage Adam trainer, shared by tests/test_train*.py."""

from __future__ import annotations

import numpy as np

import asyncnn as ann
from asyncnn import optim

from _reference import chain_graph


def _data(n=40, features=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, features)), "y": rng.integers(0, classes, n)}


def _trainer(policy, seed=3):
    return ann.Trainer(chain_graph(3), optimizer=optim.Adam(lr=0.01), policy=policy, seed=seed)
