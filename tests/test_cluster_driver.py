"""The driver's side of a cluster run (``_cluster/_driver.py``): what each worker is sent."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._cluster import _driver
from asyncnn._math._pytree import tree_leaves

pytestmark = pytest.mark.timeout(60)


def test_each_worker_is_sent_the_weights_of_its_own_layers_only(monkeypatch: Any) -> None:
    sent: dict[int, tuple[list[str], int]] = {}
    send = _driver._send_share

    async def spy(cluster: Any, w: int, hosted: list[str], cmd: Any, buffers: list[Any]) -> None:
        sent[w] = (hosted, sum(np.asarray(b).nbytes for b in buffers))
        await send(cluster, w, hosted, cmd, buffers)

    monkeypatch.setattr(_driver, "_send_share", spy)
    g = ann.Graph.sequential(
        [nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)],
        loss=nn.CrossEntropyLoss(), stages=[2, 2, 1], input_shape=(None, 12),
        workers=[0, 1, 1],
    )  # fmt: skip
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(32, 12)).astype("float32"), "y": rng.integers(0, 4, 32)}
    with ann.cluster.LocalCluster(workers=2) as cluster:
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1, momentum=0.9),
                         policy=policies.Sync(), cluster=cluster)  # fmt: skip
        tr.fit(data, epochs=1, batch_size=32)

    def nbytes(names: list[str]) -> int:
        # weights and momentum (as large as the weights) of those layers
        return 2 * sum(a.nbytes for n in names for a in tree_leaves(tr.params[n]))

    assert sent == {
        0: (["stage0"], nbytes(["stage0"])),
        1: (["stage1", "stage2", "loss"], nbytes(["stage1", "stage2"])),
    }
