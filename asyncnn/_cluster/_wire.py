"""Frames over TCP: a msgpack header, then raw buffers received straight into preallocated arrays.

A frame on the wire::

    b"ANN1" | u32 header length | u64 total buffer bytes | header (msgpack) | buffer 0 | buffer 1 ...

The header is a map whose ``"n"`` entry lists the byte length of each buffer; the buffers follow
back to back. Both lengths are checked against the connection's limits before anything is
allocated, so a peer that claims 100 GB is refused with an error instead of ballooning memory.

Opening connections (the authenticated handshake, listening, accepting) is ``_handshake``'s.

Sockets are driven directly (non-blocking ``send``/``recv_into`` with anyio's readiness waits) so a
tensor's bytes land in its final buffer with no intermediate copy.
"""

from __future__ import annotations

import contextvars
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
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
    "frame_head",
    "frame_parts",
    "lost_peer",
    "send_waits",
]

MAGIC = b"ANN1"
_PREFIX = struct.Struct("<4sIQ")
MAX_HEADER_BYTES = 1 << 20
#: the largest frame accepted by default (sum of its buffers): 16 GiB; raise it per cluster
DEFAULT_MAX_MESSAGE_BYTES = 16 << 30
_CHUNK = 1 << 22  # bytes per send call: big enough for the loopback, small enough to interleave
_READ_AHEAD = 1 << 16

#: set by a task that reads a link while it hands a frame on (``_remote.LinkReader``): the
#: actors it runs there send, and a send about to wait (for room in the link, or for another
#: send to end) calls it first, so that the link it reads is read on meanwhile (see
#: :func:`send_waits`)
_on_send_wait: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "asyncnn_on_send_wait", default=None
)


