"""Opening connections: the authenticated handshake (and the upgrade to shared memory when both
ends share a host), listening, and accepting under a bound on pending handshakes.

Connections are authenticated with a per-run token: the listening side sends a random nonce, the
connecting side answers with HMAC-SHA256(token, nonce + hello) and its hello (who it is). The token
itself never crosses the wire.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import itertools
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgpack

from . import _shm
from ._wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AuthenticationError,
    Connection,
    ProtocolError,
)

__all__ = [
    "Refusals",
    "accept",
    "accept_socket",
    "connect",
    "listen",
    "serve_listener",
]

log = logging.getLogger("asyncnn.cluster")

_NONCE = 32


def _mac(token: bytes, nonce: bytes, hello: bytes) -> bytes:
    return hmac.new(token, nonce + hello, hashlib.sha256).digest()


async def connect(
    host: str,
    port: int,
    token: bytes,
    hello: dict[str, Any],
    peer: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    seconds: float = 30.0,
    shm: bool | None = None,
) -> Connection:
    """Connects to a listening asyncnn process and proves knowledge of ``token``.

    With ``shm`` (default: the ``ASYNCNN_SHM`` environment variable, see ``_shm``) the
    connection offers shared memory; when the other side accepts (it offers it too and runs on
    this host) the result is a :class:`~asyncnn._cluster._shm.ShmConnection`.

    Raises:
        AuthenticationError: the other side refused the handshake.
        ConnectionError: nobody answered within ``seconds``.
    """

    with anyio.fail_after(seconds):
        sock = await _dial(host, port)
    conn = Connection(sock, peer, max_message_bytes)
    out = None
    if _shm.enabled(shm):
        try:
            out = _shm.Channel()
        except OSError:
            out = None  # no shared memory to be had: plain TCP
        else:
            hello = {**hello, _SHM_KEY: {"boot": _shm.boot_id(), **out.describe()}}
    try:
        with anyio.fail_after(seconds):
            nonce = await conn._recv_exact(_NONCE)
            packed = msgpack.packb(hello, use_bin_type=True)
            await conn._send_all(struct.pack("<I", len(packed)) + packed)
            await conn._send_all(_mac(token, nonce, packed))
            verdict = await conn._recv_exact(1)
            theirs = None
            if verdict == b"\x02" and out is not None:  # shared memory offered back
                (length,) = struct.unpack("<I", await conn._recv_exact(4))
                if length > 4096:
                    raise EOFError(f"a {length}-byte shared-memory answer")
                theirs = msgpack.unpackb(await conn._recv_exact(length), raw=False)
                verdict = b"\x01"
    except (EOFError, TimeoutError) as exc:
        conn.close()
        if out is not None:
            out.close()
        raise AuthenticationError(f"{peer} at {host}:{port} refused the handshake") from exc
    if verdict != b"\x01":
        conn.close()
        if out is not None:
            out.close()
        raise AuthenticationError(f"{peer} at {host}:{port} rejected this process's token")
    if theirs is None or out is None:
        if out is not None:
            out.close()
        return conn
    try:
        upgraded: Connection = _shm.ShmConnection(
            conn.sock, peer, max_message_bytes, out, _ring_of(theirs)
        )
    except (ProtocolError, OSError):
        await conn._send_all(b"\x00")  # stay on TCP
        out.close()
        return conn
    await conn._send_all(b"\x01")
    upgraded.adopt(conn)
    return upgraded


_SHM_KEY = "shm"


def _ring_of(desc: Any) -> dict[str, int]:
    """A peer's ring description ``{"pid", "fd", "ring"}``, checked field by field."""

    if not isinstance(desc, dict):
        raise ProtocolError(f"a shared-memory description that is not a map: {desc!r:.100}")
    out = {}
    for field, top in (("pid", 1 << 32), ("fd", 1 << 31), ("ring", _shm.MAX_RING_BYTES)):
        v = desc.get(field)
        if not isinstance(v, int) or not 0 < v <= top:
            raise ProtocolError(
                f"shared-memory field {field!r} = {v!r:.40} is not an integer in (0, {top}]"
            )
        out[field] = v
    if out["ring"] % 8:
        raise ProtocolError(f"shared-memory field 'ring' = {out['ring']} is not a multiple of 8")
    return out


