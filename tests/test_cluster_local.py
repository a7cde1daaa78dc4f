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


class _ClaimedOnRelease:
    """A cluster's ``run_lock`` that lets a run on another thread claim the cluster the moment
    the lock is first released (as a fit that was waiting for it would)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster, self.lock, self.claimed = cluster, threading.Lock(), False

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()
        if not self.claimed:
            self.claimed = True
            self.cluster.running = True


def test_a_with_block_left_by_an_error_as_a_run_claims_the_cluster_keeps_that_error() -> None:
    # __exit__ looked for an open run under the lock, then called close() outside it: a fit on
    # another thread that claimed the cluster in between made close() refuse, and its
    # RuntimeError replaced the block's own error
    cluster = ann.cluster.LocalCluster(workers=2)  # (nothing starts: no fit runs here)
    cluster.run_lock = _ClaimedOnRelease(cluster)  # type: ignore[assignment]
    with pytest.raises(KeyError, match="mine") as caught:
        with cluster:
            raise KeyError("mine")
    assert caught.value.__context__ is None and cluster.run_lock.claimed  # type: ignore[attr-defined]
    cluster.running = False


def test_a_with_block_left_by_an_error_keeps_it_when_stopping_the_workers_fails(
    monkeypatch: Any,
) -> None:
    # the stop's own error (a worker that could not be waited for) replaced the block's
    def fails() -> None:
        raise OSError("no such process")

    cluster = ann.cluster.LocalCluster(workers=2)
    monkeypatch.setattr(cluster, "_terminate", fails)
    with pytest.raises(KeyError, match="mine") as caught:
        with cluster:
            raise KeyError("mine")
    notes = getattr(caught.value, "__notes__", [])
    assert any("could not stop its workers" in n and "no such process" in n for n in notes), notes
    monkeypatch.undo()
    with pytest.raises(OSError, match="no such process"):  # (a plain close says it as itself)
        monkeypatch.setattr(cluster, "_terminate", fails)
        cluster.close()


def _gone(pids: list[int], seconds: float = 5.0) -> bool:
    import time

    from _cluster_cases import _alive

    deadline = time.perf_counter() + seconds
    while any(_alive(p) for p in pids) and time.perf_counter() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def test_a_started_cluster_dropped_without_close_stops_its_workers_when_collected() -> None:
    # an atexit entry of the cluster's own _stop kept it alive: a sweep's forgotten cluster
    # kept its worker processes, sockets and shared memory until the program ended
    import gc
    import weakref

    import anyio

    cluster = ann.cluster.LocalCluster(workers=1)
    anyio.run(cluster.start)
    pids = cluster.pids
    assert len(pids) == 1 and not _gone(pids, 0.0)
    ref = weakref.ref(cluster)
    gc.collect()  # (the event loop's own cycles, which held the cluster's start)
    del cluster  # (its last reference: __del__ runs now, before its sockets are freed)
    assert ref() is None
    assert _gone(pids)


def test_a_cluster_left_open_at_the_programs_end_stops_its_workers(tmp_path: Any) -> None:
    import sys

    script = tmp_path / "driver.py"
    script.write_text(
        "import anyio, asyncnn as ann\n"
        "c = ann.cluster.LocalCluster(workers=2)\n"
        "anyio.run(c.start)\n"
        "print(*c.pids, flush=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2 and _gone(pids)
