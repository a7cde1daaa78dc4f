"""Frames through shared memory (``_shm``): round trips on every path (ring, slab, socket), slab
reuse, a peer that writes garbage, the handshake's choice, and LocalCluster runs that go through
it and leave nothing behind."""

from __future__ import annotations

import gc
import os
import signal
import socket
import struct
import time
from typing import Any

import anyio
import anyio.lowlevel
import msgpack
import numpy as np
import pytest
from test_cluster import run_with_a_broken_frame

import asyncnn as ann
from asyncnn import nn, optim, policies
from asyncnn._cluster import _shm
from asyncnn._cluster._codec import decode_message, encode_message
from asyncnn._cluster._handshake import (
    accept,
    accept_socket,
    connect,
    listen,
)
from asyncnn._cluster._shm import _PREFIX, _R, _REL, _W, Channel, ShmConnection
from asyncnn._cluster._shm_memory import _DROP, _INLINE, _NEWSLAB, _SLAB, _align
from asyncnn._cluster._wire import (
    Connection,
    ProtocolError,
)
from asyncnn._runtime._messages import Message

from _reference import assert_params_equal

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not _shm.supported(), reason="shared memory needs Linux on x86-64"),
]


def pair(limit: int = 1 << 30, slab_bytes: int = _shm.DEFAULT_SLAB_BYTES) -> tuple[Any, Any]:
    sa, sb = socket.socketpair()
    ca, cb = Channel(), Channel()
    a = ShmConnection(sa, "peer a", limit, ca, cb.describe(), slab_bytes)
    b = ShmConnection(sb, "peer b", limit, cb, ca.describe(), slab_bytes)
    return a, b


def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.zeros((0, 5), dtype=np.float64),
        rng.normal(size=(1 << 18,)).astype(np.float32),  # 1 MB: a slab
        np.array([1, -2, 3], dtype=np.int64),
    ]


def same(buffers: list[np.ndarray], sent: list[np.ndarray]) -> None:
    assert [b.nbytes for b in buffers] == [x.nbytes for x in sent]
    for x, buf in zip(sent, buffers, strict=True):
        np.testing.assert_array_equal(buf.view(x.dtype).reshape(x.shape), x)


@pytest.mark.anyio
async def test_tiny_large_and_oversized_frames_round_trip(anyio_backend: str) -> None:
    a, b = pair(slab_bytes=4 << 20)
    sent = arrays()
    huge = np.ones(6 << 20, dtype=np.uint8)  # beyond the 4 MB slab budget: over the socket
    big_header = {"t": "x", "blob": "y" * 600_000}  # more than half the ring: over the socket
    async with anyio.create_task_group() as tg:

        async def sender() -> None:
            await a.send({"t": "tiny"}, [np.float32([1, 2])])
            await a.send({"t": "many"}, sent)
            await a.send({"t": "huge"}, [huge])
            await a.send(big_header, [np.int8([5])])
            await a.send({"t": "last"})

        tg.start_soon(sender)
        got = [await b.receive() for _ in range(5)]
    assert [h["t"] for h, _ in got] == ["tiny", "many", "huge", "x", "last"]
    same(got[0][1], [np.float32([1, 2])])
    same(got[1][1], sent)
    same(got[2][1], [huge])
    assert got[3][0]["blob"] == big_header["blob"]
    same(got[3][1], [np.int8([5])])
    assert a.counts == {"inline": 2, "slab": 1, "socket": 2}
    # the slab's bytes are read in place, writable like a fresh array
    assert got[1][1][2].flags.writeable
    a.close()
    b.close()


