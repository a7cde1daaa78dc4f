"""The driver's side of a cluster run (``_cluster/_driver.py``): what each worker is sent."""

from __future__ import annotations

import socket
import threading
import time
import types
from collections import deque
from typing import Any

import anyio
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


# -- silence: a worker delivering a large frame is not hung; one that stopped is ----------------


async def _no_fate(w: int) -> str:
    return ""  # (the exit status of a worker that is no process)


def _one_worker(conn: Any, timeout: float) -> tuple[Any, Any]:
    """A cluster of one worker whose connection is ``conn``, and a run, as ``_read_worker``
    reads them. ``heartbeat_timeout`` is set below what a cluster takes (1 s), so that a frame
    delivered in about a second stands for one that takes longer than the timeout."""
    cluster = types.SimpleNamespace(
        connections={0: conn}, heartbeat_timeout=timeout, _fate=lambda w: "",
        _fate_soon=_no_fate, describe_worker=lambda w, hosted: f"worker {w} (hosting "
        f"{', '.join(hosted)})",
    )  # fmt: skip
    return cluster, types.SimpleNamespace(results={}, worker_traces={})


def _result(nbytes: int) -> tuple[dict[str, Any], list[Any]]:
    """A worker's end-of-run frame carrying ``nbytes`` of weights of a layer 'big'."""
    from asyncnn._cluster._codec import encode_state
    from asyncnn._runtime._state import RunState

    w = np.arange(nbytes // 4, dtype=np.float32)
    out: list[Any] = []
    state = RunState(params={"big": {"w": w}}, opt_states={"big": {}}, versions={"big": 3},
                     minibatches=0, keys=0)  # fmt: skip
    return {"t": "result", **encode_state(state, out), "stats": {}}, out


@pytest.mark.anyio
async def test_a_frame_whose_bytes_keep_coming_is_no_silence_but_a_stop_mid_frame_is(
    anyio_backend: str,
) -> None:
    # The driver's deadline ran over the receive of a whole frame: a large result taking
    # longer than heartbeat_timeout to arrive (a slow link) was reported as a hung worker.
    # Silence is now measured by bytes arriving; a worker that stops mid-frame is still caught.
    from asyncnn._cluster._driver import _read_worker
    from asyncnn._cluster._wire import Connection, frame_head

    header, out = _result(4 << 20)
    wire = frame_head(header, [b.nbytes for b in out]) + b"".join(b.tobytes() for b in out)
    for stop in (False, True):
        ours, theirs = socket.socketpair()
        conn = Connection(ours, "worker 0")
        cluster, run = _one_worker(conn, 0.3)
        resume = threading.Event()

        def deliver(
            theirs: socket.socket = theirs, stop: bool = stop, resume: threading.Event = resume
        ) -> None:
            # eight pieces 0.1 s apart: 0.8 s for the frame, the timeout 0.3 s; or the first
            # half, then nothing (a stopped worker)
            pieces = np.array_split(np.frombuffer(wire, np.uint8), 8)
            for i, piece in enumerate(pieces):
                if stop and i == 4:
                    resume.wait(5)
                    return
                try:
                    theirs.sendall(piece.tobytes())
                except OSError:  # (the reader gave up)
                    return
                time.sleep(0.1)

        sender = threading.Thread(target=deliver)
        sender.start()
        try:
            start = time.perf_counter()
            if stop:
                with pytest.raises(ann.WorkerError, match=r"worker 0 .* sent nothing for 0.3 s"):
                    await _read_worker(cluster, run, 0, ["big"])
                assert time.perf_counter() - start < 3
            else:
                await _read_worker(cluster, run, 0, ["big"])
                got = run.results[0]["params"]["big"]["w"]
                assert got.tobytes() == out[0].tobytes()
        finally:
            resume.set()
            conn.close()
            sender.join()
            theirs.close()


@pytest.mark.anyio
async def test_a_worker_making_a_large_slab_pulses_and_is_not_taken_for_hung(
    anyio_backend: str, monkeypatch: Any
) -> None:
    # A fresh 1 GiB slab took 0.8 to 3.8 s to allocate and map on the 2-core VM, in which the
    # sender sends no byte (and its heartbeats wait behind the send): its end-of-run result
    # through shared memory was reported as a hung worker. The sender's channels now pulse
    # during such a step. Here the sender (its own event loop in a thread, as a worker
    # process) makes its slab in 0.7 s; the driver's watch, with a timeout of 0.3 s, must see
    # the pulse.
    from asyncnn._cluster import _shm
    from asyncnn._cluster._driver import _read_worker

    if not _shm.supported():
        pytest.skip("shared memory needs Linux on x86-64")
    make = _shm._create

    def slow_create(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.7)  # (releases the GIL, as allocating the pages does)
        return make(*args, **kwargs)

    monkeypatch.setattr(_shm, "_create", slow_create)
    header, out = _result(9 << 20)  # a send that holds the pulse (8 MB or more)
    sa, sb = socket.socketpair()
    ca, cb = _shm.Channel(), _shm.Channel()
    worker = _shm.ShmConnection(sa, "driver", 1 << 30, ca, cb.describe())
    driver = _shm.ShmConnection(sb, "worker 0", 1 << 30, cb, ca.describe())
    cluster, run = _one_worker(driver, 0.3)

    async def send() -> None:
        worker.new_loop()  # (its lock belongs to this thread's loop)
        await worker.send(header, out)

    sender = threading.Thread(target=anyio.run, args=(send,), kwargs={"backend": anyio_backend})
    try:
        sender.start()
        await _read_worker(cluster, run, 0, ["big"])
        assert run.results[0]["params"]["big"]["w"].tobytes() == out[0].tobytes()
    finally:
        sender.join()
        run.results.clear()
        worker.close()
        driver.close()
    pulse = _shm.PULSE._thread
    if pulse is not None:  # (it leaves a tick after the last send let go)
        await anyio.to_thread.run_sync(pulse.join, 2)
    assert _shm.PULSE._thread is None  # the pulse's thread left once no send held it


@pytest.mark.anyio
async def test_a_worker_that_stops_reading_its_share_is_caught_though_the_share_is_large(
    anyio_backend: str, monkeypatch: Any
) -> None:
    # The pulse (a sign of life of a process making a large slab) was held over the whole of a
    # large send, the wait for the peer to read included: the driver's own pulse then counted
    # as progress of its share's send, and a worker that stopped reading it was never caught
    # (a fit hung). The pulse now ticks only during the sender's own work.
    from asyncnn._cluster import _shm
    from asyncnn._errors import WorkerError

    if not _shm.supported():
        pytest.skip("shared memory needs Linux on x86-64")
    sa, sb = socket.socketpair()
    ca, cb = _shm.Channel(), _shm.Channel()
    # a slab budget below the share's size: it goes over the socket, which nobody reads
    driver = _shm.ShmConnection(sa, "worker 0", 1 << 30, ca, cb.describe(), slab_bytes=1 << 20)
    worker = _shm.ShmConnection(sb, "driver", 1 << 30, cb, ca.describe())  # (stopped: no reads)

    async def died(cluster: Any, w: int, hosted: Any, exc: BaseException, **_: Any) -> Exception:
        return WorkerError(w, hosted, f"died: {exc}")

    monkeypatch.setattr(_driver, "_died", died)
    cluster = types.SimpleNamespace(
        connections={0: driver}, heartbeat_timeout=1.0,
        describe_worker=lambda w, hosted: f"worker {w}", _fate=lambda w: "",
        _fate_soon=_no_fate,
    )  # fmt: skip
    try:
        with anyio.fail_after(10):
            with pytest.raises(WorkerError, match="took none of its share"):
                await _driver._send_share(
                    cluster, 0, ["s1"], {"t": "run"}, [np.zeros(16 << 20, np.uint8)]
                )
    finally:
        driver.close()
        worker.close()


# -- a failure read as the run is being cancelled is still the run's error ----------------------


class _ReportsThenCancels:
    """A worker's connection holding its error report, whose reading cancels ``scope``: the
    reader reads the report just as another worker's failure cancels every reader."""

    def __init__(self, report: dict[str, Any], scope: anyio.CancelScope) -> None:
        self.report, self.scope = report, scope
        self.unread: deque[Any] = deque()  # (what a LinkReader read ahead of it)

    def received_progress(self, peek: bool = True) -> int:
        return 0

    async def receive(self) -> tuple[dict[str, Any], list[Any]]:
        self.scope.cancel()
        return self.report, []


@pytest.mark.anyio
async def test_an_actor_failure_read_as_the_readers_are_cancelled_is_still_raised() -> None:
    # worker 1's actor failed and it reported that; worker 0, losing its link to worker 1,
    # reported the lost link, and the driver, reading that first, cancelled every reader.
    # Worker 1's reader had just read the report: it was dropped at its task group's exit
    # (where the cancellation lands), and the run said "worker 1 died" instead (about one
    # LocalCluster run in twenty, session 31)
    report = {"t": "error", "type": "ActorError", "message": "actor 'fails' failed",
              "traceback": "tb", "actor": "fails", "kind": "forward", "key": 1,
              "cause": "ZeroDivisionError: division by zero",
              "cause_class": ["builtins", "ZeroDivisionError"],
              "cause_message": "division by zero"}  # fmt: skip
    raised: list[BaseException] = []
    with anyio.CancelScope() as scope:
        cluster, run = _one_worker(_ReportsThenCancels(report, scope), 10.0)
        try:
            await _driver._read_worker(cluster, run, 0, ["fails"])
        except Exception as exc:  # noqa: BLE001 - the test looks at what came out
            raised.append(exc)
    assert raised, "the reader dropped the worker's report (it was cancelled as it left)"
    (err,) = raised
    assert isinstance(err, ann.ActorError) and err.actor == "fails"
    assert isinstance(err.__cause__, ZeroDivisionError)


class _Frames:
    """A worker's connection that holds ``frames``, then is closed by the worker."""

    def __init__(self, *frames: tuple[dict[str, Any], list[Any]]) -> None:
        self.frames = list(frames)
        self.unread: deque[Any] = deque()  # (what a LinkReader read ahead of it)

    def received_progress(self, peek: bool = True) -> int:
        return 0

    async def receive(self) -> tuple[dict[str, Any], list[Any]]:
        if not self.frames:
            raise EOFError("worker 0 closed the connection")
        return self.frames.pop(0)


@pytest.mark.anyio
@pytest.mark.parametrize("events", ["sent", "lost"])
async def test_an_error_report_comes_before_the_workers_events_which_may_not_follow(
    anyio_backend: str, events: str
) -> None:
    # the report rode with the worker's events in one frame: one too large to go in time was
    # lost whole, and the run said "worker 0 died". The report now goes first; the events
    # follow in a frame of their own, and where they never come the report is still the error
    from asyncnn._cluster._driver_read import DroppedTrace

    report = {"t": "error", "type": "ActorError", "message": "actor 'fails' failed",
              "traceback": "tb", "actor": "fails", "kind": "forward", "key": 1,
              "cause": "ZeroDivisionError: division by zero",
              "cause_class": ["builtins", "ZeroDivisionError"],
              "cause_message": "division by zero", "trace_follows": True}  # fmt: skip
    trace = np.frombuffer(b"the worker's events", np.uint8)
    conn = _Frames(
        (report, []), *([({"t": "trace", "trace": 0}, [trace])] if events == "sent" else [])
    )
    cluster, run = _one_worker(conn, 10.0)
    with anyio.fail_after(5), pytest.raises(ann.ActorError) as info:
        await _driver._read_worker(cluster, run, 0, ["fails"])
    assert info.value.actor == "fails" and isinstance(info.value.__cause__, ZeroDivisionError)
    kept = run.worker_traces[0]
    if events == "sent":
        assert bytes(kept) == b"the worker's events"
    else:
        assert isinstance(kept, DroppedTrace) and "did not come" in kept.reason


@pytest.mark.anyio
@pytest.mark.parametrize("before", [0, 1])
async def test_a_worker_that_dies_before_it_sent_anything_is_said_to_die_as_the_run_starts(
    anyio_backend: str, before: int
) -> None:
    # a worker killed in the moment before a fit (its death not yet seen when the fit started)
    # was said to have "died during the run ... its actors' work is lost"
    beat = {"t": "hb", "age": 0.0, "describe": {}}
    cluster, run = _one_worker(_Frames(*[(beat, [])] * before), 10.0)
    run.last_event, run.actors = 0.0, {}
    with anyio.fail_after(5), pytest.raises(ann.WorkerError) as info:
        await _driver._read_worker(cluster, run, 0, ["s1"])
    said = str(info.value)
    assert ("as the run started" in said) == (before == 0)
    assert ("died during the run" in said) == (before == 1)
