"""Opening connections: the token handshake, and a listener that stays up under a flood of bad or
idle peers and when file descriptors run out."""

from __future__ import annotations

import gc
import os
import socket
import struct
from typing import Any

import anyio
import pytest

from asyncnn._cluster._handshake import (
    Refusals,
    accept,
    accept_socket,
    connect,
    listen,
    serve_listener,
)
from asyncnn._cluster._wire import AuthenticationError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


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


# -- a listener under a flood: file descriptors run out, idle connections pile up ----------------
class _Peers:
    """A listener and its handshake, which records the index of each peer it lets in."""

    def __init__(self, seconds: float) -> None:
        self.listener = listen()
        self.port = self.listener.getsockname()[1]
        self.seconds = seconds
        self.served: list[int] = []
        self.refused: list[str] = []
        self.pending = 0  # handshakes under way
        self.let_in = anyio.Event()

    async def handshake(self, sock: socket.socket) -> None:
        self.pending += 1
        try:
            conn, hello = await accept(sock, b"secret", seconds=self.seconds)
        except AuthenticationError:
            return
        finally:
            self.pending -= 1
        self.served.append(hello["index"])
        self.let_in.set()
        conn.close()

    async def a_peer_gets_in(self, index: int) -> None:
        conn = await connect(
            "127.0.0.1", self.port, b"secret", {"role": "peer", "index": index}, "l"
        )
        conn.close()
        with anyio.fail_after(5):
            await self.let_in.wait()


async def test_running_out_of_file_descriptors_pauses_accepting_instead_of_failing(
    anyio_backend: str,
) -> None:
    import resource

    peers = _Peers(seconds=5)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    idle: list[socket.socket] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_listener, peers.listener, peers.handshake, peers.refused.append)
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
                    idle.append(socket.create_connection(("127.0.0.1", peers.port), timeout=5))
                except OSError:
                    break
            await anyio.sleep(0.3)  # the listener meets EMFILE, cuts the oldest, backs off
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for s in idle:
            s.close()
        await peers.a_peer_gets_in(7)  # the listener is still serving
        tg.cancel_scope.cancel()
    peers.listener.close()
    assert peers.served == [7]
    assert any("out of file descriptors" in r for r in peers.refused)


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
    peers = _Peers(seconds=30)
    idle = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve_listener, peers.listener, peers.handshake, peers.refused.append, 8)
        for _ in range(20):  # connections that never answer the nonce
            idle.append(socket.create_connection(("127.0.0.1", peers.port), timeout=5))
        await anyio.sleep(0.2)
        assert peers.pending <= 8  # the oldest were cut (and their sockets closed)
        await peers.a_peer_gets_in(3)
        tg.cancel_scope.cancel()
    for s in idle:
        s.close()
    peers.listener.close()
    assert peers.served == [3]
    assert sum("handshakes were pending" in r for r in peers.refused) >= 12


def test_refusals_are_a_count_and_a_bounded_sample() -> None:
    r = Refusals(keep=3)
    for i in range(10_000):
        r.add(f"refused {i}")
    report = r.take()
    assert report == {"count": 10_000, "sample": ["refused 0", "refused 1", "refused 2"]}
    assert r.take() == {"count": 0, "sample": []}