@pytest.mark.anyio
async def test_messages_of_every_dtype_and_layout_arrive_bit_for_bit(anyio_backend: str) -> None:
    a, b = pair(slab_bytes=1 << 20)
    rng = np.random.default_rng(1)
    big = rng.normal(size=(300, 600))  # 1.4 MB: views of it in a slab, itself over the socket
    sent = [
        rng.normal(size=(5, 7)).astype(np.float16), rng.integers(-(2**62), 2**62, 9),
        rng.integers(0, 2, (4, 4)).astype(bool), np.array(3.5), np.zeros((0, 5, 3)),
        big[::2, ::3], big[::-1].T[:, :200], big.astype(">f8")[:100], big,
    ]  # fmt: skip
    for i, x in enumerate(sent):
        header, buffers = encode_message(Message("forward", i, 0, "s0", "s1", 0, (x,), {}))
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.send, header, buffers)  # over the socket: sent while it is read
            got = decode_message(*(await b.receive())).tensors[0]
        assert (got.dtype, got.shape) == (x.dtype, x.shape)
        assert got.tobytes() == np.ascontiguousarray(x).tobytes()
    assert a.counts["inline"] and a.counts["slab"] and a.counts["socket"]
    a.close()
    b.close()


@pytest.mark.anyio
@pytest.mark.parametrize("size", [100, 1 << 17], ids=["ring", "slab"])
async def test_a_message_over_the_limit_is_refused_by_its_sender(
    anyio_backend: str, size: int
) -> None:
    a, b = pair(limit=size - 1)
    with pytest.raises(ValueError, match=r"'huge' frame carries .* over the limit.*max_message"):
        await a.send({"t": "huge"}, [np.zeros(size, np.uint8)])
    assert a.bytes_sent == 0  # nothing went out: the next frame is the next one read
    await a.send({"t": "next"}, [np.ones(8, np.uint8)])
    got, _ = await b.receive()
    assert got["t"] == "next"
    a.close()
    b.close()


@pytest.mark.anyio
async def test_a_slab_is_reused_once_its_arrays_are_gone_and_not_before(anyio_backend: str) -> None:
    a, b = pair()
    x = np.arange(1 << 18, dtype=np.float32)
    await a.send({"t": "1"}, [x])
    _, kept = await b.receive()  # held: the next message needs another slab
    await a.send({"t": "2"}, [x + 1])
    _, second = await b.receive()
    assert len(a.out.slabs) == 2
    np.testing.assert_array_equal(kept[0].view(np.float32), x)
    np.testing.assert_array_equal(second[0].view(np.float32), x + 1)
    del second
    gc.collect()
    for i in range(5):  # every later message reuses the freed slab
        await a.send({"t": "n"}, [x + i])
        _, got = await b.receive()
        np.testing.assert_array_equal(got[0].view(np.float32), x + i)
        del got
    assert len(a.out.slabs) == 2 and a.counts["slab"] == 7
    np.testing.assert_array_equal(kept[0].view(np.float32), x)  # never overwritten
    a.close()
    b.close()


@pytest.mark.anyio
async def test_a_large_tensor_is_copied_in_pieces_exactly(anyio_backend: str) -> None:
    a, b = pair()
    x = np.random.default_rng(2).integers(0, 255, (17 << 20) + 3, dtype=np.uint8)  # odd size
    await a.send({"t": "big"}, [np.int8([1]), x])
    _, got = await b.receive()
    assert got[0].tolist() == [1] and a.counts["slab"] == 1
    np.testing.assert_array_equal(got[1], x)
    a.close()
    b.close()


@pytest.mark.anyio
async def test_a_full_ring_makes_the_sender_wait_for_the_reader(anyio_backend: str) -> None:
    a, b = pair()
    payload = np.zeros(60_000, dtype=np.uint8)  # inline; about 17 fill the 1 MB ring
    n = 100

    async def sender() -> None:
        for i in range(n):
            await a.send({"i": i}, [payload])

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await anyio.sleep(0.05)
        assert a.out.pos - a.out.words[_R] <= a.out.ring_bytes  # waiting, not overwriting
        got = [(await b.receive())[0]["i"] for _ in range(n)]
    assert got == list(range(n))
    a.close()
    b.close()


