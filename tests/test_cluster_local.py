"""LocalCluster (``_cluster/_local.py``): the cap on its worker count, and a start interrupted
while a worker process is being spawned."""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import Future
from typing import Any

import pytest

import asyncnn as ann
from asyncnn._cluster import _local

pytestmark = pytest.mark.timeout(60)


def test_a_worker_count_past_the_limit_is_refused_unless_oversubscribe() -> None:
    limit = ann.cluster.LocalCluster.max_workers()
    assert limit >= 8
    assert ann.cluster.LocalCluster(workers=limit).workers == limit  # nothing starts yet
    with pytest.raises(ValueError, match=rf"workers=1000\).*limit is {limit}.*oversubscribe=True"):
        ann.cluster.LocalCluster(workers=1000)
    assert ann.cluster.LocalCluster(workers=limit + 1, oversubscribe=True).workers == limit + 1
    with pytest.raises(TypeError, match="oversubscribe"):
        ann.cluster.LocalCluster(workers=2, oversubscribe="yes")  # type: ignore[arg-type]


def test_ctrl_c_while_a_worker_is_spawned_still_hands_over_that_process(monkeypatch: Any) -> None:
    # Ctrl-C lands in the caller's wait while the spawning thread is inside Popen: the process
    # it starts must be in the list the caller then stops, not appear there after the caller
    # has moved on (it would be left running)
    in_popen = threading.Event()
    rewaited = threading.Event()
    started = object()

    def popen(*args: Any, **kwargs: Any) -> Any:
        in_popen.set()
        rewaited.wait(10)  # without the fix nobody waits again: the process comes too late
        return started

    class Interrupted(Future[None]):
        calls = 0

        def result(self, timeout: float | None = None) -> None:
            type(self).calls += 1
            if type(self).calls == 1:
                in_popen.wait(10)
                raise KeyboardInterrupt
            return super().result(timeout)

        def exception(self, timeout: float | None = None) -> BaseException | None:
            rewaited.set()
            return super().exception(timeout)

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(_local, "Future", Interrupted)
    into: list[Any] = []
    with pytest.raises(KeyboardInterrupt):
        _local._spawn(["true"], {}, into)
    assert into == [started]
