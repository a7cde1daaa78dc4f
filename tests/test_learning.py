"""Real learning through the actor runtime on MNIST-1D (slow: a few seconds per run)."""

from __future__ import annotations

import pytest

import asyncnn as ann
from asyncnn import data, nn, optim, policies


def _accuracy(policy: policies.Policy, epochs: int = 150) -> float:
    # The MNIST-1D paper's MLP (two hidden layers of 100) and batch size, 6000 steps of Adam.
    ds = data.load_mnist1d()
    layers = [nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)]
    g = ann.Graph.sequential(layers, loss=nn.CrossEntropyLoss(), stages=3, input_shape=(None, 40))
    tr = ann.Trainer(g, optimizer=optim.Adam(lr=5e-3), policy=policy, seed=0)
    tr.fit({"x": ds["x_train"], "y": ds["y_train"]}, epochs=epochs, batch_size=100, shuffle=True)
    return tr.evaluate({"x": ds["x_test"], "y": ds["y_test"]})["accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_async_trains_within_three_points_of_sync():
    sync = _accuracy(policies.Sync())
    assert sync >= 0.62, f"Sync reached only {sync:.1%}"
    # With 16 keys in flight, gradients are up to ~16 updates stale; AMPNet pairs such
    # concurrency with a larger update frequency (the mean of 4 gradients per update).
    for policy in (policies.Async(max_active_keys=4), policies.Async(16, min_update_frequency=4)):
        acc = _accuracy(policy)
        assert acc >= sync - 0.03, f"{policy} reached {acc:.1%}, Sync {sync:.1%}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipedream_learns_mnist1d():
    assert _accuracy(policies.PipeDream(4), epochs=40) >= 0.62