# -- a failed run: a receive or a send cut short -------------------------------------------------
@pytest.mark.anyio
async def test_discard_after_a_receive_cut_in_a_frame_over_the_socket_drains_until_the_peer_hangs_up(
    anyio_backend: str,
) -> None:
    # a failed worker's reader of the driver, cancelled in the middle of a frame that went over
    # the socket (the slabs all busy), left bytes no record announced: discard() stopped at
    # once, the worker took that for the driver hanging up and exited, and the driver's blocked
    # send failed with "connection reset" ("worker 0 died", not the actor's error)
    a, b = pair(slab_bytes=1 << 20)
    big = np.ones(8 << 20, np.uint8)  # beyond the 1 MB slab budget: over the socket
    sent = anyio.Event()

    async def sender() -> None:
        await a.send({"t": "big"}, [big])
        await a.send({"t": "big"}, [big])
        await a.send({"t": "small"}, [np.ones(8, np.uint8)])
        for _ in range(3):  # each needs the last one's slab released (or goes by the socket)
            await a.send({"t": "slab"}, [np.ones(300_000, np.uint8)])
        sent.set()
        # everything read, and every slab it used given back
        while a.out.words[_R] != a.out.pos:  # noqa: ASYNC110 - shared memory, no event
            await anyio.sleep(0.001)
        assert all(a.out.words[_REL + i] == s[4] for i, s in a.out.slabs.items())
        a.close()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sender)
            with anyio.CancelScope() as cut:

                async def cut_once_started() -> None:
                    while b._arrived < 1 << 20:
                        await anyio.lowlevel.checkpoint()
                    cut.cancel()

                tg.start_soon(cut_once_started)
                await b.receive()
            assert cut.cancelled_caught and b._arrived < big.nbytes  # in the middle of it
            with pytest.raises(EOFError):
                await b.discard()
            assert sent.is_set()
    b.close()


def _fill_socket(a: ShmConnection) -> None:
    """Fills ``a``'s socket buffers with wake bytes (zeros, which the reader skips), as the tail
    of an earlier large frame does while the peer is slow to read."""
    while True:
        try:
            a.sock.send(b"\0" * 65536)
        except BlockingIOError:
            return


@pytest.mark.anyio
async def test_a_send_over_the_socket_cancelled_after_its_announcement_goes_out_before_the_next(
    anyio_backend: str,
) -> None:
    # the ring record announcing a frame over the socket was out, the frame's first byte not
    # (the socket full): cancelled there, the frame was dropped, and the peer waited for it
    # for ever, never reading the error report sent behind it
    a, b = pair(slab_bytes=1 << 20)
    _fill_socket(a)
    big = np.arange(4 << 20, dtype=np.uint8)  # beyond the 1 MB slab budget: over the socket
    with anyio.move_on_after(0.05) as scope:
        await a.send({"t": "big"}, [big])
    assert scope.cancelled_caught
    got: list[tuple[dict[str, Any], list[np.ndarray]]] = []

    async def read() -> None:
        for _ in range(2):
            got.append(await b.receive())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await a.send({"t": "error"})  # (a small one: first the rest of the frame cut short)
    assert [h["t"] for h, _ in got] == ["big", "error"]
    np.testing.assert_array_equal(got[0][1][0], big)
    assert not a.cut()
    a.close()
    b.close()


@pytest.mark.anyio
async def test_a_send_cancelled_before_its_announcement_leaves_nothing_behind(
    anyio_backend: str,
) -> None:
    a, b = pair(slab_bytes=1 << 20)
    # the ring full: a send over the socket waits for room for its announcement
    payload = np.zeros(60_000, np.uint8)
    packed = msgpack.packb({"t": "fill", "n": [payload.nbytes]}, use_bin_type=True)
    length = _align(_PREFIX.size + len(packed) + payload.nbytes)
    while a._room(length):
        a._put_inline(packed, [payload.data], length)
    while a._room(_PREFIX.size):
        a._put_control(_DROP, b"")
    with anyio.move_on_after(0.05) as scope:
        await a.send({"t": "big"}, [np.ones(4 << 20, np.uint8)])
    assert scope.cancelled_caught and not a.cut()
    async with anyio.create_task_group() as tg:

        async def drain() -> None:
            while True:
                header, _ = await b.receive()
                if header["t"] != "fill":
                    assert header["t"] == "next"
                    return

        tg.start_soon(drain)
        with anyio.fail_after(10):
            await a.send({"t": "next"})
    a.close()
    b.close()


