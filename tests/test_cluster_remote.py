"""What a cluster's processes tell the scheduler: a worker's reports (a layer's backward done, a
key's loss) riding with backward messages (``_remote``), batched by the worker's forwarder
(``_worker.Reports``) and read by the driver (``_driver``)."""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies

pytestmark = pytest.mark.timeout(90)


class _FramesFrom:
    """A worker's connection as the driver reads it: the given frames, then silence."""

    def __init__(self, frames: list[dict[str, Any]]) -> None:
        self.frames = list(frames)
        self.closed = False
        self.unread: deque[Any] = deque()  # (what a LinkReader read ahead of it)

    async def receive(self) -> tuple[dict[str, Any], list[Any]]:
        if not self.frames:
            await anyio.sleep_forever()
        return self.frames.pop(0), []

    def received_progress(self, peek: bool = True) -> int:
        return -len(self.frames)  # (grows as frames are taken)

    def close(self) -> None:
        self.closed = True


@pytest.mark.anyio
async def test_the_driver_takes_reports_alone_or_several_in_one_frame(anyio_backend: str) -> None:
    from asyncnn._cluster._driver import _read_worker

    reports: list[Any] = []
    run = dataclasses.make_dataclass("FakeRun", [])()
    run.backward_done = lambda actor, key: reports.append(("done", actor, key))
    run.loss_reported = lambda key, value, meta: reports.append(("loss", key, value, meta))
    meta = {"rows": 4, "mb_rows": 4, "mb_keys": 1, "minibatch": 0}
    conn = _FramesFrom([
        {"t": "done", "a": "l2", "key": 0},
        {"t": "ctl", "frames": [
            {"t": "loss", "key": 0, "value": 1.5, "m": meta}, {"t": "done", "a": "l1", "key": 0},
        ]},
        {"t": "ctl", "frames": [{"t": "hb", "age": 0.0, "describe": {}}]},  # not a report
    ])  # fmt: skip
    cluster = dataclasses.make_dataclass("FakeCluster", [])()
    cluster.connections = {1: conn}
    cluster.heartbeat_timeout = 5.0
    cluster.describe_worker = lambda w, hosted: f"worker {w} ({', '.join(hosted)})"
    with pytest.raises(ann.WorkerError, match=r"worker 1 \(l1, l2\) sent a malformed 'ctl' frame"):
        await _read_worker(cluster, run, 1, ["l1", "l2"])
    assert reports == [("done", "l2", 0), ("loss", 0, 1.5, meta), ("done", "l1", 0)]
    assert conn.closed


