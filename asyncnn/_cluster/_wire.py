"""Frames over TCP: a msgpack header, then raw buffers received straight into preallocated arrays.

A frame on the wire::

    b"ANN1" | u32 header length | u64 total buffer bytes | header (msgpack) | buffer 0 | buffer 1 ...

The header is a map whose ``"n"`` entry lists the byte length of each buffer; the buffers follow
back to back. Both lengths are checked against the connection's limits before anything is
allocated, so a peer that claims 100 GB is refused with an error instead of ballooning memory.

Connections are authenticated with a per-run token: the listening side sends a random nonce, the
connecting side answers with HMAC-SHA256(token, nonce + hello) and its hello (who it is). The token
itself never crosses the wire.

Sockets are driven directly (non-blocking ``send``/``recv_into`` with anyio's readiness waits) so a
tensor's bytes land in its final buffer with no intermediate copy.
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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import msgpack
import numpy as np

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AuthenticationError",
    "Connection",
    "PeerLost",
    "ProtocolError",
    "Refusals",
    "accept",
    "connect",
    "lost_peer",
]

log = logging.getLogger("asyncnn.cluster")

MAGIC = b"ANN1"
_PREFIX = struct.Struct("<4sIQ")
MAX_HEADER_BYTES = 1 << 20
#: the largest frame accepted by default (sum of its buffers): 16 GiB; raise it per cluster
DEFAULT_MAX_MESSAGE_BYTES = 16 << 30
_NONCE = 32
_CHUNK = 1 << 22  # bytes per send call: big enough for the loopback, small enough to interleave
_READ_AHEAD = 1 << 16


class ProtocolError(ConnectionError):
    """A peer sent something that is not a valid frame (the connection is closed)."""


class PeerLost(ConnectionError):
    """The process at the other end of a connection went away (``worker`` is its index, or
    None for the driver)."""

    def __init__(self, worker: int | None, message: str) -> None:
        super().__init__(message)
        self.worker = worker


def lost_peer(err: BaseException) -> PeerLost | None:
    """The :class:`PeerLost` behind ``err`` (itself, or an actor's failure caused by it)."""
    seen = 0
    e: BaseException | None = err
    while e is not None and seen < 5:
        if isinstance(e, PeerLost):
            return e
        e = e.__cause__
        seen += 1
    return None


class AuthenticationError(ConnectionError):
    """A peer failed the token handshake (the connection is closed)."""


class Connection:
    """One authenticated TCP connection that carries frames both ways.

    Writers are serialised by a lock (several actors may send on one connection); one task reads.

    Args:
        sock: a connected socket (made non-blocking here).
        peer: who is at the other end, for error messages (e.g. ``"worker 1"``).
        max_message_bytes: the most buffer bytes one incoming frame may announce.
    """

    def __init__(
        self, sock: socket.socket, peer: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # small frames (control, tiny tensors) go out at once, not after Nagle's delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.peer = peer
        self.max_message_bytes = max_message_bytes
        self._lock = anyio.Lock()
        self.closed = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self._rbuf = bytearray(_READ_AHEAD)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0

    def adopt(self, other: Connection) -> None:
        """Takes over what ``other`` (a connection on the same socket, done with) read ahead."""
        left = other._rbuf[other._rstart : other._rend]
        self._rbuf[: len(left)] = left
        self._rstart, self._rend = 0, len(left)
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received

    def send_sync(self, header: dict[str, Any]) -> None:
        """Sends a header-only frame without an event loop, blocking at most a second (the
        shutdown notice a closing cluster leaves its workers); best effort."""
        self.sock.setblocking(True)
        self.sock.settimeout(1.0)
        self.sock.sendall(frame_head(header, []))

    def new_loop(self) -> None:
        """Prepares the connection for use from a new event loop (a cluster outlives the
        ``anyio.run`` of one ``fit``; its lock must belong to the loop that uses it)."""
        self._lock = anyio.Lock()

    # -- low level ---------------------------------------------------------------------------------
    async def _send_all(self, data: Any) -> None:
        view = _byte_view(data)
        while view:
            try:
                n = self.sock.send(view[:_CHUNK])
            except BlockingIOError:
                await anyio.wait_writable(self.sock)
                continue
            except OSError as exc:
                raise ConnectionError(f"sending to {self.peer} failed: {exc}") from exc
            view = view[n:]
            self.bytes_sent += n

    async def _recv_into(self, view: memoryview) -> None:
        total = len(view)
        # first what an earlier read already brought in
        got = min(total, self._rend - self._rstart)
        if got:
            view[:got] = self._rbuf[self._rstart : self._rstart + got]
            self._rstart += got
        while got < total:
            want = total - got
            # small reads go through the read-ahead buffer: one system call brings a whole
            # small frame (prefix, header, tiny tensors); large ones land in place
            small = want < _READ_AHEAD // 4
            n = await self._recv_some(self._rview if small else view[got:])
            if small:
                take = min(n, want)
                view[got : got + take] = self._rbuf[:take]
                self._rstart, self._rend = take, n
                got += take
            else:
                got += n
        self.bytes_received += total

    async def _recv_some(self, target: memoryview) -> int:
        """Reads what the socket has into ``target`` (at least one byte, waiting for it).

        Raises:
            ConnectionError: the read failed.
            EOFError: the peer closed the connection.
        """
        while True:
            try:
                n = self.sock.recv_into(target)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            except OSError as exc:
                raise ConnectionError(f"receiving from {self.peer} failed: {exc}") from exc
            if n == 0:
                raise EOFError(f"{self.peer} closed the connection")
            return n

    async def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        await self._recv_into(memoryview(buf))
        return bytes(buf)

    # -- frames ------------------------------------------------------------------------------------
    async def send(
        self,
        header: dict[str, Any],
        buffers: Sequence[Any] = (),
        then: Callable[[], None] | None = None,
    ) -> None:
        """Sends one frame: ``header`` (msgpack-able) and the raw bytes of each buffer (anything
        exposing the buffer protocol, e.g. a C-contiguous numpy array).

        ``then`` runs right after the frame is written, before any other frame can follow: what
        it starts (an NCCL transfer the header announced) is ordered like the frames."""
        views = [_byte_view(b) for b in buffers]
        async with self._lock:
            await self._send_frame(header, views)
            if then is not None:
                then()

    async def _send_frame(self, header: dict[str, Any], views: list[memoryview]) -> None:
        """Writes one frame on the socket (the caller holds the lock)."""
        head = frame_head(header, [v.nbytes for v in views])
        if sum(v.nbytes for v in views) <= _READ_AHEAD:
            # a small frame goes out in one system call
            await self._send_all(b"".join([head, *views]))
        else:
            await self._send_all(head)
            for v in views:
                await self._send_all(v)

    async def receive(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """Receives one frame: its header and one uint8 array per buffer.

        Raises:
            EOFError: the peer closed the connection between frames.
            ProtocolError: the frame is malformed or larger than allowed (nothing more is read
                from the connection, nothing beyond the prefix was allocated; close it after
                reporting).
        """
        prefix = await self._recv_exact(_PREFIX.size)
        magic, head_len, body = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            self._refuse_reading()
            raise ProtocolError(
                f"malformed frame from {self.peer}: starts with {magic!r}, expected {MAGIC!r} "
                "(not an asyncnn peer, or the stream lost its place)"
            )
        if head_len > MAX_HEADER_BYTES:
            self._refuse_reading()
            raise ProtocolError(
                f"frame from {self.peer} announces a {head_len}-byte header; the limit is "
                f"{MAX_HEADER_BYTES} bytes"
            )
        if body > self.max_message_bytes:
            self._refuse_reading()
            raise ProtocolError(
                f"frame from {self.peer} announces {body:,} bytes of tensors; the limit is "
                f"{self.max_message_bytes:,} bytes (raise max_message_bytes of the cluster if "
                "a real tensor is that large)"
            )
        raw = await self._recv_exact(head_len)
        try:
            header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's fault
            self._refuse_reading()
            raise ProtocolError(f"frame from {self.peer} has an undecodable header: {exc}") from exc
        sizes = header.get("n") if isinstance(header, dict) else None
        if (
            not isinstance(sizes, list)
            or not all(isinstance(s, int) and s >= 0 for s in sizes)
            or sum(sizes) != body
        ):
            self._refuse_reading()
            raise ProtocolError(
                f"frame from {self.peer} has a header whose buffer sizes {sizes!r} do not add up "
                f"to the {body} bytes its prefix announced"
            )
        buffers = []
        for size in sizes:
            arr = np.empty(size, dtype=np.uint8)
            await self._recv_into(arr.data)
            buffers.append(arr)
        return header, buffers

    def _refuse_reading(self) -> None:
        # the stream has lost its place: nothing more is read from it; the write side stays
        # open a moment so the error can still be reported (the owner then closes)
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def close(self) -> None:
        """Closes the socket (idempotent)."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def frame_head(header: dict[str, Any], sizes: list[int]) -> bytes:
    """The prefix and msgpack header of a frame whose buffers have ``sizes`` bytes."""
    packed = msgpack.packb({**header, "n": sizes}, use_bin_type=True)
    return _PREFIX.pack(MAGIC, len(packed), sum(sizes)) + packed


def _byte_view(b: Any) -> memoryview:
    """The bytes of a buffer as a flat byte view, without a copy (numpy arrays of any shape,
    zero-sized ones too)."""
    if isinstance(b, np.ndarray):
        return np.ascontiguousarray(b).reshape(-1).view(np.uint8).data
    m = memoryview(b)
    return m.cast("B") if m.nbytes else memoryview(b"")


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
    from . import _shm

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
    from . import _shm

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
    from . import _shm

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
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    sock.setblocking(False)
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