@pytest.mark.anyio
async def test_a_sleeping_receiver_is_woken_and_learns_when_the_peer_is_gone(
    anyio_backend: str,
) -> None:
    a, b = pair()

    async def later() -> None:
        await anyio.sleep(0.2)  # long past any spinning: the receiver sleeps on the socket
        await a.send({"t": "late"})
        await anyio.sleep(0.2)
        a.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        with anyio.fail_after(10):
            header, _ = await b.receive()
            assert header["t"] == "late"
            with pytest.raises(EOFError):
                await b.receive()
    b.close()


def _send_and_exit(port: int, token: bytes) -> None:
    async def main() -> None:
        conn = await connect("127.0.0.1", port, token, {"role": "x"}, "parent", shm=True)
        await conn.send({"t": "last words"}, [np.arange(1 << 18, dtype=np.float32)])
        conn.close()  # waits until the parent has opened the slab, then exits

    anyio.run(main)


@pytest.mark.anyio
async def test_a_message_in_a_slab_outlives_the_process_that_sent_it(anyio_backend: str) -> None:
    import multiprocessing

    token = os.urandom(32)
    listener = listen()
    proc = multiprocessing.get_context("spawn").Process(
        target=_send_and_exit, args=(listener.getsockname()[1], token)
    )
    proc.start()
    try:
        with anyio.fail_after(30):
            conn, _ = await accept(await accept_socket(listener), token, shm=True)
            assert type(conn) is ShmConnection
            header, buffers = await conn.receive()
            await anyio.to_thread.run_sync(proc.join)  # gone before the bytes are looked at
            assert header["t"] == "last words"
            np.testing.assert_array_equal(
                buffers[0].view(np.float32), np.arange(1 << 18, dtype=np.float32)
            )
            with pytest.raises(EOFError):
                await conn.receive()
    finally:
        proc.join(10)
        listener.close()
    conn.close()


# -- a peer that writes garbage --------------------------------------------------------------------
def _inline(a: ShmConnection, header: dict[str, Any]) -> None:
    a._put_control(_INLINE, msgpack.packb(header))


def _write_position(a: ShmConnection) -> None:
    a.out.words[_W] = 10**12


def _bad_kind(a: ShmConnection) -> None:
    a._put_control(99, b"")


def _bad_length(a: ShmConnection) -> None:
    _PREFIX.pack_into(a.out.data, 0, 1 << 30, 1, 0, 0, 0)
    a._publish(64)


def _bad_header_length(a: ShmConnection) -> None:
    _PREFIX.pack_into(a.out.data, 0, 64, 1, 1 << 20, 0, 0)
    a._publish(64)


def _undecodable(a: ShmConnection) -> None:
    a._put_control(_INLINE, b"\xc1\xc1\xc1")


def _sizes_not_a_list(a: ShmConnection) -> None:
    _inline(a, {"t": "m", "n": "many"})


def _sizes_beyond_the_record(a: ShmConnection) -> None:
    _inline(a, {"t": "m", "n": [1 << 16]})


def _hundred_gb(a: ShmConnection) -> None:
    a._put_control(_SLAB, msgpack.packb({"t": "m", "n": [100 * 10**9]}))


def _unknown_slab(a: ShmConnection) -> None:
    a._put_control(_SLAB, msgpack.packb({"t": "m", "n": [1 << 20]}), slab=7)


def _slab_beyond_limit(a: ShmConnection) -> None:
    a._put_control(_NEWSLAB, struct.pack("<QQ", a.out.fd, 1 << 40), slab=3)


def _slab_not_a_memfd(a: ShmConnection) -> None:
    a._put_control(_NEWSLAB, struct.pack("<QQ", a.sock.fileno(), 1 << 20), slab=3)


def _slab_number(a: ShmConnection) -> None:
    a._put_control(_NEWSLAB, struct.pack("<QQ", a.out.fd, 1 << 20), slab=1000)