class _FramesTo:
    """A connection that keeps the frames sent on it."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], list[Any]]] = []
        self.peer = "a test peer"
        self.closed = False

    async def send(self, header: dict[str, Any], buffers: Any = (), then: Any = None) -> None:
        self.sent.append((header, list(buffers)))

    def close(self) -> None:
        self.closed = True


@pytest.mark.anyio
async def test_a_workers_reports_go_out_together_when_its_loop_gets_to_them(
    anyio_backend: str,
) -> None:
    from asyncnn._cluster._worker import Reports

    reports, driver = Reports(), _FramesTo()
    done = {"t": "done", "a": "l0", "key": 0}
    loss = {"t": "loss", "key": 0, "value": 1.0, "m": {}}
    async with anyio.create_task_group() as tg:
        tg.start_soon(reports.forward, driver)
        await anyio.sleep(0.01)
        reports.add([done])
        await anyio.sleep(0.01)
        reports.add([loss])
        reports.add([done])  # before the forwarder runs: one frame for both
        await anyio.sleep(0.01)
        reports.add([loss])
        reports.close()  # what is pending still goes, then the forwarder returns
    assert [h for h, _ in driver.sent] == [
        done, {"t": "ctl", "frames": [loss, done]}, loss,
    ]  # fmt: skip


def test_reading_a_remote_actors_state_says_where_it_is_and_where_it_is_known() -> None:
    # (getting_started's open_run example reads run.actors[name].version: on a cluster that was
    # a bare "'RemoteActor' object has no attribute 'version'")
    from asyncnn._cluster._remote import RemoteActor

    actor = RemoteActor("s1", _FramesTo(), None, 1)  # type: ignore[arg-type]
    for attribute in ("version", "params", "opt_state"):
        with pytest.raises(AttributeError, match=r"run.state\(\)") as e:
            getattr(actor, attribute)
        text = str(e.value)
        assert f"run.actors['s1'].{attribute}" in text and "worker 1" in text
        assert "after the open_run block" in text
    with pytest.raises(AttributeError, match="has no attribute 'vresion'.*name, worker"):
        actor.vresion  # noqa: B018 - any other name says what a stand-in has
    assert not hasattr(actor, "__deepcopy__")  # (protocol lookups find nothing, as before)
    assert actor.name == "s1" and actor.worker == 1


@pytest.mark.anyio
async def test_backward_messages_carry_the_pending_reports_and_deliver_passes_them_on(
    anyio_backend: str,
) -> None:
    from asyncnn._cluster._remote import ClusterRun, RemoteActor, deliver
    from asyncnn._runtime._messages import BACKWARD, FORWARD, Message

    pending = [{"t": "done", "a": "l2", "key": 3}]
    sender = dataclasses.make_dataclass("FakeWorkerRun", [])()
    sender.take_reports = lambda: [pending.pop()] if pending else []
    conn = _FramesTo()
    actor = RemoteActor("l1", conn, sender, 1)  # type: ignore[arg-type]
    grad = np.ones((2, 3), dtype=np.float32)
    await actor.send(Message(FORWARD, 3, 0, "l0", "l1", 0, (grad,), {"rows": 2}))
    await actor.send(Message(BACKWARD, 3, 0, "l2", "l1", 0, (grad,), {"rows": 2}))
    await actor.send(Message(BACKWARD, 4, 0, "l2", "l1", 0, (grad,), {"rows": 2}))
    headers = [h for h, _ in conn.sent]
    assert ["r" in h for h in headers] == [False, True, False]  # taken once, by a backward
    assert headers[1]["r"] == [{"t": "done", "a": "l2", "key": 3}]

    got: list[Any] = []
    inbox = dataclasses.make_dataclass("FakeInbox", [])()

    async def put(msg: Any) -> None:
        got.append(msg)

    inbox.send = put
    local = dataclasses.make_dataclass("FakeActor", [])()
    local.send_channel = inbox
    worker = dataclasses.make_dataclass("FakeWorkerRun", [])()  # passes them on
    worker.local, passed = {"l1": local}, []
    worker.add_reports = passed.extend
    driver = dataclasses.make_dataclass("FakeDriverRun", [])()  # applies them
    driver.local, applied = {"l1": local}, []
    driver.backward_done = lambda a, k: applied.append((a, k))
    driver.add_reports = lambda frames: ClusterRun.add_reports(driver, frames)
    header, buffers = conn.sent[1]
    await deliver(worker, header, [np.asarray(b) for b in buffers], _FramesTo(), 2)
    await deliver(driver, header, [np.asarray(b) for b in buffers], _FramesTo(), 2)
    assert passed == [{"t": "done", "a": "l2", "key": 3}] and applied == [("l2", 3)]
    assert len(got) == 2 and got[0].key == 3 and got[0].kind == BACKWARD
    bad = _FramesTo()
    with pytest.raises(ann.cluster.ProtocolError, match="'r' is not a list of 'done' and 'loss'"):
        await deliver(worker, {**header, "r": [{"t": "hb"}]}, buffers, bad, 2)
    assert bad.closed
    with pytest.raises(ann.cluster.ProtocolError, match="a malformed 'done' report"):
        await deliver(driver, {**header, "r": [{"t": "done", "key": 3}]}, buffers, bad, 2)


def _two_workers() -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 6))
    y = g.input("y", shape=(None,), dtype="int64")
    h = g.layer("s0", nn.Sequential(nn.Linear(6, 8), nn.Tanh()), x, worker=0)
    h = g.layer("s1", nn.Linear(8, 3), h, worker=1)
    g.loss("loss", nn.CrossEntropyLoss(), h, y, worker=1)
    return g


def test_an_error_of_the_loss_callback_is_its_own_not_the_workers() -> None:
    # the loss is computed on a worker and reaches the driver's scheduler as a report: what the
    # user's callback raises must come back as it is, not as the worker breaking the protocol
    def on_loss(minibatch: int, loss: float, rows: int) -> None:
        raise ValueError("the callback's own bug")

    async def main() -> None:
        with ann.cluster.LocalCluster(workers=2) as cluster:
            async with ann.open_run(
                _two_workers(), optim.SGD(lr=0.1), policies.Sync(),
                cluster=cluster, on_loss=on_loss,
            ) as run:  # fmt: skip
                rng = np.random.default_rng(0)
                await run.step({"x": rng.normal(size=(16, 6)), "y": rng.integers(0, 3, 16)})
                await run.drain()

    with pytest.raises(BaseException) as info:
        anyio.run(main, backend="trio")
    text = repr(info.value) + repr(info.value.__cause__)
    assert "the callback's own bug" in text and "protocol" not in text


@pytest.mark.anyio
async def test_frames_read_ahead_by_a_reader_that_left_are_read_next_after_a_failed_run(
    anyio_backend: str,
) -> None:
    # the driver's reader of worker 0 handed a message to a driver's actor whose send to worker
    # 0 waited (the link full), reading on meanwhile: worker 0's error report. Cancelled then
    # (another worker's failure ends every reader), it dropped the report, and the gathering
    # of the traces after the failed run read the trace frame behind it, waited in vain for a
    # report (2 s), and the trace lacked worker 0's events
    import socket

    from asyncnn._cluster._codec import encode_message
    from asyncnn._cluster._driver_read import DroppedTrace, _gather_traces
    from asyncnn._cluster._remote import LinkReader
    from asyncnn._cluster._wire import Connection, send_waits
    from asyncnn._runtime._messages import FORWARD, Message

    sa, sb = socket.socketpair()
    worker, driver = Connection(sa, "the driver"), Connection(sb, "worker 0")
    grad = np.ones((2, 3), dtype=np.float32)
    await worker.send(*encode_message(Message(FORWARD, 3, 0, "a", "b", 0, (grad,), {})))
    await worker.send({"t": "error", "type": "ZeroDivisionError", "message": "boom",
                       "actor": "c", "trace_follows": True})  # fmt: skip
    await worker.send({"t": "trace", "trace": 0}, [np.frombuffer(b"its events", np.uint8)])

    class _Blocked:  # b's inbox: it takes the message in the reader's task, then its send waits
        async def send(self, msg: Any) -> None:
            send_waits()
            await anyio.sleep_forever()

    local = dataclasses.make_dataclass("FakeActor", [])()
    local.send_channel = _Blocked()
    run = dataclasses.make_dataclass("FakeDriverRun", [])()
    run.local = {"b": local}
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            reader = LinkReader(driver, tg)

            async def read() -> None:
                header, buffers = await reader.receive()
                await reader.deliver(run, header, buffers, 0)

            tg.start_soon(read)
            read_ahead = reader._ahead
            while not any(isinstance(f, tuple) and f[0]["t"] == "error" for f in read_ahead):  # noqa: ASYNC110 - a queue, no event
                await anyio.sleep(0.005)
            tg.cancel_scope.cancel()  # the run failed elsewhere
        cluster = dataclasses.make_dataclass("FakeCluster", [])()
        cluster.connections = {0: driver}
        traces: dict[int, Any] = {}
        await _gather_traces(cluster, traces, {None: ["b"], 0: ["a", "c"]})
    assert not isinstance(traces.get(0), DroppedTrace) and bytes(traces[0]) == b"its events"
    assert (await worker.receive())[0]["t"] == "abort"
    worker.close()
    driver.close()