def send_waits() -> None:
    """Called by a send about to wait: where the task reads a link (the actors it hands
    messages to send in it), that link's reading goes on in another task meanwhile. Two
    processes each blocked in such a send, each link full, each waiting for the other to read,
    would otherwise wait for ever (the driver's reader of a worker runs a driver's actor whose
    send to that worker waits, while the worker's reader runs an actor whose send back waits)."""
    hook = _on_send_wait.get()
    if hook is not None:
        hook()


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
        max_message_bytes: the most buffer bytes one frame may carry: an incoming frame that
            announces more is refused, an outgoing one is refused before it is sent (both ends
            of a cluster's connections have the same limit).
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
        #: bytes read from the socket, counted as each read returns (in the middle of a frame
        #: too), and how often :meth:`received_progress` found bytes waiting unread
        self._arrived = 0
        self._waiting = 0
        self._rbuf = bytearray(_READ_AHEAD)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        #: what a send cancelled in the middle of its frame left unsent: the next frame follows
        #: it (see :meth:`_send_frame`)
        self._rest: list[memoryview] = []
        #: frames (or the error that ended the reading) that a ``LinkReader`` read ahead and
        #: its task did not take: the next ``LinkReader`` of this connection returns them first
        self.unread: deque[tuple[dict[str, Any], list[np.ndarray]] | Exception] = deque()

    def adopt(self, other: Connection) -> None:
        """Takes over what ``other`` (a connection on the same socket, done with) read ahead."""
        left = other._rbuf[other._rstart : other._rend]
        self._rbuf[: len(left)] = left
        self._rstart, self._rend = 0, len(left)
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received

    def send_sync(self, header: dict[str, Any]) -> None:
        """Sends a header-only frame without an event loop, blocking at most a second a write
        (the shutdown notice a closing cluster leaves its workers); best effort. The rest of a
        frame a cancelled send cut short goes first (see :meth:`_send_frame`): after it, the
        peer read the notice as that frame's tensor bytes."""
        self.sock.setblocking(True)
        self.sock.settimeout(1.0)
        while self._rest:
            self.sock.sendall(self._rest[0])
            self.bytes_sent += len(self._rest.pop(0))
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
            self._arrived += n
            return n

    def received_progress(self, peek: bool = True) -> int:
        """A count that grows while the peer's bytes come in, in the middle of a frame too, and
        (with ``peek``: a system call) while bytes wait unread on the socket: a watchdog tells
        a silent peer from one that is delivering a large frame (or whose frames wait for a
        reader held up elsewhere) by it."""
        if peek and self._unread():
            self._waiting += 1
        return self._arrived + self._waiting

    def sent_progress(self) -> int:
        """A count that grows while this side delivers a frame (:attr:`bytes_sent`)."""
        return self.bytes_sent

    def _unread(self) -> bool:
        """Whether bytes wait on the socket (a peek, not a read)."""
        if self.closed:
            return False
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except OSError:  # (BlockingIOError: nothing there)
            return False

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
        it starts (an NCCL transfer the header announced) is ordered like the frames.

        Raises:
            ValueError: the buffers exceed ``max_message_bytes`` (nothing was sent).
        """
        views = [_byte_view(b) for b in buffers]
        self._check_size(header, sum(v.nbytes for v in views))
        if self._lock.locked():
            send_waits()
        async with self._lock:
            await self._send_frame(header, views)
            if then is not None:
                then()

    def _check_size(self, header: dict[str, Any], total: int) -> None:
        """Refuses, before anything is written, a frame that the peer would refuse as too large
        (which would end the connection with an error in the peer, not here)."""
        if total > self.max_message_bytes:
            t = str(header.get("t"))
            what = {
                "m": f"a {header.get('k')} message from {header.get('s')!r} to {header.get('d')!r} "
                f"(tensors of shapes {[tuple(d[1]) for d in header.get('x') or [] if d]})",
                "run": "the start of a run (the state of the layers it hosts)",
                "result": "the end of a run (the state of the layers it hosted)",
            }.get(t, f"a {t!r} frame")
            raise ValueError(
                f"{what} carries {total:,} bytes of tensors for {self.peer}, over the limit of "
                f"{self.max_message_bytes:,} bytes (raise max_message_bytes of the cluster if a "
                "tensor is really that large)"
            )

    async def _send_frame(self, header: dict[str, Any], views: list[memoryview]) -> None:
        """Writes one frame on the socket (the caller holds the lock).

        A send cancelled in the middle of its frame (a failed run cancels its actors, which may
        be sending a large tensor) leaves the rest of that frame to go first, before the next
        one: cut short, the frame took the next one's bytes as its own (the error report that
        follows a worker's failure was read as tensor bytes, and the run said "worker 0
        died"). A send cancelled before any of its frame went out leaves nothing behind."""
        if self._rest:
            await self._send_parts(self._rest)
        parts = frame_parts(header, views)
        before = self.bytes_sent
        try:
            await self._send_parts(parts)
        except BaseException:
            if self.bytes_sent == before:
                self._rest = []  # (none of it went out: the stream is whole)
            raise

    def cut(self) -> bool:
        """Whether a frame was cut short by a cancelled send and its rest is still to go."""
        return bool(self._rest)

    async def _send_parts(self, parts: list[memoryview]) -> None:
        """Sends ``parts`` one after another, keeping what is left of them in :attr:`_rest`
        should the send be cancelled."""
        self._rest = parts
        while parts:
            view = parts[0]
            while view:
                try:
                    n = self.sock.send(view[:_CHUNK])
                except BlockingIOError:
                    send_waits()
                    await anyio.wait_writable(self.sock)
                    continue
                except OSError as exc:
                    raise ConnectionError(f"sending to {self.peer} failed: {exc}") from exc
                view = view[n:]
                parts[0] = view
                self.bytes_sent += n
            parts.pop(0)

    async def discard(self) -> None:
        """Reads and drops whatever the peer sends until it closes the connection: a process
        whose run failed gives up the stream, but must not leave its peer blocked in a send to
        it (that peer would never read the failure's report; see ``Worker._after_failure``).
        Reads raw bytes: a read cut short in the middle of a frame leaves no frame to parse.

        Raises:
            EOFError, ConnectionError: the peer closed the connection, or it broke.
        """
        self._rstart = self._rend = 0
        while True:
            await self._recv_some(self._rview)

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


def frame_parts(header: dict[str, Any], views: list[memoryview]) -> list[memoryview]:
    """The bytes of a frame, in the pieces it goes out in."""
    head = frame_head(header, [v.nbytes for v in views])
    if sum(v.nbytes for v in views) <= _READ_AHEAD:
        # a small frame goes out in one system call
        return [_byte_view(b"".join([head, *views]))]
    return [_byte_view(head), *views]


def _byte_view(b: Any) -> memoryview:
    """The bytes of a buffer as a flat byte view, without a copy (numpy arrays of any shape,
    zero-sized ones too)."""
    if isinstance(b, np.ndarray):
        return np.ascontiguousarray(b).reshape(-1).view(np.uint8).data
    m = memoryview(b)
    return m.cast("B") if m.nbytes else memoryview(b"")