def _unannounced_bytes(a: ShmConnection) -> None:
    a.sock.send(b"ANN1garbage")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("write", "field"),
    [
        (_write_position, "'write position'"),
        (_bad_kind, "'kind' = 99"),
        (_bad_length, "'record length'"),
        (_bad_header_length, "'header length'"),
        (_undecodable, "undecodable header"),
        (_sizes_not_a_list, "'n' (buffer sizes)"),
        (_sizes_beyond_the_record, "'n' = [65536]"),
        (_hundred_gb, "100,000,000,000 bytes"),
        (_unknown_slab, "'slab' = 7"),
        (_slab_beyond_limit, "'size' = 1,099,511,627,776"),
        (_slab_not_a_memfd, "not asyncnn shared memory"),
        (_slab_number, "'slab' = 1000"),
        (_unannounced_bytes, "no record announced"),
    ],
)
async def test_a_peer_writing_garbage_gets_an_error_naming_the_field(
    anyio_backend: str, write: Any, field: str
) -> None:
    a, b = pair(limit=1 << 30)
    write(a)
    with anyio.fail_after(10), pytest.raises(ProtocolError) as info:
        await b.receive()
    assert field in str(info.value) and b.peer in str(info.value)
    with pytest.raises(ProtocolError):  # and it stays broken
        await b.receive()
    a.close()
    b.close()


# -- the handshake -----------------------------------------------------------------------------------
async def _handshake(connect_shm: bool, accept_shm: bool, **hello: Any) -> tuple[Any, Any]:
    token = os.urandom(32)
    listener = listen()
    port = listener.getsockname()[1]
    got: dict[str, Any] = {}

    async def server() -> None:
        sock = await accept_socket(listener)
        got["conn"], got["hello"] = await accept(sock, token, shm=accept_shm)

    async with anyio.create_task_group() as tg:
        tg.start_soon(server)
        conn = await connect("127.0.0.1", port, token, {"role": "x", **hello}, "it",
                             shm=connect_shm)  # fmt: skip
    listener.close()
    assert got["hello"] == {"role": "x", **hello}  # the offer is not the caller's business
    return conn, got["conn"]


@pytest.mark.anyio
@pytest.mark.parametrize(("ours", "theirs"), [(True, True), (True, False), (False, True)])
async def test_shared_memory_only_when_both_ends_offer_it(
    anyio_backend: str, ours: bool, theirs: bool
) -> None:
    a, b = await _handshake(ours, theirs)
    kind = ShmConnection if ours and theirs else Connection
    assert type(a) is kind and type(b) is kind
    await a.send({"t": "hi"}, [np.arange(3)])
    header, buffers = await b.receive()
    assert header["t"] == "hi" and buffers[0].view(np.int64).tolist() == [0, 1, 2]
    a.close()
    b.close()


@pytest.mark.anyio
async def test_a_peer_on_another_host_gets_tcp(anyio_backend: str, monkeypatch: Any) -> None:
    real = _shm.boot_id()
    # the connecting side reads another boot id (another host's kernel), the accepting side its own
    ids = iter(["another host", real])
    monkeypatch.setattr(_shm, "boot_id", lambda: next(ids, real))
    a, b = await _handshake(True, True)
    assert type(a) is Connection and type(b) is Connection
    a.close()
    b.close()


def test_the_environment_turns_it_on_and_off(monkeypatch: Any) -> None:
    monkeypatch.setenv(_shm.ENV, "1")
    assert _shm.enabled() and not _shm.enabled(False)
    monkeypatch.setenv(_shm.ENV, "0")
    assert not _shm.enabled() and _shm.enabled(True)
    monkeypatch.delenv(_shm.ENV)
    assert not _shm.enabled()


def test_a_ring_description_is_checked_field_by_field() -> None:
    from asyncnn._cluster._handshake import _ring_of

    with pytest.raises(ProtocolError, match="'ring'"):
        _ring_of({"pid": 1, "fd": 3, "ring": 1 << 40})
    with pytest.raises(ProtocolError, match="'pid'"):
        _ring_of({"pid": "me", "fd": 3, "ring": 1 << 20})
    with pytest.raises(ProtocolError, match="not a map"):
        _ring_of([1, 2, 3])


# -- LocalCluster ----------------------------------------------------------------------------------
def chain(workers: list[int | None], width: int = 16) -> ann.Graph:
    w = width
    return ann.Graph.sequential(
        [nn.Linear(12, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 4)],
        loss=nn.CrossEntropyLoss(), stages=[2, 2, 1], input_shape=(None, 12), workers=workers,
    )  # fmt: skip


def data(n: int = 256) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.normal(size=(n, 12)).astype(np.float32), "y": rng.integers(0, 4, size=n)}


