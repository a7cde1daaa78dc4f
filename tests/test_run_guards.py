"""The run's guards against hangs: the stall watchdog and the thread that watches the loop itself
(``_run_guards.py``), seen through whole runs."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn import trace as T


def _graph(actor: type[ann.LayerActor]) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", (None, 5))
    y = g.input("y", (None,), dtype="int64")
    h = g.layer("a", nn.Linear(5, 4), x)
    h = g.layer("b", nn.Linear(4, 3), h, actor=actor)
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


def _data(n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(n, 5)), "y": rng.integers(0, 3, size=n)}


_started, _release = threading.Event(), threading.Event()


class OnAPoolThread(ann.LayerActor):
    """Its forward waits on a pool thread (a cost far above the inline threshold) until
    ``_release`` is set."""

    async def on_forward(self, key: int, inputs: list[Any], meta: dict[str, Any]) -> Any:
        def wait() -> None:
            _started.set()
            _release.wait(20.0)

        await self.compute(wait, cost=1e12)
        return await super().on_forward(key, inputs, meta)


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_the_callers_own_blocking_is_not_blamed_on_an_actor_computing_on_a_pool_thread(
    tmp_path: Any,
) -> None:
    # (the thread that watches the loop threw LoopBlockedError "actor 'b' has been computing its
    # forward of key 0 ..., on the event loop's thread, which it blocked" into the loop's thread,
    # wherever it was: after the caller's time.sleep, or inside trio's epoll wait, which
    # abandoned trio's run, left the trace unclosed and killed a pool thread; b's forward ran on
    # a pool thread all along. The watchdog, woken late by the same sleep, then took the time
    # the loop stood still for a stall of the actors.)
    started, release = _started, _release
    started.clear()
    release.clear()
    path = tmp_path / "run.trace"
    try:
        async with ann.open_run(
            _graph(OnAPoolThread), optim.SGD(lr=0.1), policies.Async(max_active_keys=2),
            dtype="float64", stall_timeout=0.3, trace=str(path),
        ) as run:  # fmt: skip
            await run.step(_data())
            while not started.is_set():  # noqa: ASYNC110 - set on a pool thread
                await anyio.sleep(0.005)
            time.sleep(1.0)  # noqa: ASYNC251 - the caller's own blocking code, past stall_timeout
            await anyio.sleep(0.1)  # the watchdog wakes (late) before b makes progress
            release.set()
            await run.step(_data())
    finally:
        release.set()
    summary = T.summary(path)
    assert summary["closed"] and summary["errors"] == [] and summary["keys"] == 2
