"""A distributed run's one trace (``asyncnn/_cluster/_traces.py``): the driver's and each
worker's events merged by time, and a worker's part that ends early said to be missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import asyncnn as ann
from asyncnn._cluster._traces import merge_traces
from asyncnn._runtime._recorder import Recorder
from asyncnn._tracing._summary import format_summary

from _cluster_cases import chain, data
from _trace_read_cases import _boundaries


def _late_receives(path: str) -> list[tuple[str, str, str, int, float]]:
    """The receives of the trace at ``path`` stamped before their send: (sender, receiver,
    kind, key, by how many seconds); a message's n-th receive is matched with its n-th send."""
    sends: dict[tuple[str, str, str, int], list[float]] = {}
    receives: dict[tuple[str, str, str, int], list[float]] = {}
    for e in ann.trace.read(path).events:
        if e.what == "send":
            sends.setdefault((e.actor, e.peer, e.kind, e.key), []).append(e.time)
        elif e.what == "receive":
            receives.setdefault((e.peer, e.actor, e.kind, e.key), []).append(e.time)
    assert receives and receives.keys() <= sends.keys()
    return [
        (*k, sent - got)
        for k, times in receives.items()
        for sent, got in zip(sends[k], times, strict=False)
        if got < sent
    ]


def _part(path: Path, header: dict[str, object], times: list[float]) -> None:
    rec = Recorder(str(path), header)
    for i, t in enumerate(times):
        rec.t0 -= t  # (the event's time on the shared clock: merged in order)
        rec.event("scheduler", "admit", "", i, meta={"mb": i})
        rec.t0 += t
    rec.close()


def test_a_worker_part_that_ends_early_is_named_missing_in_the_merged_trace(
    tmp_path: Path,
) -> None:
    # (the other processes' close events made the merged trace read as whole, and a replay
    # then blamed "the file was altered" for the cut worker's sends)
    driver, w0, w1 = tmp_path / "run.trace", tmp_path / "w0.trace", tmp_path / "w1.trace"
    _part(driver, {"graph": {}}, [0.0, 3.0])
    _part(w0, {"worker": 0}, [1.0])
    _part(w1, {"worker": 1}, [2.0, 4.0])
    raw = w1.read_bytes()
    w1.write_bytes(raw[: _boundaries(raw)[-2]])  # worker 1's part without its close record
    merge_traces(str(driver), [str(w0), str(w1)])
    trace = ann.trace.read(driver)
    assert not trace.truncated and trace.closed  # (the driver's part is whole)
    admits = [e for e in trace.events if e.what == "admit"]
    assert len(admits) == 5
    assert ann.trace.summary(driver)["missing_workers"] == [1]
    assert "events of workers [1] are missing" in format_summary(ann.trace.summary(driver))
    # whole parts: nothing said missing
    _part(driver, {"graph": {}}, [0.0])
    _part(w1, {"worker": 1}, [2.0])
    merge_traces(str(driver), [str(w0), str(w1)])
    assert ann.trace.summary(driver)["missing_workers"] == []


def test_a_merge_the_disk_refuses_raises_trace_write_error_and_keeps_the_drivers_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the bare "[Errno 28] No space left on device", of no file (the merged file's writes)
    import builtins
    import errno

    from asyncnn._cluster import _traces
    from asyncnn._errors import TraceWriteError

    driver, w0 = tmp_path / "run.trace", tmp_path / "w0.trace"
    _part(driver, {"graph": {}}, [0.0, 3.0])
    _part(w0, {"worker": 0}, [1.0])
    before = driver.read_bytes()

    class Full:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            self.f.close()

    def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(file, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    monkeypatch.setattr(_traces, "open", opened, raising=False)
    with pytest.raises(TraceWriteError) as info:
        merge_traces(str(driver), [str(w0)])
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, RuntimeError)
    assert err.errno == errno.ENOSPC and err.filename == str(driver)
    assert str(err).startswith(f"writing the trace {str(driver)!r} failed (OSError: [Errno 28]")
    assert "the workers' events were not merged into it" in str(err)
    assert driver.read_bytes() == before  # the driver's part as it was, no debris beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.trace", "w0.trace"]


def test_worker_parts_the_temporary_folder_refuses_raise_trace_write_error_naming_the_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the driver writes each worker's part to a temporary file before the merge: a full
    # temporary folder gave the bare "[Errno 28] No space left on device" and left the parts
    # written before it there
    import errno
    import os
    import tempfile

    from asyncnn._cluster import _driver
    from asyncnn._errors import TraceWriteError

    driver, w0 = tmp_path / "run.trace", tmp_path / "w0.trace"
    _part(driver, {"graph": {}}, [0.0])
    _part(w0, {"worker": 0}, [1.0])
    before = driver.read_bytes()
    parts = tmp_path / "parts"
    parts.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(parts))
    real = os.fdopen
    opened: list[int] = []

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        opened.append(fd)
        f = real(fd, *args, **kwargs)
        if len(opened) == 2:  # the second part: the folder is full
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    raw = w0.read_bytes()
    with pytest.raises(TraceWriteError) as info:
        _driver._merge(str(driver), [raw, raw])
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(driver)
    assert "temporary folder" in str(info.value)
    assert driver.read_bytes() == before and list(parts.iterdir()) == []