def memfds(collect: bool = True) -> set[str]:
    """This process's open asyncnn memfds (as /proc names them), once unreachable objects are
    collected unless told not to (a mapping holds its memfd until it goes)."""
    if collect:
        gc.collect()
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:asyncnn"):
            out.add(f"{fd} {target}")
    return out


def mapped() -> set[str]:
    """This process's mappings of asyncnn memfds (address range and name, as /proc says)."""
    with open("/proc/self/maps") as f:
        return {f"{line.split()[0]} {line.split()[5]}" for line in f if "/memfd:asyncnn" in line}


@pytest.mark.anyio
async def test_closing_a_connection_unmaps_its_memory_and_closes_its_fds_at_once(
    anyio_backend: str,
) -> None:
    fds_before = memfds()
    maps_before = mapped()
    gc.disable()  # what close releases must not wait for a collection
    try:
        a, b = pair()
        x = np.arange(1 << 18, dtype=np.float32)
        await a.send({"t": "slab"}, [x])
        await a.send({"t": "inline"}, [x[:4]])
        _, kept = await b.receive()  # read in place from a's slab
        _, small = await b.receive()
        assert len(mapped() - maps_before) == 6  # both rings on both sides, the slab on both
        a.close()
        b.close()
        # what is left: the mapping of the slab that the kept array views (with the fd that
        # Python's mmap holds), until that array goes
        assert [m.split()[1] for m in mapped() - maps_before] == ["/memfd:asyncnn-slab0"]
        assert [f.split()[1] for f in memfds(collect=False) - fds_before] == [
            "/memfd:asyncnn-slab0"
        ]
        np.testing.assert_array_equal(kept[0].view(np.float32), x)
        del kept
        assert mapped() == maps_before
        assert memfds(collect=False) == fds_before
        np.testing.assert_array_equal(small[0].view(np.float32), x[:4])  # copied out: no mapping
        with pytest.raises(ConnectionError, match="closed"):
            await b.receive()
        with pytest.raises(ConnectionError, match="closed"):
            await a.send({"t": "late"}, [x])
        a.close()  # idempotent
    finally:
        gc.enable()


def test_a_local_cluster_runs_through_shared_memory_bit_identical_and_leaves_nothing() -> None:
    shm_before = set(os.listdir("/dev/shm"))
    fds_before = memfds()
    maps_before = mapped()
    # stage1's weights (160 x 160) come back in a slab, not inline
    one = ann.Trainer(chain([None] * 3, width=160), optimizer=optim.SGD(lr=0.1),
                      policy=policies.GPipe(4))  # fmt: skip
    one.fit(data(), epochs=2, batch_size=32)
    with ann.cluster.LocalCluster(workers=2) as cluster:
        tr = ann.Trainer(chain([0, 1, None], width=160), optimizer=optim.SGD(lr=0.1),
                         policy=policies.GPipe(4), cluster=cluster)  # fmt: skip
        tr.fit(data(), epochs=2, batch_size=32)
        assert all(type(c) is ShmConnection for c in cluster.connections.values())
        assert sum(c.counts["inline"] for c in cluster.connections.values()) > 0
        shm = [c for c in cluster.connections.values() if isinstance(c, ShmConnection)]
        assert sum(c.counts["slab"] for c in shm) > 0
    assert_params_equal(one.params, tr.params)
    # closed means released, with the trainer (the weights that came back) still alive and no
    # collection: the driver keeps its own copy of what the workers sent back
    assert mapped() <= maps_before
    assert memfds(collect=False) <= fds_before
    assert set(os.listdir("/dev/shm")) == shm_before


def test_shm_false_keeps_a_local_cluster_on_tcp() -> None:
    with pytest.raises(TypeError, match="shm"):
        ann.cluster.LocalCluster(workers=1, shm="yes")  # type: ignore[arg-type]
    with ann.cluster.LocalCluster(workers=2, shm=False) as cluster:
        tr = ann.Trainer(chain([0, 1, None]), optimizer=optim.SGD(lr=0.1),
                         policy=policies.Sync(), cluster=cluster)  # fmt: skip
        tr.fit(data(64), epochs=1, batch_size=32)
        assert all(type(c) is Connection for c in cluster.connections.values())