async def _dial(host: str, port: int) -> socket.socket:
    # a plain non-blocking connect: the socket is ours alone from the start (closing a stream
    # wrapper around it could shut the connection down under us)
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            try:
                sock.connect(address)
            except BlockingIOError:
                await anyio.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code)) from None
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise ConnectionError(f"cannot connect to {host}:{port}: {error}")


async def accept(
    sock: socket.socket,
    token: bytes,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    seconds: float = 10.0,
    shm: bool | None = None,
) -> tuple[Connection, dict[str, Any]]:
    """Runs the listening side of the handshake on a freshly accepted socket.

    With ``shm`` (default: the ``ASYNCNN_SHM`` environment variable) a peer that offers shared
    memory from this host gets it: the connection is then a
    :class:`~asyncnn._cluster._shm.ShmConnection`.

    Returns:
        The connection and the peer's hello.

    Raises:
        AuthenticationError: a wrong token, a malformed hello, or no answer within ``seconds``
            (the socket is closed).
    """

    try:
        address = "{}:{}".format(*sock.getpeername()[:2])
    except OSError:
        address = "?"
    conn = Connection(sock, f"the peer at {address}", max_message_bytes)
    out = None
    try:
        with anyio.fail_after(seconds):
            nonce = os.urandom(_NONCE)
            await conn._send_all(nonce)
            (length,) = struct.unpack("<I", await conn._recv_exact(4))
            if length > 4096:
                raise AuthenticationError(
                    f"the peer at {address} sent a {length}-byte hello (at most 4096)"
                )
            packed = await conn._recv_exact(length)
            mac = await conn._recv_exact(32)
            if not hmac.compare_digest(mac, _mac(token, nonce, packed)):
                raise AuthenticationError(f"the peer at {address} presented a wrong token")
            hello = msgpack.unpackb(packed, raw=False)
            if not isinstance(hello, dict):
                raise AuthenticationError(f"the peer at {address} sent a malformed hello")
            offer = hello.pop(_SHM_KEY, None)
            upgraded: Connection | None = None
            if (
                offer is not None
                and _shm.enabled(shm)
                and isinstance(offer, dict)
                and offer.get("boot") == _shm.boot_id() != ""
            ):
                try:
                    theirs = _ring_of(offer)
                    out = _shm.Channel()
                    upgraded = _shm.ShmConnection(sock, conn.peer, max_message_bytes, out, theirs)
                except (ProtocolError, OSError) as exc:
                    log.debug("no shared memory with the peer at %s: %s", address, exc)
                    if out is not None:
                        out.close()
                    out = upgraded = None
            if upgraded is None:
                await conn._send_all(b"\x01")
                return conn, hello
            mine = msgpack.packb(out.describe(), use_bin_type=True)  # type: ignore[union-attr]
            await conn._send_all(b"\x02" + struct.pack("<I", len(mine)) + mine)
            if await conn._recv_exact(1) != b"\x01":  # the peer could not map this side's ring
                out.close()  # type: ignore[union-attr]
                return conn, hello
            upgraded.adopt(conn)
            return upgraded, hello
    except AuthenticationError:
        if out is not None:
            out.close()
        await _refuse(conn)
        raise
    except (EOFError, TimeoutError, ConnectionError, ValueError, struct.error) as exc:
        conn.close()
        if out is not None:
            out.close()
        raise AuthenticationError(f"the peer at {address} failed the handshake: {exc}") from exc


