"""Frames on the wire: round trips, authentication, and every way a bad peer is refused."""

from __future__ import annotations

import gc
import os
import socket
import struct
import tracemalloc
from typing import Any

import anyio
import msgpack
import numpy as np
import pytest

from asyncnn._cluster._codec import decode_message, decode_tree, encode_message, encode_tree
from asyncnn._cluster._handshake import (
    Refusals,
    accept,
    accept_socket,
    connect,
    listen,
    serve_listener,
)
from asyncnn._cluster._wire import (
    _PREFIX,
    MAGIC,
    AuthenticationError,
    Connection,
    ProtocolError,
)
from asyncnn._runtime._messages import Message

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def pair(limit: int = 1 << 30) -> tuple[Connection, Connection]:
    a, b = socket.socketpair()
    return Connection(a, "peer a", limit), Connection(b, "peer b", limit)


async def test_frames_round_trip_headers_and_raw_buffers(anyio_backend: str) -> None:
    a, b = pair()
    arrays = [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.zeros((0, 5), dtype=np.float64),
        np.array([1, -2, 3], dtype=np.int64),
        np.random.default_rng(0).normal(size=(1 << 20,)).astype(np.float32),  # 4 MB
    ]
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.send, {"t": "x", "what": [1, "two"]}, arrays)
        header, buffers = await b.receive()
    assert header["t"] == "x" and header["what"] == [1, "two"]
    assert [buf.nbytes for buf in buffers] == [x.nbytes for x in arrays]
    for x, buf in zip(arrays, buffers, strict=True):
        np.testing.assert_array_equal(buf.view(x.dtype).reshape(x.shape), x)
    a.close()
    b.close()


async def test_messages_and_parameter_trees_round_trip(anyio_backend: str) -> None:
    msg = Message(
        "backward", 7, 3, "s1", "s0", 1,
        (np.ones((2, 3), np.float32), None, np.arange(4, dtype=np.int64)),
        {"rows": 2, "minibatch": 0},
    )  # fmt: skip
    header, buffers = encode_message(msg)
    raw = [np.frombuffer(b.tobytes(), np.uint8) for b in buffers]
    back = decode_message(header, raw)
    assert (back.kind, back.key, back.version, back.src, back.dst, back.slot) == (
        "backward", 7, 3, "s1", "s0", 1,
    )  # fmt: skip
    assert back.tensors[1] is None and back.meta == msg.meta
    np.testing.assert_array_equal(back.tensors[2], msg.tensors[2])
    tree = {"a": [np.ones(3), {"w": np.eye(2, dtype=np.float32)}], "step": 4, 0: (np.zeros(1),)}
    bufs: list[Any] = []
    spec = encode_tree(tree, bufs)
    spec = msgpack.unpackb(msgpack.packb(spec), strict_map_key=False)
    got = decode_tree(spec, [np.frombuffer(b.tobytes(), np.uint8) for b in bufs])
    assert got["step"] == 4 and isinstance(got[0], tuple)
    np.testing.assert_array_equal(got["a"][1]["w"], np.eye(2, dtype=np.float32))


def test_decoding_a_message_whose_tensors_do_not_match_fails_clearly() -> None:
    header, buffers = encode_message(Message("forward", 0, 0, "a", "b", 0, (np.ones(4),)))
    header["x"][0][1] = [5]
    with pytest.raises(ValueError, match=r"shape \(5,\) needs 40 bytes, the frame carried 32"):
        decode_message(header, [np.frombuffer(buffers[0].tobytes(), np.uint8)])
    header["x"][0] = ["|O", [4]]
    with pytest.raises(ValueError, match="object dtype"):
        decode_message(header, [np.frombuffer(buffers[0].tobytes(), np.uint8)])
    with pytest.raises(ValueError, match="malformed header"):
        decode_message({"x": []}, [])


async def _refused(raw: bytes, limit: int = 1 << 30) -> ProtocolError:
    a, b = pair(limit)
    await a._send_all(raw)
    with pytest.raises(ProtocolError) as info:
        await b.receive()
    a.close()
    b.close()
    return info.value