def _kill_a_worker_mid_run() -> str:
    big = data(4000)
    cluster = ann.cluster.LocalCluster(workers=2)
    tr = ann.Trainer(chain([0, 1, None]), optimizer=optim.SGD(lr=0.1),
                     policy=policies.GPipe(4), cluster=cluster)  # fmt: skip
    tr.fit(data(64), epochs=1, batch_size=32)  # workers up
    pid = cluster.pids[1]

    async def main() -> None:
        async with ann.open_run(
            tr.graph, tr.optimizer, tr.policy, cluster=cluster, state=tr.state
        ) as run:
            for i in range(0, 4000, 32):
                if i == 320:
                    os.kill(pid, signal.SIGKILL)
                await run.step({k: v[i : i + 32] for k, v in big.items()})

    try:
        anyio.run(main, backend="trio")
    except ann.WorkerError as exc:
        return str(exc)  # not the error itself: its traceback holds the connections
    finally:
        cluster.close()
    return "no error"


def test_a_killed_worker_fails_the_run_and_leaves_no_shared_memory() -> None:
    shm_before = set(os.listdir("/dev/shm"))
    fds_before = memfds()
    start = time.perf_counter()
    assert "worker 1" in _kill_a_worker_mid_run()
    assert time.perf_counter() - start < 30
    assert set(os.listdir("/dev/shm")) == shm_before
    assert memfds() <= fds_before


def test_a_frame_claiming_100_gb_through_shared_memory_is_refused_and_reported() -> None:
    async def claim(conn: Any) -> None:
        assert isinstance(conn, ShmConnection)
        conn._put_control(_INLINE, msgpack.packb({"t": "m", "n": [100 * 10**9]}))

    cluster = ann.cluster.LocalCluster(workers=2)
    text = run_with_a_broken_frame(cluster, chain([0, 1, None]), claim)
    assert "100,000,000,000 bytes" in text and "worker 1" in text
    cluster.close()


def test_a_malformed_spin_setting_is_refused_naming_it_where_shared_memory_is_set_up(
    monkeypatch: Any,
) -> None:
    # ASYNCNN_SHM_SPIN_US was parsed at import: '200us' broke `import asyncnn` for every program,
    # cluster or not, with a bare "could not convert string to float"; '-50' was taken silently
    import subprocess
    import sys

    env = {**os.environ, "ASYNCNN_SHM_SPIN_US": "200us"}
    done = subprocess.run(
        [sys.executable, "-c", "import asyncnn"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    for raw in ("200us", "abc", "-50", "inf", "nan", "1e9", "10001"):
        monkeypatch.setenv("ASYNCNN_SHM_SPIN_US", raw)
        with pytest.raises(
            ValueError,
            match=rf"^ASYNCNN_SHM_SPIN_US must be a number of microseconds from 0 to 10000 .*"
            rf"got '{raw}'",
        ):
            _shm.spin_seconds()
        sa, sb = socket.socketpair()
        ca, cb = Channel(), Channel()
        try:
            with pytest.raises(ValueError, match="ASYNCNN_SHM_SPIN_US"):
                ShmConnection(sa, "peer a", 1 << 20, ca, cb.describe())  # where it is read
        finally:
            for closing in (sa, sb, ca, cb):
                closing.close()
        # a cluster refuses it before any worker starts (the workers inherit it)
        cluster = ann.cluster.LocalCluster(workers=1)
        with pytest.raises(ValueError, match="ASYNCNN_SHM_SPIN_US"):
            anyio.run(cluster.start)
        assert cluster.processes == [] and not cluster.started
    for raw, seconds in (("0", 0.0), ("350", 350e-6), (" 1e3 ", 1e-3), ("", 200e-6)):
        monkeypatch.setenv("ASYNCNN_SHM_SPIN_US", raw)
        assert _shm.spin_seconds() == pytest.approx(seconds)
    monkeypatch.delenv("ASYNCNN_SHM_SPIN_US")
    assert _shm.spin_seconds() == pytest.approx(200e-6)
    a, b = pair()
    try:
        assert a._spin == b._spin == pytest.approx(200e-6)
    finally:
        a.close()
        b.close()