async def _refuse(conn: Connection) -> None:
    try:
        await conn._send_all(b"\x00")
    except (ConnectionError, OSError):
        pass
    conn.close()


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A non-blocking listening socket (loopback by default, an ephemeral port by default)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()  # (a host it cannot bind to left the socket open)
        raise
    return sock


#: handshakes in progress that one listener allows at once; the oldest is cut to make room
MAX_PENDING_HANDSHAKES = 64
# accept() failures that mean "out of descriptors or memory for now", not "the listener is broken"
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


async def accept_socket(
    listener: socket.socket, exhausted: Callable[[OSError], None] | None = None
) -> socket.socket:
    """Waits for and returns the next incoming connection on ``listener``.

    Running out of file descriptors (``EMFILE``: a flood of connections) does not end the wait:
    ``exhausted(error)`` is told (it may free a descriptor) and accepting resumes after a short
    back-off, growing to one second while the shortage lasts."""
    delay = 0.01
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            await anyio.wait_readable(listener)
            continue
        except (ConnectionAbortedError, InterruptedError):
            continue  # the peer gave up before we accepted: nothing to do
        except OSError as exc:
            if exc.errno not in _EXHAUSTED:
                raise
            if exhausted is not None:
                exhausted(exc)
            await anyio.sleep(delay)
            delay = min(1.0, delay * 2)
            continue
        return sock


class Refusals:
    """Connections refused by one process: a count and the first few, in words.

    Bounded however many come (a flood of wrong tokens costs a counter, not a list), and
    reported in pieces: :meth:`take` hands over what accumulated since the last call.

    Args:
        keep: how many refusals are kept in words between two reports.
    """

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.count = 0
        self.sample: list[str] = []

    def add(self, what: str) -> None:
        """Counts one refusal (kept in words while there is room)."""
        self.count += 1
        if len(self.sample) < self.keep:
            self.sample.append(what)

    def take(self) -> dict[str, Any]:
        """``{"count": n, "sample": [...]}`` since the last call; starts counting afresh."""
        out = {"count": self.count, "sample": self.sample}
        self.count, self.sample = 0, []
        return out


async def serve_listener(
    listener: socket.socket,
    handshake: Callable[[socket.socket], Awaitable[None]],
    refuse: Callable[[str], None],
    limit: int = MAX_PENDING_HANDSHAKES,
) -> None:
    """Accepts connections on ``listener`` for ever, running ``handshake(sock)`` for each
    concurrently (an idle connection delays nobody).

    At most ``limit`` handshakes run at once: a connection beyond that cuts the oldest pending
    one (a real peer answers within milliseconds, so the oldest is the likeliest idler), and
    so does running out of file descriptors. ``refuse(what)`` is told of each cut."""
    pending: dict[int, anyio.CancelScope] = {}
    numbers = itertools.count()
    address = "{}:{}".format(*listener.getsockname()[:2])

    def cut_oldest(why: str) -> None:
        if pending:
            pending.pop(next(iter(pending))).cancel()
            refuse(f"a connection to {address} was cut: {why}")

    async def one(sock: socket.socket, n: int, scope: anyio.CancelScope) -> None:
        done = False
        try:
            with scope:
                try:
                    await handshake(sock)
                except OSError as exc:  # e.g. reset before its options could be set
                    refuse(f"a connection to {address} failed during its handshake: {exc}")
                done = True
        finally:
            pending.pop(n, None)
            if not done:  # cut, cancelled or failed: the socket is ours to close
                sock.close()

    async with anyio.create_task_group() as tg:
        while True:
            sock = await accept_socket(
                listener, lambda exc: cut_oldest(f"out of file descriptors ({exc.strerror})")
            )
            if len(pending) >= limit:
                cut_oldest(f"more than {limit} handshakes were pending")
            n = next(numbers)
            scope = anyio.CancelScope()
            pending[n] = scope
            tg.start_soon(one, sock, n, scope)
