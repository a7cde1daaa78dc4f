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