async def test_malformed_frames_are_refused_with_what_was_wrong(anyio_backend: str) -> None:
    err = await _refused(b"HTTP" + bytes(12))
    assert "starts with b'HTTP'" in str(err) and "peer b" in str(err)
    err = await _refused(_PREFIX.pack(MAGIC, 1 << 30, 0))
    assert "header" in str(err) and "limit" in str(err)
    junk = b"\xc1\xc1\xc1"
    err = await _refused(_PREFIX.pack(MAGIC, len(junk), 0) + junk)
    assert "undecodable header" in str(err)
    head = msgpack.packb({"t": "m", "n": [10, 10]})
    err = await _refused(_PREFIX.pack(MAGIC, len(head), 5) + head)
    assert "do not add up" in str(err)


async def test_a_frame_claiming_100_gb_is_refused_without_allocating(anyio_backend: str) -> None:
    tracemalloc.start()
    try:
        err = await _refused(_PREFIX.pack(MAGIC, 10, 100 * 10**9), limit=16 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "100,000,000,000 bytes" in str(err) and "max_message_bytes" in str(err)
    assert peak < 1 << 20  # nothing near the claim was allocated


async def test_a_peer_closing_mid_frame_is_an_eof(anyio_backend: str) -> None:
    a, b = pair()
    head = msgpack.packb({"t": "m", "n": [100]})
    await a._send_all(_PREFIX.pack(MAGIC, len(head), 100) + head + bytes(10))
    a.close()
    with pytest.raises(EOFError, match="peer b closed"):
        await b.receive()
    b.close()


async def _handshake(token: bytes, hello: Any = None) -> tuple[Any, Any]:
    listener = listen()
    port = listener.getsockname()[1]
    result: dict[str, Any] = {}

    async def server() -> None:
        sock = await accept_socket(listener)
        try:
            result["server"] = await accept(sock, b"secret", seconds=5)
        except AuthenticationError as exc:
            result["server"] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(server)
        try:
            result["client"] = await connect(
                "127.0.0.1", port, token, hello or {"role": "peer", "index": 1}, "the server"
            )
        except AuthenticationError as exc:
            result["client"] = exc
    listener.close()
    return result["client"], result["server"]


async def test_the_token_handshake(anyio_backend: str) -> None:
    client, (server, hello) = await _handshake(b"secret")
    assert hello == {"role": "peer", "index": 1}
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.send, {"t": "ping"})
        header, _ = await server.receive()
    assert header["t"] == "ping"
    client.close()
    server.close()
    client, server = await _handshake(b"wrong")
    assert isinstance(client, AuthenticationError) and "rejected" in str(client)
    assert isinstance(server, AuthenticationError) and "wrong token" in str(server)


async def test_a_silent_or_oversized_hello_is_refused(anyio_backend: str) -> None:
    listener = listen()
    port = listener.getsockname()[1]

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.recv(32)
            s.sendall(struct.pack("<I", 1 << 20))  # claims a 1 MB hello
            s.recv(1)  # the refusal (or the close)

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, client)
        sock = await accept_socket(listener)
        with pytest.raises(AuthenticationError, match="1048576-byte hello"):
            await accept(sock, b"secret", seconds=5)
    listener.close()


async def test_a_sender_waits_for_a_receiver_that_does_not_read(anyio_backend: str) -> None:
    # back-pressure: nothing piles up in the sender's memory; it waits until the peer reads
    a, b = pair()
    block = np.zeros(1 << 30, dtype=np.uint8)  # more than any socket buffer; never touched
    with anyio.move_on_after(0.5) as scope:
        await a.send({"t": "m"}, [block])
    assert scope.cancelled_caught  # the socket buffers filled and the send waited
    assert a.bytes_sent < block.nbytes
    a.close()
    b.close()