@pytest.fixture(scope="module")
def three() -> Any:
    with ann.cluster.LocalCluster(workers=3) as cluster:
        yield cluster


@pytest.mark.timeout(90)
def test_a_local_cluster_trace_stamps_every_receive_after_its_send(
    tmp_path: Path, three: Any
) -> None:
    # each worker's clock was the driver's shifted by the time the run's share took to reach
    # it: in a 3-worker Sync run a third of the receives came milliseconds before their send,
    # and a replay with another learning rate named s1 or s2 first, from run to run
    one = str(tmp_path / "one.trace")
    opts: dict[str, Any] = {"optimizer": ann.optim.SGD(lr=0.1), "policy": ann.policies.Sync()}
    ann.Trainer(chain([None] * 3), trace=one, **opts).fit(data(), epochs=1, batch_size=16)
    changed = ann.replay(one, optimizer=ann.optim.SGD(lr=0.2)).first_divergence
    assert changed is not None
    for i in range(2):
        path = str(tmp_path / f"cluster{i}.trace")
        tr = ann.Trainer(chain([0, 1, 2], loss_worker=2), cluster=three, trace=path, **opts)
        tr.fit(data(), epochs=1, batch_size=16)
        assert _late_receives(path) == []
        # (under Sync, s2 updates key 0 before it sends s1 its gradient: so first)
        div = ann.replay(path, optimizer=ann.optim.SGD(lr=0.2)).first_divergence
        assert div is not None
        assert (div.actor, div.kind, div.key) == (changed.actor, changed.kind, changed.key)


@pytest.mark.timeout(90)
def test_workers_of_another_host_are_asked_their_clock_and_the_trace_replays(
    tmp_path: Path, three: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the workers of a LocalCluster taken for another host's: the run's start asks each its
    # clock (the same one here, so the estimate is about 0), and the trace is whole
    from asyncnn._cluster import _driver, _shm

    class Elsewhere:
        pass

    monkeypatch.setattr(_driver, "LocalCluster", Elsewhere)
    monkeypatch.setattr(_shm, "boot_id", lambda: "another host's")
    offsets: list[float] = []
    real = _driver._worker_clock

    async def spied(*args: Any) -> float:
        offsets.append(await real(*args))
        return offsets[-1]

    monkeypatch.setattr(_driver, "_worker_clock", spied)
    path = str(tmp_path / "run.trace")
    opts: dict[str, Any] = {"optimizer": ann.optim.SGD(lr=0.1), "policy": ann.policies.Sync()}
    tr = ann.Trainer(chain([0, 1, 2], loss_worker=2), cluster=three, trace=path, **opts)
    tr.fit(data(), epochs=1, batch_size=16)
    assert len(offsets) == 3 and all(abs(o) < 0.5 for o in offsets), offsets
    rep = ann.replay(path)
    assert rep.identical, rep.first_divergence


class _FarWorker:
    """A worker's connection whose clock reads 1000 s ahead of this process's; its first
    ``slow`` answers take 30 ms, all of it after it read its clock (an estimate from such an
    exchange is 15 ms off)."""

    def __init__(self, slow: int = 3, boot: str = "another host's", silent: bool = False) -> None:
        self.slow, self.boot, self.silent = slow, boot, silent
        self.queries = 0

    async def send(self, header: dict[str, Any], buffers: Any = None) -> None:
        assert header == {"t": "clock"}
        self.queries += 1

    async def receive(self) -> tuple[dict[str, Any], list[Any]]:
        import time

        import anyio

        if self.silent:
            await anyio.sleep_forever()
        now = time.perf_counter() + 1000.0
        if self.queries <= self.slow:
            await anyio.sleep(0.03)
        return {"t": "clock", "now": now, "boot": self.boot}, []


def _far(conn: _FarWorker, heartbeat_timeout: float = 30.0) -> Any:
    cluster = ann.cluster.Cluster(workers=1)
    cluster.heartbeat_timeout = heartbeat_timeout  # (under the least a cluster takes)
    cluster.connections = {0: conn}  # type: ignore[dict-item]
    cluster.info = {0: {"pid": 123}}
    return cluster


@pytest.mark.anyio
async def test_a_worker_clock_is_estimated_from_the_quickest_exchange() -> None:
    from asyncnn._cluster import _driver, _shm

    conn = _FarWorker()
    offset = await _driver._worker_clock(_far(conn), 0, ["s0"])
    assert conn.queries == _driver.CLOCK_EXCHANGES
    assert abs(offset - 1000.0) < 0.005  # (the slow exchanges' estimates are 15 ms off)
    # a worker of this host reads this process's clock: asked once
    conn = _FarWorker(boot=_shm.boot_id())
    if _shm.boot_id():
        assert await _driver._worker_clock(_far(conn), 0, ["s0"]) == 0.0
        assert conn.queries == 1


@pytest.mark.anyio
async def test_a_worker_that_does_not_answer_the_clock_query_is_named() -> None:
    from asyncnn._cluster import _driver
    from asyncnn._errors import WorkerError

    with pytest.raises(WorkerError) as info:
        await _driver._worker_clock(_far(_FarWorker(silent=True), 0.2), 0, ["s0"])
    assert str(info.value).endswith(
        "worker 0 (pid 123, hosting s0) did not answer the driver's clock query within 0.2 s "
        "(hung, or stopped)"
    )
