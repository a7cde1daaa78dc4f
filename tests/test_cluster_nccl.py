"""NCCL links between processes: which links a run needs, the frame that announces a transfer,
and (on GPU machines) a run whose GPU tensors travel over NCCL."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import numpy as np
import pytest

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._cluster._codec import announce_message
from asyncnn._cluster._nccl import plan_links
from asyncnn._cluster._remote import RemoteActor, deliver
from asyncnn._cluster._wire import Connection
from asyncnn._runtime._messages import Message

from _reference import assert_params_close

pytestmark = pytest.mark.timeout(120)


def pair() -> tuple[Connection, Connection]:
    a, b = socket.socketpair()
    return Connection(a, "peer a"), Connection(b, "peer b")


def gpu_chain(workers: list[Any], devices: list[str]) -> ann.Graph:
    g = ann.Graph()
    x = g.input("x", shape=(None, 12))
    y = g.input("y", shape=(None,), dtype="int64")
    h = x
    for i, (w, d) in enumerate(zip(workers, devices, strict=True)):
        last = i == len(workers) - 1
        mod = nn.Linear(12 if i == 0 else 16, 4 if last else 16)
        h = g.layer(f"s{i}", mod if last else nn.Sequential(mod, nn.Tanh()), h, worker=w,
                    device=d)  # fmt: skip
    g.loss("loss", nn.CrossEntropyLoss(), h, y)
    return g


def test_the_links_a_run_needs() -> None:
    g = gpu_chain([0, 1, None], ["cuda:0", "cuda:1", "cpu"])
    where = {"s0": 0, "s1": 1, "s2": None, "loss": None}
    # s0 -> s1 crosses processes between GPUs (both ways: forward and gradient); s1 -> s2 ends on
    # the CPU, so it goes through the host; the driver's loss sits beside s2
    assert plan_links(g, where) == [(0, "cuda:0", 1, "cuda:1"), (1, "cuda:1", 0, "cuda:0")]
    where_same = {"s0": 0, "s1": 0, "s2": None, "loss": None}
    assert plan_links(g, where_same) == []
    g2 = gpu_chain([0, None, None], ["cuda:0", "cuda:0", "cuda:0"])
    assert plan_links(g2, {"s0": 0, "s1": None, "s2": None, "loss": None}) == [
        (-1, "cuda:0", 0, "cuda:0"), (0, "cuda:0", -1, "cuda:0"),
    ]  # fmt: skip


class _Cuda(np.ndarray):
    """A host array that says it lives on a GPU (so the sender picks the NCCL path)."""

    __cuda_array_interface__: dict[str, Any] = {}


class _FakeLink:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.frames_before_send: list[int] = []
        self.conn: Any = None

    def send(self, tensors: list[Any], after: Any) -> None:
        self.frames_before_send.append(self.conn.bytes_sent)
        self.sent.append([None if t is None else np.asarray(t) for t in tensors])

    def receive(self, descs: list[Any]) -> tuple[list[Any], Any]:
        got = self.sent.pop(0)
        assert [None if t is None else [t.dtype.str, list(t.shape)] for t in got] == descs
        return got, "event"


class _FakeLinks:
    def __init__(self, link: _FakeLink) -> None:
        self.link = link

    def outgoing(self, src_dev: str, dst: int, dst_dev: str) -> Any:
        return self.link

    def incoming(self, src: int, src_dev: str, dst_dev: str) -> Any:
        return self.link


class _Run:
    def __init__(self, graph: ann.Graph, links: Any, local: dict[str, Any]) -> None:
        self.graph = graph
        self.nccl = links
        self.local = local
        self.pool = None


@pytest.mark.anyio
async def test_an_nccl_transfer_is_announced_by_its_frame_and_issued_after_it(
    anyio_backend: str,
) -> None:
    g = gpu_chain([0, 1, None], ["cuda:0", "cuda:1", "cpu"])
    a, b = pair()
    link = _FakeLink()
    link.conn = a
    received: list[Message] = []

    class _Inbox:
        async def send(self, msg: Message) -> None:
            received.append(msg)

    class _Actor:
        send_channel = _Inbox()

    sender = RemoteActor("s1", a, _Run(g, _FakeLinks(link), {}), 1)  # type: ignore[arg-type]
    t = np.arange(6, dtype=np.float32).reshape(2, 3).view(_Cuda)
    msg = Message("forward", 3, 1, "s0", "s1", 0, (t,), {"rows": 2})
    async with anyio.create_task_group() as tg:
        tg.start_soon(sender.send, msg)
        header, buffers = await b.receive()
    assert header["g"] == [["<f4", [2, 3]]] and buffers == []  # announced, not carried
    assert link.frames_before_send == [a.bytes_sent]  # the transfer starts after the frame
    run = _Run(g, _FakeLinks(link), {"s1": _Actor()})
    await deliver(run, header, buffers, b, 0)  # type: ignore[arg-type]
    (got,) = received
    assert got.event == "event" and got.key == 3
    np.testing.assert_array_equal(got.tensors[0], np.arange(6, dtype=np.float32).reshape(2, 3))
    # a frame that announces NCCL tensors where the run has no link is refused
    with pytest.raises(ann.cluster.ProtocolError, match="no NCCL link"):
        await deliver(_Run(g, None, {"s1": _Actor()}), header, [], b, 0)  # type: ignore[arg-type]
    a.close()
    b.close()


def test_announce_message_describes_every_tensor() -> None:
    msg = Message("backward", 1, 0, "s1", "s0", 0, (np.zeros((4, 2), np.float16), None))
    header = announce_message(msg)
    assert header["g"] == [["<f2", [4, 2]], None] and header["x"] == []


def test_nccl_without_cupy_in_the_driver_is_a_clear_error() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cupy is installed here: the error is for drivers without it")
    g = gpu_chain([0, 1, None], ["cuda:0", "cuda:0", "cpu"])
    with ann.cluster.LocalCluster(workers=2, nccl=True) as cluster:
        tr = ann.Trainer(g, optimizer=optim.SGD(lr=0.1), policy=policies.Sync(), cluster=cluster)
        with pytest.raises(RuntimeError, match="nccl=True.*cannot load cupy's NCCL"):
            tr.fit({"x": np.zeros((8, 12), np.float32), "y": np.zeros(8, np.int64)}, batch_size=8)


@pytest.mark.gpu
def test_gpu_tensors_between_workers_over_nccl_match_one_process() -> None:
    pytest.importorskip("cupy")
    from conftest import HAS_CUDA

    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    import cupy

    gpus = cupy.cuda.runtime.getDeviceCount()
    devices = ["cuda:0", f"cuda:{min(1, gpus - 1)}", "cuda:0"]
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(64, 12)).astype(np.float32), "y": rng.integers(0, 4, 64)}
    policy = policies.OneFOneB(microbatches=4)
    one = ann.Trainer(gpu_chain([None] * 3, devices), optimizer=optim.SGD(lr=0.1), policy=policy)
    one.fit(data, epochs=2, batch_size=32)
    with ann.cluster.LocalCluster(workers=2, nccl=True) as cluster:
        tr = ann.Trainer(gpu_chain([0, 1, None], devices), optimizer=optim.SGD(lr=0.1),
                         policy=policy, cluster=cluster)  # fmt: skip
        try:
            tr.fit(data, epochs=2, batch_size=32)
        except (ann.WorkerError, RuntimeError) as exc:
            text = f"{exc} {exc.__cause__}"
            if gpus < 2 and ("Duplicate GPU" in text or "invalid usage" in text.lower()):
                pytest.skip(f"NCCL refuses two processes on one GPU: {text[:200]}")
            raise
    assert_params_close(one.params, tr.params, rtol=1e-5, atol=1e-7)