# -- a listener under a flood: file descriptors run out, idle connections pile up ----------------
async def test_running_out_of_file_descriptors_pauses_accepting_instead_of_failing(
    anyio_backend: str,
) -> None:
    import resource

    listener = listen()
    port = listener.getsockname()[1]
    served: list[int] = []
    refused: list[str] = []
    in_ = anyio.Event()

    async def handshake(sock: socket.socket) -> None:
        try:
            conn, hello = await accept(sock, b"secret", seconds=5)
        except AuthenticationError:
            return
        served.append(hello["index"])
        in_.set()
        conn.close()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    idle: list[socket.socket] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_listener, listener, handshake, refused.append)
        try:
            # a descriptor limit just above what is open now: the idle connections (this process
            # holds both of their ends) exhaust it, and accept() meets EMFILE
            # earlier tests' shared-memory connections hold descriptors (their mappings') until
            # they are collected: collect them now, not while the limit is being approached
            gc.collect()
            used = len(os.listdir("/proc/self/fd"))  # noqa: ASYNC240 - a test's set-up
            resource.setrlimit(resource.RLIMIT_NOFILE, (used + 16, hard))
            for _ in range(12):
                try:
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    break
            await anyio.sleep(0.3)  # the listener meets EMFILE, cuts the oldest, backs off
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for s in idle:
            s.close()
        # the listener is still serving: a real peer gets in
        conn = await connect("127.0.0.1", port, b"secret", {"role": "peer", "index": 7}, "l")
        conn.close()
        with anyio.fail_after(5):
            await in_.wait()
        tg.cancel_scope.cancel()
    listener.close()
    assert served == [7]
    assert any("out of file descriptors" in r for r in refused)


def test_accept_backs_off_on_emfile_and_raises_other_errors() -> None:
    import errno

    class Listener:
        def __init__(self, errors: list[OSError]) -> None:
            self.errors = errors

        def accept(self) -> tuple[Any, Any]:
            if self.errors:
                raise self.errors.pop(0)
            return "sock", None

    told: list[OSError] = []
    emfile = [OSError(errno.EMFILE, "Too many open files") for _ in range(3)]
    got = anyio.run(accept_socket, Listener(emfile), told.append)  # type: ignore[arg-type]
    assert got == "sock" and len(told) == 3
    with pytest.raises(OSError, match="Bad file"):
        anyio.run(accept_socket, Listener([OSError(errno.EBADF, "Bad file descriptor")]))  # type: ignore[arg-type]


async def test_pending_handshakes_are_capped_and_a_real_peer_still_gets_in(
    anyio_backend: str,
) -> None:
    listener = listen()
    port = listener.getsockname()[1]
    refused: list[str] = []
    served: list[int] = []
    running = [0]
    in_ = anyio.Event()

    async def handshake(sock: socket.socket) -> None:
        running[0] += 1
        try:
            conn, hello = await accept(sock, b"secret", seconds=30)
            served.append(hello["index"])
            in_.set()
            conn.close()
        except AuthenticationError:
            pass
        finally:
            running[0] -= 1

    idle = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_listener, listener, handshake, refused.append, 8)
        for _ in range(20):  # connections that never answer the nonce
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        await anyio.sleep(0.2)
        assert running[0] <= 8  # the oldest were cut (and their sockets closed)
        conn = await connect("127.0.0.1", port, b"secret", {"role": "peer", "index": 3}, "l")
        conn.close()
        with anyio.fail_after(5):
            await in_.wait()
        tg.cancel_scope.cancel()
    for s in idle:
        s.close()
    listener.close()
    assert served == [3]
    assert sum("handshakes were pending" in r for r in refused) >= 12


def test_refusals_are_a_count_and_a_bounded_sample() -> None:
    r = Refusals(keep=3)
    for i in range(10_000):
        r.add(f"refused {i}")
    report = r.take()
    assert report == {"count": 10_000, "sample": ["refused 0", "refused 1", "refused 2"]}
    assert r.take() == {"count": 0, "sample": []}
